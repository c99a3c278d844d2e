"""Suffix recycling (backlog idea 4): the rejected draft suffix as next cycle's block inputs. The research
script's dense and sparse placements (sparse with its 2-token budget), the aligned placement, and aligned with a
confidence gate, against none (plain DFlash). Cost metric: seeded tokens per cycle."""
from dataclasses import dataclass

import pytest

from dflash.engine import protocol_costs
from dflash.harness.ablation_cases import KnobCase, as_params
from dflash.harness.measure import Variant

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Recycling(KnobCase):
    mode: str
    min_confidence: float = 0.0
    max_seed_tokens: int = -1


CASES = [Recycling("none", "none"), Recycling("dense", "dense"), Recycling("sparse-max2", "sparse", max_seed_tokens=2),
         Recycling("aligned", "aligned"), Recycling("aligned-conf0.9", "aligned", min_confidence=0.9)]


@pytest.mark.ablation("suffix_recycling", ci_datasets=("math",))
@pytest.mark.parametrize("knobs", as_params(CASES))
def test_suffix_recycling(case, knobs):
    block_size = min(BLOCK_SIZE, case.draft_block_size)
    variant = Variant(f"suffix {knobs.id}", block_size=block_size, method="suffix_recycling", knobs=knobs.knobs())
    _, metrics, gates = case.measure(variant, extra=lambda c: protocol_costs(c.variant))
    case.finish(knobs.params(block_size=block_size), metrics, gates)
