"""The cascade family's gates and storage: the exact McNemar accuracy gate (no alarm on unchanged outcomes,
detection of a real drop, the margin), cascade baseline entries (validated, round-tripped, diffed by accuracy),
records from a cascade run becoming baseline payloads, and the report's cascade table."""
import json

import numpy as np
import pytest

from dflash.harness import baselines
from dflash.harness.recording import baseline_payload
from dflash.cascade.report import cascade_table
from dflash.harness.runs import holm_over, record_problem
from dflash.harness.stats import IMPROVEMENT, PASS, REGRESSION, accuracy_gate

FINGERPRINT = {"hardware": "cpu", "torch": "2", "transformers": "5", "python": "3.11", "git_sha": "abc",
               "profile": "tiny", "seeds": None, "testbed": "cpu-a", "code": "abc"}
COST = [0.5, 1.2, 0.7]


def test_accuracy_gate_is_quiet_on_the_same_outcomes_and_detects_a_real_drop():
    rng = np.random.default_rng(0)
    base = rng.random(200) < 0.9
    assert accuracy_gate(base, base).verdict == PASS
    dropped = base.copy()
    dropped[np.flatnonzero(base)[:30]] = False  # 30 queries lost, none gained
    gate = accuracy_gate(base, dropped)
    assert gate.verdict == REGRESSION and gate.lost == 30 and gate.gained == 0 and gate.p_value < 1e-8
    assert accuracy_gate(dropped, base).verdict == IMPROVEMENT
    within = base.copy()
    within[np.flatnonzero(base)[:1]] = False  # one query: below the 1-point margin whatever p says
    assert accuracy_gate(base, within).verdict == PASS
    swapped = base.copy()  # as many lost as gained: no evidence of a change
    swapped[np.flatnonzero(base)[:10]] = False
    swapped[np.flatnonzero(~base)[:10]] = True
    assert accuracy_gate(base, swapped).verdict == PASS
    with pytest.raises(Exception, match="pairs queries"):
        accuracy_gate(base, base[:-1])


def cascade_entry(**over):
    entry = {"id": "cascade/test_cascade[tiny-router-lam0.1]", "kind": "outcomes",
             "per_query": {"qids": ["a", "b", "c"], "correct": [1, 0, 1]}, "code": "abc",
             "throughput": {"cpu-a": {"cost": COST, "fingerprint": FINGERPRINT, "code": "abc", "recorded": "now"}},
             "fingerprint": FINGERPRINT, "provenance": {"command": "test"}}
    entry.update(over)
    return entry


def write(tmp_path, cases):
    path = tmp_path / "tiny" / "cascade.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema_version": baselines.SCHEMA_VERSION, "profile": "tiny", "ablation": "cascade",
                                "cases": cases}))
    return path


def test_cascade_baseline_entries_are_validated_and_round_trip(tmp_path):
    path = write(tmp_path, [cascade_entry()])
    case = baselines.load_baselines(path).get("cascade/test_cascade[tiny-router-lam0.1]")
    assert case.kind == "outcomes" and case.per_query["correct"] == [1, 0, 1]
    assert case.headline == ("accuracy", pytest.approx(2 / 3), 3)
    assert case.to_json() == cascade_entry()
    for bad, words in [({"per_query": {"qids": ["a", "a"], "correct": [1, 0]}}, "distinct"),
                       ({"per_query": {"qids": ["a"], "correct": [2]}}, "one 0 or 1"),
                       ({"throughput": {"cpu-a": {"cost": [0.0], "fingerprint": {}, "code": "a", "recorded": "x"}}},
                        "positive number"),
                       ({"kind": "other"}, "kind must be")]:
        with pytest.raises(baselines.BaselineError, match=words):
            baselines.load_baselines(write(tmp_path, [cascade_entry(**bad)]))


