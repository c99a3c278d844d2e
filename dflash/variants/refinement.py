"""Multi-step draft refinement (backlog idea 5; research `--draft-steps`, spec 2.5).

Pass 1 drafts the block from masks as usual. Each further pass feeds the previous proposal back in and rewrites
it: "full" rewrites every position (the research idea); `selective=True` re-masks only the positions whose draft
probability was below `threshold`, keeps the confident tokens as inputs and as proposals, and stops early when
nothing is left to rewrite. Every pass uses the draft's context cache at the true positions (the research version
ran every pass uncached with only the last cycle's context features, spec 8.1.2; `research_compat=True`
reproduces that for steps > 1). Passes before the last are greedy; when sampling, the last pass draws the tokens
it rewrites from its own law and kept tokens carry point-mass laws, so the chain acceptance stays exact.
Cost: `proposal_stats["draft_passes"]` and `["refined_positions"]` (positions rewritten after pass 1).
"""
from __future__ import annotations

import torch

from dataclasses import dataclass

from ..engine import DFlashDrafter, Proposal, one_hot_law
from ..errors import DFlashError
from ..registry import Plugins, VariantSpec, register


@dataclass(frozen=True)
class RefinementKnobs:
    steps: int = 2  # draft passes per cycle
    selective: bool = False  # re-mask only low-confidence positions (else rewrite the whole block)
    threshold: float = 0.9  # selective: positions with draft probability below this are rewritten
    research_compat: bool = False  # the research's uncached passes (steps > 1 only)

    def __post_init__(self):
        if self.steps < 1:
            raise DFlashError(f"steps (draft passes per cycle) must be >= 1, got {self.steps}.")
        if not 0.0 <= self.threshold <= 1.0:
            raise DFlashError(f"threshold is a draft probability in [0, 1], got {self.threshold}.")


class RefinementDrafter(DFlashDrafter):
    def __init__(self, draft, target, knobs: RefinementKnobs):
        super().__init__(draft, target)
        self.knobs = knobs
        self.research_compat = knobs.research_compat and knobs.steps > 1

    def _logits(self, block, start, context_features):
        if not self.research_compat:
            return self.draft_logits(block, start, context_features)
        # research: no draft cache; the context is only the features handed over this cycle, at start-c..start-1
        c = context_features.shape[1]
        device = block.device
        hidden = self.draft(self.embed(block[None]), context_features.to(self.dtype),
                            torch.arange(start - c, start, device=device)[None],
                            torch.arange(start, start + block.numel(), device=device)[None])
        return self.lm_head(hidden[0, 1:])

    def propose(self, anchor, start, length, context_features, temperature, generator) -> Proposal:
        block = self.masked_block(anchor, length)
        tokens = laws = None
        rewrite = torch.ones(length - 1, dtype=torch.bool, device=block.device)
        passes = refined = 0
        for step in range(self.knobs.steps):
            last = step == self.knobs.steps - 1
            logits = self._logits(block, start, context_features)
            passes += 1
            step_tokens, step_laws = self.pick(logits, temperature if last else 0.0, generator)
            if tokens is None:
                tokens = step_tokens
            else:
                tokens = torch.where(rewrite, step_tokens, tokens)
                refined += int(rewrite.sum())
            if last:
                if step_laws is not None:  # kept tokens came from greedy passes: point masses
                    laws = torch.where(rewrite[:, None].cpu(), step_laws.cpu(),
                                       one_hot_law(tokens, step_laws.shape[-1]).to(step_laws.dtype))
                break
            if self.knobs.selective:
                confidence = torch.softmax(logits.double(), -1).gather(-1, tokens[:, None])[:, 0]
                rewrite = confidence < self.knobs.threshold
                if not bool(rewrite.any()):
                    if temperature > 0:
                        laws = one_hot_law(tokens, logits.shape[-1])
                    break
            block = torch.cat([block[:1], torch.where(rewrite, torch.full_like(tokens, self.mask_token_id), tokens)])
        return Proposal.chain(tokens, laws, draft_passes=passes, refined_positions=refined)


def make_plugins(draft, target, knobs: RefinementKnobs, temperature: float) -> Plugins:
    return Plugins(RefinementDrafter(draft, target, knobs))


register(VariantSpec(
    name="refinement",
    knob_class=RefinementKnobs,
    make_plugins=make_plugins,
    knob_grid=({}, {"steps": 1}, {"steps": 3}, {"selective": True}, {"selective": True, "threshold": 0.5},
               {"selective": True, "steps": 3, "threshold": 0.99}, {"research_compat": True},
               {"research_compat": True, "steps": 3}),
    sampling=True,
    description="multi-pass draft refinement: full-block rewrite or selective re-masking of low-confidence "
                "positions, with the draft cache kept exact (research_compat: the research's uncached passes)",
))
