"""Tree verification (backlog 8), tree-lite (9) and the candidate-solution generator (10): several draft
candidates per cycle from ONE DFlash draft pass, packed into a trie and verified in ONE target pass with an
ancestor-only mask. Does the higher tau pay for the wider verification?

Cost columns: packed nodes the target verified per cycle, target (verify) seconds per cycle, and a sweep of the
target's verify time against the packed node count (16 / 32 / 48 nodes, plus a plain causal 16-token block for
the mask's own overhead) measured on the case's target in the same process. Every case also runs plain DFlash at
the same block size, interleaved per prompt, so `speedup_vs_dflash_samples` answers the question directly;
"tree K=1" is the plain DFlash block through the tree verifier (the packed path's own overhead).
"""
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from dflash.engine import Proposal, protocol_costs
from dflash.engine.cache import crop_cache, new_cache, with_cache
from dflash.engine.verifiers import verify_tree
from dflash.harness.ablation_cases import as_params
from dflash.harness.measure import Variant, rate, tokens_per_s_total

BLOCK_SIZE = 16
PLAIN = "dflash"  # plain DFlash at the same block size, run interleaved with each case
SWEEP_NODES = (16, 32, 48)


@dataclass(frozen=True)
class TreeCase:
    """One case: a tree method and its knobs, (name, value) pairs in the order the case spells them. The
    variant's name and the record's params keep that order; the decode gets the knobs sorted by name."""
    id: str
    method: str
    knobs: tuple[tuple[str, object], ...]

    @classmethod
    def of(cls, id: str, method: str, **knobs) -> "TreeCase":
        return cls(id, method, tuple(knobs.items()))

    def variant(self, block_size: int) -> Variant:
        return Variant(f"{self.method} {dict(self.knobs)}", block_size=block_size, method=self.method,
                       knobs=tuple(sorted(self.knobs)))

    def params(self, **more) -> dict:
        return {"method": self.method, **dict(self.knobs), **more}


CASES = [
    TreeCase.of("tree-K1", "tree", candidates=1),
    TreeCase.of("tree-K2", "tree", candidates=2),
    TreeCase.of("tree-K4", "tree", candidates=4),
    TreeCase.of("tree_lite-depth1", "tree_lite", depth=1),
    TreeCase.of("tree_lite-depth2", "tree_lite", depth=2),
    TreeCase.of("tree_lite-depth4", "tree_lite", depth=4),
    TreeCase.of("candidates-branch_beam", "candidates", mode="branch_beam"),
    TreeCase.of("candidates-fixed_prefix_rank", "candidates", mode="fixed_prefix_rank", fixed_prefix_len=2,
                branch_top_k=4),
    TreeCase.of("candidates-uncertainty_sparse", "candidates", mode="uncertainty_sparse_rank", fixed_prefix_len=1),
    TreeCase.of("candidates-adaptive", "candidates", mode="branch_beam", adaptive=True, max_candidates=8),
]


@torch.inference_mode()
def verify_cost_sweep(target, prompt, node_counts=SWEEP_NODES, repeats=15) -> dict:
    """Median seconds of one tree-verify target forward of N packed nodes after `prompt`, per N (the node count,
    not the tree's shape, sets the work: the mask is dense). `plain_causal_16`: a 16-token block with the
    model's own causal mask, for the custom mask's overhead. Sizes are timed round-robin, so drift of the shared
    machine spreads over all of them."""
    device = target.get_input_embeddings().weight.device
    cache = new_cache(target.config)
    target(input_ids=torch.tensor([prompt], device=device), **with_cache(target, cache), use_cache=True)
    start = len(prompt)
    generator = torch.Generator().manual_seed(0)
    vocab = target.get_input_embeddings().weight.shape[0]
    forwards = {}
    for n in node_counts:
        tree = Proposal.chain(torch.randint(vocab, (n - 1,), generator=generator))
        forwards[str(n)] = lambda tree=tree: verify_tree(target, cache, int(prompt[-1]), tree, start)
    block = torch.randint(vocab, (1, 16), generator=generator, device=device)
    forwards["plain_causal_16"] = lambda: target(input_ids=block, **with_cache(target, cache), use_cache=True)
    samples = {name: [] for name in forwards}
    for _ in range(repeats):
        for name, forward in forwards.items():
            begin = time.perf_counter()
            forward()
            samples[name].append(time.perf_counter() - begin)
            crop_cache(cache, start)
    return {name: statistics.median(values) for name, values in samples.items()}


def tree_metrics(comparison) -> dict:
    """Cost per cycle, and the same-process comparison with plain DFlash at the same block size."""
    records = [r for result in comparison.variant for r in result.trace]
    plain = comparison.others[PLAIN]
    verify_s = sum(r.verify_s for r in records)
    committed = sum(r.acceptance_length for r in records)
    metrics = {**protocol_costs(comparison.variant),
               "committed_tokens_per_target_s": committed / verify_s if verify_s else 0.0,
               "max_verified_nodes": max((r.verified_nodes for r in records), default=0),
               "speedup_vs_dflash_samples": [rate(v) / rate(p) for v, p in zip(comparison.variant, plain)],
               "dflash_per_prompt_tau": [r.tau if r.num_cycles else 1.0 for r in plain],
               "dflash_tokens_per_s_total": tokens_per_s_total(plain)}
    budgets = Counter(str(r.proposal_stats["cycle_budget"]) for r in records if "cycle_budget" in r.proposal_stats)
    if budgets:
        metrics["cycle_budget_counts"] = dict(budgets)
    chosen = Counter(str(r.proposal_stats["chosen_candidate"]) for r in records
                     if "chosen_candidate" in r.proposal_stats)
    if chosen:
        metrics["chosen_candidate_counts"] = dict(chosen)
    return metrics


@pytest.mark.ablation("tree_variants", ci_datasets=("math",))
@pytest.mark.parametrize("tree", as_params(CASES))
def test_tree_variant(case, tree):
    block_size = min(BLOCK_SIZE, case.draft_block_size)
    variant = tree.variant(block_size)
    plain = Variant(PLAIN, block_size=block_size)
    _, metrics, gates = case.measure(variant, extra=tree_metrics, others=(plain,))
    metrics["verify_s_by_packed_nodes"] = verify_cost_sweep(case.models.target, case.prompts(1)[0])
    case.finish(tree.params(block_size=block_size), metrics, gates)
