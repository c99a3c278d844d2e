"""The honest evaluation protocol for cascade policies, exact by replay (ANCHORS_ALGORITHMS.md C4).

Cross-fitting over 5 random folds: each fold is the test set once; the other queries are split at random into a
training half (quality predictors) and a tuning half (thresholds, pair choice, router costs). Every query is then
tested exactly once, by policies that never saw it, so per-query outcomes pooled over the folds can be
bootstrapped (paired over queries, scipy.stats.bootstrap) for 95% CIs. Policies are swept over a log grid of
lam (the price of one second, in accuracy).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .replay import (FEATURES, REPLY_FEATURES, Outcome, StagePredictors, Table, cascade_outcome, fixed, oracle, random_escalation,
                     routed_outcome, threshold_stops, tune_thresholds)

# lam: accuracy given up per unit of cost (the largest model's median query). Below ~0.01 every policy runs the
# largest model; above ~2 none escalates past the first stage; the grid spans the range where decisions move.
LAMBDAS = tuple(float(x) for x in np.geomspace(0.01, 2.0, 9))
FOLDS = 5


@dataclass
class PolicyResult(Outcome):
    """One policy's outcome at one lam, pooled over the test folds (query order of the table)."""
    policy: str = ""
    lam: float | None = None


def folds(n: int, seed: int, count: int = FOLDS) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, count)]


ROUTER_DIFFICULTY_LEVELS = 8  # one-hot columns of the difficulty (larger ones share the last column)


def prompt_features(table: Table) -> np.ndarray:
    """What a router may read before any model runs: the family and the difficulty visible in the question (the
    number of operations; GSM8K: the count of numbers in the question), as a fixed set of one-hot columns."""
    steps = np.clip(table.difficulty, 1, ROUTER_DIFFICULTY_LEVELS)
    return np.column_stack([(table.families == "story").astype(float)] +
                           [(steps == k).astype(float) for k in range(1, ROUTER_DIFFICULTY_LEVELS + 1)])


def _stage_inputs(table: Table, k: int) -> np.ndarray:
    return table.features[:, k, :]


def backward_induction(tune: Table, q_tune: np.ndarray, test: Table, q_test: np.ndarray, lam: float) -> np.ndarray:
    """Least-squares optimal stopping (Longstaff-Schwartz, ANCHORS_ALGORITHMS.md C3 (2a)), fitted on the tuning
    split: the value of the last stage is its correctness; going backward, a ridge regression g_k(h_k) estimates
    the value of continuing (the next stage's realized value minus lam times its cost); stop where the calibrated
    q_k(h_k) is at least g_k(h_k), and the realized value follows that decision. Returns the test stops."""
    from sklearn.linear_model import Ridge
    cost = tune.stage_cost(False)
    value = tune.correct[:, -1].astype(float)
    continuation = []
    for k in range(tune.stages - 2, -1, -1):
        target = value - lam * cost[:, k + 1]
        model = Ridge(alpha=1.0).fit(np.column_stack([_stage_inputs(tune, k), q_tune[:, k]]), target)
        estimate = model.predict(np.column_stack([_stage_inputs(tune, k), q_tune[:, k]]))
        stop_here = q_tune[:, k] >= estimate
        value = np.where(stop_here, tune.correct[:, k], target)
        continuation.append((k, model))
    stop = np.full(test.size, test.stages - 1)
    undecided = np.ones(test.size, dtype=bool)
    for k, model in sorted(continuation):
        here = undecided & (q_test[:, k] >= model.predict(np.column_stack([_stage_inputs(test, k), q_test[:, k]])))
        stop[here] = k
        undecided &= ~here
    return stop


