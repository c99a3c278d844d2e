"""The pytest plugin behind `ablations/`: options, profile fixtures, per-case measurement and recording,
statistical gates against stored baselines, `--update-baselines`, `--resume` and `--report`.

Loaded by the root conftest.py. Under pytest-xdist every worker measures and appends its finished cases to the
run's JSONL results file; case records also travel to the controller in `user_properties`, where Holm's
correction over the whole run, baseline updates and the markdown report happen once.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from ..errors import DFlashError
from ..loading import enforce_offline
from . import baselines as baseline_store
from .fileio import atomic_write_text
from .measure import (TARGET_ONLY, Variant, compare, comparison_metrics, extend, per_prompt_tau, speedup_samples,
                      warm_up)
from .profiles import PROFILES, get_profile, load_prompts, unavailable_reason
from .results import ResultsFile, ResultsFileError, id_problem, latest_by_id
from .stats import REGRESSION, apply_holm, confirm, sequential_tau_gate, tau_gate, throughput_gate

RECORD_KEY = "dflash_record"
DEFAULT_PROFILES = ("tiny", "gpu-qwen3-4b", "gpu-qwen3-8b")
SEEDS = {"prompt_seed": "index of the prompt", "torch": 0}


def _number_option(option: str, accepts, requirement: str, example: str):
    """An argparse `type=` for a float option: refuses what is not a finite number meeting `requirement` (NaN,
    inf, out of range) with a message saying what was wrong and how to fix it (pytest makes it a usage error)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not math.isfinite(value) or not accepts(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not accepted: {option} must be {requirement} (e.g. "
                                             f"{option} {example}); any other value would make a gate that "
                                             "can never fail, or fail on noise")
        return value
    parse.__name__ = option.lstrip("-").replace("-", "_")
    return parse


TAU_MARGIN = _number_option("--tau-margin", lambda v: 0 <= v < 1, "a fraction in [0, 1)", "0.03")
THROUGHPUT_FACTOR = _number_option("--throughput-factor", lambda v: v >= 1, "a finite factor >= 1", "1.10")
GATE_ALPHA = _number_option("--gate-alpha", lambda v: 0 < v < 1, "a significance level in the open interval (0, 1)",
                            "0.05")


def _path_option(option: str):
    def parse(text: str) -> str:
        if not text.strip() or not text.isprintable():
            raise argparse.ArgumentTypeError(f"{text!r} is not accepted: {option} needs a directory path (printable, "
                                             "not empty)")
        return text
    parse.__name__ = option.lstrip("-").replace("-", "_")
    return parse


def _shard_option(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted: --shard needs I/N with 1 <= I <= N, e.g. "
                                         "--shard 2/4 for the second of four runners")
    return int(match[1]), int(match[2])


def _count_option(option: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not accepted: {option} needs a whole number >= 1")
        return value
    parse.__name__ = option.lstrip("-").replace("-", "_")
    return parse


def pytest_addoption(parser):
    group = parser.getgroup("dflash", "DFlash ablations")
    group.addoption("--profile", default=None, help=f"profile to run ({', '.join(PROFILES)}); default: tiny, and "
                    "the GPU profiles as cases marked gpu (skipped without CUDA and weights)")
    group.addoption("--report", action="store_true", help="write reports/<profile>-<time>/summary.md (+ plots)")
    group.addoption("--update-baselines", action="store_true", help="rewrite baselines/<profile>/*.json from "
                    "this run (the only way baselines change)")
    group.addoption("--resume", action="store_true", help="continue the latest run of the profile: recorded "
                    "cases are not measured again, their verdicts count (refused if target, draft, code or "
                    "gate options differ from that run's)")
    group.addoption("--tau-margin", type=TAU_MARGIN, default=0.03,
                    help="practical margin of the tau gate, in [0, 1) (0.03 = 3%%)")
    group.addoption("--throughput-factor", type=THROUGHPUT_FACTOR, default=1.10,
                    help="asv-style factor of the speedup gate (finite, >= 1)")
    group.addoption("--gate-alpha", type=GATE_ALPHA, default=0.05,
                    help="family-wise significance level of the gates, in (0, 1)")
    group.addoption("--target", dest="dflash_target", default=None,
                    help="override the profile's target (a known name, local directory or hub id)")
    group.addoption("--draft", dest="dflash_draft", default=None,
                    help="override the profile's draft, e.g. a perturbed copy to check that the gates fire")
    group.addoption("--reports-dir", type=_path_option("--reports-dir"), default="reports",
                    help="where run directories are written")
    group.addoption("--baselines-dir", type=_path_option("--baselines-dir"), default="baselines",
                    help="where baseline files live")
    group.addoption("--check-baselines", action="store_true", help="with --collect-only: list gated cases "
                    "without a baseline entry and entries no case produces (what `dflash baselines --check` runs)")
    group.addoption("--device", dest="dflash_device", default=None, help="run the profiles on this device instead "
                    "of theirs (cpu, cuda, cuda:N): e.g. rehearse a GPU profile on CPU with stand-in weights. Under "
                    "xdist with several GPUs, cuda binds worker gwN to cuda:N")
    group.addoption("--dtype", dest="dflash_dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="override the profiles' dtype")
    group.addoption("--prompts", dest="dflash_prompts", type=_count_option("--prompts"), default=None,
                    help="prompts per case (and their cap) instead of the profile's: a short rehearsal")
    group.addoption("--max-new-tokens", dest="dflash_max_new_tokens", type=_count_option("--max-new-tokens"),
                    default=None, help="token budget of every case (full-length ones too) instead of the profile's")
    group.addoption("--tau-accounting", choices=("engine", "upstream"), default="engine",
                    help="engine: the last block shrinks to the token budget; upstream: plain-DFlash cases keep "
                    "full-size tail blocks and count what they accept, as the published tau does (compare with "
                    "published figures with this; baselines are recorded with engine)")
    group.addoption("--allow-downloads", action="store_true", help="let the Hugging Face clients fetch missing "
                    "weights and datasets (default: offline, a missing one skips its cases with the command "
                    "that fetches it)")
    group.addoption("--shard", type=_shard_option, default=None, metavar="I/N", help="run the I-th of N "
                    "disjoint shares of the selected cases (a CI matrix: one runner per share); the gate family "
                    "stays that of the whole selection, and `dflash report --merge` joins the shards' runs")


def pytest_configure(config):
    enforce_offline(allow_downloads=config.getoption("allow_downloads"))  # before anything imports `datasets`
    config.addinivalue_line("markers", "ablation(name, ci_datasets=None, prompts_cap=None, gated=True): an "
                            "ablation case; name is its baseline file; with ci_datasets, cases on other datasets "
                            "are marked slow; prompts_cap lowers the profile's cap for an expensive ablation; "
                            "gated=False: a measurement that is reported, never gated (needs no baseline)")
    name = config.getoption("profile")
    if name is not None and name not in PROFILES:
        raise pytest.UsageError(f"unknown --profile {name!r}; choose one of {', '.join(PROFILES)}")
    state = RunState(config)
    config.stash[STATE] = state
    config.pluginmanager.register(Selection(state), "dflash-selection")
    if not hasattr(config, "workerinput"):
        _check_options(config, state)
        state.open_runs()
        config.pluginmanager.register(Controller(state), "dflash-controller")
        if config.getoption("report"):
            config.pluginmanager.register(ReportWriter(state), "dflash-report")


def writable_problem(directory: Path) -> str | None:
    """Why files cannot be created in `directory` (or, while it does not exist, in its nearest existing
    ancestor, where it would be made); None when they can. Leaves nothing behind (an unnamed temp file)."""
    probe = directory
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} exists but is not a directory"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as error:
        return f"no file can be created in {probe} ({error.strerror or error})"
    return None


def _check_options(config, state: "RunState") -> None:
    """Controller, before anything is measured: directories that are files or cannot be written, and model
    overrides that do not resolve, are usage errors (not a traceback, and not a run whose results are lost)."""
    for option, path in (("--reports-dir", state.reports_dir), ("--baselines-dir", state.baselines_dir)):
        if path.exists() and not path.is_dir():
            raise pytest.UsageError(f"{option} {path} is a file, not a directory: pass a directory (it is created "
                                    "if missing), or move the file away.")
    if state.update:
        for profile in state.profiles:
            problem = writable_problem(state.baselines_dir / profile)
            if problem:
                raise pytest.UsageError(f"--update-baselines would measure every case and then fail to write the "
                                        f"baselines under {state.baselines_dir / profile}: {problem}. Nothing was "
                                        "measured. Pass a writable --baselines-dir DIR, or make that directory "
                                        "writable.")
    from ..loading import KNOWN_MODELS, resolve
    for option, which in (("dflash_target", "target"), ("dflash_draft", "draft")):
        value = config.getoption(option)
        if value and value not in KNOWN_MODELS:
            try:
                resolve(value, which)
            except DFlashError as error:
                raise pytest.UsageError(f"--{which} {value}: {error}") from None


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


class RunState:
    """What one pytest run shares: profiles, where results go, the run's identity, loaded models per profile,
    the gate family, and what the controller gathers (collected cases, their outcomes, records)."""

    def __init__(self, config):
        self.config = config
        explicit = config.getoption("profile")
        self.profiles = (explicit,) if explicit else DEFAULT_PROFILES
        self.root = Path(config.rootpath)
        self.reports_dir = self.root / config.getoption("reports_dir")
        self.baselines_dir = self.root / config.getoption("baselines_dir")
        self.update = config.getoption("update_baselines")
        worker_input = getattr(config, "workerinput", None) or {}
        self.run_dirs = {k: Path(v) for k, v in worker_input.get("dflash_run_dirs", {}).items()}
        self.identities: dict[str, dict] = worker_input.get("dflash_identities", {})
        self.family = 0
        self.models: dict[str, object] = {}
        self.prompts: dict[tuple, list] = {}
        self.collected: dict[str, dict] = {}  # nodeid -> {"id", "profile", "gated"}
        self.outcomes: dict[str, tuple[str, str]] = {}  # nodeid -> (outcome, reason)
        self.records: dict[str, dict] = {}  # case id -> record (this session's and re-applied ones)
        self.holm: list[dict] = []
        self.baseline_diff = ""
        self.exitstatus = 0
        self.coverage_problems = 0
        self.errors: list[str] = []  # session-end failures, one paragraph each (printed in the terminal summary)
        self._recorded: dict[str, dict] = {}
        self._unavailable: dict[tuple[str, str], str | None] = {}

    def profile(self, name: str):
        """The profile as this run uses it (--device / --dtype; the worker's GPU)."""
        return run_profile(self.config, name)

    def unavailable(self, name: str, dataset: str) -> str | None:
        """Why a profile's cases on `dataset` cannot run here (CUDA, weights, the dataset; one line, checked
        once), or None."""
        if (name, dataset) not in self._unavailable:
            self._unavailable[name, dataset] = unavailable_reason(self.profile(name), datasets=[dataset])
        return self._unavailable[name, dataset]

    def release_models(self) -> None:
        """Drop the models this process loaded for ablation cases (and their GPU memory), e.g. before a test
        starts a serving engine that sizes itself from free memory; a later case loads them again."""
        self.models.clear()
        import gc
        gc.collect()
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def open_runs(self) -> None:
        """Controller: the run directory and identity of every profile; --resume continues the latest run of
        a profile only when its identity is the same and its results file is sound (else a usage error saying
        what differs or which line is bad). Every run directory must be writable before anything is measured."""
        resume = self.config.getoption("resume")
        for profile in self.profiles:
            identity = run_identity(self.config, profile)
            self.identities[profile] = identity
            latest = self._latest_run(profile) if resume else None
            if latest is not None:
                self._check_resumable(latest, identity)
                self.run_dirs[profile] = latest
                self._check_results(profile)
            else:
                self.run_dirs[profile] = self._new_run_dir(profile, identity)

    def _latest_run(self, profile: str) -> Path | None:
        runs = sorted(self.reports_dir.glob(f"{profile}-*/results.jsonl"))
        return runs[-1].parent if runs else None

    def _new_run_dir(self, profile: str, identity: dict) -> Path:
        """A directory of its own: two runs started in the same second get -02, -03, ... (mkdir is atomic).
        A reports directory where none can be made (read-only, a file in the way) is a usage error now, before
        any case is measured, rather than a run whose results have nowhere to go."""
        stem = f"{profile}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            self.reports_dir.mkdir(parents=True, exist_ok=True)
            for k in range(1, 1000):
                path = self.reports_dir / (stem if k == 1 else f"{stem}-{k:02d}")
                try:
                    path.mkdir()
                except FileExistsError:
                    continue
                try:
                    atomic_write_text(path / RUN_FILE, json.dumps(identity, indent=2, sort_keys=True) + "\n")
                except OSError:
                    _remove_if_unused(path)
                    raise
                return path
        except OSError as error:
            raise pytest.UsageError(f"--reports-dir {self.reports_dir}: cannot create a run directory there "
                                    f"({error.strerror or error}{': ' + str(error.filename) if error.filename else ''})"
                                    ", so no measured case could be kept. Nothing was measured. Pass a writable "
                                    "--reports-dir DIR.") from None
        raise DFlashError(f"could not create a run directory under {self.reports_dir}: 999 runs in one second?")

    @staticmethod
    def _check_resumable(run_dir: Path, identity: dict) -> None:
        try:
            stored = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = None
        if not isinstance(stored, dict):
            raise pytest.UsageError(f"--resume: {run_dir} has no readable {RUN_FILE} (a JSON object), so what it "
                                    "measured is unknown; start a new run (without --resume), or move that run "
                                    "directory away.")
        differs = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
        if differs:
            details = "; ".join(f"{k}: {stored.get(k)!r} then, {identity.get(k)!r} now" for k in differs)
            raise pytest.UsageError(f"--resume refuses to mix runs: {run_dir} was made with a different "
                                    f"{', '.join(differs)} ({details}). Resume with the same target, draft, code "
                                    "and options, or start a new run without --resume.")

    def _check_results(self, profile: str) -> None:
        """--resume: the results file must be readable, sound (every record usable: `record_problem`) and
        appendable, checked now rather than after measuring the cases that are left."""
        run_dir = self.run_dirs[profile]
        try:
            self.recorded(profile)
        except ResultsFileError as error:
            raise pytest.UsageError(f"--resume cannot continue {run_dir}: {error} (Or start a new run without "
                                    "--resume.)") from None
        problem = writable_problem(run_dir)
        path = self.results(profile).path
        if problem is None:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
            except OSError as error:
                problem = f"{path} cannot be appended to ({error.strerror or error})"
        if problem:
            raise pytest.UsageError(f"--resume cannot continue {run_dir}: {problem}, so the cases measured now "
                                    "could not be recorded. Nothing was measured. Make it writable, or start a "
                                    "new run without --resume (with a writable --reports-dir).")

    def results(self, profile: str) -> ResultsFile:
        return ResultsFile(self.run_dirs[profile] / "results.jsonl")

    def recorded(self, profile: str) -> dict[str, dict]:
        """--resume: the records already in the run's results file, by case id (the latest of each)."""
        if profile not in self._recorded:
            self._recorded[profile] = latest_by_id(self.results(profile).load(check=record_problem))
        return self._recorded[profile]

    def measured(self, profile: str) -> list[dict]:
        """Session end: the run's records, from its results file (every finished case of the run, resumed ones
        included) plus this session's records in memory (a case whose append failed, e.g. a full disk)."""
        records = latest_by_id(self.results(profile).load(check=record_problem))
        for record in self.records.values():
            if record.get("profile") == profile:
                records[record["id"]] = record
        return list(records.values())


GATE_NUMBERS = ("baseline", "new", "rel_change", "p_value", "p_improvement", "alpha", "n_baseline", "n_new")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_problem(record: dict) -> str | None:
    """What makes a results record unusable where records enter a run from a file (--resume re-applies them,
    `dflash baselines --from-run` turns them into baselines, the session end gates and renders them); None
    when it is sound. The id itself is checked by `results.load` (printable text)."""
    for key in ("ablation", "profile"):
        if not isinstance(record.get(key), str) or not record[key].isprintable():
            return f"{key} must be a printable string, got {record.get(key)!r}"
    if record["profile"] not in PROFILES:
        return f"unknown profile {record['profile']!r} (known: {', '.join(PROFILES)})"
    for key in ("metrics", "params", "fingerprint"):
        if record.get(key) is not None and not isinstance(record[key], dict):
            return f"{key} must be a JSON object, got {type(record[key]).__name__}"
    if record.get("outcome") not in (None, "passed", "failed"):
        return f"outcome must be 'passed' or 'failed', got {record.get('outcome')!r}"
    failures = record.get("failures", [])
    if not isinstance(failures, list) or not all(isinstance(f, str) for f in failures):
        return "failures must be a list of strings"
    for key in ("verdict", "experiment", "group", "dataset", "identity"):
        if record.get(key) is not None and not isinstance(record[key], str):
            return f"{key} must be a string, got {record[key]!r}"
    gates = record.get("gates", [])
    if not isinstance(gates, list):
        return "gates must be a list"
    for index, gate in enumerate(gates):
        if not isinstance(gate, dict) or gate.get("kind") not in ("tau", "throughput"):
            return f"gate #{index} must be an object of kind 'tau' or 'throughput'"
        bad = [k for k in GATE_NUMBERS if not _is_number(gate.get(k))]
        if bad or not isinstance(gate.get("case_id"), str) or not isinstance(gate.get("verdict"), str):
            return f"gate #{index} ({gate['kind']}) lacks numeric {', '.join(bad) or 'fields'} or its case_id/verdict"
    if record.get("recording"):
        metrics = record.get("metrics")
        for key in ("per_prompt_tau", "speedup_samples"):
            values = metrics.get(key) if isinstance(metrics, dict) else None
            if not isinstance(values, list) or not all(_is_number(v) for v in values):
                return f"a recording's metrics.{key} must be a list of numbers"
        if not isinstance(record.get("dataset"), str) or not isinstance(record.get("fingerprint"), dict):
            return "a recording needs its dataset (string) and fingerprint (object)"
    return None


RUN_FILE = "run.json"
STATE = pytest.StashKey[RunState]()
IDENTITY_OPTIONS = ("tau_margin", "throughput_factor", "gate_alpha", "update_baselines", "dflash_prompts",
                    "dflash_max_new_tokens", "tau_accounting")


def run_profile(config, name: str):
    """The profile as this run uses it: --device / --dtype applied (a CPU device also switches the gated clock
    to CPU time); a bare `cuda` on an xdist worker binds worker gwN to cuda:N modulo the GPUs, one per worker."""
    from dataclasses import replace
    profile = get_profile(name)
    device = config.getoption("dflash_device") or profile.device
    dtype = config.getoption("dflash_dtype") or profile.dtype
    worker = (getattr(config, "workerinput", None) or {}).get("workerid", "")
    if device == "cuda" and worker.startswith("gw"):
        import torch
        if torch.cuda.device_count() > 1:
            device = f"cuda:{int(worker[2:]) % torch.cuda.device_count()}"
    if (device, dtype) != (profile.device, profile.dtype):
        cuda = device.startswith("cuda")
        profile = replace(profile, device=device, dtype=dtype, needs_cuda=cuda, clock="wall" if cuda else "cpu")
    if prompts := config.getoption("dflash_prompts"):
        profile = replace(profile, prompts=prompts, prompts_cap=prompts)
    if tokens := config.getoption("dflash_max_new_tokens"):
        profile = replace(profile, max_new_tokens=tokens, full_length_max_new_tokens=tokens)
    return profile


def run_identity(config, profile_name: str) -> dict:
    """What makes two runs' records comparable: target and draft (their names, whether overridden, a digest of
    their files), the code (git commit and a digest of uncommitted changes), the clock and the options that
    change measurement or gating. Stored as run.json in the run directory; every record carries its digest."""
    from ..loading import model_digest
    profile = run_profile(config, profile_name)
    target = config.getoption("dflash_target") or profile.target
    draft = config.getoption("dflash_draft") or profile.draft
    return {"profile": profile_name, "target": target, "draft": draft, "device": profile.device,
            "dtype": profile.dtype,
            "target_files": model_digest(target, "target"), "draft_files": model_digest(draft, "draft"),
            "overrides": sorted(k for k in ("target", "draft") if config.getoption(f"dflash_{k}")),
            "code": baseline_store.code_identity(), "clock": profile.clock,
            "options": {k: config.getoption(k) for k in IDENTITY_OPTIONS}}


def identity_digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist: every worker writes into the run directories the controller chose, with its identities."""
    state = node.config.stash[STATE]
    node.workerinput["dflash_run_dirs"] = {k: str(v) for k, v in state.run_dirs.items()}
    node.workerinput["dflash_identities"] = state.identities


def pytest_generate_tests(metafunc):
    """Cases that take `case` are parametrized over (profile, dataset); GPU profiles carry the gpu marker."""
    if "case" not in metafunc.fixturenames:
        return
    state = metafunc.config.stash[STATE]
    params = []
    for name in state.profiles:
        profile = PROFILES[name]
        marks = [pytest.mark.gpu] if profile.needs_cuda else []
        params += [pytest.param((name, spec.name), id=f"{name}-{spec.name}", marks=marks)
                   for spec in profile.datasets]
    metafunc.parametrize("case", params, indirect=True)


ABLATION_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # it names a file: baselines/<profile>/<name>.json


def ablation_case(item) -> dict | None:
    """{"id", "profile", "ablation", "gated"} of a collected ablation case; None for any other test."""
    marker = item.get_closest_marker("ablation")
    callspec = getattr(item, "callspec", None)
    if marker is None or callspec is None or "case" not in callspec.params:
        return None
    name = marker.args[0] if marker.args else ""
    profile, dataset = callspec.params["case"]
    return {"id": f"{name}/{item.name}", "profile": profile, "dataset": dataset, "ablation": name,
            "gated": marker.kwargs.get("gated", True)}


def ablation_problem(item) -> str | None:
    """Why an ablation case cannot be recorded or gated as written (None when it can): its marker's name must
    be a plain file name, its options of the right type, and its case id (built from the test's name and
    parameter ids) printable text, since it lands in results, baselines, reports and terminal lines."""
    info = ablation_case(item)
    if info is None:
        return None
    marker = item.get_closest_marker("ablation")
    name = info["ablation"]
    if not isinstance(name, str) or not ABLATION_NAME.fullmatch(name):
        return (f"@pytest.mark.ablation needs the ablation's name as its first argument, a plain file name "
                f"(letters, digits, _ . -), got {name!r}")
    cap = marker.kwargs.get("prompts_cap")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        return f"prompts_cap must be a positive integer, got {cap!r}"
    ci_datasets = marker.kwargs.get("ci_datasets")
    if ci_datasets is not None and (not isinstance(ci_datasets, (list, tuple, set, frozenset))
                                    or not all(isinstance(d, str) for d in ci_datasets)):
        return f"ci_datasets must be a list of dataset names, got {ci_datasets!r}"
    if not isinstance(marker.kwargs.get("gated", True), bool):
        return f"gated must be True or False, got {marker.kwargs['gated']!r}"
    problem = id_problem(info["id"])
    if problem:
        return (f"case {problem}. Give the parameter a printable id: pytest.param(value, id=...) or "
                "parametrize(..., ids=...)")
    return None


@pytest.hookimpl(tryfirst=True)  # before -m deselects: it must see the slow marks added here
def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.ablation(name, ci_datasets=(...))`: cases on other datasets are marked slow, so `make test`
    (-m "not slow") gates a representative subset within its budget and `pytest ablations` runs them all."""
    for item in items:
        marker = item.get_closest_marker("ablation")
        if ablation_case(item) is None or ablation_problem(item):
            continue  # a broken case is reported once collection is done
        ci_datasets = marker.kwargs.get("ci_datasets")
        ci_cases = PROFILES[item.callspec.params["case"][0]].ci_cases
        if ci_cases is not None:  # a profile with its own CI tier (the GPU profiles: one GPU-hour)
            if not re.search(ci_cases, ablation_case(item)["id"]):
                item.add_marker(pytest.mark.slow)
        elif ci_datasets is not None and item.callspec.params["case"][1] not in ci_datasets:
            item.add_marker(pytest.mark.slow)


GATES_PER_CASE = 2  # tau and throughput: the family counts both for every gated case that will run


class Selection:
    """After -m / -k deselection: fix the gate family, then keep this shard's share (--shard I/N)."""

    def __init__(self, state: RunState):
        self.state = state

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        """The family is two gates per gated case of the whole selection (every shard's) whose profile can run
        here: a case that will skip for want of CUDA, weights or data is not a look, so it costs no alpha."""
        state = self.state
        cases = [info for item in items if (info := ablation_case(item)) is not None and not ablation_problem(item)]
        state.family = GATES_PER_CASE * sum(1 for info in cases if info["gated"]
                                            and state.unavailable(info["profile"], info["dataset"]) is None)
        shard = config.getoption("shard")
        if shard:
            index, count = shard
            keep = [item for k, item in enumerate(items) if k % count == index - 1]
            dropped = [item for k, item in enumerate(items) if k % count != index - 1]
            if dropped:
                config.hook.pytest_deselected(items=dropped)
            items[:] = keep


def pytest_collection_finish(session):
    """The gate family is fixed here, before any case runs: two gates per gated case that will run (after -m /
    -k deselection). Every per-case decision and the session-end Holm use this same number."""
    state = session.config.stash[STATE]
    problems = [f"{item.nodeid!r}: {problem}" for item in session.items if (problem := ablation_problem(item))]
    if problems and not hasattr(session.config, "workerinput"):  # xdist workers: the case fixture fails them
        raise pytest.UsageError(f"{len(problems)} ablation case(s) cannot be recorded as written, nothing was "
                                "measured: " + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else ""))
    for item in session.items:
        info = ablation_case(item)
        if info is not None:
            state.collected[item.nodeid] = info
    if hasattr(session.config, "workeroutput"):  # xdist: the controller does not collect; it reads this
        session.config.workeroutput["dflash_collected"] = state.collected
        session.config.workeroutput["dflash_family"] = state.family
    if session.config.getoption("check_baselines"):
        _check_baselines(session, state)


def _check_baselines(session, state: RunState) -> None:
    """--check-baselines: missing and orphaned baseline entries of every profile run, printed; exit 1 if any."""
    problems = 0
    for profile in state.profiles:
        expected: dict[str, set[str]] = {}
        for info in state.collected.values():
            if info["profile"] == profile and info["gated"]:
                expected.setdefault(info["ablation"], set()).add(info["id"])
        found = baseline_store.coverage(state.baselines_dir, profile, expected)
        cases = sum(len(v) for v in expected.values())
        print(f"\nbaselines {state.baselines_dir / profile}: {cases} gated cases, {len(found['missing'])} missing, "
              f"{len(found['orphaned'])} orphaned, {len(found['unreadable'])} unreadable file(s)")
        for key in ("missing", "orphaned", "unreadable"):
            for entry in found[key]:
                print(f"  {key}: {entry}")
        problems += sum(len(found[k]) for k in ("missing", "orphaned", "unreadable"))
    if problems:
        print("record missing entries with `pytest ablations --profile PROFILE --update-baselines -k ...`; remove "
              "orphaned ones from the file (a renamed case leaves its old entry behind)")
    state.coverage_problems = problems


@dataclass
class Models:
    target: object
    draft: object
    tokenizer: object
    stop_ids: list


def _models(state: RunState, profile) -> Models:
    if profile.name not in state.models:
        from ..loading import load_draft, load_target, load_tokenizer
        target = state.config.getoption("dflash_target") or profile.target
        draft = state.config.getoption("dflash_draft") or profile.draft
        tokenizer = load_tokenizer(target)
        state.models[profile.name] = Models(
            load_target(target, device=profile.device, dtype=profile.dtype),
            load_draft(draft, device=profile.device, dtype=profile.dtype), tokenizer,
            [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return state.models[profile.name]


class Case:
    """One ablation case: measures variant against target-only on the case's prompts, gates, records."""

    def __init__(self, request, state: RunState, profile, dataset: str):
        self.request, self.state, self.profile = request, state, profile
        self.spec = profile.dataset(dataset)
        self.ablation = request.node.get_closest_marker("ablation").args[0]
        self.experiment_id = f"{self.ablation}/{request.node.name}"  # e.g. block_size/test_sweep[tiny-math-bs8]
        self.update = state.update
        self.max_new_tokens = profile.max_new_tokens
        self.recorded: dict | None = None  # --resume: this case's record from the run being continued
        self._warmed = False
        self._models: Models | None = None

    @property
    def models(self) -> Models:
        if self._models is None:
            self._models = _models(self.state, self.profile)
        return self._models

    @property
    def prompts_cap(self) -> int:
        """Prompts a baseline records (and a run may gather up to): the profile's cap, or a lower one that an
        expensive ablation sets with `@pytest.mark.ablation(name, prompts_cap=N)`."""
        cap = self.request.node.get_closest_marker("ablation").kwargs.get("prompts_cap")
        return min(cap, self.profile.prompts_cap) if cap else self.profile.prompts_cap

    @property
    def start_prompts(self) -> int:
        """Prompts a case measures first: all of the cap when recording a baseline, else the profile's count
        (never more than the cap)."""
        return self.prompts_cap if self.update else min(self.profile.prompts, self.prompts_cap)

    @property
    def draft_block_size(self) -> int:
        return self.models.draft.block_size

    @property
    def clock(self) -> str:
        return self.profile.clock

    def prompts(self, count: int) -> list[list[int]]:
        key = (self.profile.name, self.spec.name)
        cached = self.state.prompts.get(key, [])
        if len(cached) < count:
            cached = load_prompts(self.profile, self.spec, self.models.tokenizer, count, answer=self._answer)
            self.state.prompts[key] = cached
        return cached[:count]

    def _answer(self, prompt: list[int]) -> str:
        """The target's greedy answer to an earlier turn (multi-turn datasets): what every lossless variant
        answers too, so the next turn's prompt is the same for baseline and variant."""
        from ..engine import generate
        models = self.models
        result = generate(models.target, None, prompt, max_new_tokens=self.profile.max_new_tokens,
                          stop_token_ids=models.stop_ids)
        return models.tokenizer.decode([t for t in result.output_ids if t not in models.stop_ids],
                                       skip_special_tokens=True)

    def compare(self, variant: Variant, *, max_new_tokens: int | None = None, count: int | None = None,
                others: tuple[Variant, ...] = (), first: int = 0):
        """Interleaved baseline/variant runs on prompts first..count-1 (all of them when recording baselines,
        so later runs can gather more prompts up to the cap against it)."""
        count = count or self.start_prompts
        prompts = self.prompts(count)
        variant, others = self._accounted(variant), tuple(self._accounted(o) for o in others)
        if not self._warmed:
            warm_up(self.models, prompts[0], [TARGET_ONLY, variant, *others], self.models.stop_ids)
            self._warmed = True
        return compare(self.models, prompts[first:], variant, stop_ids=self.models.stop_ids,
                       max_new_tokens=max_new_tokens or self.profile.max_new_tokens, others=others,
                       repeats=self.profile.timing_repeats, label=self.experiment_id, first_index=first,
                       clock=self.clock)

    def _accounted(self, variant: Variant) -> Variant:
        """--tau-accounting upstream: plain-DFlash variants keep full-size tail blocks (research variants decode
        through their own loops and keep the engine's accounting; their records say "engine")."""
        from dataclasses import replace
        upstream = self._option("tau_accounting") == "upstream" and variant.method is None
        return replace(variant, tail_blocks="full") if upstream else variant

    def measure(self, variant: Variant, *, max_new_tokens: int | None = None, extra=None,
                others: tuple[Variant, ...] = (), gate_tau: bool = True):
        """Compare, then gate. Tau: `stats.sequential_tau_gate`, which looks again at more prompts (doubling,
        only the new prompts are run) while the evidence is unclear, up to what the baseline holds; only the last
        look spends alpha, and an inconclusive case there is reported, never failed or retried.
        Throughput: `gate_throughput`, re-measured once when it reads as a regression. `gate_tau=False`: tau
        is reported only (no tau gate, so no prompts are gathered for it)."""
        max_new = self.max_new_tokens = max_new_tokens or self.profile.max_new_tokens
        count = self.start_prompts
        comparison = self.compare(variant, max_new_tokens=max_new, count=count, others=others)
        baseline = self.baseline()
        gates = []
        if baseline is not None:
            if gate_tau:
                def new_taus(n: int) -> list[float]:
                    nonlocal comparison
                    if n > len(comparison.variant):
                        comparison = extend(comparison, self.compare(
                            variant, max_new_tokens=max_new, count=n, others=others, first=len(comparison.variant)))
                    return per_prompt_tau(comparison.variant)
                gates.append(sequential_tau_gate(
                    baseline.per_prompt_tau, new_taus, start=count, family=self.family,
                    margin=self._option("tau_margin"), alpha=self._option("gate_alpha"), case_id=self.experiment_id))
            n = len(comparison.variant)

            def remeasure() -> list[float]:
                fresh = self.compare(variant, max_new_tokens=max_new, count=n)
                return speedup_samples(fresh.variant, fresh.baseline, self.clock)
            gates.append(self.gate_throughput(baseline, speedup_samples(comparison.variant, comparison.baseline,
                                                                        self.clock), remeasure))
        metrics = comparison_metrics(comparison, max_new, self.clock)
        if extra is not None:
            metrics.update(extra(comparison))
        metrics["float_ties"] = self._float_ties(comparison)
        return comparison, metrics, gates

    def gate(self, metrics: dict, remeasure=None) -> list:
        """Gates of a case that measures itself (one look, no gathering): tau on `per_prompt_tau`, throughput on
        `speedup_samples`; `remeasure()` returns fresh speedup samples of the same prompts for the confirmation
        step (without it a throughput regression stands unconfirmed)."""
        baseline = self.baseline()
        if baseline is None:
            return []
        n = len(metrics["per_prompt_tau"])
        if len(baseline.per_prompt_tau) < n:
            raise DFlashError(f"baseline of {self.experiment_id} has {len(baseline.per_prompt_tau)} prompts, the "
                              f"run has {n}: re-record with --update-baselines")
        tau = tau_gate(baseline.per_prompt_tau[:n], metrics["per_prompt_tau"], margin=self._option("tau_margin"),
                       alpha=self._option("gate_alpha"), case_id=self.experiment_id)
        return [tau, self.gate_throughput(baseline, metrics["speedup_samples"], remeasure)]

    def gate_throughput(self, baseline, samples: list[float], remeasure=None):
        """Paired speedup gate; a first reading of "regression" (before the run's multiplicity correction, so
        that every gate the session-end Holm could flag has been confirmed) is re-measured once on the same
        prompts, and the gate fails only when the re-measurement is a regression too (`stats.confirm`)."""
        def gate(values):
            return throughput_gate(baseline.speedup_samples, values, factor=self._option("throughput_factor"),
                                   alpha=self._option("gate_alpha"), baseline_fingerprint=baseline.fingerprint,
                                   current_fingerprint=self.fingerprint, case_id=self.experiment_id)
        first = gate(samples)
        if first.verdict != REGRESSION or remeasure is None:
            return first
        return confirm(first, gate(remeasure()))

    def _option(self, name: str):
        return self.request.config.getoption(name)

    @property
    def fingerprint(self) -> dict:
        return baseline_store.collect_fingerprint(self.profile.name, SEEDS, device=self.profile.device)

    def _float_ties(self, comparison) -> dict:
        """Greedy outputs that differ from target-only, each proven a float tie ({prompt index: explanation});
        `finish` fails on any other difference."""
        from ..evaluation import float_tie
        if comparison.variant and comparison.variant[0].temperature > 0:
            return {}
        prompts = self.prompts(len(comparison.variant))
        ties = {}
        for i, (prompt, new, base) in enumerate(zip(prompts, comparison.variant, comparison.baseline)):
            if new.output_ids != base.output_ids:
                block = new.block_size or max((r.block_size for r in new.trace), default=16)
                tie = float_tie(self.models.target, prompt, base.output_ids, new.output_ids, block_size=block)
                if tie:
                    ties[str(i)] = tie
        return ties

    @property
    def family(self) -> int:
        return max(1, self.state.family)

    def baseline(self):
        """This case's baseline entry; None when recording (--update-baselines never reads the old file, so a
        broken one can be replaced) or when there is none: under CI that fails the case, since a gate that
        silently switches off (a renamed test or param id) would keep CI green; elsewhere the case is recorded
        as "no baseline" and listed loudly at the end."""
        if self.update:
            return None
        if not hasattr(self, "_baseline"):
            path = baseline_store.baseline_path(self.state.baselines_dir, self.profile.name, self.ablation)
            try:
                self._baseline = baseline_store.load_baselines(
                    path, profile=self.profile.name, ablation=self.ablation).get(self.experiment_id) \
                    if path.exists() else None
                problem = None
            except baseline_store.BaselineError as error:  # names the file and every problem
                problem = str(error)
            if problem:
                pytest.fail(f"{self.experiment_id}: {problem}", pytrace=False)
            if self._baseline is None and in_ci():
                pytest.fail(f"{self.experiment_id}: no baseline entry in {path}, so this case would not be gated. "
                            f"Record one with `pytest {self.request.node.nodeid} --profile {self.profile.name} "
                            "--update-baselines` (on the baseline machine) and commit it.", pytrace=False)
        return self._baseline

    def finish(self, experiment: str, params: dict, metrics: dict, gates, *, lossless: bool = True) -> dict:
        """Decide, record (results file + user_properties), then fail on a lost invariant or a regression.
        The record carries the outcome, so `--resume` re-applies it."""
        failures = []
        ties = metrics.get("float_ties", {})
        bad = [i for i, ok in enumerate(metrics.get("exact_match", [])) if not ok and str(i) not in ties]
        if lossless and bad:
            failures.append(f"{self.experiment_id}: greedy output differs from target-only on prompts {bad} (not "
                            "float ties): the lossless invariant is broken")
        family = self.family
        for gate in gates:
            # Bonferroni within the case test (it implies Holm); Holm over the whole run runs at session end.
            if gate.gated and gate.verdict == REGRESSION and gate.p_value * family < gate.alpha:
                failures.append(regression_message(gate.to_dict(), family))
        gated = bool(self.request.node.get_closest_marker("ablation").kwargs.get("gated", True))
        references = self.profile.references_for(self.spec.name, params.get("block_size"),
                                                 params.get("max_new_tokens", self.max_new_tokens),
                                                 params.get("temperature", 0.0))
        record = {"id": self.experiment_id, "experiment": experiment, "ablation": self.ablation, "family": family,
                  "tau_accounting": self._option("tau_accounting"),
                  "group": f"{self.spec.name}, max_new_tokens={self.max_new_tokens}",
                  "profile": self.profile.name, "dataset": self.spec.name, "params": params,
                  "metrics": metrics, "status": "done", "gates": [g.to_dict() for g in gates],
                  "outcome": "failed" if failures else "passed", "failures": failures,
                  "recording": self.update, "identity": identity_digest(self.state.identities[self.profile.name]),
                  "fingerprint": self.fingerprint, "references": [asdict(r) for r in references]}
        if gated and not gates and not self.update:
            record["verdict"] = NO_BASELINE
        record = json.loads(json.dumps(record))  # plain types only: records cross process boundaries (xdist)
        results = self.state.results(self.profile.name)
        try:
            results.append(record)
        except OSError as error:  # a full disk, a directory made read-only mid-run
            failures.append(f"{self.experiment_id}: measured, but its record could not be appended to "
                            f"{results.path} ({error.strerror or error}). It still reaches this session's "
                            "summary and baselines, but a later --resume will measure it again.")
        self.request.node.user_properties.append((RECORD_KEY, record))
        if failures:
            pytest.fail("\n".join(failures), pytrace=False)
        return record

    def replay(self) -> None:
        """--resume: count the recorded case as it ended (its record reaches the session-end Holm and report);
        a recorded failure fails again, so a resumed run cannot turn green."""
        record = self.recorded
        self.request.node.user_properties.append((RECORD_KEY, record))
        path = self.state.results(self.profile.name).path
        if record.get("outcome") == "failed":
            pytest.fail(f"{self.experiment_id}: recorded as failed in {path} (--resume re-applies recorded "
                        "verdicts):\n" + "\n".join(record.get("failures") or ["(no message recorded)"]),
                        pytrace=False)
        pytest.skip(f"{self.experiment_id} already recorded in {path} (--resume)")


NO_BASELINE = "no baseline"


def regression_message(gate: dict, family: int) -> str:
    """The failure line of a gate: case, baseline, new value, change, p and the family correction; a confirmed
    throughput regression shows both measurements."""
    corrected = min(1.0, gate["p_value"] * family)
    line = (f"{gate['case_id']}: {gate['kind']} regression: baseline {gate['baseline']:.3f} -> new "
            f"{gate['new']:.3f} ({gate['rel_change']:+.1%}), one-sided p = {gate['p_value']:.2e}")
    if gate.get("alpha_share", 1.0) < 1:
        line += f" (p {gate['p_raw']:.2e} at {gate['n_new']} prompts / alpha share {gate['alpha_share']:.2g})"
    measurements = gate.get("measurements") or []
    if measurements:
        line += " (confirmed by a re-measurement: " + ", then ".join(
            f"{m['new']:.3f} ({m['rel_change']:+.1%}, p {m['p_value']:.2e})" for m in measurements) + \
            f" on the same {gate['n_new']} prompts; p = the larger)"
    return line + f" (x{family} gates = {corrected:.2e} < {gate['alpha']})"


def baseline_payload(record: dict) -> dict:
    """A case's baseline entry from its results record: per-prompt taus, speedup samples, raw counters,
    fingerprint, provenance and the published figures that describe this case (GPU profiles)."""
    metrics, references = record["metrics"], record.get("references") or []
    return {
        "profile": record["profile"], "ablation": record["ablation"], "id": record["id"],
        "per_prompt_tau": metrics["per_prompt_tau"], "speedup_samples": metrics["speedup_samples"],
        "counters": {k: metrics[k] for k in ("committed_tokens", "cycles", "hit_cap") if k in metrics},
        "fingerprint": record["fingerprint"],
        "provenance": {"command": "pytest ablations --update-baselines", "recorded": time.strftime("%F %T"),
                       "prompts": len(metrics["per_prompt_tau"]), "clock": metrics.get("speedup_clock", "wall"),
                       "run_identity": record.get("identity")},
        "reference": {"figures": references, "source": "; ".join(r["source"] for r in references)}
        if references else None,
    }


def baselines_from_run(run_dir: str | Path, baselines_dir: str | Path, ablations=None, *, write: bool = False) -> str:
    """Baselines from a run's results file: recovers a recording (`--update-baselines`) that was killed before
    its session ended, since every finished case was already appended there. Only a recording run qualifies
    (its run.json says --update-baselines, with the profile's own target and draft), and only records of that
    identity that did not fail. Returns the diff; writes only with `write=True`."""
    run_dir = Path(run_dir)
    results = ResultsFile(run_dir / "results.jsonl")
    if not results.path.exists():
        raise DFlashError(f"{results.path} does not exist: pass a run directory under reports/ that has a "
                          "results.jsonl (e.g. reports/tiny-20261125-145546).")
    try:
        identity = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        identity = None
    if not isinstance(identity, dict) or not isinstance(identity.get("options", {}), dict):
        raise DFlashError(f"{run_dir} has no readable {RUN_FILE}: what it measured is unknown, so it cannot become "
                          "a baseline. Re-record with pytest ablations --update-baselines.")
    if not identity.get("options", {}).get("update_baselines"):
        raise DFlashError(f"{run_dir} is not a baseline recording (it ran without --update-baselines, so it "
                          "measured the gated prompt count, not the cap). Re-record with pytest ablations "
                          "--update-baselines.")
    if identity.get("overrides"):
        raise DFlashError(f"{run_dir} overrode the profile's {' and '.join(map(str, identity['overrides']))} "
                          f"({identity.get('target')}, {identity.get('draft')}); baselines are recorded with the "
                          "profile's own models.")
    digest, payloads, left_out = identity_digest(identity), [], []
    for record in latest_by_id(results.load(check=record_problem)).values():  # names a bad file and line
        if ablations and record["ablation"] not in ablations:
            continue
        if record.get("identity") != digest or not record.get("recording"):
            raise DFlashError(f"{record['id']} in {results.path} was not recorded by this run's recording "
                              f"(identity {record.get('identity')!r}, expected {digest!r}).")
        if record.get("outcome") == "failed":
            left_out.append(record["id"])
            continue
        payload = baseline_payload(record)
        payload["provenance"]["command"] += f" (recovered from {results.path})"
        payloads.append(payload)
    baselines_dir = Path(baselines_dir)
    if baselines_dir.exists() and not baselines_dir.is_dir():
        raise DFlashError(f"--baselines-dir {baselines_dir} is a file, not a directory: pass the baselines directory.")
    try:
        diff = write_baseline_payloads(baselines_dir, payloads, dry_run=not write)
    except OSError as error:
        raise DFlashError(f"the baselines could not be written to {baselines_dir} ({error.strerror or error}"
                          f"{': ' + str(error.filename) if error.filename else ''}); every file there is as it was "
                          f"and {results.path} is untouched. Make the directory writable (or free space) and run "
                          "this again.") from None
    if left_out:
        diff += "\nleft out (failed cases): " + ", ".join(left_out)
    return diff


@pytest.fixture
def case(request):
    state = request.config.stash[STATE]
    profile_name, dataset = request.param
    profile = state.profile(profile_name)
    if request.node.get_closest_marker("ablation") is None:
        pytest.fail(f"{request.node.nodeid} uses the `case` fixture without @pytest.mark.ablation(name): the name "
                    "says which baseline file (baselines/<profile>/<name>.json) gates it", pytrace=False)
    problem = ablation_problem(request.node)
    if problem:
        pytest.fail(f"{request.node.nodeid!r}: {problem}", pytrace=False)
    made = Case(request, state, profile, dataset)
    if request.config.getoption("resume"):
        made.recorded = state.recorded(profile_name).get(made.experiment_id)
        if made.recorded is not None:
            return made  # pytest_pyfunc_call re-applies its verdict instead of measuring
    reason = state.unavailable(profile_name, dataset)
    if reason:
        pytest.skip(reason)
    return made


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """--resume: a recorded case is not measured again; its recorded verdict is re-applied."""
    made = pyfuncitem.funcargs.get("case")
    if isinstance(made, Case) and made.recorded is not None:
        made.replay()
        return True
    return None


def _variant_fixture(name: str):
    def fixture():
        from ..variants import get_variant
        spec = get_variant(name)
        reason = spec.unavailable()
        if reason:
            pytest.skip(f"variant {name}: {reason}")
        return spec
    fixture.__name__ = f"variant_{name.replace('-', '_')}"
    fixture.__doc__ = f"The {name} research-backlog variant (a dflash.variants.VariantSpec)."
    return pytest.fixture(fixture, name=fixture.__name__)


def _register_variant_fixtures(namespace: dict) -> None:
    """One fixture per registered variant (`variant_suffix_recycling`, ...), so tests can ask for it by name."""
    from ..variants import VARIANTS
    for name in VARIANTS:
        made = _variant_fixture(name)
        namespace[f"variant_{name.replace('-', '_')}"] = made


_register_variant_fixtures(globals())


class Controller:
    """Controller-side hooks (the only process in a run without xdist): collect records and outcomes, Holm
    over the run's family, baselines, the NO BASELINE and INCOMPLETE lines."""

    def __init__(self, state: RunState):
        self.state = state

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        """xdist: the collected cases (and so the family) as a worker collected them."""
        output = getattr(node, "workeroutput", {})
        if output.get("dflash_collected") and not self.state.collected:
            self.state.collected.update(output["dflash_collected"])
            self.state.family = output.get("dflash_family", 0)

    def pytest_runtest_logreport(self, report):
        state = self.state
        for key, value in report.user_properties:
            if key == RECORD_KEY:
                state.records[value["id"]] = value
        if report.when == "call" or report.outcome != "passed":
            reason = ""
            if report.skipped and isinstance(report.longrepr, tuple):
                reason = str(report.longrepr[2]).removeprefix("Skipped: ")
            outcome = "error" if report.failed and report.when != "call" else report.outcome
            state.outcomes.setdefault(report.nodeid, (outcome, reason))

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session, exitstatus):
        """Holm over the run, then the baselines (with --update-baselines). Nothing here may raise: the report
        (written after this) and the terminal summary must still come, so a failing step becomes one clear
        error in `state.errors` and a failed run."""
        state = self.state
        state.exitstatus = exitstatus
        if state.coverage_problems and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        try:
            state.holm = _holm_over_run(state)
        except Exception as error:  # a record that slipped past validation: say so, keep going
            state.holm = []
            _session_error(session, state, f"the session-end Holm correction could not run ({type(error).__name__}:"
                           f" {error}); the per-case verdicts above stand. " + _where_measured(state))
        if any(g["verdict"] == REGRESSION for g in state.holm) and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if state.update:
            self._write_baselines(session)
        for profile, run_dir in state.run_dirs.items():
            try:
                _remove_if_unused(run_dir)
            except OSError:
                pass  # an empty run directory left behind is harmless

    def _write_baselines(self, session) -> None:
        """The union of every non-failed record of the run (a resumed recording included), all of it or
        nothing; a write that fails (read-only directory, full disk) is one clear error that says where the
        measured records are (the results file) and how to write the baselines from them later."""
        state = self.state
        payloads, written = [], []
        try:
            for profile in state.run_dirs:
                digest = identity_digest(state.identities[profile])
                payloads += [baseline_payload(r) for r in state.measured(profile) if r.get("identity") == digest
                             and r.get("recording") and r.get("outcome") != "failed"]
            if payloads:
                state.baseline_diff = write_baseline_payloads(state.baselines_dir, payloads, written=written)
        except Exception as error:  # OSError, BaselineError, ResultsFileError, a malformed record
            reason = f"{error.strerror}: {error.filename}" if isinstance(error, OSError) and error.strerror else error
            commands = "; ".join(f"`dflash baselines --from-run {run_dir} --baselines-dir {state.baselines_dir} "
                                 "--write`" for run_dir in state.run_dirs.values())
            changed = (f"only {', '.join(map(str, written))} were replaced before the failure, every other file "
                       "there is as it was" if written else "every file there is as it was")
            _session_error(session, state, f"--update-baselines: the baselines were NOT WRITTEN to "
                           f"{state.baselines_dir} ({reason}); {changed}. "
                           + _where_measured(state) + f" Fix the cause, then write them without measuring again: "
                           f"{commands} (without --write it previews the diff).")

    def pytest_terminal_summary(self, terminalreporter):
        state = self.state
        if getattr(state, "holm", None):
            terminalreporter.section(f"dflash gates (Holm over the run's {state.family} gates)")
            for g in sorted(state.holm, key=lambda g: (g["verdict"] != REGRESSION, g["case_id"], g["kind"])):
                terminalreporter.write_line(
                    f"{g['verdict']:>12s}  {g['kind']:10s} {g['case_id']}: baseline {g['baseline']:.3f} -> "
                    f"{g['new']:.3f} ({g['rel_change']:+.1%}), p {g['p_value']:.2e}, Holm {g['p_adjusted']:.2e}")
        unbaselined = sorted(r["id"] for r in state.records.values() if r.get("verdict") == NO_BASELINE)
        if unbaselined:
            terminalreporter.section("dflash: NO BASELINE (these cases were not gated)", red=True)
            for case_id in unbaselined:
                terminalreporter.write_line(f"NO BASELINE  {case_id}")
            terminalreporter.write_line("record them with --update-baselines (under CI these cases fail)")
        ran = state.exitstatus != pytest.ExitCode.USAGE_ERROR and not state.config.option.collectonly
        missing = incomplete_cases(state) if ran else {}
        if missing:
            terminalreporter.section("dflash: INCOMPLETE", red=True)
            terminalreporter.write_line(f"INCOMPLETE: {len(missing)} collected case(s) have no record: "
                                        + ", ".join(f"{k} ({v})" for k, v in sorted(missing.items())[:20]))
        if state.baseline_diff:
            terminalreporter.section("dflash baselines updated")
            terminalreporter.write_line(state.baseline_diff)
        if state.errors:
            terminalreporter.section("dflash: ERROR", red=True)
            for message in state.errors:
                terminalreporter.write_line("ERROR: " + message, red=True)


def _where_measured(state: RunState) -> str:
    """Where the cases measured by this run are kept, for error messages at session end."""
    files = ", ".join(str(state.results(p).path) for p in state.run_dirs if state.results(p).path.exists())
    if not files:
        return "No case was recorded."
    return f"Nothing measured is lost: every finished case of this run is recorded in {files}."


def _session_error(session, state: RunState, message: str) -> None:
    state.errors.append(message)
    if session.exitstatus in (0, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def incomplete_cases(state: RunState, profile: str | None = None) -> dict[str, str]:
    """Collected cases without a record and not skipped: {case id: what happened (error, failed, not run)}."""
    missing = {}
    for nodeid, info in state.collected.items():
        if profile is not None and info["profile"] != profile or info["id"] in state.records:
            continue
        outcome, _ = state.outcomes.get(nodeid, ("not run", ""))
        if outcome != "skipped":
            missing[info["id"]] = outcome
    return missing


def _remove_if_unused(run_dir: Path) -> None:
    """A run directory that got no results (collect-only, every case skipped) is removed with its run.json."""
    if run_dir.is_dir() and not (run_dir / "results.jsonl").exists() and \
            {p.name for p in run_dir.iterdir()} <= {RUN_FILE}:
        (run_dir / RUN_FILE).unlink(missing_ok=True)
        run_dir.rmdir()


def _holm_over_run(state: RunState) -> list[dict]:
    """Holm's step-down over every gate of the run (tau and throughput together; this session's records and
    re-applied ones), with the family fixed at collection."""
    return holm_over(state.records.values(), state.family)


def holm_over(records, family: int) -> list[dict]:
    """Holm's step-down over every gate of `records`, with `family` gates in the family."""
    from .stats import TauGateResult, ThroughputGateResult
    gates = []
    for record in records:
        for g in record.get("gates", []):
            cls = TauGateResult if g["kind"] == "tau" else ThroughputGateResult
            fields = {k: v for k, v in g.items() if k in cls.__dataclass_fields__}
            fields.update(p_adjusted=None, p_improvement_adjusted=None)
            gates.append(cls(**fields))
    return [g.to_dict() for g in apply_holm(gates, family=family)]


def merge_runs(run_dirs, out_dir: str | Path | None = None, reports_dir: str | Path = "reports") -> Path:
    """One report from the runs of a CI matrix (`pytest ablations --shard I/N`, one runner each): the runs must
    share one identity (profile, models, code, options) and the gate family they were corrected for; their
    records (disjoint: a case measured twice is refused) are joined, Holm runs over the union, and OUT gets
    run.json, results.jsonl and summary.md (+ plots). Returns OUT."""
    from .plots import write_plots
    from .render import render_summary, write_summary
    runs = [Path(d) for d in run_dirs]
    if not runs:
        raise DFlashError("dflash report --merge needs at least one run directory.")
    identities, records, source = [], {}, {}
    for run in runs:
        try:
            identity = json.loads((run / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            identity = None
        if not isinstance(identity, dict):
            raise DFlashError(f"{run} has no readable {RUN_FILE}: pass run directories written by pytest ablations "
                              "(reports/<profile>-<time>).")
        identities.append(identity)
        results = ResultsFile(run / "results.jsonl")
        try:
            loaded = latest_by_id(results.load(check=record_problem)) if results.path.exists() else {}
        except ResultsFileError as error:
            raise DFlashError(str(error)) from None
        for case_id, record in loaded.items():
            if case_id in records:
                raise DFlashError(f"{case_id} was measured in both {source[case_id]} and {run}: shards of one "
                                  "matrix are disjoint; merge the runs of one matrix only.")
            records[case_id], source[case_id] = record, run
    differs = sorted(k for k in set().union(*identities) if len({json.dumps(i.get(k), sort_keys=True)
                                                                 for i in identities}) > 1)
    if differs:
        raise DFlashError(f"the runs differ in {', '.join(differs)}: only runs of one matrix (same profile, models, "
                          "code and options) can be merged into one report.")
    families = {r.get("family") for r in records.values() if r.get("gates")}
    if len(families) > 1 or None in families:
        raise DFlashError(f"the runs' records were gated with different families ({sorted(map(str, families))}): "
                          "run every shard with the same selection (-m / -k) so they share one family.")
    family = families.pop() if families else 0
    holm = {(g["case_id"], g["kind"]): g for g in holm_over(records.values(), family)}
    for record in records.values():
        record["gates"] = [holm.get((g["case_id"], g["kind"]), g) for g in record.get("gates", [])]
    profile = identities[0].get("profile", "run")
    out = Path(out_dir) if out_dir else Path(reports_dir) / f"{profile}-merged-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        raise DFlashError(f"{out} exists and is not empty: pass a new --out directory.")
    ordered = sorted(records.values(), key=lambda r: r["id"])
    fingerprint = ordered[0]["fingerprint"] if ordered else {}
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / RUN_FILE, json.dumps({**identities[0], "merged_from": [str(r) for r in runs]},
                                                     indent=2, sort_keys=True) + "\n")
        merged = ResultsFile(out / "results.jsonl")
        for record in ordered:
            merged.append(record)
        write_summary(out, render_summary(ordered, fingerprint, title=f"dflash ablations: {profile} (merged from "
                                          f"{len(runs)} runs, Holm over {family} gates)"))
        write_plots(ordered, out)
    except OSError as error:
        raise DFlashError(f"the merged report could not be written to {out} ({error.strerror or error}); the "
                          "runs it reads are untouched. Pass a writable --out directory.") from None
    return out


def write_baseline_payloads(baselines_dir: Path, payloads: list[dict], *, dry_run: bool = False,
                            written: list[Path] | None = None) -> str:
    """Merge case payloads into their baseline files under the directory's lock (an unreadable old file is
    replaced, with a note); returns the diff. Each file is replaced atomically; `written` (if given) collects
    the files replaced so far, so a failure part-way can say which ones changed."""
    by_file: dict[tuple, list] = {}
    for payload in payloads:
        by_file.setdefault((payload["profile"], payload["ablation"]), []).append(payload)
    diffs = []
    for (profile, ablation), payloads in sorted(by_file.items()):
        path = baseline_store.baseline_path(baselines_dir, profile, ablation)
        with baseline_store.locked(path.parent):
            cases = {}
            if path.exists():
                try:
                    old = baseline_store.load_baselines(path, profile=profile, ablation=ablation)
                    cases = {k: v.to_json() for k, v in old.cases.items()}
                except baseline_store.BaselineError:
                    pass  # write_baselines notes that it replaced an unreadable file
            for payload in payloads:
                case = {k: v for k, v in payload.items() if k not in ("profile", "ablation")}
                if case.get("reference") is None:
                    case.pop("reference", None)
                cases[payload["id"]] = case
            data = {"schema_version": baseline_store.SCHEMA_VERSION, "profile": profile, "ablation": ablation,
                    "cases": [cases[k] for k in sorted(cases)]}
            diffs.append(baseline_store.write_baselines(path, data, dry_run=dry_run))
            if written is not None and not dry_run:
                written.append(path)
    return "\n".join(diffs)


class ReportWriter:
    """Registered only with --report: renders the run's results file into summary.md (+ plots). It runs after
    the Controller's session end; a summary that cannot be rendered or written is one clear error (in
    `state.errors`, printed by the Controller) that says where the measured cases are."""

    def __init__(self, state: RunState):
        self.state = state
        self.paths: list[Path] = []

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        state, self.session = self.state, session
        for profile, run_dir in state.run_dirs.items():
            try:
                self._write(profile, run_dir)
            except Exception as error:  # OSError (full disk, read-only), a record the renderer cannot show
                reason = f"{error.strerror}: {error.filename}" if isinstance(error, OSError) and error.strerror \
                    else f"{type(error).__name__}: {error}"
                _session_error(session, state, f"--report: the {profile} summary was NOT WRITTEN to {run_dir} "
                               f"({reason}). " + _where_measured(state) + " Once that is fixed, render it without "
                               "measuring again: rerun with the same arguments plus --resume --report (recorded "
                               "cases are re-applied, not measured; if that directory stays unwritable, move "
                               f"{run_dir} into a writable directory and pass it as --reports-dir).")

    def _write(self, profile: str, run_dir: Path) -> None:
        from .plots import write_plots
        from .render import append_github_step_summary, render_summary, write_summary
        state = self.state
        records = state.measured(profile)
        collected = [info for nodeid, info in state.collected.items() if info["profile"] == profile]
        skipped = {info["id"]: state.outcomes[nodeid][1] for nodeid, info in state.collected.items()
                   if info["profile"] == profile and info["id"] not in state.records
                   and state.outcomes.get(nodeid, ("",))[0] == "skipped"}
        if not records and len(skipped) == len(collected):
            return  # a profile that cannot run here gets no summary (its cases were skipped)
        holm = {(g["case_id"], g["kind"]): g for g in state.holm}
        for record in records:
            record["gates"] = [holm.get((g["case_id"], g["kind"]), g) for g in record.get("gates", [])]
        announced = sorted({info["id"] for info in collected} - set(skipped))
        text = render_summary(records, baseline_store.collect_fingerprint(profile, SEEDS), announced=announced,
                              skipped=skipped, title=f"dflash ablations: {profile}")
        path = write_summary(run_dir, text)
        self.paths.append(path)
        for what, write in (("$GITHUB_STEP_SUMMARY", lambda: append_github_step_summary(text)),
                            ("the plots", lambda: write_plots(records, run_dir))):
            try:
                write()
            except Exception as error:  # the summary itself is written: say what is missing, keep going
                _session_error(self.session, state, f"--report: {path} is written, but {what} could not be "
                               f"({type(error).__name__}: {error}).")

    def pytest_terminal_summary(self, terminalreporter):
        for path in self.paths:
            terminalreporter.write_line(f"dflash report: {path}")
