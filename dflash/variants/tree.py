"""Backlog variant 5, tree verification (EAGLE-style candidate packing) for DFlash.

One DFlash draft pass gives per-position laws for the block; the K most likely blocks under them (exact k-best,
the positions being independent in the non-autoregressive draft) are packed into a trie (shared prefixes once,
at most `node_budget` nodes counting the anchor; later candidates are cut first) and verified by ONE target
forward with an ancestor-only mask (dflash.tree.TreeVerifier). Greedy acceptance walks the trie along the
target's argmax, which is the longest accepted path over all candidates; the cache keeps that path's K/V only and
the draft's next context is that path's target features.

Sampling (temperature > 0) is exact: every candidate token is picked deterministically from the draft's logits,
so its law is a point mass, and the multi-round walk (dflash.variants.multiround.MultiRoundAcceptor) is
SpecInfer's recursive rejection over siblings for that case: at a node the children are tried in candidate
order, child x is accepted with the running residual's r(x), a rejection zeroes x and renormalizes, and when
every child is rejected the token is drawn from the last residual. Proven by exact enumeration in
tests/test_acceptance_multiround_tree.py and, for these proposals, tests/test_tree.py. Candidates are built from
the draft's raw logits at every temperature.

The cost is in the trace: `verified_nodes` (packed node count) and `verify_s` per cycle.
`CandidateTreeDrafter` and `decode_tree_variant` are shared with tree_lite and candidates.
"""
from __future__ import annotations

import torch

from ..candidates import k_best_paths
from ..engine import DFlashDrafter, GenerationResult, GreedyAcceptor, Proposal, generate
from ..errors import DFlashError
from ..tree import TreeVerifier, pack_trie, proposal_from_trie
from . import VariantSpec, register
from .multiround import MultiRoundAcceptor


class CandidateTreeDrafter(DFlashDrafter):
    """One draft pass per cycle, then `candidates(logits)` -> candidate blocks, packed into one trie."""

    node_budget: int | None = None

    def candidates(self, logits: torch.Tensor) -> tuple[list[torch.Tensor], list[float]]:
        raise NotImplementedError

    def propose(self, anchor: int, start: int, length: int, context_features: torch.Tensor, temperature: float,
                generator: torch.Generator) -> Proposal:
        logits = self.draft_logits(self.masked_block(anchor, length), start, context_features)
        paths, scores = self.candidates(logits)
        trie, ends = pack_trie(anchor, paths, self.node_budget)
        proposal = proposal_from_trie(trie, ends, draft_passes=1, candidates=len(paths), tree_nodes=trie.num_nodes)
        proposal.stats["candidate_scores"] = [float(s) for s in scores]
        proposal.tokens = proposal.tokens.to(logits.device)
        return proposal


class KBestTreeDrafter(CandidateTreeDrafter):
    def __init__(self, draft, target, candidates: int, node_budget: int | None):
        super().__init__(draft, target)
        self.num_candidates, self.node_budget = candidates, node_budget

    def candidates(self, logits):
        return k_best_paths(logits, self.num_candidates)


def tree_acceptor(temperature: float):
    """Greedy: the argmax walk. Sampling: recursive rejection over point-mass siblings (module docstring)."""
    return GreedyAcceptor() if temperature == 0 else MultiRoundAcceptor(temperature)


def decode_tree_variant(name: str, make_drafter, target, draft, prompt, *, max_new_tokens, block_size,
                        temperature=0.0, seed=None, stop_token_ids=None, acceptor=None) -> GenerationResult:
    """Decode through the engine with a candidate-tree drafter, the one-pass tree verifier and the tree acceptor."""
    if draft is None:
        raise DFlashError(f"The {name} variant needs a DFlash draft model (got None).")
    return generate(target, draft, prompt, max_new_tokens=max_new_tokens, block_size=block_size,
                    temperature=temperature, seed=seed, stop_token_ids=stop_token_ids, drafter=make_drafter(),
                    verifier=TreeVerifier(), acceptor=acceptor or tree_acceptor(temperature))


def decode_tree(target, draft, prompt, *, max_new_tokens, block_size, temperature=0.0, seed=None,
                stop_token_ids=None, candidates=4, node_budget=48) -> GenerationResult:
    if candidates < 1:
        raise DFlashError(f"candidates (draft paths per cycle) must be >= 1, got {candidates}.")
    if node_budget is not None and node_budget < 1:
        raise DFlashError(f"node_budget must be >= 1 (nodes including the anchor) or None, got {node_budget}.")
    return decode_tree_variant("tree", lambda: KBestTreeDrafter(draft, target, candidates, node_budget),
                               target, draft, prompt, max_new_tokens=max_new_tokens, block_size=block_size,
                               temperature=temperature, seed=seed, stop_token_ids=stop_token_ids)


register(VariantSpec(
    name="tree",
    decode=decode_tree,
    knobs={"candidates": 4, "node_budget": 48},
    knob_grid=({}, {"candidates": 1}, {"candidates": 2}, {"candidates": 8, "node_budget": None},
               {"node_budget": 3}, {"node_budget": 20}, {"candidates": 6, "node_budget": 1}),
    sampling=True,
    description="K most likely draft blocks (exact k-best under the draft's per-position laws) packed into a "
                "trie, verified in one target pass with an ancestor-only mask",
))
