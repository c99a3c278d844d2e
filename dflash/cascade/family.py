"""The adaptive-cascades ablation family: every policy of a ladder, replayed on the run's table and gated on
per-query accuracy against its baseline (cost is reported; CascadeCase.cost_not_gated says why). It runs on the
profiles that name a ladder (dflash.profiles)."""
from __future__ import annotations

from ..harness.family import FamilySpec, profiles_naming, register_family
from .ablation import CascadeCase
from .report import cascade_table

CASCADE = register_family(FamilySpec(
    name="cascade", display_name="Adaptive cascades", fixture="cascade_case", params=profiles_naming("ladder"),
    make_case=CascadeCase.on_part("ladder"), renderers={"cascade": cascade_table},
    titles={"cascade": "Adaptive cascades"}, baseline_kind="outcomes", session="main",
    description="optimal stopping over a model ladder, replayed exactly on one collected table"))
