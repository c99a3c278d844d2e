"""Every knob of the tree variants (tree, tree_lite, candidates) is live: changing it changes the computation.

Each case decodes the same prompt twice with one knob changed and compares the per-cycle signature of the run:
the packed node count the target verified, the number of candidates, the cycle's candidate budget and the
candidate chosen. A knob that is parsed and never applied leaves the two signatures equal and fails here.
"""
import pytest
import torch

from helpers import random_draft, random_target
from dflash.variants import VARIANTS

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pair():
    target = random_target(1, vocab_size=12)
    return target, random_draft(target, 2)


def run(pair, name, **knobs):
    target, draft = pair
    spec = VARIANTS[name]
    return spec.decode(target, draft, [1, 2, 3], max_new_tokens=48, block_size=8, stop_token_ids=[],
                       temperature=0.0, seed=0, **{**spec.knobs, **knobs})


def signature(result):
    return [(r.verified_nodes, r.proposal_stats.get("candidates"), r.proposal_stats.get("cycle_budget"),
             r.proposal_stats.get("chosen_candidate")) for r in result.trace]


ADAPTIVE = dict(adaptive=True, max_candidates=8)
CASES = [
    # variant, shared knobs, knob, value a, value b
    ("tree", {}, "candidates", 2, 4),
    ("tree", {"candidates": 8}, "node_budget", None, 20),
    ("tree_lite", {}, "top_k", 2, 3),
    ("tree_lite", {}, "depth", 1, 3),
    ("candidates", {}, "mode", "branch_beam", "uncertainty_sparse_rank"),
    ("candidates", {"mode": "fixed_prefix_rank", "branch_top_k": 4}, "mode", "fixed_prefix_rank", "branch_beam"),
    ("candidates", {}, "max_candidates", 2, 4),
    ("candidates", {}, "branch_top_k", 2, 3),
    ("candidates", {}, "branch_depth", 2, 6),
    ("candidates", {}, "margin_threshold", -1.0, 0.3),
    ("candidates", {"mode": "fixed_prefix_rank"}, "fixed_prefix_len", 1, 5),
    ("candidates", {"mode": "uncertainty_sparse_rank", "branch_top_k": 3, "max_candidates": 8},
     "sparse_max_positions", 1, 4),
    ("candidates", {"adaptive_thresholds": (0.0, 0.0)}, "adaptive", False, True),
    ("candidates", ADAPTIVE, "adaptive_budgets", (1, 4, 8), (2, 3, 6)),
    ("candidates", ADAPTIVE, "adaptive_thresholds", (0.85, 0.65), (0.3, 0.2)),
    ("candidates", {**ADAPTIVE, "adaptive_thresholds": (0.0, 0.0)}, "adaptive_warmup_cycles", 0, 6),
    ("candidates", {**ADAPTIVE, "adaptive_thresholds": (0.0, 0.0)}, "adaptive_probe_interval", 0, 3),
]


def test_every_knob_has_a_case():
    covered = {(name, knob) for name, _, knob, _, _ in CASES}
    for name in ("tree", "tree_lite", "candidates"):
        assert {(name, knob) for knob in VARIANTS[name].knobs} <= covered, name


@pytest.mark.parametrize("name,shared,knob,a,b", CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}-vs-{c[4]}" for c in CASES])
def test_tree_knob_is_live(pair, name, shared, knob, a, b):
    first = run(pair, name, **{**shared, knob: a})
    second = run(pair, name, **{**shared, knob: b})
    assert first.output_ids == second.output_ids  # greedy: the knobs change cost, never the output
    assert signature(first) != signature(second), f"{name}.{knob}: {a!r} and {b!r} decode identically"


def test_knobs_do_what_they_say(pair):
    """Sharper than 'something changed': the cost fields follow the knobs' meaning."""
    chain = run(pair, "tree", candidates=1)
    assert all(r.verified_nodes == r.block_size for r in chain.trace)  # one candidate: the plain block
    assert all(r.verified_nodes <= 5 for r in run(pair, "tree", candidates=8, node_budget=5).trace)
    lite = run(pair, "tree_lite", top_k=2, depth=2)
    full = [r for r in lite.trace if r.block_size == 8]
    assert full and all(r.verified_nodes == 1 + 2 + 4 + 4 * 5 for r in full)  # anchor, 2 levels, 4 tails of 5
    warm = run(pair, "candidates", **ADAPTIVE, adaptive_warmup_cycles=3, adaptive_probe_interval=0,
               adaptive_thresholds=(0.0, 0.0))  # after warm-up every cycle qualifies for the low budget
    assert [r.proposal_stats["cycle_budget"] for r in warm.trace[:4]] == [8, 8, 8, 1]
    probe = run(pair, "candidates", **ADAPTIVE, adaptive_warmup_cycles=0, adaptive_probe_interval=3,
                adaptive_thresholds=(0.0, 0.0))
    assert [r.proposal_stats["cycle_budget"] for r in probe.trace[:7]] == [8, 1, 1, 8, 1, 1, 8]
