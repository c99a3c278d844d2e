"""Exact replay of cascade policies over a collected table (dflash.cascade.collect).

A policy decides, query by query, at which stage of the ladder to stop (a cascade pays every stage it ran, cheap
ones first) or which single model to ask (a router pays only that one). Because every stage's answer and cost
were collected once, any policy's accuracy and cost are computed exactly from the table, the oracle and the best
policy in hindsight included. Stage k's observation h_k is its own reply's features plus the agreement of its
answer with the previous stage's (`stage_features`); quality predictors q_k(h_k) = P(stage k correct | h_k) are
per-stage logistic regressions with isotonic calibration (scikit-learn).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..errors import DFlashError
from .collect import StageRow

FEATURES = ("mean_logprob", "min_logprob", "q10_logprob", "q25_logprob", "q50_logprob", "mean_entropy",
            "new_tokens", "vote_share", "has_answer", "agrees_with_previous")
SAMPLING_FEATURES = ("vote_share",)  # features that need the m samples, so their cost is charged
REPLY_FEATURES = tuple(f for f in FEATURES if f not in SAMPLING_FEATURES)  # what the greedy reply alone gives


@dataclass
class Table:
    """Stages 0..K-1 (cheapest first) of n queries, as arrays."""
    qids: list[str]
    families: np.ndarray  # [n] str
    difficulty: np.ndarray  # [n] int
    rungs: list[str]
    correct: np.ndarray  # [n, K] bool
    answers: np.ndarray  # [n, K] object (int or None)
    greedy_s: np.ndarray  # [n, K] wall seconds of the greedy answer
    sample_s: np.ndarray  # [n, K] wall seconds of the m samples
    new_tokens: np.ndarray  # [n, K]
    features: np.ndarray  # [n, K, F] (FEATURES)

    @property
    def size(self) -> int:
        return len(self.qids)

    @property
    def stages(self) -> int:
        return len(self.rungs)

    def subset(self, index) -> "Table":
        index = np.asarray(index)
        return Table([self.qids[i] for i in index], self.families[index], self.difficulty[index], self.rungs,
                     self.correct[index], self.answers[index], self.greedy_s[index], self.sample_s[index],
                     self.new_tokens[index], self.features[index])

    def with_stages(self, keep: list[int]) -> "Table":
        """The same queries with only the stages `keep` (in that order): a shorter ladder."""
        return Table(self.qids, self.families, self.difficulty, [self.rungs[k] for k in keep],
                     self.correct[:, keep], self.answers[:, keep], self.greedy_s[:, keep], self.sample_s[:, keep],
                     self.new_tokens[:, keep], self.features[:, keep])

    def token_normalised(self) -> "Table":
        """Costs in units of the largest model's median query, from a per-rung linear cost model: greedy seconds
        = a_k + b_k * new tokens (least squares over this table), sampling seconds = the rung's mean. Each query
        then pays what its token counts cost at the rung's measured rates, so one slow outlier (the machine
        being busy for a moment) does not move a policy's decisions, and ratios come from one run."""
        greedy, sample = np.empty_like(self.greedy_s), np.empty_like(self.sample_s)
        for k in range(self.stages):
            tokens = self.new_tokens[:, k]
            design = np.column_stack([np.ones_like(tokens), tokens])
            coefficients = np.linalg.lstsq(design, self.greedy_s[:, k], rcond=None)[0]
            greedy[:, k] = np.maximum(design @ coefficients, 1e-9)
            sample[:, k] = self.sample_s[:, k].mean()
        unit = float(np.median(greedy[:, -1]))
        return Table(self.qids, self.families, self.difficulty, self.rungs, self.correct, self.answers,
                     greedy / unit, sample / unit, self.new_tokens, self.features)

    def stage_cost(self, with_samples: bool) -> np.ndarray:
        """[n, K] seconds to run each stage: the greedy answer, plus the samples when a policy reads them."""
        return self.greedy_s + (self.sample_s if with_samples else 0.0)


def reply_features(row: StageRow, previous: StageRow | None) -> list[float]:
    logp = np.asarray(row.token_logprobs or [0.0])
    votes = sum(a is not None and a == row.answer for a in row.sample_answers)
    return [float(logp.mean()), float(logp.min()), *[float(np.quantile(logp, q)) for q in (0.10, 0.25, 0.50)],
            float(np.mean(row.token_entropies or [0.0])), float(row.new_tokens),
            votes / len(row.sample_answers) if row.sample_answers and row.answer is not None else 0.0,
            float(row.answer is not None),
            float(previous is not None and row.answer is not None and row.answer == previous.answer)]


