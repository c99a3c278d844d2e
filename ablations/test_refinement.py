"""Multi-step draft refinement (backlog idea 5): 1, 2 and 3 full-block passes with the draft cache kept exact,
selective re-masking of positions below probability 0.9, and the research version (uncached passes that see only
the last cycle's context). Cost: draft passes and rewritten positions per cycle."""
import pytest

from dflash.engine import protocol_costs
from dflash.harness.measure import Variant

BLOCK_SIZE = 16
CASES = [
    pytest.param(1, False, False, id="steps1"),
    pytest.param(2, False, False, id="steps2"),
    pytest.param(3, False, False, id="steps3"),
    pytest.param(2, True, False, id="steps2-selective"),
    pytest.param(2, False, True, id="steps2-research"),
]


@pytest.mark.ablation("refinement", ci_datasets=("math",))
@pytest.mark.parametrize("steps,selective,research_compat", CASES)
def test_refinement(case, steps, selective, research_compat):
    block_size = min(BLOCK_SIZE, case.draft_block_size)
    knobs = (("steps", steps), ("selective", selective), ("threshold", 0.9), ("research_compat", research_compat))
    variant = Variant(f"refinement steps={steps}", block_size=block_size, method="refinement", knobs=knobs)
    _, metrics, gates = case.measure(variant, extra=lambda c: protocol_costs(c.variant))
    case.finish("refinement", {"steps": steps, "selective": selective, "research_compat": research_compat,
                               "block_size": block_size}, metrics, gates)
