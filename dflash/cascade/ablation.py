"""Cascade policies as ablation cases, gated like every other ablation (the `cascade_case` fixture of the cascade
family, dflash.cascade.family).

A run collects a fresh table of the profile's first `ABLATION_QUERIES` queries per family (every rung, once per
run: the xdist workers share the collection and the table), replays every policy on it by the cross-fitted
protocol (dflash.cascade.evaluate), and hands each case its policy's per-query outcomes. A case is gated against
its baseline entry paired over queries: accuracy by the exact McNemar gate (`stats.accuracy_gate`, margin 1
point), with the run's family correction and Holm. Its cost (per-query "speedup over the largest model",
token-normalised, measured in the same run) is reported NOT GATED (`CascadeCase.cost_not_gated` says why). The
invariants that hold mathematically are checked on every run: the oracle is right wherever any policy is, and a
fixed model's outcome is that model's own. With `--report`, the run also gets this table's full cascade report
(frontier, lam table, calibration, regret plots), once, in cascade-<profile>/ of the run directory.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from ..harness.baselines import locked
from ..harness.case import OutcomesCase
from ..harness.fileio import atomic_write_text
from . import evaluate as ev
from .collect import collect, read_table
from .replay import build_table, fixed

ABLATION_QUERIES = 50  # per family: the run and its baselines replay the same queries
ABLATION_LAMBDAS = (0.03, 0.1, 0.3)
_EVALUATIONS: dict[tuple[str, Path], tuple] = {}  # per process: (table, results by (policy, lam), problems)


def table_parts(profile, folder: Path, queries: list) -> list[tuple[Path, object, list]]:
    """(folder, one-rung profile, queries) of each part of the run's table, rung by rung: a rung's queries are
    dealt into as many parts as the run has xdist workers (alike in family and difficulty, so in length), so
    workers collecting together run the same rung side by side, as each did when it collected a table of its own
    (the company the baselines' costs were measured in)."""
    share = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))
    dealt = sorted(queries, key=lambda q: (q.family, q.difficulty))  # every part gets every family and difficulty
    return [(folder / "parts" / f"{name}-{k + 1}-of-{share}", replace(profile, rungs=((name, location),)),
             dealt[k::share]) for name, location in profile.rungs for k in range(share)]


def run_table(profile, directory: Path, report: bool = False):
    """The run's table of the profile (token-normalised), collected once per run into `directory`/cascade-<profile>/
    and shared by the processes (xdist workers) that need it. It is collected in parts (`table_parts`), each by the
    first process to find it free (a lock per part), so the workers share the collection instead of each
    collecting all of it. Then the first process to get the folder's lock waits for every part (and finishes one
    that a stopped process left), joins them into table.jsonl in the order `collect` writes a table (rung by rung,
    queries in order) and, with `report`, writes this table's cascade report there (summary.md, every lam of the
    grid, plots): one table and one report per run. The others read table.jsonl."""
    folder = directory / f"cascade-{profile.name}"
    path, queries = folder / "table.jsonl", profile.queries(ABLATION_QUERIES)
    parts = table_parts(profile, folder, queries)
    if not path.exists():
        for part, rung, chosen in parts:
            with locked(part, wait=False) as free:
                if free is not None:  # None: another process is collecting this part
                    collect(chosen, part / "table.jsonl", rung, progress=False)
    with locked(folder):
        if not path.exists():
            headers, rows = [], []
            for part, rung, chosen in parts:
                with locked(part):
                    header, got = read_table(collect(chosen, part / "table.jsonl", rung, progress=False))
                headers.append(header)
                rows += got
            order = {query.qid: i for i, query in enumerate(queries)}
            rows.sort(key=lambda row: (profile.rung_names.index(row.rung), order[row.qid]))
            header = {**headers[0], "models": {k: v for h in headers for k, v in h["models"].items()}}
            atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in [header, *map(asdict, rows)]))
        header, rows = read_table(path)
        table = build_table(rows, list(profile.rung_names)).token_normalised()
        if report and not (folder / "summary.md").exists():
            from .report import write_report
            write_report(table, folder, provenance=header)
    return table


def evaluation(ladder, directory: Path, report: bool = False):
    """The ladder's run table (`run_table`) and every policy's replayed outcome, once per process."""
    key = (ladder.name, directory)
    if key not in _EVALUATIONS:
        table = run_table(ladder, directory, report)
        results = ev.evaluate_policies(table, lambdas=ABLATION_LAMBDAS).results
        problems = ev.invariants(results)
        for k in range(table.stages):  # fixed-k is the stage itself
            mine = next(r for r in results if r.policy == f"fixed-{table.rungs[k]}")
            own = fixed(table, k)
            if not (np.array_equal(mine.correct, own.correct) and np.allclose(mine.cost, own.cost)):
                problems.append(f"fixed-{table.rungs[k]} differs from stage {k}'s own answers or cost")
        _EVALUATIONS[key] = (table, {(r.policy, r.lam): r for r in results}, problems)
    return _EVALUATIONS[key]


class CascadeCase(OutcomesCase):
    """One policy (at one lam) of a cascade profile: replayed outcomes, gates against the baseline (accuracy,
    and cost as per-query speedup over the largest model), the record."""
    dataset_name = "ladder"
    cost_not_gated = ("a policy's per-query costs come from one per-rung cost model fitted to one table collection "
                      "(replay.Table.token_normalised), not from independent per-query measurements: two "
                      "collections of unchanged code on one machine differed by 9-12% at p < 1e-16 (measured "
                      "2026-12-07), so no per-query paired test of two tables is valid; accuracy is gated, cost "
                      "is reported")

    def outcome(self, policy: str, lam: float | None):
        directory = Path(self.state.results(self.profile.name).path).parent
        table, results, problems = evaluation(self.family_profile, directory, self._option("report"))
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

    def measure(self, policy: str, lam: float | None) -> tuple[dict, list]:
        """The policy's replayed outcomes on the run's table: metrics (accuracy, mean cost, stage usage, per-query
        correctness and cost) and the gates against the baseline."""
        table, result = self.outcome(policy, lam)
        metrics = {"accuracy": result.accuracy, "mean_cost": result.mean_cost,
                   "stage_usage": [float((result.stop == k).mean()) for k in range(table.stages)],
                   "per_query": {"qids": list(table.qids), "correct": result.correct.astype(int).tolist(),
                                 "cost": [float(c) for c in result.cost]}}
        return metrics, self.outcome_gates(metrics)
