"""Suffix recycling (backlog idea 4): the rejected draft suffix as next cycle's block inputs. The research
script's dense and sparse placements (sparse with its 2-token budget), the aligned placement, and aligned with a
confidence gate, against none (plain DFlash). Cost metric: seeded tokens per cycle."""
import pytest

from dflash.engine import protocol_costs
from dflash.harness.measure import Variant

BLOCK_SIZE = 16
CASES = [
    pytest.param("none", 0.0, -1, id="none"),
    pytest.param("dense", 0.0, -1, id="dense"),
    pytest.param("sparse", 0.0, 2, id="sparse-max2"),
    pytest.param("aligned", 0.0, -1, id="aligned"),
    pytest.param("aligned", 0.9, -1, id="aligned-conf0.9"),
]


@pytest.mark.ablation("suffix_recycling", ci_datasets=("math",))
@pytest.mark.parametrize("mode,min_confidence,max_seed_tokens", CASES)
def test_suffix_recycling(case, mode, min_confidence, max_seed_tokens):
    block_size = min(BLOCK_SIZE, case.draft_block_size)
    knobs = (("mode", mode), ("min_confidence", min_confidence), ("max_seed_tokens", max_seed_tokens))
    variant = Variant(f"suffix {mode}", block_size=block_size, method="suffix_recycling", knobs=knobs)
    _, metrics, gates = case.measure(variant, extra=lambda c: protocol_costs(c.variant))
    case.finish("suffix_recycling", {"mode": mode, "min_confidence": min_confidence,
                                     "max_seed_tokens": max_seed_tokens, "block_size": block_size}, metrics, gates)
