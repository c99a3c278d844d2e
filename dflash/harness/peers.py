"""Peer benchmark: DFlash against what a transformers user would run instead, same prompts, same process.

Modes, run on each prompt in turn (order rotating per prompt) after one warm-up of every mode:
  * `hf-greedy`: transformers `generate`, greedy (the reference output and the reference speed);
  * `hf-prompt-lookup`: transformers prompt-lookup decoding (`prompt_lookup_num_tokens=10`), also greedy;
  * `target-only`: this project's decode loop without a draft (block size 1);
  * `dflash bs=B`: DFlash at fixed block sizes; `dflash scheduler`: the break-even block-size scheduler.
Per mode: tokens/s (total tokens / total wall, prefill included), the ratio to transformers greedy, tau, and
how many outputs are identical to transformers greedy (differences are checked for float ties).

Cost-model ceiling of a DFlash mode, from the forward times measured in these same runs:
  ceiling = tau * T(1) / (T(verify b) + T(draft b))
with T(1) the mean one-token target forward of the target-only loop and T(verify b), T(draft b) the mean verify
and draft seconds per cycle of the mode. It is the speedup over one-token decoding that DFlash would reach with no
other overhead. efficiency = realized speedup / ceiling, where the realized speedup is tokens/s over transformers
greedy (the headline ratio); efficiency over the project's own target-only loop is reported too.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from ..engine import generate
from ..engine.policies import BreakEvenScheduler
from .measure import interleave, tokens_per_s_total

HF_GREEDY, HF_LOOKUP, TARGET_ONLY = "hf-greedy", "hf-prompt-lookup", "target-only"
PROMPT_LOOKUP_TOKENS = 10


@dataclass
class PeerRun:
    output_ids: list[int]
    wall_s: float
    cycles: int = 0  # project modes: verification cycles
    committed: int = 0  # tokens committed by the cycles (the first token comes from the prefill)
    draft_s: float = 0.0  # summed over cycles
    verify_s: float = 0.0
    block_usage: dict = field(default_factory=dict)


def until_stop(ids: list[int], stop_ids) -> list[int]:
    """New tokens up to and including the first stop token (transformers pads finished rows after it)."""
    stop = set(stop_ids)
    return next((list(ids[:i + 1]) for i, t in enumerate(ids) if t in stop), list(ids))


@torch.inference_mode()
def run_transformers(target, prompt: list[int], max_new_tokens: int, stop_ids, *, prompt_lookup: int | None = None
                     ) -> PeerRun:
    ids = torch.tensor([prompt], device=target.device)
    extra = {"prompt_lookup_num_tokens": prompt_lookup} if prompt_lookup else {}
    begin = time.perf_counter()
    out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids) or None,
                          pad_token_id=(list(stop_ids) or [0])[0], **extra)
    wall = time.perf_counter() - begin
    return PeerRun(until_stop(out[0, len(prompt):].tolist(), stop_ids), wall)


def run_project(target, draft, prompt: list[int], max_new_tokens: int, stop_ids, block_size) -> PeerRun:
    result = generate(target, draft, prompt, max_new_tokens=max_new_tokens, block_size=block_size,
                      stop_token_ids=list(stop_ids))
    usage: dict[str, int] = {}
    for record in result.trace:
        usage[str(record.block_size)] = usage.get(str(record.block_size), 0) + 1
    return PeerRun(until_stop(result.output_ids, stop_ids), result.wall_s, result.num_cycles,
                   sum(result.acceptance_lengths), sum(r.draft_s for r in result.trace),
                   sum(r.verify_s for r in result.trace), usage)


def in_dtype(target, draft, dtype: str):
    """The pair a peer row runs: the target in `dtype` (a converted copy when it is in another), and the draft in
    its own dtype unless that is wider than `dtype` (a bf16 row drafts in bf16 too). Every mode of a row shares
    the target, so transformers greedy and DFlash verify with the same weights."""
    wanted = getattr(torch, dtype)
    if target.dtype != wanted:
        target = copy.deepcopy(target).to(wanted)
    if draft is not None and next(draft.parameters()).dtype.itemsize > wanted.itemsize:
        draft = copy.deepcopy(draft).to(wanted)
    return target, draft


def peer_modes(target, draft, block_sizes=(4, 8, 16), scheduler_candidates=(2, 4, 8, 16)) -> dict:
    """name -> run(prompt, max_new_tokens, stop_ids); block sizes above the draft's are left out."""
    sizes = [b for b in block_sizes if b <= draft.block_size]
    candidates = tuple(b for b in scheduler_candidates if b <= draft.block_size)
    modes = {
        HF_GREEDY: lambda p, n, s: run_transformers(target, p, n, s),
        HF_LOOKUP: lambda p, n, s: run_transformers(target, p, n, s, prompt_lookup=PROMPT_LOOKUP_TOKENS),
        TARGET_ONLY: lambda p, n, s: run_project(target, None, p, n, s, 1),
    }
    for b in sizes:
        modes[f"dflash bs={b}"] = lambda p, n, s, b=b: run_project(target, draft, p, n, s, b)
    modes["dflash scheduler"] = lambda p, n, s: run_project(target, draft, p, n, s,
                                                            BreakEvenScheduler(candidates=candidates))
    return modes


