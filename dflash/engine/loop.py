"""The DFlash decode loop: prefill, then per cycle propose -> verify -> accept -> commit.

Every research variant is a set of plug-ins (dflash.engine.protocol), never a copy of this loop:

* `BlockSizePolicy.choose(cycle)` picks the cycle's length L (anchor + up to L-1 drafted positions).
* A **Drafter** proposes a `Proposal` (a chain or a tree over node 0 = the anchor); `DFlashDrafter`
  (dflash.engine.drafter) is plain DFlash, and its `draft_logits` lets a drafter run several passes per cycle.
* A **Verifier** runs the target over the proposal: `Verification.logits` [N+1, V] (row i: the target's
  prediction after node i) and `features` (the draft's context features per node); `commit` leaves the target
  cache holding exactly the committed text before the next anchor. `LinearVerifier` (a chain, one forward) is the
  default; `TreeVerifier` verifies any tree in one forward (dflash.engine.verifiers).
* An **Acceptor** picks the accepted path [0, n1, n2, ...] and the token after it; `draw(n)` returns n uniforms
  from the run's generator, so the rules stay pure functions of their random numbers (dflash.engine.acceptance).
* The **commit** step is shared (`commit_tokens` and the rest of the cycle below): extend the output, stop on a
  stop token among the new tokens only, `verifier.commit`, the committed nodes' context features for the next
  draft, a `CycleRecord` (cost: `verified_nodes`, `target_forwards`, `proposal_stats`, `accepted_path`),
  `policy.observe`, `drafter.observe`. `protocol_costs(results)` turns those into per-cycle cost metrics.

Target-only decoding is the same loop with block size 1 and no draft, so timings compare like with like.
"""
from __future__ import annotations

import math
import time

import torch

from ..errors import DFlashError
from ..model import DFlashDraftModel, extract_context_feature
from . import acceptance as rules
from .acceptors import default_acceptor
from .cache import new_cache, with_cache
from .checks import check_arguments, check_draft_temperature, check_pair
from .drafter import DFlashDrafter
from .protocol import (Acceptor, BlockSizePolicy, CycleOutcome, CycleRecord, Drafter, FixedBlockSize,
                       GenerationResult, Proposal, Verifier)
from .verifiers import LinearVerifier


def cpu_seconds(device: torch.device, since: float) -> float:
    """Process CPU seconds since `since` (a `time.process_time()`), NaN on CUDA."""
    return math.nan if device.type == "cuda" else time.process_time() - since


