"""Statistical gates: verdicts on constructed data, Holm by hand, throughput factor logic, gate quality."""
import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as sps

from dflash.errors import DFlashError
from dflash.harness.stats import (IMPROVEMENT, INCONCLUSIVE, NOT_GATED, PASS, REGRESSION, alpha_shares,
                                  apply_holm, confirm, holm, look_schedule, mean_ci, sequential_tau_gate,
                                  not_gated_throughput, tau_gate, tau_needs_more_prompts, throughput_gate,
                                  worst_verdict)


@pytest.fixture(scope="module")
def taus():
    """40 per-prompt taus spread like a DFlash run (block size 8: between 2 and 8)."""
    return np.random.default_rng(7).uniform(2.0, 8.0, 40)


def noisy(values, rel, seed):
    return values * (1 + np.random.default_rng(seed).normal(0, rel, len(values)))


# --- mean_ci ---------------------------------------------------------------------------------------

def test_mean_ci_matches_the_t_interval():
    mean, low, high = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = sps.t.ppf(0.975, 3) * np.std([1, 2, 3, 4], ddof=1) / 2
    assert mean == 2.5 and low == pytest.approx(2.5 - half) and high == pytest.approx(2.5 + half)


def test_mean_ci_single_and_constant_samples_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        single = mean_ci([3.0])
        constant = mean_ci([0.1, 0.1, 0.1])
    assert single.mean == 3.0 and math.isnan(single.low) and math.isnan(single.high)
    assert constant == (pytest.approx(0.1),) * 3


def test_mean_ci_rejects_empty_and_nan():
    with pytest.raises(DFlashError, match="empty"):
        mean_ci([])
    with pytest.raises(DFlashError, match="NaN"):
        mean_ci([1.0, float("nan")])


# --- Holm --------------------------------------------------------------------------------------------

def test_holm_hand_worked_example():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


@given(st.lists(st.floats(0, 1), min_size=1, max_size=12))
def test_holm_is_monotone_capped_and_never_below_raw(p):
    adjusted = holm(p)
    assert all(a >= r - 1e-15 and a <= 1 for a, r in zip(adjusted, p))
    order = np.argsort(p, kind="stable")
    assert all(np.diff(np.asarray(adjusted)[order]) >= -1e-15)


# --- tau gate ----------------------------------------------------------------------------------------

def test_identical_taus_pass_with_p_one(taus):
    result = tau_gate(taus, taus.copy())
    assert result.verdict == PASS and result.p_value == 1.0 and result.rel_change == 0.0
    assert not result.failed


def test_planted_ten_percent_drop_is_a_regression(taus):
    result = tau_gate(taus, noisy(taus, 0.02, 1) * 0.90, case_id="bs=8")
    assert result.verdict == REGRESSION and result.failed
    assert result.rel_change == pytest.approx(-0.10, abs=0.01) and result.p_value < 1e-6
    assert result.to_dict()["verdict"] == REGRESSION and result.to_dict()["kind"] == "tau"


def test_rerun_noise_without_drop_is_no_alarm(taus):
    assert tau_gate(taus, noisy(taus, 0.02, 2)).verdict == PASS


def test_significant_drop_within_margin_passes(taus):
    result = tau_gate(taus, taus * 0.99)  # every prompt lower, but only 1%
    assert result.p_value < 1e-6 and result.verdict == PASS


def test_drop_beyond_margin_but_not_significant_is_inconclusive():
    base = [4.0, 6.0, 3.0, 7.0, 5.0]
    new = [2.0, 6.5, 3.2, 5.0, 5.1]  # mean -10%, but only 5 prompts and mixed signs
    result = tau_gate(base, new)
    assert result.rel_change < -0.03 and result.p_value > 0.05
    assert result.verdict == INCONCLUSIVE and not result.failed


def test_improvement_is_reported_not_failed(taus):
    result = tau_gate(taus, taus * 1.10)
    assert result.verdict == IMPROVEMENT and not result.failed and result.p_improvement < 1e-6


def test_length_mismatch_is_a_clear_error(taus):
    with pytest.raises(DFlashError, match=r"bs=4.*baseline has 40 prompts, new has 39"):
        tau_gate(taus, taus[:-1], case_id="bs=4")


