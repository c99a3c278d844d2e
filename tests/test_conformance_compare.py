"""dflash.conformance.compare without a server: hand-made runs for each check and message, then the reference
engine as its own backend (exact agreement) and with the planted layer shift (caught, first position named). The
same checks against a real vLLM server are in tests/test_vllm_backend.py."""
import re

import pytest

from dflash import DFlashError, load_draft, load_target, load_tokenizer
from dflash.backends.vllm import SpecCounters
from dflash.conformance.compare import Run, compare, first_difference, reference_runs
from dflash.conformance.drift import shifted_layer_draft, too_few_tokens


def run(steps, k=3, ids=None):
    per_position = tuple(sum(a > j for a in steps) for j in range(k))
    counters = SpecCounters(len(steps), k * len(steps), sum(steps), per_position)
    return Run(list(ids or range(sum(steps) + len(steps) + 1)), counters, list(steps))


PROMPTS = [[0, 1, 2, 3, 0, 1], [3, 3, 0, 2, 1, 0], [2, 0, 1, 3, 3, 3], [1, 2, 3, 0, 1, 2], [0, 0, 3, 1, 2, 3]]


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1 and first_difference([1, 2], [1, 2, 3]) == 2


def test_identical_runs_pass_both_modes():
    runs = [run([3, 0, 2]), run([1, 1, 3, 0]), run([2, 2])]
    for mode in ("exact", "paired"):
        report = compare(runs, runs, block_size=4, mode=mode)
        assert report.passed and report.identical_outputs == 3 and report.equal_counts == 3, report.message()
        assert report.first_diverging_position is None


def test_exact_mode_names_prompt_step_and_position():
    ref = [run([3, 0, 2]), run([1, 1, 3, 0])]
    back = [run([3, 0, 2]), run([1, 2, 3], ids=range(10))]
    back[1].output_ids = list(ref[1].output_ids)
    report = compare(ref, back, block_size=4, mode="exact")
    assert not report.passed
    text = report.message()
    assert "per-prompt acceptance equal 1/2" in text and "prompt 1" in text
    assert "first differing verify step 2 (accepted 1 vs 2)" in text and "first diverging draft position 2" in text


def test_output_divergence_names_the_token():
    ref = [run([3, 0, 2], ids=[5, 6, 7, 8, 9, 10, 11, 12])]
    back = [run([3, 0, 2], ids=[5, 6, 7, 0, 9, 10, 11, 12])]
    report = compare(ref, back, block_size=4)
    assert not report.passed and "prompt 0 first differs at output token 3" in report.message()


def test_missing_positions_fail_with_the_first_one_named():
    """A backend drafting 2 tokens per step against a block-4 reference: position 3 is never drafted."""
    ref = [run([3, 3, 1, 2, 3], k=3) for _ in range(5)]
    back = [run([2, 2, 1, 2, 2], k=2) for _ in range(5)]
    for r, b in zip(ref, back):
        b.output_ids = list(r.output_ids)
    report = compare(ref, back, block_size=4)
    assert report.first_diverging_position == 3
    assert "diverges first at draft position 3: the backend drafts no token at position 3" in report.message()


def test_paired_mode_tolerates_one_step_but_not_a_collapse():
    ref = [run([3, 3, 1, 2, 3, 0, 3, 2]) for _ in range(6)]
    near = [run([3, 3, 1, 2, 3, 0, 3, 2]) for _ in range(5)] + [run([3, 3, 2, 2, 3, 0, 3, 1])]
    for r, b in zip(ref, near):
        b.output_ids = list(r.output_ids)
    report = compare(ref, near, block_size=4)
    assert report.passed and "per-prompt counts differ on 1/6" in report.message()
    collapsed = [run([0, 1, 0, 0, 1, 0, 0, 0]) for _ in range(6)]
    for r, b in zip(ref, collapsed):
        b.output_ids = list(r.output_ids)
    report = compare(ref, collapsed, block_size=4)
    assert not report.passed and report.first_diverging_position == 1
    assert "diverges first at draft position 1" in report.message() and "acceptance length" in report.message()


def test_bad_input():
    with pytest.raises(DFlashError, match="same prompts"):
        compare([run([1])], [], block_size=4)
    with pytest.raises(DFlashError, match="mode"):
        compare([run([1])], [run([1])], block_size=4, mode="close")


@pytest.fixture(scope="module")
def tiny():
    from dflash.profiles import get_profile
    from dflash.prompts import load_prompts
    profile, tokenizer = get_profile("tiny"), load_tokenizer("tiny")
    prompts = [p for name in ("math", "code", "chat") for p in load_prompts(profile, profile.dataset(name),
                                                                            tokenizer, 2)]
    return load_target("tiny"), load_draft("tiny"), prompts


def test_the_engine_conforms_to_itself_exactly(tiny):
    target, draft, prompts = tiny
    runs = reference_runs(target, draft, prompts, block_size=8, max_new_tokens=48)
    again = reference_runs(target, draft, prompts, block_size=8, max_new_tokens=48)
    report = compare(runs, again, block_size=8, mode="exact", backend_name="engine")
    assert report.passed and report.equal_counts == 6 and report.steps.divergences == 0, report.message()


def test_a_shifted_layer_draft_is_caught_in_the_engine_too(tiny, tmp_path):
    target, draft, prompts = tiny
    shifted = load_draft(str(shifted_layer_draft("tiny", tmp_path / "shifted")))
    assert shifted.target_layer_ids == [i + 1 for i in draft.target_layer_ids]
    ref = reference_runs(target, draft, prompts, block_size=8, max_new_tokens=48)
    back = reference_runs(target, shifted, prompts, block_size=8, max_new_tokens=48)
    report = compare(ref, back, block_size=8, backend_name="engine+shifted")
    # On the tiny pair the shifted draft does not even lose tau (its neighbouring layers are alike); what gives
    # it away is that, from the same state, its acceptance differs at 5 of 56 verify steps (the reference
    # against itself: 0).
    assert report.identical_outputs == 6  # lossless: the drift changes acceptance, never the output
    assert not report.passed
    assert re.search(r"verify steps diverging 5/\d+ .*first at prompt 0, verify step 2: diverging draft position "
                     r"5 \(reference accepted 4, backend 7\)", report.message()), report.message()
    with pytest.raises(DFlashError, match="leaves the target"):
        shifted_layer_draft("tiny", tmp_path / "far", shift=5)


def test_too_few_tokens_settings():
    from dflash.backends.vllm import ServerSettings
    settings = ServerSettings("t", "d", 7)
    assert too_few_tokens(settings, 3).num_speculative_tokens == 3
    with pytest.raises(DFlashError, match="fewer"):
        too_few_tokens(settings, 7)
