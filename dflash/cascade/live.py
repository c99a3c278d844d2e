"""A live cascade: the ladder's models actually run one after another under a threshold policy's decisions.

It is the check on replay: on the same queries, the live cascade must stop where the replay of the collected
table stops, return the same answers, and pay what the table says the stages it ran cost (within timing noise:
wall seconds are measured again).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .collect import load_rung, run_stage
from .replay import StagePredictors, reply_features
from .tasks import Query


@dataclass
class LiveResult:
    qid: str
    stop: int  # the stage whose answer was returned
    answer: int | None
    correct: bool
    cost_s: float  # wall seconds of every stage run (and its samples when the predictors read them)
    new_tokens: int  # greedy tokens generated over every stage run


def run_live(queries: list[Query], predictors: StagePredictors, thresholds, profile) -> list[LiveResult]:
    """Run the cascade "stop at the first stage k < K-1 with q_k(h_k) >= thresholds[k]" on each query."""
    models = {name: load_rung(profile, location) for name, location in profile.rungs}
    with_samples = predictors.reads_samples
    results = []
    for query in queries:
        previous, cost, tokens = None, 0.0, 0
        for k, (name, _) in enumerate(profile.rungs):
            model, tokenizer = models[name]
            row = run_stage(model, tokenizer, query, name, max_new_tokens=profile.max_new_tokens,
                            with_samples=with_samples)
            cost += row.greedy_s + (row.sample_s if with_samples else 0.0)
            tokens += row.new_tokens
            last = k == len(profile.rungs) - 1
            if not last:
                quality = float(predictors.predict_stage(k, np.array([reply_features(row, previous)]))[0])
                if quality >= thresholds[k]:
                    last = True
            if last:
                results.append(LiveResult(query.qid, k, row.answer, row.correct, cost, tokens))
                break
            previous = row
    return results

