"""Tree verification: several draft paths packed into one trie, verified by one target forward.

A draft tree has node 0 = the anchor (the committed token whose position is `start`) and one node per distinct
drafted prefix; `parents[i] < i` for every node i > 0 (topological order) and `parents[0] = -1`. A single draft
block is the chain `parents = [-1, 0, 1, ...]`, so chain verification is the special case of a tree.

The target sees each node at position `start + depth` and attends to the committed cache, to the node's
ancestors and to itself (never to siblings or cousins), so every node's logits equal those of a plain sequential
forward of its root-to-node path. After acceptance the cache keeps the committed prefix plus the K/V entries of
the accepted path only (`compact_cache`), which is exactly the cache a chain forward of that path would leave.
Pure functions: tensors in, tensors out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from . import acceptance as rules
from .cache import with_cache
from .engine import Proposal, Verification
from .errors import DFlashError
from .model import extract_context_feature


@dataclass(frozen=True)
class Trie:
    tokens: torch.Tensor  # [N] long: token of each node (node 0: the anchor)
    parents: torch.Tensor  # [N] long: parent node index (-1 for the root); parents[i] < i
    depths: torch.Tensor  # [N] long: distance from the root (root: 0)

    @property
    def num_nodes(self) -> int:
        return int(self.tokens.numel())


def pack_trie(anchor: int, paths, node_budget: int | None = None) -> tuple[Trie, list[int]]:
    """Deduplicate draft paths (each a token sequence after the anchor) into a trie.

    Paths are inserted in order; with `node_budget` (nodes including the root) a path that does not fit is cut
    to its longest prefix that does, so earlier (preferred) paths keep their full length. Returns the trie and,
    per path, the node index of its last inserted token (0 when nothing of it fit).
    """
    if node_budget is not None and node_budget < 1:
        raise DFlashError(f"node_budget must be >= 1 (the anchor alone), got {node_budget}.")
    tokens, parents, depths = [int(anchor)], [-1], [0]
    children: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    ends = []
    for path in paths:
        node = 0
        for token in (path.tolist() if torch.is_tensor(path) else path):
            key = (node, int(token))
            if key not in children:
                if node_budget is not None and len(tokens) >= node_budget:
                    break
                children[key] = len(tokens)
                tokens.append(int(token))
                parents.append(node)
                depths.append(depths[node] + 1)
            node = children[key]
        ends.append(node)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return Trie(as_long(tokens), as_long(parents), as_long(depths)), ends


def chain_trie(anchor: int, tokens: torch.Tensor) -> Trie:
    """The single-path trie of a linear block (what plain DFlash verifies)."""
    return pack_trie(anchor, [tokens])[0]


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """[N, N] bool: entry (i, j) is True when node j is node i itself or one of its ancestors."""
    n = parents.numel()
    if n == 0 or int(parents[0]) != -1 or any(not 0 <= int(parents[i]) < i for i in range(1, n)):
        raise DFlashError(f"parents {parents.tolist()} is not a topologically ordered tree rooted at node 0 "
                          "(need parents[0] = -1 and 0 <= parents[i] < i); build it with dflash.tree.pack_trie.")
    ancestors = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        ancestors[i] |= ancestors[int(parents[i])]
    return ancestors


def tree_attention_mask(parents: torch.Tensor, past_length: int, dtype: torch.dtype,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Additive 4D mask [1, 1, N, past_length + N] for a target forward over the N tree nodes.

    0 where a node may attend (every cached position, its ancestors, itself), the dtype's minimum elsewhere.
    transformers passes a 4D mask through unchanged, and both the eager and SDPA paths accept an additive one.
    """
    allowed = torch.cat([torch.ones(parents.numel(), past_length, dtype=torch.bool), ancestor_matrix(parents)], 1)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def tree_positions(depths: torch.Tensor, start: int) -> torch.Tensor:
    """[1, N] absolute positions: a node sits where its path would put it in a plain sequence."""
    return (depths + start)[None]


