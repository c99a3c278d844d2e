"""Baseline files (validation, atomic writes, diffs) and the JSONL results file (resume, concurrency)."""
import json
import multiprocessing
import os

import pytest

from dflash.errors import DFlashError
from dflash.harness import fileio
from dflash.harness.baselines import (SCHEMA_VERSION, BaselineError, baseline_path, load_baselines,
                                      write_baselines)
from dflash.harness.results import ResultsFile, ResultsFileError, latest_by_id, load

FINGERPRINT = {"hardware": "cpu x86_64, 2 cores", "torch": "2.13.0", "transformers": "5.23.0",
               "python": "3.11.9", "git_sha": "abc1234", "profile": "cpu-tiny", "seeds": [0, 1, 2]}


TESTBED = "cpu-genuineintel-6.207.2.f94a4a-avx512-2c-1t"


def case(case_id, taus, **extra):
    return {"id": case_id, "per_prompt_tau": taus, "counters": {"drafts": 10, "accepted": 32}, "code": "abc1234",
            "throughput": {TESTBED: {"speedup_samples": [1.5, 1.6], "fingerprint": dict(FINGERPRINT),
                                     "code": "abc1234", "recorded": "2026-02-18"}},
            "fingerprint": dict(FINGERPRINT),
            "provenance": {"command": "pytest --update-baselines", "date": "2026-02-18"}, **extra}


def document(*cases, profile="cpu-tiny", ablation="block_size", version=SCHEMA_VERSION):
    return {"schema_version": version, "profile": profile, "ablation": ablation, "cases": list(cases)}


@pytest.fixture
def path(tmp_path):
    return baseline_path(tmp_path, "cpu-tiny", "block_size")


def dump(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)


# --- baselines: round trip and diff ----------------------------------------------------------------

def test_write_then_load_round_trip_and_diffs(path):
    first = write_baselines(path, document(case("bs=8", [5.0, 5.5, 6.0]), case("bs=4", [3.0, 3.5, 4.0])))
    assert "new file with 2 case(s)" in first and "+ bs=8 (tau 5.500, n=3)" in first
    loaded = load_baselines(path, n_prompts=3)
    assert sorted(loaded.cases) == ["bs=4", "bs=8"] and loaded.get("bs=8").tau_mean == pytest.approx(5.5)
    assert loaded.get("bs=16") is None

    reference = {"tau": 6.5, "source": "DFlash paper, Table 1"}
    diff = write_baselines(path, document(case("bs=8", [4.5, 5.0, 5.5]), case("bs=16", [7.0, 7.5, 8.0],
                                                                              reference=reference)))
    assert "+ bs=16" in diff and "- bs=4" in diff and "~ bs=8: tau mean 5.500 -> 5.000 (-9.1%)" in diff
    assert load_baselines(path).get("bs=16").reference == reference
    assert write_baselines(path, load_baselines(path)).endswith("no changes")


def test_written_file_is_stable_sorted_json(path):
    write_baselines(path, document(case("b", [1.0]), case("a", [2.0])))
    text = path.read_text()
    assert text.endswith("\n") and [c["id"] for c in json.loads(text)["cases"]] == ["a", "b"]


# --- baselines: atomic writes --------------------------------------------------------------------

