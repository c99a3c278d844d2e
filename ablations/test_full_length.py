"""Full-length runs: target-only vs static block sizes at the profile's long generation budget.

TPOT, TTFT, tokens/s, tau, average output tokens, hit-the-cap count, exact-match rate against target-only.
"""
import pytest

from dflash.harness.measure import Variant

MODES = [pytest.param(b, id=f"bs{b}") for b in (1, 8, 16)]


@pytest.mark.ablation("full_length")
@pytest.mark.parametrize("block_size", MODES)
def test_full_length(case, block_size):
    max_new = case.profile.full_length_max_new_tokens
    variant = Variant(f"bs={block_size}", block_size=block_size, use_draft=block_size > 1)
    _, metrics, gates = case.measure(variant, max_new_tokens=max_new)
    metrics["max_new_tokens"] = max_new
    case.finish({"block_size": block_size, "max_new_tokens": max_new}, metrics, gates)
