"""The record side of every ablation case, whatever its family: baseline lookup, throughput references (stored or
A/B), gates, the verdict, the record and --resume's replay (`CaseRecord`); and `OutcomesCase`, the case of a
method that is not lossless, gated on per-query outcomes. How a case measures is its family's: decode cases
(dflash.harness.decode_case) compare a variant with target-only on prompts; other families build their own."""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Callable

import pytest

from . import baselines as baseline_store
from .reference import ReferenceUnavailable
from .runs import RunState, identity_digest
from .stats import REGRESSION, accuracy_gate, confirm, not_gated_throughput, throughput_gate

RECORD_KEY = "dflash_record"


@dataclass(frozen=True)
class ThroughputReference:
    """The samples a throughput gate compares with (`samples`: the baseline kind's raw throughput samples) and
    where they come from (`source`); `ab`: measured in this run by the reference code, so it can be re-measured."""
    samples: list
    source: str
    ab: bool = False


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


class CaseRecord:
    """One ablation case of a family (`family`: its FamilySpec): the case id, its baseline entry, the throughput
    gate's reference on this testbed, the decision and the record. A family's case adds how it measures; every
    ablation test reads the same way: build the thing the case measures, measure it, `finish`."""
    dataset_name = "outcomes"  # the record's dataset, and its report group ("<dataset>, max_new_tokens=<budget>")

    def __init__(self, request, state: RunState, profile, family):
        self.request, self.state, self.profile, self.family = request, state, profile, family
        self.ablation = request.node.get_closest_marker("ablation").args[0]
        self.experiment_id = f"{self.ablation}/{request.node.name}"  # e.g. block_size/test_sweep[tiny-math-bs8]
        self.update = state.update
        self.recorded: dict | None = None  # --resume: this case's record from the run being continued

    def unavailable(self) -> str | None:
        """Why this case cannot run here (one line: the skip reason), or None."""
        raise NotImplementedError

    @property
    def budget(self) -> int | None:
        """The token budget a case reports when its params name none (None: a family that decodes no tokens)."""
        return self.profile.max_new_tokens

    @property
    def clock(self) -> str:
        return self.profile.clock

    def invariant_failures(self, metrics: dict) -> list[str]:
        """What the case's measurement broke that must hold whatever the baseline (a lossless method's output)."""
        return []

    def references(self, params: dict, budget: int) -> list:
        """Published figures that describe this case."""
        return []

    def prompt_rendering(self) -> dict:
        """How the case's prompts were rendered, written into its record: `prompt_template` ("raw", or the chat
        template's identity) and `thinking` ("on", "off", "none"); see dflash.prompts.prompt_rendering. None
        for both: a family whose prompts do not come from the profile's datasets."""
        return {"prompt_template": None, "thinking": None}

    def gate_throughput(self, baseline, samples: list[float], remeasure=None, *,
                        as_speedups: Callable[[list[float]], list[float]] = list):
        """Paired speedup gate against this testbed's reference (`throughput_reference`: the stored baseline of
        this testbed, or the baseline's code measured here by A/B); `as_speedups` turns the reference's samples
        into the speedups `samples` are compared with. A first reading of "regression" (before the run's
        multiplicity correction, so that every gate the session-end Holm could flag has been confirmed) is
        re-measured once on the same prompts, the A/B reference too, and the gate fails only when the
        re-measurement is a regression as well (`stats.confirm`). No reference: "not gated", with the reason."""
        options = dict(factor=self._option("throughput_factor"), alpha=self._option("gate_alpha"),
                       case_id=self.experiment_id)
        reference = self.throughput_reference(baseline)
        if isinstance(reference, str):
            return not_gated_throughput(samples, reference, **options)

        def gate(reference: ThroughputReference, values: list[float]):
            base = as_speedups(reference.samples)
            return throughput_gate(base, values[:len(base)], source=reference.source, **options)
        first = gate(reference, samples)
        if first.verdict != REGRESSION or remeasure is None:
            return first
        if reference.ab:
            again = self.throughput_reference(baseline, again=True)
            reference = reference if isinstance(again, str) else again  # keep the first if it cannot run again
        return confirm(first, gate(reference, remeasure()))

    def throughput_reference(self, baseline, again: bool = False) -> "ThroughputReference | str":
        """What this case's throughput is compared with on this testbed: with `--ab-ref REF`, REF measured here;
        else the baseline's samples stored for this testbed; else, for the cases `--ab-cases` selects, the code
        the baseline was recorded with, measured here (A/B). A string says why there is nothing to compare with
        (and how to gate the case). `again`: the A/B reference measured anew (the confirmation step)."""
        testbed = self.fingerprint["testbed"]
        explicit = self._option("ab_ref")
        if not explicit:
            stored = baseline.samples_on(testbed)
            if stored is not None:
                return ThroughputReference(stored, f"stored baseline, testbed {testbed}")
            pattern = self._option("ab_cases")
            if not re.search(pattern, self.experiment_id):
                return (f"no stored throughput for testbed {testbed}, and --ab-cases {pattern!r} leaves this case "
                        "out of the A/B against the baseline's code (run without that option to A/B it, or record "
                        "this testbed with --update-baselines)")
        ref = explicit or baseline.code
        try:
            record, sha = self.state.reference_record(ref, self, again=again)
        except ReferenceUnavailable as error:
            return f"no stored throughput for testbed {testbed}, and no A/B reference: {error}"
        metrics = record.get("metrics") or {}
        raw = (metrics.get("per_query") or {}).get("cost") if baseline.kind == "outcomes" \
            else metrics.get("speedup_samples")
        if not raw:
            return (f"no stored throughput for testbed {testbed}, and the A/B reference {sha[:12]} recorded no "
                    f"throughput samples for this case")
        origin = f"--ab-ref {explicit}" if explicit else "the baseline's code"
        return ThroughputReference(raw, f"A/B reference {sha[:12]} ({origin}), measured here", ab=True)

    def reference_batch(self) -> list[str]:
        """The node ids the A/B reference runs in one session when this case first asks for it: the case
        itself (a family whose cases share one measured table runs them together)."""
        return [self.request.node.nodeid]

    def reference_options(self) -> list[str]:
        """The options of this run that change what a case measures, for the reference's session, each as one
        `--option=value` argument (dflash.harness.reference.ReferenceWorker.run_cases says why)."""
        options = [f"--profile={self.profile.name}"]
        for name, flag in (("dflash_device", "--device"), ("dflash_dtype", "--dtype"), ("dflash_prompts", "--prompts"),
                           ("dflash_max_new_tokens", "--max-new-tokens"), ("dflash_target", "--target"),
                           ("dflash_draft", "--draft")):
            if self._option(name) is not None:
                options.append(f"{flag}={self._option(name)}")
        if self._option("tau_accounting") != "engine":
            options.append(f"--tau-accounting={self._option('tau_accounting')}")
        return options

    def _option(self, name: str):
        return self.request.config.getoption(name)

    @property
    def fingerprint(self) -> dict:
        return self.state.fingerprint(self.profile.name)

    @property
    def gate_family(self) -> int:
        """The run's gate family (every gate of every gated case that runs): the Bonferroni factor of a case."""
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

    def finish(self, params: dict, metrics: dict, gates, *, max_new_tokens: int | None = None) -> dict:
        """Decide, record (results file + user_properties), then fail on a lost invariant or a regression.
        The record carries the outcome, so `--resume` re-applies it; its experiment is the ablation's name.
        `max_new_tokens`: the budget the case decoded with (its group and published references); default:
        `params["max_new_tokens"]` when the case reports one, else `self.budget`."""
        budget = max_new_tokens or params.get("max_new_tokens") or self.budget
        failures = self.invariant_failures(metrics)
        family = self.gate_family
        for gate in gates:
            # Bonferroni within the case test (it implies Holm); Holm over the whole run runs at session end.
            if gate.gated and gate.verdict == REGRESSION and gate.p_value * family < gate.alpha:
                failures.append(regression_message(gate.to_dict(), family))
        gated = bool(self.request.node.get_closest_marker("ablation").kwargs.get("gated", True))
        references = self.references(params, budget)
        record = {"id": self.experiment_id, "experiment": self.ablation, "ablation": self.ablation,
                  "ablation_family": self.family.name, "family": family,
                  "tau_accounting": self._option("tau_accounting"),
                  "group": self.dataset_name + (f", max_new_tokens={budget}" if budget else ""),
                  "profile": self.profile.name, "dataset": self.dataset_name, **self.prompt_rendering(),
                  "params": params,
                  "metrics": metrics, "status": "done", "gates": [g.to_dict() for g in gates],
                  "outcome": "failed" if failures else "passed", "failures": failures,
                  "recording": self.update and gated, "identity": identity_digest(self.state.identities[self.profile.name]),
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


class OutcomesCase(CaseRecord):
    """A case of a method that is not lossless: per-query outcomes (`metrics["per_query"]`: qids, correct,
    cost) gated against a baseline of kind "outcomes", paired over the same queries. `family_profile`: the
    family's own part of the run profile (the models and queries it measures)."""
    cost_not_gated: str | None = None  # why a family's per-query costs admit no paired test (reported instead)

    def __init__(self, request, state, profile, family, family_profile):
        super().__init__(request, state, profile, family)
        self.family_profile = family_profile

    @classmethod
    def on_part(cls, part: str):
        """A FamilySpec.make_case for a family whose cases measure the run profile's `part` (dflash.profiles:
        the models and queries the family names there)."""
        def make(request, state, family, param):
            profile = state.profile(param.profile)
            return cls(request, state, profile, family, getattr(profile, part))
        return make

    def unavailable(self) -> str | None:
        reason = self.family_profile.unavailable()
        return f"{self.family.display_name} profile {self.profile.name}: {reason}" if reason else None

    def outcome_gates(self, metrics: dict, *, speedups: list[float] | None = None, stride: int = 1,
                      remeasure=None, speed: bool = True) -> list:
        """Accuracy by the exact McNemar gate (`stats.accuracy_gate`), and, with `speed`, the paired throughput
        gate on speedups: `speedups` (default 1 / each query's cost) against 1 / the baseline's cost of every
        `stride`-th query (queries timed together share one cost, so they give one sample), on this testbed."""
        baseline = self.baseline()
        if baseline is None:
            return []
        if baseline.kind != "outcomes" or baseline.per_query["qids"] != metrics["per_query"]["qids"]:
            pytest.fail(f"{self.experiment_id}: the baseline holds other queries than this run (the query set "
                        "changed?); re-record with --update-baselines", pytrace=False)
        gates = [accuracy_gate(baseline.per_query["correct"], metrics["per_query"]["correct"],
                               alpha=self._option("gate_alpha"), case_id=self.experiment_id)]
        if speed:
            new = speedups if speedups is not None else [1.0 / c for c in metrics["per_query"]["cost"]]
            if self.cost_not_gated:
                gates.append(not_gated_throughput(new, self.cost_not_gated, factor=self._option("throughput_factor"),
                                                  alpha=self._option("gate_alpha"), case_id=self.experiment_id))
            else:
                gates.append(self.gate_throughput(baseline, new, remeasure,
                                                  as_speedups=lambda cost: [1.0 / c for c in cost[::stride]]))
        return gates


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
