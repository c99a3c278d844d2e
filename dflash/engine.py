"""The DFlash decode loop: prefill, then per cycle draft -> verify -> accept -> commit.

One protocol serves every variant: a `BlockSizePolicy` chooses each cycle's block size, a drafter proposes
the block, an acceptance rule (dflash.acceptance) decides how much of it the target keeps, and the commit step
is shared. Target-only decoding is the same loop with block size 1 and no draft, so timings compare like with
like.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from . import acceptance as rules
from .cache import cache_length, crop_cache, new_cache
from .errors import DFlashError
from .model import DFlashDraftModel, extract_context_feature


@dataclass
class CycleRecord:
    cycle: int
    token_index: int  # tokens generated before this cycle
    block_size: int  # effective block size (anchor + drafted tokens)
    acceptance_length: int  # tokens committed by this cycle: accepted drafts + the bonus token
    draft_s: float
    verify_s: float
    cycle_s: float
    generated_length: int = 0  # block length the draft meant to fill: up to its first drafted stop token


@dataclass
class GenerationResult:
    output_ids: list[int]  # new tokens only
    acceptance_lengths: list[int]
    ttft_s: float  # target prefill + first token + context features
    decode_s: float  # everything after the first token (draft context prefill included)
    wall_s: float
    block_size: int  # requested block size (0: chosen per cycle by a policy)
    temperature: float
    stopped: bool  # ended on a stop token
    trace: list[CycleRecord] = field(default_factory=list)

    @property
    def num_cycles(self) -> int:
        return len(self.acceptance_lengths)

    @property
    def tau(self) -> float:
        """Mean acceptance length: committed tokens per verification cycle (micro average over cycles)."""
        return sum(self.acceptance_lengths) / len(self.acceptance_lengths) if self.acceptance_lengths else 0.0

    @property
    def tpot_s(self) -> float:
        """Decode time per output token after the first (prefill is TTFT's)."""
        return self.decode_s / max(1, len(self.output_ids) - 1)

    @property
    def tokens_per_s(self) -> float:
        return len(self.output_ids) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def acceptance_histogram(self) -> list[int]:
        """Index t: number of cycles with acceptance length t (t = 0 is always 0)."""
        histogram = [0] * (max(self.acceptance_lengths, default=0) + 1)
        for length in self.acceptance_lengths:
            histogram[length] += 1
        return histogram

    @property
    def per_position_acceptance(self) -> list[tuple[int, int]]:
        """Per draft position j = 1..B-1: (times accepted, times proposed)."""
        width = max((r.block_size for r in self.trace), default=1)
        counts = [[0, 0] for _ in range(width - 1)]
        for record in self.trace:
            for j in range(record.block_size - 1):
                counts[j][1] += 1
                counts[j][0] += j < record.acceptance_length - 1
        return [tuple(c) for c in counts]

    def to_dict(self, trace: bool = True) -> dict:
        out = {
            "output_ids": self.output_ids, "acceptance_lengths": self.acceptance_lengths, "tau": self.tau,
            "num_cycles": self.num_cycles, "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "decode_s": self.decode_s,
            "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s, "block_size": self.block_size,
            "temperature": self.temperature, "stopped": self.stopped,
            "acceptance_histogram": self.acceptance_histogram,
            "per_position_acceptance": [list(c) for c in self.per_position_acceptance],
        }
        if trace:
            out["trace"] = [asdict(r) for r in self.trace]
        return out


class BlockSizePolicy(Protocol):
    """Chooses the block size of each cycle and learns from what the cycle measured."""

    def choose(self, cycle: int) -> int: ...

    def observe(self, record: CycleRecord) -> None: ...


@dataclass
class FixedBlockSize:
    block_size: int

    def choose(self, cycle: int) -> int:
        return self.block_size

    def observe(self, record: CycleRecord) -> None:
        pass


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


def _check_arguments(draft, input_ids, max_new_tokens, block_size, temperature, acceptance):
    if input_ids.numel() == 0:
        raise DFlashError("The prompt is empty: give at least one token (for example the chat template's "
                          "generation prompt).")
    if max_new_tokens < 1:
        raise DFlashError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if temperature < 0:
        raise DFlashError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    if acceptance not in rules.SAMPLING_RULES:
        raise DFlashError(f"Unknown acceptance rule {acceptance!r}; choose one of {sorted(rules.SAMPLING_RULES)}.")
    if isinstance(block_size, int):
        limit = draft.block_size if draft is not None else 1
        if not 1 <= block_size <= limit:
            raise DFlashError(f"block_size must be between 1 and {limit}, got {block_size}: " + (
                f"the draft was trained with block size {draft.block_size}." if draft is not None else
                "target-only decoding (no draft) verifies one token per cycle; pass block_size=1."))


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class DFlashDrafter:
    """Proposes a block with the DFlash draft; owns the draft's context cache (one entry per position < anchor)."""

    def __init__(self, draft: DFlashDraftModel, target):
        self.draft, self.target = draft, target
        self.embed = target.get_input_embeddings()
        self.lm_head = target.get_output_embeddings()
        self.cache = new_cache()

    def propose(self, anchor: int, start: int, length: int, context_features: torch.Tensor, temperature: float,
                acceptance: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft tokens for positions start+1 .. start+length-1 and the law they were drawn from (None: greedy).

        context_features [1, c, K*H] are the target features of positions start-c .. start-1 not yet cached.
        """
        device = self.embed.weight.device
        context_length = context_features.shape[1]
        assert cache_length(self.cache) == start - context_length, "draft cache out of step with the committed text"
        block = torch.full((1, length), int(self.draft.mask_token_id), dtype=torch.long, device=device)
        block[0, 0] = anchor
        context_positions = torch.arange(start - context_length, start, device=device)[None]
        block_positions = torch.arange(start, start + length, device=device)[None]
        hidden = self.draft(self.embed(block), context_features.to(self.embed.weight.dtype), context_positions,
                            block_positions, past_key_values=self.cache)
        crop_cache(self.cache, start)  # keep context K/V only; the block is re-drafted next cycle
        logits = self.lm_head(hidden[0, 1:])  # output j predicts the token at block position j ("no shift")
        if temperature == 0 or acceptance == "match":
            return logits.argmax(dim=-1), None  # upstream's match rule drafts greedily
        probs = rules.probabilities(logits, temperature)
        uniforms = torch.rand(length - 1, generator=generator, dtype=torch.float64)
        tokens = torch.tensor([rules.sample_from(probs[j], float(uniforms[j])) for j in range(length - 1)],
                              device=device)
        return tokens, probs


def _one_hot_law(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(tokens.cpu(), vocab).double()


@torch.inference_mode()
def generate(target, draft: DFlashDraftModel | None, input_ids, *, max_new_tokens: int,
             block_size: int | BlockSizePolicy = 1, temperature: float = 0.0, seed: int | None = None,
             stop_token_ids=None, acceptance: str = "speculative",
             draft_temperature: float | None = None) -> GenerationResult:
    """Speculative decoding with a DFlash draft (or target-only with draft=None, block_size=1).

    Greedy (temperature 0) output equals the target's own greedy decoding; sampled output is distributed as
    the target's, under the `acceptance` rule ("speculative": min(1, p/q) with residual resampling; "match":
    the upstream rule that accepts a greedy draft token iff it equals an independent target sample).
    `draft_temperature` (default: `temperature`) sharpens or flattens the draft's proposal law q only; any q
    keeps the output distribution exact, so it is a tuning knob, not a correctness one.
    """
    input_ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    _check_arguments(draft, input_ids, max_new_tokens, block_size, temperature, acceptance)
    draft_temperature = temperature if draft_temperature is None else draft_temperature
    if draft_temperature < 0 or (draft_temperature == 0) != (temperature == 0):
        raise DFlashError(f"draft_temperature must be > 0 when sampling (temperature {temperature}) and 0 when "
                          f"greedy; got {draft_temperature}.")
    if draft is not None:
        check_pair(target, draft)
    policy = FixedBlockSize(block_size) if isinstance(block_size, int) else block_size
    max_block = draft.block_size if draft is not None else 1
    stop_ids = set(int(t) for t in (stop_token_ids or []))
    rule = rules.SAMPLING_RULES[acceptance]
    device = target.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    prompt_length = input_ids.shape[1]

    def next_uniforms(n: int) -> torch.Tensor:
        return torch.rand(n, generator=generator, dtype=torch.float64)

    begin = _clock(device)
    target_cache = new_cache(target.config)
    prefill = target(input_ids=input_ids, past_key_values=target_cache, use_cache=True,
                     output_hidden_states=draft is not None, logits_to_keep=1)
    last_logits = prefill.logits[0, -1]
    if temperature == 0:
        first = int(last_logits.argmax())
    else:
        first = rules.sample_from(rules.probabilities(last_logits, temperature), float(next_uniforms(1)))
    drafter = DFlashDrafter(draft, target) if draft is not None else None
    pending = (extract_context_feature(prefill.hidden_states, draft.target_layer_ids)
               if draft is not None else None)  # target features of committed positions the draft has not seen
    output = [first]
    stopped = first in stop_ids
    ttft = _clock(device) - begin

    records: list[CycleRecord] = []
    acceptance_lengths: list[int] = []
    while not stopped and len(output) < max_new_tokens:
        cycle_begin = _clock(device)
        length = max(1, min(int(policy.choose(len(records))), max_block, max_new_tokens - len(output)))
        anchor, start = output[-1], prompt_length + len(output) - 1  # the anchor is committed but not yet cached
        draft_tokens = torch.empty(0, dtype=torch.long, device=device)
        draft_law = None
        if length > 1:
            draft_tokens, draft_law = drafter.propose(anchor, start, length, pending, draft_temperature,
                                                      acceptance, generator)
            pending = pending[:, :0]
        draft_end = _clock(device)

        block = torch.cat([torch.tensor([anchor], device=device), draft_tokens])[None]
        verified = target(input_ids=block, past_key_values=target_cache, use_cache=True,
                          output_hidden_states=draft is not None)
        logits = verified.logits[0]
        verify_end = _clock(device)

        if temperature == 0:
            accepted, next_token = rules.greedy_accept(draft_tokens, logits)
        else:
            target_law = rules.probabilities(logits, temperature).cpu()
            if draft_law is None:
                draft_law = _one_hot_law(draft_tokens, logits.shape[-1])
            accepted, next_token = rules.sampling_accept(draft_tokens.cpu(), draft_law.cpu(), target_law,
                                                         next_uniforms(length - 1), float(next_uniforms(1)), rule)
        committed = draft_tokens[:accepted].tolist() + [next_token]
        # Stop tokens are looked for in the newly committed tokens only.
        for i, token in enumerate(committed):
            if token in stop_ids:
                committed, stopped = committed[: i + 1], True
                break
        output.extend(committed)
        crop_cache(target_cache, start + accepted + 1)  # anchor + accepted drafts; the bonus is the next anchor
        if draft is not None:
            features = extract_context_feature(verified.hidden_states, draft.target_layer_ids)[:, : accepted + 1]
            pending = torch.cat([pending, features], dim=1)
        drafted_stops = [i for i, t in enumerate(draft_tokens.tolist()) if t in stop_ids]
        record = CycleRecord(len(records), len(output) - len(committed), length, accepted + 1,
                             draft_end - cycle_begin, verify_end - draft_end, _clock(device) - cycle_begin,
                             generated_length=min(drafted_stops[0] + 2, length) if drafted_stops else length)
        records.append(record)
        acceptance_lengths.append(accepted + 1)
        policy.observe(record)

    end = _clock(device)
    return GenerationResult(output_ids=output[:max_new_tokens], acceptance_lengths=acceptance_lengths, ttft_s=ttft,
                            decode_s=end - begin - ttft, wall_s=end - begin,
                            block_size=block_size if isinstance(block_size, int) else 0,
                            temperature=temperature, stopped=stopped, trace=records)
