"""Backlog variant 8, batched prompts: several prompts decoded together, one draft forward and one target forward
per cycle for the whole batch, with per-sequence acceptance, lengths and caches.

The research repo's "batched" benchmark decoded each prompt alone (spec 5.3); this is the real thing.

Layout. Sequences accept different numbers of tokens, so their lengths diverge. Both KV caches (target and draft)
are one batched `DynamicCache` plus a validity mask over its slots [B, T]: a slot is a committed position of that
sequence, or padding / a rejected draft to be ignored. Every forward gets explicit per-sequence `position_ids`
and a 4D mask built from the validity mask (causal inside the verified block, bidirectional inside the draft
block), so a slot's index never matters, only its RoPE position, which was applied before it was cached.
(transformers 5.x `masking_utils._preprocess_mask_arguments` passes a 4D mask through untouched, also with a
DynamicCache; it is given as an additive float mask so SDPA and eager attention both read it right.)
Prompts are left-padded at prefill. After each cycle the caches are either compacted (`compact=True`: the valid
slots of every row are gathered to the right, so the cache is as long as the longest sequence) or only masked
(`compact=False`: rejected slots stay in the cache, masked forever; no copy, but attention grows by the block
width every cycle). Finished sequences leave the batch, so they stop costing compute.

The pieces are the engine protocol's: `check_pair`, a `Proposal` chain per sequence judged by the engine's
`GreedyAcceptor`, the same commit rule (anchor + accepted drafts cached, bonus = next anchor, stop tokens looked
for in the newly committed tokens), the DFlash draft forward and `extract_context_feature`. The loop itself is
batched (one forward for all rows), which the engine's one-sequence Drafter/Verifier cannot express.
Greedy only: every committed token is the target's argmax given that sequence's committed prefix, so each
sequence's output equals its own target-only greedy output (the registry's lossless test, tests/test_batched_decoding.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..engine import (CycleRecord, GenerationResult, GreedyAcceptor, Proposal, check_block_size, check_pair,
                      check_prompt, commit_tokens, cpu_seconds, left_pad)
from ..engine.cache import new_cache, with_cache
from ..engine.drafter import draft_head
from ..engine.loop import clock, generated_length
from ..engine.verifiers import additive_mask
from ..errors import DFlashError
from ..model import extract_context_feature
from ..registry import VariantSpec, register


@dataclass
class BatchStats:
    """What batching cost, per cycle of the whole batch (the cost side of the ablation's table)."""
    live: list[int] = field(default_factory=list)  # sequences still decoding in the cycle (rows of the forwards)
    width: list[int] = field(default_factory=list)  # block width of the cycle (anchor + drafted tokens)
    target_slots: list[int] = field(default_factory=list)  # target cache slots per row before verifying
    target_valid: list[int] = field(default_factory=list)  # of which valid (committed positions), summed over rows
    draft_s: list[float] = field(default_factory=list)
    verify_s: list[float] = field(default_factory=list)
    cycle_s: list[float] = field(default_factory=list)
    prefill_s: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0  # process CPU seconds of the whole batch (NaN on CUDA; see GenerationResult.cpu_s)

    def record_cycle(self, live: int, width: int, draft_s: float, verify_s: float, cycle_s: float) -> None:
        self.live.append(live)
        self.width.append(width)
        self.draft_s.append(draft_s)
        self.verify_s.append(verify_s)
        self.cycle_s.append(cycle_s)

    @property
    def cycles(self) -> int:
        return len(self.live)

    @property
    def padding_fraction(self) -> float:
        """Share of attended target cache slots that were padding or rejected drafts (masked work)."""
        total = sum(n * t for n, t in zip(self.live, self.target_slots))
        return 1.0 - sum(self.target_valid) / total if total else 0.0

    def to_dict(self) -> dict:
        return {"cycles": self.cycles, "live": self.live, "width": self.width, "target_slots": self.target_slots,
                "padding_fraction": self.padding_fraction, "draft_s": sum(self.draft_s),
                "verify_s": sum(self.verify_s), "prefill_s": self.prefill_s, "wall_s": self.wall_s}


@dataclass
class BatchRun:
    results: list[GenerationResult]  # in prompt order
    stats: BatchStats


# --- pure helpers: masks and slot bookkeeping -------------------------------------------------------------------

def verify_mask(cache_valid: torch.Tensor, block_valid: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, q, T + q]: block query j sees the valid cache slots and the valid block slots 0..j (causal).

    A query always sees itself, so no row is fully masked (a fully masked softmax row would give NaN, and NaN
    keys/values in padding slots would poison later layers even where masked)."""
    q = block_valid.shape[1]
    causal = torch.ones(q, q, dtype=torch.bool, device=block_valid.device).tril()
    block = (causal[None] & block_valid[:, None, :]) | torch.eye(q, dtype=torch.bool, device=block_valid.device)
    cache = cache_valid[:, None, :].expand(-1, q, -1)
    return torch.cat([cache, block], dim=2)[:, None]


def draft_mask(cache_valid: torch.Tensor, context_valid: torch.Tensor, block_width: int) -> torch.Tensor:
    """Bool [B, 1, q, T + c + q]: every draft block query sees the valid cached and new context slots and the
    whole block (bidirectional, as in training)."""
    batch = cache_valid.shape[0]
    block = torch.ones(batch, block_width, dtype=torch.bool, device=cache_valid.device)
    keys = torch.cat([cache_valid, context_valid, block], dim=1)
    return keys[:, None, None, :].expand(-1, 1, block_width, -1)


def compaction_index(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot index [B, T'] that right-aligns every row's valid slots (T' = the most valid slots of any row), and
    the validity mask [B, T'] of the result. Rows with fewer valid slots are left-padded with slot 0, masked."""
    counts = valid.sum(dim=1)
    width = int(counts.max()) if valid.numel() else 0
    index = torch.zeros((valid.shape[0], width), dtype=torch.long, device=valid.device)
    for row in range(valid.shape[0]):
        slots = valid[row].nonzero().flatten()
        index[row, width - slots.numel():] = slots
    new_valid = torch.arange(width, device=valid.device)[None] >= (width - counts)[:, None]
    return index, new_valid


def gather_slots(cache, index: torch.Tensor) -> None:
    """Keep, per row, the cache slots `index` [B, T'] of every layer (in place)."""
    for layer in cache.layers:
        if not layer.is_initialized or layer.keys.numel() == 0:
            continue
        expand = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, expand)
        layer.values = layer.values.gather(2, expand)


