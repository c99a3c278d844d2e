"""Exact bf16 (issue 11): the draft keeps float32 RoPE frequencies when cast, and the float-tie proof measures
the target's own numerical noise (no copy of the target) strictly enough to catch a wrong token in bf16.

Every other test runs float32/float64, where neither problem shows: these run the low-precision paths on CPU.
"""
import copy
import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen3Config

from dflash import generate, load_draft, load_target, load_tokenizer
from dflash.harness.evaluation import float_tie
from dflash.loading import PACKAGE_MODELS
from dflash.model import DFlashDraftModel, make_draft_config
from helpers import DEVICE, random_target, scaled

LOW = [torch.bfloat16, torch.float16]
HEAD_DIM, THETA = 128, 1e6  # Qwen3-4B's RoPE


def qwen3_4b_rope_draft() -> DFlashDraftModel:
    """A small float32 draft with Qwen3-4B's RoPE (head dim 128, theta 1e6, 40960 positions)."""
    torch.manual_seed(0)
    target_config = Qwen3Config(vocab_size=64, hidden_size=256, num_hidden_layers=4, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=HEAD_DIM, intermediate_size=512,
                                max_position_embeddings=40960,
                                rope_parameters={"rope_type": "default", "rope_theta": THETA})
    config = make_draft_config(target_config, num_layers=1, block_size=16, mask_token_id=63)
    return DFlashDraftModel(config).float().eval()


def float32_inv_freq() -> torch.Tensor:
    return 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float) / HEAD_DIM))


CASTS = {
    "to(dtype)": lambda model, dtype, path: model.to(dtype),
    "to(device, dtype)": lambda model, dtype, path: model.to("cpu", dtype),
    "bfloat16()/half()": lambda model, dtype, path: model.bfloat16() if dtype == torch.bfloat16 else model.half(),
    "from_pretrained(dtype=)": lambda model, dtype, path: (model.save_pretrained(path),
                                                           DFlashDraftModel.from_pretrained(path, dtype=dtype))[1],
}


@pytest.mark.parametrize("cast", list(CASTS))
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_rotary_frequencies_stay_float32_when_the_draft_is_cast(dtype, cast, tmp_path):
    reference = qwen3_4b_rope_draft()
    assert torch.equal(reference.rotary_emb.inv_freq, float32_inv_freq())
    # what the fix prevents: in the low dtype the frequencies are visibly off (bf16: up to 0.37%)
    lowered = float32_inv_freq().to(dtype).float()
    assert float(((lowered - float32_inv_freq()) / float32_inv_freq()).abs().max()) > 1e-3
    model = CASTS[cast](copy.deepcopy(reference), dtype, tmp_path)
    assert model.fc.weight.dtype == dtype and model.layers[0].mlp.up_proj.weight.dtype == dtype
    for name in ("inv_freq", "original_inv_freq"):
        buffer = getattr(model.rotary_emb, name)
        assert buffer.dtype == torch.float32, (cast, name, buffer.dtype)
        assert torch.equal(buffer, getattr(reference.rotary_emb, name)), (cast, name)
    back = model.float()  # and nothing was lost on the way: a round trip gives the float32 values back
    assert torch.equal(back.rotary_emb.inv_freq, float32_inv_freq())


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_cos_sin_come_out_in_the_activation_dtype_from_float32_angles(dtype):
    """transformers' Qwen3 rotary forward computes angles in float32 (elementwise, so autocast leaves it alone)
    and casts only cos/sin to the activation dtype; with float32 frequencies that is exactly float32 RoPE."""
    model = qwen3_4b_rope_draft().to(dtype)
    positions = torch.arange(2000, 2016)[None]
    angles = positions[..., None].float() * float32_inv_freq()
    angles = torch.cat([angles, angles], dim=-1)
    x = torch.zeros(1, 16, 256, dtype=dtype)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            cos, sin = model.rotary_emb(x, positions)
        assert cos.dtype == sin.dtype == dtype, autocast
        assert torch.equal(cos, angles.cos().to(dtype)) and torch.equal(sin, angles.sin().to(dtype)), autocast


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_far_block_hidden_states_are_closer_to_float32_with_float32_frequencies(dtype):
    """Block at positions 2000..2015 attending to context at 0..63: with the old cast (frequencies in the low
    dtype) the relative phases are off by radians; with float32 frequencies only the weights' rounding is left.
    Recorded: bf16 relative error 1.8e-2 (old) vs 3.4e-3 (fixed); fp16 3.3e-3 vs 4.2e-4."""
    reference = qwen3_4b_rope_draft()
    fixed = copy.deepcopy(reference).to(dtype)
    old = copy.deepcopy(reference).to(dtype)
    old.rotary_emb.inv_freq = reference.rotary_emb.inv_freq.to(dtype)  # what `.to(dtype)` used to leave
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(1, 64, len(reference.target_layer_ids) * 256, generator=generator)
    embedding = torch.randn(1, 16, 256, generator=generator)
    context, block = torch.arange(0, 64)[None], torch.arange(2000, 2016)[None]
    with torch.inference_mode():
        exact = reference(embedding, features, context, block).double()
        errors = {name: float((model(embedding.to(dtype), features.to(dtype), context, block).double() - exact)
                              .norm() / exact.norm()) for name, model in (("old", old), ("fixed", fixed))}
    print(f"{dtype} block hidden states at position 2000, relative error vs float32: old cast "
          f"{errors['old']:.2e}, float32 frequencies {errors['fixed']:.2e}")
    assert errors["fixed"] < errors["old"] / 3, errors


