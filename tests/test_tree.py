"""Tree verification pieces (dflash.engine: Proposal trees, ancestor-only mask, one-pass verification, cache
compaction, greedy tree acceptance) and the candidate builders of the tree variants.

The strict checks use float64 random targets: tree-verified logits of every root-to-leaf path equal a plain
sequential forward of that path to 1e-10, and the compacted cache equals the cache of a chain forward of the
accepted path (so decoding can continue from it).
"""
import copy
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dflash.engine import GreedyAcceptor, Proposal
from dflash.engine.cache import new_cache
from dflash.engine.verifiers import compact_cache, tree_attention_mask, verify_tree
from dflash.errors import DFlashError
from helpers import random_target

torch.set_num_threads(1)


def test_from_chains_deduplicates_shared_prefixes():
    tree = Proposal.from_chains([[1, 2, 3], [1, 2, 4], [5], [1, 2, 3]])
    assert tree.tokens.tolist() == [1, 2, 3, 4, 5]
    assert tree.parents == [0, 1, 2, 2, 0]
    assert tree.depths() == [0, 1, 2, 3, 3, 1]
    assert tree.branches == [[0, 1, 2, 3], [0, 1, 2, 4], [0, 5], [0, 1, 2, 3]]


def test_node_budget_cuts_later_chains_first():
    tree = Proposal.from_chains([[1, 2, 3], [1, 7, 8], [5, 6]], node_budget=5)
    assert tree.tokens.tolist() == [1, 2, 3, 7]  # chain 2 keeps "1 7", chain 3 does not fit at all
    assert tree.branches == [[0, 1, 2, 3], [0, 1, 4], [0]]
    assert Proposal.from_chains([[1, 2, 3]], node_budget=1).size == 0
    with pytest.raises(DFlashError, match="node_budget"):
        Proposal.from_chains([[1]], node_budget=0)


def test_a_chain_is_the_one_path_tree():
    chain = Proposal.chain(torch.tensor([5, 6, 7]))
    assert chain.is_chain and chain.parents == [0, 1, 2] and chain.depths() == [0, 1, 2, 3]
    assert chain.leaf_paths() == [[0, 1, 2, 3]] and chain.path_tokens([0, 1, 2]) == [5, 6]
    assert Proposal.chain(torch.tensor([], dtype=torch.long)).leaf_paths() == [[0]]


def test_ancestor_mask_and_depths():
    tree = Proposal.from_chains([[1, 2], [1, 3], [4]])  # nodes: 0 anchor, 1 "1", 2 "2", 3 "3", 4 "4"
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],
                             [1, 1, 0, 1, 0],
                             [1, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(tree.ancestors(), expected)
    mask = tree_attention_mask(tree, 3, torch.float64)
    assert mask.shape == (1, 1, 5, 8)
    assert (mask[0, 0, :, :3] == 0).all()  # every node sees the whole committed cache
    assert torch.equal(mask[0, 0, :, 3:] == 0, expected)
    assert tree.depths() == [0, 1, 2, 2, 1]
    with pytest.raises(DFlashError, match="do not make a tree"):
        Proposal(torch.tensor([1, 2]), [1, 0])  # node 1 under node 1 itself


def test_greedy_tree_accept_follows_the_argmax_child():
    tree = Proposal.from_chains([[1, 2], [1, 3], [4]])
    vocab = 10
    logits = torch.zeros(tree.size + 1, vocab)
    logits[0, 1] = logits[1, 3] = logits[3, 7] = 1.0  # anchor -> "1" -> "3" -> bonus 7
    path, bonus = GreedyAcceptor().accept(tree, logits)
    assert path == [0, 1, 3] and bonus == 7 and tree.path_tokens(path) == [1, 3]
    logits[0] = 0
    logits[0, 5] = 1.0  # no child of the anchor is the argmax: nothing accepted, bonus 5
    assert GreedyAcceptor().accept(tree, logits) == ([0], 5)


def _prefill(target, prompt):
    cache = new_cache(target.config)
    with torch.inference_mode():
        target(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    return cache


def _chain_forward(target, cache, tokens):
    with torch.inference_mode():
        out = target(input_ids=torch.tensor([tokens]), past_key_values=cache, use_cache=True,
                     output_hidden_states=True)
    return out


@st.composite
def tree_cases(draw):
    vocab = draw(st.integers(3, 12))
    prompt = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8))
    paths = draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=6), min_size=1, max_size=5))
    return dict(seed=draw(st.integers(0, 1000)), vocab=vocab, prompt=prompt, anchor=draw(st.integers(0, vocab - 1)),
                paths=paths, attn=draw(st.sampled_from(["sdpa", "eager"])))


