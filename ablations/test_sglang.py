"""SGLang serving sweep (backlog variant 9; the research repo's benchmark_sglang.py, spec 5.8).

Per GPU profile and attention backend: a target-only SGLang engine and a DFLASH engine each sweep concurrency
1, 2, 4, 8 on GSM8K prompts (chat template, thinking off, greedy). The table per concurrency: baseline and
DFLASH output tokens/s, speedup, SGLang's accept length (tau), and how many requests gave exactly the
baseline's tokens. Written to reports/sglang-<profile>-<time>/ (sweep.json, summary.md).

Marked gpu; skipped with one line when SGLang, CUDA, or the weights/datasets are absent. Nothing is downloaded.
Greedy parity is reported, not asserted: SGLang verifies blocks with prefill-style kernels and decodes with
decode kernels, so bf16 argmax ties can differ between its two engines (its own parity tests switch on
deterministic inference for that; `EngineSettings(deterministic=True)` does the same here).
"""
import json
import time
from pathlib import Path

import pytest

from dflash.profiles import PROFILES, get_profile, unavailable_reason
from dflash.prompts import load_prompts
from dflash.backends import sglang as sg

pytestmark = [pytest.mark.gpu, pytest.mark.slow]  # the full GPU tier: hours of serving sweeps

CONCURRENCIES = (1, 2, 4, 8)
REQUESTS_BASE, REQUESTS_CAP = 16, 128  # n(c) = min(16 c, 128): the research script's 128 / 1024, scaled down
BACKENDS = "flashinfer,fa3,fa4"  # fa3 kept on SM 90 only, fa4 on SM >= 100 only
DATASET = "gsm8k"


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _markdown(profile: str, tables: dict[str, list[dict]]) -> str:
    lines = [f"# SGLang sweep: {profile}, {DATASET}", ""]
    for backend, rows in tables.items():
        lines += [f"## attention backend {backend}", "",
                  "| concurrency | requests | baseline tok/s | DFLASH tok/s | speedup | accept length | exact match |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['concurrency']} | {r['requests']} | {_num(r['baseline_tokens_per_s'], 1)} | "
                  f"{_num(r['dflash_tokens_per_s'], 1)} | {_num(r['speedup'], 2)} | {_num(r['accept_length'], 2)} | "
                  f"{r['exact_match']}/{r['compared']} |" for r in rows]
        lines.append("")
    return "\n".join(lines)


@pytest.mark.parametrize("profile_name", [pytest.param(p.name, id=p.name) for p in PROFILES.values()
                                          if p.needs_cuda])
def test_sglang_sweep(profile_name, request):
    from dflash.harness.plugin import STATE
    state = request.config.stash[STATE]
    if profile_name not in state.profiles:
        pytest.skip(f"SGLang sweep: profile {profile_name} is not in this run (--profile {state.profiles[0]})")
    reason = sg.unavailable_reason()
    if reason:
        pytest.skip(f"SGLang sweep: {reason}")
    profile = get_profile(profile_name)
    reason = unavailable_reason(profile, datasets=[DATASET])
    if reason:
        pytest.skip(reason)
    import torch

    from dflash.loading import load_tokenizer, resolve
    state.release_models()  # SGLang sizes its KV pool from free GPU memory: in-process models must go first
    tokenizer = load_tokenizer(profile.target)
    prompts = load_prompts(profile, profile.dataset(DATASET), tokenizer, REQUESTS_CAP)
    target, draft = str(resolve(profile.target, "target")), str(resolve(profile.draft, "draft"))
    sm_major = torch.cuda.get_device_capability()[0]
    tables, raw = {}, {}
    for backend in sg.attention_backends(BACKENDS, sm_major):
        levels = {}
        for name, settings in (("baseline", sg.EngineSettings(target, attention_backend=backend)),
                               ("dflash", sg.EngineSettings(target, draft, attention_backend=backend))):
            engine = sg.open_engine(settings)
            try:
                levels[name] = sg.sweep(engine, prompts, CONCURRENCIES, max_new_tokens=profile.max_new_tokens,
                                        base=REQUESTS_BASE, cap=REQUESTS_CAP, speculative=name == "dflash")
            finally:
                engine.shutdown()
        tables[backend] = sg.compare_levels(levels["baseline"], levels["dflash"])
        raw[backend] = {name: [level.to_dict() for level in runs] for name, runs in levels.items()}

    out_dir = Path(request.config.rootpath) / request.config.getoption("reports_dir") / \
        f"sglang-{profile_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps({"profile": profile_name, "dataset": DATASET, "target": target,
                                                    "draft": draft, "tables": tables, "levels": raw}, indent=2))
    (out_dir / "summary.md").write_text(_markdown(profile_name, tables))
    for backend, rows in tables.items():
        for row in rows:
            # A draft that never matches gives accept length 1.0 (the bonus token only): DFLASH did nothing.
            assert row["accept_length"] is not None and row["accept_length"] > 1.0, (backend, row)
            assert row["baseline_tokens_per_s"] > 0 and row["dflash_tokens_per_s"] > 0, (backend, row)
