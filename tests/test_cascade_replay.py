"""Exact replay of cascade policies on synthetic tables (no model runs): the invariants that hold by
construction, the threshold search against brute force, cost accounting, calibration metrics and the online
learners' regret bookkeeping."""
import itertools

import numpy as np
import pytest

from dflash.cascade import evaluate as ev
from dflash.cascade.online import arm_rewards, epsilon_greedy, exp3
from dflash.cascade.replay import (FEATURES, Table, cascade_outcome, expected_calibration_error, fixed, oracle,
                                   random_escalation, routed_outcome, threshold_stops, tune_thresholds)


def synthetic_table(n=240, stages=4, seed=0) -> Table:
    """Queries whose difficulty decides which stages get them right; features carry a noisy hint of it."""
    rng = np.random.default_rng(seed)
    difficulty = rng.integers(1, 5, n)
    skill = np.arange(1, stages + 1)
    p_correct = 1 / (1 + np.exp(-(1.5 * skill[None, :] - 1.4 * difficulty[:, None] + 0.5)))
    correct = rng.random((n, stages)) < p_correct
    features = rng.normal(size=(n, stages, len(FEATURES)))
    features[:, :, FEATURES.index("mean_logprob")] += 1.5 * correct
    features[:, :, FEATURES.index("vote_share")] = np.clip(0.5 + 0.4 * correct + rng.normal(0, 0.2, (n, stages)), 0, 1)
    greedy = np.tile(0.05 * 2.0 ** np.arange(stages), (n, 1)) * rng.uniform(0.9, 1.1, (n, stages))
    answers = np.where(correct, 1, 0).astype(object)
    return Table([f"q{i}" for i in range(n)], np.where(rng.random(n) < 0.5, "story", "expression"), difficulty,
                 [f"l{k + 1}" for k in range(stages)], correct, answers, greedy, greedy * 1.5,
                 np.full((n, stages), 30.0), features)


def test_fixed_k_is_the_stage_itself_and_cascades_pay_every_stage_they_ran():
    table = synthetic_table()
    for k in range(table.stages):
        outcome = fixed(table, k)
        assert outcome.accuracy == table.correct[:, k].mean() and np.allclose(outcome.cost, table.greedy_s[:, k])
    stop = np.array([k % table.stages for k in range(table.size)])
    cascade = cascade_outcome(table, stop, with_samples=False)
    for i in range(table.size):
        assert cascade.cost[i] == pytest.approx(table.greedy_s[i, : stop[i] + 1].sum())
        assert cascade.correct[i] == table.correct[i, stop[i]]
    with_samples = cascade_outcome(table, stop, with_samples=True)
    assert np.all(with_samples.cost > cascade.cost)  # reading the samples costs their time
    assert np.allclose(routed_outcome(table, stop).cost, table.greedy_s[np.arange(table.size), stop])


def test_the_oracle_bounds_every_policy():
    table = synthetic_table(seed=1)
    cascade, router = oracle(table)
    assert cascade.accuracy == table.correct.any(axis=1).mean()
    rng = np.random.default_rng(0)
    for _ in range(50):
        stop = rng.integers(0, table.stages, table.size)
        for policy, best in ((cascade_outcome(table, stop, False), cascade), (routed_outcome(table, stop), router)):
            assert policy.accuracy <= best.accuracy
            right = policy.correct
            assert np.all(best.cost[right] <= policy.cost[right] + 1e-12)  # where the policy is right, no cheaper


def test_threshold_search_is_the_brute_force_optimum_over_its_grid():
    table = synthetic_table(n=60, stages=3, seed=2)
    scores = np.random.default_rng(3).random((table.size, table.stages))
    lam = 2.0
    best = tune_thresholds(scores, table, lam, with_samples=False, grid_size=5)
    paid = np.cumsum(table.greedy_s, axis=1)
    rows = np.arange(table.size)

    def value(thresholds):
        stop = threshold_stops(scores, thresholds)
        return (table.correct[rows, stop] - lam * paid[rows, stop]).mean()
    grid = [np.unique(np.concatenate([[-np.inf, np.inf], np.quantile(scores[:, k], np.linspace(0, 1, 5))]))
            for k in range(table.stages - 1)]
    assert value(best) == pytest.approx(max(value(t) for t in itertools.product(*grid)))
    assert list(threshold_stops(np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.1, 0.1, 0.0]]), (0.5, 0.5))) == [0, 1, 2]


def test_random_escalation_matches_the_cost_it_is_given():
    table = synthetic_table(n=4000, seed=4)
    target = cascade_outcome(table, np.full(table.size, 1), False).mean_cost
    outcome = random_escalation(table, target, with_samples=False, seed=0)
    assert outcome.mean_cost == pytest.approx(target, rel=0.05)
    assert set(np.unique(outcome.stop)) == set(range(table.stages))


