"""Example idea: the draft fills its whole block as usual, but only the first k tokens are proposed, so the target
verifies k + 1 positions instead of the block size. Does a shorter verification pay for the tokens it gives up?"""
from dflash.engine import DFlashDrafter, Proposal, generate
from dflash.errors import DFlashError
from dflash.variants import VariantSpec, register


class FirstKDrafter(DFlashDrafter):
    def __init__(self, draft, target, *, k: int):
        super().__init__(draft, target)
        if k < 1:
            raise DFlashError(f"k (proposed positions) must be >= 1, got {k}.")
        self.k = k

    def propose(self, anchor, start, length, context_features, temperature, generator) -> Proposal:
        logits = self.draft_logits(self.masked_block(anchor, length), start, context_features)
        tokens, laws = self.pick(logits[: self.k], temperature, generator)  # the rest of the block is not proposed
        return Proposal.chain(tokens, laws, draft_passes=1)


def decode_first_k(target, draft, prompt, *, max_new_tokens, block_size, temperature=0.0, seed=None,
                   stop_token_ids=None, k=4):
    return generate(target, draft, prompt, max_new_tokens=max_new_tokens, block_size=block_size,
                    temperature=temperature, seed=seed, stop_token_ids=stop_token_ids,
                    drafter=FirstKDrafter(draft, target, k=k))


register(VariantSpec(name="first_k", decode=decode_first_k, knobs={"k": 4}, knob_grid=({"k": 1}, {"k": 4}),
                     sampling=True, description="propose only the first k drafted tokens of the block"))