def lookahead(train: Table, test: Table, q_test: np.ndarray, lam: float) -> np.ndarray:
    """A continue rule in the spirit of Dekoninck et al.'s cascade routing, on the chain: at stage k, continue iff
    some later model m, paid for together with every stage before it, is expected to do better,
    max_m [P(y_m = 1 | h_k) - lam * (c_{k+1} + ... + c_m)] > q_k(h_k). P(y_m | h_k) is an ex-post estimate
    (logistic regression of stage m's correctness on stage k's observation, fitted on the training split); the
    cascade still returns the answer of the stage it stops at, and does not skip stages."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    cost = train.stage_cost(False).mean(axis=0)
    stop = np.full(test.size, test.stages - 1)
    undecided = np.ones(test.size, dtype=bool)
    for k in range(test.stages - 1):
        best_later = np.full(test.size, -np.inf)
        for m in range(k + 1, test.stages):
            y = train.correct[:, m].astype(int)
            if y.min() == y.max():
                p = np.full(test.size, float(y[0]))
            else:
                model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
                p = model.fit(_stage_inputs(train, k), y).predict_proba(_stage_inputs(test, k))[:, 1]
            best_later = np.maximum(best_later, p - lam * cost[k + 1: m + 1].sum())
        here = undecided & (q_test[:, k] >= best_later)
        stop[here] = k
        undecided &= ~here
    return stop


def policy_outcomes(train: Table, tune: Table, test: Table, lam: float, seed: int,
                    q_tune: np.ndarray, q_test: np.ndarray, v_tune: np.ndarray, v_test: np.ndarray) -> dict[str, Outcome]:
    """Every lam-dependent policy, fitted on train, tuned on tune, applied to test. q_*: the calibrated stage
    predictors on the greedy reply's features (no samples needed), v_*: the same with the samples' vote share too
    (so a policy reading them pays for the samples)."""
    out = {}
    thresholds = tune_thresholds(q_tune, tune, lam, with_samples=False)
    out["calibrated-threshold"] = cascade_outcome(test, threshold_stops(q_test, thresholds), False)
    thresholds = tune_thresholds(v_tune, tune, lam, with_samples=True)
    out["calibrated-threshold+votes"] = cascade_outcome(test, threshold_stops(v_test, thresholds), True)
    for name, feature, samples in (("logprob-threshold", "mean_logprob", False), ("vote-threshold", "vote_share", True)):
        column = FEATURES.index(feature)
        theta = tune_thresholds(tune.features[:, :, column], tune, lam, with_samples=samples)
        out[name] = cascade_outcome(test, threshold_stops(test.features[:, :, column], theta), samples)
    out["random"] = random_escalation(test, out["calibrated-threshold"].mean_cost, False, seed)
    out["backward-induction"] = cascade_outcome(test, backward_induction(tune, q_tune, test, q_test, lam), False)
    out["lookahead"] = cascade_outcome(test, lookahead(train, test, q_test, lam), False)
    # the best two-model cascade: stage i, then stage j, thresholded on q_i (the pair chosen on the tuning split)
    best, best_value = None, -np.inf
    for pair in itertools.combinations(range(train.stages), 2):
        keep = list(pair)
        theta = tune_thresholds(q_tune[:, keep], tune.with_stages(keep), lam, with_samples=False)
        on_tune = cascade_outcome(tune.with_stages(keep), threshold_stops(q_tune[:, keep], theta), False)
        value = (on_tune.correct - lam * on_tune.cost).mean()
        if value > best_value:
            on_test = cascade_outcome(test.with_stages(keep), threshold_stops(q_test[:, keep], theta), False)
            best, best_value = Outcome(np.array(keep)[on_test.stop], on_test.correct, on_test.cost), value
    out["best-pair"] = best
    # the pre-generation router: ex-ante quality per model from prompt features, argmax q - lam * mean cost
    from sklearn.linear_model import LogisticRegression
    x_train, x_test = prompt_features(train), prompt_features(test)
    ex_ante = np.column_stack([
        LogisticRegression(max_iter=1000).fit(x_train, train.correct[:, k]).predict_proba(x_test)[:, 1]
        if 0 < train.correct[:, k].sum() < train.size else np.full(test.size, float(train.correct[0, k]))
        for k in range(train.stages)])
    mean_cost = tune.stage_cost(False).mean(axis=0)
    out["router"] = routed_outcome(test, np.argmax(ex_ante - lam * mean_cost, axis=1))
    return out


@dataclass
class Evaluation:
    results: list[PolicyResult]
    predicted: np.ndarray  # [n, K] calibrated stage predictions (reply features), from the fold that tested each query


def evaluate_policies(table: Table, *, lambdas=LAMBDAS, seed: int = 0) -> Evaluation:
    """Every policy at every lam (and the lam-free ones once), by cross-fitting; outcomes in table order."""
    parts = folds(table.size, seed)
    predicted = np.zeros((table.size, table.stages))
    rng = np.random.default_rng(seed + 1)
    pooled: dict[tuple[str, float | None], dict[str, np.ndarray]] = {}

    def put(name, lam, test_index, outcome: Outcome):
        slot = pooled.setdefault((name, lam), {k: np.zeros(table.size, dtype=float if k == "cost" else int)
                                               for k in ("correct", "cost", "stop")})
        slot["correct"][test_index] = outcome.correct
        slot["cost"][test_index] = outcome.cost
        slot["stop"][test_index] = outcome.stop

    for index, test_index in enumerate(parts):
        rest = rng.permutation(np.setdiff1d(np.arange(table.size), test_index))
        train, tune, test = table.subset(np.sort(rest[::2])), table.subset(np.sort(rest[1::2])), table.subset(test_index)
        for k, rung in enumerate(table.rungs):
            put(f"fixed-{rung}", None, test_index, fixed(test, k))
        cascade, router = oracle(test)
        put("oracle-cascade", None, test_index, cascade)
        put("oracle-router", None, test_index, router)
        predictors = StagePredictors(REPLY_FEATURES, seed=seed).fit(train)
        with_votes = StagePredictors(FEATURES, seed=seed).fit(train)
        q_tune, q_test = predictors.predict(tune), predictors.predict(test)
        v_tune, v_test = with_votes.predict(tune), with_votes.predict(test)
        predicted[test_index] = q_test
        for lam in lambdas:
            for name, outcome in policy_outcomes(train, tune, test, lam, seed + index, q_tune, q_test, v_tune,
                                                 v_test).items():
                put(name, lam, test_index, outcome)
    return Evaluation([PolicyResult(stop=v["stop"], correct=v["correct"].astype(bool), cost=v["cost"], policy=name,
                                    lam=lam)
                       for (name, lam), v in pooled.items()], predicted)


def paired_ci(values: np.ndarray, seed: int = 0, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and bootstrap CI of per-query values (for a paired difference, pass the per-query differences)."""
    from scipy.stats import bootstrap
    values = np.asarray(values, dtype=float)
    if np.all(values == values[0]):
        return float(values[0]), float(values[0]), float(values[0])
    ci = bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=2000, method="percentile",
                   random_state=np.random.default_rng(seed)).confidence_interval
    return float(values.mean()), float(ci.low), float(ci.high)


