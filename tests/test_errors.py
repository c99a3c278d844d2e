"""Bad input gets one clear error that says what was wrong and how to fix it (no deep traceback in the CLI)."""
import subprocess
import sys
import time

import pytest
import torch

from dflash import DFlashError, generate, load_draft, load_target
from helpers import random_draft, random_target


@pytest.fixture(scope="module")
def target():
    return random_target(3, vocab_size=12, num_layers=3)


def expect(message, call, *args, **kwargs):
    with pytest.raises(DFlashError, match=message):
        call(*args, **kwargs)


def test_unknown_model_name():
    expect("Unknown target model 'no-such-model'.*known name", load_target, "no-such-model")


def test_hub_id_not_available_offline_fails_fast_and_says_how_to_provide_weights():
    begin = time.perf_counter()
    expect(r"not available offline.*hf download someone/not-cached.*local directory", load_target,
           "someone/not-cached")
    expect(r"draft model 'someone/not-cached-draft' is not available offline", load_draft, "someone/not-cached-draft")
    assert time.perf_counter() - begin < 30  # never waits on a download


def test_directory_without_config(tmp_path):
    expect("without config.json", load_target, str(tmp_path))


def test_draft_hidden_size_mismatch(target):
    other = random_target(4, vocab_size=12, hidden_size=16, num_layers=3)
    expect("hidden size 16 does not match the target's 32", generate, target, random_draft(other, 0), [1, 2],
           max_new_tokens=4, block_size=4)


def test_draft_vocab_mismatch(target):
    other = random_target(4, vocab_size=20, num_layers=3)
    expect("vocabulary size 20 does not match", generate, target, random_draft(other, 0), [1, 2], max_new_tokens=4,
           block_size=4)


def test_target_layer_ids_out_of_range(target):
    draft = random_draft(target, 0, target_layer_ids=[1, 3])
    expect(r"include \[3\], outside the target's 3 decoder layers", generate, target, draft, [1, 2],
           max_new_tokens=4, block_size=4)


@pytest.mark.parametrize("mask", [None, 12, -1])
def test_missing_or_out_of_range_mask_token(target, mask):
    draft = random_draft(target, 0)
    draft.mask_token_id = mask
    expect("mask_token_id .* missing or outside the vocabulary", generate, target, draft, [1, 2], max_new_tokens=4,
           block_size=4)


@pytest.mark.parametrize("block_size", [0, 17])
def test_block_size_out_of_range(target, block_size):
    expect(f"block_size must be between 1 and 16, got {block_size}", generate, target, random_draft(target, 0),
           [1, 2], max_new_tokens=4, block_size=block_size)


def test_block_size_above_one_without_draft(target):
    expect("target-only decoding .* pass block_size=1", generate, target, None, [1, 2], max_new_tokens=4,
           block_size=4)


def test_negative_temperature(target):
    expect("temperature must be a finite number >= 0", generate, target, None, [1, 2], max_new_tokens=4, temperature=-0.5)


def test_empty_prompt(target):
    expect("prompt is empty", generate, target, None, [], max_new_tokens=4)


@pytest.mark.parametrize("n", [0, -3])
def test_max_new_tokens_below_one(target, n):
    expect(f"max_new_tokens must be an integer >= 1, got {n}", generate, target, None, [1], max_new_tokens=n)


def test_unknown_acceptance_rule(target):
    expect("Unknown acceptance rule 'magic'", generate, target, None, [1], max_new_tokens=2, temperature=1.0,
           acceptance="magic")


def test_corrupt_draft_weights(tmp_path, target):
    draft = random_draft(target, 0)
    draft.save_pretrained(tmp_path)
    from safetensors.torch import save_file
    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    expect("do not match the z-lab DFlash layout", load_draft, str(tmp_path))