@settings(max_examples=25, deadline=None)
@given(tree_cases())
def test_tree_logits_equal_sequential_forward_and_compaction_equals_chain_cache(case):
    target = random_target(case["seed"], vocab_size=case["vocab"], num_layers=2)
    target.config._attn_implementation = case["attn"]
    base = _prefill(target, case["prompt"])
    start = len(case["prompt"])
    tree = Proposal.from_chains(case["paths"])
    anchor = case["anchor"]
    # SDPA keeps float64 throughout; HF's eager attention runs its softmax in float32, so rows of different
    # lengths (tree vs chain) round differently at ~1e-7 and the eager check can only be float32-tight.
    atol = 1e-10 if case["attn"] == "sdpa" else 1e-5
    tree_cache = copy.deepcopy(base)
    with torch.inference_mode():
        tree_out = verify_tree(target, tree_cache, anchor, tree, start, output_hidden_states=True)
    assert tree_cache.get_seq_length() == start + tree.size + 1
    for path in {tuple(p): p for p in tree.leaf_paths()}.values():
        tokens = [anchor, *tree.path_tokens(path)]
        chain_cache = copy.deepcopy(base)
        chain = _chain_forward(target, chain_cache, tokens)
        torch.testing.assert_close(tree_out.logits[0, path], chain.logits[0], rtol=0, atol=atol)
        torch.testing.assert_close(tree_out.hidden_states[1][0, path], chain.hidden_states[1][0], rtol=0, atol=atol)
        compacted = copy.deepcopy(tree_cache)
        compact_cache(compacted, start, path)
        for tree_layer, chain_layer in zip(compacted.layers, chain_cache.layers):
            torch.testing.assert_close(tree_layer.keys, chain_layer.keys, rtol=0, atol=atol)
            torch.testing.assert_close(tree_layer.values, chain_layer.values, rtol=0, atol=atol)
        # Decoding continues identically from the compacted cache.
        after_tree = _chain_forward(target, compacted, [0, 1])
        after_chain = _chain_forward(target, chain_cache, [0, 1])
        torch.testing.assert_close(after_tree.logits, after_chain.logits, rtol=0, atol=atol)


def test_keeping_a_sibling_entry_breaks_the_cache():
    """The compaction check has power: keeping a sibling's K/V instead of the path's gives a different cache."""
    target = random_target(3, vocab_size=8, num_layers=2)
    base = _prefill(target, [1, 2, 3])
    tree = Proposal.from_chains([[1, 2], [5, 2]])  # nodes 0 (anchor 4), 1 "1", 2 "2", 3 "5", 4 "2"
    cache = copy.deepcopy(base)
    with torch.inference_mode():
        verify_tree(target, cache, 4, tree, 3)
    chain_cache = copy.deepcopy(base)
    _chain_forward(target, chain_cache, [4, 1, 2])
    wrong = copy.deepcopy(cache)
    compact_cache(wrong, 3, [0, 1, 4])  # "2" under "5", same token and depth as the right node
    assert torch.allclose(wrong.layers[0].keys, chain_cache.layers[0].keys)  # layer 0: token + position only
    assert not torch.allclose(wrong.layers[1].keys, chain_cache.layers[1].keys, atol=1e-6)
    compact_cache(cache, 3, [0, 1, 2])
    torch.testing.assert_close(cache.layers[1].keys, chain_cache.layers[1].keys, rtol=0, atol=1e-10)


