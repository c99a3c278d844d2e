"""Tree verification (backlog 8), tree-lite (9) and the candidate-solution generator (10): several draft
candidates per cycle from ONE DFlash draft pass, packed into a trie and verified in ONE target pass with an
ancestor-only mask. Does the higher tau pay for the wider verification?

Cost columns: packed nodes the target verified per cycle, target (verify) seconds per cycle, and a sweep of the
target's verify time against the packed node count (16 / 32 / 48 nodes, plus a plain causal 16-token block for
the mask's own overhead) measured on the case's target in the same process. "tree K=1" is the plain DFlash block
through the same tree verifier.
"""
import statistics
import time
from collections import Counter

import pytest
import torch

from dflash.cache import crop_cache, new_cache
from dflash.engine import protocol_costs
from dflash.harness.measure import Variant
from dflash.tree import chain_trie, verify_tree

BLOCK_SIZE = 16
SWEEP_NODES = (16, 32, 48)
CASES = [
    pytest.param("tree", {"candidates": 1}, id="tree-K=1"),
    pytest.param("tree", {"candidates": 2}, id="tree-K=2"),
    pytest.param("tree", {"candidates": 4}, id="tree-K=4"),
    pytest.param("tree_lite", {"depth": 1}, id="tree_lite-depth=1"),
    pytest.param("tree_lite", {"depth": 2}, id="tree_lite-depth=2"),
    pytest.param("tree_lite", {"depth": 4}, id="tree_lite-depth=4"),
    pytest.param("candidates", {"mode": "branch_beam"}, id="candidates-branch_beam"),
    pytest.param("candidates", {"mode": "fixed_prefix_rank", "fixed_prefix_len": 2, "branch_top_k": 4},
                 id="candidates-fixed_prefix_rank"),
    pytest.param("candidates", {"mode": "uncertainty_sparse_rank", "fixed_prefix_len": 1},
                 id="candidates-uncertainty_sparse"),
    pytest.param("candidates", {"mode": "branch_beam", "adaptive": True, "max_candidates": 8},
                 id="candidates-adaptive"),
]


@torch.inference_mode()
def verify_cost_sweep(target, prompt, node_counts=SWEEP_NODES, repeats=7) -> dict:
    """Median seconds of one tree-verify target forward of N packed nodes after `prompt`, per N (the node count,
    not the tree's shape, sets the work: the mask is dense). `plain_causal_16`: a 16-token block with the
    model's own causal mask, for the custom mask's overhead."""
    device = target.get_input_embeddings().weight.device
    cache = new_cache(target.config)
    target(input_ids=torch.tensor([prompt], device=device), past_key_values=cache, use_cache=True)
    start = len(prompt)
    generator = torch.Generator().manual_seed(0)
    vocab = target.get_input_embeddings().weight.shape[0]

    def timed(forward) -> float:
        samples = []
        for _ in range(repeats):
            begin = time.perf_counter()
            forward()
            samples.append(time.perf_counter() - begin)
            crop_cache(cache, start)
        return statistics.median(samples)

    out = {}
    for n in node_counts:
        trie = chain_trie(int(prompt[-1]), torch.randint(vocab, (n - 1,), generator=generator))
        out[str(n)] = timed(lambda: verify_tree(target, cache, trie, start))
    block = torch.randint(vocab, (1, 16), generator=generator, device=device)
    out["plain_causal_16"] = timed(lambda: target(input_ids=block, past_key_values=cache, use_cache=True))
    return out


def tree_metrics(comparison) -> dict:
    records = [r for result in comparison.variant for r in result.trace]
    verify_s = sum(r.verify_s for r in records)
    committed = sum(r.acceptance_length for r in records)
    metrics = {**protocol_costs(comparison.variant),
               "committed_tokens_per_target_s": committed / verify_s if verify_s else 0.0,
               "max_verified_nodes": max((r.verified_nodes for r in records), default=0)}
    budgets = Counter(str(r.proposal_stats["cycle_budget"]) for r in records if "cycle_budget" in r.proposal_stats)
    if budgets:
        metrics["cycle_budget_counts"] = dict(budgets)
    chosen = Counter(str(r.proposal_stats["chosen_candidate"]) for r in records
                     if "chosen_candidate" in r.proposal_stats)
    if chosen:
        metrics["chosen_candidate_counts"] = dict(chosen)
    return metrics


@pytest.mark.ablation("tree_variants", ci_datasets=("math",))
@pytest.mark.parametrize("method,knobs", CASES)
def test_tree_variant(case, method, knobs):
    block_size = min(BLOCK_SIZE, case.draft_block_size)
    variant = Variant(f"{method} {knobs}", block_size=block_size, method=method, knobs=tuple(sorted(knobs.items())))
    _, metrics, gates = case.measure(variant, extra=tree_metrics)
    metrics["verify_s_by_packed_nodes"] = verify_cost_sweep(case.models.target, case.prompts(1)[0])
    case.finish("tree_variants", {"method": method, **knobs, "block_size": block_size}, metrics, gates)