def test_cli_prints_one_paragraph_and_exits_2():
    run = subprocess.run([sys.executable, "-m", "dflash.cli", "generate", "--target", "someone/not-cached",
                          "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith("dflash: error: ") and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("temperature,draft_temperature", [(0.0, 0.5), (1.0, 0.0), (1.0, -1.0)])
def test_draft_temperature_must_match_the_mode(target, temperature, draft_temperature):
    expect("draft_temperature must be > 0 when sampling", generate, target, random_draft(target, 0), [1, 2],
           max_new_tokens=4, block_size=4, temperature=temperature, draft_temperature=draft_temperature)


@pytest.mark.parametrize("prompt,bad", [([1, 12], 12), ([-1, 2], -1)])
def test_prompt_ids_outside_the_vocabulary(target, prompt, bad):
    expect(rf"token id {bad}, outside the target's vocabulary \(0\.\.11\)", generate, target, None, prompt,
           max_new_tokens=2)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf")])
def test_temperature_must_be_finite(target, temperature):
    expect("temperature must be a finite number >= 0", generate, target, None, [1], max_new_tokens=2,
           temperature=temperature)
    expect("draft_temperature must be a finite number", generate, target, random_draft(target, 0), [1],
           max_new_tokens=2, block_size=2, temperature=1.0, draft_temperature=temperature)


@pytest.mark.parametrize("seed", [1 << 64, -(1 << 63) - 1, 1.5])
def test_seed_out_of_range(target, seed):
    expect("seed must be an integer in", generate, target, None, [1], max_new_tokens=2, seed=seed)


def test_prompt_and_new_tokens_within_the_targets_positions(target):
    positions = target.config.max_position_embeddings
    expect(rf"exceeds the target's {positions} positions.*at most {positions - 2}", generate, target, None, [1, 2],
           max_new_tokens=positions)
    expect("Shorten the prompt", generate, target, None, [1] * positions, max_new_tokens=1)


def test_batched_prompts_are_checked_like_single_ones(target):
    from dflash.backends.batched import generate_batch
    expect(r"Prompt 1 of the batch holds token id 40", generate_batch, target, None, [[1], [40]], max_new_tokens=2,
           block_size=1)


def _draft_dir_with(tmp_path, target, **config):
    """A saved random draft whose config.json has `config` merged in."""
    import json
    random_draft(target, 0, num_layers=2).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(config)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize("config,key", [
    ({"layer_types": ["full_attention", "sliding_attention"]}, r"'layer_types' has 'sliding_attention' at layer 1"),
    ({"layer_types": ["chunked_attention", "full_attention"]}, r"'layer_types' has 'chunked_attention' at layer 0"),
    ({"use_sliding_window": True, "sliding_window": 64}, r"'use_sliding_window' is true with 'sliding_window' 64"),
    ({"layer_types": "full_attention"}, r"'layer_types' must be a list of strings"),
    ({"use_sliding_window": "yes"}, r"'use_sliding_window' must be true or false"),
    ({"use_sliding_window": True, "sliding_window": 0}, r"'sliding_window' must be an integer >= 1"),
])
def test_draft_config_that_is_not_full_attention(tmp_path, target, config, key):
    """Sliding attention in a draft config used to be ignored silently; now the file and key are named."""
    path = _draft_dir_with(tmp_path, target, **config)
    import re
    expect(re.escape(f"Draft config {tmp_path / 'config.json'}: ") + key, load_draft, str(path))
    if "must be" not in key:
        expect("implements full attention only", load_draft, str(path))


@pytest.mark.parametrize("config", [
    {"layer_types": ["full_attention", "full_attention"]},
    {"use_sliding_window": False, "sliding_window": 64},  # transformers ignores the window when it is off
    {"use_sliding_window": True, "sliding_window": 512, "max_position_embeddings": 512},  # window covers all
])
def test_full_attention_draft_configs_still_load(tmp_path, target, config):
    assert load_draft(str(_draft_dir_with(tmp_path, target, **config))).block_size == 16
