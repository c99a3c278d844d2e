"""The draft forward matches the spec, written out here with plain tensor ops, and its KV cache is exact.

This also pins the transformers pieces the draft reuses (Qwen3RMSNorm, Qwen3MLP, Qwen3RotaryEmbedding): if
their behaviour moves between transformers releases, these tests fail instead of the draft silently changing.
"""
import torch

from dflash.engine.cache import cache_length, new_cache
from helpers import random_draft, random_target


def rms_norm(x, weight, eps):
    # in float32, as transformers' Qwen3RMSNorm computes it for every model dtype (float64 included)
    y = x.float()
    return weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x, positions, theta):
    d = x.shape[-1]
    # float32 angles, as transformers' rotary embedding computes them for every model dtype
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    angles = positions[:, None].float() * inv_freq[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1).double(), torch.cat([angles.sin()] * 2, -1).double()
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


def reference_forward(draft, noise, features, context_positions, block_positions):
    """Section 1.5 of the spec: fused context -> per layer: queries from the block, keys/values from
    [context; block], per-head q/k norms, RoPE at absolute positions, full (non-causal) attention, SwiGLU MLP."""
    c = draft.config
    w = {k: v for k, v in draft.state_dict().items()}
    eps, heads, kv_heads, hd = c.rms_norm_eps, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    theta = c.rope_parameters["rope_theta"]
    ctx = rms_norm(features @ w["fc.weight"].T, w["hidden_norm.weight"], eps)
    h = noise
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], eps)
        kv_in = torch.cat([ctx, x], 0)
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(-1, heads, hd)
        k = (kv_in @ w[p + "self_attn.k_proj.weight"].T).view(-1, kv_heads, hd)
        v = (kv_in @ w[p + "self_attn.v_proj.weight"].T).view(-1, kv_heads, hd)
        q = rope(rms_norm(q, w[p + "self_attn.q_norm.weight"], eps).transpose(0, 1), block_positions, theta)
        k = rope(rms_norm(k, w[p + "self_attn.k_norm.weight"], eps).transpose(0, 1),
                 torch.cat([context_positions, block_positions]), theta)
        v = v.transpose(0, 1)
        k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
        attn = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, -1) @ v
        h = h + attn.transpose(0, 1).reshape(len(h), -1) @ w[p + "self_attn.o_proj.weight"].T
        y = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = y @ w[p + "mlp.gate_proj.weight"].T, y @ w[p + "mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms_norm(h, w["norm.weight"], eps)


def test_draft_forward_matches_the_spec():
    target = random_target(0, vocab_size=30, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2)
    draft = random_draft(target, 1, num_layers=2, target_layer_ids=[0, 2, 3])
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(5, 32, generator=generator, dtype=torch.float64)
    features = torch.randn(7, 96, generator=generator, dtype=torch.float64)
    context_positions, block_positions = torch.arange(3, 10), torch.arange(10, 15)
    ours = draft(noise[None], features[None], context_positions[None], block_positions[None])[0]
    expected = reference_forward(draft, noise, features, context_positions, block_positions)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


def test_incremental_context_cache_equals_one_shot_context():
    """Feeding context in pieces through the cache (as decoding does) equals feeding it all at once."""
    target = random_target(0, vocab_size=30, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2)
    draft = random_draft(target, 1, num_layers=2)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 4, 32, generator=generator, dtype=torch.float64)
    features = torch.randn(1, 9, 64, generator=generator, dtype=torch.float64)
    block_positions = torch.arange(9, 13)[None]
    one_shot = draft(noise, features, torch.arange(9)[None], block_positions)
    cache = new_cache()
    for begin, end in [(0, 4), (4, 6)]:  # two earlier cycles, each cropped back to its context like decoding
        draft(noise, features[:, begin:end], torch.arange(begin, end)[None], torch.arange(end, end + 4)[None],
              past_key_values=cache)
        cache.crop(-4)
    assert cache_length(cache) == 6
    incremental = draft(noise, features[:, 6:], torch.arange(6, 9)[None], block_positions, past_key_values=cache)
    torch.testing.assert_close(incremental, one_shot, rtol=1e-10, atol=1e-10)


def test_context_features_are_layer_outputs():
    """hidden_states[id + 1] is the output of decoder layer `id` (index 0 is the embedding output)."""
    from dflash import extract_context_feature
    target = random_target(0, vocab_size=30, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2)
    captured = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o[0] if isinstance(o, tuple)
                                                                                  else o))
             for n, layer in enumerate(target.model.layers)]
    out = target(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    features = extract_context_feature(out.hidden_states, [0, 2])
    torch.testing.assert_close(features, torch.cat([captured[0], captured[2]], -1))
