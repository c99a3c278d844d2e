"""Measure the regression gates' quality on the tiny profile with real decoding (`dflash gate-quality`).

The gates are exercised exactly as an ablation run uses them: a recorded baseline holds every case's
per-prompt taus and speedup samples on all `prompts_cap` prompts; a run starts with `prompts` prompts per case
and, while a tau drop is beyond the margin but not significant after Bonferroni over the run's gate family,
gathers more prompts (doubling) up to the cap (`stats.tau_needs_more_prompts`); at the end Holm runs over the
run's gates. The family is padded to `family` gates with p = 1 (the other, unchanged cases of a full run).

* False alarms on unchanged code. Tau: greedy tau is deterministic, so unchanged code gives identical vectors;
  `repeats` runs check that (an alarm here could only come from numerics). Throughput: timing noise is real.
  Each repeat is gated against the recorded baseline; in addition `resamples` pseudo-runs are drawn from the
  repeats (for every prompt, its speedup sample from a random repeat) and gated the same way. Resampled
  pseudo-runs share samples, so they are not independent: both figures are reported.
* Detection. The draft's weights are perturbed (Gaussian noise, relative scale `noise`, one seed per trial) so
  that tau drops; a case is *eligible* when its true drop, measured on all the cap's prompts, is at least 10%,
  and *detected* when the gated flow flags it after Holm.
"""
from __future__ import annotations

import copy
import json
import random

import torch
from scipy.stats import binomtest

from ..engine import generate
from ..loading import load_draft, load_target, load_tokenizer
from .profiles import get_profile, load_prompts
from .stats import apply_holm, tau_gate, tau_needs_more_prompts, throughput_gate

BLOCK_SIZES = (4, 8, 16)
MAX_NEW_TOKENS = 64


def _rate(hits: int, trials: int) -> dict:
    if trials == 0:
        return {"rate": None, "hits": 0, "trials": 0}
    ci = binomtest(hits, trials).proportion_ci(confidence_level=0.95)
    return {"rate": hits / trials, "ci95": [round(ci.low, 4), round(ci.high, 4)], "hits": hits, "trials": trials}


def perturbed(draft, scale: float, seed: int):
    """A copy of the draft with N(0, scale * std(w)) added to every weight tensor."""
    generator = torch.Generator().manual_seed(seed)
    copy_ = copy.deepcopy(draft)
    with torch.no_grad():
        for parameter in copy_.parameters():
            std = float(parameter.std()) if parameter.numel() > 1 else float(parameter.abs().mean())
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * std)
    return copy_


class Decoder:
    """Per-prompt tau and speedup samples, computed lazily and cached per (draft, case, prompt)."""

    def __init__(self, target, prompts, stop):
        self.target, self.prompts, self.stop = target, prompts, stop
        self.taus: dict = {}

    def tau(self, draft, key, case, index) -> float:
        slot = (key, case, index)
        if slot not in self.taus:
            result = generate(self.target, draft, self.prompts[case[0]][index], max_new_tokens=MAX_NEW_TOKENS,
                              block_size=case[1], stop_token_ids=self.stop)
            self.taus[slot] = result.tau if result.num_cycles else 1.0
        return self.taus[slot]

    def timed(self, draft, case, indices) -> tuple[list[float], list[float]]:
        """Interleaved target-only and DFlash runs: per-prompt tau and speedup (tokens/s ratio)."""
        taus, ratios = [], []
        for i in indices:
            prompt = self.prompts[case[0]][i]
            base = generate(self.target, None, prompt, max_new_tokens=MAX_NEW_TOKENS, stop_token_ids=self.stop)
            run = generate(self.target, draft, prompt, max_new_tokens=MAX_NEW_TOKENS, block_size=case[1],
                           stop_token_ids=self.stop)
            taus.append(run.tau if run.num_cycles else 1.0)
            ratios.append((len(run.output_ids) / run.wall_s) / (len(base.output_ids) / base.wall_s))
        return taus, ratios


def _holm_padded(gates, family: int):
    """Holm over the run's gates plus (family - len(gates)) unchanged cases with p = 1."""
    from .stats import TauGateResult
    padding = [TauGateResult(case_id="unchanged", baseline=1.0, new=1.0, rel_change=0.0, p_value=1.0,
                             p_improvement=1.0, alpha=gates[0].alpha, n_baseline=1, n_new=1)
               for _ in range(max(0, family - len(gates)))]
    return apply_holm(list(gates) + padding)[: len(gates)]


def _gated_tau(base_taus, new_tau, start: int, family: int, margin: float, alpha: float):
    """The ablation flow for one case: start with `start` prompts, gather more while inconclusive."""
    n = start
    while True:
        gate = tau_gate(base_taus[:n], [new_tau(i) for i in range(n)], margin=margin, alpha=alpha)
        decision = tau_needs_more_prompts(gate, family=family, max_prompts=len(base_taus))
        if not decision.gather_more:
            return gate
        n = decision.next_n


