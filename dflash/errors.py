"""One exception type for bad input: its message says what was wrong and how to fix it."""


class DFlashError(ValueError):
    """Raised for bad input (models, prompts, settings). The CLI prints the message without a traceback."""
