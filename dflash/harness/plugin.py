"""The pytest plugin behind `ablations/`: options, hooks and fixtures (each registered family's fixture, e.g.
`case`, and `variant_<name>`); the controller's session end (Holm over the run, `--update-baselines`) and
`--report`.

Loaded through dflash/plugin.py (the harness plus the package's families). Under pytest-xdist every worker
measures and appends its finished cases to the run's JSONL results file; case records also travel to the
controller in `user_properties`, where Holm's correction over the whole run, baseline updates and the markdown
report happen once. What it builds on: `family` (the registry of ablation families), `runs` (the run's state,
identity, records and Holm), `case` (a case's record side: baseline, gates, finish, resume), `recording` (records
to baseline entries) and `baselines` (the baseline files).
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pytest

from ..argtypes import bounded_int
from ..errors import DFlashError
from ..loading import enforce_offline
from . import baselines as baseline_store
from .case import NO_BASELINE, RECORD_KEY, CaseRecord
from .family import FAMILIES, FamilyParam, FamilySpec, family_of_fixtures, on_register, remove_listener
from ..profiles import PROFILES
from .recording import baseline_payload
from .results import id_problem
from .runs import RunState, holm_over, identity_digest, incomplete_cases, remove_if_unused, writable_problem
from .stats import REGRESSION


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


def _regex_option(text: str) -> str:
    try:
        re.compile(text)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted: --ab-cases needs a regular expression over "
                                         f"case ids ({error}), e.g. --ab-cases 'block_size/.*math'") from None
    return text


def _shard_option(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted: --shard needs I/N with 1 <= I <= N, e.g. "
                                         "--shard 2/4 for the second of four runners")
    return int(match[1]), int(match[2])


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
    group.addoption("--prompts", dest="dflash_prompts", type=bounded_int(1), default=None,
                    help="prompts per case (and their cap) instead of the profile's: a short rehearsal")
    group.addoption("--max-new-tokens", dest="dflash_max_new_tokens", type=bounded_int(1),
                    default=None, help="token budget of every case (full-length ones too) instead of the profile's")
    group.addoption("--tau-accounting", choices=("engine", "upstream"), default="engine",
                    help="engine: the last block shrinks to the token budget; upstream: plain-DFlash cases keep "
                    "full-size tail blocks and count what they accept, as the published tau does (compare with "
                    "published figures with this; baselines are recorded with engine)")
    group.addoption("--allow-downloads", action="store_true", help="let the Hugging Face clients fetch missing "
                    "weights and datasets (default: offline, a missing one skips its cases with the command "
                    "that fetches it)")
    group.addoption("--ab-ref", default=None, metavar="REF", help="gate every throughput against commit REF "
                    "measured on this machine in this run (A/B, e.g. --ab-ref origin/main in PR CI) instead of the "
                    "stored baselines; by default a testbed with no stored throughput is A/B-gated against the code "
                    "its baseline was recorded with")
    group.addoption("--ab-cases", type=_regex_option, default="", metavar="REGEX", help="the cases (by case id, "
                    "re.search) that may take the A/B path when this testbed has no stored throughput; others "
                    "are reported NOT GATED with the reason (default: every case)")
    group.addoption("--session", default=None, metavar="NAME", help="run only the ablations of the families "
                    "whose FamilySpec.session is NAME (make test runs each session in a pytest process of its own; "
                    "`dflash sessions` lists them)")
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

    def add_fixture(spec: FamilySpec) -> None:
        config.pluginmanager.register(_family_fixture(spec), f"dflash-family-{spec.name}")
    state.family_listener = add_fixture
    on_register(add_fixture)
    config.pluginmanager.register(Selection(state), "dflash-selection")
    if not hasattr(config, "workerinput"):
        _check_options(config, state)
        state.open_runs()
        config.pluginmanager.register(Controller(state), "dflash-controller")
        if config.getoption("report"):
            config.pluginmanager.register(ReportWriter(state), "dflash-report")


def pytest_unconfigure(config):
    """Every process: its A/B reference workers stop with it."""
    state = config.stash.get(STATE, None)
    if state is not None:
        state.close_references()
        remove_listener(state.family_listener)


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


STATE = pytest.StashKey[RunState]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist: every worker writes into the run directories the controller chose, with its identities."""
    state = node.config.stash[STATE]
    node.workerinput["dflash_run_dirs"] = {k: str(v) for k, v in state.run_dirs.items()}
    node.workerinput["dflash_identities"] = state.identities


