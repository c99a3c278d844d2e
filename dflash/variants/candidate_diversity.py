"""Candidate diversity for multi-round proposals (backlog idea 7).

Plain multi-round rounds are nearly the same block (they differ only in trailing masks), so extra rounds mostly
add cost. Here round r diversifies at the draft's uncertain positions (top-1 minus top-2 probability <=
`margin_threshold`): "rank" puts the rank-(r+1) token at every uncertain position; "sparse" swaps only the r-th
most uncertain position to its rank-2 token and keeps the rest of the block; "block_sizes" gives round r the
block length L - 4r of the cycle's length L instead (no swaps). Every round is drafted for the same anchor from one draft pass per block
length, merged into a tree, verified, and accepted by the exact multi-round walk (dflash.variants.multiround).
"""
from __future__ import annotations

from ..errors import DFlashError
from . import VariantSpec, register
from .multiround import decode_multiround

MODES = ("rank", "sparse", "block_sizes")


def decode_candidate_diversity(target, draft, prompt, *, max_new_tokens, block_size, temperature=0.0, seed=None,
                               stop_token_ids=None, diversity="sparse", ranks=3, margin_threshold=1.0,
                               verifier="tree", draft_temperature=None):
    if diversity not in MODES:
        raise DFlashError(f"Unknown diversity mode {diversity!r}; choose one of {', '.join(MODES)}.")
    if ranks < 1:
        raise DFlashError(f"ranks (proposals per cycle) must be >= 1, got {ranks}.")
    sizes = (draft.block_size,) * ranks  # capped by each cycle's length
    return decode_multiround(target, draft, prompt, max_new_tokens=max_new_tokens, block_size=block_size,
                             temperature=temperature, seed=seed, stop_token_ids=stop_token_ids,
                             round_block_sizes=sizes, diversity=diversity, margin_threshold=margin_threshold,
                             verifier=verifier, draft_temperature=draft_temperature)


register(VariantSpec(
    name="candidate_diversity",
    decode=decode_candidate_diversity,
    knobs={"diversity": "sparse", "ranks": 3, "margin_threshold": 1.0, "verifier": "tree"},
    knob_grid=({}, {"diversity": "rank"}, {"diversity": "block_sizes"}, {"ranks": 1}, {"ranks": 5},
               {"margin_threshold": 0.5}, {"margin_threshold": 0.0}, {"verifier": "linear"},
               {"diversity": "rank", "ranks": 4, "verifier": "linear"}),
    sampling=True,
    description="multi-round proposals diversified at uncertain draft positions (rank / sparse swaps, or "
                "different block sizes), verified as one tree",
))