def build_table(rows: list[StageRow], rungs: list[str]) -> Table:
    """The table of the queries every rung answered (in first-seen order)."""
    by_key = {(r.qid, r.rung): r for r in rows}
    qids = list(dict.fromkeys(r.qid for r in rows))
    qids = [q for q in qids if all((q, k) in by_key for k in rungs)]
    if not qids:
        raise DFlashError("The table holds no query answered by every rung: collect first (`dflash cascade "
                          "collect`), or let an interrupted collection finish.")
    stage_rows = [[by_key[(q, k)] for k in rungs] for q in qids]
    features = np.array([[reply_features(row, stages[i - 1] if i else None) for i, row in enumerate(stages)]
                         for stages in stage_rows])
    grid = lambda attr: np.array([[getattr(r, attr) for r in stages] for stages in stage_rows])  # noqa: E731
    answers = np.empty((len(qids), len(rungs)), dtype=object)
    for i, stages in enumerate(stage_rows):
        answers[i] = [r.answer for r in stages]
    return Table(qids, np.array([s[0].family for s in stage_rows]), np.array([s[0].difficulty for s in stage_rows]),
                 list(rungs), grid("correct").astype(bool), answers, grid("greedy_s").astype(float),
                 grid("sample_s").astype(float), grid("new_tokens").astype(float), features)


# --- quality predictors ------------------------------------------------------------------------------------------

class StagePredictors:
    """q_k(h_k) for every stage: standardised features -> logistic regression, isotonic-calibrated by
    cross-validation on the training split (sklearn's CalibratedClassifierCV)."""

    def __init__(self, features: tuple[str, ...] = FEATURES, calibration: str = "isotonic", seed: int = 0):
        self.columns = [FEATURES.index(f) for f in features]
        self.features, self.calibration, self.seed = features, calibration, seed
        self.models: list = []

    @property
    def reads_samples(self) -> bool:
        return any(f in SAMPLING_FEATURES for f in self.features)

    def fit(self, table: Table) -> "StagePredictors":
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        self.models = []
        for k in range(table.stages):
            x, y = table.features[:, k, self.columns], table.correct[:, k].astype(int)
            minority = int(min(y.sum(), len(y) - y.sum()))
            if minority < 2:  # (nearly) always or never right on the training split: too little to calibrate
                self.models.append(float(y.mean()))
                continue
            base = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=self.seed))
            folds = min(3, minority)
            self.models.append(CalibratedClassifierCV(base, method=self.calibration, cv=folds).fit(x, y))
        return self

    def predict_stage(self, k: int, features: np.ndarray) -> np.ndarray:
        """[n] predicted probability that stage k's answer is correct, from its [n, F] rows of FEATURES."""
        model = self.models[k]
        if isinstance(model, float):
            return np.full(features.shape[0], model)
        return model.predict_proba(features[:, self.columns])[:, 1]

    def predict(self, table: Table) -> np.ndarray:
        """[n, K] predicted probability that each stage's answer is correct."""
        return np.column_stack([self.predict_stage(k, table.features[:, k]) for k in range(table.stages)])


