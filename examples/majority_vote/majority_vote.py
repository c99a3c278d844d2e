"""Example ablation family: majority voting over m independent noisy answerers (a toy of self-consistency).

Every query has a right answer; each of m answerers is right with probability `p_right`, independently (one
seeded draw per query and answerer, so a run is reproducible), and the method answers with the majority (ties
count as wrong). It is not lossless, so it is an outcomes family: per-query correctness is gated against the
baseline with the exact McNemar test, and the cost (m answerer calls per query) is reported. This file is the
whole family: the method, its case, its table and its registration; test_majority_vote.py is its ablation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dflash.harness.case import OutcomesCase
from dflash.harness.family import FamilyParam, FamilySpec, register_family
from dflash.harness.render import mean_ci_cell, metrics_of, params_of, table, verdict_cell

QUERIES = 120


def vote(queries: int, m: int, p_right: float, seed: int = 0) -> np.ndarray:
    """1 where the majority of m answerers is right, per query."""
    right = np.random.default_rng(seed).random((queries, m)) < p_right
    return (right.sum(axis=1) * 2 > m).astype(int)


@dataclass(frozen=True)
class Toy:
    """The family's own profile: nothing to load, so always available."""
    queries: int = QUERIES

    def unavailable(self) -> str | None:
        return None


class VoteCase(OutcomesCase):
    dataset_name = "toy-queries"
    budget = None  # no tokens are decoded

    def measure(self, m: int, p_right: float) -> tuple[dict, list]:
        correct = vote(self.family_profile.queries, m, p_right)
        metrics = {"accuracy": float(correct.mean()),
                   "per_query": {"qids": [f"q{i}" for i in range(correct.size)], "correct": correct.tolist(),
                                 "cost": [float(m)] * correct.size}}
        return metrics, self.outcome_gates(metrics, speed=False)  # the cost is a count, not a timing


def vote_table(records: list[dict]) -> str:
    rows = [[r["id"].split("[")[-1].rstrip("]"), str(params_of(r)["m"]), f"{params_of(r)['p_right']:g}",
             mean_ci_cell(metrics_of(r)["per_query"]["correct"]), str(params_of(r)["m"]), verdict_cell(r)]
            for r in sorted(records, key=lambda r: params_of(r)["m"])]
    return table(["Case", "answerers m", "p(right) each", "accuracy [95% CI]", "calls per query", "Verdict"], rows,
                 [False, True, True, True, True, False])


register_family(FamilySpec(
    name="majority_vote", display_name="Majority vote (example)", fixture="vote_case",
    params=lambda profiles: [FamilyParam(name, name, name) for name in profiles if name == "tiny"],
    make_case=lambda request, state, family, param: VoteCase(request, state, state.profile(param.profile), family,
                                                             Toy()),
    renderers={"majority_vote": vote_table}, titles={"majority_vote": "Majority vote (example family)"},
    baseline_kind="outcomes", description="a toy non-lossless family: the worked example of adding one"))