def test_failed_rename_leaves_the_old_file_intact(path, monkeypatch):
    write_baselines(path, document(case("bs=8", [5.0, 5.5])))
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(fileio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated"):
        write_baselines(path, document(case("bs=8", [1.0, 1.0])))
    assert path.read_text() == before
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_write_dying_midway_leaves_the_old_file_intact(path, monkeypatch):
    write_baselines(path, document(case("bs=8", [5.0, 5.5])))
    before = path.read_text()
    real_fsync = os.fsync

    def fsync_after_partial_write(fd):
        os.ftruncate(fd, 10)  # the temp file holds a fragment, as after a crash mid-write
        raise OSError("killed mid-write (simulated)")

    monkeypatch.setattr(fileio.os, "fsync", fsync_after_partial_write)
    with pytest.raises(OSError, match="mid-write"):
        write_baselines(path, document(case("bs=8", [1.0, 1.0]), case("bs=4", [2.0, 2.0])))
    monkeypatch.setattr(fileio.os, "fsync", real_fsync)
    assert path.read_text() == before and load_baselines(path).get("bs=4") is None
    assert list(path.parent.iterdir()) == [path]


def test_invalid_data_is_never_written(path):
    with pytest.raises(BaselineError, match=r"Refusing to write .*block_size\.json.*missing field\(s\) provenance"):
        bad = case("bs=8", [5.0])
        del bad["provenance"]
        write_baselines(path, document(bad))
    assert not path.exists()


# --- baselines: clear errors ---------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ("{not json", r"invalid JSON at line 1"),
    (document(case("bs=8", [5.0]), version=99), r"schema_version is 99, this code reads version 2"),
    (document({"id": "bs=8", "per_prompt_tau": [5.0]}),
     r"case 'bs=8' is missing field\(s\) counters, code, throughput, fingerprint, provenance"),
    (document(case("bs=8", [5.0], throughput={TESTBED: {"speedup_samples": [1.0, -2.0], "fingerprint": {},
                                                        "code": "a", "recorded": "x"}})),
     r"throughput\['cpu-genuineintel\S+'\]\.speedup_samples must be a list of positive numbers"),
    (document(case("bs=8", [5.0], throughput={TESTBED: {"speedup_samples": [1.0]}})),
     r"throughput\['cpu-genuineintel\S+'\] must be an object with speedup_samples, fingerprint, code, recorded"),
    (document(case("bs=8", [5.0]), profile="a100-qwen3-8b"), r"profile is 'a100-qwen3-8b' but the file lies at"),
    (document(case("bs=8", [5.0]), ablation="temperature"), r"ablation is 'temperature' but the file lies at"),
    (document(case("bs=8", []), case("bs=8", [1.0])), r"per_prompt_tau must be a non-empty.*duplicate case id"),
    (document(case("bs=8", [5.0], reference={"tau": 6.5})), r"reference must be an object with a non-empty 'source'"),
    (document(case("bs=8", [5.0], fingerprint={"hardware": "x"})), r"fingerprint is missing torch, transformers"),
])
def test_bad_files_give_errors_naming_the_file(path, content, message):
    dump(path, content)
    with pytest.raises(BaselineError, match=message) as error:
        load_baselines(path)
    assert str(path) in str(error.value) and isinstance(error.value, DFlashError)


def test_profile_and_ablation_of_the_current_run_are_checked(path):
    dump(path, document(case("bs=8", [5.0])))
    with pytest.raises(BaselineError, match=r"profile is 'cpu-tiny' but the current run expects 'a100'"):
        load_baselines(path, profile="a100")
    with pytest.raises(BaselineError, match=r"ablation is 'block_size' but the current run expects 'temp'"):
        load_baselines(path, ablation="temp")


def test_per_prompt_length_mismatch_with_the_current_case(path):
    dump(path, document(case("bs=8", [5.0, 5.5, 6.0]), case("bs=4", [3.0, 3.5])))
    with pytest.raises(BaselineError, match=r"block_size\.json.*case 'bs=8' has 3 per-prompt taus but the "
                                            r"current case runs 2 prompts"):
        load_baselines(path, n_prompts={"bs=8": 2, "bs=4": 2})
    assert load_baselines(path, n_prompts={"bs=4": 2}).get("bs=4")  # cases not named are not checked


def test_missing_file_says_how_to_create_it(path):
    with pytest.raises(BaselineError, match="does not exist.*--update-baselines"):
        load_baselines(path)


# --- results JSONL -------------------------------------------------------------------------------

def test_append_and_resume_ids(tmp_path):
    results = ResultsFile(tmp_path / "run" / "results.jsonl")
    results.append({"id": "bs=4", "metrics": {"tau": 3.4}})
    results.append({"id": "bs=8", "metrics": {"tau": 5.4}})
    results.append({"id": "bs=4", "metrics": {"tau": 3.5}})  # a rerun supersedes
    assert results.completed_ids() == {"bs=4", "bs=8"}
    assert latest_by_id(results.load())["bs=4"]["metrics"]["tau"] == 3.5
    with pytest.raises(DFlashError, match="non-empty string 'id'"):
        results.append({"metrics": {}})