def test_holm_across_gates_can_turn_a_marginal_regression_inconclusive():
    base = np.arange(1.0, 13.0) + 3.0  # 12 prompts
    new = base * 0.9
    new[:5] = base[:5] * 1.02  # 7 of 12 prompts drop 10%, the smallest 5 rise: raw p = 0.032
    marginal = tau_gate(base, new, case_id="marginal")
    assert marginal.p_value < 0.05 and marginal.verdict == REGRESSION
    clear = tau_gate(base, base * 0.8, case_id="clear")
    others = [tau_gate(base, base, case_id=f"same{i}") for i in range(3)]
    adjusted = apply_holm([marginal, clear, *others])
    assert adjusted[0].p_adjusted == pytest.approx(min(1.0, 4 * marginal.p_value))
    assert adjusted[0].verdict == INCONCLUSIVE  # no longer significant after the correction
    assert adjusted[1].verdict == REGRESSION and [r.verdict for r in adjusted[2:]] == [PASS] * 3
    assert [r.case_id for r in adjusted] == ["marginal", "clear", "same0", "same1", "same2"]


# --- throughput gate ---------------------------------------------------------------------------------

BASE_SPEEDUP = [2.00, 2.04, 1.98, 2.02, 2.01, 1.99]


def test_throughput_regression_needs_significance_and_factor():
    slower = [1.70, 1.72, 1.69, 1.75, 1.71, 1.73]  # 2.005 / 1.715 = 1.17 > 1.10
    result = throughput_gate(BASE_SPEEDUP, slower)
    assert result.p_value < 0.05 and result.verdict == REGRESSION and result.failed


def test_throughput_significant_but_within_factor_passes():
    slightly = [1.90, 1.92, 1.91, 1.89, 1.93, 1.90]  # clearly lower, but only 5%
    result = throughput_gate(BASE_SPEEDUP, slightly)
    assert result.p_value < 0.05 and result.verdict == PASS


def test_throughput_beyond_factor_with_too_few_samples_is_inconclusive():
    result = throughput_gate([2.0, 2.1, 1.9], [1.6, 2.05, 1.5])  # 3 pairs, one barely slower: not significant
    assert result.baseline / result.new > 1.10 and result.p_value > 0.05
    assert result.verdict == INCONCLUSIVE


def test_throughput_gate_is_paired_by_prompt():
    """The run's n samples are compared with the baseline's first n (the same prompts), whatever the rest of
    the baseline holds: here the baseline's later prompts are 3x faster, and an unpaired test on all of them
    would call the unchanged first prompts a regression."""
    first = [0.8, 1.2, 0.9, 1.1, 1.0, 0.95]
    baseline = first + [3.0] * 18
    same = [v * f for v, f in zip(first, (1.01, 0.99, 1.0, 1.02, 0.98, 1.0))]
    result = throughput_gate(baseline, same)
    assert result.n_baseline == 6 and result.verdict == PASS
    assert result.baseline == pytest.approx(math.exp(np.mean(np.log(first))))  # geometric mean of the pairs
    assert sps.mannwhitneyu(same, baseline, alternative="less").pvalue < 1e-3  # what unpaired would say
    with pytest.raises(DFlashError, match="pairs samples by prompt"):
        throughput_gate(first, baseline)


def test_confirm_needs_both_measurements_to_regress():
    slower = [1.70, 1.72, 1.69, 1.75, 1.71, 1.73]
    first = throughput_gate(BASE_SPEEDUP, slower)
    assert first.verdict == REGRESSION
    recovered = confirm(first, throughput_gate(BASE_SPEEDUP, BASE_SPEEDUP[::-1]))
    assert recovered.verdict != REGRESSION and len(recovered.measurements) == 2
    again = confirm(first, throughput_gate(BASE_SPEEDUP, [v * 0.99 for v in slower]))
    assert again.verdict == REGRESSION and again.p_value == max(m["p_value"] for m in again.measurements)
    assert again.rel_change == max(m["rel_change"] for m in again.measurements)  # the milder of the two


def test_throughput_improvement_not_failed():
    result = throughput_gate(BASE_SPEEDUP, [2.5, 2.6, 2.55, 2.52, 2.58, 2.61])
    assert result.verdict == IMPROVEMENT and not result.failed


