"""Backlog variant 5, tree verification (EAGLE-style candidate packing) for DFlash.

One DFlash draft pass gives per-position laws for the block; the K most likely blocks under them (exact k-best,
the positions being independent in the non-autoregressive draft) are packed into a trie (shared prefixes once,
at most `node_budget` nodes counting the anchor; later candidates are cut first) and verified by ONE target
forward with an ancestor-only mask (dflash.engine.verifiers.TreeVerifier). Greedy acceptance walks the trie along
the target's argmax, which is the longest accepted path over all candidates; the cache keeps that path's K/V only
and the draft's next context is that path's target features.

Sampling (temperature > 0) is exact: every candidate token is picked deterministically from the draft's logits,
so its law is a point mass, and the tree walk (dflash.engine.acceptors.TreeSamplingAcceptor) is SpecInfer's
recursive rejection over siblings for that case: at a node the children are tried in candidate order, child x is
accepted with the running residual's r(x), a rejection zeroes x and renormalizes, and when every child is rejected
the token is drawn from the last residual. Proven by exact enumeration in tests/test_acceptance_multiround_tree.py
and, for these proposals, tests/test_tree.py. Candidates are built from the draft's raw logits at every
temperature, so `draft_temperature` does not apply (the registry refuses it).

The cost is in the trace: `verified_nodes` (packed node count) and `verify_s` per cycle.
`CandidateTreeDrafter` and `tree_plugins` are shared with tree_lite and candidates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..engine import DFlashDrafter, Proposal, TreeVerifier, default_acceptor
from ..errors import DFlashError
from ..registry import Plugins, VariantSpec, register

Candidates = Callable[[torch.Tensor], tuple[list[torch.Tensor], list[float]]]  # draft logits -> blocks, scores


class CandidateTreeDrafter(DFlashDrafter):
    """One draft pass per cycle; `candidates(logits)` builds candidate blocks from it, packed into one trie."""

    def __init__(self, draft, target, candidates: Candidates, node_budget: int | None = None):
        super().__init__(draft, target)
        self.candidates, self.node_budget = candidates, node_budget

    def propose(self, anchor: int, start: int, length: int, context_features: torch.Tensor, temperature: float,
                generator: torch.Generator) -> Proposal:
        logits = self.draft_logits(self.masked_block(anchor, length), start, context_features)
        paths, scores = self.candidates(logits)
        proposal = Proposal.from_chains(paths, node_budget=self.node_budget, draft_passes=1, candidates=len(paths))
        proposal.stats.update(tree_nodes=proposal.size + 1, candidate_scores=[float(s) for s in scores])
        proposal.tokens = proposal.tokens.to(logits.device)
        return proposal


def tree_plugins(drafter: DFlashDrafter, temperature: float) -> Plugins:
    """A candidate-tree drafter with the one-pass tree verifier and the tree acceptor."""
    return Plugins(drafter, TreeVerifier(), default_acceptor(temperature, tree=True))


def k_best_paths(draft_logits: torch.Tensor, num_paths: int) -> tuple[list[torch.Tensor], list[float]]:
    """The `num_paths` most likely blocks under the draft's per-position (independent) laws, best first.

    Beam search over positions with per-position top-`num_paths` options; because the draft's positions are
    independent, the beam keeps the exact k best joint log-probabilities. Path 0 is the greedy block.
    """
    logp = torch.log_softmax(draft_logits.double(), dim=-1)
    k = min(num_paths, logp.shape[-1])
    options = logp.topk(k, dim=-1)
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    for j in range(logp.shape[0]):
        expanded = [(tokens + [int(options.indices[j, r])], score + float(options.values[j, r]))
                    for tokens, score in beams for r in range(k)]
        beams = sorted(expanded, key=lambda beam: -beam[1])[:num_paths]  # stable: ties keep lower ranks first
    return [torch.tensor(tokens, dtype=torch.long) for tokens, _ in beams], [score for _, score in beams]




@dataclass(frozen=True)
class TreeKnobs:
    candidates: int = 4  # draft blocks per cycle
    node_budget: int | None = 48  # nodes counting the anchor; None: no cap

    def __post_init__(self):
        if self.candidates < 1:
            raise DFlashError(f"candidates (draft paths per cycle) must be >= 1, got {self.candidates}.")
        if self.node_budget is not None and self.node_budget < 1:
            raise DFlashError(f"node_budget must be >= 1 (nodes including the anchor) or None, got "
                              f"{self.node_budget}.")


def make_plugins(draft, target, knobs: TreeKnobs, temperature: float) -> Plugins:
    drafter = CandidateTreeDrafter(draft, target, lambda logits: k_best_paths(logits, knobs.candidates),
                                   knobs.node_budget)
    return tree_plugins(drafter, temperature)


register(VariantSpec(
    name="tree",
    knob_class=TreeKnobs,
    make_plugins=make_plugins,
    knob_grid=({}, {"candidates": 1}, {"candidates": 2}, {"candidates": 8, "node_budget": None},
               {"node_budget": 3}, {"node_budget": 20}, {"candidates": 6, "node_budget": 1}),
    sampling=True,
    draft_temperature=False,
    description="K most likely draft blocks (exact k-best under the draft's per-position laws) packed into a "
                "trie, verified in one target pass with an ancestor-only mask",
))