def test_truncated_last_line_is_ignored_then_cut_before_the_next_append(tmp_path):
    path = tmp_path / "results.jsonl"
    results = ResultsFile(path)
    results.append({"id": "a"})
    results.append({"id": "b"})
    with open(path, "ab") as handle:  # a run killed while writing case "c"
        handle.write(b'{"id": "c", "metri')
    with pytest.warns(UserWarning, match="truncated last line"):
        assert results.completed_ids() == {"a", "b"}
    with pytest.warns(UserWarning, match="dropping a truncated last line"):
        results.append({"id": "c"})
    assert [r["id"] for r in load(path)] == ["a", "b", "c"]  # valid again, no warning


def test_corrupt_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "a"}\n{"id": broken}\n{"id": "c"}\n')
    with pytest.raises(ResultsFileError, match=r"results\.jsonl, line 2"):
        ResultsFile(path).completed_ids()


def test_missing_results_file_has_no_records(tmp_path):
    assert ResultsFile(tmp_path / "none.jsonl").completed_ids() == set()


def _append_many(path, worker, count):
    results = ResultsFile(path)
    for i in range(count):
        results.append({"id": f"w{worker}-{i}", "payload": "x" * (i % 7) * 500})


def test_concurrent_appends_from_two_processes_lose_nothing(tmp_path):
    path = tmp_path / "results.jsonl"
    # fork: the children reuse the already imported modules (a fresh interpreter would import torch again).
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(path, w, 150)) for w in range(2)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)
        assert process.exitcode == 0
    records = load(path)
    assert len(records) == 300
    assert {r["id"] for r in records} == {f"w{w}-{i}" for w in range(2) for i in range(150)}


def test_baselines_recovered_from_a_killed_recording_run(tmp_path):
    """`dflash baselines --from-run`: the finished cases of a killed --update-baselines run become baselines,
    shown as a diff first and written only with write=True; failed cases are left out; a run that was not a
    recording (no --update-baselines, an overridden draft, no run.json) or a record of another run is refused."""
    import json as json_

    from dflash.errors import DFlashError
    from dflash.harness.recording import baselines_from_run
    from dflash.harness.runs import RUN_FILE, identity_digest
    from dflash.harness.results import ResultsFile

    identity = {"profile": "tiny", "target": "tiny", "draft": "tiny", "overrides": [], "code": "abc",
                "options": {"update_baselines": True}}

    def record(case_id, taus, outcome="passed", of=identity):
        return {"id": case_id, "ablation": "block_size", "ablation_family": "decode", "profile": "tiny", "dataset": "math",
                "metrics": {"per_prompt_tau": taus, "speedup_samples": [1.5] * len(taus), "cycles": 9},
                "outcome": outcome, "recording": of["options"]["update_baselines"], "identity": identity_digest(of),
                "fingerprint": {"hardware": "cpu", "torch": "2", "transformers": "5", "python": "3", "git_sha": "0",
                                "profile": "tiny", "seeds": {}, "testbed": "cpu-a", "code": "0" * 40}}
    run = tmp_path / "reports" / "tiny-1"
    run.mkdir(parents=True)
    (run / RUN_FILE).write_text(json_.dumps(identity))
    ResultsFile(run / "results.jsonl").append(record("block_size/a", [2.0] * 48))
    ResultsFile(run / "results.jsonl").append(record("block_size/lost", [1.0] * 48, outcome="failed"))
    stored = tmp_path / "baselines" / "tiny" / "block_size.json"
    preview = baselines_from_run(run, tmp_path / "baselines")
    assert "+ block_size/a" in preview and "left out (failed cases): block_size/lost" in preview
    assert not stored.exists()  # a preview writes nothing
    baselines_from_run(run, tmp_path / "baselines", write=True)
    saved = json_.loads(stored.read_text())
    assert [c["id"] for c in saved["cases"]] == ["block_size/a"]
    assert "recovered from" in saved["cases"][0]["provenance"]["command"]

    gated_run = {**identity, "options": {"update_baselines": False}}
    (run / RUN_FILE).write_text(json_.dumps(gated_run))
    with pytest.raises(DFlashError, match="not a baseline recording"):
        baselines_from_run(run, tmp_path / "baselines")
    (run / RUN_FILE).write_text(json_.dumps({**identity, "overrides": ["draft"], "draft": "/tmp/perturbed"}))
    with pytest.raises(DFlashError, match="overrode the profile's draft"):
        baselines_from_run(run, tmp_path / "baselines")
    (run / RUN_FILE).write_text(json_.dumps(identity))
    ResultsFile(run / "results.jsonl").append(record("block_size/b", [2.0] * 12, of=gated_run))
    with pytest.raises(DFlashError, match="not recorded by this run's recording"):
        baselines_from_run(run, tmp_path / "baselines")
    (run / RUN_FILE).unlink()
    with pytest.raises(DFlashError, match="no readable run.json"):
        baselines_from_run(run, tmp_path / "baselines")
    with pytest.raises(DFlashError, match="does not exist"):
        baselines_from_run(tmp_path / "nowhere", tmp_path / "baselines")


