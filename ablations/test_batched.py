"""Batched prompts (backlog variant 8): B prompts decoded together, one draft and one target forward per cycle.

The research repo's "batched" benchmark decoded prompts one at a time (spec 5.3); this measures real batching.
The harness's `case.measure` times one prompt at a time, so this case times groups of `batch_size` prompts
itself, the same way: warm-up first, then per group every mode in turn with the order rotating per group, token
normalized. Modes: target-only one prompt at a time (the baseline of every ratio), batched DFlash (the variant),
and two references: unbatched DFlash (same block size) and batched target-only, so the table separates what
speculation buys from what batching buys. One throughput sample per group (aggregate tokens / seconds on the profile's clock),
so a batch of 4 prompts gives one sample, not four copies of one.
"""
from dataclasses import dataclass

import pytest

from dflash import generate
from dflash.harness.ablation_cases import KnobCase, as_params
from dflash.harness.evaluation import float_ties
from dflash.harness.measure import interleave, per_prompt_tau, seconds, tokens_per_s_total
from dflash.backends.batched import decode_batch

BLOCK_SIZE = 8


@dataclass(frozen=True)
class Batch(KnobCase):
    batch_size: int
    compact: bool = True  # False: rejected cache slots stay, masked, instead of being compacted ("mask-only")


CASES = [Batch("batch1", 1), Batch("batch2", 2), Batch("batch4", 4), Batch("batch4-mask-only", 4, compact=False)]
MIN_GROUPS = 6  # one-sided Mann-Whitney needs >= 6 samples a side to reach p ~ 1e-3


def _timed_batch(models, group, max_new_tokens, block_size, compact, repeats, clock, use_draft=True):
    """(results, stats, seconds on `clock`) of the fastest of `repeats` batched decodes of one group."""
    runs = [decode_batch(models.target, models.draft if use_draft else None, group, max_new_tokens=max_new_tokens,
                         block_size=block_size if use_draft else 1, stop_token_ids=models.stop_ids, compact=compact)
            for _ in range(repeats)]
    best = min(runs, key=lambda run: run.stats.cpu_s if clock == "cpu" else run.stats.wall_s)
    return best.results, best.stats, best.stats.cpu_s if clock == "cpu" else best.stats.wall_s


def _timed_alone(models, group, max_new_tokens, block_size, repeats, clock):
    """(results, None, total seconds on `clock`) of the group's prompts decoded one at a time (fastest of
    `repeats` each)."""
    draft = models.draft if block_size > 1 else None
    results = [min((generate(models.target, draft, prompt, max_new_tokens=max_new_tokens, block_size=block_size,
                             stop_token_ids=models.stop_ids) for _ in range(repeats)),
                   key=lambda r: seconds(r, clock)) for prompt in group]
    return results, None, sum(seconds(r, clock) for r in results)


@pytest.mark.ablation("batched", ci_datasets=("math",))
@pytest.mark.parametrize("knobs", as_params(CASES))
def test_batched(case, knobs):
    models, profile, clock = case.models, case.profile, case.clock
    max_new = profile.max_new_tokens
    prompts = case.prompts(max(profile.prompts, MIN_GROUPS * knobs.batch_size))
    groups = [prompts[i:i + knobs.batch_size] for i in range(0, len(prompts), knobs.batch_size)]
    repeats = profile.timing_repeats
    modes = {
        "target-only": lambda g: _timed_alone(models, g, max_new, 1, repeats, clock),
        "batched": lambda g: _timed_batch(models, g, max_new, BLOCK_SIZE, knobs.compact, repeats, clock),
        "dflash-unbatched": lambda g: _timed_alone(models, g, max_new, BLOCK_SIZE, repeats, clock),
        "target-only-batched": lambda g: _timed_batch(models, g, max_new, 1, knobs.compact, repeats, clock,
                                                      use_draft=False),
    }
    for run in modes.values():  # warm-up: allocator growth, kernel selection, lazy imports
        run([p[:8] for p in groups[0]])

    def interleaved(names):
        """Per mode, per group: (results, stats or None, seconds); every mode on a group before the next group,
        the order rotating per group."""
        return dict(zip(names, interleave(groups, [lambda group, _, run=modes[name]: run(group) for name in names])))

    def rates(runs):
        return [tokens_per_s_total(results, elapsed) for results, _, elapsed in runs]

    out = interleaved(list(modes))

    def group_rates(name):
        return rates(out[name])

    def flat(name):
        return [r for results, _, _ in out[name] for r in results]

    baseline, batched, unbatched = flat("target-only"), flat("batched"), flat("dflash-unbatched")
    stats = [s for _, s, _ in out["batched"]]
    cycles = sum(s.cycles for s in stats)
    base_rates = group_rates("target-only")
    exact = [b.output_ids == t.output_ids for b, t in zip(batched, baseline)]
    ties = float_ties(models.target, prompts, [t.output_ids for t in baseline], [b.output_ids for b in batched],
                      BLOCK_SIZE)
    metrics = {
        "per_prompt_tau": per_prompt_tau(batched),
        "speedup_samples": [v / b for v, b in zip(group_rates("batched"), base_rates)],
        "speedup_vs_unbatched_samples": [v / b for v, b in zip(group_rates("batched"),
                                                               group_rates("dflash-unbatched"))],
        "target_batched_speedup_samples": [v / b for v, b in zip(group_rates("target-only-batched"), base_rates)],
        "tokens_per_s_total": tokens_per_s_total(batched, sum(s.wall_s for s in stats)),
        "baseline_tokens_per_s_total": tokens_per_s_total(baseline),
        "unbatched_tokens_per_s_total": tokens_per_s_total(unbatched),
        "same_acceptance_as_unbatched": sum(b.acceptance_lengths == u.acceptance_lengths
                                            for b, u in zip(batched, unbatched)),
        # cost of batching, per batch cycle: rows verified, target/draft seconds, masked (wasted) cache share
        "batch_cycles": cycles,
        "rows_per_cycle": sum(sum(s.live) for s in stats) / cycles,
        "verify_s_per_cycle": sum(sum(s.verify_s) for s in stats) / cycles,
        "draft_s_per_cycle": sum(sum(s.draft_s) for s in stats) / cycles,
        "padding_fraction": sum(s.padding_fraction for s in stats) / len(stats),
        "latency_s": [r.wall_s for r in batched],
        "exact_match": exact, "float_ties": ties,
        "committed_tokens": sum(sum(r.acceptance_lengths) for r in batched),
        "cycles": sum(r.num_cycles for r in batched),
        "hit_cap": sum(len(r.output_ids) >= max_new for r in batched),
    }

    def remeasure():
        fresh = interleaved(["target-only", "batched"])
        return [v / b for v, b in zip(rates(fresh["batched"]), rates(fresh["target-only"]))]

    gates = case.gate(metrics, remeasure)
    case.finish(knobs.params(block_size=BLOCK_SIZE, groups=len(groups)), metrics, gates,
                max_new_tokens=max_new)