def clock(device: torch.device) -> float:
    """Seconds on a wall clock, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def commit_tokens(accepted: list[int], next_token: int, stop_ids: set[int]) -> tuple[list[int], bool]:
    """The tokens a cycle commits (accepted drafts, then the bonus/correction token), cut after the first stop
    token among them, and whether one was found. Only new tokens are searched: the anchor was committed before."""
    committed = [*accepted, next_token]
    for i, token in enumerate(committed):
        if token in stop_ids:
            return committed[: i + 1], True
    return committed, False


def generated_length(drafted: list[int], length: int, stop_ids: set[int]) -> int:
    """The block length the draft meant to fill: up to and including its first drafted stop token."""
    stops = [i for i, token in enumerate(drafted) if token in stop_ids]
    return min(stops[0] + 2, length) if stops else length


@torch.inference_mode()
def generate(target, draft: DFlashDraftModel | None, input_ids, *, max_new_tokens: int,
             block_size: int | BlockSizePolicy = 1, temperature: float = 0.0, seed: int | None = None,
             stop_token_ids=None, acceptance: str = "speculative", draft_temperature: float | None = None,
             drafter: Drafter | None = None, verifier: Verifier | None = None,
             acceptor: Acceptor | None = None, tail_blocks: str = "cut") -> GenerationResult:
    """Speculative decoding with a DFlash draft (or target-only with draft=None, block_size=1).

    Greedy (temperature 0) output equals the target's own greedy decoding; sampled output is distributed as
    the target's, under the `acceptance` rule ("speculative": min(1, p/q) with residual resampling; "match":
    the upstream rule that accepts a greedy draft token iff it equals an independent target sample).
    `draft_temperature` (default: `temperature`) sharpens or flattens the draft's proposal law q only; any q
    keeps the output distribution exact, so it is a tuning knob, not a correctness one.
    `drafter`, `verifier`, `acceptor`: the protocol's plug-ins (module docstring); defaults are plain DFlash.
    `tail_blocks`: "cut" shrinks the last block to the tokens left in the budget; "full" keeps full-size blocks
    to the end and counts what they accept, as upstream's loop does (its published tau), then truncates the
    output to the budget. The output is the same either way; only the last cycle's tau (and cost) differ.
    """
    input_ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    check_arguments(target, draft, input_ids, max_new_tokens, block_size, temperature, acceptance, seed, tail_blocks)
    draft_temperature = temperature if draft_temperature is None else draft_temperature
    check_draft_temperature(temperature, draft_temperature)
    if draft is not None:
        check_pair(target, draft)
    elif drafter is not None:
        raise DFlashError("A drafter was given without a draft model: pass the draft it was built for.")
    policy = FixedBlockSize(block_size) if isinstance(block_size, int) else block_size
    max_block = draft.block_size if draft is not None else 1
    stop_ids = set(int(t) for t in (stop_token_ids or []))
    if temperature == 0 or acceptance == "match":
        draft_temperature = 0.0  # upstream's match rule drafts greedily
    device = target.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    prompt_length = input_ids.shape[1]
    feature_layers = list(draft.target_layer_ids) if draft is not None else None
    verifier = verifier if verifier is not None else LinearVerifier()
    acceptor = acceptor if acceptor is not None else default_acceptor(temperature, acceptance)

    def next_uniforms(n: int) -> torch.Tensor:
        return torch.rand(n, generator=generator, dtype=torch.float64)

    begin, begin_cpu = clock(device), time.process_time()
    target_cache = new_cache(target.config)
    prefill = target(input_ids=input_ids, **with_cache(target, target_cache), use_cache=True,
                     output_hidden_states=draft is not None, logits_to_keep=1)
    last_logits = prefill.logits[0, -1]
    if temperature == 0:
        first = int(last_logits.argmax())
    else:
        first = rules.sample_from(rules.probabilities(last_logits, temperature), float(next_uniforms(1)))
    if draft is not None and drafter is None:
        drafter = DFlashDrafter(draft, target)
    pending = (extract_context_feature(prefill.hidden_states, feature_layers)
               if draft is not None else None)  # target features of committed positions the draft has not seen
    output = [first]
    stopped = first in stop_ids
    ttft = clock(device) - begin
    empty = Proposal.chain(torch.empty(0, dtype=torch.long, device=device))

    records: list[CycleRecord] = []
    acceptance_lengths: list[int] = []
    while not stopped and len(output) < max_new_tokens:
        cycle_begin = clock(device)
        budget = max_new_tokens - len(output) if tail_blocks == "cut" else max_block
        length = max(1, min(int(policy.choose(len(records))), max_block, budget))
        anchor, start = output[-1], prompt_length + len(output) - 1  # the anchor is committed but not yet cached
        proposal = empty
        if length > 1:
            proposal = drafter.propose(anchor, start, length, pending, draft_temperature, generator)
            pending = pending[:, :0]
        draft_end = clock(device)

        verification = verifier.verify(target, target_cache, anchor, proposal, start, feature_layers)
        verify_end = clock(device)

        path, next_token = acceptor.accept(proposal, verification.logits, next_uniforms)
        committed, stopped = commit_tokens(proposal.path_tokens(path), next_token, stop_ids)
        output.extend(committed)
        verifier.commit(target_cache, start, path)  # anchor + accepted nodes; the bonus is the next anchor
        if draft is not None:
            pending = torch.cat([pending, verification.features[:, path]], dim=1)
        record = CycleRecord(len(records), len(output) - len(committed), length, len(path),
                             draft_end - cycle_begin, verify_end - draft_end, clock(device) - cycle_begin,
                             generated_length=generated_length(proposal.path_tokens(proposal.leaf_paths()[0]),
                                                               length, stop_ids),
                             verified_nodes=verification.verified_nodes,
                             target_forwards=verification.target_forwards, proposal_stats=dict(proposal.stats),
                             accepted_path=list(path))
        records.append(record)
        acceptance_lengths.append(len(path))
        policy.observe(record)
        if drafter is not None:
            drafter.observe(CycleOutcome(start, anchor, proposal, path, next_token, stopped))

    end = clock(device)
    stopped = stopped and any(t in stop_ids for t in output[:max_new_tokens])  # a full tail block may pass it
    return GenerationResult(output_ids=output[:max_new_tokens], acceptance_lengths=acceptance_lengths, ttft_s=ttft,
                            decode_s=end - begin - ttft, wall_s=end - begin,
                            block_size=block_size if isinstance(block_size, int) else 0,
                            temperature=temperature, stopped=stopped, trace=records,
                            cpu_s=cpu_seconds(device, begin_cpu))


def protocol_costs(results: list[GenerationResult]) -> dict:
    """Per-cycle cost of a set of decodes (cycles that drafted nothing included): target work, draft work and
    every proposal stat the drafter reported, plus draft/verify seconds per cycle."""
    records = [r for result in results for r in result.trace]
    n = max(1, len(records))
    stats = sorted({key for r in records for key, value in r.proposal_stats.items()
                    if isinstance(value, (int, float))})
    return {"verified_nodes_per_cycle": sum(r.verified_nodes for r in records) / n,
            "target_forwards_per_cycle": sum(r.target_forwards for r in records) / n,
            "draft_s_per_cycle": sum(r.draft_s for r in records) / n,
            "verify_s_per_cycle": sum(r.verify_s for r in records) / n,
            **{f"{key}_per_cycle": sum(r.proposal_stats.get(key, 0) for r in records) / n for key in stats}}