def test_recording_on_another_testbed_keeps_every_testbeds_throughput(tmp_path):
    """--update-baselines replaces the case's tau part and only the recording testbed's throughput: a second
    machine's recording adds its own samples beside the first machine's, and re-recording one testbed with the
    same taus leaves the other as it was; once the case's taus change, the other testbed's timings describe other
    work and are dropped, saying so. The tau part gates on every testbed."""
    from dflash.harness.baselines import write_baseline_payloads

    def payload(testbed, samples, taus):
        entry = {"speedup_samples": samples, "fingerprint": dict(FINGERPRINT), "code": "abc1234", "recorded": "now"}
        return {**case("bs=8", taus, throughput={testbed: entry}), "profile": "cpu-tiny", "ablation": "block_size"}
    write_baseline_payloads(tmp_path, [payload("cpu-a", [1.5, 1.6], [5.0, 6.0])])
    write_baseline_payloads(tmp_path, [payload("cpu-b", [1.1, 1.2], [5.0, 6.0])])
    stored = load_baselines(baseline_path(tmp_path, "cpu-tiny", "block_size")).get("bs=8")
    assert stored.samples_on("cpu-a") == [1.5, 1.6] and stored.samples_on("cpu-b") == [1.1, 1.2]
    assert stored.samples_on("cpu-c") is None
    diff = write_baseline_payloads(tmp_path, [payload("cpu-b", [1.3, 1.4], [5.0, 6.0])])
    assert "changed: throughput on cpu-b" in diff and "cpu-a" not in diff
    stored = load_baselines(baseline_path(tmp_path, "cpu-tiny", "block_size")).get("bs=8")
    assert stored.samples_on("cpu-a") == [1.5, 1.6] and stored.samples_on("cpu-b") == [1.3, 1.4]
    diff = write_baseline_payloads(tmp_path, [payload("cpu-b", [1.2, 1.3], [5.0, 7.0])])
    assert "throughput dropped (the case's recorded behaviour changed" in diff and "bs=8 on cpu-a" in diff
    stored = load_baselines(baseline_path(tmp_path, "cpu-tiny", "block_size")).get("bs=8")
    assert stored.samples_on("cpu-a") is None and stored.samples_on("cpu-b") == [1.2, 1.3]
    assert stored.per_prompt_tau == [5.0, 7.0]


def test_an_entry_recorded_from_uncommitted_changes_is_not_reproducible(path):
    write_baselines(path, document(case("clean", [1.0]), case("dirty", [1.0], code="abc1234+0123456789ab")))
    loaded = load_baselines(path)
    assert loaded.get("clean").reproducible and not loaded.get("dirty").reproducible


def test_committed_baselines_keep_their_testbed_independent_part_once():
    """Every committed entry: taus (or per-query correctness) once, throughput per testbed, a code ref."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "baselines"
    for file in sorted(root.glob("*/*.json")):
        for entry in load_baselines(file).cases.values():
            assert entry.throughput and entry.code, (file, entry.id)
