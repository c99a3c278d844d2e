"""Baseline files: `baselines/<profile>/<ablation>.json`, one per ablation and hardware/model profile.

Layout (schema_version 2), keys sorted and indented so that git diffs stay readable. What does not depend on the
machine (per-prompt tau, per-query correctness) is kept once; throughput is kept per testbed (asv's per-machine
results), because a speedup ratio is a property of the machine that measured it:

    {"schema_version": 2, "profile": "tiny", "ablation": "block_size",
     "cases": [{"id": "block_size/test_block_size[tiny-math-bs8]",
                "per_prompt_tau": [...],          # one per prompt, prompt order of the case (paired gate)
                "counters": {...},                # raw counters (drafts, accepted, ...) for other tau definitions
                "code": "<git sha>",              # the code it was recorded with ("<sha>+<digest>": uncommitted
                                                  # changes on top, which no A/B can check out again)
                "throughput": {"<testbed key>": {"speedup_samples": [...], "fingerprint": {...},
                                                 "code": "<sha>", "recorded": "2026-12-07 12:00:00"}, ...},
                "fingerprint": {...},             # software and testbed of the tau recording
                "provenance": {...},              # how it was produced: date, command, note
                "reference": {"tau": 6.5, "source": "DFlash paper, Table 1"}   # optional
               }, ...]}

A case of a method that is not lossless (kind "outcomes") keeps `per_query` {"qids",
"correct"} instead of taus, and its per-testbed throughput as "cost" (each query's price relative to the family's
reference, measured on that testbed) instead of "speedup_samples".

`load_baselines` validates everything and raises `BaselineError` naming the file and every problem.
`write_baselines` is the only writer: it validates, writes atomically and returns a readable diff. The
caller decides when to call it (only on an explicit --update-baselines style flag); `write_baseline_payloads`
replaces a case's testbed-independent part and only the recording testbed's throughput, never another's.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..errors import DFlashError
from .fileio import atomic_write_text

SCHEMA_VERSION = 2
FINGERPRINT_KEYS = ("hardware", "torch", "transformers", "python", "git_sha", "profile", "seeds")
CASE_KEYS = ("id", "per_prompt_tau", "counters", "code", "throughput", "fingerprint", "provenance")
OUTCOME_KEYS = ("id", "kind", "per_query", "code", "throughput", "fingerprint", "provenance")
PER_QUERY_KEYS = ("qids", "correct")
# The throughput samples of a testbed, by kind: per-prompt speedup ratios, or per-query cost
THROUGHPUT_SAMPLES = {"decode": "speedup_samples", "outcomes": "cost"}
TESTBED_KEYS = ("fingerprint", "code", "recorded")


class BaselineError(DFlashError):
    """A baseline file is unreadable or does not fit the current run. The message names the file."""


@dataclass(frozen=True)
class BaselineCase:
    """A decode case (kind "decode": per-prompt taus) or a non-lossless method's case (kind "outcomes": per-query
    correctness, `per_query`), with throughput per testbed (`throughput[key][THROUGHPUT_SAMPLES[kind]]`)."""
    id: str
    fingerprint: dict
    provenance: dict
    code: str = "unknown"
    per_prompt_tau: list[float] = field(default_factory=list)
    counters: dict = field(default_factory=dict)
    throughput: dict = field(default_factory=dict)
    reference: dict | None = None
    kind: str = "decode"
    per_query: dict | None = None

    def samples_on(self, testbed: str) -> list[float] | None:
        """The throughput samples recorded on `testbed`; None when this testbed has none."""
        entry = self.throughput.get(testbed)
        return None if entry is None else entry[THROUGHPUT_SAMPLES[self.kind]]

    @property
    def reproducible(self) -> bool:
        """Whether the recording's code can be checked out again (a commit, no uncommitted changes on top)."""
        return bool(re.fullmatch(r"[0-9a-f]{7,40}", self.code))

    @property
    def tau_mean(self) -> float:
        return sum(self.per_prompt_tau) / len(self.per_prompt_tau)

    @property
    def headline(self) -> tuple[str, float, int]:
        """(measure, mean, n) a diff line shows: tau for a decode case, accuracy for an outcomes case."""
        if self.kind == "outcomes":
            correct = self.per_query["correct"]
            return "accuracy", sum(correct) / len(correct), len(correct)
        return "tau", self.tau_mean, len(self.per_prompt_tau)

    def to_json(self) -> dict:
        data = {key: getattr(self, key) for key in (OUTCOME_KEYS if self.kind == "outcomes" else CASE_KEYS)}
        if self.reference is not None:
            data["reference"] = self.reference
        return data