def pytest_generate_tests(metafunc):
    """A test that takes a family's fixture is parametrized over that family's parameters for the run's profiles
    (the decode family: (profile, dataset), GPU profiles marked gpu; a family with profiles of its own: those)."""
    state = metafunc.config.stash[STATE]
    for spec in FAMILIES.values():
        if spec.fixture in metafunc.fixturenames:
            params = spec.params(state.profiles)
            metafunc.parametrize(spec.fixture, [pytest.param(p, id=p.id, marks=p.marks) for p in params],
                                 indirect=True)


ABLATION_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # it names a file: baselines/<profile>/<name>.json


def ablation_case(item) -> dict | None:
    """{"id", "profile", "dataset", "ablation", "gated", "family"} of a collected ablation case; None for any other
    test."""
    marker = item.get_closest_marker("ablation")
    callspec = getattr(item, "callspec", None)
    spec = family_of_fixtures(callspec.params) if callspec is not None else None
    if marker is None or spec is None:
        return None
    param = callspec.params[spec.fixture]
    if not isinstance(param, FamilyParam):  # no such profile in this run: pytest's empty-parameter skip
        return None
    name = marker.args[0] if marker.args else ""
    return {"id": f"{name}/{item.name}", "profile": param.profile, "dataset": param.dataset, "ablation": name,
            "gated": marker.kwargs.get("gated", True), "family": spec.name}


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
        info = ablation_case(item)
        ci_datasets = marker.kwargs.get("ci_datasets")
        ci_cases = PROFILES[info["profile"]].ci_cases
        if ci_cases is not None:  # a profile with its own CI tier (the GPU profiles: one GPU-hour)
            if not re.search(ci_cases, info["id"]):
                item.add_marker(pytest.mark.slow)
        elif ci_datasets is not None and info["dataset"] not in ci_datasets:
            item.add_marker(pytest.mark.slow)


GATES_PER_CASE = 2  # tau and throughput (outcomes: accuracy and cost): the family counts both per gated case


class Selection:
    """After -m / -k deselection: fix the gate family, then keep this shard's share (--shard I/N)."""

    def __init__(self, state: RunState):
        self.state = state

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        """The family is two gates per gated case of the whole selection (every shard's) whose profile can run
        here: a case that will skip for want of CUDA, weights or data is not a look, so it costs no alpha."""
        state = self.state
        session = config.getoption("session")
        if session is not None:
            _keep_session(config, items, session)
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


def _keep_session(config, items: list, session: str) -> None:
    """--session NAME: deselect the tests of families in other sessions. A test that takes no family fixture goes
    with the family of the case tests in its module (a GPU-only test beside its family's ablation)."""
    known = {spec.session for spec in FAMILIES.values()}
    if session not in known:
        raise pytest.UsageError(f"--session {session!r} is no family's session; the sessions are: "
                                f"{', '.join(sorted(known))}")
    by_module = {}
    for item in items:
        if (info := ablation_case(item)) is not None:
            by_module.setdefault(item.nodeid.split("::")[0], FAMILIES[info["family"]].session)
    default = FAMILIES[next(iter(FAMILIES))].session

    def session_of(item) -> str:
        info = ablation_case(item)
        if info is not None:
            return FAMILIES[info["family"]].session
        return by_module.get(item.nodeid.split("::")[0], default)
    dropped = [item for item in items if session_of(item) != session]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if session_of(item) == session]


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
        print(f"  this machine is testbed {state.fingerprint(profile)['testbed']}")
        for ablation, counts in sorted(found["testbeds"].items()):
            print(f"  {ablation}: throughput on " + ", ".join(f"{t} ({n} cases)" for t, n in sorted(counts.items())))
        for key in ("missing", "orphaned", "unreadable"):
            for entry in found[key]:
                print(f"  {key}: {entry}")
        problems += sum(len(found[k]) for k in ("missing", "orphaned", "unreadable"))
    if problems:
        print("record missing entries with `pytest ablations --profile PROFILE --update-baselines -k ...`; remove "
              "orphaned ones from the file (a renamed case leaves its old entry behind)")
    state.coverage_problems = problems


def family_case(request, spec: FamilySpec) -> CaseRecord:
    """The object a family's fixture gives an ablation test: checked marker, --resume's record, or a one-line
    skip where the case cannot run here."""
    state = request.config.stash[STATE]
    if request.node.get_closest_marker("ablation") is None:
        pytest.fail(f"{request.node.nodeid} uses the `{spec.fixture}` fixture without @pytest.mark.ablation(name): "
                    "the name says which baseline file (baselines/<profile>/<name>.json) gates it", pytrace=False)
    problem = ablation_problem(request.node)
    if problem:
        pytest.fail(f"{request.node.nodeid!r}: {problem}", pytrace=False)
    made = spec.make_case(request, state, spec, request.param)
    if request.config.getoption("resume"):
        made.recorded = state.recorded(made.profile.name).get(made.experiment_id)
        if made.recorded is not None:
            return made  # pytest_pyfunc_call re-applies its verdict instead of measuring
    reason = made.unavailable()
    if reason:
        pytest.skip(reason)
    return made


