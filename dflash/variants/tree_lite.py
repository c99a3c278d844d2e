"""Backlog variant 6, tree-lite: branch only the early positions of the non-autoregressive DFlash draft.

Most rejections happen early in the block, and one draft pass already has the alternatives there: the top-k
tokens at each of the first `depth` drafted positions are combined (k^depth branches), each followed by the rest
of the greedy block unchanged (the draft is not re-run per branch, so later tokens are not conditioned on the
branch: the non-AR caveat). The branches are packed into one trie (1 + k + ... + k^depth + k^depth (L-1-depth)
nodes for a block of L) and verified in one target pass; greedy acceptance takes the longest accepted path;
sampling uses the exact tree walk (see dflash.variants.tree).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..errors import DFlashError
from ..registry import Plugins, VariantSpec, register
from .tree import CandidateTreeDrafter, tree_plugins


def early_branch_paths(draft_logits: torch.Tensor, top_k: int, depth: int) -> list[torch.Tensor]:
    """Tree-lite: every combination of the top-k tokens at the first `depth` positions, each followed by the
    rest of the greedy block unchanged (k^depth paths; path 0 is the greedy block)."""
    greedy = draft_logits.argmax(dim=-1)
    depth = min(depth, greedy.numel())
    options = draft_logits.topk(min(top_k, draft_logits.shape[-1]), dim=-1).indices[:depth].tolist()
    return [torch.cat([torch.tensor(choice, dtype=torch.long), greedy[depth:]])
            for choice in itertools.product(*options)] if depth else [greedy]


@dataclass(frozen=True)
class TreeLiteKnobs:
    top_k: int = 2  # alternatives per branched position
    depth: int = 2  # branched positions at the start of the block

    def __post_init__(self):
        if self.top_k < 1 or self.depth < 0:
            raise DFlashError(f"tree_lite needs top_k >= 1 and depth >= 0, got top_k={self.top_k}, "
                              f"depth={self.depth}.")
        if self.top_k ** min(self.depth, 16) > 4096:
            raise DFlashError(f"tree_lite with top_k={self.top_k}, depth={self.depth} packs "
                              f"{self.top_k}^{self.depth} branches; keep top_k^depth <= 4096 (e.g. top_k=2, "
                              "depth <= 12).")


def make_plugins(draft, target, knobs: TreeLiteKnobs, temperature: float) -> Plugins:
    def candidates(logits):
        paths = early_branch_paths(logits, knobs.top_k, knobs.depth)
        return paths, [0.0] * len(paths)
    return tree_plugins(CandidateTreeDrafter(draft, target, candidates), temperature)


register(VariantSpec(
    name="tree_lite",
    knob_class=TreeLiteKnobs,
    make_plugins=make_plugins,
    knob_grid=({}, {"depth": 0}, {"depth": 1}, {"depth": 4}, {"top_k": 1}, {"top_k": 3, "depth": 3}),
    sampling=True,
    draft_temperature=False,
    description="top-k alternatives at the first `depth` drafted positions, the rest of the greedy block after "
                "each branch; one packed target pass",
))
