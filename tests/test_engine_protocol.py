"""The engine's plug-in protocol: proposals as trees, the chain and branch-wise verifiers, the tree-capable greedy
acceptor, and a custom tree drafter through `generate`."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dflash import generate
from dflash.engine.acceptance import greedy_accept, greedy_tree_accept
from dflash.engine.cache import cache_length, new_cache
from dflash.engine import DFlashDrafter, LinearVerifier, Proposal, TreeVerifier
from dflash.errors import DFlashError
from dflash.variants.multiround import BranchwiseVerifier
from helpers import reference_greedy


def test_from_chains_merges_shared_prefixes():
    proposal = Proposal.from_chains([torch.tensor([3, 1, 2]), torch.tensor([3, 1, 4]), torch.tensor([0])])
    assert proposal.tokens.tolist() == [3, 1, 2, 4, 0]
    assert proposal.parents == [0, 1, 2, 2, 0]
    assert proposal.branches == [[0, 1, 2, 3], [0, 1, 2, 4], [0, 5]]
    assert not proposal.is_chain and proposal.depth() == 3
    chain = Proposal.chain(torch.tensor([1, 2]))
    assert chain.is_chain and chain.leaf_paths() == [[0, 1, 2]]
    # leaves are found from parents when no branches are given
    assert Proposal(proposal.tokens, proposal.parents).leaf_paths() == [[0, 1, 2, 3], [0, 1, 2, 4], [0, 5]]


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_greedy_tree_accept_on_a_chain_is_greedy_accept(data):
    V, k = data.draw(st.integers(2, 5)), data.draw(st.integers(0, 5))
    logits = torch.tensor([data.draw(st.lists(st.integers(-9, 9), min_size=V, max_size=V, unique=True))
                           for _ in range(k + 1)], dtype=torch.float64)
    tokens = torch.tensor([data.draw(st.integers(0, V - 1)) for _ in range(k)], dtype=torch.long)
    accepted, token = greedy_accept(tokens, logits)
    assert greedy_tree_accept(tokens, list(range(k)), logits) == (list(range(accepted + 1)), token)


def test_greedy_tree_accept_takes_the_matching_branch():
    # node 1 (token 0) and node 2 (token 1) are siblings under the anchor; node 3 (token 2) follows node 2
    proposal = Proposal.from_chains([torch.tensor([0]), torch.tensor([1, 2])])
    logits = torch.full((4, 3), -1.0, dtype=torch.float64)
    logits[0, 1] = logits[2, 2] = logits[3, 0] = 1.0  # target: after anchor 1, after node 2 -> 2, after 3 -> 0
    assert greedy_tree_accept(proposal.tokens, proposal.parents, logits) == ([0, 2, 3], 0)


def test_branchwise_verifier_on_a_tree_matches_plain_forwards_and_commits_the_accepted_branch(pair):
    target, _ = pair
    prompt, anchor = [1, 2, 3], 4
    proposal = Proposal.from_chains([torch.tensor([0, 1, 2]), torch.tensor([0, 3]), torch.tensor([2, 2])])
    cache = new_cache(target.config)
    target(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    with pytest.raises(DFlashError, match="LinearVerifier verifies one chain"):
        LinearVerifier().verify(target, cache, anchor, proposal, len(prompt), [0, 1])
    verifier = BranchwiseVerifier()
    verification = verifier.verify(target, cache, anchor, proposal, len(prompt), [0, 1])
    assert verification.target_forwards == 3 and verification.verified_nodes == 4 + 3 + 3
    for path in proposal.leaf_paths():
        ids = prompt + [anchor] + proposal.path_tokens(path)
        full = target(input_ids=torch.tensor([ids]), output_hidden_states=True)
        for row, node in enumerate(path):
            torch.testing.assert_close(verification.logits[node], full.logits[0, len(prompt) + row],
                                       rtol=0, atol=1e-10)
    # commit the first branch's first two nodes (not the last verified branch): the cache must continue exactly
    verifier.commit(cache, len(prompt), [0, 1, 2])
    assert cache_length(cache) == len(prompt) + 3
    step = target(input_ids=torch.tensor([[3]]), past_key_values=cache, use_cache=True).logits[0, -1]
    fresh = target(input_ids=torch.tensor([prompt + [anchor, 0, 1, 3]])).logits[0, -1]
    torch.testing.assert_close(step, fresh, rtol=0, atol=1e-10)


class TwoChainDrafter(DFlashDrafter):
    """A tree drafter for the test: the DFlash greedy chain plus the same chain with its first token changed."""

    def propose(self, anchor, start, length, context_features, temperature, generator):
        tokens = self.draft_logits(self.masked_block(anchor, length), start, context_features).argmax(-1)
        other = tokens.clone()
        other[0] = (other[0] + 1) % self.token_embedding.weight.shape[0]
        return Proposal.from_chains([tokens, other], draft_passes=1)


@pytest.mark.parametrize("block_size", [2, 5, 8])
def test_a_tree_drafter_through_generate_is_lossless(pair, block_size):
    target, draft = pair
    for prompt in ([1, 2, 3], [0], [4, 4, 1, 0, 2]):
        result = generate(target, draft, prompt, max_new_tokens=30, block_size=block_size,
                          drafter=TwoChainDrafter(draft, target), verifier=TreeVerifier())
        assert result.output_ids == reference_greedy(target, prompt, 30)
        assert all(r.target_forwards == 1 for r in result.trace if r.block_size > 1)
        assert all(r.verified_nodes == 2 * r.block_size - 1 for r in result.trace if r.block_size > 1)
        assert all(r.proposal_stats == {"draft_passes": 1} for r in result.trace if r.block_size > 1)
