"""Statistical gates for ablation cases (model-free; all tests come from scipy.stats).

Two gates, both "significant AND beyond a practical threshold" (asv, Perfherder), never one alone, and both
paired: element i of the baseline and of the new vector is the same prompt (or prompt group).

* `tau_gate`: per-prompt acceptance length, one-sided Wilcoxon signed-rank; a regression needs p < alpha
  after the run's correction AND a relative drop of the mean > margin. A case that gathers more prompts looks
  at the data several times (12, 24, 48 prompts); look k may spend the share w_k of alpha (sum of shares <= 1,
  Bonferroni over looks), so the sequential procedure keeps its false-alarm rate <= alpha whatever rule
  decides to look again. The default spends all of it at the last look: earlier looks can only stop a case
  that is clearly passing (a futility stop), which is where the power is (the Wilcoxon floor at 12 prompts,
  2.4e-4, cannot clear alpha / family for a family of more than ~200 gates anyway).
* `throughput_gate`: per-prompt speedup ratios measured in-run (variant / target-only), compared on the same
  prompt indices as log(new / baseline); one-sided paired t-test on the log ratios (the mean log ratio is the
  log of the geometric-mean slowdown, so the test and the effect size measure the same thing). A regression
  needs p < alpha AND geometric-mean slowdown > factor. `confirm` combines a re-measurement: the gate fails
  only when both measurements are regressions (intersection-union test, p = max of the two). The reference
  samples are the baseline's for this testbed or an A/B reference measured in the same run (`source` says
  which); without either, the result is "not gated" with the reason (`not_gated`), reported, never silent.

Verdicts: "regression" (the only failing one), "inconclusive" (beyond the threshold but not significant),
"improvement" (reported, never failed), "pass", and "not gated". Verdicts are computed from
the stored numbers, so `apply_holm` only has to fill in the adjusted p-values and every verdict follows.
The family of a run is fixed before any case runs (`apply_holm(..., family=m)`): per-case Bonferroni and the
session-end Holm use the same m.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Callable, NamedTuple, Sequence

import numpy as np
from scipy import stats as sps

from ..errors import DFlashError

REGRESSION = "regression"
INCONCLUSIVE = "inconclusive"
IMPROVEMENT = "improvement"
PASS = "pass"
NOT_GATED = "not gated"
# Most severe first; `worst_verdict` uses this order to summarise several gates of one case.
SEVERITY = (REGRESSION, INCONCLUSIVE, NOT_GATED, IMPROVEMENT, PASS)


def _as_1d(values, what: str, *, allow_empty: bool = False) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise DFlashError(f"{what} must be numbers, got {values!r:.80}.") from None
    if array.ndim != 1:
        raise DFlashError(f"{what} must be a flat sequence of numbers, got shape {array.shape}.")
    if not allow_empty and array.size == 0:
        raise DFlashError(f"{what} is empty; at least one sample is needed.")
    if not np.all(np.isfinite(array)):
        raise DFlashError(f"{what} contains NaN or infinite values.")
    return array


# --------------------------------------------------------------------------------------------------
# Means with confidence intervals


class MeanCI(NamedTuple):
    """Mean and a two-sided t confidence interval. low/high are NaN when n == 1 (no spread to estimate)."""
    mean: float
    low: float
    high: float


def mean_ci(samples: Sequence[float], confidence: float = 0.95) -> MeanCI:
    """Student-t interval for the mean. n == 1 gives (x, nan, nan); constant samples give (c, c, c): both
    are special-cased because scipy would otherwise compute 0 * inf and warn."""
    x = _as_1d(samples, "samples")
    mean = float(x.mean())
    if x.size == 1:
        return MeanCI(mean, math.nan, math.nan)
    if np.ptp(x) == 0:
        return MeanCI(mean, mean, mean)
    low, high = sps.t.interval(confidence, df=x.size - 1, loc=mean, scale=sps.sem(x))
    return MeanCI(mean, float(low), float(high))


# --------------------------------------------------------------------------------------------------
# Holm's step-down correction


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order.

    Sort ascending; the i-th smallest (0-based) is multiplied by (m - i); a running maximum keeps the
    adjusted values monotone in the raw order; cap at 1. Rejecting where adjusted p < alpha controls the
    family-wise error rate at alpha. scipy has no Holm (false_discovery_control is BH/BY only)."""
    p = _as_1d(p_values, "p_values", allow_empty=True)
    if np.any((p < 0) | (p > 1)):
        raise DFlashError(f"p-values must lie in [0, 1], got {p.tolist()}.")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]
    adjusted_sorted = np.minimum(1.0, np.maximum.accumulate(scaled))
    adjusted = np.empty(m)
    adjusted[order] = adjusted_sorted
    return adjusted.tolist()


