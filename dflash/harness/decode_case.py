"""A case of the decode family (the `case` fixture's object): its models (loaded once per profile and process),
prompts, interleaved measurement of a variant against target-only, the lossless check, and the tau and throughput
gates against its baseline entry (recorded by dflash.harness.case.CaseRecord)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import DFlashError
from .case import CaseRecord
from .measure import (TARGET_ONLY, Variant, compare, comparison_metrics, extend, per_prompt_tau, speedup_samples,
                      warm_up)
from ..prompts import load_prompts
from .runs import RunState
from .stats import sequential_tau_gate, tau_gate


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


class DecodeCase(CaseRecord):
    """A case of the decode family (the `case` fixture): a variant measured against target-only on the
    profile's prompts of one dataset, interleaved, with the lossless check, tau and throughput gates."""

    def __init__(self, request, state: RunState, profile, family, dataset: str):
        super().__init__(request, state, profile, family)
        self.spec = profile.dataset(dataset)
        self._warmed = False
        self._models: Models | None = None

    @property
    def dataset_name(self) -> str:
        return self.spec.name

    def unavailable(self) -> str | None:
        return self.state.unavailable(self.profile.name, self.spec.name)

    def invariant_failures(self, metrics: dict) -> list[str]:
        """Greedy outputs that differ from target-only and are not proven float ties: the lossless invariant."""
        ties = metrics.get("float_ties", {})
        bad = [i for i, ok in enumerate(metrics.get("exact_match", [])) if not ok and str(i) not in ties]
        return [f"{self.experiment_id}: greedy output differs from target-only on prompts {bad} (not float ties): "
                "the lossless invariant is broken"] if bad else []

    def references(self, params: dict, budget: int) -> list:
        return self.profile.references_for(self.spec.name, params.get("block_size"), budget,
                                           params.get("temperature", 0.0), thinking=bool(self.spec.thinking))

    def prompt_rendering(self) -> dict:
        """The dataset's template identity and thinking flag, from the tokenizer the prompts were rendered with
        (the loaded models' when the case loaded them, else the target's tokenizer alone)."""
        from ..prompts import prompt_rendering
        models = self._models or self.state.models.get(self.profile.name)
        if models is not None:
            tokenizer = models.tokenizer
        else:
            from ..loading import load_tokenizer
            tokenizer = load_tokenizer(self.state.config.getoption("dflash_target") or self.profile.target)
        return prompt_rendering(self.spec, tokenizer)

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
                    baseline.per_prompt_tau, new_taus, start=count, family=self.gate_family,
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
