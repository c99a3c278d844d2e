"""Random small target/draft pairs and reference decoding for the tests (imported as `helpers`: pytest puts
tests/ on sys.path). Test-only, so the package itself needs neither this module nor hypothesis."""
from __future__ import annotations

import math
import os

import torch
from hypothesis import strategies as st
from transformers import Qwen3Config, Qwen3ForCausalLM

from dflash.model import DFlashDraftModel, make_draft_config

# The GPU smoke run (scripts/gpu_smoke.sh) runs some tests on another device, and smaller. DFLASH_TEST_DEVICE
# (default cpu): where the tests that take DEVICE put their models. DFLASH_TEST_SCALE (default 1): the factor
# `scaled` applies to those tests' sizes (hypothesis examples, held-out prompts, sampling runs). Unset, every
# test runs as written.
DEVICE = os.environ.get("DFLASH_TEST_DEVICE", "cpu")
SCALE = float(os.environ.get("DFLASH_TEST_SCALE", "1"))


def scaled(n: int, minimum: int = 1) -> int:
    """n times DFLASH_TEST_SCALE, rounded up, at least `minimum` (n itself at scale 1)."""
    return n if SCALE == 1 else max(minimum, math.ceil(n * SCALE))


def random_target(seed: int, *, vocab_size: int = 48, hidden_size: int = 32, num_layers: int = 3,
                  num_heads: int = 4, num_kv_heads: int = 2, dtype=torch.float64,
                  device="cpu") -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 target. float64 by default so block and one-token forwards agree far below
    any realistic gap between the top two logits (greedy comparisons are then exact, not tie-prone)."""
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         head_dim=hidden_size // num_heads, intermediate_size=2 * hidden_size,
                         max_position_embeddings=512, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config)
    # Larger-than-default weights give peaked, input-dependent next-token distributions, like a trained model.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3)
    return model.to(device=device, dtype=dtype).eval()


def random_draft(target, seed: int, *, num_layers: int = 1, block_size: int = 16, mask_token_id: int | None = None,
                 target_layer_ids: list[int] | None = None, dtype=torch.float64) -> DFlashDraftModel:
    torch.manual_seed(seed)
    vocab = target.config.vocab_size
    config = make_draft_config(target.config, num_layers=num_layers, block_size=block_size,
                               mask_token_id=vocab - 1 if mask_token_id is None else mask_token_id,
                               target_layer_ids=target_layer_ids)
    return DFlashDraftModel(config).to(device=target.device, dtype=dtype).eval()


def reference_greedy(target, prompt: list[int], max_new_tokens: int, stop_token_ids=()) -> list[int]:
    """The target's own greedy decoding via transformers `generate` (independent of this project's loop)."""
    input_ids = torch.tensor([prompt], device=target.device)
    out = target.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                          max_new_tokens=max_new_tokens, eos_token_id=list(stop_token_ids) or None,
                          pad_token_id=0, min_new_tokens=0)
    return out[0, len(prompt):].tolist()


@st.composite
def decoding_cases(draw):
    """Random small target/draft/prompt/block-size/stop-token cases for the lossless property tests."""
    vocab = draw(st.integers(4, 40))
    heads = draw(st.sampled_from([2, 4]))
    target = dict(seed=draw(st.integers(0, 10_000)), vocab_size=vocab, hidden_size=heads * draw(st.sampled_from([4, 8])),
                  num_layers=draw(st.integers(2, 5)), num_heads=heads, num_kv_heads=draw(st.sampled_from([1, heads])))
    prompt = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=12))
    stop = draw(st.lists(st.integers(0, vocab - 1), max_size=1))
    taps = draw(st.lists(st.integers(0, target["num_layers"] - 1), min_size=1, max_size=3, unique=True))
    return dict(target=target, draft_layers=draw(st.integers(1, 2)), taps=sorted(taps), block_size=draw(st.integers(1, 16)),
                prompt=prompt, max_new_tokens=draw(st.integers(1, 40)), stop=stop)