def _family_fixture(spec: FamilySpec):
    """A plugin object holding the family's fixture (pytest reads fixtures of plugins registered at any time
    before the tests that use them are collected)."""
    def fixture(self, request):
        return family_case(request, spec)
    fixture.__name__ = spec.fixture
    fixture.__doc__ = f"A case of the {spec.display_name} ablation family (dflash.harness.family.FamilySpec)."
    return type(f"{spec.name}_family_fixture", (), {spec.fixture: pytest.fixture(fixture, name=spec.fixture)})()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """--resume: a recorded case is not measured again; its recorded verdict is re-applied."""
    made = next((pyfuncitem.funcargs[s.fixture] for s in FAMILIES.values() if s.fixture in pyfuncitem.funcargs),
                None)
    if isinstance(made, CaseRecord) and made.recorded is not None:
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
            state.holm = holm_over(state.records.values(), state.family)
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
                remove_if_unused(run_dir)
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
                state.baseline_diff = baseline_store.write_baseline_payloads(state.baselines_dir, payloads,
                                                                             written=written)
                dirty = sorted({p["code"] for p in payloads if "+" in p["code"]})
                if dirty:
                    state.baseline_diff += (f"\nNOTE: recorded from uncommitted changes ({', '.join(dirty)}): no A/B "
                                            "can check this code out again, so a testbed without stored throughput "
                                            "will report these cases NOT GATED. Commit first, then record.")
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
                if g.get("not_gated"):
                    continue  # no p-value to adjust: listed under NOT GATED below
                terminalreporter.write_line(
                    f"{g['verdict']:>12s}  {g['kind']:10s} {g['case_id']}: baseline {g['baseline']:.3f} -> "
                    f"{g['new']:.3f} ({g['rel_change']:+.1%}), p {g['p_value']:.2e}, Holm {g['p_adjusted']:.2e}")
        references: dict[str, int] = {}
        not_gated = []
        for record in state.records.values():
            for gate in record.get("gates", []):
                if gate.get("kind") == "throughput":
                    if gate.get("not_gated"):
                        not_gated.append((record["id"], gate["not_gated"]))
                    else:
                        references[gate.get("source") or "?"] = references.get(gate.get("source") or "?", 0) + 1
        if references:
            terminalreporter.section("dflash throughput references")
            for source, count in sorted(references.items()):
                terminalreporter.write_line(f"{count:4d} case(s) gated against {source}")
        if not_gated:
            terminalreporter.section(f"dflash: NOT GATED (throughput of {len(not_gated)} case(s))", red=True)
            for case_id, reason in sorted(not_gated):
                terminalreporter.write_line(f"NOT GATED  {case_id}: {reason}")
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
        from .render import append_github_step_summary, plots_section, render_summary, write_summary
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
        # the measuring processes' own fingerprint (its thread count is theirs, not the controller's)
        fingerprint = next((r["fingerprint"] for r in records if r.get("fingerprint")), None) \
            or state.fingerprint(profile)
        text = render_summary(records, fingerprint, announced=announced,
                              skipped=skipped, title=f"dflash ablations: {profile}")
        notes: list[str] = []
        try:  # before the summary, which shows the plots and says why any was left out
            plots, plot_error = [p.name for p in write_plots(records, run_dir, notes)], None
        except Exception as error:
            plots, plot_error = [], error
        section = plots_section(plots, notes)
        path = write_summary(run_dir, text + (f"\n{section}" if section else ""))
        self.paths.append(path)
        try:
            append_github_step_summary(text)
        except Exception as error:
            self._missing(path, "$GITHUB_STEP_SUMMARY", error)
        if plot_error is not None:
            self._missing(path, "the plots", plot_error)

    def _missing(self, path: Path, what: str, error: Exception) -> None:
        """The summary itself is written: say what is missing, keep going."""
        _session_error(self.session, self.state, f"--report: {path} is written, but {what} could not be "
                       f"({type(error).__name__}: {error}).")

    def pytest_terminal_summary(self, terminalreporter):
        for path in self.paths:
            terminalreporter.write_line(f"dflash report: {path}")
