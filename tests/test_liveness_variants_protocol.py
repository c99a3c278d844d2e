"""Every knob of the protocol variants (multiround, candidate_diversity, suffix_recycling, refinement) is live:
changing it changes the computation (proposal trees, verified nodes, draft passes, seeded inputs, acceptance),
not just a label. Plus unit checks of the pure pieces the knobs drive, and of the laws sampling relies on."""
import pytest
import torch

from dflash.engine import DFlashDrafter, LinearVerifier, generate
from dflash.variants import VARIANTS
from dflash.variants import suffix_recycling
from dflash.variants.multiround import MultiRoundDrafter, MultiRoundKnobs, diversify, uncertain_positions
from dflash.variants.refinement import RefinementDrafter, RefinementKnobs
from dflash.variants.suffix_recycling import seed_plan


def run(pair, name, temperature=0.0, block_size=8, **knobs):
    """Decode with a variant's plug-ins; the result also carries every proposal its verifier saw
    (`result.proposals`)."""
    target, draft = pair
    spec = VARIANTS[name]
    plugins = spec.make_plugins(draft, target, spec.settings(**knobs), temperature)
    verifier, proposals = plugins.verifier or LinearVerifier(), []

    class Seeing:
        def verify(self, target, cache, anchor, proposal, start, feature_layers):
            proposals.append((proposal.tokens.tolist(), list(proposal.parents)))
            return verifier.verify(target, cache, anchor, proposal, start, feature_layers)

        def commit(self, cache, start, path):
            verifier.commit(cache, start, path)
    result = generate(target, draft, [1, 2, 3], max_new_tokens=40, block_size=block_size, temperature=temperature,
                      seed=1, drafter=plugins.drafter, verifier=Seeing(), acceptor=plugins.acceptor)
    result.proposals = proposals
    return result


def fingerprint(result):
    """What a knob may change: the proposals, acceptance per cycle, target work, the drafter's own counters."""
    return (result.proposals, result.acceptance_lengths,
            [(r.verified_nodes, r.target_forwards) for r in result.trace], [r.proposal_stats for r in result.trace])


# --- multiround ---------------------------------------------------------------------------------------------------

def test_multiround_round_block_sizes_is_live(pair):
    one, two = run(pair, "multiround", round_block_sizes=(8,)), run(pair, "multiround", round_block_sizes=(8, 4))
    assert [r.proposal_stats.get("draft_passes", 0) for r in one.trace if r.block_size > 1] == [1] * (one.num_cycles - 1)
    assert max(r.proposal_stats.get("draft_passes", 0) for r in two.trace) == 2


def test_multiround_rounds_is_live(pair):
    # sampling: each extra round is an independent draw, so the tree grows
    one, three = (run(pair, "multiround", temperature=1.0, round_block_sizes=(8,), rounds=n) for n in (1, 3))
    assert max(r.proposal_stats.get("tree_nodes", 0) for r in three.trace) > max(r.proposal_stats.get("tree_nodes", 0)
                                                                         for r in one.trace)
    assert fingerprint(one) != fingerprint(three)


def test_multiround_proposal_depth_is_live(pair):
    full, shallow = run(pair, "multiround"), run(pair, "multiround", proposal_depth=1)
    assert max(r.acceptance_length for r in shallow.trace) <= 2 < max(r.acceptance_length for r in full.trace)
    assert sum(r.verified_nodes for r in shallow.trace) < sum(r.verified_nodes for r in full.trace)


@pytest.mark.parametrize("name,knobs", [("multiround", {"diversity": "sparse", "rounds": 3}),
                                        ("candidate_diversity", {})])
def test_verifier_is_live(pair, name, knobs):
    linear, tree = (run(pair, name, verifier=v, **knobs) for v in ("linear", "tree"))
    assert linear.output_ids == tree.output_ids
    assert max(r.target_forwards for r in linear.trace) > 1
    assert {r.target_forwards for r in tree.trace} == {1}
    assert sum(r.verified_nodes for r in tree.trace) < sum(r.verified_nodes for r in linear.trace)


@pytest.mark.parametrize("name,knobs", [("multiround", {"rounds": 3, "round_block_sizes": (8,)}),
                                        ("candidate_diversity", {})])
