"""Candidate diversity for multi-round proposals (backlog idea 7).

Plain multi-round rounds are nearly the same block (they differ only in trailing masks), so extra rounds mostly
add cost. Here round r diversifies at the draft's uncertain positions (top-1 minus top-2 probability <=
`margin_threshold`): "rank" puts the rank-(r+1) token at every uncertain position; "sparse" swaps only the r-th
most uncertain position to its rank-2 token and keeps the rest of the block; "block_sizes" gives round r the
block length L - 4r of the cycle's length L instead (no swaps). Every round is drafted for the same anchor from one draft pass per block
length, merged into a tree, verified, and accepted by the exact multi-round walk (dflash.variants.multiround).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import DFlashError
from ..registry import Plugins, VariantSpec, register
from . import multiround

MODES = ("rank", "sparse", "block_sizes")


@dataclass(frozen=True)
class CandidateDiversityKnobs:
    diversity: str = "sparse"  # MODES (module docstring)
    ranks: int = 3  # proposals per cycle
    margin_threshold: float = 1.0  # a position is uncertain when its top-1 - top-2 probability is <= this
    verifier: str = "tree"  # multiround.VERIFIERS

    def __post_init__(self):
        if self.diversity not in MODES:
            raise DFlashError(f"Unknown diversity mode {self.diversity!r}; choose one of {', '.join(MODES)}.")
        if self.ranks < 1:
            raise DFlashError(f"ranks (proposals per cycle) must be >= 1, got {self.ranks}.")
        if self.verifier not in multiround.VERIFIERS:
            raise DFlashError(f"Unknown verifier {self.verifier!r}; choose one of "
                              f"{', '.join(multiround.VERIFIERS)}.")


def make_plugins(draft, target, knobs: CandidateDiversityKnobs, temperature: float) -> Plugins:
    rounds = multiround.MultiRoundKnobs(round_block_sizes=(draft.block_size,) * knobs.ranks,  # capped per cycle
                                        diversity=knobs.diversity, margin_threshold=knobs.margin_threshold,
                                        verifier=knobs.verifier)
    return multiround.make_plugins(draft, target, rounds, temperature)


register(VariantSpec(
    name="candidate_diversity",
    knob_class=CandidateDiversityKnobs,
    make_plugins=make_plugins,
    knob_grid=({}, {"diversity": "rank"}, {"diversity": "block_sizes"}, {"ranks": 1}, {"ranks": 5},
               {"margin_threshold": 0.5}, {"margin_threshold": 0.0}, {"verifier": "linear"},
               {"diversity": "rank", "ranks": 4, "verifier": "linear"}),
    sampling=True,
    description="multi-round proposals diversified at uncertain draft positions (rank / sparse swaps, or "
                "different block sizes), verified as one tree",
))