def measure(repeats: int = 4, trials: int = 20, resamples: int = 500, family: int = 100, margin: float = 0.03,
            alpha: float = 0.05, seed: int = 0, block_sizes: tuple[int, ...] = BLOCK_SIZES) -> dict:
    torch.set_num_threads(1)
    profile = get_profile("tiny")
    target, draft, tokenizer = load_target("tiny"), load_draft("tiny"), load_tokenizer("tiny")
    stop = [tokenizer.eos_token_id]
    cap, start = profile.prompts_cap, profile.prompts
    prompts = {spec.name: load_prompts(profile, spec, tokenizer, cap) for spec in profile.datasets}
    cases = [(d, b) for d in prompts for b in block_sizes if len(prompts[d]) >= cap]
    decoder = Decoder(target, prompts, stop)
    generate(target, draft, prompts["math"][0], max_new_tokens=16, block_size=8)  # warm-up

    # The recorded baseline: every case on all cap prompts.
    baseline = {case: decoder.timed(draft, case, range(cap)) for case in cases}

    # Unchanged code: repeated runs on the first `start` prompts, gated like a real run.
    runs = [{case: decoder.timed(draft, case, range(start)) for case in cases} for _ in range(repeats)]
    tau_alarms = throughput_alarms = tau_changed = 0
    for run in runs:
        tau_changed += sum(run[c][0] != baseline[c][0][:start] for c in cases)
        gates = [_gated_tau(baseline[c][0], lambda i, c=c: (run[c][0] + baseline[c][0][start:])[i], start, family,
                            margin, alpha) for c in cases]
        gates += [throughput_gate(baseline[c][1], run[c][1], alpha=alpha) for c in cases]
        adjusted = _holm_padded(gates, 2 * family)
        tau_alarms += sum(g.failed for g in adjusted if g.kind == "tau")
        throughput_alarms += sum(g.failed for g in adjusted if g.kind == "throughput")
    rng = random.Random(seed)
    resampled_alarms = 0
    for _ in range(resamples):
        pseudo = {c: [runs[rng.randrange(repeats)][c][1][i] for i in range(start)] for c in cases}
        adjusted = _holm_padded([throughput_gate(baseline[c][1], pseudo[c], alpha=alpha) for c in cases], family)
        resampled_alarms += sum(g.failed for g in adjusted)

    # Detection: find a noise scale with a mean drop of at least 10%, then one perturbed draft per trial.
    base_taus = {case: baseline[case][0] for case in cases}
    scale, drop = 0.05, 0.0
    while drop < 0.10 and scale < 5:
        scale *= 1.5
        probe = perturbed(draft, scale, seed=10_000)
        key = ("probe", scale)
        drop = 1 - (sum(decoder.tau(probe, key, c, i) for c in cases for i in range(start))
                    / sum(sum(base_taus[c][:start]) for c in cases))
    detected = eligible = flagged_any = prompts_used = 0
    true_drops, missed = [], []
    for trial in range(trials):
        probe, key = perturbed(draft, scale, seed=trial), ("trial", trial)
        gates = [_gated_tau(base_taus[c], lambda i, c=c: decoder.tau(probe, key, c, i), start, family, margin, alpha)
                 for c in cases]
        prompts_used += sum(g.n_new for g in gates)
        for case, gate in zip(cases, _holm_padded(gates, family)):
            full = [decoder.tau(probe, key, case, i) for i in range(cap)]
            true_drop = 1 - sum(full) / sum(base_taus[case])
            true_drops.append(true_drop)
            if true_drop >= 0.10:
                eligible += 1
                detected += gate.failed
                if not gate.failed:
                    missed.append({"trial": trial, "case": f"{case[0]}/bs={case[1]}", "true_drop": round(true_drop, 4),
                                   "measured_drop": round(-gate.rel_change, 4), "prompts": gate.n_new,
                                   "p": gate.p_value, "p_holm": gate.p_adjusted})
            flagged_any += gate.failed
    return {
        "command": f"dflash gate-quality --repeats {repeats} --trials {trials} --resamples {resamples} "
                   f"--family {family} --block-sizes {','.join(map(str, block_sizes))}",
        "profile": "tiny", "prompts_per_case": {"start": start, "cap": cap}, "max_new_tokens": MAX_NEW_TOKENS,
        "cases": [f"{d}/bs={b}" for d, b in cases], "margin": margin, "alpha": alpha, "family": family,
        "false_alarms_unchanged_code": {
            "repeats": repeats, "tau_vectors_changed": tau_changed,
            "tau": _rate(tau_alarms, len(cases) * repeats),
            "throughput": _rate(throughput_alarms, len(cases) * repeats),
            "throughput_resampled": _rate(resampled_alarms, len(cases) * resamples)},
        "detection_of_10pct_tau_drop": {
            "noise_scale": round(scale, 4), "trials": trials,
            "mean_true_case_drop": round(sum(true_drops) / len(true_drops), 4),
            "mean_prompts_per_case": round(prompts_used / (trials * len(cases)), 1),
            "cases_with_true_drop_ge_10pct": _rate(detected, eligible), "missed": missed,
            "all_cases_flagged": _rate(flagged_any, len(true_drops))},
    }


def main(repeats: int = 4, trials: int = 20, resamples: int = 500, family: int = 100,
         block_sizes: tuple[int, ...] = BLOCK_SIZES) -> None:
    print(json.dumps(measure(repeats=repeats, trials=trials, resamples=resamples, family=family,
                             block_sizes=block_sizes), indent=2))
