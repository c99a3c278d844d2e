"""Verifier plug-ins: run the target over a Proposal, then leave its cache holding exactly the committed text.

`LinearVerifier` (the default) verifies a chain with one plain causal forward. `TreeVerifier` verifies any tree
with ONE forward: each node sits at position `start + depth` and attends to the committed cache, its ancestors
and itself (never to siblings or cousins), so every node's logits equal those of a plain sequential forward of its
path. After acceptance `compact_cache` keeps the committed prefix plus the accepted path's K/V entries only,
which is exactly the cache a chain forward of that path would leave (RoPE was applied at each node's own
position).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..errors import DFlashError
from ..model import extract_context_feature
from .cache import cache_length, crop_cache, with_cache
from .protocol import Proposal, Verification


def context_features(out, feature_layers: list[int] | None) -> torch.Tensor | None:
    """The draft's context features of a target forward's positions (None: no draft to feed)."""
    return extract_context_feature(out.hidden_states, feature_layers) if feature_layers is not None else None


def check_cache_at(cache, start: int) -> None:
    if cache_length(cache) != start:
        raise DFlashError(f"The target cache holds {cache_length(cache)} positions but the anchor sits at {start}: "
                          "the cache must hold exactly the committed text before the anchor.")


class LinearVerifier:
    """A chain: one causal forward over [anchor, drafted tokens]; `commit` crops the rejected tail."""

    def verify(self, target, cache, anchor: int, proposal: Proposal, start: int,
               feature_layers: list[int] | None) -> Verification:
        if not proposal.is_chain:
            raise DFlashError("LinearVerifier verifies one chain; verify a tree with "
                              "dflash.engine.verifiers.TreeVerifier (one forward, ancestor-only mask).")
        check_cache_at(cache, start)
        device = target.get_input_embeddings().weight.device
        ids = torch.cat([torch.tensor([anchor], device=device), proposal.tokens.to(device)])
        out = target(input_ids=ids[None], **with_cache(target, cache), use_cache=True,
                     output_hidden_states=feature_layers is not None)
        return Verification(out.logits[0], context_features(out, feature_layers), ids.numel(), 1)

    def commit(self, cache, start: int, path: list[int]) -> None:
        crop_cache(cache, start + len(path))  # a chain's accepted path is its first len(path) nodes


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask as an additive float one (0 where allowed, the dtype's minimum elsewhere): both the
    SDPA and the eager attention of transformers read it right, and a 4D mask is passed through unchanged."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                       torch.finfo(dtype).min)


def tree_attention_mask(proposal: Proposal, past_length: int, dtype: torch.dtype,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Additive 4D mask [1, 1, N+1, past_length + N+1] for a target forward over the tree's nodes 0..N.

    A node may attend to every cached position, its ancestors and itself.
    """
    ancestors = proposal.ancestors()
    allowed = torch.cat([torch.ones(ancestors.shape[0], past_length, dtype=torch.bool), ancestors], 1)
    return additive_mask(allowed[None, None].to(device), dtype)


def verify_tree(target, cache: DynamicCache, anchor: int, proposal: Proposal, start: int,
                output_hidden_states: bool = False):
    """One target forward over the anchor and every drafted node; the cache (length `start`) grows by N+1.

    Returns the model output: logits [1, N+1, V] (row i predicts the child of node i) and, if asked, hidden states.
    """
    check_cache_at(cache, start)
    embeddings = target.get_input_embeddings().weight
    ids = torch.cat([torch.tensor([int(anchor)]), proposal.tokens.cpu().long()])
    positions = torch.tensor(proposal.depths(), dtype=torch.long) + start
    return target(input_ids=ids[None].to(embeddings.device), **with_cache(target, cache), use_cache=True,
                  position_ids=positions[None].to(embeddings.device),
                  attention_mask=tree_attention_mask(proposal, start, embeddings.dtype, embeddings.device),
                  output_hidden_states=output_hidden_states)


def compact_cache(cache: DynamicCache, start: int, keep_nodes) -> None:
    """Keep the first `start` positions plus the K/V entries of tree nodes `keep_nodes` (in that order).

    After `verify_tree` the cache is [committed prefix (start) | node 0 .. node N]; keeping the accepted path leaves
    the same cache as a chain forward of that path.
    """
    keep = torch.as_tensor(list(keep_nodes), dtype=torch.long)
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise DFlashError(f"Tree verification compacts plain dynamic cache layers only, got "
                              f"{type(layer).__name__} (sliding-window or quantized caches are not supported).")
        index = torch.cat([torch.arange(start), start + keep]).to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, index)
        layer.values = layer.values.index_select(-2, index)


class TreeVerifier:
    """ONE target forward over every node of the proposal (ancestor-only mask, per-node positions); `commit`
    compacts the cache to the committed prefix, the anchor and the accepted nodes."""

    def verify(self, target, cache, anchor: int, proposal: Proposal, start: int,
               feature_layers: list[int] | None) -> Verification:
        out = verify_tree(target, cache, anchor, proposal, start, output_hidden_states=feature_layers is not None)
        return Verification(out.logits[0], context_features(out, feature_layers), verified_nodes=proposal.size + 1,
                            target_forwards=1)

    def commit(self, cache, start: int, path: list[int]) -> None:
        compact_cache(cache, start, path)