# --------------------------------------------------------------------------------------------------
# Gate results


@dataclass(frozen=True)
class GateResult:
    """Common fields of a gate. `baseline`/`new` are the compared centres (mean tau, geometric-mean speedup);
    rel_change = (new - baseline) / |baseline| (negative = worse: higher is better for tau and speedup).
    p_value tests "new worse than baseline", p_improvement "new better"; both one-sided and valid for the
    gate's own design (looks, confirmation), before the run's multiplicity correction.
    The *_adjusted fields are set by `apply_holm`; until then the unadjusted p-values decide."""
    case_id: str
    baseline: float
    new: float
    rel_change: float
    p_value: float
    p_improvement: float
    alpha: float
    n_baseline: int
    n_new: int
    p_adjusted: float | None = None
    p_improvement_adjusted: float | None = None

    kind = "gate"

    @property
    def gated(self) -> bool:
        return True

    def _worse_beyond_threshold(self) -> bool:
        raise NotImplementedError

    def _better_beyond_threshold(self) -> bool:
        raise NotImplementedError

    @property
    def verdict(self) -> str:
        if not self.gated:
            return NOT_GATED
        p_worse = self.p_value if self.p_adjusted is None else self.p_adjusted
        p_better = self.p_improvement if self.p_improvement_adjusted is None else self.p_improvement_adjusted
        if self._worse_beyond_threshold():
            return REGRESSION if p_worse < self.alpha else INCONCLUSIVE
        if self._better_beyond_threshold() and p_better < self.alpha:
            return IMPROVEMENT
        return PASS

    @property
    def failed(self) -> bool:
        """Only a regression fails a test; improvements and inconclusive results are reported."""
        return self.verdict == REGRESSION

    def to_dict(self) -> dict:
        """Plain JSON-ready dict for case records (render.py reads kind, verdict, rel_change, p_adjusted)."""
        return {"kind": self.kind, **asdict(self), "verdict": self.verdict, "failed": self.failed}


@dataclass(frozen=True)
class TauGateResult(GateResult):
    margin: float = 0.03
    alpha_share: float = 1.0  # share of alpha this look may spend; p_value = min(1, p_raw / share), 1 at share 0
    p_raw: float | None = None  # the Wilcoxon p-value of this look alone

    kind = "tau"

    def _worse_beyond_threshold(self) -> bool:
        return -self.rel_change > self.margin

    def _better_beyond_threshold(self) -> bool:
        return self.rel_change > self.margin


@dataclass(frozen=True)
class ThroughputGateResult(GateResult):
    factor: float = 1.10
    source: str = ""  # what the samples were compared with: "stored baseline, testbed K" / "A/B against REF ..."
    not_gated: str | None = None  # why there was nothing to compare with (the verdict is then "not gated")
    measurements: tuple = ()  # with `confirm`: each measurement's {"new", "rel_change", "p_value", "n"}

    kind = "throughput"

    @property
    def gated(self) -> bool:
        return self.not_gated is None

    def _worse_beyond_threshold(self) -> bool:
        return self.new <= 0 or self.baseline / self.new > self.factor

    def _better_beyond_threshold(self) -> bool:
        return self.baseline <= 0 or self.new / self.baseline > self.factor


@dataclass(frozen=True)
class AccuracyGateResult(GateResult):
    """Paired per-query correctness (a method that is not lossless). `baseline`/`new` are accuracies;
    `lost`/`gained`: queries right in the baseline and wrong now, and the reverse."""
    margin: float = 0.01  # accuracy points a change must exceed to count
    lost: int = 0
    gained: int = 0

    kind = "accuracy"

    def _worse_beyond_threshold(self) -> bool:
        return self.baseline - self.new > self.margin

    def _better_beyond_threshold(self) -> bool:
        return self.new - self.baseline > self.margin


def mcnemar_exact(baseline_correct: Sequence[bool], new_correct: Sequence[bool]) -> tuple[int, int, float]:
    """(lost, gained, two-sided exact McNemar p) of two correctness lists paired by position: the binomial test
    on the discordant pairs (p = 1 without any)."""
    base = _as_1d(baseline_correct, "baseline_correct").astype(bool)
    new = _as_1d(new_correct, "new_correct").astype(bool)
    lost, gained = int((base & ~new).sum()), int((~base & new).sum())
    return lost, gained, float(sps.binomtest(lost, lost + gained, 0.5).pvalue) if lost + gained else 1.0


