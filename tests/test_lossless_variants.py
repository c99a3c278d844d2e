"""Every research-backlog variant reproduces target-only greedy output, token for token.

One parametrized property test over the registry (dflash.variants): hypothesis draws random float64 targets,
drafts, prompts, block sizes, stop tokens and the variant's own knob settings (`knob_grid`), and compares with
transformers' greedy `generate`. A variant whose commit step keeps an unverified token fails here.
"""
import pytest
from hypothesis import given, settings, strategies as st

from helpers import DEVICE, decoding_cases, random_draft, random_target, reference_greedy, scaled
from dflash.variants import VARIANTS


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_lossless_variant_greedy(name):
    spec = VARIANTS[name]
    reason = spec.unavailable()
    if reason:
        pytest.skip(f"variant {name}: {reason}")

    @settings(max_examples=scaled(40), deadline=None)
    @given(decoding_cases(), st.sampled_from(spec.knob_grid))
    def check(case, knob_setting):
        target = random_target(**case["target"], device=DEVICE)
        draft = random_draft(target, case["target"]["seed"] + 1, num_layers=case["draft_layers"], block_size=16,
                             target_layer_ids=case["taps"])
        reference = reference_greedy(target, case["prompt"], case["max_new_tokens"], case["stop"])
        knobs = {**spec.knobs, **knob_setting}
        result = spec.decode(target, draft, case["prompt"], max_new_tokens=case["max_new_tokens"],
                             block_size=max(2, case["block_size"]), stop_token_ids=case["stop"], temperature=0.0,
                             seed=0, **knobs)
        assert result.output_ids == reference, (name, knobs)

    check()
