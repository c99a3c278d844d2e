"""Multi-step draft refinement (backlog idea 5): 1, 2 and 3 full-block passes with the draft cache kept exact,
selective re-masking of positions below probability 0.9, and the research version (uncached passes that see only
the last cycle's context). Cost: draft passes and rewritten positions per cycle."""
from dataclasses import dataclass

import pytest

from dflash.engine import protocol_costs
from dflash.harness.ablation_cases import KnobCase, as_params
from dflash.harness.measure import Variant

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Refinement(KnobCase):
    steps: int
    selective: bool = False
    threshold: float = 0.9
    research_compat: bool = False


CASES = [Refinement("steps1", 1), Refinement("steps2", 2), Refinement("steps3", 3),
         Refinement("steps2-selective", 2, selective=True), Refinement("steps2-research", 2, research_compat=True)]


@pytest.mark.ablation("refinement", ci_datasets=("math",))
@pytest.mark.parametrize("knobs", as_params(CASES))
def test_refinement(case, knobs):
    block_size = min(BLOCK_SIZE, case.draft_block_size)
    variant = Variant(f"refinement {knobs.id}", block_size=block_size, method="refinement", knobs=knobs.knobs())
    _, metrics, gates = case.measure(variant, extra=lambda c: protocol_costs(c.variant))
    case.finish(knobs.params(block_size=block_size), metrics, gates)
