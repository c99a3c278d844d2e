"""Measure the regression gates' quality on the tiny profile with real decoding (`dflash gate-quality`).

The gates are exercised as `make test` uses them: every case is gated against its entry in the committed
baselines (`baselines/tiny/block_size.json`, recorded on an earlier occasion), with the run's flow: tau by
`stats.sequential_tau_gate` (12 prompts, more while unclear, alpha spent at the last look), throughput by the
paired gate on process-CPU-time speedups with one confirming re-measurement, Bonferroni over the family of
`make test` (`--family`). Every check is an independent measurement; nothing is resampled.

* False alarms on unchanged code, `repeats` independent runs of every case, on a quiet machine and again with
  `hogs` busy processes beside this one (as on a shared 2-core CI machine where the other xdist worker and
  another job both want a core). Greedy tau is deterministic, so unchanged code reproduces the recorded
  per-prompt taus exactly and the tau gate cannot false-alarm: that holds by construction, and the count of
  tau vectors that differed from the baseline is reported as the check of it. Throughput timing noise is real:
  its alarms are counted after the family correction and, to show calibration, at alpha with no correction.
* Detection of a tau drop: the draft's weights are perturbed (Gaussian noise, relative scale found so that the
  mean tau drops by at least 10%; one seed per trial). A case is eligible when its true drop, on every baseline
  prompt, is at least 10%; detected when the gated flow flags it.
* Detection of a slowdown: a test-only drafter that burns CPU after each proposal, calibrated per case so that
  a cycle takes about `slowdown` longer (CPU time, which is what the CPU profile's gate measures). Detected when
  the confirmed throughput gate flags it after the family correction.
"""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import time

from pathlib import Path

import torch

from ..engine import DFlashDrafter, generate
from ..errors import DFlashError
from ..provenance import PROJECT_ROOT, collect_fingerprint
from ..loading import load_draft, load_target, load_tokenizer
from ..profiles import get_profile
from ..prompts import load_prompts
from .baselines import baseline_path, load_baselines
from .measure import per_prompt_tau, speedup_samples
from .stats import REGRESSION, binomial_rate, bonferroni, confirm, sequential_tau_gate, throughput_gate

BLOCK_SIZES = (4, 8, 16)


def rate_with_ci(hits: int, trials: int) -> dict:
    """hits / trials with a 95% Clopper-Pearson interval (scipy's binomtest)."""
    if trials == 0:
        return {"rate": None, "hits": 0, "trials": 0}
    rate, low, high = binomial_rate(hits, trials)
    return {"rate": rate, "ci95": [round(low, 4), round(high, 4)], "hits": hits, "trials": trials}


def perturbed(draft, scale: float, seed: int):
    """A copy of the draft with N(0, scale * std(w)) added to every weight tensor."""
    generator = torch.Generator().manual_seed(seed)
    copy_ = copy.deepcopy(draft)
    with torch.no_grad():
        for parameter in copy_.parameters():
            std = float(parameter.std()) if parameter.numel() > 1 else float(parameter.abs().mean())
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * std)
    return copy_


class SpinningDrafter(DFlashDrafter):
    """Test-only: plain DFlash proposals, then `spin_s` of CPU burnt per cycle (a planted slowdown that the
    CPU-time clock sees, as a slower kernel would be seen)."""

    def __init__(self, draft, target, spin_s: float):
        super().__init__(draft, target)
        self.spin_s = spin_s

    def propose(self, *args, **kwargs):
        proposal = super().propose(*args, **kwargs)
        until = time.process_time() + self.spin_s
        while time.process_time() < until:
            pass
        return proposal


class Hogs:
    """`count` busy Python processes for the duration of a with-block."""

    def __init__(self, count: int):
        self.count, self.processes = count, []

    def __enter__(self):
        self.processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.count)]
        return self

    def __exit__(self, *exc):
        for process in self.processes:
            process.kill()
            process.wait()


