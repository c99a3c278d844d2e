"""Measure the regression gates' quality on the tiny profile with real decoding (`dflash gate-quality`).

* False alarms on unchanged code: the block-size cases are measured `repeats` times in one process; each
  repeat is gated against the first one as if it were the stored baseline (tau gate and throughput gate, Holm
  over the cases of a repeat, as in a real run). Greedy tau is deterministic, so tau alarms can only come from
  numerics; throughput alarms come from real timing noise.
* Detection: the tiny draft's weights are perturbed (Gaussian noise, relative scale `noise`, one seed per
  trial) so that tau drops; every perturbed run is gated against the unperturbed taus on the same prompts.
  Detection rate = share of cases whose measured tau drop is at least 10% that the gate flags (Holm over the
  cases of a trial). The noise scale is raised until the mean drop is at least 10%.
"""
from __future__ import annotations

import copy
import json

import torch
from scipy.stats import binomtest

from ..engine import generate
from ..loading import load_draft, load_target, load_tokenizer
from .profiles import get_profile, load_prompts
from .stats import apply_holm, tau_gate, throughput_gate

BLOCK_SIZES = (4, 8, 16)


def _taus_and_rates(target, draft, prompts, block_size, stop):
    taus, ratios = [], []
    for prompt in prompts:
        base = generate(target, None, prompt, max_new_tokens=64, stop_token_ids=stop)
        run = generate(target, draft, prompt, max_new_tokens=64, block_size=block_size, stop_token_ids=stop)
        taus.append(run.tau if run.num_cycles else 1.0)
        ratios.append((len(run.output_ids) / run.wall_s) / (len(base.output_ids) / base.wall_s))
    return taus, ratios


def _taus(target, draft, prompts, block_size, stop):
    """Per-prompt greedy tau only (detection trials gate tau; they need no target-only timing runs)."""
    return [generate(target, draft, p, max_new_tokens=64, block_size=block_size, stop_token_ids=stop).tau or 1.0
            for p in prompts]


def _rate(hits, trials):
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


def measure(repeats: int = 5, trials: int = 20, margin: float = 0.03, alpha: float = 0.05) -> dict:
    torch.set_num_threads(1)
    profile = get_profile("tiny")
    target, draft, tokenizer = load_target("tiny"), load_draft("tiny"), load_tokenizer("tiny")
    stop = [tokenizer.eos_token_id]
    prompts = {spec.name: load_prompts(profile, spec, tokenizer, profile.prompts) for spec in profile.datasets}
    cases = [(d, b) for d in prompts for b in BLOCK_SIZES]
    generate(target, draft, prompts["math"][0], max_new_tokens=16, block_size=8)  # warm-up

    runs = [{case: _taus_and_rates(target, draft, prompts[case[0]], case[1], stop) for case in cases}
            for _ in range(repeats)]
    tau_alarms = throughput_alarms = 0
    for run in runs[1:]:
        gates = apply_holm([g for case in cases for g in (
            tau_gate(runs[0][case][0], run[case][0], margin=margin, alpha=alpha),
            throughput_gate(runs[0][case][1], run[case][1], alpha=alpha))])
        tau_alarms += sum(g.failed for g in gates if g.kind == "tau")
        throughput_alarms += sum(g.failed for g in gates if g.kind == "throughput")
    checks = len(cases) * (repeats - 1)

    base_taus = {case: runs[0][case][0] for case in cases}
    scale, drop = 0.05, 0.0
    while drop < 0.10 and scale < 5:
        scale *= 1.5
        probe = perturbed(draft, scale, seed=10_000)
        new = {case: _taus(target, probe, prompts[case[0]], case[1], stop) for case in cases}
        drop = 1 - sum(map(sum, new.values())) / sum(map(sum, base_taus.values()))
    detected = eligible = flagged_any = 0
    drops = []
    for seed in range(trials):
        probe = perturbed(draft, scale, seed)
        new = {case: _taus(target, probe, prompts[case[0]], case[1], stop) for case in cases}
        gates = apply_holm([tau_gate(base_taus[case], new[case], margin=margin, alpha=alpha) for case in cases])
        for case, gate in zip(cases, gates):
            drops.append(-gate.rel_change)
            if -gate.rel_change >= 0.10:
                eligible += 1
                detected += gate.failed
            flagged_any += gate.failed
    return {
        "command": "dflash gate-quality", "profile": "tiny", "prompts_per_case": profile.prompts,
        "cases": [f"{d}/bs={b}" for d, b in cases], "margin": margin, "alpha": alpha,
        "false_alarms_unchanged_code": {"repeats": repeats, "tau": _rate(tau_alarms, checks),
                                        "throughput": _rate(throughput_alarms, checks)},
        "detection_of_10pct_tau_drop": {"noise_scale": round(scale, 4), "trials": trials,
                                        "mean_case_drop": round(sum(drops) / len(drops), 4),
                                        "cases_with_drop_ge_10pct": _rate(detected, eligible),
                                        "all_cases_flagged": _rate(flagged_any, len(drops))},
    }


def main(repeats: int = 5, trials: int = 20) -> None:
    print(json.dumps(measure(repeats=repeats, trials=trials), indent=2))