CHAINS = ("calibrated-threshold", "calibrated-threshold+votes", "logprob-threshold", "vote-threshold", "random",
          "backward-induction", "lookahead")  # cascades over the whole ladder, cheapest first


def invariants(results: list[PolicyResult]) -> list[str]:
    """Properties that hold mathematically; each violation is a bug in the replay. The oracle router (the
    cheapest correct model per query) is right wherever any policy is, and no dearer there: a policy that is
    right paid for at least one correct model. A cascade over the whole ladder is also bounded by the oracle
    cascade (stop at the first correct stage)."""
    by_name = {(r.policy, r.lam): r for r in results}
    router, chain = by_name[("oracle-router", None)], by_name[("oracle-cascade", None)]
    problems = []
    for r in results:
        if r.policy.startswith("oracle"):
            continue
        for name, oracle in [("oracle router", router)] + ([("oracle cascade", chain)] if r.policy in CHAINS else []):
            if np.any(r.correct & ~oracle.correct):
                problems.append(f"{r.policy} (lam {r.lam}) is right where the {name} is wrong")
            if np.any(r.correct & (oracle.cost > r.cost + 1e-9)):
                problems.append(f"{r.policy} (lam {r.lam}) is right more cheaply than the {name}")
    return problems


def curve_metrics(results: list[PolicyResult], rungs: list[str]) -> dict:
    """Per lam-swept policy: cost saving at matched accuracy (within 1 point of the largest model), the area of
    its accuracy-cost curve normalised between the smallest and largest model, APGR and IBC."""
    by_name = {(r.policy, r.lam): r for r in results}
    small, large = by_name[(f"fixed-{rungs[0]}", None)], by_name[(f"fixed-{rungs[-1]}", None)]
    c1, cK, a1, aK = small.mean_cost, large.mean_cost, small.accuracy, large.accuracy
    out = {}
    for policy in sorted({r.policy for r in results if r.lam is not None}):
        points = sorted((r.mean_cost, r.accuracy) for r in results if r.policy == policy)
        costs, accs = np.array([c for c, _ in points]), np.array([a for _, a in points])
        matched = costs[accs >= aK - 0.01]
        grid = np.linspace(c1, cK, 201)
        envelope = np.array([accs[costs <= g].max() if (costs <= g).any() else a1 for g in grid])
        gap = aK - a1
        pgr = (envelope - a1) / gap if gap > 0 else np.zeros_like(envelope)
        ibc = [(a - a1) / (c - c1) for c, a in points if c > c1]
        base_ibc = gap / (cK - c1) if cK > c1 else 0.0
        out[policy] = {
            "cost_saving_at_matched_accuracy": float(1 - matched.min() / cK) if matched.size else None,
            "normalised_area": float(np.trapezoid(envelope, grid) / (cK - c1)) if cK > c1 else None,
            "apgr": float(np.trapezoid(pgr, grid) / (cK - c1)) if cK > c1 else None,
            "best_delta_ibc": float((max(ibc) - base_ibc) / base_ibc) if ibc and base_ibc > 0 else None,
        }
    return out
