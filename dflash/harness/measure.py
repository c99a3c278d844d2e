"""Fair measurement of one ablation case: baseline and variant in the same process, interleaved per prompt,
after a warm-up, token-normalized, with the per-prompt vectors the statistical gates need."""
from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..engine import GenerationResult, generate


@dataclass(frozen=True)
class Variant:
    """How a case decodes. `policy` builds a fresh BlockSizePolicy per prompt (schedulers keep state)."""
    name: str
    block_size: int = 1
    use_draft: bool = True
    policy: Callable[[], object] | None = None
    temperature: float = 0.0
    acceptance: str = "speculative"
    method: str | None = None  # a registered research-backlog variant (dflash.variants); None: plain DFlash
    knobs: tuple = ()  # (name, value) pairs passed to the variant's decode
    tail_blocks: str = "cut"  # plain DFlash: "full" keeps full-size tail blocks (upstream's tau accounting)

    def run(self, models, prompt, max_new_tokens, stop_ids, seed) -> GenerationResult:
        draft = models.draft if (self.use_draft and (self.block_size > 1 or self.policy)) else None
        block = self.policy() if self.policy is not None else (self.block_size if draft is not None else 1)
        if self.method is not None:
            from ..variants import get_variant
            return get_variant(self.method).decode(
                models.target, models.draft, prompt, max_new_tokens=max_new_tokens, block_size=block,
                temperature=self.temperature, seed=seed, stop_token_ids=stop_ids, **dict(self.knobs))
        return generate(models.target, draft, prompt, max_new_tokens=max_new_tokens, block_size=block,
                        temperature=self.temperature, seed=seed, stop_token_ids=stop_ids,
                        acceptance=self.acceptance, tail_blocks=self.tail_blocks if draft is not None else "cut")


TARGET_ONLY = Variant("target-only", block_size=1, use_draft=False)


@dataclass
class Comparison:
    """Per-prompt results of the baseline, the variant and any other variants, in prompt order."""
    baseline: list[GenerationResult] = field(default_factory=list)
    variant: list[GenerationResult] = field(default_factory=list)
    others: dict[str, list[GenerationResult]] = field(default_factory=dict)


def compare(models, prompts, variant: Variant, *, max_new_tokens: int, stop_ids, baseline: Variant = TARGET_ONLY,
            others: tuple[Variant, ...] = (), repeats: int = 1, label: str | None = None,
            first_index: int = 0, clock: str = "wall") -> Comparison:
    """Run every mode on each prompt before the next prompt, rotating the order per prompt so slow drift of
    the machine spreads evenly over the modes. `first_index` numbers the prompts (seeds, rotation) when a case
    gathers more prompts after a first batch. With repeats, the fastest run on `clock` is kept."""
    def fastest(mode: Variant):
        def run(prompt, index):
            runs = [mode.run(models, prompt, max_new_tokens, stop_ids, seed=index) for _ in range(repeats)]
            return min(runs, key=lambda r: seconds(r, clock))  # noise on a shared machine only adds time
        return run
    modes = (baseline, variant, *others)
    base, new, *rest = interleave(_progress(prompts, label), [fastest(m) for m in modes], first_index=first_index)
    return Comparison(base, new, {o.name: results for o, results in zip(others, rest)})


def interleave(items, runs: Sequence[Callable], *, first_index: int = 0) -> list[list]:
    """Every one of `runs` on each item before the next item, the order rotating per item, so slow drift of the
    machine spreads evenly over them: per run, its results in item order. Each run is called as run(item, index),
    items numbered from `first_index` (a case that gathers more items after a first batch keeps the rotation)."""
    out: list[list] = [[] for _ in runs]
    order = list(range(len(runs)))
    for index, item in enumerate(items, start=first_index):
        shift = index % len(order)
        for k in order[shift:] + order[:shift]:
            out[k].append(runs[k](item, index))
    return out


def tokens_per_s_total(results, elapsed_s: float | None = None) -> float:
    """Aggregate throughput: all output tokens over all seconds (the runs' wall time summed, or `elapsed_s` when
    the runs were timed together, e.g. one batched decode); 0.0 when no time was spent."""
    elapsed = sum(r.wall_s for r in results) if elapsed_s is None else elapsed_s
    return sum(len(r.output_ids) for r in results) / elapsed if elapsed > 0 else 0.0


def _progress(prompts, label):
    """A progress bar on the real terminal (pytest captures sys.stderr); silent when not interactive."""
    if label is None or not sys.__stderr__.isatty():
        return prompts
    from tqdm.auto import tqdm
    return tqdm(prompts, desc=label, file=sys.__stderr__, leave=False)


def extend(into: Comparison, more: Comparison) -> Comparison:
    """Append the per-prompt results of `more` (later prompts) to `into`."""
    into.baseline += more.baseline
    into.variant += more.variant
    for name, results in more.others.items():
        into.others.setdefault(name, []).extend(results)
    return into


def cycle_trace(results: list[GenerationResult]) -> dict:
    """Every cycle of every prompt, in order, columnar (plots: tau vs cycle coloured by block size, rolling tau
    and cycle time). `prompt` says which prompt a cycle belongs to."""
    rows = [(i, r.block_size, r.acceptance_length, r.cycle_s, r.token_index)
            for i, g in enumerate(results) for r in g.trace]
    names = ("prompt", "block_size", "tau", "cycle_s", "token_index")
    return {name: [row[k] for row in rows] for k, name in enumerate(names)}