class Bench:
    """The tiny pair, the baseline's prompts and the measurement of one case on prompts [first, n)."""

    def __init__(self, max_new_tokens: int):
        self.target, self.draft, tokenizer = load_target("tiny"), load_draft("tiny"), load_tokenizer("tiny")
        self.stop, self.max_new_tokens = [tokenizer.eos_token_id], max_new_tokens
        profile = get_profile("tiny")
        self.prompts = {spec.name: load_prompts(profile, spec, tokenizer, profile.prompts_cap)
                        for spec in profile.datasets}

    def run(self, draft, case, index, spin_s=0.0):
        prompt = self.prompts[case[0]][index]
        if draft is None:
            return generate(self.target, None, prompt, max_new_tokens=self.max_new_tokens, stop_token_ids=self.stop)
        drafter = SpinningDrafter(draft, self.target, spin_s) if spin_s else None
        return generate(self.target, draft, prompt, max_new_tokens=self.max_new_tokens, block_size=case[1],
                        stop_token_ids=self.stop, drafter=drafter)

    def timed(self, draft, case, indices, spin_s=0.0):
        """Interleaved target-only and DFlash runs (order rotating per prompt): per-prompt taus and CPU-clock
        speedups, as `measure.compare` does."""
        base, runs = [], []
        for i in indices:
            pair = [lambda: base.append(self.run(None, case, i)), lambda: runs.append(self.run(draft, case, i, spin_s))]
            for step in pair[i % 2:] + pair[:i % 2]:
                step()
        return per_prompt_tau(runs), speedup_samples(runs, base, "cpu")


def gated_case(bench: Bench, draft, case, baseline, *, start: int, family: int, alpha: float, margin: float,
               factor: float, spin_s: float = 0.0, tau_only: bool = False, tau_of=None, testbed: str = "") -> dict:
    """One case through the run's flow; returns its gates (dicts) and whether each failed after the family
    correction ("failed") and at alpha uncorrected ("failed_at_alpha")."""
    taus, ratios = ([], []) if tau_only else bench.timed(draft, case, range(start), spin_s)

    def new_taus(n):
        if tau_of is not None:
            return [tau_of(i) for i in range(n)]
        if n > len(taus):
            more = bench.timed(draft, case, range(len(taus), n), spin_s)
            taus.extend(more[0])
        return taus
    tau = sequential_tau_gate(baseline.per_prompt_tau, new_taus, start=start, family=family, margin=margin,
                              alpha=alpha)
    out = {"tau": _decided(tau, family)}
    if tau_only:
        return out
    out["tau_vector_changed"] = taus[:tau.n_new] != baseline.per_prompt_tau[:tau.n_new]
    stored = baseline.samples_on(testbed)
    first = throughput_gate(stored, ratios[:start], factor=factor, alpha=alpha)
    gate = confirm(first, throughput_gate(stored, bench.timed(draft, case, range(start), spin_s)[1],
                                          factor=factor, alpha=alpha)) if first.verdict == REGRESSION else first
    out["throughput"] = _decided(gate, family)
    return out


def _decided(gate, family: int) -> dict:
    verdict = bonferroni(gate, family).verdict
    return {"verdict": verdict, "rel_change": gate.rel_change, "p_value": gate.p_value, "n": gate.n_new,
            "failed_at_alpha": gate.verdict == REGRESSION, "failed": verdict == REGRESSION}


