"""Multi-round proposals (backlog idea 3): R draft rounds per cycle merged into one tree, exact multi-round
acceptance (greedy here: the argmax path). Round sizes, one round vs two, and the research script's one-position
rounds (`proposal_depth=1`). Cost: draft passes, verified nodes and target forwards per cycle."""
import pytest

from dflash.engine import protocol_costs
from dflash.harness.measure import Variant

CASES = [
    pytest.param((8,), None, id="rounds8"),
    pytest.param((8, 4), None, id="rounds8-4"),
    pytest.param((16,), None, id="rounds16"),
    pytest.param((16, 12), None, id="rounds16-12"),
    pytest.param((16, 12), 1, id="rounds16-12-depth1"),
]


@pytest.mark.ablation("multiround", ci_datasets=("math",))
@pytest.mark.parametrize("round_block_sizes,proposal_depth", CASES)
def test_multiround(case, round_block_sizes, proposal_depth):
    block_size = min(max(round_block_sizes), case.draft_block_size)
    knobs = (("round_block_sizes", round_block_sizes), ("proposal_depth", proposal_depth))
    variant = Variant(f"multiround {round_block_sizes}", block_size=block_size, method="multiround", knobs=knobs)
    _, metrics, gates = case.measure(variant, extra=lambda c: protocol_costs(c.variant))
    case.finish("multiround", {"round_block_sizes": list(round_block_sizes), "proposal_depth": proposal_depth,
                               "block_size": block_size}, metrics, gates)
