"""Statistical gates for ablation cases (model-free; all tests come from scipy.stats).

Two gates, both "significant AND beyond a practical threshold" (asv, Perfherder), never one alone:

* `tau_gate`: paired per-prompt acceptance length (same prompts, same order), one-sided Wilcoxon
  signed-rank; a regression needs the Holm-adjusted p < alpha AND a relative drop of the mean > margin.
* `throughput_gate`: asv-style on speedup-ratio samples measured in-run (variant / target-only), one-sided
  Mann-Whitney U; a regression needs p < alpha AND median(baseline) / median(new) > factor. Not gated
  when the hardware differs from the baseline's (it is still reported).

Verdicts: "regression" (the only failing one), "inconclusive" (beyond the threshold but not significant:
gather more samples, see `adaptive_decision`), "improvement" (reported, never failed), "pass", and
"not gated: hardware differs". Verdicts are computed from the stored numbers, so `apply_holm` only has to
fill in the adjusted p-values and every verdict follows.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple, Sequence

import numpy as np
from scipy import stats as sps

from ..errors import DFlashError

REGRESSION = "regression"
INCONCLUSIVE = "inconclusive"
IMPROVEMENT = "improvement"
PASS = "pass"
NOT_GATED_HARDWARE = "not gated: hardware differs"
# Most severe first; `worst_verdict` uses this order to summarise several gates of one case.
SEVERITY = (REGRESSION, INCONCLUSIVE, NOT_GATED_HARDWARE, IMPROVEMENT, PASS)


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
    """Common fields of a gate. `baseline`/`new` are the compared centres (mean tau, median speedup);
    rel_change = (new - baseline) / |baseline| (negative = worse: higher is better for tau and speedup).
    p_value tests "new worse than baseline", p_improvement "new better"; both one-sided and raw.
    The *_adjusted fields are set by `apply_holm`; until then the raw p-values decide."""
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
            return NOT_GATED_HARDWARE
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

    kind = "tau"

    def _worse_beyond_threshold(self) -> bool:
        return -self.rel_change > self.margin

    def _better_beyond_threshold(self) -> bool:
        return self.rel_change > self.margin


@dataclass(frozen=True)
class ThroughputGateResult(GateResult):
    factor: float = 1.10
    hardware_differs: bool = False
    min_achievable_p: float = 0.0  # exact one-sided MWU floor 1/C(m+n, m): below alpha or the gate can't fire

    kind = "throughput"

    @property
    def gated(self) -> bool:
        return not self.hardware_differs

    def _worse_beyond_threshold(self) -> bool:
        return self.new <= 0 or self.baseline / self.new > self.factor

    def _better_beyond_threshold(self) -> bool:
        return self.baseline <= 0 or self.new / self.baseline > self.factor


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
             alpha: float = 0.05, zero_method: str = "pratt", case_id: str = "") -> TauGateResult:
    """Paired per-prompt tau comparison: element i of both vectors must be the same prompt.

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
        p_less = float(sps.wilcoxon(diff, alternative="less", zero_method=zero_method).pvalue)
        p_greater = float(sps.wilcoxon(diff, alternative="greater", zero_method=zero_method).pvalue)
    base_mean, new_mean = float(base.mean()), float(new.mean())
    return TauGateResult(case_id=case_id, baseline=base_mean, new=new_mean,
                         rel_change=_relative_change(base_mean, new_mean), p_value=p_less,
                         p_improvement=p_greater, alpha=alpha, n_baseline=base.size, n_new=new.size,
                         margin=margin)


# --------------------------------------------------------------------------------------------------
# throughput gate (unpaired, asv-style)


def hardware_matches(fp_a: dict | None, fp_b: dict | None, keys: Sequence[str] = ("hardware",)) -> bool:
    """True when both fingerprints name the same hardware (case- and whitespace-insensitive). A missing or
    empty entry on either side counts as a mismatch: unknown hardware is no ground for a timing gate."""
    if not fp_a or not fp_b:
        return False

    def norm(value) -> str:
        return " ".join(str(value).split()).lower()

    return all(fp_a.get(k) not in (None, "") and norm(fp_a.get(k)) == norm(fp_b.get(k)) for k in keys)