def measure(*, family: int, repeats: int = 25, tau_trials: int = 15, slow_repeats: int = 10,
            hogs: int = 2, slowdown: float = 0.20, margin: float = 0.03, factor: float = 1.10, alpha: float = 0.05,
            block_sizes: tuple[int, ...] = BLOCK_SIZES, log=print) -> dict:
    torch.set_num_threads(1)
    profile = get_profile("tiny")
    bench = Bench(profile.max_new_tokens)
    stored = load_baselines(baseline_path("baselines", "tiny", "block_size"), profile="tiny", ablation="block_size")
    cases = [(d, b) for d in bench.prompts for b in block_sizes]
    baselines = {c: stored.get(f"block_size/test_block_size[tiny-{c[0]}-bs{c[1]}]") for c in cases}
    testbed = collect_fingerprint("tiny", None)["testbed"]
    missing = [c for c, b in baselines.items() if b is None or b.samples_on(testbed) is None]
    if missing:
        raise DFlashError(f"no committed baseline with throughput for testbed {testbed} for {missing}: record them "
                          "with pytest ablations --update-baselines, or measure the A/B path with --ab")
    start, kw = profile.prompts, {"family": family, "alpha": alpha, "margin": margin, "factor": factor,
                                  "testbed": testbed}
    for case in cases:  # warm-up
        bench.run(bench.draft, case, 0)
        bench.run(None, case, 0)

    def unchanged(label):
        checks = []
        for r in range(repeats):
            checks += [gated_case(bench, bench.draft, c, baselines[c], start=start, **kw) for c in cases]
            log(f"{label}: repeat {r + 1}/{repeats}, throughput alarms so far "
                f"{sum(c['throughput']['failed'] for c in checks)}")
        return {"tau_vectors_changed": sum(c["tau_vector_changed"] for c in checks),
                "tau": rate_with_ci(sum(c["tau"]["failed"] for c in checks), len(checks)),
                "throughput": rate_with_ci(sum(c["throughput"]["failed"] for c in checks), len(checks)),
                "throughput_at_alpha_uncorrected": rate_with_ci(
                    sum(c["throughput"]["failed_at_alpha"] for c in checks), len(checks)),
                "throughput_remeasured": sum(c["throughput"]["failed_at_alpha"] for c in checks),
                "worst_throughput_change": min(c["throughput"]["rel_change"] for c in checks)}

    began = time.time()
    quiet = unchanged("quiet")
    with Hogs(hogs):
        loaded = unchanged(f"{hogs} busy processes")

    # Planted tau drop: a noise scale whose mean drop over the cases' first prompts is >= 10%.
    cap = len(next(iter(baselines.values())).per_prompt_tau)
    tau_cache: dict = {}

    def tau_of(draft, key, case, i):
        slot = (key, case, i)
        if slot not in tau_cache:
            result = bench.run(draft, case, i)
            tau_cache[slot] = result.tau if result.num_cycles else 1.0
        return tau_cache[slot]
    scale, drop = 0.05, 0.0
    while drop < 0.10 and scale < 5:
        scale *= 1.5
        probe = perturbed(bench.draft, scale, seed=10_000)
        drop = 1 - (sum(tau_of(probe, ("probe", scale), c, i) for c in cases for i in range(start))
                    / sum(sum(baselines[c].per_prompt_tau[:start]) for c in cases))
    eligible = detected = 0
    true_drops, missed, prompts_used = [], [], 0
    for trial in range(tau_trials):
        probe, key = perturbed(bench.draft, scale, seed=trial), ("trial", trial)
        for case in cases:
            gate = gated_case(bench, probe, case, baselines[case], start=start, tau_only=True,
                              tau_of=lambda i, case=case: tau_of(probe, key, case, i), **kw)["tau"]
            prompts_used += gate["n"]
            true_drop = 1 - sum(tau_of(probe, key, case, i) for i in range(cap)) / sum(baselines[case].per_prompt_tau)
            true_drops.append(true_drop)
            if true_drop >= 0.10:
                eligible += 1
                detected += gate["failed"]
                if not gate["failed"]:
                    missed.append({"trial": trial, "case": f"{case[0]}/bs={case[1]}", "true_drop": round(true_drop, 4),
                                   "measured_drop": round(-gate["rel_change"], 4), "prompts": gate["n"],
                                   "p": gate["p_value"]})
        log(f"tau drop: trial {trial + 1}/{tau_trials}, detected {detected} of {eligible} eligible")

    # Planted slowdown: per case, spin for `slowdown` of the case's measured CPU seconds per cycle.
    spins = {}
    for case in cases:
        runs = [bench.run(bench.draft, case, i) for i in range(start)]
        spins[case] = slowdown * sum(r.cpu_s for r in runs) / sum(r.num_cycles for r in runs)
    slow_checks = []
    for r in range(slow_repeats):
        slow_checks += [(c, gated_case(bench, bench.draft, c, baselines[c], start=start, spin_s=spins[c], **kw))
                        for c in cases]
        log(f"slowdown: repeat {r + 1}/{slow_repeats}, detected {sum(g['throughput']['failed'] for _, g in slow_checks)}"
            f" of {len(slow_checks)}")
    changes = [g["throughput"]["rel_change"] for _, g in slow_checks]
    return {
        "command": f"dflash gate-quality --repeats {repeats} --tau-trials {tau_trials} --slow-repeats {slow_repeats} "
                   f"--family {family} --hogs {hogs} --block-sizes {','.join(map(str, block_sizes))}",
        "profile": "tiny", "baselines": "baselines/tiny/block_size.json", "testbed": testbed,
        "cases": [f"{d}/bs={b}" for d, b in cases],
        "prompts_per_case": {"start": start, "cap": cap}, "max_new_tokens": profile.max_new_tokens,
        "margin": margin, "factor": factor, "alpha": alpha, "family": family, "clock": "cpu",
        "wall_minutes": round((time.time() - began) / 60, 1),
        "false_alarms_unchanged_code": {"independent_checks_per_gate_and_condition": repeats * len(cases),
                                        "quiet": quiet, f"with_{hogs}_busy_processes": loaded},
        "detection_of_10pct_tau_drop": {
            "noise_scale": round(scale, 4), "trials": tau_trials,
            "mean_true_case_drop": round(sum(true_drops) / len(true_drops), 4),
            "mean_prompts_per_case": round(prompts_used / (tau_trials * len(cases)), 1),
            "cases_with_true_drop_ge_10pct": rate_with_ci(detected, eligible), "missed": missed},
        "detection_of_slowdown": {
            "planted": f"{slowdown:.0%} more CPU per cycle", "checks": len(slow_checks),
            "mean_measured_change": round(sum(changes) / len(changes), 4),
            "detected": rate_with_ci(sum(g["throughput"]["failed"] for _, g in slow_checks), len(slow_checks)),
            "missed": [{"case": f"{c[0]}/bs={c[1]}", "change": round(g["throughput"]["rel_change"], 4),
                        "p": g["throughput"]["p_value"]} for c, g in slow_checks if not g["throughput"]["failed"]]},
    }