def test_calibration_error_sees_miscalibration():
    rng = np.random.default_rng(5)
    p = rng.random(20000)
    y = rng.random(20000) < p
    assert expected_calibration_error(p, y) < 0.02
    assert expected_calibration_error(np.clip(p + 0.3, 0, 1), y) > 0.2


def test_cross_fitted_evaluation_tests_every_query_once_and_keeps_the_invariants():
    table = synthetic_table(n=200, seed=6)
    evaluation = ev.evaluate_policies(table, lambdas=(0.05, 4.0), seed=0)
    results = evaluation.results
    assert evaluation.predicted.shape == (table.size, table.stages)
    names = {r.policy for r in results}
    assert {"calibrated-threshold", "calibrated-threshold+votes", "logprob-threshold", "vote-threshold", "random",
            "best-pair", "router",
            "backward-induction", "lookahead",
            "oracle-cascade", "oracle-router", "fixed-l1", "fixed-l4"} <= names
    assert ev.invariants(results) == []
    fixed_l4 = next(r for r in results if r.policy == "fixed-l4")
    assert fixed_l4.accuracy == table.correct[:, 3].mean()  # every query tested exactly once
    cheap, dear = (next(r for r in results if r.policy == "calibrated-threshold" and r.lam == lam) for lam in (4.0, 0.05))
    assert cheap.mean_cost <= dear.mean_cost  # a higher price of time buys less of it
    metrics = ev.curve_metrics(results, table.rungs)
    assert set(metrics["calibrated-threshold"]) == {"cost_saving_at_matched_accuracy", "normalised_area", "apgr",
                                                    "best_delta_ibc"}
    mean, low, high = ev.paired_ci(cheap.correct.astype(float) - fixed_l4.correct)
    assert low <= mean <= high


def test_online_regret_is_measured_against_the_best_fixed_arm_on_the_same_stream():
    table = synthetic_table(n=300, seed=7)
    scores = np.random.default_rng(8).random((table.size, table.stages))
    arms = [(t, t, t) for t in (0.2, 0.5, 0.8, np.inf)]
    rewards, _ = arm_rewards(table, scores, arms, 1.0, False)
    for run in (epsilon_greedy(table, scores, arms, 1.0, False, seed=0), exp3(table, scores, arms, 1.0, False, seed=0)):
        best = rewards[:, rewards.sum(axis=0).argmax()]
        assert np.allclose(run.best_fixed, best)
        assert run.cumulative_regret[-1] == pytest.approx(best.sum() - run.rewards.sum())
    same = [(0.5, 0.5, 0.5)] * 3  # identical arms: no regret is possible for a learner that only plays them
    assert exp3(table, scores, same, 1.0, False, seed=0).cumulative_regret[-1] == pytest.approx(0.0)


def test_token_normalised_costs_follow_the_rung_rates_in_units_of_the_largest_model():
    table = synthetic_table(n=100, seed=9)
    table.new_tokens = np.random.default_rng(1).integers(10, 60, (table.size, table.stages)).astype(float)
    table.greedy_s = 0.01 * (np.arange(table.stages) + 1)[None, :] * (5 + table.new_tokens)
    normalised = table.token_normalised()
    assert np.median(normalised.greedy_s[:, -1]) == pytest.approx(1.0)
    ratio = normalised.greedy_s / table.greedy_s  # an exact linear model is recovered: one common unit
    assert np.allclose(ratio, ratio[0, 0])


def test_the_report_writes_its_tables_and_plots(tmp_path):
    from dflash.cascade.report import write_report
    table = synthetic_table(n=160, seed=10)
    path = write_report(table, tmp_path, lambdas=(0.03, 0.3, 3.0))
    text = path.read_text()
    for heading in ("## Fixed models and the oracle", "## Frontier metrics", "## Quality predictors",
                    "## Cross-family transfer", "## Online learning"):
        assert heading in text
    assert "Invariant violations" not in text
    assert {p.name for p in tmp_path.glob("*.png")} == {"pareto.png", "regret.png", "calibration.png",
                                                       "stage_usage.png"}


@pytest.mark.parametrize("rule", ["backward-induction", "lookahead"])
def test_stopping_rules_stop_early_when_time_is_dear_and_late_when_it_is_free(rule):
    from dflash.cascade.replay import StagePredictors
    table = synthetic_table(n=300, seed=11)
    train, tune, test = table.subset(np.arange(0, 100)), table.subset(np.arange(100, 200)), table.subset(np.arange(200, 300))
    predictors = StagePredictors().fit(train)
    q_tune, q_test = predictors.predict(tune), predictors.predict(test)

    def stops(lam):
        if rule == "backward-induction":
            return ev.backward_induction(tune, q_tune, test, q_test, lam)
        return ev.lookahead(train, test, q_test, lam)
    dear, free = stops(1000.0), stops(0.0)
    assert np.all(dear == 0)
    assert free.mean() > 1.0 and np.all(free >= 0) and np.all(free < table.stages)
