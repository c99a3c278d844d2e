"""Fast-dLLM v2 decoding (ANCHORS_ALGORITHMS B2), batched, for any HF Qwen2/Qwen3/Llama block-diffusion LM.

Per block of `block_size` slots (prompt remainder or the previous block's last-logit token, then masks), the
sub-blocks are decoded in order: while the current sub-block has masks, one forward, token shift (position i
reads the logits at i-1), and every masked position whose top probability is above `threshold` is unmasked,
plus always the most confident one. A finished block is committed by a finalize forward over its clean
tokens, whose last logit gives the next block's first token; finished rows then leave the batch and its caches
("trim"). Caches:

* "none": every forward recomputes the whole sequence;
* "prefix": committed blocks live in a KV cache; every step runs the whole block against it. Exact, because a
  committed block attends only to itself and earlier blocks (`masks.block_causal`);
* "dual": also a block cache. A step runs the whole block (and saves its K/V) when there is none yet or the
  sub-block's first slot is still masked (its logit sits outside the sub-block); otherwise it runs only the
  sub-block, whose fresh K/V overwrite their slots (`replace_position`) while the other slots keep the K/V of
  the last whole-block pass. Approximate.

Attention runs through 4-D masks and a cache we drive ourselves, so standard HF models need no remote code.
Batch rows share one block grid from position 0; prefill covers the blocks every prompt fills, and a longer
prompt's later tokens sit in its blocks as given tokens. A row is finished when a stop token is unmasked with
nothing masked before it; its output ends there.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..engine.cache import with_cache
from ..engine.loop import clock
from ..engine.verifiers import additive_mask
from ..errors import DFlashError
from .masks import block_causal
from .reuse import LayerReuse, installed

CACHES = ("none", "prefix", "dual")


class BlockCache(DynamicCache):
    """A DynamicCache that can also overwrite slots: with `replace_at` set, a forward's K/V replace the cached
    ones from that position on instead of being appended; with `dry` set as well, nothing is written (the
    staleness diagnostic computes layers fresh without disturbing the decode)."""

    def __init__(self, config):
        super().__init__(config=config)
        self.replace_at: int | None = None
        self.dry = False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.replace_at is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        a, b = self.replace_at, self.replace_at + key_states.shape[-2]
        if self.dry:
            return (torch.cat([layer.keys[..., :a, :], key_states, layer.keys[..., b:, :]], -2),
                    torch.cat([layer.values[..., :a, :], value_states, layer.values[..., b:, :]], -2))
        layer.keys[..., a:b, :] = key_states
        layer.values[..., a:b, :] = value_states
        return layer.keys, layer.values

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep these batch rows (also of an emptied cache, which `batch_select_indices` would leave alone)."""
        for layer in self.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
                layer.keys, layer.values = layer.keys[keep], layer.values[keep]

    def truncate(self, length: int) -> None:
        if self.get_seq_length() > length:
            self.crop(length - self.get_seq_length())


@dataclass
class DecodeOutput:
    output_ids: list[list[int]]  # per prompt, generated ids up to the first stop token (inclusive)
    forwards: int = 0  # model forwards (one batched forward counts once)
    row_forwards: list[int] = field(default_factory=list)  # forwards each prompt's row took part in
    kinds: dict = field(default_factory=lambda: {"prefill": 0, "block": 0, "sub_block": 0, "finalize": 0})
    wall_s: float = 0.0
    cpu_s: float = 0.0
    # per block the batch decoded, one character per denoising forward: "B" whole block, "s" sub-block
    steps: list[str] = field(default_factory=list)
    reused_steps: int = 0  # sub-block forwards that skipped the layer-reuse span
    computed_steps: int = 0  # sub-block forwards that computed every layer (all of them without layer reuse)
    reuse: dict | None = None  # ReuseStats.summary() when layer reuse was on


