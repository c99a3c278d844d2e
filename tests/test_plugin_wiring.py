"""End-to-end wiring of the ablation plugin (dflash/harness/plugin.py), run the way a developer or CI runs it.

`tests/test_harness_stats.py` and `tests/test_harness_storage.py` prove the pieces (the gates, Holm, the baseline
and results files) in isolation. What they cannot show is that the plugin *connects* them: that a planted tau
drop really fails its case with a readable message, that a missing baseline fails under CI and is listed
elsewhere, that the family fixed at collection feeds the session-end Holm and the exit status, that gathering
more prompts runs only the new ones, that `--resume` re-applies recorded verdicts and refuses a run of another
identity, that a throughput regression is confirmed by a re-measurement before it fails, that
`--update-baselines --resume` writes the union, the INCOMPLETE line and banner, and a broken baseline file.

Each of those is a property of a whole pytest session (options, collection, fixtures, hooks, exit status,
terminal summary), so each test builds a small ablation project in pytester's temporary directory (a conftest
loading the plugin, one ablation file using the real `case` fixture on the tiny profile with the embedded
models, `-k math` so one dataset runs) and runs pytest sessions on it with `pytester.runpytest`. Every run
writes into that directory only (`--reports-dir reports --baselines-dir baselines` resolve against the inner
rootdir, pinned by an empty pytest.ini), never into the repository's reports/ or baselines/.

By default the inner sessions run in-process: each gets a fresh Config (so a fresh config.stash, RunState,
family and loaded models), and pytester restores sys.modules afterwards, so the generated test module (and the
counters in it) is imported afresh by every run; nothing the tests assert is read from the inner process' memory,
only from its exit status, terminal output and files. `pytest -p pytester --runpytest=subprocess
tests/test_plugin_wiring.py` runs every inner session in its own interpreter instead, with the same assertions
(about 6x slower: each fresh interpreter spends ~7 s importing torch and transformers).

Planted changes are driven by environment variables the ablation file reads: WIRE_BS (the block size: 8 when
recording, 2 when checking is a large tau drop), WIRE_SLOW (a slowdown) and WIRE_LOG (a file where the variant
logs every run as prompt index = seed and token budget). The slowdown doubles the CPU time a real decode
reports: the tiny profile gates speedups on the CPU clock measured *inside* `engine.generate`, so burning CPU
(let alone sleeping) around the call in `Variant.run` would not register at all.

A case whose prompts_cap is below the profile's prompt count records and gates the same prompts. The last two
tests are unit-level (run directories created in the same second, concurrent baseline writers).
pytester is enabled by this module's `pytest_plugins` (allowed in test modules; only non-root conftest files may
not declare plugins), so the root conftest needs no change.
"""
import json
import multiprocessing
import re
import shutil
import types
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from dflash.harness import runs
from dflash.harness.baselines import SCHEMA_VERSION, load_baselines, write_baseline_payloads
from dflash.harness.case import NO_BASELINE
from dflash.harness.runs import SEEDS
from dflash.harness.results import latest_by_id, load
from dflash.harness.stats import tau_gate
from dflash.loading import PACKAGE_MODELS

pytest_plugins = ["pytester"]

BASE_ARGS = ("-p", "no:xdist", "-p", "no:cacheprovider", "-p", "no:randomly", "-ra", "--profile", "tiny",
             "--reports-dir", "reports", "--baselines-dir", "baselines")

CONFTEST = """
import torch

torch.set_num_threads(1)

pytest_plugins = ["dflash.plugin"]
"""

# Shared head of every generated ablation file: a real DFlash decode with a planted change and a call log.
PREAMBLE = '''
import dataclasses
import json
import os

import pytest

from dflash.harness.measure import Variant
from dflash.harness.stats import tau_gate

FULL_RUNS_OF_PROMPT_0 = {}  # variant name -> measured (not warm-up) runs of prompt 0 in this session


@dataclasses.dataclass(frozen=True)
class Planted(Variant):
    """A real decode. Logs every run to $WIRE_LOG as {variant, seed (= prompt index), max_new_tokens}. With
    $WIRE_SLOW set and slow="always" (or "first": only until prompt 0 is measured a second time, i.e. the first
    measurement of the case but not its re-measurement) it reports four times the time the decode took."""
    slow: str = ""

    def run(self, models, prompt, max_new_tokens, stop_ids, seed):
        result = super().run(models, prompt, max_new_tokens, stop_ids, seed)
        measured = max_new_tokens != 16  # measure.warm_up runs every variant once with 16 tokens, seed 0
        if measured and seed == 0:
            FULL_RUNS_OF_PROMPT_0[self.name] = FULL_RUNS_OF_PROMPT_0.get(self.name, 0) + 1
        if os.environ.get("WIRE_LOG"):
            with open(os.environ["WIRE_LOG"], "a") as log:
                log.write(json.dumps({"variant": self.name, "seed": seed, "max_new_tokens": max_new_tokens}) + "\\n")
        slow = os.environ.get("WIRE_SLOW") and (
            self.slow == "always" or self.slow == "first" and FULL_RUNS_OF_PROMPT_0.get(self.name, 0) <= 1)
        if measured and slow:
            result = dataclasses.replace(result, cpu_s=4.0 * result.cpu_s, wall_s=4.0 * result.wall_s)
        return result


def planted(default=8, slow=""):
    block_size = int(os.environ.get("WIRE_BS", default))
    return Planted(f"bs={block_size}", block_size=block_size, slow=slow), {"block_size": block_size}


def measured_case(case, slow=""):
    variant, params = planted(slow=slow)
    _, metrics, gates = case.measure(variant)
    return case.finish(params, metrics, gates)
'''

