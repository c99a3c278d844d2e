"""Block-size sweep: target-only (bs=1) and static block sizes, per dataset.

The seed's table: block size, runs, speedup mean and range, tau mean, with confidence intervals.
"""
import pytest

from dflash.harness.measure import Variant

BLOCK_SIZES = [pytest.param(b, id=f"bs{b}") for b in (1, 2, 4, 8, 12, 16)]  # every shipped draft has B = 16


@pytest.mark.ablation("block_size")
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_block_size(case, block_size):
    if block_size > case.draft_block_size:
        pytest.skip(f"the draft was trained for block sizes up to {case.draft_block_size}")
    variant = Variant(f"bs={block_size}", block_size=block_size, use_draft=block_size > 1)
    _, metrics, gates = case.measure(variant)
    case.finish({"block_size": block_size}, metrics, gates)