def run_peers(modes: dict, prompts: list[list[int]], *, max_new_tokens: int, stop_ids, progress=None
              ) -> dict[str, list[PeerRun]]:
    """Every mode on each prompt before the next prompt, rotating the order per prompt, after a warm-up."""
    for run in modes.values():
        run(prompts[0], 8, stop_ids)
    names = list(modes)
    results = interleave(progress(prompts) if progress else prompts,
                         [lambda prompt, _, run=modes[name]: run(prompt, max_new_tokens, stop_ids) for name in names])
    return dict(zip(names, results))


def peer_metrics(runs: dict[str, list[PeerRun]], prompts: list[list[int]], target=None) -> dict:
    """The peer table (one row per mode) and the per-prompt vectors the harness gates need."""
    from .evaluation import float_ties
    reference = runs[HF_GREEDY]
    hf_rate = tokens_per_s_total(reference)
    own = runs[TARGET_ONLY]
    t1 = sum(r.verify_s for r in own) / max(1, sum(r.cycles for r in own))  # one-token target forward
    own_rate = tokens_per_s_total(own)
    rows = {}
    for name, mode_runs in runs.items():
        identical = [r.output_ids == ref.output_ids for r, ref in zip(mode_runs, reference)]
        ties = {} if target is None else float_ties(target, prompts, [ref.output_ids for ref in reference],
                                                    [r.output_ids for r in mode_runs], block_size=16)
        rate = tokens_per_s_total(mode_runs)
        row = {"tokens_per_s": rate, "ratio_to_hf_greedy": rate / hf_rate if hf_rate else 0.0,
               "identical_to_hf_greedy": sum(identical), "n": len(mode_runs), "float_ties": ties,
               "mismatched_prompts": [i for i, ok in enumerate(identical) if not ok]}
        cycles = sum(r.cycles for r in mode_runs)
        if cycles and name != TARGET_ONLY and name.startswith("dflash"):
            tau = sum(r.committed for r in mode_runs) / cycles  # micro average, as GenerationResult.tau
            verify, draft = (sum(r.verify_s for r in mode_runs) / cycles, sum(r.draft_s for r in mode_runs) / cycles)
            ceiling = tau * t1 / (verify + draft)
            usage: dict[str, int] = {}
            for r in mode_runs:
                for k, v in r.block_usage.items():
                    usage[k] = usage.get(k, 0) + v
            row.update(tau=tau, per_prompt_tau=[r.committed / r.cycles if r.cycles else 1.0 for r in mode_runs],
                       t1_s=t1, t_verify_s=verify, t_draft_s=draft, ceiling=ceiling,
                       efficiency=row["ratio_to_hf_greedy"] / ceiling if ceiling else 0.0,
                       ratio_to_target_only=rate / own_rate if own_rate else 0.0,
                       efficiency_vs_target_only=(rate / own_rate) / ceiling if ceiling and own_rate else 0.0,
                       block_usage=usage)
        elif name == TARGET_ONLY:
            row.update(tau=1.0, t1_s=t1)
        rows[name] = row
    dflash_rows = {k: v for k, v in rows.items() if k.startswith("dflash")}
    best = max(dflash_rows, key=lambda k: dflash_rows[k]["tokens_per_s"]) if dflash_rows else None
    return {"modes": rows, "best_dflash": best,
            "best_ratio_to_hf_greedy": rows[best]["ratio_to_hf_greedy"] if best else None,
            "best_efficiency": rows[best].get("efficiency") if best else None,
            "hf_greedy_tokens_per_s": hf_rate}
