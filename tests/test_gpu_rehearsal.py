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
# One case of every gated GPU ablation (GSM8K, thinking off), selectable with -k since case ids have no '='. (The
# peer benchmark runs on the smol profile only; the thinking-on cases, gsm8k-think, have a test of their own.)
ONE_PER_ABLATION = ("gsm8k and not think and (test_block_size and bs8] or test_full_length and bs8] or ewma] or profiling "
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
    assert all(r["fingerprint"]["testbed"].startswith("cpu-") and not r["fingerprint"]["gpu"]
               for r in records)  # a CPU run says so
    summary = next((tmp_path / "reports").glob("gpu-qwen3-4b-*/summary.md")).read_text()
    assert "Block-size sweep" in summary or "block" in summary.lower()


def test_thinking_on_and_off_cases_both_run_and_record_their_rendering(hf_home, tmp_path):
    """The thinking axis end to end: the block-size case on GSM8K with thinking off and on (gsm8k-think) both
    decode on the stand-ins; each record, and the report, carries the template's identity and the flag; the
    thinking-on case gets no published figure."""
    from dflash.loading import chat_template_identity, load_tokenizer
    run, records = rehearse(hf_home, tmp_path, "--dtype", "float32", "-k",
                            "test_block_size and (gsm8k-bs16] or gsm8k-think-bs16])", "--report")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    by_dataset = {r["dataset"]: r for r in records}
    assert sorted(by_dataset) == ["gsm8k", "gsm8k-think"], sorted(by_dataset)
    tokenizer = load_tokenizer(str(next((hf_home / "hub" / "models--Qwen--Qwen3-4B" / "snapshots").iterdir())))
    template = chat_template_identity(tokenizer)
    assert {d: (r["prompt_template"], r["thinking"]) for d, r in by_dataset.items()} == {
        "gsm8k": (template, "off"), "gsm8k-think": (template, "on")}
    assert all(len(r["metrics"]["per_prompt_tau"]) == 2 and r["outcome"] == "passed" for r in records)
    assert not by_dataset["gsm8k-think"]["references"]
    summary = next((tmp_path / "reports").glob("gpu-qwen3-4b-*/summary.md")).read_text()
    assert f"{template} thinking off (gsm8k)" in summary and f"{template} thinking on (gsm8k-think)" in summary


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


FAKE_SGLANG = '''
"""A stand-in for SGLang's in-process Engine: deterministic token ids; the DFLASH engine reports verify steps."""
import asyncio

ENGINES = []


class Engine:
    def __init__(self, **arguments):
        self.arguments = arguments
        self.speculative = arguments.get("speculative_algorithm") == "DFLASH"
        ENGINES.append(arguments)

    def flush_cache(self):
        pass

    def _one(self, input_ids, sampling_params):
        n = sampling_params["max_new_tokens"]
        meta = {"completion_tokens": n}
        if self.speculative:
            meta.update(spec_verify_ct=max(1, n // 4), spec_accept_length=n / max(1, n // 4))
        return {"output_ids": [(sum(input_ids) + i) % 97 for i in range(n)], "meta_info": meta}

    def generate(self, input_ids, sampling_params):
        return [self._one(ids, sampling_params) for ids in input_ids]

    async def async_generate(self, input_ids, sampling_params):
        await asyncio.sleep(0)
        return self._one(input_ids, sampling_params)

    def shutdown(self):
        pass
'''

FAKE_CUDA_PLUGIN = '''
"""SGLang needs CUDA; the fake engine does not. Only the sweep's CUDA questions are answered here."""
import torch


def pytest_configure(config):
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_capability = lambda *args: (9, 0)
'''


def test_sglang_sweep_runs_against_a_fake_sglang(hf_home, tmp_path):
    """ablations/test_sglang.py end to end with a fake `sglang` (version, DFLASH capability, Engine API) on the
    stand-ins: only the --profile of the run is swept, and the report is written."""
    fake = tmp_path / "fake"
    (fake / "sglang" / "srt").mkdir(parents=True)
    (fake / "sglang" / "__init__.py").write_text(FAKE_SGLANG)
    (fake / "sglang" / "srt" / "__init__.py").write_text("")
    (fake / "sglang" / "srt" / "server_args.py").write_text(
        "import dataclasses\n\n\n@dataclasses.dataclass\nclass ServerArgs:\n"
        "    speculative_dflash_block_size: int | None = None\n")
    (fake / "sglang-0.5.99.dist-info").mkdir()
    (fake / "sglang-0.5.99.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: sglang\n"
                                                              "Version: 0.5.99\n")
    (fake / "fake_cuda.py").write_text(FAKE_CUDA_PLUGIN)
    env = hf_env(hf_home, PYTHONPATH=os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    env.pop("CI", None)
    run = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "ablations" / "test_sglang.py"), "-p",
                          "fake_cuda", "--profile", "gpu-qwen3-4b", "-q", "-rs", "-n", "0", "-p", "no:randomly",
                          "-p", "no:cacheprovider", "--reports-dir", str(tmp_path / "reports")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 passed, 1 skipped" in run.stdout and "profile gpu-qwen3-8b is not in this run" in run.stdout
    sweep = json.loads(next((tmp_path / "reports").glob("sglang-gpu-qwen3-4b-*/sweep.json")).read_text())
    assert set(sweep["tables"]) == {"flashinfer", "fa3"}  # fa4 dropped on SM 90
    assert [row["concurrency"] for row in sweep["tables"]["fa3"]] == [1, 2, 4, 8]