# --- the float-tie proof ----------------------------------------------------------------------------------------

PROMPT = [1, 2, 3, 4]


def bf16_target(seed: int):
    return random_target(seed, vocab_size=256, hidden_size=64, dtype=torch.bfloat16)


def next_token_logits(target, prompt, output) -> torch.Tensor:
    """[len(output), V]: the target's logits predicting each new token (one forward, in its own dtype)."""
    with torch.inference_mode():
        return target(input_ids=torch.tensor([prompt + output])).logits[0, len(prompt) - 1: -1].double()


def ulp(value: float, dtype=torch.bfloat16) -> float:
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(abs(value)))


def clearly_not_a_tie(target, prompt, output, ulps: float = 4.0) -> tuple[int, int]:
    """(position, second-best token) at the position whose top-2 gap is the smallest of those at least `ulps`
    bf16 ulps of the largest |logit| there (block and one-token forwards differ by about one such ulp)."""
    rows = next_token_logits(target, prompt, output)
    candidates = []
    for position, row in enumerate(rows):
        values, indices = row.topk(2)
        size = float(values[0] - values[1]) / ulp(float(row.abs().max()))
        if size >= ulps:
            candidates.append((size, position, int(indices[1])))
    assert candidates, "no clearly separated top-2 anywhere: pick another seed"
    _, position, second = min(candidates)
    return position, second


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_planted_second_best_token_is_not_a_float_tie(seed):
    """A bug that commits the target's runner-up where the top two are 4+ ulps apart must be caught in bf16.
    The old rule (8 eps(dtype) x |top logit| of a float64 copy: 8 to 16 ulps) accepted every one of these."""
    target = bf16_target(seed)
    expected = generate(target, None, PROMPT, max_new_tokens=40).output_ids
    position, second = clearly_not_a_tie(target, PROMPT, expected)
    planted = expected[:position] + [second] + expected[position + 1:]
    verdict = float_tie(target, PROMPT, expected, planted, block_size=8)
    assert verdict is None, f"planted bug at new token {position} accepted: {verdict}"
    third = int(next_token_logits(target, PROMPT, expected)[position].topk(3).indices[2])
    assert float_tie(target, PROMPT, expected, expected[:position] + [third], block_size=8) is None


def test_two_tokens_with_identical_lm_head_rows_are_a_float_tie():
    """A genuine tie: two LM-head rows made identical give the two tokens the same logit on every path, so
    either may be committed."""
    target = bf16_target(0)
    first = generate(target, None, PROMPT, max_new_tokens=40).output_ids
    token = first[10]
    twin = next(t for t in range(target.config.vocab_size - 1, -1, -1) if t not in first)
    with torch.no_grad():
        target.lm_head.weight[twin] = target.lm_head.weight[token]
    expected = generate(target, None, PROMPT, max_new_tokens=40).output_ids
    k = next(i for i, t in enumerate(expected) if t in (token, twin))
    other = twin if expected[k] == token else token
    got = expected[:k] + [other] + expected[k + 1:]
    verdict = float_tie(target, PROMPT, expected, got, block_size=8)
    assert verdict and f"new token {k}" in verdict, verdict


