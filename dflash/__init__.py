"""dflash: DFlash block-diffusion speculative decoding, its acceptance rules, and an embedded tiny model pair.

The names below load on first use, so `dflash --help` and a Ctrl-C during start-up never wait on torch."""
from importlib import import_module

from .errors import DFlashError

_EXPORTS = {
    "BlockSizePolicy": ".engine", "CycleRecord": ".engine", "FixedBlockSize": ".engine",
    "GenerationResult": ".engine", "generate": ".engine",
    "KNOWN_MODELS": ".loading", "load_draft": ".loading", "load_target": ".loading", "load_tokenizer": ".loading",
    "DFlashDraftModel": ".model", "build_target_layer_ids": ".model", "extract_context_feature": ".model",
    "make_draft_config": ".model",
}

__all__ = sorted([*_EXPORTS, "DFlashError"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
