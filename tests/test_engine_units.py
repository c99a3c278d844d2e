"""Unit tests of the engine's pieces: cache cropping, tail blocks, stop tokens, mask-id tokens, metrics,
checkpoint round trip, the layer-id rule, and a draft written by an independent script."""
import json

import pytest
import torch
from safetensors.torch import save_file

from dflash import DFlashDraftModel, build_target_layer_ids, generate, load_draft
from dflash.engine.cache import cache_length, crop_cache, new_cache
from helpers import random_draft, random_target, reference_greedy


def test_crop_cache_keeps_the_prefix(pair):
    target, _ = pair
    cache = new_cache(target.config)
    target(input_ids=torch.tensor([[1, 2, 3, 4, 0, 1]]), past_key_values=cache, use_cache=True)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    crop_cache(cache, 4)
    assert cache_length(cache) == 4
    for (keys, values), layer in zip(before, cache.layers):
        assert torch.equal(layer.keys, keys[..., :4, :]) and torch.equal(layer.values, values[..., :4, :])
    crop_cache(cache, 4)  # no-op
    assert cache_length(cache) == 4
    for bad in (-1, 5):
        with pytest.raises(ValueError):
            crop_cache(cache, bad)


def test_cropped_cache_continues_like_a_fresh_one(pair):
    """After cropping, a forward over the next tokens gives the same logits as a cache built on the prefix."""
    target, _ = pair
    cropped, fresh = new_cache(target.config), new_cache(target.config)
    target(input_ids=torch.tensor([[1, 2, 3, 4, 0, 1]]), past_key_values=cropped, use_cache=True)
    crop_cache(cropped, 3)
    target(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=fresh, use_cache=True)
    step = torch.tensor([[2, 2]])
    a = target(input_ids=step, past_key_values=cropped, use_cache=True).logits
    b = target(input_ids=step, past_key_values=fresh, use_cache=True).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7, 17, 33])
def test_tail_block_shrinks_to_the_budget(pair, max_new_tokens):
    target, draft = pair
    result = generate(target, draft, [1, 2, 3], max_new_tokens=max_new_tokens, block_size=8)
    assert len(result.output_ids) == max_new_tokens
    assert result.output_ids == reference_greedy(target, [1, 2, 3], max_new_tokens)
    for record in result.trace:
        assert record.block_size <= min(8, max_new_tokens - record.token_index)
        assert record.acceptance_length <= record.block_size


def test_stop_token_inside_an_accepted_block_truncates_there(pair):
    target, draft = pair
    free = generate(target, draft, [1, 2, 3], max_new_tokens=40, block_size=8)
    # pick a stop token that first appears inside a cycle that committed several tokens
    cycle = next(r for r in free.trace if r.acceptance_length >= 3 and r.token_index > 0)
    stop = free.output_ids[cycle.token_index + 1]
    first = free.output_ids.index(stop)
    stopped = generate(target, draft, [1, 2, 3], max_new_tokens=40, block_size=8, stop_token_ids=[stop])
    assert stopped.stopped and stopped.output_ids == free.output_ids[: first + 1]
    assert stopped.output_ids == reference_greedy(target, [1, 2, 3], 40, [stop])


def test_stop_token_as_first_token(pair):
    target, draft = pair
    first = generate(target, None, [1, 2, 3], max_new_tokens=1).output_ids[0]
    result = generate(target, draft, [1, 2, 3], max_new_tokens=10, block_size=4, stop_token_ids=[first])
    assert result.output_ids == [first] and result.num_cycles == 0 and result.stopped


def test_tokens_equal_to_the_mask_id_are_kept(pair):
    """The research loop deleted every output token equal to mask_token_id; real tokens must survive."""
    target, _ = pair
    reference = reference_greedy(target, [1, 2, 3], 30)
    mask = max(set(reference), key=reference.count)  # a token the target really produces, often
    draft = random_draft(target, 2, mask_token_id=mask)
    result = generate(target, draft, [1, 2, 3], max_new_tokens=30, block_size=8)
    assert result.output_ids == reference and mask in result.output_ids


def test_metrics_are_consistent(pair):
    target, draft = pair
    result = generate(target, draft, [1, 2, 3], max_new_tokens=40, block_size=8)
    assert result.tau == pytest.approx(sum(result.acceptance_lengths) / result.num_cycles)
    assert sum(result.acceptance_lengths) + 1 == len(result.output_ids)  # no stop token, no truncation
    histogram = result.acceptance_histogram
    assert histogram[0] == 0 and sum(histogram) == result.num_cycles
    accepted = sum(a for a, _ in result.per_position_acceptance)
    assert accepted == sum(t - 1 for t in result.acceptance_lengths)
    assert result.tpot_s > 0 and result.ttft_s > 0 and result.wall_s >= result.ttft_s + result.decode_s * 0.999
    record = result.to_dict()
    assert set(record) >= {"output_ids", "acceptance_lengths", "tau", "ttft_s", "tpot_s", "trace"}
    json.dumps(record)