@dataclass(frozen=True)
class BaselineFile:
    profile: str
    ablation: str
    cases: dict[str, BaselineCase] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def get(self, case_id: str) -> BaselineCase | None:
        """None for a case without a baseline yet (report "no baseline", do not fail)."""
        return self.cases.get(case_id)

    def to_json(self) -> dict:
        return {"schema_version": self.schema_version, "profile": self.profile, "ablation": self.ablation,
                "cases": [self.cases[k].to_json() for k in sorted(self.cases)]}


def baseline_path(root: str | os.PathLike, profile: str, ablation: str) -> Path:
    return Path(root) / profile / f"{ablation}.json"


# --------------------------------------------------------------------------------------------------
# Validation: collect every problem, then raise once with all of them.


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_per_query(per_query, where: str, problems: list[str]) -> None:
    if not isinstance(per_query, dict) or any(k not in per_query for k in PER_QUERY_KEYS):
        problems.append(f"{where}: per_query must be an object with {', '.join(PER_QUERY_KEYS)}")
        return
    qids, correct = (per_query[k] for k in PER_QUERY_KEYS)
    if not (isinstance(qids, list) and qids and all(isinstance(q, str) for q in qids) and len(set(qids)) == len(qids)):
        problems.append(f"{where}: per_query.qids must be a non-empty list of distinct strings")
        return
    if not (isinstance(correct, list) and len(correct) == len(qids) and all(c in (0, 1) for c in correct)):
        problems.append(f"{where}: per_query.correct must hold one 0 or 1 per query")


def _check_throughput(raw: dict, where: str, problems: list[str]) -> None:
    """`throughput`: testbed key -> {samples, fingerprint, code, recorded}; samples positive and finite."""
    throughput, samples_key = raw.get("throughput"), THROUGHPUT_SAMPLES[raw.get("kind", "decode")]
    if throughput is None:
        return  # reported as a missing field already
    if not isinstance(throughput, dict):
        problems.append(f"{where}: throughput must be an object of testbed key -> measurements")
        return
    for testbed, entry in throughput.items():
        if not (isinstance(testbed, str) and testbed.strip() and testbed.isprintable()):
            problems.append(f"{where}: throughput testbed keys must be printable, non-empty strings, got {testbed!r}")
            continue
        if not isinstance(entry, dict) or any(k not in entry for k in (samples_key, *TESTBED_KEYS)):
            problems.append(f"{where}: throughput[{testbed!r}] must be an object with {samples_key}, "
                            f"{', '.join(TESTBED_KEYS)}")
            continue
        samples = entry[samples_key]
        if not (isinstance(samples, list) and all(_is_number(v) and v > 0 for v in samples)):
            problems.append(f"{where}: throughput[{testbed!r}].{samples_key} must be a list of positive numbers")
        if not isinstance(entry["fingerprint"], dict):
            problems.append(f"{where}: throughput[{testbed!r}].fingerprint must be an object")


def _check_case(raw, where: str, problems: list[str], profile: str) -> None:
    if not isinstance(raw, dict):
        problems.append(f"{where} is not an object")
        return
    if raw.get("kind", "decode") not in ("decode", "outcomes"):
        problems.append(f"{where}: kind must be 'decode' or 'outcomes', got {raw.get('kind')!r}")
        return
    if raw.get("kind") == "outcomes":
        missing = [key for key in OUTCOME_KEYS if key not in raw]
        if missing:
            problems.append(f"{where} is missing field(s) {', '.join(missing)}")
        if "per_query" in raw:
            _check_per_query(raw["per_query"], where, problems)
        if "provenance" in raw and not isinstance(raw["provenance"], dict):
            problems.append(f"{where}: provenance must be an object")
        _check_code(raw, where, problems)
        _check_throughput(raw, where, problems)
        _check_fingerprint(raw.get("fingerprint"), where, problems, profile)
        return
    missing = [key for key in CASE_KEYS if key not in raw]
    if missing:
        problems.append(f"{where} is missing field(s) {', '.join(missing)}")
    if "id" in raw and not (isinstance(raw["id"], str) and raw["id"]):
        problems.append(f"{where}: id must be a non-empty string")
    elif "id" in raw and not raw["id"].isprintable():
        problems.append(f"{where}: id contains non-printable characters (a newline, a control character); case "
                        "ids must be printable text")
    tau = raw.get("per_prompt_tau")
    if tau is not None and not (isinstance(tau, list) and tau and all(_is_number(t) for t in tau)):
        problems.append(f"{where}: per_prompt_tau must be a non-empty list of finite numbers")
    _check_code(raw, where, problems)
    _check_throughput(raw, where, problems)
    for key in ("counters", "provenance"):
        if key in raw and not isinstance(raw[key], dict):
            problems.append(f"{where}: {key} must be an object")
    _check_fingerprint(raw.get("fingerprint"), where, problems, profile)
    reference = raw.get("reference")
    if reference is not None and not (isinstance(reference, dict) and isinstance(reference.get("source"), str)
                                      and reference["source"].strip()):
        problems.append(f"{where}: reference must be an object with a non-empty 'source' string "
                        "saying where the numbers come from")


