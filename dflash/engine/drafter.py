"""The default drafter: one DFlash draft pass over [anchor, MASK, ...], with the draft's context cache kept exact.

Drafter plug-ins (dflash.variants) subclass `DFlashDrafter` and reuse `masked_block`, `draft_logits` and `pick`,
so a drafter may run several passes per cycle or rewrite the block inputs without touching the cache rules.
"""
from __future__ import annotations

import weakref

import torch

from ..model import DFlashDraftModel
from . import acceptance as rules
from .cache import cache_length, crop_cache, new_cache
from .protocol import CycleOutcome, Proposal


def one_hot_law(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """The law of a deterministic (greedy or rank-picked) draft token: a point mass."""
    return torch.nn.functional.one_hot(tokens.cpu(), vocab).double()


_HEAD_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def draft_head(target, dtype: torch.dtype):
    """The target's LM head as the draft applies it, in the draft's dtype (the target's own module when they
    agree). The head is the draft step's largest cost and dtype matters on a CPU: SmolLM2's 49k x 576 head over 3
    rows takes 36 ms in fp32 on one thread (small-row fp32 GEMMs scale with the rows) and 8 ms in bf16. So a bf16
    draft beside an fp32 target gets a bf16 copy, made once per target weight (and re-made if it changes). Only
    the proposals see it: the target's verification logits, hence the output, are untouched."""
    head = target.get_output_embeddings()
    if head.weight.dtype == dtype:
        return head
    key = (dtype, head.weight.data_ptr(), head.weight._version)
    copies = _HEAD_COPIES.setdefault(target, {})
    if key not in copies:
        copies.clear()
        copy = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                               device=head.weight.device, dtype=dtype)
        with torch.no_grad():
            copy.weight.copy_(head.weight)
            if head.bias is not None:
                copy.bias.copy_(head.bias)
        copies[key] = copy.requires_grad_(False)
    return copies[key]


class DFlashDrafter:
    """Proposes a block with the DFlash draft; owns the draft's context cache (one entry per position < anchor)."""

    def __init__(self, draft: DFlashDraftModel, target):
        self.draft, self.target = draft, target
        self.dtype = next(draft.parameters()).dtype
        self.token_embedding = target.get_input_embeddings()
        self.lm_head = draft_head(target, self.dtype)
        self.cache = new_cache()
        self.mask_token_id = int(draft.mask_token_id)

    def masked_block(self, anchor: int, length: int) -> torch.Tensor:
        """[anchor, MASK, ..., MASK]: the block the draft was trained to fill."""
        block = torch.full((length,), self.mask_token_id, dtype=torch.long,
                           device=self.token_embedding.weight.device)
        block[0] = anchor
        return block

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Target embeddings of `ids` in the draft's dtype."""
        return self.token_embedding(ids).to(self.dtype)

    def draft_logits(self, block: torch.Tensor, start: int, context_features: torch.Tensor) -> torch.Tensor:
        """One draft pass over block inputs [L] (block[0] = anchor at position `start`); logits [L-1, V], row j
        predicting block position j+1.

        context_features [1, c, K*H] are the target features of positions start-c .. start-1. The first pass of a
        cycle appends them to the draft's context cache; later passes of the same cycle (refinement, rounds) find
        them cached and reuse the cache, so every pass sees the whole history at its true positions.
        """
        device = self.token_embedding.weight.device
        if cache_length(self.cache) == start:
            context_features = context_features[:, :0]
        context_length = context_features.shape[1]
        assert cache_length(self.cache) == start - context_length, "draft cache out of step with the committed text"
        context_positions = torch.arange(start - context_length, start, device=device)[None]
        block_positions = torch.arange(start, start + block.numel(), device=device)[None]
        hidden = self.draft(self.embed(block[None]), context_features.to(self.dtype), context_positions,
                            block_positions, past_key_values=self.cache)
        crop_cache(self.cache, start)  # keep context K/V only; the block is re-drafted next pass/cycle
        return self.lm_head(hidden[0, 1:])  # output j predicts the token at block position j ("no shift")

    @staticmethod
    def pick(logits: torch.Tensor, temperature: float,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy (temperature 0: argmax, law None) or sampled tokens with the law they were drawn from."""
        if temperature == 0:
            return logits.argmax(dim=-1), None
        probs = rules.probabilities(logits, temperature)
        uniforms = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64)
        tokens = torch.tensor([rules.sample_from(probs[j], float(uniforms[j])) for j in range(logits.shape[0])],
                              dtype=torch.long, device=logits.device)
        return tokens, probs

    def propose(self, anchor: int, start: int, length: int, context_features: torch.Tensor, temperature: float,
                generator: torch.Generator) -> Proposal:
        """Draft tokens for positions start+1 .. start+length-1 (temperature 0: greedy)."""
        logits = self.draft_logits(self.masked_block(anchor, length), start, context_features)
        tokens, laws = self.pick(logits, temperature, generator)
        return Proposal.chain(tokens, laws, draft_passes=1)

    def observe(self, outcome: CycleOutcome) -> None:
        pass



def probability_margins(logits: torch.Tensor) -> torch.Tensor:
    """Per row: top-1 minus top-2 probability of the full-vocabulary softmax (the draft's confidence); 1.0 when V == 1."""
    probs = torch.softmax(logits.double(), dim=-1)
    if probs.shape[-1] < 2:
        return torch.ones(probs.shape[0], dtype=probs.dtype)
    top = probs.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]