def drop_last_slots(cache, count: int) -> None:
    """Remove the last `count` slots of every layer (the draft block, which is re-drafted next cycle)."""
    if count:
        for layer in cache.layers:
            if layer.is_initialized and layer.keys.numel():
                layer.keys, layer.values = layer.keys[:, :, :-count], layer.values[:, :, :-count]


def keep_rows(cache, rows: torch.Tensor) -> None:
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.numel():
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]


def is_compact(valid: torch.Tensor) -> bool:
    """Every row's valid slots are already right-aligned and some row has no invalid slot: compaction would
    copy the cache onto itself."""
    return bool((valid[:, 1:] >= valid[:, :-1]).all() and valid.all(dim=1).any())


def _compact(cache, valid: torch.Tensor) -> torch.Tensor:
    if is_compact(valid):  # e.g. target-only, or a cycle where every row accepted its whole block
        return valid
    index, new_valid = compaction_index(valid)
    gather_slots(cache, index)
    return new_valid


def derived_prompts(prompt: list[int], count: int) -> list[list[int]]:
    """`count` other prompts of different lengths made from `prompt`'s own tokens (rotations, longer and shorter),
    so a batch around one prompt has padding on both sides of its length."""
    out = []
    for k in range(1, count + 1):
        shift = k % len(prompt)
        rotated = prompt[shift:] + prompt[:shift]
        if k % 2:
            out.append(rotated + prompt[: k + 1])  # longer
        else:
            out.append(rotated[: max(1, len(prompt) - k)])  # shorter
    return out