def accuracy_gate(baseline_correct: Sequence[bool], new_correct: Sequence[bool], *, margin: float = 0.01,
                  alpha: float = 0.05, case_id: str = "") -> AccuracyGateResult:
    """Exact McNemar test on queries paired by position: under "no change" a discordant query is as likely lost
    as gained, so p (worse) is the one-sided binomial tail of `lost` out of the discordant ones. Regression iff p
    < alpha AND the accuracy fell by more than `margin` (absolute)."""
    base = _as_1d(baseline_correct, "baseline_correct").astype(bool)
    new = _as_1d(new_correct, "new_correct").astype(bool)
    if base.size != new.size:
        raise DFlashError(f"accuracy_gate{f' ({case_id})' if case_id else ''} pairs queries: the baseline has "
                          f"{base.size}, the run {new.size}. Re-record the baseline with --update-baselines.")
    lost, gained, _ = mcnemar_exact(base, new)
    discordant = lost + gained
    p_worse = float(sps.binomtest(lost, discordant, 0.5, alternative="greater").pvalue) if discordant else 1.0
    p_better = float(sps.binomtest(gained, discordant, 0.5, alternative="greater").pvalue) if discordant else 1.0
    old, now = float(base.mean()), float(new.mean())
    return AccuracyGateResult(case_id=case_id, baseline=old, new=now, rel_change=_relative_change(old, now),
                              p_value=p_worse, p_improvement=p_better, alpha=alpha, n_baseline=base.size,
                              n_new=new.size, margin=margin, lost=lost, gained=gained)


def worst_verdict(verdicts: Sequence[str]) -> str:
    """The most severe of several verdicts (e.g. a case's tau and throughput gates); unknown ones rank last."""
    rank = {v: i for i, v in enumerate(SEVERITY)}
    return min(verdicts, key=lambda v: rank.get(v, len(SEVERITY)), default=PASS)


def _relative_change(baseline: float, new: float) -> float:
    if baseline == 0:
        return 0.0 if new == 0 else math.copysign(math.inf, new)
    return (new - baseline) / abs(baseline)


# --------------------------------------------------------------------------------------------------
# tau gate (paired)


def tau_gate(baseline_taus: Sequence[float], new_taus: Sequence[float], *, margin: float = 0.03,
             alpha: float = 0.05, zero_method: str = "pratt", case_id: str = "",
             alpha_share: float = 1.0) -> TauGateResult:
    """Paired per-prompt tau comparison: element i of both vectors must be the same prompt. `alpha_share`: the
    share of alpha the sequential design lets this look spend (`alpha_shares`); p_value = p_raw / share.

    One-sided Wilcoxon signed-rank on d = new - baseline (alternative "less" for the regression p, "greater"
    for the improvement p). zero_method "pratt" ranks the zero differences (common under greedy decoding,
    where most prompts are unchanged) and then drops them, which keeps the ranks of the prompts that did
    change comparable to the full set; ties use scipy's normal approximation with tie correction. When
    every difference is zero both p-values are 1 (scipy would return NaN)."""
    base = _as_1d(baseline_taus, "baseline_taus")
    new = _as_1d(new_taus, "new_taus")
    if base.size != new.size:
        raise DFlashError(
            f"tau_gate{f' ({case_id})' if case_id else ''} compares per-prompt taus pairwise, so both vectors "
            f"must cover the same prompts in the same order: baseline has {base.size} prompts, new has "
            f"{new.size}. Re-record the baseline for the current prompt set.")
    diff = new - base
    if np.all(diff == 0):
        p_less = p_greater = 1.0
    else:
        # The method is pinned (scipy's "auto" changed across versions; 1.17 runs a 4096-sign permutation test
        # for 12 prompts with ties, ~1.5 s a call): exact without ties or zeros up to 50 prompts, else the normal
        # approximation with tie correction.
        exact = diff.size <= 50 and np.all(diff != 0) and np.unique(np.abs(diff)).size == diff.size
        method = "exact" if exact else "approx"
        p_less = float(sps.wilcoxon(diff, alternative="less", zero_method=zero_method, method=method).pvalue)
        p_greater = float(sps.wilcoxon(diff, alternative="greater", zero_method=zero_method, method=method).pvalue)
    if not 0 <= alpha_share <= 1:
        raise DFlashError(f"alpha_share must lie in [0, 1], got {alpha_share}.")

    def spend(p: float) -> float:
        return min(1.0, p / alpha_share) if alpha_share > 0 else 1.0
    base_mean, new_mean = float(base.mean()), float(new.mean())
    return TauGateResult(case_id=case_id, baseline=base_mean, new=new_mean,
                         rel_change=_relative_change(base_mean, new_mean), p_value=spend(p_less),
                         p_improvement=spend(p_greater), alpha=alpha, n_baseline=base.size, n_new=new.size,
                         margin=margin, alpha_share=alpha_share, p_raw=p_less)


