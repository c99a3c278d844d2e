"""Candidate diversity for multi-round proposals (backlog idea 7): three proposals per cycle from one draft pass,
diversified by rank swaps at every uncertain position, by single sparse swaps, or by block length, verified as
one tree (and the sparse tree verified branch by branch, to show what the packed verification saves). Cost:
tree nodes, verified nodes and target forwards per cycle."""
from dataclasses import dataclass

import pytest

from dflash.engine import protocol_costs
from dflash.harness.ablation_cases import KnobCase, as_params
from dflash.harness.measure import Variant

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Diversity(KnobCase):
    diversity: str
    ranks: int
    verifier: str = "tree"


CASES = [Diversity("ranks1", "sparse", 1), Diversity("block_sizes-3", "block_sizes", 3), Diversity("rank-3", "rank", 3),
         Diversity("sparse-3", "sparse", 3), Diversity("sparse-3-linear", "sparse", 3, verifier="linear")]


@pytest.mark.ablation("candidate_diversity", ci_datasets=("math",))
@pytest.mark.parametrize("knobs", as_params(CASES))
def test_candidate_diversity(case, knobs):
    block_size = min(BLOCK_SIZE, case.draft_block_size)
    variant = Variant(f"diversity {knobs.id}", block_size=block_size, method="candidate_diversity",
                      knobs=knobs.knobs())
    _, metrics, gates = case.measure(variant, extra=lambda c: protocol_costs(c.variant))
    case.finish(knobs.params(block_size=block_size), metrics, gates)
