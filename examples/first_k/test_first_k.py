"""Ablation of the example idea: k = 2, 4, 8 proposed tokens of a 16-token draft block, gated like every case."""
from dataclasses import dataclass

import first_k  # noqa: F401  (registers the variant)
import pytest

from dflash.engine import protocol_costs
from dflash.harness.ablation_cases import KnobCase, as_params
from dflash.harness.measure import Variant


@dataclass(frozen=True)
class FirstK(KnobCase):
    k: int


@pytest.mark.ablation("first_k", ci_datasets=("math",))
@pytest.mark.parametrize("knobs", as_params([FirstK("k2", 2), FirstK("k4", 4), FirstK("k8", 8)]))
def test_first_k(case, knobs):
    block_size = min(16, case.draft_block_size)
    variant = Variant(f"first_k {knobs.id}", block_size=block_size, method="first_k", knobs=knobs.knobs())
    _, metrics, gates = case.measure(variant, extra=lambda c: protocol_costs(c.variant))  # + cost per cycle
    case.finish(knobs.params(block_size=block_size), metrics, gates)