# --------------------------------------------------------------------------------------------------
# throughput gate (paired)


def _geomean(x: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(x))))


def throughput_gate(baseline_ratio_samples: Sequence[float], new_ratio_samples: Sequence[float], *,
                    factor: float = 1.10, alpha: float = 0.05, case_id: str = "",
                    source: str = "") -> ThroughputGateResult:
    """Speedup-ratio samples (variant / target-only, both measured in the same run, so machine drift
    cancels), paired by index: the run's n samples are compared with the reference's first n. The reference
    must come from the same testbed (`source` says which: a stored baseline of this testbed, or an A/B
    reference measured in this run). Regression iff the one-sided paired t-test on log(new_i / baseline_i) has
    p < alpha AND the geometric-mean slowdown geomean(baseline) / geomean(new) > factor; beyond the factor but
    not significant is "inconclusive"."""
    base = _as_1d(baseline_ratio_samples, "baseline_ratio_samples")
    new = _as_1d(new_ratio_samples, "new_ratio_samples")
    if base.size < new.size:
        raise DFlashError(f"throughput_gate{f' ({case_id})' if case_id else ''} pairs samples by prompt: the "
                          f"baseline has {base.size}, the run {new.size}. Re-record the baseline with "
                          "--update-baselines.")
    base = base[: new.size]
    if np.any(base <= 0) or np.any(new <= 0):
        raise DFlashError(f"speedup samples must be positive (a ratio of two rates), got baseline {base.tolist()} "
                          f"and new {new.tolist()}.")
    log_ratio = np.log(new) - np.log(base)
    if new.size < 2 or np.ptp(log_ratio) == 0:
        p_less = p_greater = 1.0  # no spread to estimate: no evidence either way (t would divide by zero)
    else:
        with warnings.catch_warnings():  # near-identical ratios (a constant factor): t is huge, p ~ 0, correctly
            warnings.simplefilter("ignore", RuntimeWarning)
            p_less = float(sps.ttest_1samp(log_ratio, 0.0, alternative="less").pvalue)
            p_greater = float(sps.ttest_1samp(log_ratio, 0.0, alternative="greater").pvalue)
    base_centre, new_centre = _geomean(base), _geomean(new)
    return ThroughputGateResult(case_id=case_id, baseline=base_centre, new=new_centre,
                                rel_change=_relative_change(base_centre, new_centre), p_value=p_less,
                                p_improvement=p_greater, alpha=alpha, n_baseline=base.size, n_new=new.size,
                                factor=factor, source=source)


def not_gated_throughput(new_ratio_samples: Sequence[float], reason: str, *, factor: float = 1.10,
                         alpha: float = 0.05, case_id: str = "") -> ThroughputGateResult:
    """The throughput result of a case with nothing to compare with on this testbed: the measured centre is
    reported, the verdict is "not gated" and `reason` says why and how to gate it."""
    new = _as_1d(new_ratio_samples, "new_ratio_samples")
    centre = _geomean(new) if np.all(new > 0) else 0.0
    return ThroughputGateResult(case_id=case_id, baseline=centre, new=centre, rel_change=0.0, p_value=1.0,
                                p_improvement=1.0, alpha=alpha, n_baseline=0, n_new=new.size, factor=factor,
                                not_gated=reason)


def confirm(first: ThroughputGateResult, second: ThroughputGateResult) -> ThroughputGateResult:
    """One gate from a measurement and its re-measurement on the same prompts: it says "regression" only when
    both do. Intersection-union test: p = max of the two p-values (valid at alpha, no correction needed), and
    the centre and change of the milder measurement, so the threshold must be crossed twice as well."""
    milder = max((first, second), key=lambda g: g.rel_change)
    measurements = tuple({"new": g.new, "rel_change": g.rel_change, "p_value": g.p_value, "n": g.n_new}
                         for g in (first, second))
    return replace(second, new=milder.new, rel_change=milder.rel_change,
                   p_value=max(first.p_value, second.p_value),
                   p_improvement=max(first.p_improvement, second.p_improvement), measurements=measurements)