def expected_calibration_error(probabilities: np.ndarray, outcomes: np.ndarray, bins: int = 10) -> float:
    """Mean |confidence - accuracy| over equal-width probability bins, weighted by bin size."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(probabilities[index == b].mean() - outcomes[index == b].mean()) * (index == b).mean()
                     for b in range(bins) if (index == b).any()))


def predictor_quality(predicted: np.ndarray, table: Table) -> dict:
    """Per stage: AUROC, ECE and Brier score of the predicted correctness (AUROC None where one class only)."""
    from sklearn.metrics import brier_score_loss, roc_auc_score
    out = {}
    for k, rung in enumerate(table.rungs):
        y, p = table.correct[:, k].astype(int), predicted[:, k]
        out[rung] = {"auroc": float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None,
                     "ece": expected_calibration_error(p, y), "brier": float(brier_score_loss(y, p, pos_label=1)),
                     "accuracy": float(y.mean())}
    return out


# --- policies: each maps a table to the stage every query stops at ------------------------------------------------

@dataclass
class Outcome:
    """What a policy did on a table: per query, the stage whose answer it returned and what it paid."""
    stop: np.ndarray  # [n] stage index
    correct: np.ndarray  # [n] bool
    cost: np.ndarray  # [n] seconds (cascade: every stage run; router / fixed: the one model)

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def mean_cost(self) -> float:
        return float(self.cost.mean())

    def stage_usage(self, stages: int) -> list[float]:
        return [float((self.stop == k).mean()) for k in range(stages)]


def cascade_outcome(table: Table, stop: np.ndarray, with_samples: bool) -> Outcome:
    """A cascade stopping at `stop`: it ran (and pays for) stages 0..stop."""
    paid = np.cumsum(table.stage_cost(with_samples), axis=1)
    rows = np.arange(table.size)
    return Outcome(stop, table.correct[rows, stop], paid[rows, stop])


def routed_outcome(table: Table, choice: np.ndarray, with_samples: bool = False) -> Outcome:
    """Each query sent to one model only: it pays that model alone."""
    rows = np.arange(table.size)
    return Outcome(choice, table.correct[rows, choice], table.stage_cost(with_samples)[rows, choice])


def fixed(table: Table, stage: int) -> Outcome:
    return routed_outcome(table, np.full(table.size, stage))


def oracle(table: Table) -> tuple[Outcome, Outcome]:
    """The oracle as a cascade (stop at the first correct stage; none correct: at the first) and as a router (the
    cheapest correct model for this query; none correct: the cheapest model)."""
    first_correct = np.where(table.correct.any(axis=1), table.correct.argmax(axis=1), 0)
    cost = table.stage_cost(False)
    cheapest_correct = np.where(table.correct.any(axis=1), np.where(table.correct, cost, np.inf).argmin(axis=1),
                                cost.argmin(axis=1))
    return cascade_outcome(table, first_correct, False), routed_outcome(table, cheapest_correct)


def threshold_stops(scores: np.ndarray, thresholds) -> np.ndarray:
    """Stop at the first stage k < K-1 whose score is >= thresholds[k]; else at the last stage."""
    n, stages = scores.shape
    stop = np.full(n, stages - 1)
    undecided = np.ones(n, dtype=bool)
    for k, theta in enumerate(thresholds):
        here = undecided & (scores[:, k] >= theta)
        stop[here] = k
        undecided &= ~here
    return stop


def tune_thresholds(scores: np.ndarray, table: Table, lam: float, with_samples: bool,
                    grid_size: int = 12) -> tuple[float, ...]:
    """The threshold vector maximising mean(correct - lam * cost) on `table`, over every combination of
    `grid_size` score quantiles per stage (plus "never stop" and "always stop"): exact on the table."""
    candidates = [np.unique(np.concatenate([[-np.inf, np.inf], np.quantile(scores[:, k], np.linspace(0, 1, grid_size))]))
                  for k in range(table.stages - 1)]
    paid = np.cumsum(table.stage_cost(with_samples), axis=1)
    rows = np.arange(table.size)
    best, best_value = None, -np.inf
    for thresholds in itertools.product(*candidates):
        stop = threshold_stops(scores, thresholds)
        value = (table.correct[rows, stop] - lam * paid[rows, stop]).mean()
        if value > best_value + 1e-12:
            best, best_value = thresholds, value
    return tuple(float(t) for t in best)


def random_escalation(table: Table, mean_cost: float, with_samples: bool, seed: int) -> Outcome:
    """Escalate at each stage with one probability p, chosen (by bisection) so that the mean cascade cost matches
    `mean_cost` in expectation; one seeded draw per query and stage."""
    cost = table.stage_cost(with_samples).mean(axis=0)

    def expected(p):
        reach, total = 1.0, 0.0
        for k in range(table.stages):
            total += reach * cost[k]
            reach *= p
        return total
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if expected(mid) < mean_cost else (low, mid)
    uniforms = np.random.default_rng(seed).random((table.size, table.stages - 1))
    escalate = uniforms < (low + high) / 2
    stop = np.where(escalate.all(axis=1), table.stages - 1, np.argmin(escalate, axis=1))
    return cascade_outcome(table, stop, with_samples)