def throughput_gate(baseline_ratio_samples: Sequence[float], new_ratio_samples: Sequence[float], *,
                    factor: float = 1.10, alpha: float = 0.05, baseline_fingerprint: dict | None = None,
                    current_fingerprint: dict | None = None, case_id: str = "") -> ThroughputGateResult:
    """Speedup-ratio samples (variant / target-only, both measured in the same run, so machine drift
    cancels). Regression iff one-sided Mann-Whitney U (new < baseline) has p < alpha AND
    median(baseline) / median(new) > factor; beyond the factor but not significant is "inconclusive" (asv
    prints it as "~"). Pass both fingerprints to report-not-gate across different hardware."""
    base = _as_1d(baseline_ratio_samples, "baseline_ratio_samples")
    new = _as_1d(new_ratio_samples, "new_ratio_samples")
    if (baseline_fingerprint is None) != (current_fingerprint is None):
        raise DFlashError("throughput_gate needs both fingerprints (baseline and current) or neither.")
    differs = baseline_fingerprint is not None and not hardware_matches(baseline_fingerprint, current_fingerprint)
    if np.ptp(np.concatenate([base, new])) == 0:
        p_less = p_greater = 1.0  # all samples equal: no evidence either way (scipy's approximation is 0/0)
    else:
        p_less = float(sps.mannwhitneyu(new, base, alternative="less").pvalue)
        p_greater = float(sps.mannwhitneyu(new, base, alternative="greater").pvalue)
    base_median, new_median = float(np.median(base)), float(np.median(new))
    return ThroughputGateResult(case_id=case_id, baseline=base_median, new=new_median,
                                rel_change=_relative_change(base_median, new_median), p_value=p_less,
                                p_improvement=p_greater, alpha=alpha, n_baseline=base.size, n_new=new.size,
                                factor=factor, hardware_differs=differs,
                                min_achievable_p=1.0 / math.comb(base.size + new.size, base.size))


# --------------------------------------------------------------------------------------------------
# Multiple comparisons over one run


def apply_holm(results: Sequence[GateResult]) -> list[GateResult]:
    """Holm across all gated results of one run (the family is exactly the list passed in; results that are
    not gated take no part). Regression and improvement p-values are adjusted as two separate families.
    Returns new result objects in the same order; verdicts follow from the adjusted p-values."""
    gated = [i for i, r in enumerate(results) if r.gated]
    worse = holm([results[i].p_value for i in gated])
    better = holm([results[i].p_improvement for i in gated])
    adjusted = list(results)
    for i, p_w, p_b in zip(gated, worse, better):
        adjusted[i] = replace(results[i], p_adjusted=p_w, p_improvement_adjusted=p_b)
    return adjusted


# --------------------------------------------------------------------------------------------------
# Sequential sampling (Pinpoint-style UNKNOWN -> more samples)


@dataclass(frozen=True)
class AdaptiveDecision:
    gather_more: bool
    next_n: int
    reason: str


def adaptive_decision(result: GateResult, *, max_samples: int, n_samples: int | None = None,
                      growth: float = 2.0) -> AdaptiveDecision:
    """Whether to gather more samples before the verdict is final.

    Only "inconclusive" (beyond the threshold, not significant) asks for more, and only while below the cap;
    the next size grows geometrically (default: doubles) so few rounds are needed. At the cap an
    inconclusive result stays inconclusive: it is reported, not failed (no retry-until-green). Unlike
    Pinpoint there is no "same" threshold: "pass" already means "not beyond the margin".
    n_samples defaults to result.n_new (prompts for tau, repeats for throughput)."""
    n = result.n_new if n_samples is None else n_samples
    if result.verdict != INCONCLUSIVE:
        return AdaptiveDecision(False, n, f"verdict is {result.verdict!r}; no more samples needed")
    if n >= max_samples:
        return AdaptiveDecision(False, n, f"still inconclusive at the cap of {max_samples} samples; "
                                          "report it as inconclusive (not a failure)")
    next_n = min(max_samples, max(n + 1, math.ceil(n * growth)))
    return AdaptiveDecision(True, next_n, f"inconclusive with {n} samples; gather up to {next_n}")


# --------------------------------------------------------------------------------------------------
# Gate quality by simulation


@dataclass(frozen=True)
class GateQuality:
    """How often the simulated gate said "regression" (rate, with a 95% Clopper-Pearson interval from
    scipy's binomtest) and how often "inconclusive", over `trials`; `simulation` says what was simulated."""
    rate: float
    low: float
    high: float
    hits: int
    inconclusive: int
    trials: int
    simulation: str