def _check_code(raw: dict, where: str, problems: list[str]) -> None:
    if "code" in raw and not (isinstance(raw["code"], str) and raw["code"].strip()):
        problems.append(f"{where}: code must name the commit it was recorded with (a git sha, '+<digest>' for "
                        "uncommitted changes)")


def _check_fingerprint(fingerprint, where: str, problems: list[str], profile: str) -> None:
    if fingerprint is None:
        return  # reported as a missing field already
    if not isinstance(fingerprint, dict):
        problems.append(f"{where}: fingerprint must be an object")
        return
    missing = [key for key in FINGERPRINT_KEYS if key not in fingerprint]
    if missing:
        problems.append(f"{where}: fingerprint is missing {', '.join(missing)}")
    if "profile" in fingerprint and fingerprint["profile"] != profile:
        problems.append(f"{where}: fingerprint profile {fingerprint['profile']!r} differs from the file's "
                        f"profile {profile!r}")


def _validate(data, path: Path, *, profile: str | None, ablation: str | None) -> list[str]:
    """All problems with a parsed baseline document (empty list when valid)."""
    if not isinstance(data, dict):
        return ["the top level must be a JSON object"]
    if data.get("schema_version") != SCHEMA_VERSION:
        return [f"schema_version is {data.get('schema_version')!r}, this code reads version {SCHEMA_VERSION}; "
                "re-record the baselines with --update-baselines"]
    problems = [f"missing top-level field {key!r}" for key in ("profile", "ablation", "cases") if key not in data]
    file_profile, file_ablation = data.get("profile"), data.get("ablation")
    expected = {"profile": (profile, path.parent.name), "ablation": (ablation, path.stem)}
    for key, actual in (("profile", file_profile), ("ablation", file_ablation)):
        wanted, from_path = expected[key]
        if wanted is not None and actual != wanted:
            problems.append(f"{key} is {actual!r} but the current run expects {wanted!r}")
        elif actual is not None and actual != from_path:
            problems.append(f"{key} is {actual!r} but the file lies at <{key}>={from_path!r} "
                            f"(layout baselines/<profile>/<ablation>.json)")
    cases = data.get("cases", [])
    if not isinstance(cases, list):
        return problems + ["cases must be a list"]
    seen: set[str] = set()
    for index, raw in enumerate(cases):
        case_id = raw.get("id") if isinstance(raw, dict) else None
        where = f"case {case_id!r}" if isinstance(case_id, str) else f"case #{index}"
        _check_case(raw, where, problems, file_profile)
        if isinstance(case_id, str):
            if case_id in seen:
                problems.append(f"duplicate case id {case_id!r}")
            seen.add(case_id)
    return problems


def _check_prompt_counts(cases: dict[str, BaselineCase], expected: int | Mapping[str, int]) -> list[str]:
    problems = []
    for case_id, case in sorted(cases.items()):
        wanted = expected if isinstance(expected, int) else expected.get(case_id)
        if wanted is not None and case.kind == "decode" and len(case.per_prompt_tau) != wanted:
            problems.append(f"case {case_id!r} has {len(case.per_prompt_tau)} per-prompt taus but the current "
                            f"case runs {wanted} prompts (prompt set changed? re-record with --update-baselines)")
    return problems


def _raise(path: Path, problems: list[str]) -> None:
    raise BaselineError(f"Bad baseline file {path}: " + "; ".join(problems))


