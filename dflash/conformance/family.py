"""The conformance ablation family: a serving backend's DFlash against the reference engine on the profile's
prompts, per block size (ablations/test_conformance.py; docs/vllm.md).

Each case decodes the same prompts (2 per dataset of the profile's first three, 48 new tokens, greedy, no stop
token) with the reference engine (the last block drafted in full, as vLLM counts) and with one backend:
- `engine`: the reference engine again, compared `exact` (it must reproduce itself step for step);
- `vllm`: vLLM's OpenAI server from .venv-vllm (dflash.backends.vllm), k = block size - 1, compared `paired`
  (dflash.conformance.compare: vLLM 0.32 on CPU is not step-exact), skipped with one line naming `make vllm`
  where .venv-vllm is absent.

The case fails when the comparison does (outputs not identical n/n, verify steps diverging beyond the tolerance,
a per-position curve or tau below the reference's), with the comparison's messages, each naming the first
diverging position. It is gated against the reference measured in the same case, not against stored baselines
(`gated=False` on the ablation: nothing to record). The backend's speedup over its own target-only decoding
(vLLM: a target-only server) is measured per prompt on the wall clock and reported NOT GATED with the reason.
The family runs in a pytest session of its own (`conformance`): a vLLM server beside timed cases would change
the company their baselines were recorded in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pytest

from ..harness.case import CaseRecord
from ..harness.family import FamilyParam, FamilySpec, register_family
from ..harness.render import metrics_of, params_of, table

BACKENDS = ("engine", "vllm")
BLOCK_SIZES = (8, 16)
PROMPTS_PER_DATASET = 2
DATASETS = 3  # the profile's first three datasets
MAX_NEW_TOKENS = 48
SPEED_NOT_GATED = ("wall-clock speedup of a backend over its own target-only decoding, measured beside the "
                   "reference on a shared machine; this family has no stored throughput baselines yet")


@dataclass(frozen=True)
class ConformanceParam:
    profile: str
    backend: str
    block_size: int


def conformance_params(profiles: Sequence[str]) -> list[FamilyParam]:
    """The CPU profile (tiny) x backends x block sizes; vLLM cases carry the `vllm` mark."""
    return [FamilyParam(ConformanceParam(p, backend, block), f"{p}-{backend}-bs{block}", p,
                        marks=(pytest.mark.vllm,) if backend == "vllm" else ())
            for p in profiles if p == "tiny" for backend in BACKENDS for block in BLOCK_SIZES]


class ConformanceCase(CaseRecord):
    dataset_name = "conformance"

    def __init__(self, request, state, profile, family, param: ConformanceParam):
        super().__init__(request, state, profile, family)
        self.param = param

    @property
    def budget(self) -> int:
        return MAX_NEW_TOKENS

    def unavailable(self) -> str | None:
        reason = self.state.unavailable(self.profile.name, None)
        if reason:
            return reason
        if self.param.backend == "vllm":
            from ..backends.vllm import unavailable_reason
            reason = unavailable_reason()
            return f"conformance vllm: {reason}" if reason else None
        return None

    @property
    def params(self) -> dict:
        return {"backend": self.param.backend, "block_size": self.param.block_size, "max_new_tokens": MAX_NEW_TOKENS,
                "mode": "exact" if self.param.backend == "engine" else "paired"}

    def prompts(self, tokenizer) -> list[list[int]]:
        from ..prompts import load_prompts
        return [prompt for spec in self.profile.datasets[:DATASETS]
                for prompt in load_prompts(self.profile, spec, tokenizer, PROMPTS_PER_DATASET)]

    def invariant_failures(self, metrics: dict) -> list[str]:
        return [f"{self.experiment_id}: {line}" for line in metrics.get("failures", [])]

    def prompt_rendering(self) -> dict:
        """The renderings of the datasets the case's prompts come from, each value joined with "," where the
        datasets differ."""
        from ..harness.decode_case import cached_models
        from ..prompts import prompt_rendering
        tokenizer = cached_models(self.state, self.profile).tokenizer
        found = [prompt_rendering(spec, tokenizer) for spec in self.profile.datasets[:DATASETS]]
        return {key: ",".join(dict.fromkeys(r[key] for r in found)) for key in ("prompt_template", "thinking")}

    def measure(self) -> tuple[dict, list]:
        from ..engine import generate
        from ..harness.decode_case import cached_models
        from ..harness.stats import not_gated_throughput
        from .compare import backend_runs, compare, reference_runs
        models = cached_models(self.state, self.profile)
        prompts = self.prompts(models.tokenizer)
        block = self.param.block_size
        reference = reference_runs(models.target, models.draft, prompts, block_size=block,
                                   max_new_tokens=MAX_NEW_TOKENS)
        if self.param.backend == "engine":
            backend = reference_runs(models.target, models.draft, prompts, block_size=block,
                                     max_new_tokens=MAX_NEW_TOKENS)
            plain = [generate(models.target, None, p, max_new_tokens=MAX_NEW_TOKENS).wall_s for p in prompts]
            start_s = None
        else:
            from ..backends import vllm as vb
            from ..loading import resolve
            target_dir = str(resolve(self.state.config.getoption("dflash_target") or self.profile.target, "target"))
            draft_dir = str(resolve(self.state.config.getoption("dflash_draft") or self.profile.draft, "draft"))
            server = vb.server_for(vb.ServerSettings(target_dir, draft_dir, block - 1, dtype=self.profile.dtype))
            backend = backend_runs(server, prompts, max_new_tokens=MAX_NEW_TOKENS)
            plain_server = vb.server_for(vb.ServerSettings(target_dir, dtype=self.profile.dtype))
            plain = [plain_server.complete(p, max_tokens=MAX_NEW_TOKENS).wall_s for p in prompts]
            start_s = server.start_s
        report = compare(reference, backend, block_size=block, backend_name=self.param.backend,
                         mode=self.params["mode"])
        speedups = [t / run.wall_s for t, run in zip(plain, backend) if run.wall_s > 0 and t > 0]
        metrics = {
            "conformance_passed": report.passed, "failures": report.failures, "notes": report.notes,
            "message": report.message(), "prompts": len(prompts), "outputs_identical": report.identical_outputs,
            "counts_equal": report.equal_counts, "steps_compared": report.steps.steps,
            "steps_diverging": report.steps.divergences, "first_diverging_position": report.first_diverging_position,
            "tau_reference": [r.tau for r in reference], "tau_backend": [b.tau for b in backend],
            "per_position_reference": [[row.reference_accepted, row.reference_drafts] for row in report.positions],
            "per_position_backend": [[row.backend_accepted, row.backend_drafts] for row in report.positions],
            "speedup_samples": speedups, "server_start_s": start_s,
        }
        gates = [not_gated_throughput(speedups, SPEED_NOT_GATED, factor=self._option("throughput_factor"),
                                      alpha=self._option("gate_alpha"), case_id=self.experiment_id)] \
            if speedups else []
        return metrics, gates


def _mean(values) -> float:
    return sum(values) / len(values) if values else math.nan


def _geomean(values) -> float:
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan


def conformance_table(records: list[dict]) -> str:
    """One row per backend and block size: outputs identical n/n, per-prompt counts equal, diverging verify
    steps, tau of the reference and the backend (vLLM's definition, 1 + accepted/drafts), the first diverging
    draft position, the backend's speedup (not gated) and the conformance verdict with its first failure."""
    rows = []
    for r in sorted(records, key=lambda r: (params_of(r).get("backend", ""), params_of(r).get("block_size", 0))):
        m, p = metrics_of(r), params_of(r)
        if r.get("status") == "skipped" or not m:
            rows.append([r["id"].split("[")[-1].rstrip("]"), p.get("backend", ""), str(p.get("block_size", "")),
                         "", "", "", "", "", "", "", f"SKIPPED: {r.get('reason', '')}"])
            continue
        n = m["prompts"]
        verdict = "PASS" if m["conformance_passed"] else "FAIL: " + m["failures"][0]
        rows.append([r["id"].split("[")[-1].rstrip("]"), p["backend"], str(p["block_size"]),
                     f"{m['outputs_identical']}/{n}", f"{m['counts_equal']}/{n}",
                     f"{m['steps_diverging']}/{m['steps_compared']}", f"{_mean(m['tau_reference']):.3f}",
                     f"{_mean(m['tau_backend']):.3f}", str(m["first_diverging_position"] or "-"),
                     f"{_geomean(m['speedup_samples']):.2f}x (not gated)" if m["speedup_samples"] else "-", verdict])
    return table(["Case", "backend", "block size", "outputs identical", "per-prompt counts equal",
                  "verify steps diverging", "tau reference", "tau backend", "first diverging position",
                  "speedup over own target-only", "conformance"], rows,
                 [False, False, True, True, True, True, True, True, True, True, False])


def conformance_plots(records: Sequence[dict], directory: Path, notes: list[str]) -> list[Path]:
    """Per case: the per-position acceptance curve (accepted / drafts at each draft position), the backend
    beside the reference."""
    from ..harness.plots import new_figure, safe_name
    paths = []
    for record in records:
        m = metrics_of(record)
        if not m or not m.get("per_position_reference"):
            continue
        figure, (axis,) = new_figure(1)
        for key, label, style in (("per_position_reference", "reference engine", "-o"),
                                  ("per_position_backend", params_of(record)["backend"], "--s")):
            rates = [a / d if d else math.nan for a, d in m[key]]
            axis.plot(range(1, len(rates) + 1), rates, style, label=label)
        axis.set(xlabel="draft position", ylabel="accepted / drafts",
                 title=f"per-position acceptance: {record['id'].split('[')[-1].rstrip(']')}")
        axis.legend(fontsize="small")
        path = directory / f"conformance_{safe_name(record['id'].split('[')[-1].rstrip(']'))}.png"
        figure.savefig(path, dpi=110)
        paths.append(path)
    return paths


CONFORMANCE = register_family(FamilySpec(
    name="conformance", display_name="Conformance (serving backends vs the reference engine)",
    fixture="conformance_case", params=conformance_params,
    make_case=lambda request, state, family, param: ConformanceCase(request, state, state.profile(param.profile),
                                                                    family, param.value),
    renderers={"conformance": conformance_table}, titles={"conformance": "Conformance: backends vs the reference"},
    plots=conformance_plots, baseline_kind="decode", session="conformance", spends_alpha=False,
    description="a serving engine's DFlash (vLLM) against the reference engine: outputs, verify steps, "
                "per-position curve, tau"))