def test_diversity_modes_are_live(pair, name, knobs):
    modes = ("none", "rank", "sparse", "block_sizes") if name == "multiround" else ("rank", "sparse", "block_sizes")
    prints = {mode: fingerprint(run(pair, name, diversity=mode, **knobs)) for mode in modes}
    assert len({repr(p) for p in prints.values()}) == len(modes), "two diversity modes computed the same thing"


@pytest.mark.parametrize("name,knobs", [("multiround", {"rounds": 3, "diversity": "rank"}),
                                        ("candidate_diversity", {})])
def test_margin_threshold_is_live(pair, name, knobs):
    loose, strict = (run(pair, name, margin_threshold=m, **knobs) for m in (1.0, 0.05))
    nodes = [sum(r.proposal_stats.get("tree_nodes", 0) for r in x.trace) / x.num_cycles for x in (loose, strict)]
    assert nodes[0] > nodes[1]


def test_candidate_diversity_ranks_is_live(pair):
    few, many = run(pair, "candidate_diversity", ranks=2), run(pair, "candidate_diversity", ranks=5)
    assert max(r.proposal_stats.get("rounds", 0) for r in few.trace) == 2
    assert sum(r.proposal_stats.get("tree_nodes", 0) for r in many.trace) > sum(r.proposal_stats.get("tree_nodes", 0)
                                                                         for r in few.trace)


def test_uncertain_positions_and_diversify():
    logits = torch.log(torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.5, 0.1, 0.4]], dtype=torch.float64))
    assert uncertain_positions(logits, 0.2) == [1, 2]  # margins 0.85, 0.05, 0.1: most uncertain first
    tokens = logits.argmax(-1)
    assert diversify(1, logits, tokens, None, "rank", 0.2)[0].tolist() == [0, 1, 2]
    assert diversify(2, logits, tokens, None, "rank", 0.2)[0].tolist() == [0, 2, 1]
    assert diversify(1, logits, tokens, None, "sparse", 0.2)[0].tolist() == [0, 1, 0]
    assert diversify(2, logits, tokens, None, "sparse", 0.2)[0].tolist() == [0, 0, 2]
    assert diversify(3, logits, tokens, None, "sparse", 0.2)[0].tolist() == [0, 0, 0]  # no 3rd uncertain position
    laws = torch.softmax(logits, -1)
    swapped, swapped_laws = diversify(1, logits, tokens, laws, "sparse", 0.2)
    assert swapped_laws[1].tolist() == [0.0, 1.0, 0.0] and torch.equal(swapped_laws[0], laws[0])


def test_multiround_branch_laws_are_the_laws_tokens_were_drawn_from(pair):
    target, draft = pair
    drafter = MultiRoundDrafter(draft, target, MultiRoundKnobs(round_block_sizes=(8, 5), rounds=3, diversity="sparse",
                                                               margin_threshold=1.0))
    context = target(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True).hidden_states
    from dflash.model import extract_context_feature
    features = extract_context_feature(context, draft.target_layer_ids)
    proposal = drafter.propose(4, 3, 8, features, 1.0, torch.Generator().manual_seed(0))
    assert len(proposal.branches) == 3 and [len(b) - 1 for b in proposal.branches] == [7, 4, 7]
    for branch, law in zip(proposal.branches, proposal.branch_laws):
        tokens = proposal.tokens_at(branch[1:])
        assert torch.allclose(law.sum(-1), torch.ones(len(branch) - 1, dtype=law.dtype))
        assert bool((law.gather(-1, tokens[:, None].cpu()) > 0).all()), "a token outside its own law's support"
    swapped = proposal.branch_laws[1].max(-1).values == 1.0  # round 1 swapped its most uncertain position
    assert int(swapped.sum()) >= 1


# --- suffix recycling ---------------------------------------------------------------------------------------------

