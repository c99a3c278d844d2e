"""Argument checks shared by every decoder (the loop, the batched backend, training): each failure says what was
wrong and how to fix it."""
from __future__ import annotations

import math

import torch

from ..errors import DFlashError
from ..model import DFlashDraftModel
from . import acceptance as rules


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B, P], valid [B, P] (False on padding) and positions [B, P] (0 on padding) of left-padded prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        valid[row, width - len(prompt):] = True
    positions = (valid.cumsum(dim=1) - 1).clamp(min=0)
    return ids, valid, positions


def check_pair(target, draft: DFlashDraftModel) -> None:
    """Fail early, with a fix, when a draft cannot work with a target."""
    text = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    vocab = target.get_input_embeddings().weight.shape[0]
    if draft.config.hidden_size != text.hidden_size:
        raise DFlashError(f"Draft hidden size {draft.config.hidden_size} does not match the target's "
                          f"{text.hidden_size}: this draft was trained for another target. Use the draft made for "
                          "this target (e.g. z-lab/Qwen3-4B-DFlash-b16 with Qwen/Qwen3-4B).")
    if draft.config.vocab_size != vocab:
        raise DFlashError(f"Draft vocabulary size {draft.config.vocab_size} does not match the target's embedding "
                          f"table ({vocab} rows): the draft borrows the target's embeddings and LM head, so they "
                          "must be the same model family.")
    bad = [i for i in draft.target_layer_ids if not 0 <= i < text.num_hidden_layers]
    if bad:
        raise DFlashError(f"Draft target_layer_ids {draft.target_layer_ids} include {bad}, outside the target's "
                          f"{text.num_hidden_layers} decoder layers (valid: 0..{text.num_hidden_layers - 1}). Fix "
                          "dflash_config.target_layer_ids in the draft's config.json.")
    if draft.mask_token_id is None or not 0 <= int(draft.mask_token_id) < vocab:
        raise DFlashError(f"Draft mask_token_id {draft.mask_token_id!r} is missing or outside the vocabulary "
                          f"(0..{vocab - 1}). Set dflash_config.mask_token_id in the draft's config.json to the id "
                          "of the <|MASK|> token the draft was trained with.")


SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


def target_positions(target) -> int | None:
    """The number of positions the target was built for (max_position_embeddings), if its config says."""
    text = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    return getattr(text, "max_position_embeddings", None)


def check_prompt(target, input_ids: torch.Tensor, max_new_tokens: int, what: str = "The prompt") -> None:
    """A prompt the target can decode: not empty, every id in its vocabulary, and prompt plus new tokens within
    the positions it was built for (past them a RoPE model still runs, silently wrong)."""
    if input_ids.numel() == 0:
        raise DFlashError(f"{what} is empty: give at least one token (for example the chat template's "
                          "generation prompt).")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DFlashError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
    vocab = target.get_input_embeddings().weight.shape[0]
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise DFlashError(f"{what} holds token id {bad}, outside the target's vocabulary (0..{vocab - 1}). Use ids "
                          "from this target's tokenizer, or pass text instead of ids.")
    positions = target_positions(target)
    if positions is not None and input_ids.numel() + max_new_tokens > positions:
        room = positions - input_ids.numel()
        raise DFlashError(f"{what} ({input_ids.numel()} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                          f"target's {positions} positions (max_position_embeddings). " +
                          (f"Lower max_new_tokens to at most {room}." if room >= 1 else "Shorten the prompt."))


def check_temperature(temperature, name: str = "temperature") -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise DFlashError(f"{name} must be a finite number >= 0 (0 = greedy), got {temperature!r}.")


def check_block_size(draft, block_size) -> None:
    if isinstance(block_size, int):
        limit = draft.block_size if draft is not None else 1
        if not 1 <= block_size <= limit:
            raise DFlashError(f"block_size must be between 1 and {limit}, got {block_size}: " + (
                f"the draft was trained with block size {draft.block_size}." if draft is not None else
                "target-only decoding (no draft) verifies one token per cycle; pass block_size=1."))


TAIL_BLOCKS = ("cut", "full")


def check_arguments(target, draft, input_ids, max_new_tokens, block_size, temperature, acceptance, seed,
                     tail_blocks="cut"):
    if tail_blocks not in TAIL_BLOCKS:
        raise DFlashError(f"tail_blocks must be one of {TAIL_BLOCKS}, got {tail_blocks!r}.")
    # full tail blocks verify up to a block past the budget: those positions must exist too
    check_prompt(target, input_ids, max_new_tokens + (max(1, draft.block_size) - 1 if tail_blocks == "full" and
                                                      draft is not None else 0))
    check_temperature(temperature)
    if acceptance not in rules.SAMPLING_RULES:
        raise DFlashError(f"Unknown acceptance rule {acceptance!r}; choose one of {sorted(rules.SAMPLING_RULES)}.")
    if seed is not None and not (isinstance(seed, int) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise DFlashError(f"seed must be an integer in [-2**63, 2**64 - 1], got {seed!r}.")
    check_block_size(draft, block_size)



def check_draft_temperature(temperature: float, draft_temperature) -> None:
    if not isinstance(draft_temperature, (int, float)) or not math.isfinite(draft_temperature):
        check_temperature(draft_temperature, "draft_temperature")
    if draft_temperature < 0 or (draft_temperature == 0) != (temperature == 0):
        raise DFlashError(f"draft_temperature must be > 0 when sampling (temperature {temperature}) and 0 when "
                          f"greedy; got {draft_temperature}.")