def _from_json(data: dict) -> BaselineFile:
    cases = {}
    for raw in data["cases"]:
        kind = raw.get("kind", "decode")
        samples_key = THROUGHPUT_SAMPLES[kind]
        throughput = {testbed: {**entry, samples_key: [float(v) for v in entry[samples_key]]}
                      for testbed, entry in raw["throughput"].items()}
        common = dict(id=raw["id"], fingerprint=raw["fingerprint"], provenance=raw["provenance"], code=raw["code"],
                      throughput=throughput, reference=raw.get("reference"))
        if kind == "outcomes":
            per_query = {"qids": list(raw["per_query"]["qids"]),
                         "correct": [int(c) for c in raw["per_query"]["correct"]]}
            cases[raw["id"]] = BaselineCase(**common, kind="outcomes", per_query=per_query)
            continue
        cases[raw["id"]] = BaselineCase(**common, per_prompt_tau=[float(t) for t in raw["per_prompt_tau"]],
                                        counters=raw["counters"])
    return BaselineFile(profile=data["profile"], ablation=data["ablation"], cases=cases,
                        schema_version=data["schema_version"])


# --------------------------------------------------------------------------------------------------
# Public API


def load_baselines(path: str | os.PathLike, *, profile: str | None = None, ablation: str | None = None,
                   n_prompts: int | Mapping[str, int] | None = None) -> BaselineFile:
    """Read and validate a baseline file. profile/ablation default to the path layout
    (baselines/<profile>/<ablation>.json); n_prompts (one count for all cases, or per case id) checks that
    each per-prompt vector still matches the current case. Raises BaselineError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BaselineError(f"Baseline file {path} does not exist; record it with --update-baselines.") from None
    except OSError as error:  # a directory, no permission, an I/O error
        raise BaselineError(f"Bad baseline file {path}: cannot be read ({error.strerror or error}); it must be a "
                            "readable JSON file (re-record it with --update-baselines).") from None
    except UnicodeDecodeError as error:
        raise BaselineError(f"Bad baseline file {path}: not UTF-8 text ({error.reason} at byte {error.start}); "
                            "restore it from git or re-record it with --update-baselines.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise BaselineError(f"Bad baseline file {path}: invalid JSON at line {error.lineno}, column "
                            f"{error.colno}: {error.msg}") from None
    problems = _validate(data, path, profile=profile, ablation=ablation)
    if problems:
        _raise(path, problems)
    baselines = _from_json(data)
    if n_prompts is not None:
        problems = _check_prompt_counts(baselines.cases, n_prompts)
        if problems:
            _raise(path, problems)
    return baselines


@contextlib.contextmanager
def locked(directory: str | os.PathLike, wait: bool = True):
    """Exclusive lock on a baselines directory (flock on the directory itself, so no lock file is left behind)
    around a read-modify-write: two runs updating the same profile's baselines at once wait for each other
    instead of losing one's update. `wait=False`: yields None at once when another holds the lock."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        yield directory
    finally:
        os.close(fd)  # releases the lock


def write_baselines(path: str | os.PathLike, data: BaselineFile | dict, *, dry_run: bool = False) -> str:
    """Validate `data` (a BaselineFile or its JSON dict), replace the file atomically (the old file stays
    intact if anything fails) and return a human-readable summary of what changed. `dry_run`: only the
    summary, nothing written."""
    path = Path(path)
    document = data.to_json() if isinstance(data, BaselineFile) else data
    problems = _validate(document, path, profile=None, ablation=None)
    if problems:
        raise BaselineError(f"Refusing to write baseline file {path}: " + "; ".join(problems))
    new = _from_json(document)
    old: BaselineFile | None = None
    note = ""
    if path.exists():
        try:
            old = load_baselines(path)
        except BaselineError as error:
            note = f"replaced an unreadable file ({error})\n"
    if not dry_run:
        atomic_write_text(path, json.dumps(new.to_json(), indent=2, sort_keys=True) + "\n")
    return note + diff_baselines(old, new, path)


def diff_baselines(old: BaselineFile | None, new: BaselineFile, path: str | os.PathLike = "") -> str:
    """Lines like `+ bs=16 (tau 7.47, n=30)`, `- bs=24`, `~ bs=8: tau mean 5.40 -> 5.32 (-1.5%)`."""
    header = f"baselines {path}".rstrip()
    if old is None:
        lines = [f"+ {cid} ({_headline(c)})" for cid, c in sorted(new.cases.items())]
        return "\n".join([f"{header}: new file with {len(new.cases)} case(s)", *lines])
    lines = []
    for cid in sorted(set(old.cases) | set(new.cases)):
        before, after = old.cases.get(cid), new.cases.get(cid)
        if before is None:
            lines.append(f"+ {cid} ({_headline(after)})")
        elif after is None:
            lines.append(f"- {cid}")
        elif before != after:
            lines.append(f"~ {cid}: {_case_change(before, after)}")
    if not lines:
        return f"{header}: no changes"
    return "\n".join([f"{header}: {len(lines)} case(s) changed", *lines])