# --------------------------------------------------------------------------------------------------
# Multiple comparisons over one run


GATE_KINDS = {"tau": TauGateResult, "throughput": ThroughputGateResult, "accuracy": AccuracyGateResult}


def apply_holm(results: Sequence[GateResult], family: int | None = None) -> list[GateResult]:
    """Holm across all gated results of one run. `family` is the run's number of gates fixed in advance (gates
    that did not run count with p = 1); None: exactly the gated results passed in. Results that are not gated
    take no part. Regression and improvement p-values are adjusted as two separate families. Returns new
    result objects in the same order; verdicts follow from the adjusted p-values."""
    gated = [i for i, r in enumerate(results) if r.gated]
    padding = [1.0] * max(0, (family or 0) - len(gated))
    worse = holm([results[i].p_value for i in gated] + padding)
    better = holm([results[i].p_improvement for i in gated] + padding)
    adjusted = list(results)
    for i, p_w, p_b in zip(gated, worse, better):
        adjusted[i] = replace(results[i], p_adjusted=p_w, p_improvement_adjusted=p_b)
    return adjusted


def bonferroni(result: GateResult, family: int) -> GateResult:
    """The result with its p-value corrected over `family` gates (Bonferroni; it implies Holm): what a single
    case decides before the run-level Holm, and what the gate-quality checks count as a failure."""
    return replace(result, p_adjusted=min(1.0, result.p_value * family))


def binomial_rate(hits: int, trials: int) -> tuple[float, float, float]:
    """hits / trials with its 95% Clopper-Pearson interval (scipy's binomtest): (rate, low, high)."""
    ci = sps.binomtest(hits, trials).proportion_ci(confidence_level=0.95)
    return hits / trials, float(ci.low), float(ci.high)


# --------------------------------------------------------------------------------------------------
# Sequential sampling (Pinpoint-style "unknown -> more samples") with the looks planned in advance


def look_schedule(start: int, cap: int, growth: float = 2.0) -> list[int]:
    """Prompt counts at which a case may look at its tau evidence: `start`, then growing geometrically, up to
    `cap` (12, 24, 48). Fixed before the first look, like the alpha each look may spend (`alpha_shares`)."""
    if start < 1 or cap < 1:
        raise DFlashError(f"look_schedule needs start and cap >= 1, got {start} and {cap}.")
    schedule = [min(start, cap)]
    while schedule[-1] < cap:
        schedule.append(min(cap, max(schedule[-1] + 1, math.ceil(schedule[-1] * growth))))
    return schedule


SPENDING = ("final", "equal", "uncorrected")


def alpha_shares(looks: int, spending: str = "final") -> list[float]:
    """The share of alpha each look may spend. "final" (the default): all at the last look, earlier looks only
    stop clear passes; "equal": Bonferroni over looks, alpha / looks each; "uncorrected": alpha at every look
    (shares summing to more than 1: the error rate is not controlled; kept to show why in the simulation)."""
    if spending == "final":
        return [0.0] * (looks - 1) + [1.0]
    if spending == "equal":
        return [1.0 / looks] * looks
    if spending == "uncorrected":
        return [1.0] * looks
    raise DFlashError(f"spending must be one of {SPENDING}, got {spending!r}.")


@dataclass(frozen=True)
class AdaptiveDecision:
    gather_more: bool
    next_n: int
    reason: str


SUGGESTIVE_P = 0.10  # one look's own p below which a smaller-than-margin drop still asks for more prompts


def tau_needs_more_prompts(result: TauGateResult, *, family: int, schedule: Sequence[int]) -> AdaptiveDecision:
    """Whether a case looks again (at the next count of `schedule`): while the drop is beyond the margin but
    not significant after Bonferroni over the run's `family` of gates, or a drop within the margin is
    suggestive (this look's own p < SUGGESTIVE_P; a large drop often looks small on the first 12 prompts).
    Any such rule keeps the error rate, because the looks' shares of alpha sum to at most 1. Unchanged code gives
    identical greedy taus (p = 1), so it never pays for more prompts."""
    n = result.n_new
    later = [k for k in schedule if k > n]
    if not later:
        return AdaptiveDecision(False, n, f"{n} prompts is the last look; the verdict is final")
    adjusted = bonferroni(result, max(1, family))
    if adjusted.verdict == INCONCLUSIVE:
        return AdaptiveDecision(True, later[0], f"inconclusive with {n} prompts; look again at {later[0]}")
    p_look = result.p_raw if result.p_raw is not None else result.p_value
    if adjusted.verdict == PASS and result.rel_change < 0 and p_look < SUGGESTIVE_P:
        return AdaptiveDecision(True, later[0], f"drop within the margin but suggestive (p {p_look:.2g}) with "
                                                f"{n} prompts; look again at {later[0]}")
    return AdaptiveDecision(False, n, f"verdict is {adjusted.verdict!r} with {n} prompts")