def _simulate_gate(baseline_taus, *, drop: float, trials: int, rng, margin: float, alpha: float,
                   noise_rel: float, rerun_taus, what: str) -> GateQuality:
    base = _as_1d(baseline_taus, "baseline_taus")
    rerun = None if rerun_taus is None else _as_1d(rerun_taus, "rerun_taus")
    if rerun is not None and rerun.size != base.size:
        raise DFlashError(f"rerun_taus has {rerun.size} prompts, baseline_taus {base.size}: they must be paired.")
    if trials < 1:
        raise DFlashError("trials must be >= 1.")
    generator = np.random.default_rng(rng)
    hits = inconclusive = 0
    for _ in range(trials):
        idx = generator.integers(0, base.size, base.size)  # bootstrap the prompt set (paired: same idx)
        old = base[idx]
        if rerun is not None:
            new = rerun[idx]  # measured rerun of unchanged code on the same prompts
        else:
            new = old * (1.0 + generator.normal(0.0, noise_rel, base.size))
        verdict = tau_gate(old, new * (1.0 - drop), margin=margin, alpha=alpha).verdict
        hits += verdict == REGRESSION
        inconclusive += verdict == INCONCLUSIVE
    ci = sps.binomtest(hits, trials).proportion_ci(confidence_level=0.95)
    noise = ("measured rerun differences (rerun_taus)" if rerun is not None
             else f"assumed per-prompt noise: tau_i * (1 + N(0, {noise_rel:g}))")
    simulation = (f"{what}: {trials} paired bootstrap resamples of {base.size} prompts; new = baseline with "
                  f"{noise}" + (f", then every prompt's tau scaled by {1 - drop:g}" if drop else "")
                  + f"; tau_gate margin={margin:g}, alpha={alpha:g}, single test (no Holm)")
    return GateQuality(hits / trials, float(ci.low), float(ci.high), hits, inconclusive, trials, simulation)


def false_alarm_rate(baseline_taus: Sequence[float], *, trials: int = 200, rng=0, margin: float = 0.03,
                     alpha: float = 0.05, noise_rel: float = 0.05,
                     rerun_taus: Sequence[float] | None = None) -> GateQuality:
    """Fraction of simulated unchanged-code runs that `tau_gate` calls a regression.

    Each trial resamples the prompts with replacement (the same indices for both sides, so the comparison
    stays paired). The "new" side is, if `rerun_taus` (a second measurement of unchanged code on the same
    prompts) is given, that rerun at the same indices: the measured noise including any systematic
    numerics drift. Otherwise it is the baseline perturbed by independent multiplicative Gaussian noise of
    relative sd `noise_rel` per prompt: an assumption, stated in the result's `simulation` text.
    Deterministic for a given `rng` (seed or numpy Generator)."""
    return _simulate_gate(baseline_taus, drop=0.0, trials=trials, rng=rng, margin=margin, alpha=alpha,
                          noise_rel=noise_rel, rerun_taus=rerun_taus, what="false alarms")


def detection_rate(baseline_taus: Sequence[float], drop: float = 0.10, *, trials: int = 200, rng=0,
                   margin: float = 0.03, alpha: float = 0.05, noise_rel: float = 0.05,
                   rerun_taus: Sequence[float] | None = None) -> GateQuality:
    """Fraction of simulated runs with a planted regression that `tau_gate` flags: as `false_alarm_rate`,
    then every prompt's new tau is multiplied by (1 - drop), a uniform relative drop. A real regression
    that hits only some prompts is harder to detect than this."""
    return _simulate_gate(baseline_taus, drop=drop, trials=trials, rng=rng, margin=margin, alpha=alpha,
                          noise_rel=noise_rel, rerun_taus=rerun_taus, what=f"detection of a {drop:.0%} drop")


SUGGESTIVE_P = 0.10  # unadjusted one-sided p below which a smaller-than-margin drop still asks for more prompts


def tau_needs_more_prompts(result: TauGateResult, *, family: int, max_prompts: int) -> AdaptiveDecision:
    """The ablation cases' rule (Pinpoint's "unknown -> more samples"): gather more prompts while the evidence
    is neither a regression nor a clear pass: the drop is beyond the margin but not significant after
    Bonferroni over the run's `family` of gated cases, or a drop within the margin is suggestive (unadjusted
    p < SUGGESTIVE_P; a large drop often looks small on the first 12 prompts). Unchanged code gives identical
    greedy taus (p = 1), so it never pays for more prompts."""
    adjusted = replace(result, p_adjusted=min(1.0, result.p_value * max(1, family)))
    decision = adaptive_decision(adjusted, max_samples=max_prompts)
    n = result.n_new
    if not decision.gather_more and adjusted.verdict == PASS and result.rel_change < 0 \
            and result.p_value < SUGGESTIVE_P and n < max_prompts:
        next_n = min(max_prompts, max(n + 1, math.ceil(n * 2.0)))
        return AdaptiveDecision(True, next_n, f"drop within the margin but suggestive (p {result.p_value:.2g}) "
                                              f"with {n} prompts; gather up to {next_n}")
    return decision