def measure_ab(*, family: int, ref: str = "HEAD", repeats: int = 4, slow_repeats: int = 4, slowdown: float = 0.20,
               factor: float = 1.10, alpha: float = 0.05, block_sizes: tuple[int, ...] = BLOCK_SIZES,
               log=print) -> dict:
    """The A/B path's quality: every block-size case's throughput gated against commit `ref` (default HEAD:
    unchanged code against itself) measured by the real reference worker (`reference.ReferenceWorker`, the
    case run by `ref`'s own pytest in a checkout of it) right after the current code measured it in this
    process; a regression reading re-measures both sides (`stats.confirm`). Detection: the current side with a
    drafter that burns `slowdown` more CPU per cycle. Every check is an independent measurement."""
    from tempfile import mkdtemp

    from .reference import ReferenceWorker, resolve_commit
    torch.set_num_threads(1)
    profile = get_profile("tiny")
    bench = Bench(profile.max_new_tokens)
    cases = [(d, b) for d in bench.prompts for b in block_sizes]
    start = profile.prompts
    sha = resolve_commit(ref, PROJECT_ROOT)
    worker = ReferenceWorker(sha, PROJECT_ROOT, Path(mkdtemp(prefix="dflash-gate-quality-ab-")))

    def reference_samples(case) -> list[float]:
        nodeid = f"ablations/test_block_size.py::test_block_size[tiny-{case[0]}-bs{case[1]}]"
        records, outcome = worker.run_cases([nodeid], ["--profile", "tiny"])
        (record,) = records.values() if len(records) == 1 else (None,)
        if record is None:
            raise DFlashError(f"the reference {sha[:12]} did not record {nodeid} ({outcome})")
        return record["metrics"]["speedup_samples"][:start]

    def check(case, spin_s: float = 0.0) -> dict:
        first = throughput_gate(reference_samples(case), bench.timed(bench.draft, case, range(start), spin_s)[1],
                                factor=factor, alpha=alpha)
        gate = first if first.verdict != REGRESSION else confirm(first, throughput_gate(
            reference_samples(case), bench.timed(bench.draft, case, range(start), spin_s)[1], factor=factor,
            alpha=alpha))
        return _decided(gate, family)

    for case in cases:  # warm-up
        bench.run(bench.draft, case, 0)
        bench.run(None, case, 0)
    spins = {}
    for case in cases:
        runs = [bench.run(bench.draft, case, i) for i in range(start)]
        spins[case] = slowdown * sum(r.cpu_s for r in runs) / sum(r.num_cycles for r in runs)
    began = time.time()
    try:
        same, slow = [], []
        for r in range(repeats):
            same += [check(c) for c in cases]
            log(f"A/B unchanged: repeat {r + 1}/{repeats}, alarms {sum(g['failed'] for g in same)} of {len(same)}")
        for r in range(slow_repeats):
            slow += [check(c, spins[c]) for c in cases]
            log(f"A/B slowdown: repeat {r + 1}/{slow_repeats}, detected {sum(g['failed'] for g in slow)} of {len(slow)}")
    finally:
        worker.close()
    return {
        "command": f"dflash gate-quality --ab-ref {ref} --repeats {repeats} --slow-repeats {slow_repeats} "
                   f"--family {family} --block-sizes {','.join(map(str, block_sizes))}",
        "reference": sha, "testbed": collect_fingerprint("tiny", None)["testbed"],
        "cases": [f"{d}/bs={b}" for d, b in cases], "prompts_per_case": start, "factor": factor, "alpha": alpha,
        "family": family, "clock": "cpu", "wall_minutes": round((time.time() - began) / 60, 1),
        "false_alarms_unchanged_code": {
            "after_family_correction": rate_with_ci(sum(g["failed"] for g in same), len(same)),
            "at_alpha_uncorrected": rate_with_ci(sum(g["failed_at_alpha"] for g in same), len(same)),
            "worst_change": min(g["rel_change"] for g in same)},
        "detection_of_slowdown": {
            "planted": f"{slowdown:.0%} more CPU per cycle, current side only",
            "mean_measured_change": round(sum(g["rel_change"] for g in slow) / len(slow), 4),
            "detected": rate_with_ci(sum(g["failed"] for g in slow), len(slow)),
            "missed": [round(g["rel_change"], 4) for g in slow if not g["failed"]]},
    }


def main(*, family: int, repeats: int = 25, tau_trials: int = 15, slow_repeats: int = 10,
         hogs: int = 2, block_sizes: tuple[int, ...] = BLOCK_SIZES, out: str | None = None,
         ab_ref: str | None = None) -> None:
    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
    if ab_ref:
        result = measure_ab(family=family, ref=ab_ref, repeats=repeats, slow_repeats=slow_repeats,
                            block_sizes=block_sizes, log=log)
    else:
        result = measure(repeats=repeats, tau_trials=tau_trials, slow_repeats=slow_repeats, family=family, hogs=hogs,
                         block_sizes=block_sizes, log=log)
    text = json.dumps(result, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    if out:
        Path(out).write_text(text + "\n")
    print(text)