class LargestTensorOutside(TorchDispatchMode):
    """Records the largest floating-point tensor any op creates in a dtype other than `dtype`."""

    def __init__(self, dtype):
        super().__init__()
        self.dtype, self.largest = dtype, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dtype != self.dtype:
                self.largest = max(self.largest, tensor.numel())
        return out


def test_the_proof_makes_no_copy_of_the_target(monkeypatch):
    """No deep copy, no module cast, and no tensor the size of a weight matrix in another dtype (the old proof
    copied the whole target to float32/float64: +24 GB for Qwen3-4B)."""
    target = bf16_target(0)
    expected = generate(target, None, PROMPT, max_new_tokens=40).output_ids
    position, second = clearly_not_a_tie(target, PROMPT, expected)
    planted = expected[:position] + [second] + expected[position + 1:]
    pointers = {name: p.data_ptr() for name, p in target.named_parameters()}

    def refuse(*args, **kwargs):
        raise AssertionError("the float-tie proof copied or cast the target")
    monkeypatch.setattr(copy, "deepcopy", refuse)
    monkeypatch.setattr(torch.nn.Module, "_apply", refuse)  # .to(), .float(), .double(), .half()
    smallest_matrix = min(p.numel() for p in target.parameters() if p.dim() == 2)
    with LargestTensorOutside(torch.bfloat16) as seen:
        assert float_tie(target, PROMPT, expected, planted, block_size=8) is None
    assert seen.largest < smallest_matrix, (seen.largest, smallest_matrix)
    assert {name: p.data_ptr() for name, p in target.named_parameters()} == pointers
    assert all(p.dtype == torch.bfloat16 for p in target.parameters())


def test_every_tiny_bf16_divergence_is_a_proven_float_tie():
    """The embedded tiny pair in bf16, DFlash at block size 8 vs target-only, on the first 12 held-out code
    prompts (64 new tokens): every difference must be proven a float tie by the strict rule. Recorded: 3 of 12
    differ (prompts 4, 6, 11; gaps of 0 or 1 ulp, path noise 1-2 ulps), 3 proven. Over all 144 held-out prompts
    at block sizes 4, 8 and 16: 32 of 432 decodes differ, 32 proven."""
    target = load_target("tiny", dtype="bfloat16", device=DEVICE)
    draft = load_draft("tiny", dtype="bfloat16", device=DEVICE)
    tokenizer = load_tokenizer("tiny")
    texts = json.loads((PACKAGE_MODELS / "tiny" / "heldout.json").read_text())["code"][:scaled(12)]
    stop = [tokenizer.eos_token_id]
    differ, unproven = [], []
    for index, text in enumerate(texts):
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        reference = generate(target, None, prompt, max_new_tokens=64, stop_token_ids=stop).output_ids
        result = generate(target, draft, prompt, max_new_tokens=64, block_size=8, stop_token_ids=stop).output_ids
        if result != reference:
            differ.append(index)
            if not float_tie(target, prompt, reference, result, block_size=8):
                unproven.append(index)
    print(f"tiny bf16, block size 8: {len(differ)} of {len(texts)} code prompts differ from target-only "
          f"({differ}), {len(differ) - len(unproven)} proven float ties")
    assert not unproven, f"held-out code prompts {unproven} differ from target-only and are not proven float ties"
    # bf16 does diverge here on CPU (3 of 12 when recorded); without any difference the check above proves nothing.
    # Another device's kernels round differently and a shrunk run (DFLASH_TEST_SCALE) may miss prompts 4, 6, 11:
    # there the count is printed above, not asserted.
    assert differ or DEVICE != "cpu" or len(texts) < 12, (
        "no bf16 divergence on these prompts: the exhaustive check is vacuous, pick other prompts")
