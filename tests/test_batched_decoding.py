"""Batched decoding (dflash.backends.batched): every sequence of a batch equals its own target-only greedy output.

Float64 random targets (tests/helpers.py), prompts of different lengths (left padding), stop tokens that hit at
different cycles (rows leave the batch at different times), both cache layouts (compacted and mask-only), and
the pure helpers (padding, masks, compaction) on hand-made inputs.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dflash import DFlashError, generate
from dflash.engine import left_pad
from dflash.backends.batched import (compaction_index, decode_batch, derived_prompts, draft_mask, generate_batch,
                                     is_compact, verify_mask)
from helpers import random_draft, random_target, reference_greedy


# --- pure helpers -----------------------------------------------------------------------------------------------

def test_left_pad_aligns_prompts_right_with_their_own_positions():
    ids, valid, positions = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert valid.tolist() == [[True, True, True], [False, False, True]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_verify_mask_is_causal_over_valid_slots_and_never_empty():
    cache_valid = torch.tensor([[True, False], [False, False]])
    block_valid = torch.tensor([[True, True, True], [False, True, True]])
    mask = verify_mask(cache_valid, block_valid)[:, 0]
    assert mask.shape == (2, 3, 5)
    assert mask[0].tolist() == [[True, False, True, False, False], [True, False, True, True, False],
                                [True, False, True, True, True]]
    assert mask[1, 0].tolist() == [False, False, True, False, False]  # a padding query sees only itself
    assert mask.any(dim=-1).all()


def test_draft_mask_is_bidirectional_inside_the_block():
    mask = draft_mask(torch.tensor([[True, False]]), torch.tensor([[False, True]]), 3)[0, 0]
    assert mask.tolist() == [[True, False, False, True, True, True, True]] * 3


def test_compaction_right_aligns_valid_slots():
    valid = torch.tensor([[True, False, True, False], [False, True, False, False]])
    index, new_valid = compaction_index(valid)
    assert new_valid.tolist() == [[True, True], [False, True]]
    assert index[0].tolist() == [0, 2] and index[1, 1] == 1


def test_is_compact_only_when_compaction_would_change_nothing():
    assert is_compact(torch.tensor([[False, True, True], [True, True, True]]))
    assert not is_compact(torch.tensor([[True, False, True], [True, True, True]]))  # a hole
    assert not is_compact(torch.tensor([[False, True, True], [False, False, True]]))  # a column of padding only
    valid = torch.tensor([[False, True, True], [True, True, True]])
    index, new_valid = compaction_index(valid)  # what the skipped gather would have done: nothing
    assert torch.equal(new_valid, valid) and index[:, 1:].tolist() == [[1, 2], [1, 2]]


def test_derived_prompts_have_other_lengths():
    prompt = [1, 2, 3, 4]
    others = derived_prompts(prompt, 4)
    assert len(others) == 4 and all(others)
    assert {len(p) for p in others} >= {len(prompt) + 2, len(prompt) - 2}
    assert all(t in prompt for p in others for t in p)


# --- the invariant ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compact", [True, False], ids=["compact", "mask-only"])
def test_every_sequence_equals_its_own_greedy_output(pair, compact):
    target, draft = pair
    prompts = [[1, 2, 3], [4, 0, 1, 2, 3, 4, 1], [2], [3, 3, 3, 3, 0], [1, 1]]
    reference = [reference_greedy(target, p, 40) for p in prompts]
    run = decode_batch(target, draft, prompts, max_new_tokens=40, block_size=8, compact=compact)
    assert [r.output_ids for r in run.results] == reference
    # Sequences really diverged: they accepted different amounts in the same cycle.
    assert len({tuple(r.acceptance_lengths[:5]) for r in run.results}) > 1
    # Batching does not change what the draft proposes: per-sequence acceptance equals unbatched DFlash.
    for prompt, result in zip(prompts, run.results):
        assert result.acceptance_lengths == generate(target, draft, prompt, max_new_tokens=40,
                                                     block_size=8).acceptance_lengths


def test_stop_tokens_hit_at_different_cycles_and_rows_leave_the_batch(pair):
    target, draft = pair
    # With stop token 4: [3, 3, 3, 3, 0] stops on its first token, [0, 0, 2] and [2] a few cycles in, the others
    # run to the cap.
    prompts = [[2], [0, 0, 2], [3, 3, 3, 3, 0], [1, 2, 3], [1, 1]]
    stop = [4]
    reference = [reference_greedy(target, p, 40, stop) for p in prompts]
    run = decode_batch(target, draft, prompts, max_new_tokens=40, block_size=8, stop_token_ids=stop)
    assert [r.output_ids for r in run.results] == reference
    assert [r.stopped for r in run.results] == [True, True, True, False, False]
    assert len({r.num_cycles for r in run.results[:3]}) == 3  # they stopped at different cycles
    assert run.stats.live[0] == 4 and run.stats.live[-1] == 2  # finished rows left the batch


def test_target_only_batched(pair):
    target, _ = pair
    prompts = [[1, 2], [0, 1, 2, 3, 4, 0], [4]]
    results = generate_batch(target, None, prompts, max_new_tokens=12, block_size=1)
    assert [r.output_ids for r in results] == [reference_greedy(target, p, 12) for p in prompts]
    assert all(set(r.acceptance_lengths) == {1} for r in results)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.integers(4, 30), block_size=st.integers(1, 16),
       prompts=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=10), min_size=1, max_size=5),
       stop=st.lists(st.integers(0, 3), max_size=1), max_new_tokens=st.integers(1, 30), compact=st.booleans())
def test_batched_is_lossless_property(seed, vocab, block_size, prompts, stop, max_new_tokens, compact):
    target = random_target(seed, vocab_size=vocab)
    draft = random_draft(target, seed + 1, target_layer_ids=[0, 2])
    results = generate_batch(target, draft if block_size > 1 else None, prompts, max_new_tokens=max_new_tokens,
                             block_size=block_size, stop_token_ids=stop, compact=compact)
    assert [r.output_ids for r in results] == [reference_greedy(target, p, max_new_tokens, stop) for p in prompts]


# --- bad input --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=[[1], []]), "Prompt 1 of the batch is empty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=1.0), "greedy only"),
    (dict(block_size=17), "between 1 and 16"),
    (dict(block_size=4, no_draft=True), "pass block_size=1"),
])
def test_bad_input_is_a_clear_error(pair, kwargs, message):
    target, draft = pair
    args = dict(prompts=[[1, 2]], max_new_tokens=4, block_size=4, temperature=0.0)
    no_draft = kwargs.pop("no_draft", False)
    args.update(kwargs)
    with pytest.raises(DFlashError, match=message):
        decode_batch(target, None if no_draft else draft, args.pop("prompts"), **args)


def test_batched_report_table():
    from dflash.harness.decode_tables import batched_table
    record = {"id": "batched/test_batched[tiny-math-batch2]", "params": {"batch_size": 2, "compact": False},
              "metrics": {"speedup_samples": [2.0, 2.2], "speedup_vs_unbatched_samples": [1.4, 1.5],
                          "target_batched_speedup_samples": [1.5, 1.7], "per_prompt_tau": [4.0, 5.0, 4.5, 4.5],
                          "rows_per_cycle": 1.7, "verify_s_per_cycle": 0.01, "padding_fraction": 0.2,
                          "exact_match": [True, True, True, False]}, "gates": []}
    text = batched_table([record])
    row = text.splitlines()[2]
    assert "| 2 | mask-only |" in row and "3/4 (75.0%)" in row and "4.50" in row