def test_verify_tree_rejects_a_cache_out_of_step():
    target = random_target(3, vocab_size=8, num_layers=2)
    cache = _prefill(target, [1, 2, 3])
    with pytest.raises(DFlashError, match="cache holds 3"):
        verify_tree(target, cache, 1, Proposal.chain(torch.tensor([2])), 4)


# --- candidate builders (dflash.variants.tree, tree_lite, candidates) ------------------------------------------------------------------

from dflash.variants.candidates import (CandidateKnobs, adaptive_budget, branch_beam, choose_candidate,  # noqa: E402
                                        fixed_prefix_rank, uncertainty_sparse_rank)
from dflash.variants.tree import k_best_paths  # noqa: E402
from dflash.variants.tree_lite import early_branch_paths  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(2, 4), st.integers(1, 6))
def test_k_best_paths_are_the_exact_k_best_blocks(seed, length, vocab, k):
    torch.manual_seed(seed)
    logits = torch.randn(length, vocab, dtype=torch.float64)
    logp = torch.log_softmax(logits, -1)
    paths, scores = k_best_paths(logits, k)
    every = sorted(float(sum(logp[j, t] for j, t in enumerate(block)))
                   for block in itertools.product(range(vocab), repeat=length))[::-1]
    assert torch.equal(paths[0], logits.argmax(-1))
    assert len(paths) == min(k, vocab ** length)
    assert scores == pytest.approx(every[: len(paths)], abs=1e-12)


def test_early_branch_paths_branch_only_the_first_positions():
    torch.manual_seed(0)
    logits = torch.randn(7, 11)
    greedy = logits.argmax(-1)
    paths = early_branch_paths(logits, top_k=2, depth=3)
    assert len(paths) == 8 and len({tuple(p.tolist()) for p in paths}) == 8
    assert torch.equal(paths[0], greedy)
    second = logits.topk(2, -1).indices[:, 1]
    for path in paths:
        assert torch.equal(path[3:], greedy[3:])
        assert all(path[j] in (greedy[j], second[j]) for j in range(3))
    assert len(early_branch_paths(logits, top_k=2, depth=0)) == 1
    assert len(early_branch_paths(logits, top_k=3, depth=20)) == 3 ** 7


def test_branch_beam_candidates():
    torch.manual_seed(1)
    logits = torch.randn(7, 11)
    base = logits.argmax(-1)
    candidates, scores = branch_beam(logits, budget=4, branch_depth=3, top_k=2)
    assert len(candidates) == 4 and torch.equal(candidates[0], base)
    assert len({tuple(c.tolist()) for c in candidates}) == 4
    for c in candidates:
        assert torch.equal(c[3:], base[3:])  # only block positions 1..branch_depth change
    assert scores[1:] == sorted(scores[1:], reverse=True)
    assert len(branch_beam(logits, budget=1, branch_depth=3, top_k=2)[0]) == 1
    assert len(branch_beam(logits, budget=4, branch_depth=0, top_k=2)[0]) == 1
    # margin filter: threshold 0 leaves no eligible position (margins are > 0), so only the base remains
    assert len(branch_beam(logits, budget=4, branch_depth=3, top_k=2, margin_threshold=0.0)[0]) == 1