def test_a_cascade_record_becomes_a_cascade_baseline_and_its_gates_reach_holm(tmp_path):
    gate = accuracy_gate([1, 1, 0], [1, 0, 0], case_id="x").to_dict()
    record = {"id": "cascade/test_cascade[tiny-router-lam0.1]", "profile": "tiny", "ablation": "cascade",
              "ablation_family": "cascade",
              "dataset": "ladder", "recording": True, "fingerprint": FINGERPRINT, "identity": "i", "gates": [gate],
              "params": {"policy": "router", "lam": 0.1}, "outcome": "passed", "failures": [],
              "metrics": {"per_query": {**cascade_entry()["per_query"], "cost": COST}, "stage_usage": [0, 0, 0.5, 0.5]}}
    assert record_problem(record) is None
    payload = baseline_payload(record)
    assert payload["kind"] == "outcomes" and payload["per_query"] == cascade_entry()["per_query"]
    assert payload["throughput"]["cpu-a"]["cost"] == COST
    diff = baselines.write_baseline_payloads(tmp_path, [payload])
    assert "accuracy 0.667, n=3" in diff
    adjusted = holm_over([record], family=4)
    assert adjusted[0]["kind"] == "accuracy" and adjusted[0]["p_adjusted"] >= gate["p_value"]
    table = cascade_table([record])
    assert "tiny-router-lam0.1" in table and "0% / 0% / 50% / 50%" in table


def test_the_run_table_is_collected_once_by_the_workers_together_with_one_report(tmp_path, monkeypatch):
    """Two workers (threads here: the locks are flock, per open file) ask for the run's table at once: they
    collect its parts side by side, the same rung at a time, each part once; both read one table in query order,
    with one report."""
    import threading
    from dataclasses import asdict, dataclass
    from types import SimpleNamespace

    from dflash.cascade import ablation, report
    from dflash.cascade.collect import StageRow
    from dflash.cascade.ladder_profile import CascadeProfile

    queries = [SimpleNamespace(qid=f"q{i}", family=("story", "expression")[i % 2], difficulty=1 + i % 3)
               for i in range(8)]

    @dataclass(frozen=True)
    class Fake(CascadeProfile):
        def queries(self, per_family=None):
            return queries

    profile = Fake("fake", "", (("l1", "/l1"), ("l2", "/l2")), 4, 8)
    collected, reports, both_collecting = [], [], threading.Barrier(2, timeout=30)

    def fake_collect(chosen, out, rung_profile, progress=True):
        if not out.exists():
            collected.append((out.parent.name, rung_profile.rung_names))
            if len(collected) <= 2:
                both_collecting.wait()  # the first two parts are collected side by side (or this times out)
            (rung,) = rung_profile.rung_names
            rows = [StageRow(q.qid, q.family, 1, rung, "7", 7, (int(q.qid[1:]) + len(rung)) % 3 > 0, [-0.1, -0.2],
                             [0.3, 0.1], 2, 0.01 * int(rung[1:])) for q in chosen]
            out.write_text(json.dumps({"models": {rung: "digest"}}) + "\n"
                           + "".join(json.dumps(asdict(row)) + "\n" for row in rows))
        return out

    def fake_report(table, folder, provenance=None):
        reports.append((folder, provenance))
        (folder / "summary.md").write_text("# report\n")
    monkeypatch.setattr(ablation, "collect", fake_collect)
    monkeypatch.setattr(report, "write_report", fake_report)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    tables = []
    workers = [threading.Thread(target=lambda: tables.append(ablation.run_table(profile, tmp_path, report=True)))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not both_collecting.broken and sorted(collected) == [
        ("l1-1-of-2", ("l1",)), ("l1-2-of-2", ("l1",)), ("l2-1-of-2", ("l2",)), ("l2-2-of-2", ("l2",))]
    assert collected[0][1] == collected[1][1] == ("l1",)  # side by side on the same rung first
    assert reports == [(tmp_path / "cascade-fake", {"models": {"l1": "digest", "l2": "digest"}})]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cascade-fake"]
    assert len(tables) == 2 and tables[0].qids == tables[1].qids == [q.qid for q in queries]
    assert np.array_equal(tables[0].greedy_s, tables[1].greedy_s)
