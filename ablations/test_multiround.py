"""Multi-round proposals (backlog idea 3): R draft rounds per cycle merged into one tree, exact multi-round
acceptance (greedy here: the argmax path). Round sizes, one round vs two, and the research script's one-position
rounds (`proposal_depth=1`). Cost: draft passes, verified nodes and target forwards per cycle."""
from dataclasses import dataclass

import pytest

from dflash.engine import protocol_costs
from dflash.harness.ablation_cases import KnobCase, as_params
from dflash.harness.measure import Variant


@dataclass(frozen=True)
class Rounds(KnobCase):
    round_block_sizes: tuple[int, ...]
    proposal_depth: int | None = None


CASES = [Rounds("rounds8", (8,)), Rounds("rounds8-4", (8, 4)), Rounds("rounds16", (16,)),
         Rounds("rounds16-12", (16, 12)), Rounds("rounds16-12-depth1", (16, 12), proposal_depth=1)]


@pytest.mark.ablation("multiround", ci_datasets=("math",))
@pytest.mark.parametrize("knobs", as_params(CASES))
def test_multiround(case, knobs):
    block_size = min(max(knobs.round_block_sizes), case.draft_block_size)
    variant = Variant(f"multiround {knobs.id}", block_size=block_size, method="multiround", knobs=knobs.knobs())
    _, metrics, gates = case.measure(variant, extra=lambda c: protocol_costs(c.variant))
    case.finish(knobs.params(block_size=block_size), metrics, gates)
