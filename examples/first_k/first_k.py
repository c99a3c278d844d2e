"""Example idea: the draft fills its whole block as usual, but only the first k tokens are proposed, so the target
verifies k + 1 positions instead of the block size. Does a shorter verification pay for the tokens it gives up?"""
from dataclasses import dataclass

from dflash.engine import DFlashDrafter, Proposal
from dflash.errors import DFlashError
from dflash.registry import Plugins, VariantSpec, register


@dataclass(frozen=True)
class FirstKKnobs:
    k: int = 4  # drafted tokens proposed per cycle

    def __post_init__(self):
        if self.k < 1:
            raise DFlashError(f"k (proposed positions) must be >= 1, got {self.k}.")


class FirstKDrafter(DFlashDrafter):
    def __init__(self, draft, target, k: int):
        super().__init__(draft, target)
        self.k = k

    def propose(self, anchor, start, length, context_features, temperature, generator) -> Proposal:
        logits = self.draft_logits(self.masked_block(anchor, length), start, context_features)
        tokens, laws = self.pick(logits[: self.k], temperature, generator)  # the rest of the block is not proposed
        return Proposal.chain(tokens, laws, draft_passes=1)


def make_plugins(draft, target, knobs: FirstKKnobs, temperature: float) -> Plugins:
    return Plugins(FirstKDrafter(draft, target, knobs.k))  # the default verifier and acceptor


register(VariantSpec(name="first_k", knob_class=FirstKKnobs, make_plugins=make_plugins,
                     knob_grid=({"k": 1}, {"k": 4}), sampling=True,
                     description="propose only the first k drafted tokens of the block"))