# --- the batched decode -----------------------------------------------------------------------------------------

def _check(target, draft, prompts, max_new_tokens, block_size, temperature):
    if not prompts:
        raise DFlashError("generate_batch got no prompts: pass a list of token-id lists.")
    for i, prompt in enumerate(prompts):
        check_prompt(target, torch.as_tensor(prompt, dtype=torch.long), max_new_tokens, f"Prompt {i} of the batch")
    if temperature != 0:
        raise DFlashError(f"The batched variant is greedy only (temperature 0), got temperature {temperature}: "
                          "decode sampled prompts one at a time with dflash.generate.")
    if not isinstance(block_size, int):
        raise DFlashError("The batched variant takes a fixed integer block_size (one block width per batch "
                          f"cycle), got {type(block_size).__name__}.")
    check_block_size(draft, block_size)
    if draft is not None:
        check_pair(target, draft)


@dataclass
class _Rows:
    """The live rows of the batch: both caches with their slot validity, what each row has cached, and the
    target features of committed positions the draft has not read yet (features, validity, positions)."""
    prompt_index: list[int]  # batch row -> prompt index
    lengths: torch.Tensor  # [B] committed positions cached per row (= the anchor's position)
    target_cache: object
    target_valid: torch.Tensor  # [B, T]
    draft_cache: object
    draft_valid: torch.Tensor  # [B, T_draft]
    pending: tuple | None  # ([B, c, K*H], [B, c], [B, c]) or None without a draft

    def keep(self, rows: list[int]) -> None:
        """Finished sequences leave the batch: they stop costing compute."""
        index = torch.tensor(rows, device=self.lengths.device)
        keep_rows(self.target_cache, index)
        keep_rows(self.draft_cache, index)
        self.target_valid, self.draft_valid, self.lengths = (self.target_valid[index], self.draft_valid[index],
                                                              self.lengths[index])
        self.pending = tuple(t[index] for t in self.pending) if self.pending is not None else None
        self.prompt_index = [self.prompt_index[r] for r in rows]

    def compact(self) -> None:
        self.target_valid = _compact(self.target_cache, self.target_valid)
        if self.draft_valid.shape[1]:
            self.draft_valid = _compact(self.draft_cache, self.draft_valid)

    def draft_block(self, draft, embed, lm_head, anchors: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One draft forward for every row: [anchor, MASK...] blocks at `positions` [B, W] -> drafts [B, W-1]."""
        width = positions.shape[1]
        features, context_valid, context_positions = self.pending
        block = torch.full(positions.shape, int(draft.mask_token_id), dtype=torch.long, device=positions.device)
        block[:, 0] = anchors
        dtype = next(draft.parameters()).dtype
        hidden = draft(embed(block).to(dtype), features.to(dtype), context_positions, positions,
                       past_key_values=self.draft_cache,
                       attention_mask=draft_mask(self.draft_valid, context_valid, width))
        drop_last_slots(self.draft_cache, width)  # keep context K/V only; the block is re-drafted next cycle
        self.draft_valid = torch.cat([self.draft_valid, context_valid], dim=1)
        self.pending = tuple(t[:, :0] for t in self.pending)
        return lm_head(hidden[:, 1:]).argmax(dim=-1)  # output j predicts block position j ("no shift")

    def verify(self, target, block_ids: torch.Tensor, positions: torch.Tensor, want_features: bool):
        """One target forward for every row's block (causal inside the block, valid cache slots before it)."""
        mask = verify_mask(self.target_valid, torch.ones_like(block_ids, dtype=torch.bool))
        return target(input_ids=block_ids, position_ids=positions, **with_cache(target, self.target_cache),
                      use_cache=True,
                      attention_mask=additive_mask(mask, target.get_input_embeddings().weight.dtype),
                      output_hidden_states=want_features)

    def commit(self, accepted: torch.Tensor, positions: torch.Tensor, features: torch.Tensor | None) -> None:
        """Per row, the anchor and its accepted drafts are cached (the bonus token is the next anchor); the rest
        of the verified block is masked out, and its features are kept for the draft's next context."""
        kept = torch.arange(positions.shape[1], device=positions.device)[None] <= accepted[:, None]
        self.target_valid = torch.cat([self.target_valid, kept], dim=1)
        self.lengths = self.lengths + accepted + 1
        if features is not None:  # appended: a cycle without a draft call (width 1) leaves earlier ones unread
            self.pending = tuple(torch.cat([old, new], dim=1)
                                 for old, new in zip(self.pending, (features, kept, positions)))


@torch.inference_mode()
def decode_batch(target, draft, prompts, *, max_new_tokens: int, block_size: int, stop_token_ids=None,
                 temperature: float = 0.0, compact: bool = True) -> BatchRun:
    """Greedy DFlash (or target-only with draft=None, block_size=1) on all `prompts` at once."""
    prompts = [[int(t) for t in p] for p in prompts]
    _check(target, draft, prompts, max_new_tokens, block_size, temperature)
    device = target.get_input_embeddings().weight.device
    dtype = target.get_input_embeddings().weight.dtype
    stop_ids = set(int(t) for t in (stop_token_ids or []))
    use_draft = draft is not None and block_size > 1
    layers = list(draft.target_layer_ids) if use_draft else None
    embed = target.get_input_embeddings()
    lm_head = draft_head(target, next(draft.parameters()).dtype) if use_draft else None
    acceptor = GreedyAcceptor()  # the engine's greedy acceptance, applied to each row's own chain
    stats = BatchStats()
    n = len(prompts)
    outputs: list[list[int]] = [[] for _ in range(n)]
    traces: list[list[CycleRecord]] = [[] for _ in range(n)]
    finished_at, stopped = [0.0] * n, [False] * n

    begin, begin_cpu = clock(device), time.process_time()
    ids, valid, positions = (t.to(device) for t in left_pad(prompts, pad_id=0))
    target_cache = new_cache(target.config)
    prefill = target(input_ids=ids, position_ids=positions, **with_cache(target, target_cache), use_cache=True,
                     attention_mask=additive_mask(verify_mask(valid[:, :0], valid), dtype),
                     output_hidden_states=use_draft, logits_to_keep=1)
    batch = _Rows(list(range(n)), torch.tensor([len(p) for p in prompts], device=device), target_cache, valid,
                  new_cache(), torch.zeros((n, 0), dtype=torch.bool, device=device),
                  (extract_context_feature(prefill.hidden_states, layers), valid, positions) if use_draft else None)
    for i, token in enumerate(prefill.logits[:, -1].argmax(dim=-1).tolist()):
        outputs[i].append(token)
        stopped[i] = token in stop_ids
    stats.prefill_s = ttft = clock(device) - begin

    while True:
        live = [r for r, i in enumerate(batch.prompt_index) if not stopped[i] and len(outputs[i]) < max_new_tokens]
        for r, i in enumerate(batch.prompt_index):
            if r not in live:
                finished_at[i] = clock(device) - begin
        if not live:
            break
        if len(live) < len(batch.prompt_index):
            batch.keep(live)
            if compact:  # the dropped rows may have been the longest
                batch.compact()

        cycle_begin = clock(device)
        rows = batch.prompt_index
        remaining = [max_new_tokens - len(outputs[i]) for i in rows]
        width = max(1, min(block_size, max(remaining)))
        anchors = torch.tensor([outputs[i][-1] for i in rows], device=device)
        block_positions = batch.lengths[:, None] + torch.arange(width, device=device)[None]
        drafted = torch.empty((len(rows), 0), dtype=torch.long, device=device)
        if use_draft and width > 1:
            drafted = batch.draft_block(draft, embed, lm_head, anchors, block_positions)
        draft_end = clock(device)
        stats.target_slots.append(batch.target_valid.shape[1])
        stats.target_valid.append(int(batch.target_valid.sum()))
        verified = batch.verify(target, torch.cat([anchors[:, None], drafted], dim=1), block_positions, use_draft)
        verify_end = clock(device)

        accepted_counts = []
        for r, i in enumerate(rows):
            length = min(width, remaining[r])  # this sequence's own block: no more than it may still generate
            proposal = Proposal.chain(drafted[r, : length - 1], draft_passes=int(width > 1), batch_rows=len(rows))
            path, next_token = acceptor.accept(proposal, verified.logits[r, :length])
            committed, stopped[i] = commit_tokens(proposal.path_tokens(path), next_token, stop_ids)
            # Cost fields: this row's share of the batch's one target forward is its `width` block tokens.
            traces[i].append(CycleRecord(
                len(traces[i]), len(outputs[i]), length, len(path), draft_end - cycle_begin, verify_end - draft_end,
                0.0, generated_length=generated_length(proposal.tokens.tolist(), length, stop_ids),
                verified_nodes=width, target_forwards=1, proposal_stats=dict(proposal.stats)))
            outputs[i].extend(committed)
            accepted_counts.append(len(path) - 1)
        batch.commit(torch.tensor(accepted_counts, device=device), block_positions,
                     extract_context_feature(verified.hidden_states, layers) if use_draft else None)
        if compact:
            batch.compact()
        cycle_s = clock(device) - cycle_begin
        for i in rows:
            traces[i][-1].cycle_s = cycle_s
        stats.record_cycle(len(rows), width, draft_end - cycle_begin, verify_end - draft_end, cycle_s)

    stats.wall_s = clock(device) - begin
    stats.cpu_s = cpu_seconds(device, begin_cpu)
    results = [GenerationResult(output_ids=outputs[i][:max_new_tokens],
                                acceptance_lengths=[r.acceptance_length for r in traces[i]], ttft_s=ttft,
                                decode_s=finished_at[i] - ttft, wall_s=finished_at[i], block_size=block_size,
                                temperature=0.0, stopped=stopped[i], trace=traces[i]) for i in range(n)]
    return BatchRun(results, stats)


def generate_batch(target, draft, prompts, *, max_new_tokens: int, block_size: int, stop_token_ids=None,
                   compact: bool = True) -> list[GenerationResult]:
    """Decode `prompts` together (greedy); one result per prompt, in order. A sequence's `wall_s` is the time
    from the batch's start until that sequence finished (its latency inside the batch)."""
    return decode_batch(target, draft, prompts, max_new_tokens=max_new_tokens, block_size=block_size,
                        stop_token_ids=stop_token_ids, compact=compact).results


@dataclass(frozen=True)
class BatchedKnobs:
    batch_size: int = 4  # prompts decoded together
    compact: bool = True  # gather valid cache slots after each cycle (False: mask rejected slots forever)

    def __post_init__(self):
        if self.batch_size < 1:
            raise DFlashError(f"batch_size must be >= 1, got {self.batch_size}.")


def decode_in_batch(target, draft, prompt, knobs: BatchedKnobs, *, max_new_tokens, block_size, temperature=0.0,
                    seed=None, stop_token_ids=None) -> GenerationResult:
    """The registry's view: decode `prompt` in a batch of `batch_size` with derived prompts of other lengths, and
    return `prompt`'s result (so the lossless test checks that batching changes nothing)."""
    prompt = [int(t) for t in prompt]
    others = derived_prompts(prompt, knobs.batch_size - 1)
    middle = len(others) // 2  # the given prompt sits between other rows, not always first
    batch = others[:middle] + [prompt] + others[middle:]
    return decode_batch(target, draft, batch, max_new_tokens=max_new_tokens, block_size=block_size,
                        stop_token_ids=stop_token_ids, temperature=temperature,
                        compact=knobs.compact).results[middle]


SPEC = register(VariantSpec(
    "batched", knob_class=BatchedKnobs, run=decode_in_batch,
    knob_grid=({"batch_size": 1}, {"batch_size": 2}, {"batch_size": 4}, {"batch_size": 3, "compact": False}),
    description="several prompts decoded together: one draft and one target forward per cycle for the whole "
                "batch, per-sequence acceptance, left padding + slot validity masks, finished rows dropped"))
