"""Per-cycle profiling at the draft's trained block size: draft / verify / other time shares, and tau against
the token index (does acceptance drift along a generation?)."""
import pytest

from dflash.harness.measure import Variant, cycle_trace, profiling_metrics


@pytest.mark.ablation("profiling")
def test_cycle_profile(case):
    block_size = case.draft_block_size
    variant = Variant(f"bs={block_size}", block_size=block_size)
    _, metrics, gates = case.measure(variant, extra=lambda c: {**profiling_metrics(c.variant),
                                                           "cycle_trace": cycle_trace(c.variant)})
    case.finish({"block_size": block_size}, metrics, gates)