def sequential_tau_gate(baseline_taus: Sequence[float], new_taus: Callable[[int], Sequence[float]], *,
                        start: int, family: int, margin: float = 0.03, alpha: float = 0.05,
                        spending: str = "final", case_id: str = "") -> TauGateResult:
    """The ablation cases' tau flow: look at `start` prompts, then at the next count of the schedule (up to
    every baseline prompt) while `tau_needs_more_prompts` says so. `new_taus(n)` returns the run's first n
    per-prompt taus (measuring only what it has not measured yet). Returns the last look's gate, p-values
    already divided by the look's share of alpha (`alpha_shares(looks, spending)`); the caller corrects for the
    family."""
    schedule = look_schedule(start, len(baseline_taus))
    shares = dict(zip(schedule, alpha_shares(len(schedule), spending)))
    n = schedule[0]
    while True:
        gate = tau_gate(list(baseline_taus)[:n], list(new_taus(n))[:n], margin=margin, alpha=alpha,
                        case_id=case_id, alpha_share=shares[n])
        decision = tau_needs_more_prompts(gate, family=family, schedule=schedule)
        if not decision.gather_more:
            return gate
        n = decision.next_n


# --------------------------------------------------------------------------------------------------
# Gate quality by simulation


@dataclass(frozen=True)
class GateQuality:
    """How often the simulated flow said "regression" (rate, with a 95% Clopper-Pearson interval from scipy's
    binomtest) and "inconclusive", over `trials` independent simulated runs; `simulation` says what."""
    rate: float
    low: float
    high: float
    hits: int
    inconclusive: int
    trials: int
    mean_prompts: float
    simulation: str


def simulate_tau_flow(baseline_taus: Sequence[float], *, drop: float = 0.0, noise_rel: float = 0.15,
                      trials: int = 1000, start: int = 12, family: int = 1, margin: float = 0.03,
                      alpha: float = 0.05, rng=0, spending: str = "final") -> GateQuality:
    """Type-I error (drop = 0) or power (drop > 0) of `sequential_tau_gate` with Bonferroni over `family`.
    Each trial is an independent run: new tau_i = baseline tau_i * (1 + N(0, noise_rel)) * (1 - drop), so
    under drop = 0 every per-prompt difference is symmetric about 0 (the Wilcoxon null holds exactly).
    Deterministic for a given `rng` (seed or numpy Generator)."""
    base = _as_1d(baseline_taus, "baseline_taus")
    if trials < 1:
        raise DFlashError("trials must be >= 1.")
    generator = np.random.default_rng(rng)
    hits = inconclusive = prompts = 0
    for _ in range(trials):
        new = base * (1.0 + generator.normal(0.0, noise_rel, base.size)) * (1.0 - drop)
        gate = sequential_tau_gate(base, lambda n, new=new: new[:n], start=start, family=family, margin=margin,
                                   alpha=alpha, spending=spending)
        verdict = bonferroni(gate, family).verdict
        hits += verdict == REGRESSION
        inconclusive += verdict == INCONCLUSIVE
        prompts += gate.n_new
    rate, low, high = binomial_rate(hits, trials)
    schedule = look_schedule(start, base.size)
    shares = ", ".join(f"{w:.2g}" for w in alpha_shares(len(schedule), spending))
    simulation = (f"{trials} independent runs over {base.size} baseline prompts, looks at {schedule} "
                  f"spending alpha shares ({shares}) ({spending}); "
                  f"new = baseline * (1 + N(0, {noise_rel:g}))" + (f" * {1 - drop:g}" if drop else "")
                  + f"; margin={margin:g}, alpha={alpha:g}, Bonferroni over {family} gate(s)")
    return GateQuality(rate, low, high, hits, inconclusive, trials,
                       prompts / trials, simulation)
