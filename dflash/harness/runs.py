"""The run: what one `pytest ablations` run shares and leaves behind, and the run-level logic over its records.

`RunState` holds a run's profiles, run directories and identities (--resume continues a run of the same
identity), the gate family and what the controller gathers; `record_problem` checks a record read from a results
file; `run_profile` / `run_identity` say how this run measures and what makes two runs comparable; `holm_over`
corrects every gate of a run (or of merged shards, `merge_runs`) as one family.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import pytest

from ..errors import DFlashError
from ..profiles import PROFILES, get_profile, unavailable_reason
from ..provenance import code_identity, collect_fingerprint
from .family import FAMILIES
from .fileio import atomic_write_text
from .reference import ReferenceUnavailable, ReferenceWorker, resolve_commit
from .results import ResultsFile, ResultsFileError, latest_by_id
from .stats import GATE_KINDS, apply_holm

SEEDS = {"prompt_seed": "index of the prompt", "torch": 0}

DEFAULT_PROFILES = ("tiny", "gpu-qwen3-4b", "gpu-qwen3-8b")


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
        self.family_listener = None  # the plugin's FamilySpec listener (dflash.harness.family.on_register)
        self.errors: list[str] = []  # session-end failures, one paragraph each (printed in the terminal summary)
        self._recorded: dict[str, dict] = {}
        self._unavailable: dict[tuple[str, str], str | None] = {}
        self._fingerprints: dict[str, dict] = {}
        self._references: dict[str, ReferenceWorker | ReferenceUnavailable] = {}  # ref -> its worker, or why not
        self._reference_records: dict[tuple[str, str], dict] = {}  # (sha, case id) -> the reference's record

    def profile(self, name: str):
        """The profile as this run uses it (--device / --dtype; the worker's GPU)."""
        return run_profile(self.config, name)

    def fingerprint(self, name: str) -> dict:
        """The testbed and software a profile's cases run on in this process (collected once: it runs git)."""
        if name not in self._fingerprints:
            profile = self.profile(name)
            self._fingerprints[name] = collect_fingerprint(name, SEEDS, device=profile.device, dtype=profile.dtype,
                                                           repo=self.root)
        return self._fingerprints[name]

    def reference_record(self, ref: str, case, again: bool = False) -> tuple[dict, str]:
        """(the A/B reference's record of `case`, the reference's sha): commit `ref` runs the case's batch
        (`case.reference_batch()`) in this process's reference worker the first time one of them asks, and the
        case alone when `again` (a confirming re-measurement). Raises ReferenceUnavailable with the reason; a
        reference that could not be had is not tried again in this process."""
        worker = self._references.get(ref)
        if worker is None:
            try:
                sha = resolve_commit(ref, self.root)
                worker_id = os.environ.get("PYTEST_XDIST_WORKER", "main")
                worker = ReferenceWorker(sha, self.root, self.run_dirs[case.profile.name] / f"ab-{sha[:12]}-{worker_id}")
            except ReferenceUnavailable as error:
                worker = error
            self._references[ref] = worker
        if isinstance(worker, ReferenceUnavailable):
            raise worker
        key = (worker.sha, case.experiment_id)
        if again or key not in self._reference_records:
            records, outcome = worker.run_cases([case.request.node.nodeid] if again else case.reference_batch(),
                                                case.reference_options())
            self._reference_records.update({(worker.sha, case_id): r for case_id, r in records.items()})
            if case.experiment_id not in records:
                raise ReferenceUnavailable(f"the reference {worker.sha[:12]} did not record this case ({outcome}): "
                                           "its test or case id differs from this code's, or the case failed to run")
        return self._reference_records[key], worker.sha

    def close_references(self) -> None:
        for worker in self._references.values():
            if isinstance(worker, ReferenceWorker):
                worker.close()

    def unavailable(self, name: str, dataset: str | None) -> str | None:
        """Why a profile's cases on `dataset` cannot run here (CUDA, weights, the dataset; one line, checked
        once), or None. dataset None: the profile itself (a case of a family whose own models its case checks)."""
        if (name, dataset) not in self._unavailable:
            self._unavailable[name, dataset] = unavailable_reason(self.profile(name),
                                                                  datasets=[] if dataset is None else [dataset])
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
                    remove_if_unused(path)
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
        if not isinstance(gate, dict) or gate.get("kind") not in GATE_KINDS:
            return f"gate #{index} must be an object of kind {' or '.join(map(repr, GATE_KINDS))}"
        bad = [k for k in GATE_NUMBERS if not _is_number(gate.get(k))]
        if bad or not isinstance(gate.get("case_id"), str) or not isinstance(gate.get("verdict"), str):
            return f"gate #{index} ({gate['kind']}) lacks numeric {', '.join(bad) or 'fields'} or its case_id/verdict"
    if record.get("recording"):
        metrics = record.get("metrics")
        family = FAMILIES.get(record.get("ablation_family"))
        if family is None:
            return (f"a recording must name a registered ablation family (ablation_family), got "
                    f"{record.get('ablation_family')!r} (registered: {', '.join(FAMILIES)})")
        outcomes = family.baseline_kind == "outcomes"
        for key in (("per_query",) if outcomes else ("per_prompt_tau", "speedup_samples")):
            values = metrics.get(key) if isinstance(metrics, dict) else None
            if key == "per_query":
                if not isinstance(values, dict) or not all(isinstance(values.get(k), list) for k in
                                                           ("qids", "correct", "cost")):
                    return "a recording's metrics.per_query must hold the lists qids, correct and cost"
            elif not isinstance(values, list) or not all(_is_number(v) for v in values):
                return f"a recording's metrics.{key} must be a list of numbers"
        if not isinstance(record.get("dataset"), str) or not isinstance(record.get("fingerprint"), dict):
            return "a recording needs its dataset (string) and fingerprint (object)"
        if not all(isinstance(record["fingerprint"].get(k), str) for k in ("testbed", "code")):
            return ("a recording's fingerprint must name its testbed and code (a results file written before "
                    "throughput was kept per testbed: re-record with --update-baselines)")
    return None


RUN_FILE = "run.json"


IDENTITY_OPTIONS = ("tau_margin", "throughput_factor", "gate_alpha", "update_baselines", "dflash_prompts",
                    "dflash_max_new_tokens", "tau_accounting", "ab_ref", "ab_cases")


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
    their files), the testbed, the code (git commit and a digest of uncommitted changes), the clock and the
    options that change measurement or gating. Stored as run.json in the run directory; every record carries its digest."""
    from ..loading import model_digest
    profile = run_profile(config, profile_name)
    target = config.getoption("dflash_target") or profile.target
    draft = config.getoption("dflash_draft") or profile.draft
    testbed = collect_fingerprint(profile_name, SEEDS, device=profile.device, dtype=profile.dtype,
                                  repo=Path(config.rootpath))["testbed"]
    return {"profile": profile_name, "target": target, "draft": draft, "device": profile.device,
            "dtype": profile.dtype, "testbed": testbed,
            "target_files": model_digest(target, "target"), "draft_files": model_digest(draft, "draft"),
            "overrides": sorted(k for k in ("target", "draft") if config.getoption(f"dflash_{k}")),
            "code": code_identity(Path(config.rootpath)), "clock": profile.clock,
            "options": {k: config.getoption(k) for k in IDENTITY_OPTIONS}}


def identity_digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


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


def remove_if_unused(run_dir: Path) -> None:
    """A run directory that got no results (collect-only, every case skipped) is removed with its run.json."""
    if run_dir.is_dir() and not (run_dir / "results.jsonl").exists() and \
            {p.name for p in run_dir.iterdir()} <= {RUN_FILE}:
        (run_dir / RUN_FILE).unlink(missing_ok=True)
        run_dir.rmdir()


def holm_over(records, family: int) -> list[dict]:
    """Holm's step-down over every gate of `records`, with `family` gates in the family."""
    gates = []
    for record in records:
        for g in record.get("gates", []):
            cls = GATE_KINDS[g["kind"]]
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
