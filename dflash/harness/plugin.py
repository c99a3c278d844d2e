"""The pytest plugin behind `ablations/`: options, profile fixtures, per-case measurement and recording,
statistical gates against stored baselines, `--update-baselines`, `--resume` and `--report`.

Loaded by the root conftest.py. Under pytest-xdist every worker measures and appends its finished cases to the
run's JSONL results file; case records also travel to the controller in `user_properties`, where Holm's
correction over the whole run, baseline updates and the markdown report happen once.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..errors import DFlashError
from . import baselines as baseline_store
from .measure import TARGET_ONLY, Variant, compare, comparison_metrics, extend, warm_up
from .profiles import PROFILES, get_profile, load_prompts, unavailable_reason
from .results import ResultsFile
from .stats import apply_holm, tau_needs_more_prompts, throughput_gate, tau_gate

RECORD_KEY, BASELINE_KEY = "dflash_record", "dflash_baseline"
DEFAULT_PROFILES = ("tiny", "gpu-qwen3-4b", "gpu-qwen3-8b")
SEEDS = {"prompt_seed": "index of the prompt", "torch": 0}


def pytest_addoption(parser):
    group = parser.getgroup("dflash", "DFlash ablations")
    group.addoption("--profile", default=None, help=f"profile to run ({', '.join(PROFILES)}); default: tiny, and "
                    "the GPU profiles as cases marked gpu (skipped without CUDA and weights)")
    group.addoption("--report", action="store_true", help="write reports/<profile>-<time>/summary.md (+ plots)")
    group.addoption("--update-baselines", action="store_true", help="rewrite baselines/<profile>/*.json from "
                    "this run (the only way baselines change)")
    group.addoption("--resume", action="store_true", help="continue the latest run of the profile: skip cases "
                    "already in its results file")
    group.addoption("--tau-margin", type=float, default=0.03, help="practical margin of the tau gate (0.03 = 3%%)")
    group.addoption("--throughput-factor", type=float, default=1.10, help="asv-style factor of the speedup gate")
    group.addoption("--gate-alpha", type=float, default=0.05, help="family-wise significance level of the gates")
    group.addoption("--target", dest="dflash_target", default=None,
                    help="override the profile's target (a known name, local directory or hub id)")
    group.addoption("--draft", dest="dflash_draft", default=None,
                    help="override the profile's draft, e.g. a perturbed copy to check that the gates fire")
    group.addoption("--reports-dir", default="reports", help="where run directories are written")
    group.addoption("--baselines-dir", default="baselines", help="where baseline files live")


def pytest_configure(config):
    config.addinivalue_line("markers", "ablation(name, ci_datasets=None, prompts_cap=None): an ablation case; "
                            "name is its baseline file; with ci_datasets, cases on other datasets are marked slow; "
                            "prompts_cap lowers the profile's cap for an expensive ablation")
    config.addinivalue_line("markers", "gpu: needs CUDA and real checkpoints in the local HF cache")
    config.addinivalue_line("markers", "slow: long-running; excluded from make test")
    name = config.getoption("profile")
    if name is not None and name not in PROFILES:
        raise pytest.UsageError(f"unknown --profile {name!r}; choose one of {', '.join(PROFILES)}")
    state = RunState(config)
    config.stash[STATE] = state
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(Controller(state), "dflash-controller")
        if config.getoption("report"):
            config.pluginmanager.register(ReportWriter(state), "dflash-report")


class RunState:
    """What one pytest run shares: profiles, where results go, loaded models per profile, the gate family."""

    def __init__(self, config):
        self.config = config
        explicit = config.getoption("profile")
        self.profiles = (explicit,) if explicit else DEFAULT_PROFILES
        self.root = Path(config.rootpath)
        self.reports_dir = self.root / config.getoption("reports_dir")
        self.baselines_dir = self.root / config.getoption("baselines_dir")
        worker_input = getattr(config, "workerinput", None)
        if worker_input and "dflash_run_dirs" in worker_input:
            self.run_dirs = {k: Path(v) for k, v in worker_input["dflash_run_dirs"].items()}
        else:
            self.run_dirs = {p: self._run_dir(p) for p in self.profiles}
        self.models: dict[str, object] = {}
        self.prompts: dict[tuple, list] = {}
        self.gated_cases = 0
        self.records: list[dict] = []
        self.baseline_payloads: list[dict] = []
        self.holm: list[dict] = []
        self.baseline_diff = ""

    def _run_dir(self, profile: str) -> Path:
        if self.config.getoption("resume"):
            runs = sorted(self.reports_dir.glob(f"{profile}-*/results.jsonl"))
            if runs:
                return runs[-1].parent
        return self.reports_dir / f"{profile}-{time.strftime('%Y%m%d-%H%M%S')}"

    def results(self, profile: str) -> ResultsFile:
        return ResultsFile(self.run_dirs[profile] / "results.jsonl")


STATE = pytest.StashKey[RunState]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist: every worker writes into the run directories the controller chose."""
    state = node.config.stash[STATE]
    node.workerinput["dflash_run_dirs"] = {k: str(v) for k, v in state.run_dirs.items()}


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


