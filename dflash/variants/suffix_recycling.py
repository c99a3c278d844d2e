"""Recycle the rejected draft suffix as hints for the next draft (backlog idea 4; research script spec 5.6).

After the first mismatch, the draft tokens from the rejected one onward were drafted for positions the next
cycle drafts again. They are written into the next block as *inputs* in place of mask tokens; the draft still
predicts every position and verification and commit are unchanged, so the output stays exactly the target's.

Placement (`mode`): "none" (plain DFlash); "dense" and "sparse" as the research script placed them - recycled[j]
(drafted for absolute position new_start + j) at block index j + 1 (dense, one position late) or 2(j + 1)
(sparse, later and later; spec 8.1.1); "aligned" puts each recycled token at the block index of the position it
was drafted for (recycled[0], at the correction token's position, is dropped). `min_confidence` keeps only hints
whose draft probability (softmax at temperature 1) was at least that; `max_seed_tokens` caps hints per cycle
(-1: no cap). Metric: seeded tokens per cycle (`proposal_stats["seeded_tokens"]`).
"""
from __future__ import annotations

import torch

from dataclasses import dataclass

from ..engine import CycleOutcome, DFlashDrafter, Proposal
from ..errors import DFlashError
from ..registry import Plugins, VariantSpec, register

MODES = ("none", "dense", "sparse", "aligned")


def seed_plan(recycled: list[tuple[int, int, float]], start: int, length: int, mode: str, min_confidence: float,
              max_seed_tokens: int) -> list[tuple[int, int]]:
    """(block index, token) hints for a block of `length` at anchor position `start`.

    recycled: (absolute position it was drafted for, token, draft probability), in order; recycled[0] sits at
    `start` (the rejected token whose position now holds the anchor).
    """
    if mode == "none":
        return []
    if mode == "dense":
        candidates = [(j + 1, entry) for j, entry in enumerate(recycled)]
    elif mode == "sparse":
        candidates = [(2 * (j + 1), entry) for j, entry in enumerate(recycled)]
    else:  # aligned
        candidates = [(position - start, (position, token, confidence))
                      for position, token, confidence in recycled if position - start >= 1]
    plan = [(index, token) for index, (_, token, confidence) in candidates
            if 1 <= index < length and confidence >= min_confidence]
    return plan if max_seed_tokens < 0 else plan[:max_seed_tokens]


@dataclass(frozen=True)
class SuffixRecyclingKnobs:
    mode: str = "aligned"  # where recycled tokens go in the next block (module docstring)
    min_confidence: float = 0.0  # keep hints whose draft probability was at least this
    max_seed_tokens: int = -1  # hints per cycle at most (-1: no cap)

    def __post_init__(self):
        if self.mode not in MODES:
            raise DFlashError(f"Unknown suffix recycling mode {self.mode!r}; choose one of {', '.join(MODES)}.")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise DFlashError(f"min_confidence is a draft probability in [0, 1], got {self.min_confidence}.")


class SuffixRecyclingDrafter(DFlashDrafter):
    def __init__(self, draft, target, knobs: SuffixRecyclingKnobs):
        super().__init__(draft, target)
        self.knobs = knobs
        self.recycled: list[tuple[int, int, float]] = []
        self._confidence: list[float] = []

    def propose(self, anchor, start, length, context_features, temperature, generator) -> Proposal:
        block = self.masked_block(anchor, length)
        plan = seed_plan(self.recycled, start, length, self.knobs.mode, self.knobs.min_confidence,
                         self.knobs.max_seed_tokens)
        for index, token in plan:
            block[index] = token
        logits = self.draft_logits(block, start, context_features)
        tokens, laws = self.pick(logits, temperature, generator)  # the draft rewrites every position
        self._confidence = torch.softmax(logits.double(), -1).gather(-1, tokens[:, None])[:, 0].tolist()
        return Proposal.chain(tokens, laws, draft_passes=1, seeded_tokens=len(plan),
                              recycled_available=len(self.recycled))

    def observe(self, outcome: CycleOutcome) -> None:
        accepted, drafted = len(outcome.path) - 1, outcome.proposal.size
        tokens = outcome.proposal.tokens.tolist()
        # node j + 1 was drafted for position start + j + 1; keep the rejected one and everything after it
        self.recycled = [(outcome.start + j + 1, tokens[j], self._confidence[j]) for j in range(accepted, drafted)]


def make_plugins(draft, target, knobs: SuffixRecyclingKnobs, temperature: float) -> Plugins:
    return Plugins(SuffixRecyclingDrafter(draft, target, knobs))


register(VariantSpec(
    name="suffix_recycling",
    knob_class=SuffixRecyclingKnobs,
    make_plugins=make_plugins,
    knob_grid=({}, {"mode": "none"}, {"mode": "dense"}, {"mode": "sparse"}, {"mode": "sparse", "max_seed_tokens": 2},
               {"min_confidence": 0.5}, {"min_confidence": 0.9}, {"max_seed_tokens": 1}, {"max_seed_tokens": 0}),
    sampling=True,
    description="the rejected draft suffix becomes next cycle's block inputs (research dense/sparse placement, "
                "aligned placement, confidence gate, seed budget)",
))