def test_fixed_prefix_rank_candidates():
    torch.manual_seed(2)
    logits = torch.randn(7, 11)  # block of 8: anchor + 7 drafted
    ranked = logits.topk(3, -1).indices
    candidates, scores = fixed_prefix_rank(logits, budget=8, prefix_len=3, top_k=3)
    assert len(candidates) == 3  # capped by top_k
    for r, c in enumerate(candidates):
        assert torch.equal(c[:2], logits.argmax(-1)[:2])  # block positions 1, 2 keep the greedy tokens
        assert torch.equal(c[2:], ranked[2:, r])  # every suffix position at rank r+1
    assert scores[0] > scores[1] > scores[2]
    assert len(fixed_prefix_rank(logits, budget=8, prefix_len=8, top_k=3)[0]) == 1  # empty suffix


def test_uncertainty_sparse_rank_candidates():
    torch.manual_seed(3)
    logits = torch.randn(7, 11)
    base = logits.argmax(-1)
    top2 = logits.topk(2, -1).values
    candidates, _ = uncertainty_sparse_rank(logits, budget=4, prefix_len=2, top_k=3, sparse_max_positions=2)
    assert len(candidates) == 4 and torch.equal(candidates[0], base)
    margins = (top2[:, 0] - top2[:, 1])[1:]
    most_uncertain = set((margins.argsort()[:2] + 1).tolist())
    changed = set()
    for c in candidates[1:]:
        diff = (c != base).nonzero().flatten().tolist()
        assert len(diff) == 1 and diff[0] >= 1
        changed.add(diff[0])
    assert changed <= most_uncertain
    assert len(uncertainty_sparse_rank(logits, budget=8, prefix_len=2, top_k=3, sparse_max_positions=1)[0]) == 3


def test_adaptive_budget_rules():
    kwargs = dict(budgets=(1, 4, 8), thresholds=(0.85, 0.65), warmup_cycles=2, probe_interval=5, max_candidates=8)
    assert adaptive_budget(0, 1.0, **kwargs) == 8  # warm-up
    assert adaptive_budget(5, 1.0, **kwargs) == 8  # probe
    assert adaptive_budget(3, None, **kwargs) == 8
    assert adaptive_budget(3, 0.9, **kwargs) == 1
    assert adaptive_budget(3, 0.7, **kwargs) == 4
    assert adaptive_budget(3, 0.2, **kwargs) == 8
    assert adaptive_budget(3, 0.2, **{**kwargs, "max_candidates": 3}) == 3


def test_choose_candidate_tie_break():
    assert choose_candidate([2, 3, 3], [0.0, -1.0, 5.0]) == 2  # longest first, then the higher draft score
    assert choose_candidate([3, 3], [1.0, 1.0]) == 0  # then the lower index


def test_candidate_knob_errors():
    CandidateKnobs()
    for bad, match in [({"mode": "beam"}, "Unknown candidate mode"), ({"max_candidates": 0}, "max_candidates"),
                       ({"adaptive_budgets": (1, 4)}, "adaptive_budgets"),
                       ({"adaptive_thresholds": (0.5, 0.9)}, "adaptive_thresholds")]:
        with pytest.raises(DFlashError, match=match):
            CandidateKnobs(**bad)


# --- sampled tree acceptance: exact for point-mass candidates -------------------------------------------------

import numpy as np  # noqa: E402
from test_acceptance_exact import TOL, _SLOW_OK, extend_with_target, target_law, target_tables  # noqa: E402
from test_acceptance_multiround_tree import enumerate_walk  # noqa: E402

from dflash.engine import TreeSamplingAcceptor  # noqa: E402


@st.composite
def point_mass_candidate_trees(draw):
    """Deterministic candidate paths (what tree / tree_lite / candidates propose) over a random target table."""
    V = draw(st.integers(2, 3))
    k = draw(st.integers(1, 3))
    cond = draw(target_tables(V, k))
    paths = draw(st.lists(st.lists(st.integers(0, V - 1), min_size=1, max_size=k), min_size=1, max_size=4))
    return V, k, cond, paths