@pytest.hookimpl(tryfirst=True)  # before -m deselects: it must see the slow marks added here
def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.ablation(name, ci_datasets=(...))`: cases on other datasets are marked slow, so `make test`
    (-m "not slow") gates a representative subset within its budget and `pytest ablations` runs them all."""
    state = config.stash[STATE]
    for item in items:
        marker = item.get_closest_marker("ablation")
        callspec = getattr(item, "callspec", None)
        if marker is None or callspec is None or "case" not in callspec.params:
            continue
        ci_datasets = marker.kwargs.get("ci_datasets")
        if ci_datasets is not None and callspec.params["case"][1] not in ci_datasets:
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session):
    """The gate family is the cases that will run (after -m / -k deselection)."""
    session.config.stash[STATE].gated_cases = sum(
        1 for item in session.items if item.get_closest_marker("ablation") and "case" in
        getattr(item, "fixturenames", ()))


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
        self.experiment_id = f"{self.ablation}/{request.node.name}"  # e.g. block_size/test_sweep[tiny-math-bs=8]
        self.models = _models(state, profile)
        self.update = request.config.getoption("update_baselines")
        self._warmed = False

    @property
    def prompts_cap(self) -> int:
        """Prompts a baseline records (and a run may gather up to): the profile's cap, or a lower one that an
        expensive ablation sets with `@pytest.mark.ablation(name, prompts_cap=N)`."""
        cap = self.request.node.get_closest_marker("ablation").kwargs.get("prompts_cap")
        return min(cap, self.profile.prompts_cap) if cap else self.profile.prompts_cap

    @property
    def draft_block_size(self) -> int:
        return self.models.draft.block_size

    def prompts(self, count: int) -> list[list[int]]:
        key = (self.profile.name, self.spec.name)
        cached = self.state.prompts.get(key, [])
        if len(cached) < count:
            cached = load_prompts(self.profile, self.spec, self.models.tokenizer, count)
            self.state.prompts[key] = cached
        return cached[:count]

    def compare(self, variant: Variant, *, max_new_tokens: int | None = None, count: int | None = None,
                others: tuple[Variant, ...] = (), first: int = 0):
        """Interleaved baseline/variant runs on prompts first..count-1 (all of them when recording baselines,
        so later runs can gather more prompts up to the cap against it)."""
        count = count or (self.prompts_cap if self.update else self.profile.prompts)
        prompts = self.prompts(count)
        if not self._warmed:
            warm_up(self.models, prompts[0], [TARGET_ONLY, variant, *others], self.models.stop_ids)
            self._warmed = True
        return compare(self.models, prompts[first:], variant, stop_ids=self.models.stop_ids,
                       max_new_tokens=max_new_tokens or self.profile.max_new_tokens, others=others,
                       repeats=self.profile.timing_repeats, label=self.experiment_id, first_index=first)

    def measure(self, variant: Variant, *, max_new_tokens: int | None = None, extra=None,
                others: tuple[Variant, ...] = (), gate_tau: bool = True):
        """Compare, then gate. While the tau evidence is unknown (`stats.tau_needs_more_prompts`: a drop beyond
        the margin but not significant after the run's multiplicity correction, or a suggestive smaller one),
        gather more prompts (Pinpoint style: doubling, only the new prompts are run) up to what the baseline
        holds; at that cap an inconclusive case is reported, never failed or retried. `gate_tau=False`: tau is
        reported only (no tau gate, so no prompts are gathered for it)."""
        max_new = self.max_new_tokens = max_new_tokens or self.profile.max_new_tokens
        count = self.prompts_cap if self.update else self.profile.prompts
        comparison, done = None, 0
        while True:
            more = self.compare(variant, max_new_tokens=max_new, count=count, others=others, first=done)
            comparison = more if comparison is None else extend(comparison, more)
            done = count
            metrics = comparison_metrics(comparison, max_new)
            if extra is not None:
                metrics.update(extra(comparison))
            gates = [g for g in self._gates(metrics) if gate_tau or g.kind != "tau"]
            tau = next((g for g in gates if g.kind == "tau"), None)
            if not (self.update or tau is None) and (decision := tau_needs_more_prompts(
                    tau, family=self._family, max_prompts=self._baseline_prompts())).gather_more:
                count = decision.next_n
                continue
            metrics["float_ties"] = self._float_ties(comparison)
            return comparison, metrics, gates

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
                tie = float_tie(self.models.target, prompt, base.output_ids, new.output_ids)
                if tie:
                    ties[str(i)] = tie
        return ties

    @property
    def _family(self) -> int:
        return max(1, self.state.gated_cases)

    def _baseline_case(self):
        if not hasattr(self, "_baseline"):
            path = baseline_store.baseline_path(self.state.baselines_dir, self.profile.name, self.ablation)
            self._baseline = baseline_store.load_baselines(
                path, profile=self.profile.name, ablation=self.ablation).get(self.experiment_id) \
                if path.exists() else None
        return self._baseline

    def _baseline_prompts(self) -> int:
        baseline = self._baseline_case()
        return len(baseline.per_prompt_tau) if baseline else self.profile.prompts

    def _gates(self, metrics):
        baseline = self._baseline_case()
        if baseline is None or self.update:
            return []
        n = len(metrics["per_prompt_tau"])
        if len(baseline.per_prompt_tau) < n:
            raise DFlashError(f"baseline of {self.experiment_id} has {len(baseline.per_prompt_tau)} prompts, the "
                              f"run has {n}: re-record with --update-baselines")
        config = self.request.config
        fingerprint = baseline_store.collect_fingerprint(self.profile.name, SEEDS)
        return [
            tau_gate(baseline.per_prompt_tau[:n], metrics["per_prompt_tau"], margin=config.getoption("tau_margin"),
                     alpha=config.getoption("gate_alpha"), case_id=self.experiment_id),
            throughput_gate(baseline.speedup_samples, metrics["speedup_samples"],
                            factor=config.getoption("throughput_factor"), alpha=config.getoption("gate_alpha"),
                            baseline_fingerprint=baseline.fingerprint, current_fingerprint=fingerprint,
                            case_id=self.experiment_id),
        ]

    def finish(self, experiment: str, params: dict, metrics: dict, gates, *, lossless: bool = True) -> dict:
        """Record the case (results file + user_properties), then fail on a lost invariant or a regression."""
        record = {"id": self.experiment_id, "experiment": experiment, "ablation": self.ablation,
                  "group": f"{self.spec.name}, max_new_tokens={self.max_new_tokens}",
                  "profile": self.profile.name, "dataset": self.spec.name, "params": params,
                  "metrics": metrics, "status": "done", "gates": [g.to_dict() for g in gates],
                  "fingerprint": baseline_store.collect_fingerprint(self.profile.name, SEEDS)}
        record = json.loads(json.dumps(record))  # plain types only: records cross process boundaries (xdist)
        self.state.results(self.profile.name).append(record)
        self.request.node.user_properties.append((RECORD_KEY, record))
        if self.update:
            self.request.node.user_properties.append((BASELINE_KEY, baseline_payload(record)))
        ties = metrics.get("float_ties", {})
        bad = [i for i, ok in enumerate(metrics.get("exact_match", [])) if not ok and str(i) not in ties]
        if lossless and bad:
            pytest.fail(f"{self.experiment_id}: greedy output differs from target-only on prompts {bad} (not float "
                        "ties): the lossless invariant is broken", pytrace=False)
        family = self._family
        for gate in gates:
            # Bonferroni within the case test (it implies Holm); Holm over the whole run runs at session end.
            if gate.gated and gate.verdict == "regression" and gate.p_value * family < gate.alpha:
                pytest.fail(f"{self.experiment_id}: {gate.kind} regression: baseline {gate.baseline:.3f} -> new "
                            f"{gate.new:.3f} ({gate.rel_change:+.1%}), one-sided p = {gate.p_value:.2e} "
                            f"(x{family} cases = {min(1.0, gate.p_value * family):.2e} < {gate.alpha})",
                            pytrace=False)
        return record


def baseline_payload(record: dict) -> dict:
    """A case's baseline entry from its results record: per-prompt taus, speedup samples, raw counters,
    fingerprint, provenance and the profile's published reference values (GPU profiles)."""
    metrics, profile = record["metrics"], get_profile(record["profile"])
    reference = profile.reference.get(record["dataset"])
    return {
        "profile": record["profile"], "ablation": record["ablation"], "id": record["id"],
        "per_prompt_tau": metrics["per_prompt_tau"], "speedup_samples": metrics["speedup_samples"],
        "counters": {k: metrics[k] for k in ("committed_tokens", "cycles", "hit_cap") if k in metrics},
        "fingerprint": record["fingerprint"],
        "provenance": {"command": "pytest ablations --update-baselines", "recorded": time.strftime("%F %T"),
                       "prompts": len(metrics["per_prompt_tau"])},
        "reference": reference and {**reference, "source": profile.reference["source"]},
    }


def baselines_from_run(run_dir: str | Path, baselines_dir: str | Path, ablations=None) -> str:
    """Write baselines from a run's results file: recovers a recording (`--update-baselines`) that was killed
    before its session ended, since every finished case was already appended there. Only records measured on
    at least the profile's gated prompt count qualify (a baseline must cover what a run compares)."""
    results = ResultsFile(Path(run_dir) / "results.jsonl")
    if not results.path.exists():
        raise DFlashError(f"{results.path} does not exist: pass a run directory under reports/ that has a "
                          "results.jsonl (e.g. reports/tiny-20261125-145546).")
    payloads = []
    for record in results.load():
        if ablations and record["ablation"] not in ablations:
            continue
        needed = get_profile(record["profile"]).prompts
        if len(record["metrics"]["per_prompt_tau"]) < needed:
            raise DFlashError(f"{record['id']} in {results.path} covers {len(record['metrics']['per_prompt_tau'])} "
                              f"prompts, fewer than the {needed} a run gates: it was not a baseline recording. "
                              "Re-record with pytest ablations --update-baselines.")
        payload = baseline_payload(record)
        payload["provenance"]["command"] += f" (recovered from {results.path})"
        payloads.append(payload)
    return _write_baselines(Path(baselines_dir), payloads)


@pytest.fixture
def case(request):
    state = request.config.stash[STATE]
    profile_name, dataset = request.param
    profile = get_profile(profile_name)
    reason = unavailable_reason(profile)
    if reason:
        pytest.skip(reason)
    made = Case(request, state, profile, dataset)
    if request.config.getoption("resume") and made.experiment_id in state.results(profile_name).completed_ids():
        pytest.skip(f"{made.experiment_id} already recorded in {state.results(profile_name).path} (--resume)")
    return made


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
    """Controller-side hooks (the only process in a run without xdist): collect records, Holm, baselines."""

    def __init__(self, state: RunState):
        self.state = state

    def pytest_runtest_logreport(self, report):
        if report.when != "call":
            return
        for key, value in report.user_properties:
            if key == RECORD_KEY:
                self.state.records.append(value)
            elif key == BASELINE_KEY:
                self.state.baseline_payloads.append(value)

    def pytest_sessionfinish(self, session):
        state = self.state
        state.holm = _holm_over_run(state)
        if any(g["verdict"] == "regression" for g in state.holm) and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if session.config.getoption("update_baselines") and state.baseline_payloads:
            state.baseline_diff = _write_baselines(state.baselines_dir, state.baseline_payloads)

    def pytest_terminal_summary(self, terminalreporter):
        state = self.state
        if state.holm:
            terminalreporter.section("dflash gates (Holm-corrected over the run)")
            for g in sorted(state.holm, key=lambda g: (g["verdict"] != "regression", g["case_id"], g["kind"])):
                terminalreporter.write_line(
                    f"{g['verdict']:>12s}  {g['kind']:10s} {g['case_id']}: baseline {g['baseline']:.3f} -> "
                    f"{g['new']:.3f} ({g['rel_change']:+.1%}), p {g['p_value']:.2e}, Holm {g['p_adjusted']:.2e}")
        if state.baseline_diff:
            terminalreporter.section("dflash baselines updated")
            terminalreporter.write_line(state.baseline_diff)


def _holm_over_run(state: RunState) -> list[dict]:
    """Holm's step-down over every gated comparison of the run (tau and throughput gates together)."""
    from .stats import TauGateResult, ThroughputGateResult
    gates = []
    for record in state.records:
        for g in record.get("gates", []):
            cls = TauGateResult if g["kind"] == "tau" else ThroughputGateResult
            fields = {k: v for k, v in g.items() if k in cls.__dataclass_fields__}
            fields.update(p_adjusted=None, p_improvement_adjusted=None)
            gates.append(cls(**fields))
    return [g.to_dict() for g in apply_holm(gates)]


def _write_baselines(baselines_dir: Path, payloads: list[dict]) -> str:
    by_file: dict[tuple, list] = {}
    for payload in payloads:
        by_file.setdefault((payload["profile"], payload["ablation"]), []).append(payload)
    diffs = []
    for (profile, ablation), payloads in sorted(by_file.items()):
        path = baseline_store.baseline_path(baselines_dir, profile, ablation)
        cases = {}
        if path.exists():
            old = baseline_store.load_baselines(path, profile=profile, ablation=ablation)
            cases = {k: v.to_json() for k, v in old.cases.items()}
        for payload in payloads:
            case = {k: v for k, v in payload.items() if k not in ("profile", "ablation")}
            if case.get("reference") is None:
                case.pop("reference", None)
            cases[payload["id"]] = case
        data = {"schema_version": baseline_store.SCHEMA_VERSION, "profile": profile, "ablation": ablation,
                "cases": [cases[k] for k in sorted(cases)]}
        diffs.append(baseline_store.write_baselines(path, data))
    return "\n".join(diffs)


class ReportWriter:
    """Registered only with --report: renders the run's results file into summary.md (+ plots)."""

    def __init__(self, state: RunState):
        self.state = state

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        from .plots import write_plots
        from .render import append_github_step_summary, render_summary, write_summary
        self.paths = []
        for profile, run_dir in self.state.run_dirs.items():
            records = self.state.results(profile).load() if self.state.results(profile).path.exists() else []
            announced = sorted({r["id"] for r in records} | {r["id"] for r in self.state.records
                                                             if r["profile"] == profile})
            if not records and unavailable_reason(get_profile(profile)):
                continue  # a profile that cannot run here gets no summary (its cases were skipped)
            holm = {(g["case_id"], g["kind"]): g for g in self.state.holm}
            for record in records:
                record["gates"] = [holm.get((g["case_id"], g["kind"]), g) for g in record.get("gates", [])]
            text = render_summary(records, baseline_store.collect_fingerprint(profile, SEEDS), announced=announced,
                                  title=f"dflash ablations: {profile}")
            path = write_summary(run_dir, text)
            write_plots(records, run_dir)
            append_github_step_summary(text)
            self.paths.append(path)

    def pytest_terminal_summary(self, terminalreporter):
        for path in getattr(self, "paths", []):
            terminalreporter.write_line(f"dflash report: {path}")