def check_settings(model, prompts, block_size, sub_block_size, threshold, cache, layer_reuse, mask_id,
                   max_new_tokens) -> None:
    def whole(value, low):
        return not isinstance(value, bool) and isinstance(value, int) and value >= low
    if not whole(block_size, 1) or not whole(sub_block_size, 1) or block_size % sub_block_size:
        raise DFlashError(f"block_size ({block_size!r}) must be a positive multiple of sub_block_size "
                          f"({sub_block_size!r}), e.g. 32 and 8.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise DFlashError(f"threshold must be a number in [0, 1] (1: one token per forward), got {threshold!r}.")
    if cache not in CACHES:
        raise DFlashError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}.")
    if layer_reuse is not None and not isinstance(layer_reuse, LayerReuse):
        raise DFlashError(f"layer_reuse must be a LayerReuse or None, got {type(layer_reuse).__name__}.")
    if layer_reuse is not None and cache != "dual":
        raise DFlashError(f"layer reuse acts only on sub-block forwards, and only the dual cache has them: with "
                          f"cache={cache!r} every step is a whole-block forward, so the knob would do nothing. "
                          "Use cache='dual', or layer_reuse=None.")
    if not whole(max_new_tokens, 1):
        raise DFlashError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
    vocab = model.get_input_embeddings().weight.shape[0]
    if not whole(mask_id, 0) or mask_id >= vocab:
        raise DFlashError(f"mask_id {mask_id!r} is outside the model's vocabulary (0..{vocab - 1}).")
    if not prompts or any(not p for p in prompts):
        raise DFlashError("every prompt needs at least one token.")
    for index, prompt in enumerate(prompts):
        if any(not whole(t, 0) or t >= vocab for t in prompt):
            raise DFlashError(f"prompt {index} holds ids outside the vocabulary (0..{vocab - 1}).")
        if mask_id in prompt:
            raise DFlashError(f"prompt {index} contains the mask token {mask_id}; a prompt must be clean text.")
    positions = getattr(model.config, "max_position_embeddings", None)
    needed = -(-(max(map(len, prompts)) + max_new_tokens) // block_size) * block_size + block_size
    if positions is not None and needed > positions:
        raise DFlashError(f"prompt plus max_new_tokens needs up to {needed} positions (whole blocks of "
                          f"{block_size}), the model has {positions}; shorten one of them.")


@torch.inference_mode()
def generate(model, prompt_ids, *, block_size: int = 32, sub_block_size: int = 8, threshold: float = 0.9,
             cache: str = "none", layer_reuse: LayerReuse | None = None, mask_id: int, stop_ids=(),
             max_new_tokens: int = 256) -> DecodeOutput:
    """Decode a batch of prompts (a list of id lists; one list of ids is one prompt). Greedy (argmax)."""
    prompts = [list(prompt_ids)] if prompt_ids and isinstance(prompt_ids[0], int) else [list(p) for p in prompt_ids]
    check_settings(model, prompts, block_size, sub_block_size, threshold, cache, layer_reuse, mask_id,
                   max_new_tokens)
    device = model.get_input_embeddings().weight.device
    begin, begin_cpu = clock(device), time.process_time()
    D, S, stops = block_size, sub_block_size, set(stop_ids)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = -(-(int(lengths.max()) + max_new_tokens) // D) * D + D
    tokens = torch.full((len(prompts), width), mask_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt, device=device)
    rows = torch.arange(len(prompts), device=device)  # the prompt index of each batch row
    out = DecodeOutput([[] for _ in prompts], row_forwards=[0] * len(prompts))
    kv = BlockCache(model.config) if cache != "none" else None
    dtype = next(model.parameters()).dtype

    def forward(kind: str, start: int, stop: int, runner=None, keys_end: int | None = None, offset: int = 0):
        """Logits [B, stop-start, V] of positions start..stop-1, attending under the block-causal rule to
        positions 0..keys_end-1 (default stop): those before `start` come from the cache."""
        out.forwards += 1
        out.kinds[kind] += 1
        for r in rows.tolist():
            out.row_forwards[r] += 1
        if kind in ("block", "sub_block"):
            out.steps[-1] += "B" if kind == "block" else "s"
        if runner is not None:
            runner.start({"block": "full", "sub_block": "sub"}.get(kind, "pass"), offset)
        query = torch.arange(start, stop, device=device)
        keys = torch.arange(keys_end or stop, device=device)
        mask = additive_mask(block_causal(query, keys, D)[None, None], dtype).expand(len(rows), -1, -1, -1)
        logits = model(input_ids=tokens[:, start:stop], position_ids=query[None].expand(len(rows), -1),
                       attention_mask=mask, use_cache=kv is not None, **with_cache(model, kv)).logits
        return logits.float()

    with installed(model, layer_reuse) as runner:
        if runner is not None:
            runner.cache = kv
        s = (int(lengths.min()) // D) * D
        if s and (kv is not None or bool((lengths == s).any())):
            # prefill the blocks every prompt fills (the prefix cache); a prompt that ends there gets its next
            # token AR-style from the last logit
            logits = forward("prefill", 0, s, runner)
            ends = lengths == s
            tokens[ends, s] = logits[ends, -1].argmax(-1)
        while len(rows):
            out.steps.append("")
            if runner is not None:
                runner.start_block()
            finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
            for lo in range(s, s + D, S):
                hi = lo + S
                while True:
                    masked = (tokens[:, lo:hi] == mask_id) & ~finished[:, None]
                    if not masked.any():
                        break
                    if kv is None:  # recompute everything: positions 0..s+D-1
                        logits, first = forward("block", 0, s + D, runner), 0
                    elif cache == "prefix" or kv.get_seq_length() == s or masked[:, 0].any():
                        kv.truncate(s)
                        logits, first = forward("block", s, s + D, runner), s
                        if cache == "prefix":
                            kv.truncate(s)
                    else:  # dual cache, sub-block step: overwrite the sub-block's slots of the block cache
                        kv.replace_at = lo
                        try:
                            logits, first = forward("sub_block", lo, hi, runner, keys_end=s + D, offset=lo - s), lo
                        finally:
                            kv.replace_at = None
                    probs = shifted(logits, first, lo, hi).softmax(-1)
                    confidence, predicted = probs.max(-1)
                    confidence = confidence.masked_fill(~masked, -1.0)
                    unmask = masked & (confidence > threshold)
                    best = confidence.argmax(-1)
                    has = masked.any(-1)
                    unmask[has, best[has]] = True
                    tokens[:, lo:hi] = torch.where(unmask, predicted, tokens[:, lo:hi])
                    finished |= stop_found(tokens, lengths[rows], s, hi, mask_id, stops)
            generated = s + D - lengths[rows]
            done = finished | (generated >= max_new_tokens)
            for i in torch.nonzero(done).flatten().tolist():
                row = int(rows[i])
                ids = tokens[i, int(lengths[row]):s + D].tolist()
                cut = next((j + 1 for j, t in enumerate(ids) if t in stops), len(ids))
                out.output_ids[row] = ids[:min(cut, max_new_tokens)]
            keep = torch.nonzero(~done).flatten()
            if len(keep) < len(rows):  # trim: finished rows leave the batch and every cache
                rows, tokens = rows[keep], tokens[keep]
                if kv is not None:
                    kv.select_rows(keep)
                if runner is not None:
                    runner.select_rows(keep)
            if not len(rows):
                break
            # finalize: commit the clean block; its last logit is the next block's first token
            if kv is None:
                logits = forward("finalize", 0, s + D, runner)
            else:
                kv.truncate(s)
                logits = forward("finalize", s, s + D, runner)
            free = tokens[:, s + D] == mask_id
            tokens[free, s + D] = logits[free, -1].argmax(-1)
            s += D
        if runner is not None:
            out.reuse = runner.stats.summary()
            out.reused_steps, out.computed_steps = runner.stats.reuse_steps, runner.stats.compute_steps
        else:
            out.computed_steps = out.kinds["sub_block"]
    out.wall_s = clock(device) - begin
    out.cpu_s = time.process_time() - begin_cpu
    return out


def shifted(logits: torch.Tensor, first: int, lo: int, hi: int) -> torch.Tensor:
    """Token shift: the logits that predict slots lo..hi-1, i.e. those of positions lo-1..hi-2, from logits of
    positions first, first+1, ... Position lo-1 lies outside them only when slot lo cannot be masked (a block's
    first slot, or a sub-block step, which runs only while the sub-block's first slot is filled): zeros stand
    there."""
    if lo - 1 >= first:
        return logits[:, lo - 1 - first:hi - 1 - first]
    return torch.cat([logits.new_zeros(len(logits), 1, logits.shape[-1]), logits[:, :hi - 1 - first]], 1)


def stop_found(tokens, lengths, s: int, hi: int, mask_id: int, stops: set[int]) -> torch.Tensor:
    """Per row: a stop token among the generated slots before `hi` with no mask before it."""
    found = torch.zeros(len(tokens), dtype=torch.bool, device=tokens.device)
    if not stops:
        return found
    for i in range(len(tokens)):
        start = max(int(lengths[i]), s)
        for token in tokens[i, start:hi].tolist():
            if token == mask_id:
                break
            if token in stops:
                found[i] = True
                break
    return found
