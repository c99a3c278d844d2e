"""The A100 path rehearsed on this machine: the GPU profile's ablations run end to end against hub-layout
stand-ins (dflash.standins: Qwen3's vocabulary, tokenizer layout and chat template, a z-lab-format draft,
sharded bf16 safetensors, the datasets' real field names) in a temporary HF_HOME, with the supported device
override (--device cpu --dtype ...) instead of patching torch, shrunk to 2 prompts x 16 tokens. What the stand-in
numbers mean is nothing; what is tested is that every GPU ablation runs, records, gates and reports."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dflash.standins import build_hub_standins, hf_env

ROOT = Path(__file__).resolve().parents[1]
SHRUNK = ["--profile", "gpu-qwen3-4b", "--device", "cpu", "--prompts", "2", "--max-new-tokens", "16",
          "-p", "no:cacheprovider", "-p", "no:randomly", "-q", "-n", "0"]
# One case of every gated GPU ablation (GSM8K), selectable with -k since case ids have no '='. (The peer
# benchmark runs on the smol profile only.)
ONE_PER_ABLATION = ("gsm8k and (test_block_size and bs8] or test_full_length and bs8] or ewma] or profiling "
                    "or batch2] or ranks1] or rounds8] or steps2] or sparse-max2] or tree-K2]) "
                    "or mt-bench-turn2 and test_block_size and bs8]")


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    build_hub_standins(home)
    return home


def rehearse(hf_home, out: Path, *args, ci: bool = False):
    env = hf_env(hf_home)
    env.pop("CI", None)
    if ci:
        env["CI"] = "true"
    run = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "ablations"), *SHRUNK, "--reports-dir",
                          str(out / "reports"), "--baselines-dir", str(out / "baselines"), *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return run, [json.loads(line) for f in sorted((out / "reports").glob("gpu-qwen3-4b-*/results.jsonl"))
                 for line in f.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("dtype,accounting", [("float32", "engine"), ("bfloat16", "upstream")])
def test_one_case_of_every_gpu_ablation_runs_on_the_standins(hf_home, tmp_path, dtype, accounting):
    run, records = rehearse(hf_home, tmp_path, "--dtype", dtype, "-k", ONE_PER_ABLATION, "--report",
                            "--tau-accounting", accounting)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert {r["tau_accounting"] for r in records} == {accounting}
    ablations = {r["ablation"] for r in records}
    assert "mt-bench-turn2" in {r["dataset"] for r in records}  # turn 2 after the target's greedy turn 1
    assert ablations >= {"block_size", "full_length", "dynamic", "profiling", "batched", "candidate_diversity",
                         "multiround", "refinement", "suffix_recycling", "tree_variants"}, ablations
    counts = {r["id"]: len(r["metrics"]["per_prompt_tau"]) for r in records if "per_prompt_tau" in r["metrics"]}
    assert all(n == 2 for case_id, n in counts.items() if not case_id.startswith("batched/")), counts
    assert all(r["fingerprint"]["hardware"].startswith("cpu") for r in records)  # a CPU run says so
    summary = next((tmp_path / "reports").glob("gpu-qwen3-4b-*/summary.md")).read_text()
    assert "Block-size sweep" in summary or "block" in summary.lower()


def test_gpu_ci_tier_bootstraps_baselines_then_gates_against_them(hf_home, tmp_path):
    """The runner's bootstrap (--update-baselines, then commit) and the gated CI run after it, on the tier
    `-m "gpu and not slow"`; under CI a gated case without a baseline fails."""
    tier = ["-m", "gpu and not slow", "--dtype", "bfloat16"]
    run, _ = rehearse(hf_home, tmp_path / "without", *tier, ci=True)
    assert run.returncode == 1 and "no baseline entry" in run.stdout, run.stdout[-3000:]
    run, recorded = rehearse(hf_home, tmp_path / "boot", *tier, "--update-baselines")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    ids = sorted(r["id"] for r in recorded)
    assert ids == [f"block_size/test_block_size[gpu-qwen3-4b-{d}-bs{b}]" for d in ("gsm8k", "humaneval")
                   for b in (16, 8)], ids
    baselines = tmp_path / "gated" / "baselines"
    baselines.parent.mkdir()
    os.rename(tmp_path / "boot" / "baselines", baselines)
    run, gated = rehearse(hf_home, tmp_path / "gated", *tier, ci=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert sorted(r["id"] for r in gated) == ids and all(r["gates"] for r in gated)


def test_gpu_profiles_skip_in_one_line_without_cuda_or_weights(tmp_path):
    env = hf_env(tmp_path / "empty_hf_home")
    run = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "ablations"), "-m", "gpu", "-q", "-rs", "-n", "0",
                          "-p", "no:randomly", "--reports-dir", str(tmp_path / "reports")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:]
    skips = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and "passed" not in run.stdout.splitlines()[-1] and "failed" not in run.stdout.splitlines()[-1]
    assert all("CUDA" in line or "SGLang" in line or "not in the local Hugging Face cache" in line
               for line in skips), skips[:5]
