"""The research-backlog variants, each a small module that decodes through the engine's one protocol.

A module registers a `VariantSpec`; the registry drives the parametrized lossless test
(tests/test_lossless_variants.py), the per-variant pytest fixtures (`variant_<name>`, from the harness plugin)
and the ablations (`Variant(method=name, knobs=...)` in dflash.harness.measure). Modules in this package are
discovered on import, so adding a variant touches no shared file.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

from ..engine import GenerationResult


@dataclass(frozen=True)
class VariantSpec:
    """One backlog idea. `decode(target, draft, prompt, *, max_new_tokens, block_size, stop_token_ids,
    temperature, seed, **knobs) -> GenerationResult` must reproduce target-only greedy output at temperature 0."""
    name: str
    decode: Callable[..., GenerationResult]
    knobs: dict = field(default_factory=dict)  # defaults; every knob has a liveness test
    knob_grid: tuple = ({},)  # knob settings the lossless property test draws from (merged over `knobs`)
    sampling: bool = False  # supports temperature > 0 (and then has an exact-enumeration test)
    unavailable: Callable[[], str | None] = staticmethod(lambda: None)  # why it cannot run here (one line)
    description: str = ""


VARIANTS: dict[str, VariantSpec] = {}


def register(spec: VariantSpec) -> VariantSpec:
    if spec.name in VARIANTS:
        raise ValueError(f"variant {spec.name!r} registered twice")
    VARIANTS[spec.name] = spec
    return spec


def get_variant(name: str) -> VariantSpec:
    from ..errors import DFlashError
    if name not in VARIANTS:
        raise DFlashError(f"Unknown variant {name!r}; choose one of {', '.join(sorted(VARIANTS))}.")
    return VARIANTS[name]


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