# Hand-built per-prompt taus for the cases that only exercise the wiring after measurement (`case.finish`).
BASE_TAUS = [4.0 + 0.25 * i for i in range(12)]
SMALL_DROP = [t * 0.99 for t in BASE_TAUS]  # -1%: inside the 3% margin, yet p = 1/4096 (all 12 prompts drop)
MODERATE_DROP = [t + 3.3 if i == 10 else t - 0.3 * (i + 1) for i, t in enumerate(BASE_TAUS)]  # -26%, p ~ 0.013
LARGE_DROP = [t * 0.5 for t in BASE_TAUS]


def case_id(test: str, params: str = "tiny-math") -> str:
    return f"wire/{test}[{params}]"


@pytest.fixture
def wire(pytester, monkeypatch):
    """A pytester project with the plugin loaded; none of the variables that steer the inner runs leak in
    (CI would fail unbaselined cases, GITHUB_STEP_SUMMARY would receive the inner --report summaries)."""
    for name in ("CI", "GITHUB_STEP_SUMMARY", "WIRE_BS", "WIRE_LOG", "WIRE_SLOW", "PYTEST_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    pytester.makefile(".ini", pytest="[pytest]\n")  # pins the inner rootdir: reports/, baselines/ land here
    pytester.makeconftest(CONFTEST)
    return pytester


def ablation_file(pytester, body: str) -> None:
    pytester.makepyfile(test_wire=PREAMBLE + "\n\n" + body)


def run(pytester, *args, k: str = "math"):
    """One inner pytest session (in-process, or a subprocess under `-p pytester --runpytest=subprocess`)."""
    return pytester.runpytest(*BASE_ARGS, "-k", k, *args)


def output(result) -> str:
    return result.stdout.str() + "\n" + result.stderr.str()


def run_dirs(pytester) -> list[Path]:
    return sorted(p for p in (pytester.path / "reports").glob("tiny-*") if p.is_dir())


def latest_records(pytester) -> dict[str, dict]:
    return latest_by_id(load(run_dirs(pytester)[-1] / "results.jsonl"))


def gate_of(record: dict, kind: str) -> dict:
    (gate,) = [g for g in record["gates"] if g["kind"] == kind]
    return gate


def baseline_file(pytester) -> Path:
    return pytester.path / "baselines" / "tiny" / "wire.json"


def logged_calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- 1. a planted tau drop fails its case ----------------------------------------------------------------

def test_planted_tau_drop_fails_the_case_naming_baseline_new_value_and_p(wire, monkeypatch):
    ablation_file(wire, '''
@pytest.mark.ablation("wire", prompts_cap=12)
def test_drop(case):
    measured_case(case)
''')
    monkeypatch.setenv("WIRE_BS", "8")
    recorded = run(wire, "--update-baselines")
    assert recorded.ret == 0, output(recorded)
    recorded.assert_outcomes(passed=1)
    baseline = load_baselines(baseline_file(wire)).get(case_id("test_drop"))
    assert baseline is not None and len(baseline.per_prompt_tau) == 12

    monkeypatch.setenv("WIRE_BS", "2")  # draft blocks of 2 accept at most 2 tokens a cycle: tau drops a lot
    gated = run(wire)
    assert gated.ret == 1, output(gated)
    gated.assert_outcomes(failed=1)
    message = re.search(re.escape(case_id("test_drop")) + r": tau regression: baseline (\d+\.\d{3}) -> new "
                        r"(\d+\.\d{3}) \(([-+]\d+\.\d)%\), one-sided p = (\S+)(?: \([^)]*\))? "
                        r"\(x2 gates = (\S+) < 0\.05\)", gated.stdout.str())
    assert message, output(gated)
    base, new, change, p, corrected = message.groups()
    tau = gate_of(latest_records(wire)[case_id("test_drop")], "tau")
    assert base == f"{baseline.tau_mean:.3f}" == f"{tau['baseline']:.3f}"
    assert new == f"{tau['new']:.3f}" and float(new) < 0.7 * float(base) and float(change) < -30
    assert float(p) == pytest.approx(tau["p_value"], rel=1e-2) and float(corrected) < 0.05


# --- 2. a missing baseline ---------------------------------------------------------------------------------

def test_missing_baseline_fails_under_ci_and_is_listed_elsewhere(wire, monkeypatch):
    ablation_file(wire, '''
@pytest.mark.ablation("wire", prompts_cap=12)
def test_unbaselined(case):
    measured_case(case)
''')
    monkeypatch.setenv("CI", "true")
    in_ci = run(wire)
    assert in_ci.ret == 1, output(in_ci)
    in_ci.assert_outcomes(failed=1)
    assert re.search(re.escape(case_id("test_unbaselined")) + r": no baseline entry in \S*baselines/tiny/wire\.json"
                     r", so this case would not be gated\. Record one with `pytest .*--update-baselines`",
                     in_ci.stdout.str()), output(in_ci)

    monkeypatch.setenv("CI", "")  # set but empty: not CI
    elsewhere = run(wire)
    assert elsewhere.ret == 0, output(elsewhere)
    elsewhere.assert_outcomes(passed=1)
    elsewhere.stdout.fnmatch_lines(["*dflash: NO BASELINE (these cases were not gated)*",
                                    "NO BASELINE  " + case_id("test_unbaselined").replace("[", "[[]"),
                                    "record them with --update-baselines (under CI these cases fail)"])
    assert latest_records(wire)[case_id("test_unbaselined")]["verdict"] == NO_BASELINE


# --- 3. the session-end Holm fails a run whose cases all passed ---------------------------------------------

def test_session_end_holm_fails_a_run_whose_cases_all_passed(wire):
    family = 4  # two gated cases, two gates each (the throughput gates did not run: they count with p = 1)
    small, moderate = tau_gate(BASE_TAUS, SMALL_DROP), tau_gate(BASE_TAUS, MODERATE_DROP)
    assert small.verdict == "pass" and small.p_value * family < 0.05  # significant, but inside the margin
    assert moderate.verdict == "regression" and (family - 1) * moderate.p_value < 0.05 <= family * moderate.p_value
    ablation_file(wire, f'''
NEW = {{"small": {SMALL_DROP!r}, "moderate": {MODERATE_DROP!r}}}


@pytest.mark.ablation("wire")
@pytest.mark.parametrize("drop", ["small", "moderate"])
def test_holm(case, drop):
    gate = tau_gate({BASE_TAUS!r}, NEW[drop], margin=0.03, alpha=0.05, case_id=case.experiment_id)
    case.finish({{"drop": drop}}, {{"per_prompt_tau": NEW[drop]}}, [gate])
''')
    result = run(wire)
    result.assert_outcomes(passed=2)  # per case: Bonferroni over the family of 4 lets both through
    assert result.ret == 1, output(result)  # Holm's step-down over the run rejects the moderate drop
    text = result.stdout.str()
    assert f"dflash gates (Holm over the run's {family} gates)" in text
    line = re.search(r"^\s*regression\s+tau\s+wire/test_holm\[[^\]]*moderate[^\]]*\]: .*, Holm (\S+)$", text, re.M)
    assert line and float(line.group(1)) == pytest.approx(3 * moderate.p_value, rel=1e-2), text
    assert re.search(r"^\s*pass\s+tau\s+wire/test_holm\[[^\]]*small[^\]]*\]:", text, re.M), text


# --- 4. gathering more prompts runs only the new ones -----------------------------------------------------

def test_gathering_more_prompts_runs_each_prompt_once(wire, monkeypatch):
    ablation_file(wire, '''
@pytest.mark.ablation("wire", prompts_cap=24)
def test_gather(case):
    measured_case(case)
''')
    monkeypatch.setenv("WIRE_BS", "8")
    recorded = run(wire, "--update-baselines")
    assert recorded.ret == 0, output(recorded)
    # Looks at 12 and 24 prompts. At 12 even the smallest Wilcoxon p (all 12 prompts drop: 1/4096), times the
    # family of 2, exceeds alpha = 1e-4, whatever share of alpha the first look may spend: a large drop is
    # inconclusive there, so the case must gather prompts 12..23. The throughput factor keeps its gate from
    # re-measuring (which would run prompts 0..23 again).
    assert 2 / 4096 > 1e-4
    monkeypatch.setenv("WIRE_BS", "2")
    monkeypatch.setenv("WIRE_LOG", str(wire.path / "calls.jsonl"))
    gated = run(wire, "--gate-alpha", "1e-4", "--throughput-factor", "1000")
    assert gated.ret in (0, 1), output(gated)
    calls = logged_calls(wire.path / "calls.jsonl")
    warm_ups = [c for c in calls if c["max_new_tokens"] == 16]
    measured = Counter(c["seed"] for c in calls if c["max_new_tokens"] != 16)
    assert [c["seed"] for c in warm_ups] == [0]
    assert measured == Counter(range(24)), measured
    tau = gate_of(latest_records(wire)[case_id("test_gather")], "tau")
    assert tau["n_new"] == 24 and tau["n_baseline"] == 24 and tau["alpha"] == 1e-4


# --- 5. --resume ------------------------------------------------------------------------------------------

RESUME_CASES = f'''
def _ran(name):
    with open(os.environ["WIRE_LOG"], "a") as log:
        log.write(name + "\\n")


@pytest.mark.ablation("wire")
def test_ok(case):
    _ran("ok")
    taus = {BASE_TAUS!r}
    case.finish({{}}, {{"per_prompt_tau": taus}}, [tau_gate(taus, taus, case_id=case.experiment_id)])


@pytest.mark.ablation("wire")
def test_tau_drop(case):
    _ran("tau_drop")
    gate = tau_gate({BASE_TAUS!r}, {LARGE_DROP!r}, case_id=case.experiment_id)
    case.finish({{}}, {{"per_prompt_tau": {LARGE_DROP!r}}}, [gate])
'''


def test_resume_skips_recorded_cases_and_reapplies_a_recorded_failure(wire, monkeypatch):
    ablation_file(wire, RESUME_CASES)
    log = wire.path / "ran.txt"
    monkeypatch.setenv("WIRE_LOG", str(log))
    only_ok = "test_ok and math"
    first = run(wire, k=only_ok)
    assert first.ret == 0, output(first)
    first.assert_outcomes(passed=1)

    resumed = run(wire, "--resume", k=only_ok)
    assert resumed.ret == 0, output(resumed)
    resumed.assert_outcomes(skipped=1)
    assert re.search(re.escape(case_id("test_ok")) + r" already recorded in \S+results\.jsonl \(--resume\)",
                     resumed.stdout.str()), output(resumed)
    assert log.read_text().split() == ["ok"] and len(run_dirs(wire)) == 1  # not measured again, same run

    failing = run(wire, "--resume")  # the recorded case is re-applied, the new one measured: a tau regression
    assert failing.ret == 1, output(failing)
    failing.assert_outcomes(skipped=1, failed=1)
    assert log.read_text().split() == ["ok", "tau_drop"]

    again = run(wire, "--resume")  # nothing changed: the recorded failure must not turn the run green
    assert again.ret == 1, output(again)
    again.assert_outcomes(skipped=1, failed=1)
    assert re.search(re.escape(case_id("test_tau_drop")) + r": recorded as failed in \S+results\.jsonl",
                     again.stdout.str()), output(again)
    assert re.search(re.escape(case_id("test_tau_drop")) + r": tau regression: baseline 5\.375 -> new 2\.68\d",
                     again.stdout.str()), output(again)
    assert log.read_text().split() == ["ok", "tau_drop"] and len(run_dirs(wire)) == 1


# --- 6. --resume refuses a run of another identity ---------------------------------------------------------

def _perturb(model_dir: Path) -> Path:
    """Add a little noise to every floating-point weight of a checkpoint directory, in place."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    weights = model_dir / "model.safetensors"
    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(weights))
    generator = torch.Generator().manual_seed(0)
    noisy = {name: t + 1e-3 * torch.randn(t.shape, generator=generator, dtype=t.dtype) if t.is_floating_point()
             else t for name, t in tensors.items()}
    save_file(noisy, str(weights), metadata=metadata)
    return model_dir


def _identity(draft: str | None) -> dict:
    options = defaultdict(lambda: None, {"dflash_draft": draft, "tau_margin": 0.03, "throughput_factor": 1.10,
                                         "gate_alpha": 0.05, "update_baselines": False})  # other options unset
    return runs.run_identity(types.SimpleNamespace(getoption=options.__getitem__,
                                                   rootpath=Path(__file__).resolve().parents[1]), "tiny")


def test_resume_refuses_a_different_draft_or_gate_option(wire, monkeypatch):
    ablation_file(wire, RESUME_CASES)
    monkeypatch.setenv("WIRE_LOG", str(wire.path / "ran.txt"))
    only_ok = "test_ok and math"
    assert run(wire, k=only_ok).ret == 0
    perturbed = _perturb(shutil.copytree(PACKAGE_MODELS / "tiny" / "draft", wire.path / "perturbed-draft"))

    other_draft = run(wire, "--resume", "--draft", str(perturbed), k=only_ok)
    assert other_draft.ret == pytest.ExitCode.USAGE_ERROR, output(other_draft)
    refusal = re.search(r"--resume refuses to mix runs: \S+ was made with a different ([^(]+) \(",
                        other_draft.stderr.str())
    assert refusal and {"draft", "draft_files"} <= set(refusal.group(1).split(", ")), output(other_draft)

    other_margin = run(wire, "--resume", "--tau-margin", "0.05", k=only_ok)
    assert other_margin.ret == pytest.ExitCode.USAGE_ERROR, output(other_margin)
    assert re.search(r"--resume refuses to mix runs: \S+ was made with a different options \(options: .*"
                     r"'tau_margin': 0\.03.* then, .*'tau_margin': 0\.05.* now\)", other_margin.stderr.str())

    same = run(wire, "--resume", k=only_ok)  # control: the same identity is resumed
    assert same.ret == 0, output(same)
    same.assert_outcomes(skipped=1)
    assert len(run_dirs(wire)) == 1  # the refused runs made no run directory

    # The draft digest covers the weights themselves: the same path with other weights is another identity.
    copy = shutil.copytree(PACKAGE_MODELS / "tiny" / "draft", wire.path / "copy-draft")
    before = _identity(str(copy))
    after = _identity(str(_perturb(copy)))
    assert sorted(k for k in before if before[k] != after[k]) == ["draft_files"]


# --- 7. a throughput regression is confirmed by a re-measurement ---------------------------------------------

def test_throughput_regression_needs_a_confirming_remeasurement(wire, monkeypatch):
    ablation_file(wire, '''
@pytest.mark.ablation("wire", prompts_cap=12)
def test_slow_first(case):
    measured_case(case, slow="first")


@pytest.mark.ablation("wire", prompts_cap=12)
def test_slow_always(case):
    measured_case(case, slow="always")
''')
    # A factor of 1.3 against a planted 4x slowdown: machine noise cannot make or break a reading (a planted 2x
    # read as -37% at p 0.034 once, with the other xdist worker busy: inconclusive, not detected).
    factor = ("--throughput-factor", "1.3")
    recorded = run(wire, "--update-baselines", *factor)  # WIRE_SLOW unset: both record the real speed
    assert recorded.ret == 0, output(recorded)
    recorded.assert_outcomes(passed=2)

    monkeypatch.setenv("WIRE_SLOW", "1")
    gated = run(wire, *factor)
    assert gated.ret == 1, output(gated)
    gated.assert_outcomes(passed=1, failed=1)
    records = latest_records(wire)

    transient = gate_of(records[case_id("test_slow_first")], "throughput")
    assert records[case_id("test_slow_first")]["outcome"] == "passed"
    assert len(transient["measurements"]) == 2 and transient["verdict"] == "pass", transient
    first, second = transient["measurements"]
    assert first["rel_change"] < -0.35 and second["rel_change"] > -0.2, transient

    confirmed = gate_of(records[case_id("test_slow_always")], "throughput")
    assert len(confirmed["measurements"]) == 2 and confirmed["verdict"] == "regression", confirmed
    assert all(m["rel_change"] < -0.35 for m in confirmed["measurements"])
    assert re.search(re.escape(case_id("test_slow_always")) + r": throughput regression: baseline \S+ -> new \S+ "
                     r"\(-\d+\.\d%\), one-sided p = \S+ \(confirmed by a re-measurement: .*, then .* on the same 12 "
                     r"prompts; p = the larger\)", gated.stdout.str()), output(gated)
    assert not re.search(re.escape(case_id("test_slow_first")) + ": throughput regression", gated.stdout.str())


# --- 8. --update-baselines --resume writes the union ---------------------------------------------------------

def test_resumed_recording_writes_recorded_and_new_cases(wire):
    ablation_file(wire, '''
@pytest.mark.ablation("wire", prompts_cap=12)
def test_a(case):
    measured_case(case)


@pytest.mark.ablation("wire", prompts_cap=12)
def test_b(case):
    measured_case(case)
''')
    first = run(wire, "--update-baselines", k="test_a and math")
    assert first.ret == 0, output(first)
    recorded_a = json.loads(baseline_file(wire).read_text())["cases"]
    assert [c["id"] for c in recorded_a] == [case_id("test_a")]
    baseline_file(wire).unlink()  # as if the recording had been killed before its session end wrote it

    resumed = run(wire, "--update-baselines", "--resume")
    assert resumed.ret == 0, output(resumed)
    resumed.assert_outcomes(passed=1, skipped=1)
    assert "already recorded" in resumed.stdout.str()
    cases = {c["id"]: c for c in json.loads(baseline_file(wire).read_text())["cases"]}
    assert sorted(cases) == [case_id("test_a"), case_id("test_b")]
    assert cases[case_id("test_a")]["per_prompt_tau"] == recorded_a[0]["per_prompt_tau"]
    assert len(cases[case_id("test_b")]["per_prompt_tau"]) == 12
    resumed.stdout.fnmatch_lines(["*wire.json: new file with 2 case(s)"])


# --- 9. INCOMPLETE -------------------------------------------------------------------------------------------

def test_a_case_without_record_is_reported_incomplete(wire):
    ablation_file(wire, '''
@pytest.mark.ablation("wire", prompts_cap=12)
def test_ok(case):
    measured_case(case)


@pytest.mark.ablation("wire", prompts_cap=12)
def test_broken(case):
    raise RuntimeError("planted failure before finish")
''')
    result = run(wire, "--report")
    assert result.ret == 1, output(result)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*dflash: INCOMPLETE*", "INCOMPLETE: 1 collected case(s) have no record: "
                                 + case_id("test_broken").replace("[", "[[]") + " (failed)"])
    (summary,) = (d / "summary.md" for d in run_dirs(wire))
    lines = [line for line in summary.read_text().splitlines() if line.strip()]
    assert lines[0] == "# dflash ablations: tiny"
    assert lines[1].startswith("> **INCOMPLETE: 1 of 2 cases.** Missing: `" + case_id("test_broken") + "`"), lines[:3]
    assert f"dflash report: {summary}" in result.stdout.str()


# --- 10. a baseline file with a bad schema -------------------------------------------------------------------

def test_bad_baseline_file_is_named_and_replaced_by_update_baselines(wire):
    ablation_file(wire, '''
@pytest.mark.ablation("wire", prompts_cap=12)
def test_schema(case):
    measured_case(case)
''')
    path = baseline_file(wire)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"schema_version": 99}))
    broken = run(wire)
    assert broken.ret == 1, output(broken)
    broken.assert_outcomes(failed=1)
    assert re.search(r"Bad baseline file \S*baselines/tiny/wire\.json: schema_version is 99, this code reads version "
                     rf"{SCHEMA_VERSION}; re-record the baselines with --update-baselines", broken.stdout.str())

    updated = run(wire, "--update-baselines")
    assert updated.ret == 0, output(updated)
    updated.assert_outcomes(passed=1)
    assert "replaced an unreadable file" in updated.stdout.str()
    assert sorted(load_baselines(path).cases) == [case_id("test_schema")]


# --- a cap below the profile's prompt count ------------------------------------------------------------------

def test_prompts_cap_below_the_profile_prompt_count_still_gates(wire):
    ablation_file(wire, '''
@pytest.mark.ablation("wire", prompts_cap=6)
def test_small_cap(case):
    measured_case(case)
''')
    recorded = run(wire, "--update-baselines")
    assert recorded.ret == 0, output(recorded)
    assert len(load_baselines(baseline_file(wire)).get(case_id("test_small_cap")).per_prompt_tau) == 6
    gated = run(wire, "--throughput-factor", "1000")  # unchanged code, no timing verdict: it must pass
    assert gated.ret == 0, output(gated)


# --- 8b. dflash baselines --from-run takes only recordings --------------------------------------------------

def test_from_run_takes_only_a_recording_made_with_the_profiles_own_models(wire, capsys):
    """A normal gated run and a run with an overridden --draft are refused by `dflash baselines --from-run`
    (exit 2, the reason); a recording is previewed as a diff and written only with --write."""
    from dflash.cli import main as dflash
    ablation_file(wire, '''
@pytest.mark.ablation("wire")
def test_recorded(case):
    measured_case(case)
''')
    assert run(wire, "--update-baselines").ret == 0
    recording = run_dirs(wire)[-1]
    baseline_file(wire).unlink()
    gated = run(wire)  # no baseline now: not gated outside CI, but it is a normal (non-recording) run
    assert gated.ret == 0, output(gated)
    perturbed = _perturb(shutil.copytree(PACKAGE_MODELS / "tiny" / "draft", wire.path / "other-draft"))
    assert run(wire, "--update-baselines", "--draft", str(perturbed)).ret == 0
    baseline_file(wire).unlink()
    normal, overridden = run_dirs(wire)[-2], run_dirs(wire)[-1]
    baselines = str(wire.path / "baselines")
    capsys.readouterr()
    assert dflash(["baselines", "--from-run", str(normal), "--baselines-dir", baselines]) == 2
    assert "is not a baseline recording" in capsys.readouterr().err
    assert dflash(["baselines", "--from-run", str(overridden), "--baselines-dir", baselines]) == 2
    assert "overrode the profile's draft" in capsys.readouterr().err
    assert dflash(["baselines", "--from-run", str(recording), "--baselines-dir", baselines]) == 0
    assert "+ " + case_id("test_recorded") in capsys.readouterr().out and not baseline_file(wire).exists()
    assert dflash(["baselines", "--from-run", str(recording), "--baselines-dir", baselines, "--write"]) == 0
    assert list(load_baselines(baseline_file(wire)).cases) == [case_id("test_recorded")]


# --- 11. unique run directories --------------------------------------------------------------------------------

def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "time", types.SimpleNamespace(strftime=lambda fmt: "20260101-120000"))
    stub = types.SimpleNamespace(reports_dir=tmp_path / "reports")
    identity = {"profile": "tiny", "code": "abc"}
    made = [runs.RunState._new_run_dir(stub, "tiny", identity) for _ in range(3)]
    assert [p.name for p in made] == ["tiny-20260101-120000", "tiny-20260101-120000-02", "tiny-20260101-120000-03"]
    assert all(json.loads((p / runs.RUN_FILE).read_text()) == identity for p in made)
    for p in made:
        (p / "results.jsonl").write_text("")
    assert runs.RunState._latest_run(stub, "tiny") == made[-1]  # --resume continues the newest of them


# --- 12. concurrent baseline writes are locked ------------------------------------------------------------------

FINGERPRINT = {"hardware": "cpu", "torch": "0", "transformers": "0", "python": "3", "git_sha": "abc",
               "profile": "tiny", "seeds": SEEDS}
WRITES_PER_PROCESS = 40


def _write_many(directory: str, writer: int, barrier) -> None:
    barrier.wait()
    for i in range(WRITES_PER_PROCESS):
        payload = {"profile": "tiny", "ablation": "wire", "id": f"wire/w{writer}-{i:02d}", "per_prompt_tau": [2.0],
                   "code": "abc", "throughput": {f"cpu-{writer}": {"speedup_samples": [1.0], "fingerprint": FINGERPRINT,
                                                                   "code": "abc", "recorded": "now"}},
                   "counters": {}, "fingerprint": FINGERPRINT, "provenance": {"command": "test"}}
        write_baseline_payloads(Path(directory), [payload])


def test_concurrent_baseline_writers_lose_no_case(tmp_path):
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_write_many, args=(str(tmp_path), w, barrier)) for w in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    written = load_baselines(tmp_path / "tiny" / "wire.json")
    assert sorted(written.cases) == sorted(f"wire/w{w}-{i:02d}" for w in range(2) for i in range(WRITES_PER_PROCESS))
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == ["wire.json"]  # no temp file left behind


# --- 13. where a throughput gate's reference comes from: stored for this testbed, A/B, or not gated ---------------

AB_CASE = """
SLOWDOWN = {slowdown}


@dataclasses.dataclass(frozen=True)
class Timed(Variant):
    \"\"\"A real decode whose measured CPU and wall time are multiplied by SLOWDOWN (a planted code change).\"\"\"
    def run(self, models, prompt, max_new_tokens, stop_ids, seed):
        result = super().run(models, prompt, max_new_tokens, stop_ids, seed)
        return dataclasses.replace(result, cpu_s=SLOWDOWN * result.cpu_s, wall_s=SLOWDOWN * result.wall_s)


@pytest.mark.ablation("wire", prompts_cap=12)
def test_ab(case):
    _, metrics, gates = case.measure(Timed("bs=8", block_size=8))
    case.finish({{"block_size": 8}}, metrics, gates)
"""


def _git(path: Path, *args: str) -> str:
    import subprocess
    return subprocess.run(["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci", *args], cwd=path,
                          check=True, capture_output=True, text=True).stdout.strip()


def _move_throughput_to(pytester, testbed: str, code: str | None = None) -> str:
    """The recorded throughput as if another machine had recorded it (and, with `code`, from other code):
    this machine becomes a foreign testbed. Returns the testbed key this machine has."""
    path = baseline_file(pytester)
    data = json.loads(path.read_text())
    (entry,) = data["cases"]
    (own,) = entry["throughput"]
    entry["throughput"] = {testbed: entry["throughput"][own]}
    if code is not None:
        entry["code"] = code
    path.write_text(json.dumps(data))
    return own


def _summary(pytester) -> str:
    return (run_dirs(pytester)[-1] / "summary.md").read_text()


def test_throughput_gated_against_this_testbeds_stored_baseline(wire):
    ablation_file(wire, AB_CASE.format(slowdown=1.0))
    assert run(wire, "--update-baselines", k="test_ab and math").ret == 0
    gated = run(wire, "--report", k="test_ab and math")
    assert gated.ret == 0, output(gated)
    gate = gate_of(latest_records(wire)[case_id("test_ab")], "throughput")
    testbed = load_baselines(baseline_file(wire)).get(case_id("test_ab")).throughput
    assert gate["source"] == f"stored baseline, testbed {next(iter(testbed))}" and gate["not_gated"] is None
    assert f"1 case(s) gated against stored baseline, testbed {next(iter(testbed))}" in gated.stdout.str()
    assert f"| throughput gated against | 1 stored baseline, testbed {next(iter(testbed))} |" in _summary(wire)


def test_a_foreign_testbed_without_a_reference_it_can_check_out_is_not_gated_loudly(wire):
    ablation_file(wire, AB_CASE.format(slowdown=1.0))
    assert run(wire, "--update-baselines", k="test_ab and math").ret == 0
    own = _move_throughput_to(wire, "cpu-another-machine", code="0123abc+feedfacecafe")
    gated = run(wire, "--report", k="test_ab and math")
    assert gated.ret == 0, output(gated)  # tau still gated and passing; throughput reported, not failed
    gate = gate_of(latest_records(wire)[case_id("test_ab")], "throughput")
    assert gate["verdict"] == "not gated" and f"no stored throughput for testbed {own}" in gate["not_gated"]
    assert "uncommitted changes" in gate["not_gated"]
    assert f"NOT GATED  {case_id('test_ab')}: no stored throughput for testbed {own}" in gated.stdout.str()
    summary = _summary(wire)
    assert "**THROUGHPUT NOT GATED: 1 case(s)**" in summary and "| throughput gated against | 1 not gated |" in summary
    excluded = run(wire, "--ab-cases", "nothing-matches-this", k="test_ab and math")
    assert "--ab-cases 'nothing-matches-this' leaves this case out of the A/B" in excluded.stdout.str()


def test_a_foreign_testbed_is_gated_by_an_ab_against_the_baselines_commit(wire):
    """The baseline's commit is checked out and runs the same case in a reference process on this machine;
    unchanged code passes against it, a planted 4x slowdown (uncommitted, in the current code only) fails as a
    throughput regression confirmed by a re-measurement of both sides."""
    ablation_file(wire, AB_CASE.format(slowdown=1.0))
    _git(wire.path, "init", "-q")
    _git(wire.path, "add", "conftest.py", "pytest.ini", "test_wire.py")
    _git(wire.path, "commit", "-q", "-m", "the reference")
    sha = _git(wire.path, "rev-parse", "HEAD")
    assert run(wire, "--update-baselines", k="test_ab and math").ret == 0
    assert load_baselines(baseline_file(wire)).get(case_id("test_ab")).code == sha  # a clean tree: reproducible
    _move_throughput_to(wire, "cpu-another-machine")
    same = run(wire, "--report", k="test_ab and math")
    assert same.ret == 0, output(same)
    source = f"A/B reference {sha[:12]} (the baseline's code), measured here"
    assert gate_of(latest_records(wire)[case_id("test_ab")], "throughput")["source"] == source
    assert f"1 case(s) gated against {source}" in same.stdout.str()
    assert f"| throughput gated against | 1 {source} |" in _summary(wire)

    ablation_file(wire, AB_CASE.format(slowdown=4.0))
    slow = run(wire, k="test_ab and math")
    assert slow.ret == 1, output(slow)
    assert re.search(re.escape(case_id("test_ab")) + r": throughput regression: baseline \d+\.\d+ -> new \d+\.\d+ "
                     r"\(-7\d\.\d%\).*confirmed by a re-measurement", slow.stdout.str()), output(slow)


def test_the_ab_reference_runs_its_own_conftest_not_this_codes(wire):
    """The reference session loads the reference commit's conftest.py only. This code's conftest loads a plugin
    the reference commit lacks; the reference still runs (a run's reports path, an option value inside this
    code's tree, was once taken for a test path, and this conftest loaded into the reference's session)."""
    ablation_file(wire, AB_CASE.format(slowdown=1.0))
    _git(wire.path, "init", "-q")
    _git(wire.path, "add", "conftest.py", "pytest.ini", "test_wire.py")
    _git(wire.path, "commit", "-q", "-m", "the reference")
    sha = _git(wire.path, "rev-parse", "HEAD")
    (wire.path / "plugin_only_in_this_code.py").write_text(
        '"""A plugin the reference commit does not have: it fails outside its own tree."""\n'
        "from pathlib import Path\n"
        "if Path.cwd().resolve() != Path(__file__).resolve().parent:\n"
        "    raise ImportError('this code\\'s plugin loaded into another tree\\'s session')\n")
    conftest = wire.path / "conftest.py"
    conftest.write_text(conftest.read_text().replace('pytest_plugins = ["dflash.plugin"]',
                                                     'pytest_plugins = ["dflash.plugin", "plugin_only_in_this_code"]'))
    assert run(wire, "--update-baselines", k="test_ab and math").ret == 0
    _move_throughput_to(wire, "cpu-another-machine", code=sha)
    gated = run(wire, k="test_ab and math")
    assert gated.ret == 0, output(gated)
    gate = gate_of(latest_records(wire)[case_id("test_ab")], "throughput")
    assert gate["source"] == f"A/B reference {sha[:12]} (the baseline's code), measured here", output(gated)
