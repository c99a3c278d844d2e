"""Backlog variant 6, tree-lite: branch only the early positions of the non-autoregressive DFlash draft.

Most rejections happen early in the block, and one draft pass already has the alternatives there: the top-k
tokens at each of the first `depth` drafted positions are combined (k^depth branches), each followed by the rest
of the greedy block unchanged (the draft is not re-run per branch, so later tokens are not conditioned on the
branch: the non-AR caveat). The branches are packed into one trie (1 + k + ... + k^depth + k^depth (L-1-depth)
nodes for a block of L) and verified in one target pass (dflash.tree.TreeVerifier); greedy acceptance takes the
longest accepted path; sampling uses the exact tree walk of dflash.variants.tree.
"""
from __future__ import annotations

from ..candidates import early_branch_paths
from ..errors import DFlashError
from . import VariantSpec, register
from .tree import CandidateTreeDrafter, decode_tree_variant


class EarlyBranchDrafter(CandidateTreeDrafter):
    def __init__(self, draft, target, top_k: int, depth: int):
        super().__init__(draft, target)
        self.top_k, self.depth = top_k, depth

    def candidates(self, logits):
        paths = early_branch_paths(logits, self.top_k, self.depth)
        return paths, [0.0] * len(paths)


def decode_tree_lite(target, draft, prompt, *, max_new_tokens, block_size, temperature=0.0, seed=None,
                     stop_token_ids=None, top_k=2, depth=2):
    if top_k < 1 or depth < 0:
        raise DFlashError(f"tree_lite needs top_k >= 1 and depth >= 0, got top_k={top_k}, depth={depth}.")
    if top_k ** min(depth, 16) > 4096:
        raise DFlashError(f"tree_lite with top_k={top_k}, depth={depth} packs {top_k}^{depth} branches; keep "
                          "top_k^depth <= 4096 (e.g. top_k=2, depth <= 12).")
    return decode_tree_variant("tree_lite", lambda: EarlyBranchDrafter(draft, target, top_k, depth),
                               target, draft, prompt, max_new_tokens=max_new_tokens, block_size=block_size,
                               temperature=temperature, seed=seed, stop_token_ids=stop_token_ids)


register(VariantSpec(
    name="tree_lite",
    decode=decode_tree_lite,
    knobs={"top_k": 2, "depth": 2},
    knob_grid=({}, {"depth": 0}, {"depth": 1}, {"depth": 4}, {"top_k": 1}, {"top_k": 3, "depth": 3}),
    sampling=True,
    description="top-k alternatives at the first `depth` drafted positions, the rest of the greedy block after "
                "each branch; one packed target pass",
))
