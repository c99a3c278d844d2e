"""Candidate diversity for multi-round proposals (backlog idea 7): three proposals per cycle from one draft pass,
diversified by rank swaps at every uncertain position, by single sparse swaps, or by block length, verified as
one tree (and the sparse tree verified branch by branch, to show what the packed verification saves). Cost:
tree nodes, verified nodes and target forwards per cycle."""
import pytest

from dflash.engine import protocol_costs
from dflash.harness.measure import Variant

BLOCK_SIZE = 16
CASES = [
    pytest.param("sparse", 1, "tree", id="ranks1"),
    pytest.param("block_sizes", 3, "tree", id="block_sizes-3"),
    pytest.param("rank", 3, "tree", id="rank-3"),
    pytest.param("sparse", 3, "tree", id="sparse-3"),
    pytest.param("sparse", 3, "linear", id="sparse-3-linear"),
]


@pytest.mark.ablation("candidate_diversity", ci_datasets=("math",))
@pytest.mark.parametrize("diversity,ranks,verifier", CASES)
def test_candidate_diversity(case, diversity, ranks, verifier):
    block_size = min(BLOCK_SIZE, case.draft_block_size)
    knobs = (("diversity", diversity), ("ranks", ranks), ("verifier", verifier))
    variant = Variant(f"diversity {diversity}", block_size=block_size, method="candidate_diversity", knobs=knobs)
    _, metrics, gates = case.measure(variant, extra=lambda c: protocol_costs(c.variant))
    case.finish("candidate_diversity", {"diversity": diversity, "ranks": ranks, "verifier": verifier,
                                        "block_size": block_size}, metrics, gates)
