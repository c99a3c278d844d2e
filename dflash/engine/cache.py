"""KV-cache helpers that we own, so the engine does not depend on a cache API that moved between versions.

transformers 4.57 `DynamicCache.crop(n)` kept the first n positions (negative n removed |n|); 5.x rejects positive
n and only removes. Removing with a negative count means the same thing in both, so that is all we use.
A model's forward takes the cache as `past_key_values` up to transformers 5.x and as `cache` after (the old name
warns, then goes away in 5.40): `with_cache` passes it under the name the model's forward declares.
"""
from __future__ import annotations

import inspect
from functools import lru_cache

from transformers import DynamicCache


@lru_cache(maxsize=None)
def _cache_keyword(forward_owner: type) -> str:
    parameters = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def with_cache(model, cache) -> dict:
    """The forward keyword argument that hands `cache` to `model`."""
    return {_cache_keyword(type(model)): cache}


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