def test_throughput_not_gated_says_why_and_takes_no_alpha():
    result = not_gated_throughput([1.0, 1.2, 0.9], "no stored throughput for testbed cpu-x", case_id="c")
    assert result.verdict == NOT_GATED and not result.failed and not result.gated
    assert result.to_dict()["not_gated"] == "no stored throughput for testbed cpu-x"
    assert result.n_new == 3 and result.new == pytest.approx((1.0 * 1.2 * 0.9) ** (1 / 3))
    assert apply_holm([result])[0].p_adjusted is None  # not part of the Holm family


def test_throughput_gate_says_what_it_compared_with():
    result = throughput_gate(BASE_SPEEDUP, [1.0] * 6, source="A/B reference abc measured here")
    assert result.gated and result.verdict == REGRESSION and result.to_dict()["source"].startswith("A/B")


def test_worst_verdict():
    assert worst_verdict([PASS, IMPROVEMENT, INCONCLUSIVE]) == INCONCLUSIVE
    assert worst_verdict([PASS, REGRESSION, NOT_GATED]) == REGRESSION
    assert worst_verdict([]) == PASS


# --- sequential looks -------------------------------------------------------------------------------

def test_look_schedule():
    assert look_schedule(12, 48) == [12, 24, 48]
    assert look_schedule(12, 24) == [12, 24]
    assert look_schedule(12, 12) == [12]
    assert look_schedule(12, 30) == [12, 24, 30]


def test_a_look_spends_its_share_of_alpha():
    base = np.arange(1.0, 13.0) + 3.0
    whole = tau_gate(base, base * 0.9)
    third = tau_gate(base, base * 0.9, alpha_share=1 / 3)
    assert third.p_value == pytest.approx(3 * whole.p_value) and third.p_raw == pytest.approx(whole.p_value)
    early = tau_gate(base, base * 0.5, alpha_share=0.0)  # a futility look: it can stop a pass, never fail
    assert early.p_value == 1.0 and early.verdict == INCONCLUSIVE
    assert alpha_shares(3) == [0.0, 0.0, 1.0] and alpha_shares(3, "equal") == pytest.approx([1 / 3] * 3)
    assert sum(alpha_shares(4, "uncorrected")) == 4


def test_tau_gather_more_rule():
    """More prompts while a drop is beyond the margin but not significant after the family factor, or within
    the margin but suggestive; never for identical taus; never after the last look."""
    base = [3.0, 2.5, 4.0, 3.5, 2.0, 3.0, 5.0, 2.5, 3.0, 4.5, 3.5, 2.0]
    schedule = [12, 24, 48]
    unchanged = tau_gate(base, base, alpha_share=0.0)
    assert not tau_needs_more_prompts(unchanged, family=50, schedule=schedule).gather_more
    big = tau_gate(base, [t * 0.85 for t in base], alpha_share=1 / 3)  # -15%: p 7e-4, not significant x500
    decision = tau_needs_more_prompts(big, family=500, schedule=schedule)
    assert decision.gather_more and decision.next_n == 24
    assert not tau_needs_more_prompts(big, family=1, schedule=schedule).gather_more  # already a regression
    small = tau_gate(base, [t * 0.98 for t in base], alpha_share=0.0)  # -2%: within the margin, all dropped
    assert small.verdict == "pass" and small.p_raw < 0.1
    assert tau_needs_more_prompts(small, family=50, schedule=schedule).gather_more
    assert not tau_needs_more_prompts(small, family=50, schedule=[12]).gather_more  # the last look


def test_sequential_gate_measures_only_what_it_looks_at(taus):
    """A 10% drop on every prompt looks like a regression at 12 prompts, but only the last look (all 40
    baseline prompts) may fail a case, so the flow asks for 24, then 40 prompts and ends with a regression;
    unchanged taus stop at the first look."""
    asked = []

    def measure(n):
        asked.append(n)
        return list(taus[:n] * 0.9)
    gate = sequential_tau_gate(taus, measure, start=12, family=200)
    assert asked == [12, 24, 40] and gate.n_new == 40 and gate.alpha_share == 1 and gate.p_value * 200 < 0.05
    asked.clear()
    sequential_tau_gate(taus, lambda n: asked.append(n) or list(taus[:n]), start=12, family=200)
    assert asked == [12]
