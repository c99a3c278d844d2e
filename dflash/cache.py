"""KV-cache helpers that we own, so the engine does not depend on a cache API that moved between versions.

transformers 4.57 `DynamicCache.crop(n)` kept the first n positions (negative n removed |n|); 5.x rejects positive
n and only removes. Removing with a negative count means the same thing in both, so that is all we use.
"""
from __future__ import annotations

from transformers import DynamicCache


def new_cache(config=None) -> DynamicCache:
    """An empty dynamic cache; with a model config, layers are laid out the way that model expects."""
    return DynamicCache(config=config) if config is not None else DynamicCache()


def cache_length(cache: DynamicCache) -> int:
    return int(cache.get_seq_length())


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of every layer."""
    current = cache_length(cache)
    if length < 0 or length > current:
        raise ValueError(f"cannot crop a cache of {current} positions to {length}")
    if length < current:
        cache.crop(length - current)