def test_target_only_is_the_same_loop_with_block_size_one(pair):
    target, _ = pair
    result = generate(target, None, [1, 2, 3], max_new_tokens=12)
    assert result.acceptance_lengths == [1] * 11 and result.tau == 1.0
    assert result.output_ids == reference_greedy(target, [1, 2, 3], 12)


@pytest.mark.parametrize("layers,draft_layers,expected", [
    (36, 5, [1, 9, 17, 25, 33]), (28, 5, [1, 7, 13, 19, 25]), (32, 5, [1, 8, 15, 22, 29]),
    (64, 5, [1, 16, 31, 46, 61]), (36, 3, [1, 17, 33]), (36, 1, [18]), (6, 2, [1, 3]), (7, 1, [3]),
])
def test_layer_id_rule(layers, draft_layers, expected):
    assert build_target_layer_ids(layers, draft_layers) == expected


Z_LAB_KEYS = {"fc.weight", "hidden_norm.weight", "norm.weight"} | {
    f"layers.0.{name}.weight" for name in [
        "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}


def test_checkpoint_round_trip_in_zlab_format(pair, tmp_path):
    target, draft = pair
    draft.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["block_size"] == 16 and config["num_target_layers"] == target.config.num_hidden_layers
    assert config["dflash_config"] == {"target_layer_ids": draft.target_layer_ids,
                                       "mask_token_id": draft.mask_token_id}
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == Z_LAB_KEYS
    loaded = DFlashDraftModel.from_pretrained(tmp_path, dtype=torch.float64)
    for name, tensor in draft.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    a = generate(target, draft, [1, 2, 3], max_new_tokens=20, block_size=8)
    b = generate(target, loaded, [1, 2, 3], max_new_tokens=20, block_size=8)
    assert a.output_ids == b.output_ids and a.acceptance_lengths == b.acceptance_lengths


def test_draft_written_by_an_independent_script_decodes_losslessly(tmp_path):
    """A z-lab-format directory written with plain json + safetensors (not our save_pretrained)."""
    target = random_target(7, vocab_size=6, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2)
    hidden, heads, kv_heads, head_dim, inter, taps = 32, 4, 2, 8, 48, [1, 2]
    config = {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": hidden,
        "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "intermediate_size": inter, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "vocab_size": 6, "attention_bias": False, "hidden_act": "silu", "block_size": 8, "num_target_layers": 4,
        "dflash_config": {"target_layer_ids": taps, "mask_token_id": 5},
    }
    generator = torch.Generator().manual_seed(0)
    shapes = {"fc.weight": (hidden, len(taps) * hidden), "hidden_norm.weight": (hidden,), "norm.weight": (hidden,),
              "layers.0.input_layernorm.weight": (hidden,), "layers.0.post_attention_layernorm.weight": (hidden,),
              "layers.0.self_attn.q_proj.weight": (heads * head_dim, hidden),
              "layers.0.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
              "layers.0.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
              "layers.0.self_attn.o_proj.weight": (hidden, heads * head_dim),
              "layers.0.self_attn.q_norm.weight": (head_dim,), "layers.0.self_attn.k_norm.weight": (head_dim,),
              "layers.0.mlp.gate_proj.weight": (inter, hidden), "layers.0.mlp.up_proj.weight": (inter, hidden),
              "layers.0.mlp.down_proj.weight": (hidden, inter)}
    weights = {k: (1.0 + 0.1 * torch.randn(s, generator=generator)) if len(s) == 1 else
               0.2 * torch.randn(s, generator=generator) for k, s in shapes.items()}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(weights, str(tmp_path / "model.safetensors"))

    draft = load_draft(str(tmp_path), dtype="float64")
    assert draft.target_layer_ids == taps and draft.mask_token_id == 5 and draft.block_size == 8
    for prompt in ([1, 2, 3], [4], [0, 0, 1, 2, 3, 4, 5, 1]):
        reference = reference_greedy(target, prompt, 48)
        for block_size in (2, 5, 8):
            result = generate(target, draft, prompt, max_new_tokens=48, block_size=block_size)
            assert result.output_ids == reference, (prompt, block_size)
