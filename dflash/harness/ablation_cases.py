"""Ablation cases as dataclasses (vLLM's spec-decode tests style): one frozen dataclass per ablation whose fields
are the knobs its cases set, each declared once. `id` is the pytest id, and so part of the case's baseline key;
`knobs()` goes to `Variant(knobs=...)` and `params()` to `case.finish`, so no knob name is spelled twice.

    @dataclass(frozen=True)
    class Refinement(KnobCase):
        steps: int
        selective: bool = False

    @pytest.mark.parametrize("knobs", as_params([Refinement("steps2", 2), Refinement("steps2-selective", 2, True)]))
    def test_refinement(case, knobs): ...
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import pytest


@dataclass(frozen=True)
class KnobCase:
    id: str

    def knobs(self) -> tuple[tuple[str, object], ...]:
        """(name, value) of every knob field, in declaration order."""
        return tuple((f.name, getattr(self, f.name)) for f in fields(self) if f.name != "id")

    def params(self, **more) -> dict:
        """The knobs as a record's params, plus whatever the case adds (e.g. the block size it ran)."""
        return {**dict(self.knobs()), **more}


def as_params(cases) -> list:
    """pytest.param(case, id=case.id) for each case; ids must be unique (they are baseline keys)."""
    ids = [case.id for case in cases]
    if len(set(ids)) != len(ids):
        raise ValueError(f"ablation case ids repeat: {sorted(i for i in ids if ids.count(i) > 1)}")
    return [pytest.param(case, id=case.id) for case in cases]