def verify_tree(target, cache: DynamicCache, trie: Trie, start: int, output_hidden_states: bool = False):
    """One target forward over every node of `trie`; the cache (length `start`) grows by N entries.

    Returns the model output: logits [1, N, V] (row i predicts the child of node i) and, if asked, hidden states.
    """
    past = int(cache.get_seq_length())
    if past != start:
        raise DFlashError(f"The target cache holds {past} positions but the tree's anchor sits at {start}: the "
                          "cache must hold exactly the committed text before the anchor.")
    device = target.get_input_embeddings().weight.device
    dtype = target.get_input_embeddings().weight.dtype
    return target(input_ids=trie.tokens[None].to(device), **with_cache(target, cache), use_cache=True,
                  position_ids=tree_positions(trie.depths, start).to(device),
                  attention_mask=tree_attention_mask(trie.parents, start, dtype, device),
                  output_hidden_states=output_hidden_states)


def greedy_tree_accept(trie: Trie, logits: torch.Tensor) -> tuple[list[int], int]:
    """Walk from the root, always into the child whose token is the target's argmax at the parent.

    logits [N, V]: row i is the target's prediction after node i. Returns the accepted path as node indices
    (root first; `len(path) - 1` drafted tokens accepted) and the bonus token, the argmax at the last node.
    In a trie at most one child can match, so this is the longest accepted path among all packed candidates.
    (The walk itself is the engine's rule, dflash.acceptance.greedy_tree_accept, on the trie's nodes 1..N.)
    """
    path, token = rules.greedy_tree_accept(trie.tokens[1:], trie.parents[1:].tolist(), logits)
    return path, int(token)


def compact_cache(cache: DynamicCache, start: int, keep_nodes) -> None:
    """Keep the first `start` positions plus the K/V entries of tree nodes `keep_nodes` (in that order).

    After `verify_tree` the cache is [committed prefix (start) | N node entries]. Keeping the accepted path leaves
    the same cache as a chain forward of that path: RoPE was applied at each node's own position.
    """
    keep = torch.as_tensor(list(keep_nodes), dtype=torch.long)
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise DFlashError(f"Tree verification compacts plain dynamic cache layers only, got "
                              f"{type(layer).__name__} (sliding-window or quantized caches are not supported).")
        index = torch.cat([torch.arange(start), start + keep]).to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, index)
        layer.values = layer.values.index_select(-2, index)


def path_tokens(trie: Trie, path: list[int]) -> list[int]:
    """Drafted tokens along a root-first node path (the root's anchor excluded)."""
    return [int(trie.tokens[node]) for node in path[1:]]


# --- the engine protocol's tree verifier (dflash.engine: Proposal / Verifier) ------------------------------------

def trie_from_proposal(anchor: int, proposal: Proposal) -> Trie:
    """The engine's Proposal (nodes 1..N over the anchor) as a Trie with node 0 = the anchor."""
    parents = torch.tensor([-1] + list(proposal.parents), dtype=torch.long)
    depths = torch.zeros(parents.numel(), dtype=torch.long)
    for node in range(1, parents.numel()):
        depths[node] = depths[int(parents[node])] + 1
    return Trie(torch.cat([torch.tensor([int(anchor)]), proposal.tokens.cpu().long()]), parents, depths)


def node_path(trie: Trie, node: int) -> list[int]:
    """Root-to-node path without the root (the Proposal's branch convention)."""
    path = []
    while node > 0:
        path.append(node)
        node = int(trie.parents[node])
    return path[::-1]


def proposal_from_trie(trie: Trie, ends: list[int], **stats) -> Proposal:
    """A Proposal whose branches are the packed candidates (in candidate order), from `pack_trie`'s output."""
    return Proposal(trie.tokens[1:].clone(), trie.parents[1:].tolist(),
                    branches=[node_path(trie, end) for end in ends], stats=stats)


class TreeVerifier:
    """Verifier plug-in: ONE target forward over every node of the proposal (ancestor-only mask, per-node
    positions); `commit` compacts the cache to the committed prefix, the anchor and the accepted nodes."""

    def verify(self, target, cache, anchor: int, proposal: Proposal, start: int,
               feature_layers: list[int] | None) -> Verification:
        trie = trie_from_proposal(anchor, proposal)
        out = verify_tree(target, cache, trie, start, output_hidden_states=feature_layers is not None)
        features = extract_context_feature(out.hidden_states, feature_layers) if feature_layers is not None else None
        return Verification(out.logits[0], features, verified_nodes=trie.num_nodes, target_forwards=1)

    def commit(self, cache, start: int, path: list[int]) -> None:
        compact_cache(cache, start, path)