@settings(deadline=None, max_examples=60, suppress_health_check=_SLOW_OK)
@given(point_mass_candidate_trees())
def test_sampled_tree_walk_over_candidate_paths_commits_target_law(setup):
    """Exact enumeration: recursive rejection over point-mass siblings commits exactly the target's law."""
    V, k, cond, paths = setup
    laws = [[np.eye(V)[token] for token in path] for path in paths]
    mass = enumerate_walk(V, k, cond, laws)
    assert abs(sum(m.sum() for m in mass[1:]) - 1.0) < TOL
    assert np.allclose(extend_with_target(mass, cond, k), target_law(cond, k), rtol=0, atol=TOL)


def test_variants_sample_with_the_exact_walk():
    target = random_target(4, vocab_size=6)
    from helpers import random_draft
    from dflash.variants import VARIANTS
    draft = random_draft(target, 5)
    for name in ("tree", "tree_lite", "candidates"):
        spec = VARIANTS[name]
        acceptor = spec.make_plugins(draft, target, spec.settings(), 0.7).acceptor
        assert isinstance(getattr(acceptor, "base", acceptor), TreeSamplingAcceptor), name
        assert spec.sampling
        runs = [spec.decode(target, draft, [1, 2], max_new_tokens=24, block_size=8, stop_token_ids=[],
                            temperature=1.0, seed=seed, **spec.knobs).output_ids for seed in (0, 0, 1)]
        assert runs[0] == runs[1] and runs[0] != runs[2], name  # seeded, and the seed is live


def test_variant_knob_errors_are_clear():
    from helpers import random_draft
    from dflash.variants import VARIANTS
    target = random_target(4, vocab_size=6)
    draft = random_draft(target, 5)
    for name, knobs, match in [("tree", {"candidates": 0}, "candidates"), ("tree", {"node_budget": 0}, "node_budget"),
                               ("tree_lite", {"depth": -1}, "depth"), ("tree_lite", {"depth": 13}, "4096"),
                               ("candidates", {"mode": "beam"}, "Unknown candidate mode")]:
        with pytest.raises(DFlashError, match=match):
            VARIANTS[name].decode(target, draft, [1, 2], max_new_tokens=8, block_size=8, **knobs)
    with pytest.raises(DFlashError, match="needs a DFlash draft"):
        VARIANTS["tree"].decode(target, None, [1, 2], max_new_tokens=8, block_size=8)
    with pytest.raises(DFlashError, match="Unknown knob.*candidate.*its knobs are: candidates, node_budget"):
        VARIANTS["tree"].decode(target, draft, [1, 2], max_new_tokens=8, block_size=8, candidate=2)


@pytest.mark.parametrize("name", ["tree", "tree_lite", "candidates"])
def test_draft_temperature_is_declared_inert_for_candidate_trees_and_refused(name):
    """Candidates are picked from the draft's raw logits at every temperature: the proposals do not depend on the
    drafting temperature (shown here), so the registry refuses the knob instead of letting it sit dead."""
    from helpers import random_draft
    from dflash.variants import VARIANTS
    target = random_target(4, vocab_size=6)
    draft = random_draft(target, 5)
    spec = VARIANTS[name]
    assert not spec.draft_temperature
    from dflash.model import extract_context_feature
    proposals = []
    with torch.inference_mode():
        context = target(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True).hidden_states
        features = extract_context_feature(context, draft.target_layer_ids)
        for temperature in (0.3, 1.0, 3.0):
            drafter = spec.make_plugins(draft, target, spec.settings(), temperature).drafter
            proposals.append(drafter.propose(4, 3, 8, features, temperature, torch.Generator().manual_seed(0)))
    assert all(p.tokens.tolist() == proposals[0].tokens.tolist() and p.parents == proposals[0].parents
               for p in proposals)
    with pytest.raises(DFlashError, match="draft_temperature would have no effect"):
        spec.decode(target, draft, [1, 2], max_new_tokens=8, block_size=8, temperature=1.0, draft_temperature=0.5)
