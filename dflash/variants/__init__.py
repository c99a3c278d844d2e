"""The research-backlog variants: each module here is one idea, written as engine plug-ins.

A module declares its knobs once (a dataclass with defaults and validation), a `make_plugins(draft, target,
knobs, temperature)` that builds its drafter / verifier / acceptor, and registers both as a
`dflash.registry.VariantSpec`. The registry drives the parametrized lossless test
(tests/test_lossless_variants.py), the per-variant pytest fixtures (`variant_<name>`, from the harness plugin) and
the ablations (`Variant(method=name, knobs=...)` in dflash.harness.measure). Modules here and in dflash.backends
are discovered on import, so adding a variant touches no shared file.
"""
from __future__ import annotations

import importlib
import pkgutil

from .. import backends
from ..registry import VARIANTS, VariantSpec, get_variant, register

__all__ = ["VARIANTS", "VariantSpec", "get_variant", "register"]

for _package, _path in ((__name__, __path__), (backends.__name__, backends.__path__)):
    for _module in pkgutil.iter_modules(_path):
        importlib.import_module(f"{_package}.{_module.name}")