def test_seed_plan_placements():
    # recycled[j] was drafted for position 10 + j; the new anchor sits at 10; probabilities 0.9, 0.2, 0.8, 0.95
    recycled = [(10, 7, 0.9), (11, 8, 0.2), (12, 9, 0.8), (13, 6, 0.95)]
    assert seed_plan(recycled, 10, 8, "none", 0.0, -1) == []
    assert seed_plan(recycled, 10, 8, "dense", 0.0, -1) == [(1, 7), (2, 8), (3, 9), (4, 6)]  # research: one late
    assert seed_plan(recycled, 10, 8, "sparse", 0.0, -1) == [(2, 7), (4, 8), (6, 9)]  # research: 2(j+1) < 8
    assert seed_plan(recycled, 10, 8, "aligned", 0.0, -1) == [(1, 8), (2, 9), (3, 6)]  # where each was drafted
    assert seed_plan(recycled, 10, 8, "aligned", 0.5, -1) == [(2, 9), (3, 6)]  # confidence gate
    assert seed_plan(recycled, 10, 8, "aligned", 0.0, 2) == [(1, 8), (2, 9)]  # seed budget
    assert seed_plan(recycled, 10, 3, "aligned", 0.0, -1) == [(1, 8), (2, 9)]  # block length


@pytest.mark.parametrize("knob,values", [("mode", ("none", "dense", "sparse", "aligned")),
                                         ("min_confidence", (0.0, 0.6)), ("max_seed_tokens", (-1, 1))])
def test_suffix_recycling_knob_is_live(pair, knob, values):
    results = {v: run(pair, "suffix_recycling", **{knob: v}) for v in values}
    seeded = {v: sum(r.proposal_stats.get("seeded_tokens", 0) for r in x.trace if r.proposal_stats) for v, x in
              results.items()}
    assert len(set(seeded.values())) == len(values), seeded
    assert len({repr(x.acceptance_lengths) for x in results.values()}) > 1, "seeds never changed a proposal"


def test_suffix_recycling_seeds_reach_the_draft_inputs(pair, monkeypatch):
    """The hints are what the draft reads: each cycle's block holds exactly the planned hints, masks elsewhere."""
    target, draft = pair
    blocks, plans = [], []
    original_logits, original_plan = DFlashDrafter.draft_logits, suffix_recycling.seed_plan

    def spy_logits(self, block, start, context):
        blocks.append(block.tolist())
        return original_logits(self, block, start, context)

    def spy_plan(*args):
        plans.append(original_plan(*args))
        return plans[-1]
    monkeypatch.setattr(DFlashDrafter, "draft_logits", spy_logits)
    monkeypatch.setattr(suffix_recycling, "seed_plan", spy_plan)
    run(pair, "suffix_recycling", mode="aligned")
    mask = draft.mask_token_id
    assert len(blocks) == len(plans) and sum(len(plan) for plan in plans) > 0
    for block, plan in zip(blocks, plans):
        expected = [mask] * (len(block) - 1)
        for index, token in plan:
            expected[index - 1] = token
        assert block[1:] == expected


# --- refinement ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("knob,values,base", [
    ("steps", (1, 2, 3), {}), ("selective", (False, True), {"threshold": 0.6}),
    ("threshold", (0.3, 0.6, 0.95), {"selective": True}), ("research_compat", (False, True), {})])
def test_refinement_knob_is_live(pair, knob, values, base):
    results = {v: run(pair, "refinement", **{**base, knob: v}) for v in values}
    prints = {v: (fingerprint(x), x.output_ids) for v, x in results.items()}
    assert len({repr(p[0]) for p in prints.values()}) == len(values), f"{knob} values computed the same thing"
    assert len({repr(p[1]) for p in prints.values()}) == 1  # and the output stays the target's


def test_refinement_research_compat_drops_the_draft_context(pair):
    """research_compat passes run without the draft cache: the draft cache stays empty."""
    target, draft = pair
    drafter = RefinementDrafter(draft, target, RefinementKnobs(steps=2, research_compat=True))
    from dflash import generate
    generate(target, draft, [1, 2, 3], max_new_tokens=20, block_size=8, drafter=drafter)
    assert drafter.cache.get_seq_length() == 0
    exact = RefinementDrafter(draft, target, RefinementKnobs(steps=2))
    generate(target, draft, [1, 2, 3], max_new_tokens=20, block_size=8, drafter=exact)
    assert exact.cache.get_seq_length() > 3


def test_refinement_sampled_laws(pair):
    """Sampling: rewritten positions carry the last pass's law, kept ones a point mass at their token."""
    target, draft = pair
    from dflash.model import extract_context_feature
    hidden = target(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True).hidden_states
    features = extract_context_feature(hidden, draft.target_layer_ids)
    drafter = RefinementDrafter(draft, target, RefinementKnobs(steps=2, selective=True, threshold=0.5))
    proposal = drafter.propose(4, 3, 8, features, 1.0, torch.Generator().manual_seed(0))
    laws = proposal.laws
    assert torch.allclose(laws.sum(-1), torch.ones(7, dtype=laws.dtype))
    assert bool((laws.gather(-1, proposal.tokens[:, None]) > 0).all())
    point_masses = int((laws.max(-1).values == 1.0).sum())
    assert 0 < point_masses < 7 and proposal.stats["refined_positions"] == 7 - point_masses


