"""One ablation case (the `case` fixture's object): its models (loaded once per profile and process), prompts,
interleaved measurement against target-only, statistical gates against its baseline entry, and its record."""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Callable

import pytest

from ..errors import DFlashError
from . import baselines as baseline_store
from .measure import (TARGET_ONLY, Variant, compare, comparison_metrics, extend, per_prompt_tau, speedup_samples,
                      warm_up)
from .profiles import DatasetSpec, load_prompts
from .reference import ReferenceUnavailable
from .runs import RunState, identity_digest
from .stats import (REGRESSION, accuracy_gate, confirm, not_gated_throughput, sequential_tau_gate, tau_gate,
                    throughput_gate)

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


@dataclass
class Models:
    target: object
    draft: object
    tokenizer: object
    stop_ids: list


def cached_models(state: RunState, profile) -> Models:
    """The model cache: target, draft and tokenizer of a profile, loaded once per process (--target / --draft
    apply); `RunState.release_models` empties it."""
    if profile.name not in state.models:
        from ..loading import load_draft, load_target, load_tokenizer
        target = state.config.getoption("dflash_target") or profile.target
        draft = state.config.getoption("dflash_draft") or profile.draft
        tokenizer = load_tokenizer(target)
        state.models[profile.name] = Models(
            load_target(target, device=profile.device, dtype=profile.dtype),
            load_draft(draft, device=profile.device, dtype=profile.draft_dtype or profile.dtype), tokenizer,
            [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return state.models[profile.name]


class Case:
    """One ablation case: measures variant against target-only on the case's prompts, gates, records."""
    display_name: str | None = None  # a family's name: its report section's title (else the experiment's)

    def __init__(self, request, state: RunState, profile, dataset: str):
        self.request, self.state, self.profile = request, state, profile
        self.spec = self._dataset(profile, dataset)
        self.ablation = request.node.get_closest_marker("ablation").args[0]
        self.experiment_id = f"{self.ablation}/{request.node.name}"  # e.g. block_size/test_sweep[tiny-math-bs8]
        self.update = state.update
        self.recorded: dict | None = None  # --resume: this case's record from the run being continued
        self._warmed = False
        self._models: Models | None = None

    def _dataset(self, profile, dataset: str):
        return profile.dataset(dataset)

    @property
    def models(self) -> Models:
        if self._models is None:
            self._models = cached_models(self.state, self.profile)
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
        max_new = max_new_tokens or self.profile.max_new_tokens
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
        """The options of this run that change what a case measures, for the reference's session."""
        options = ["--profile", self.profile.name]
        for name, flag in (("dflash_device", "--device"), ("dflash_dtype", "--dtype"), ("dflash_prompts", "--prompts"),
                           ("dflash_max_new_tokens", "--max-new-tokens"), ("dflash_target", "--target"),
                           ("dflash_draft", "--draft")):
            if self._option(name) is not None:
                options += [flag, str(self._option(name))]
        if self._option("tau_accounting") != "engine":
            options += ["--tau-accounting", self._option("tau_accounting")]
        return options

    def _option(self, name: str):
        return self.request.config.getoption(name)

    @property
    def fingerprint(self) -> dict:
        return self.state.fingerprint(self.profile.name)

    def _float_ties(self, comparison) -> dict:
        """Greedy outputs that differ from target-only, each proven a float tie ({prompt index: explanation});
        `finish` fails on any other difference."""
        from .evaluation import float_ties
        if comparison.variant and comparison.variant[0].temperature > 0:
            return {}
        blocks = [r.block_size or max((c.block_size for c in r.trace), default=16) for r in comparison.variant]
        return float_ties(self.models.target, self.prompts(len(comparison.variant)),
                          [r.output_ids for r in comparison.baseline], [r.output_ids for r in comparison.variant],
                          blocks)

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

    def finish(self, experiment: str, params: dict, metrics: dict, gates, *, lossless: bool = True,
               max_new_tokens: int | None = None) -> dict:
        """Decide, record (results file + user_properties), then fail on a lost invariant or a regression.
        The record carries the outcome, so `--resume` re-applies it. `max_new_tokens`: the budget the case
        decoded with (its group and published references); default: `params["max_new_tokens"]` when the case
        reports one, else the profile's."""
        budget = max_new_tokens or params.get("max_new_tokens") or self.profile.max_new_tokens
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
                                                 budget,
                                                 params.get("temperature", 0.0))
        record = {"id": self.experiment_id, "experiment": experiment, "ablation": self.ablation, "family": family,
                  "tau_accounting": self._option("tau_accounting"),
                  "group": f"{self.spec.name}, max_new_tokens={budget}",
                  "profile": self.profile.name, "dataset": self.spec.name, "params": params,
                  "metrics": metrics, "status": "done", "gates": [g.to_dict() for g in gates],
                  "outcome": "failed" if failures else "passed", "failures": failures,
                  "recording": self.update and gated, "identity": identity_digest(self.state.identities[self.profile.name]),
                  "fingerprint": self.fingerprint, "references": [asdict(r) for r in references]}
        if gated and not gates and not self.update:
            record["verdict"] = NO_BASELINE
        if self.display_name:
            record["title"] = self.display_name
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


class OutcomesCase(Case):
    """A case of a method that is not lossless and runs on a profile of its own family (cascades, Fast-dLLM v2):
    per-query outcomes (`metrics["per_query"]`: qids, correct, cost) gated against a baseline of kind
    "outcomes", paired over the same queries. `display_name` names the family in skip reasons and titles its
    section of the report (the record's "title")."""
    family_dataset = DatasetSpec("outcomes", "outcomes", chat=False)
    cost_not_gated: str | None = None  # why a family's per-query costs admit no paired test (reported instead)
    display_name = "Outcomes"

    def __init__(self, request, state, profile, family_profile):
        super().__init__(request, state, profile, dataset=None)
        self.family_profile = family_profile

    def _dataset(self, profile, dataset):
        return self.family_dataset

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