def _headline(case: BaselineCase) -> str:
    measure, mean, n = case.headline
    return f"{measure} {mean:.3f}, n={n}"


def _case_change(before: BaselineCase, after: BaselineCase) -> str:
    (measure, old_mean, old_n), (_, new_mean, new_n) = before.headline, after.headline
    rel = f" ({(new_mean - old_mean) / old_mean:+.1%})" if old_mean else ""
    parts = [f"{measure} mean {old_mean:.3f} -> {new_mean:.3f}{rel}"]
    if old_n != new_n:
        parts.append(f"n {old_n} -> {new_n}")
    changed = [k for k in ("counters", "per_query", "code", "fingerprint", "provenance", "reference")
               if getattr(before, k) != getattr(after, k)]
    changed += [f"throughput on {t}" for t in sorted(set(before.throughput) | set(after.throughput))
                if before.throughput.get(t) != after.throughput.get(t)]
    if changed:
        parts.append("changed: " + ", ".join(changed))
    return "; ".join(parts)


def coverage(baselines_dir: str | os.PathLike, profile: str, expected: Mapping[str, set[str]]) -> dict:
    """Which gated cases lack a baseline entry and which entries no case produces. `expected`: ablation name ->
    case ids the collected tests produce on `profile`. Returns {"missing": [...], "orphaned": [...]} (sorted
    case ids; an unreadable file is reported under "unreadable"), and "testbeds": ablation -> {testbed key:
    entries with throughput recorded there}."""
    root = Path(baselines_dir) / profile
    stored: dict[str, set[str]] = {}
    testbeds: dict[str, dict[str, int]] = {}
    unreadable = []
    for path in sorted(root.glob("*.json")) if root.is_dir() else []:
        try:
            cases = load_baselines(path, profile=profile, ablation=path.stem).cases
        except BaselineError as error:
            unreadable.append(str(error))
            continue
        stored[path.stem] = set(cases)
        for case in cases.values():
            for testbed in case.throughput:
                counts = testbeds.setdefault(path.stem, {})
                counts[testbed] = counts.get(testbed, 0) + 1
    missing = sorted(i for ablation, ids in expected.items() for i in ids - stored.get(ablation, set()))
    orphaned = sorted(i for ablation, ids in stored.items() for i in ids - expected.get(ablation, set()))
    return {"missing": missing, "orphaned": orphaned, "unreadable": unreadable, "testbeds": testbeds}


def _behaviour(case: dict):
    """What a baseline entry says the case does, apart from timing: per-prompt taus, or per-query correctness."""
    return case.get("per_query", {}).get("correct") if case.get("kind") == "outcomes" else case.get("per_prompt_tau")


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
        path = baseline_path(baselines_dir, profile, ablation)
        with locked(path.parent):
            cases = {}
            if path.exists():
                try:
                    old = load_baselines(path, profile=profile, ablation=ablation)
                    cases = {k: v.to_json() for k, v in old.cases.items()}
                except BaselineError:
                    pass  # write_baselines notes that it replaced an unreadable file
            dropped = []
            for payload in payloads:
                case = {k: v for k, v in payload.items() if k not in ("profile", "ablation")}
                if case.get("reference") is None:
                    case.pop("reference", None)
                old_case = cases.get(payload["id"], {})
                kept = old_case.get("throughput", {})
                if kept and _behaviour(old_case) != _behaviour(case):
                    # Other testbeds measured a case that now behaves differently (other taus or per-query
                    # outcomes): their timings describe other work, so they go; those testbeds take the A/B path.
                    dropped += [f"{payload['id']} on {t}" for t in kept if t not in case["throughput"]]
                    kept = {}
                case["throughput"] = {**kept, **case["throughput"]}  # other testbeds' throughput stays
                cases[payload["id"]] = case
            data = {"schema_version": SCHEMA_VERSION, "profile": profile, "ablation": ablation,
                    "cases": [cases[k] for k in sorted(cases)]}
            diffs.append(write_baselines(path, data, dry_run=dry_run))
            if dropped:
                diffs.append(f"  throughput dropped (the case's recorded behaviour changed, so another testbed's "
                             f"timings no longer describe it): {', '.join(dropped)}")
            if written is not None and not dry_run:
                written.append(path)
    return "\n".join(diffs)