# --- tree variants: acceptance through other branches is exercised and stays lossless --------------------------

@pytest.fixture(scope="module")
def tiny64():
    """The trained tiny pair in float64 (its drafts are good enough that alternative branches get accepted; float64
    keeps block, tree and one-token forwards far from argmax ties) and a few held-out code prompts (where the draft is unsure, so other branches win)."""
    import json

    from dflash import load_draft, load_target, load_tokenizer
    from dflash.loading import PACKAGE_MODELS
    tokenizer = load_tokenizer("tiny")
    texts = json.loads((PACKAGE_MODELS / "tiny" / "heldout.json").read_text())["code"][:4]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return load_target("tiny").to(torch.float64), load_draft("tiny").to(torch.float64), prompts


@pytest.mark.parametrize("name,knobs", [
    ("multiround", {"diversity": "sparse", "rounds": 3, "verifier": "tree"}),
    ("multiround", {"diversity": "rank", "rounds": 3, "verifier": "linear"}),
    ("candidate_diversity", {"diversity": "sparse", "verifier": "tree"}),
    ("candidate_diversity", {"diversity": "sparse", "verifier": "linear"}),
])
def test_tree_variants_accept_off_the_first_branch_and_stay_lossless(tiny64, name, knobs):
    """The registry's random cases rarely accept a non-first branch; the trained pair does, so a commit step that
    keeps the wrong branch (or an acceptor that walks it wrongly) changes the output here."""
    from helpers import reference_greedy
    target, draft, prompts = tiny64
    spec = VARIANTS[name]
    off_branch = 0
    for prompt in prompts:
        result = spec.decode(target, draft, prompt, max_new_tokens=48, block_size=16, **{**spec.knobs, **knobs})
        assert result.output_ids == reference_greedy(target, prompt, 48), (name, knobs)
        # a chain's path is 0, 1, 2, ...; any other node index means a later branch was accepted
        off_branch += sum(r.accepted_path != list(range(len(r.accepted_path))) for r in result.trace)
    assert off_branch >= 3, f"only {off_branch} cycles accepted a non-first branch: the check has no power"


# --- bad knobs get a clear DFlashError ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,knobs,words", [
    ("multiround", {"round_block_sizes": ()}, "round_block_sizes"),
    ("multiround", {"rounds": 0}, "rounds"),
    ("multiround", {"diversity": "wide"}, "diversity"),
    ("multiround", {"proposal_depth": 0}, "proposal_depth"),
    ("multiround", {"verifier": "magic"}, "verifier"),
    ("candidate_diversity", {"diversity": "none"}, "diversity"),
    ("candidate_diversity", {"ranks": 0}, "ranks"),
    ("suffix_recycling", {"mode": "shifted"}, "mode"),
    ("suffix_recycling", {"min_confidence": 1.5}, "min_confidence"),
    ("refinement", {"steps": 0}, "steps"),
    ("refinement", {"threshold": -0.1}, "threshold"),
])
def test_bad_knobs_raise_clear_errors(pair, name, knobs, words):
    from dflash.errors import DFlashError
    with pytest.raises(DFlashError, match=words):
        run(pair, name, **knobs)


@pytest.mark.parametrize("name", ["multiround", "candidate_diversity", "suffix_recycling", "refinement"])
def test_sampling_runs_are_seeded_and_differ_from_greedy(pair, name):
    """temperature > 0 goes through the variant's sampling path (laws checked above, acceptance rules proven by
    enumeration): same seed, same output; another seed or greedy, another output."""
    target, draft = pair
    spec = VARIANTS[name]
    outs = [spec.decode(target, draft, [1, 2, 3], max_new_tokens=30, block_size=8, temperature=t, seed=s,
                        **spec.knobs).output_ids for t, s in ((1.0, 0), (1.0, 0), (1.0, 1), (0.0, 0))]
    assert outs[0] == outs[1] and outs[0] != outs[2] and outs[0] != outs[3]
