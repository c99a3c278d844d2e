"""Tau accounting: the engine shrinks the last block to the budget ("cut"); upstream keeps full-size tail blocks
and counts what they accept ("full", `--tau-accounting upstream`), the accounting of published tau. The output
is the same either way; only the tail cycles' acceptance differs."""
import pytest

from dflash import generate, load_draft, load_target
from dflash.harness.measure import Variant


@pytest.fixture(scope="module")
def pair():
    return load_target("tiny"), load_draft("tiny")


PROMPTS = [[5, 6, 7, 8], [40, 41, 42], [100, 7, 9, 11, 13]]


@pytest.mark.parametrize("budget", [5, 9, 23])
def test_full_tail_blocks_give_the_same_output_and_count_past_the_budget(pair, budget):
    target, draft = pair
    reference = [generate(target, None, p, max_new_tokens=budget).output_ids for p in PROMPTS]
    cut = [generate(target, draft, p, max_new_tokens=budget, block_size=16) for p in PROMPTS]
    full = [generate(target, draft, p, max_new_tokens=budget, block_size=16, tail_blocks="full") for p in PROMPTS]
    assert [r.output_ids for r in cut] == [r.output_ids for r in full] == reference
    assert all(sum(r.acceptance_lengths) <= len(r.output_ids) for r in cut)
    assert all(max(r.trace[-1].block_size for r in [f]) == 16 for f in full)  # the tail block keeps its size
    assert all(r.trace[-1].block_size <= budget for r in cut)
    assert sum(sum(r.acceptance_lengths) for r in full) >= sum(sum(r.acceptance_lengths) for r in cut)


def test_the_knob_is_live_on_a_short_budget(pair):
    """With a budget shorter than a block, cut verifies fewer positions and counts fewer tokens (on held-out
    math prompts, where the tiny draft is accepted far)."""
    from dflash.profiles import get_profile
    from dflash.prompts import load_prompts
    from dflash.loading import load_tokenizer
    profile = get_profile("tiny")
    prompts = load_prompts(profile, profile.dataset("math"), load_tokenizer("tiny"), 6)
    target, draft = pair
    cut = [generate(target, draft, p, max_new_tokens=3, block_size=16) for p in prompts]
    full = [generate(target, draft, p, max_new_tokens=3, block_size=16, tail_blocks="full") for p in prompts]
    assert all(r.trace[0].block_size == 2 for r in cut) and all(r.trace[0].block_size == 16 for r in full)
    assert sum(sum(r.acceptance_lengths) for r in full) > sum(sum(r.acceptance_lengths) for r in cut)


def test_variant_passes_the_accounting_to_plain_dflash_only(pair):
    from types import SimpleNamespace
    target, draft = pair
    models = SimpleNamespace(target=target, draft=draft)
    result = Variant("bs16", block_size=16, tail_blocks="full").run(models, PROMPTS[0], 3, [], seed=0)
    assert result.trace[0].block_size == 16
    target_only = Variant("target-only", use_draft=False, tail_blocks="full").run(models, PROMPTS[0], 3, [], 0)
    assert target_only.num_cycles == 2  # no draft: one token per cycle whatever the accounting


def test_unknown_accounting_is_a_clear_error(pair):
    from dflash import DFlashError
    with pytest.raises(DFlashError, match="tail_blocks must be one of"):
        generate(pair[0], pair[1], PROMPTS[0], max_new_tokens=3, block_size=4, tail_blocks="half")
