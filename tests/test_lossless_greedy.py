"""Greedy DFlash decoding reproduces the target's own greedy decoding, token for token.

The reference is transformers' `generate(do_sample=False)`, computed independently of this project's loop.
Random targets run in float64, so a block forward and a one-token forward agree to ~1e-15 and no argmax can
flip on kernel rounding: any mismatch is a real bug. Small vocabularies make random drafts agree with the
target often enough that accepted prefixes, bonus tokens and cache crops are all exercised.
"""
import torch
from hypothesis import given, settings

from dflash import generate
from helpers import DEVICE, decoding_cases, random_draft, random_target, reference_greedy, scaled


@settings(max_examples=scaled(250), deadline=None)
@given(decoding_cases())
def test_greedy_equals_target_greedy(case):
    target = random_target(**case["target"], device=DEVICE)
    draft = random_draft(target, case["target"]["seed"] + 1, num_layers=case["draft_layers"], block_size=16,
                         target_layer_ids=case["taps"])
    reference = reference_greedy(target, case["prompt"], case["max_new_tokens"], case["stop"])
    result = generate(target, draft if case["block_size"] > 1 else None, case["prompt"],
                      max_new_tokens=case["max_new_tokens"], block_size=case["block_size"],
                      stop_token_ids=case["stop"])
    assert result.output_ids == reference
    assert sum(result.acceptance_lengths) + 1 >= len(result.output_ids)  # the first token comes from prefill


def test_random_drafts_do_get_accepted():
    """Guards the property test above: it must exercise accepted drafts, not only rejections."""
    target = random_target(1, vocab_size=5, device=DEVICE)
    result = generate(target, random_draft(target, 2), [1, 2, 3], max_new_tokens=40, block_size=8)
    assert result.tau > 1.5
    assert result.output_ids == reference_greedy(target, [1, 2, 3], 40)


def test_tiny_pair_is_lossless_on_heldout_prompts():
    """The trained pair (fp32) on every held-out prompt, at the block sizes the manifest reports. In fp32 a
    block forward and a one-token forward can round a near-tie differently; such a difference must be proven a
    float tie (float64 recomputation) and stays documented here."""
    import json

    from dflash import load_draft, load_target, load_tokenizer
    from dflash.harness.evaluation import float_ties
    from dflash.loading import PACKAGE_MODELS
    target, draft = load_target("tiny", device=DEVICE), load_draft("tiny", device=DEVICE)
    tokenizer = load_tokenizer("tiny")
    heldout = json.loads((PACKAGE_MODELS / "tiny" / "heldout.json").read_text())
    stop = [tokenizer.eos_token_id]
    accepted, ties = 0, []
    for category, prompts in heldout.items():
        for text in prompts[:scaled(len(prompts))]:
            prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
            reference = reference_greedy(target, prompt, 48, stop)
            for block_size in (4, 16):
                result = generate(target, draft, prompt, max_new_tokens=48, block_size=block_size,
                                  stop_token_ids=stop)
                if result.output_ids != reference:  # fp32: only a proven float tie may differ (and is logged)
                    tie = float_ties(target, [prompt], [reference], [result.output_ids], block_size).get("0")
                    assert tie, (category, text[:40], block_size, "differs from target-only and is no float tie")
                    ties.append((category, block_size, tie))
                accepted += sum(result.acceptance_lengths) - result.num_cycles
    assert accepted > 0
    # Documented: code prompt 36 ties at new token 26 (float64 gap 1.1e-6 between ' return' and ' if', below
    # fp32 resolution at logit 8.75). More ties than that would need a look.
    assert len(ties) <= 2, ties