def warm_up(models, prompt, variants, stop_ids) -> None:
    """One short generation per variant: allocator growth, kernel selection and lazy imports happen here."""
    for variant in variants:
        variant.run(models, prompt, 16, stop_ids, seed=0)


CLOCKS = ("cpu", "wall")


def seconds(result: GenerationResult, clock: str = "wall") -> float:
    """A generation's duration on `clock`: "wall" (perf_counter, CUDA-synchronised) or "cpu" (process CPU time,
    the clock of the CPU profiles' speedup gates: with one torch thread it is the decode's compute, and other
    processes taking turns on the core do not add to it; measured on this 2-core machine with two busy
    processes beside the run, the paired A/A log-ratio noise was sd 0.2-0.4 on the wall clock and <= 0.035 on
    the CPU clock)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    return result.cpu_s if clock == "cpu" else result.wall_s


def rate(result: GenerationResult, clock: str = "wall") -> float:
    """Token-normalized throughput of one generation (tokens / seconds on `clock`, prefill included)."""
    elapsed = seconds(result, clock)
    return len(result.output_ids) / elapsed if elapsed > 0 else 0.0


def speedup_samples(variant: list[GenerationResult], baseline: list[GenerationResult], clock: str) -> list[float]:
    """Per prompt: variant throughput / baseline throughput, both on `clock`."""
    return [rate(v, clock) / rate(b, clock) for v, b in zip(variant, baseline)]


def per_prompt_tau(results: list[GenerationResult]) -> list[float]:
    return [r.tau if r.num_cycles else 1.0 for r in results]


def comparison_metrics(c: Comparison, max_new_tokens: int, clock: str = "wall") -> dict:
    """Everything the tables and gates need; lists are per prompt. `speedup_samples` (gated) are on `clock`;
    `wall_speedup_samples` and every tokens/s figure are wall-clock."""
    def decode_rate(r):
        return (len(r.output_ids) - 1) / r.decode_s if r.decode_s > 0 and len(r.output_ids) > 1 else 0.0
    variant, baseline = c.variant, c.baseline
    return {
        "per_prompt_tau": per_prompt_tau(variant),
        "speedup_samples": speedup_samples(variant, baseline, clock), "speedup_clock": clock,
        "wall_speedup_samples": speedup_samples(variant, baseline, "wall"),
        "decode_speedup_samples": [decode_rate(v) / decode_rate(b) if decode_rate(b) else 0.0
                                   for v, b in zip(variant, baseline)],
        "tpot_s": [r.tpot_s for r in variant], "ttft_s": [r.ttft_s for r in variant],
        "tokens_per_s": [rate(r) for r in variant], "output_tokens": [len(r.output_ids) for r in variant],
        "baseline_tpot_s": [r.tpot_s for r in baseline], "baseline_ttft_s": [r.ttft_s for r in baseline],
        "baseline_tokens_per_s": [rate(r) for r in baseline],
        "baseline_output_tokens": [len(r.output_ids) for r in baseline],
        "hit_cap": sum(len(r.output_ids) >= max_new_tokens for r in variant),
        "exact_match": [v.output_ids == b.output_ids for v, b in zip(variant, baseline)],
        "committed_tokens": sum(sum(r.acceptance_lengths) for r in variant),
        "cycles": sum(r.num_cycles for r in variant),
        "tokens_per_s_total": tokens_per_s_total(variant),
        "baseline_tokens_per_s_total": tokens_per_s_total(baseline),
    }


def block_usage_metrics(results: list[GenerationResult]) -> dict:
    """Dynamic scheduling: block usage, switch rate, realized tokens/s per block size (sum tau / sum cycle s)."""
    usage, committed, seconds, switches, pairs = {}, {}, {}, 0, 0
    for result in results:
        sizes = [r.block_size for r in result.trace]
        switches += sum(a != b for a, b in zip(sizes, sizes[1:]))
        pairs += max(0, len(sizes) - 1)
        for record in result.trace:
            key = str(record.block_size)
            usage[key] = usage.get(key, 0) + 1
            committed[key] = committed.get(key, 0) + record.acceptance_length
            seconds[key] = seconds.get(key, 0.0) + record.cycle_s
    return {"block_usage": usage, "switches": switches, "transitions": pairs,
            "switch_rate": switches / pairs if pairs else 0.0,
            "realized_tokens_per_s": {k: committed[k] / seconds[k] for k in usage if seconds[k] > 0}}


def profiling_metrics(results: list[GenerationResult], bucket: int = 32) -> dict:
    """Per-cycle profiling: draft / verify / other time shares and tau by token-index bucket."""
    draft = sum(r.draft_s for g in results for r in g.trace)
    verify = sum(r.verify_s for g in results for r in g.trace)
    total = sum(r.cycle_s for g in results for r in g.trace)
    by_bucket: dict[str, list[int]] = {}
    for g in results:
        for r in g.trace:
            low = r.token_index // bucket * bucket
            by_bucket.setdefault(f"{low}-{low + bucket - 1}", []).append(r.acceptance_length)
    return {"time_s": {"draft": draft, "verify": verify, "other": max(0.0, total - draft - verify)},
            "cycles": sum(g.num_cycles for g in results), "tau_by_bucket": by_bucket,
            "median_cycle_s": statistics.median([r.cycle_s for g in results for r in g.trace] or [0.0])}
