"""The `dflash` command line on the embedded tiny pair."""
import json
import subprocess
import sys

import pytest


def dflash(*args, timeout=300):
    run = subprocess.run([sys.executable, "-m", "dflash.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.fixture(scope="module")
def add_prompt_results():
    common = ["generate", "--target", "tiny", "--prompt", "def add(a, b):", "--max-new-tokens", "64",
              "--block-size", "8", "--json"]
    return json.loads(dflash(*common, "--draft", "tiny")), json.loads(dflash(*common, "--draft", "none"))


def test_generate_json_is_identical_to_target_only_with_tau_above_one(add_prompt_results):
    speculative, target_only = add_prompt_results
    assert speculative["output_ids"] == target_only["output_ids"]
    assert speculative["text"] == target_only["text"]
    assert speculative["tau"] > 1 and target_only["tau"] == 1.0
    assert {"acceptance_lengths", "ttft_s", "tpot_s", "tokens_per_s", "num_cycles"} <= set(speculative)


def test_generate_with_prompt_ids_sampling_and_trace():
    out = json.loads(dflash("generate", "--prompt-ids", "5,6,7", "--max-new-tokens", "12", "--temperature", "1",
                            "--seed", "3", "--json", "--trace"))
    assert len(out["output_ids"]) <= 12 and len(out["trace"]) == out["num_cycles"]
    again = json.loads(dflash("generate", "--prompt-ids", "5,6,7", "--max-new-tokens", "12", "--temperature", "1",
                              "--seed", "3", "--json"))
    assert again["output_ids"] == out["output_ids"]  # a seed fixes the sample


def test_models_json_lists_tiny_with_a_local_path_and_hub_ids():
    rows = {r["name"]: r for r in json.loads(dflash("models", "--json"))}
    assert rows["tiny"]["target"].endswith("models/tiny/target")
    assert rows["qwen3-4b"]["target"] == "Qwen/Qwen3-4B" and rows["qwen3-4b"]["draft"] == "z-lab/Qwen3-4B-DFlash-b16"


def test_bad_prompt_ids_are_a_clear_error():
    run = subprocess.run([sys.executable, "-m", "dflash.cli", "generate", "--prompt-ids", "1,x"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "comma-separated integers" in run.stderr and "Traceback" not in run.stderr
