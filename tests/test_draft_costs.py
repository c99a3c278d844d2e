"""The draft's costs: a bf16 draft beside an fp32 target (its own bf16 copy of the LM head, the output still the
target's), the observed-vocabulary training loss, feature extraction without logits, and the peer benchmark's
dtype rows. Speed itself is measured by the peer benchmark (ablations/test_peers.py), never timed here."""
import pytest
import torch
from torch.nn import functional as F

from dflash.engine import generate
from dflash.engine.drafter import DFlashDrafter, draft_head
from dflash.errors import DFlashError
from dflash.loading import load_draft, load_target, load_tokenizer
from dflash.training.train import (DraftTrainingConfig, RestrictedHead, TrainingSequence, context_features,
                                   loss_head, train_draft)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return load_target("tiny"), load_draft("tiny"), load_tokenizer("tiny")


def _prompts(tok):
    texts = ["def add(a, b):", "What is 3 plus 4?", "import os\n", "Tom has 5 apples and buys 7 more."]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_a_bf16_draft_drafts_with_a_bf16_head_and_the_output_stays_the_targets(tiny):
    target, draft, tok = tiny
    bf16 = load_draft("tiny", dtype="bfloat16")
    drafter = DFlashDrafter(bf16, target)
    head = target.get_output_embeddings()
    assert drafter.lm_head is not head and drafter.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(drafter.lm_head.weight, head.weight.to(torch.bfloat16))
    assert DFlashDrafter(draft, target).lm_head is head  # same dtype: the target's own module, no copy
    stop = [tok.eos_token_id]
    accepted = {"fp32": [], "bf16": []}
    for prompt in _prompts(tok):
        reference = generate(target, None, prompt, max_new_tokens=24, stop_token_ids=stop)
        fp32 = generate(target, draft, prompt, max_new_tokens=24, block_size=8, stop_token_ids=stop)
        low = generate(target, bf16, prompt, max_new_tokens=24, block_size=8, stop_token_ids=stop)
        assert low.output_ids == reference.output_ids == fp32.output_ids
        accepted["fp32"] += fp32.acceptance_lengths
        accepted["bf16"] += low.acceptance_lengths
    tau = {k: sum(v) / len(v) for k, v in accepted.items()}
    assert tau["bf16"] > 1.0 and tau["bf16"] >= 0.8 * tau["fp32"], tau  # the bf16 draft still drafts usefully


def test_the_head_copy_is_made_once_and_remade_when_the_target_changes(tiny):
    target, _, _ = tiny
    first = draft_head(target, torch.bfloat16)
    assert draft_head(target, torch.bfloat16) is first
    import copy
    other = copy.deepcopy(target)
    head = other.get_output_embeddings()
    before = draft_head(other, torch.bfloat16)
    with torch.no_grad():
        head.weight.mul_(2.0)  # an in-place change bumps the tensor's version
    after = draft_head(other, torch.bfloat16)
    assert after is not before and torch.equal(after.weight, head.weight.to(torch.bfloat16))


def test_the_observed_vocabulary_loss_is_cross_entropy_over_the_observed_rows(tiny):
    target, _, _ = tiny
    head = target.get_output_embeddings()
    sequences = [TrainingSequence(torch.tensor([5, 9, 9, 40, 7]), 1), TrainingSequence(torch.tensor([7, 300, 5]), 1)]
    restricted = loss_head(head, sequences, "observed")
    assert isinstance(restricted, RestrictedHead) and loss_head(head, sequences, "full") is head
    observed = torch.tensor([5, 7, 9, 40, 300])
    hidden = torch.randn(6, head.in_features)
    labels = torch.tensor([9, 300, -100, 5, 40, 7])
    loss = F.cross_entropy(restricted(hidden), restricted.labels(labels), ignore_index=-100, reduction="none")
    expected = F.cross_entropy(head(hidden)[:, observed],
                               torch.tensor([2, 4, -100, 0, 3, 1]), ignore_index=-100, reduction="none")
    assert torch.allclose(loss, expected, atol=1e-5)
    assert restricted.weight.shape == (5, head.in_features)


def test_the_loss_vocabulary_knob_is_live_and_checked(tiny):
    target, _, tok = tiny
    ids = [torch.tensor(p + p[::-1] + p) for p in _prompts(tok)]
    sequences = [TrainingSequence(t, 2) for t in ids]
    runs = {}
    for vocab in ("full", "observed"):
        config = DraftTrainingConfig(num_layers=1, block_size=4, steps=3, batch_size=2, anchors_per_sequence=2,
                                     loss_vocab=vocab)
        _, stats = train_draft(target, sequences, mask_token_id=0, config=config, progress=False)
        runs[vocab] = stats.losses
        expected = (target.get_output_embeddings().weight.shape[0] if vocab == "full"
                    else torch.unique(torch.cat(ids)).numel())
        assert stats.loss_vocab_size == expected
    assert runs["full"][0] > runs["observed"][0]  # a smaller normaliser: a smaller loss from the same start
    with pytest.raises(DFlashError, match="loss_vocab"):
        train_draft(target, sequences, mask_token_id=0, progress=False,
                    config=DraftTrainingConfig(num_layers=1, block_size=4, steps=1, loss_vocab="top-k"))


def test_context_features_skip_the_logits_and_equal_a_full_forward(tiny):
    target, _, tok = tiny
    sequences = [TrainingSequence(torch.tensor(p), 1) for p in _prompts(tok)]
    features = context_features(target, sequences, [0, 1], batch_size=1)
    for sequence, feature in zip(sequences, features):
        with torch.inference_mode():
            out = target(input_ids=sequence.token_ids[None], output_hidden_states=True)
        assert torch.equal(feature, torch.cat([out.hidden_states[1][0], out.hidden_states[2][0]], -1))


def test_a_peer_row_converts_a_copy_of_the_target_and_a_wider_draft(tiny):
    from dflash.harness.peers import in_dtype
    target, draft, _ = tiny
    same_target, same_draft = in_dtype(target, draft, "float32")
    assert same_target is target and same_draft is draft
    low_target, low_draft = in_dtype(target, draft, "bfloat16")
    assert low_target.dtype == torch.bfloat16 and next(low_draft.parameters()).dtype == torch.bfloat16
    assert target.dtype == torch.float32 and next(draft.parameters()).dtype == torch.float32
    bf16 = load_draft("tiny", dtype="bfloat16")
    assert in_dtype(target, bf16, "float32")[1] is bf16  # a narrower draft is kept as it is


def test_the_smol_profile_drafts_in_bf16_beside_its_fp32_target():
    from dflash.profiles import get_profile
    profile = get_profile("smol")
    assert (profile.dtype, profile.draft_dtype) == ("float32", "bfloat16")
    assert profile.prompts >= 20
