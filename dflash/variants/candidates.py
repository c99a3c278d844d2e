"""Backlog variant 7, the candidate-solution generator (the research repo's benchmark_candidate_solutions).

One greedy DFlash draft pass per cycle; a mode builds up to `budget` candidate blocks from its logits
(dflash.candidates: branch_beam, fixed_prefix_rank, uncertainty_sparse_rank; candidate 0 is the greedy base);
the per-cycle budget is `max_candidates`, or with `adaptive` the 1/4/8 policy (warm-up and probe cycles at the
high budget, then by the previous cycle's tau / block size).

Verification: the research repo stacked the C candidates as a batch (C rows of the full block, the cache copied
and repeated C times). Here they are packed into one trie and verified in one target pass instead
(dflash.tree.TreeVerifier): candidates share their prefix up to the first replaced position, so the packed node
count is at most C x L and usually much less (fixed_prefix_rank: p + C (L - p)); there is no cache copy, and
keeping the winner is an index_select of its path. The best candidate is the longest accepted one, then the
higher draft score, then the lower index (the documented tie-break); every candidate reaching the walk's accepted
path commits the same tokens, so the tie-break only names the winner in the trace. The research script was greedy
only; here sampling uses the exact tree walk of dflash.variants.tree (point-mass candidates, recursive rejection
over siblings).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import candidates as build
from ..engine import CycleOutcome, Proposal
from . import VariantSpec, register
from .tree import CandidateTreeDrafter, decode_tree_variant, tree_acceptor


class CandidateDrafter(CandidateTreeDrafter):
    def __init__(self, draft, target, *, mode, max_candidates, branch_top_k, branch_depth, margin_threshold,
                 fixed_prefix_len, sparse_max_positions, adaptive, adaptive_budgets, adaptive_thresholds,
                 adaptive_warmup_cycles, adaptive_probe_interval):
        super().__init__(draft, target)
        self.mode, self.max_candidates, self.top_k, self.depth = mode, max_candidates, branch_top_k, branch_depth
        self.margin_threshold, self.prefix_len = margin_threshold, fixed_prefix_len
        self.sparse_max = sparse_max_positions
        self.adaptive, self.budgets, self.thresholds = adaptive, tuple(adaptive_budgets), tuple(adaptive_thresholds)
        self.warmup, self.probe = adaptive_warmup_cycles, adaptive_probe_interval
        self.cycle, self.last_ratio, self.budget = 0, None, max_candidates

    def propose(self, anchor, start, length, context_features, temperature, generator) -> Proposal:
        self.budget = (build.adaptive_budget(self.cycle, self.last_ratio, self.budgets, self.thresholds, self.warmup,
                                             self.probe, self.max_candidates)
                       if self.adaptive else self.max_candidates)
        proposal = super().propose(anchor, start, length, context_features, temperature, generator)
        proposal.stats["cycle_budget"] = self.budget
        return proposal

    def candidates(self, logits):
        if self.mode == "branch_beam":
            return build.branch_beam(logits, self.budget, self.depth, self.top_k, self.margin_threshold)
        if self.mode == "fixed_prefix_rank":
            return build.fixed_prefix_rank(logits, self.budget, self.prefix_len, self.top_k)
        return build.uncertainty_sparse_rank(logits, self.budget, self.prefix_len, self.top_k, self.sparse_max,
                                             self.margin_threshold)

    def observe(self, outcome: CycleOutcome) -> None:
        self.cycle += 1
        self.last_ratio = len(outcome.path) / (outcome.proposal.depth() + 1)  # tau / the cycle's block size


@dataclass
class BestCandidateAcceptor:
    """The tree walk of `base`; also names the best candidate (tau, then draft score, then index) in the stats."""
    base: object

    def accept(self, proposal: Proposal, logits: torch.Tensor, draw=None):
        path, next_token = self.base.accept(proposal, logits, draw)
        if proposal.branches is None:  # a cycle with nothing drafted (length 1 at the end of the output)
            return path, next_token
        taus = []
        for branch in proposal.branches:
            matched = 0
            while matched < min(len(branch), len(path) - 1) and branch[matched] == path[matched + 1]:
                matched += 1
            taus.append(matched + 1)
        chosen = build.choose_candidate(taus, proposal.stats["candidate_scores"])
        assert taus[chosen] == len(path), "the walk's path must be the best candidate's accepted prefix"
        proposal.stats.update(candidate_taus=taus, chosen_candidate=chosen)
        return path, next_token


def decode_candidates(target, draft, prompt, *, max_new_tokens, block_size, temperature=0.0, seed=None,
                      stop_token_ids=None, mode="branch_beam", max_candidates=4, branch_top_k=2, branch_depth=6,
                      margin_threshold=-1.0, fixed_prefix_len=5, sparse_max_positions=4, adaptive=False,
                      adaptive_budgets=(1, 4, 8), adaptive_thresholds=(0.85, 0.65), adaptive_warmup_cycles=4,
                      adaptive_probe_interval=16):
    build.check_candidate_knobs(mode, max_candidates, branch_top_k, branch_depth, fixed_prefix_len,
                                sparse_max_positions, adaptive_budgets, adaptive_thresholds, adaptive_warmup_cycles,
                                adaptive_probe_interval)
    knobs = dict(mode=mode, max_candidates=max_candidates, branch_top_k=branch_top_k, branch_depth=branch_depth,
                 margin_threshold=margin_threshold, fixed_prefix_len=fixed_prefix_len,
                 sparse_max_positions=sparse_max_positions, adaptive=adaptive, adaptive_budgets=adaptive_budgets,
                 adaptive_thresholds=adaptive_thresholds, adaptive_warmup_cycles=adaptive_warmup_cycles,
                 adaptive_probe_interval=adaptive_probe_interval)
    return decode_tree_variant("candidates", lambda: CandidateDrafter(draft, target, **knobs), target, draft, prompt,
                               max_new_tokens=max_new_tokens, block_size=block_size, temperature=temperature,
                               seed=seed, stop_token_ids=stop_token_ids,
                               acceptor=BestCandidateAcceptor(tree_acceptor(temperature)))


register(VariantSpec(
    name="candidates",
    decode=decode_candidates,
    knobs={"mode": "branch_beam", "max_candidates": 4, "branch_top_k": 2, "branch_depth": 6,
           "margin_threshold": -1.0, "fixed_prefix_len": 5, "sparse_max_positions": 4, "adaptive": False,
           "adaptive_budgets": (1, 4, 8), "adaptive_thresholds": (0.85, 0.65), "adaptive_warmup_cycles": 4,
           "adaptive_probe_interval": 16},
    knob_grid=({}, {"mode": "fixed_prefix_rank", "branch_top_k": 4},
               {"mode": "fixed_prefix_rank", "fixed_prefix_len": 1},
               {"mode": "uncertainty_sparse_rank", "branch_top_k": 3, "fixed_prefix_len": 2},
               {"mode": "uncertainty_sparse_rank", "sparse_max_positions": 1, "margin_threshold": 0.5},
               {"margin_threshold": 0.3, "branch_depth": 15}, {"max_candidates": 1},
               {"adaptive": True, "max_candidates": 8, "adaptive_warmup_cycles": 1, "adaptive_probe_interval": 3},
               {"adaptive": True, "adaptive_budgets": (2, 3, 5), "adaptive_thresholds": (0.5, 0.2)}),
    sampling=True,
    description="candidate-solution generator: branch_beam / fixed_prefix_rank / uncertainty_sparse_rank "
                "candidates from one draft pass, adaptive 1/4/8 budget, verified as one packed trie",
))
