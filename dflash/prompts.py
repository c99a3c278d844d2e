"""Prompts from a profile's datasets: templates filled from a row's fields, user turns (multi-turn datasets),
and token ids through the target's chat template, with thinking on or off as the dataset says
(`DatasetSpec.thinking`); `prompt_rendering` names the template and the flag each record carries."""
from __future__ import annotations

import json
import re

from .datasets import DatasetSpec, dataset_rows
from .errors import DFlashError
from .loading import chat_prompt_ids, chat_template_identity, has_thinking_switch


_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_template(template: str, fields: dict, *, what: str = "template") -> str:
    """`template` with each `{name}` replaced by fields[name]; `{{` / `}}` give literal braces and every other
    brace is kept as it is (unlike str.format, a `\\boxed{}` suffix or braces in a value are safe)."""
    def replace(match):
        if match.group(1) is None:
            return match.group(0)[0]
        name = match.group(1)
        if name not in fields:
            raise DFlashError(f"{what}: placeholder {{{name}}} is not a field of the row (fields: "
                              f"{', '.join(sorted(fields))}).")
        return str(fields[name])
    return _PLACEHOLDER.sub(replace, template)


def prompt_turns(profile, spec: DatasetSpec, count: int) -> list[list[str]]:
    """The user turns of the first `count` rows, in the dataset's order (file order, or the seeded shuffle):
    one text per row, or up to `spec.turns` for a multi-turn dataset (each filled into the template as
    {turn})."""
    if spec.source == "tiny":
        from .loading import PACKAGE_MODELS
        texts = json.loads((PACKAGE_MODELS / "tiny" / "heldout.json").read_text())[spec.name]
        return [[t] for t in texts[:count]]
    if spec.source == "smol":
        from .training.prompt_sets import heldout_prompts
        return [[t] for t in heldout_prompts(max(count, 12))[spec.name][:count]]
    rows = dataset_rows(spec)
    if spec.shuffle_seed is not None:
        rows = rows.shuffle(seed=spec.shuffle_seed, keep_in_memory=True)
    what = f"dataset {spec.name} template {spec.template!r}"
    conversations = []
    for row in rows.select(range(min(count, len(rows)))):
        fields = dict(row)
        if spec.multi_turn_field:
            turns = list(row[spec.multi_turn_field])[:spec.turns]
            conversations.append([fill_template(spec.template, {**fields, "turn": t}, what=what) for t in turns])
        else:
            conversations.append([fill_template(spec.template, fields, what=what)])
    return conversations


def benchmark_prompt_texts(profile, per_category: int) -> dict[str, list[str]]:
    """The last user turn of each of a profile's first `per_category` prompts per dataset (`dflash train
    --heldout smol-heldout`: held-out math and chat, the first HumanEval problems; never used for training)."""
    return {spec.name: [turns[-1] for turns in prompt_turns(profile, spec, per_category)] for spec in profile.datasets}


def encode_turns(spec: DatasetSpec, tokenizer, turns: list[str], answers=()) -> list[int]:
    """Token ids of a prompt: the user turns with the assistant's answers between them (len(answers) ==
    len(turns) - 1), through the target's chat template (spec 4.3) with thinking on only when the dataset says
    so (`spec.thinking`; None and False render it off); without chat, the raw text of the single turn."""
    if len(answers) != len(turns) - 1:
        raise DFlashError(f"Dataset {spec.name}: {len(turns)} turns need {len(turns) - 1} answers, got {len(answers)}.")
    if not spec.chat:
        return tokenizer(turns[-1], add_special_tokens=False)["input_ids"]
    messages = []
    for index, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if index < len(answers):
            messages.append({"role": "assistant", "content": answers[index]})
    return chat_prompt_ids(tokenizer, messages, enable_thinking=bool(spec.thinking))


def prompt_rendering(spec: DatasetSpec, tokenizer) -> dict:
    """How a dataset's prompts are rendered, as every record of its cases carries it: `prompt_template` ("raw"
    for raw text, else the chat template's identity, `dflash.loading.chat_template_identity`) and `thinking`
    ("on", "off", or "none": raw text, or a template without a thinking switch). A DFlashError when the dataset
    and the template disagree: a chat dataset without an explicit `thinking` on a template that has the switch
    (which mode it runs must be said, not inherited from the template's default), or thinking on with a template
    that has no switch (the "thinking-on" case would be the thinking-off case again)."""
    if not spec.chat:
        return {"prompt_template": "raw", "thinking": "none"}
    switch = has_thinking_switch(tokenizer)
    if switch and spec.thinking is None:
        raise DFlashError(f"Dataset {spec.name}: the target's chat template has a thinking switch (Qwen3's "
                          "enable_thinking), so the dataset must say thinking=True or False (DatasetSpec.thinking).")
    if not switch and spec.thinking:
        raise DFlashError(f"Dataset {spec.name} asks for thinking on, but the target's chat template has no "
                          "thinking switch (enable_thinking changes nothing): use a Qwen3-style target or drop the "
                          "thinking-on dataset.")
    return {"prompt_template": chat_template_identity(tokenizer),
            "thinking": spec.thinking_label if switch else "none"}


def load_prompts(profile, spec: DatasetSpec, tokenizer, count: int, answer=None) -> list[list[int]]:
    """Token ids of the first `count` prompts of a dataset (fixed order: the same prompts in every run, and the
    first N a prefix of the first M > N). A multi-turn dataset gives its turn `spec.turns`: turn 1, or turn 2
    after turn 1 and `answer(turn-1 ids)`, the target's greedy answer text (see DatasetSpec.turns)."""
    prompt_rendering(spec, tokenizer)  # the dataset and the template agree on thinking
    conversations = prompt_turns(profile, spec, count)
    if spec.turns == 1:
        return [encode_turns(spec, tokenizer, turns[:1]) for turns in conversations]
    if answer is None:
        raise DFlashError(f"Dataset {spec.name} decodes turn {spec.turns}: load_prompts needs answer=, the target's "
                          "greedy answer to the turns before it.")
    prompts = []
    for turns in conversations:
        answers = []
        for k in range(1, len(turns)):
            answers.append(answer(encode_turns(spec, tokenizer, turns[:k], answers)))
        prompts.append(encode_turns(spec, tokenizer, turns, answers))
    return prompts
