"""Cascade policies as ablation cases, gated like every other ablation (the `cascade_case` fixture of
ablations/conftest.py).

A run collects a fresh table of the profile's first `ABLATION_QUERIES` queries per family (every rung, once per
process), replays every policy on it by the cross-fitted protocol (dflash.cascade.evaluate), and hands each case
its policy's per-query outcomes. A case is gated against its baseline entry paired over queries: accuracy by
the exact McNemar gate (`stats.accuracy_gate`, margin 1 point), cost by the paired gate on per-query "speedup
over the largest model" (its median query's cost over the query's, token-normalised and measured in the same
run), with the run's family correction and Holm. The invariants that hold mathematically are checked on every
run: the oracle is right wherever any policy is, and a fixed model's outcome is that model's own. With
`--report`, the run also gets this table's full cascade report (frontier, lam table, calibration, regret plots).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ..harness.case import OutcomesCase
from ..harness.profiles import DatasetSpec
from . import evaluate as ev
from .collect import collect, read_table
from .profiles import PROFILES, get_profile
from .replay import build_table, fixed

ABLATION_QUERIES = 50  # per family: the run and its baselines replay the same queries
ABLATION_LAMBDAS = (0.03, 0.1, 0.3)
_EVALUATIONS: dict[tuple[str, Path], tuple] = {}  # per process: (table, results by (policy, lam))


def evaluation(profile_name: str, directory: Path, report: bool = False):
    """The profile's table (collected once per process into `directory`) and every policy's replayed outcome.
    With `report`, the full cascade report of this table (every lam of the grid, plots) is written next to the
    run's summary, under cascade-<profile>[-<xdist worker>]/ (each worker process replays its own table)."""
    key = (profile_name, directory)
    if key not in _EVALUATIONS:
        profile = get_profile(profile_name)
        worker = os.environ.get("PYTEST_XDIST_WORKER")  # each process collects its own table
        suffix = f"{profile_name}-{worker}" if worker else profile_name
        path = collect(profile.queries(ABLATION_QUERIES), directory / f"cascade-table-{suffix}.jsonl", profile,
                       progress=False)
        table = build_table(read_table(path)[1], list(profile.rung_names)).token_normalised()
        results = ev.evaluate_policies(table, lambdas=ABLATION_LAMBDAS).results
        problems = ev.invariants(results)
        for k in range(table.stages):  # fixed-k is the stage itself
            mine = next(r for r in results if r.policy == f"fixed-{table.rungs[k]}")
            own = fixed(table, k)
            if not (np.array_equal(mine.correct, own.correct) and np.allclose(mine.cost, own.cost)):
                problems.append(f"fixed-{table.rungs[k]} differs from stage {k}'s own answers or cost")
        _EVALUATIONS[key] = (table, {(r.policy, r.lam): r for r in results}, problems)
        if report:
            from .report import write_report
            write_report(table, directory / f"cascade-{suffix}", provenance=read_table(path)[0])
    return _EVALUATIONS[key]


class CascadeCase(OutcomesCase):
    """One policy (at one lam) of a cascade profile: replayed outcomes, gates against the baseline (accuracy,
    and cost as per-query speedup over the largest model), the record."""
    family_dataset = DatasetSpec("ladder", "cascade", chat=False)
    display_name = "Adaptive cascades"

    def outcome(self, policy: str, lam: float | None):
        directory = Path(self.state.results(self.profile.name).path).parent
        table, results, problems = evaluation(self.profile.name, directory, self._option("report"))
        if problems:
            pytest.fail(f"{self.experiment_id}: replay invariants broken: " + "; ".join(problems), pytrace=False)
        if (policy, lam) not in results:
            pytest.fail(f"{self.experiment_id}: no policy {policy!r} at lam {lam} (known: "
                        f"{sorted({p for p, _ in results})})", pytrace=False)
        return table, results[(policy, lam)]

    def reference_batch(self) -> list[str]:
        """Every cascade case of this profile: they replay one table, which the A/B reference collects once."""
        return [nodeid for nodeid, info in self.state.collected.items()
                if info["ablation"] == self.ablation and info["profile"] == self.profile.name]

    def metrics(self, table, result) -> dict:
        return {"accuracy": result.accuracy, "mean_cost": result.mean_cost,
                "stage_usage": [float((result.stop == k).mean()) for k in range(table.stages)],
                "per_query": {"qids": list(table.qids), "correct": result.correct.astype(int).tolist(),
                              "cost": [float(c) for c in result.cost]}}


def cascade_profiles(names) -> list[str]:
    """The cascade profiles among a run's profiles (same name: `tiny`)."""
    return [name for name in names if name in PROFILES]
