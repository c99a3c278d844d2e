"""The decode family: DFlash decoding through the engine, every research variant and backend against
target-only, lossless, gated on tau and throughput. Its fixture `case` is parametrized over the run's profiles and
their datasets (GPU profiles carry the gpu marker); a new idea's ablation (dflash.variants, examples/first_k)
needs no table of its own."""
from __future__ import annotations

import pytest

from ..profiles import PROFILES
from . import decode_tables as tables
from .decode_case import DecodeCase
from .family import FamilyParam, FamilySpec, register_family
from .plots import decode_plots


def params(profiles) -> list[FamilyParam]:
    found = []
    for name in profiles:
        profile = PROFILES[name]
        marks = (pytest.mark.gpu,) if profile.needs_cuda else ()
        found += [FamilyParam((name, spec.name), f"{name}-{spec.name}", name, spec.name, marks)
                  for spec in profile.datasets]
    return found


def make_case(request, state, family, param: FamilyParam) -> DecodeCase:
    profile_name, dataset = param.value
    return DecodeCase(request, state, state.profile(profile_name), family, dataset)


DECODE = register_family(FamilySpec(
    name="decode", display_name="DFlash decoding", fixture="case", params=params, make_case=make_case,
    renderers={"block_size": tables.block_size_table, "full_length": tables.full_length_table,
               "dynamic": tables.dynamic_table, "profiling": tables.profiling_tables,
               "batched": tables.batched_table, "peers": tables.peers_table,
               **dict.fromkeys(("multiround", "suffix_recycling", "refinement", "candidate_diversity",
                                "tree_variants"), tables.protocol_variant_table)},
    titles=tables.TITLES, default_renderer=tables.default_renderer, plots=decode_plots, baseline_kind="decode",
    session="main", description="a variant or backend against target-only on the profile's prompts (lossless)"))
