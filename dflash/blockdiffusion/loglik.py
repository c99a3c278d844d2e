"""Log-likelihood (multiple-choice) scoring of a block-diffusion LM, as Fast-dLLM v2's lm-eval harness does it
(shared/reference/ANCHORS_ALGORITHMS.md B3; upstream `v2/eval.py::get_loglikelihood`).

One forward per (context, continuation) pair, over this input (n context tokens c, m continuation tokens x,
L = n + m, P = the next multiple of the block size above L):

    c_0 .. c_{n-1}  MASK  x_1 .. x_{m-1}  EOS  MASK .. MASK
    0 .. n-1        n     n+1 .. L-1      L    L+1 .. P-1

* the first continuation token is replaced by the mask id; the rest of the continuation stays visible;
* mask ids pad the sequence: upstream appends `block_size - L % block_size` of them, so always at least one
  and a whole extra block when L is already a multiple; the first of them is replaced by EOS;
* attention is block-causal (`masks.block_causal`: a position sees its own block and the earlier ones), the
  mask the upstream model builds for itself in eval mode, given here as a 4-D additive mask;
* token shift: the token at position i is predicted by the logits at position i-1.

The score is the sum, over the masked positions, of the log-probability of the true token there. Only position n
has one (the pad positions' targets are upstream's -100, which cross-entropy ignores), so the score is
log p(x_0 | context, x_1.., EOS), read from the logits at position n-1. The visible x_1.. are not scored, on
purpose: position i-1 attends to all of its block, token i included, so scoring them would reward copying.
lm-eval's MMLU and GPQA continuations (" A") are one token, where nothing is lost.

What this implies (tests/test_blockdiffusion_tasks.py): the score depends on everything in the block of
position n-1, later continuation tokens, EOS and pad masks included, and on nothing in later blocks (padding
a row with more blocks, as batching does, changes the score only by float rounding).
"""
from __future__ import annotations

import torch

from ..engine.verifiers import additive_mask
from ..errors import DFlashError
from .masks import block_causal


def loglik_input(context_ids, continuation_ids, *, block_size: int, mask_id: int, eos_id: int) -> list[int]:
    """The input ids of the one forward for this pair (layout in the module docstring)."""
    context, continuation = [int(t) for t in context_ids], [int(t) for t in continuation_ids]
    if not context or not continuation:
        raise DFlashError(f"Log-likelihood scoring needs a non-empty context and continuation, got "
                          f"{len(context)} and {len(continuation)} tokens.")
    if mask_id in context or mask_id in continuation:
        raise DFlashError(f"The mask id {mask_id} occurs in the context or continuation; it is reserved for the "
                          "masked and padding positions.")
    length = len(context) + len(continuation)
    pad = block_size - length % block_size
    return context + [mask_id] + continuation[1:] + [eos_id] + [mask_id] * (pad - 1)


def _forward(model, rows: list[list[int]], block_size: int, mask_id: int) -> torch.Tensor:
    """Logits [B, T, V] of one block-causal forward over rows (each a multiple of block_size long). Shorter rows
    are padded with mask ids: whole blocks after their own, which block-causal attention hides from them."""
    embeddings = model.get_input_embeddings().weight
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [mask_id] * (width - len(row)) for row in rows], device=embeddings.device)
    positions = torch.arange(width, device=embeddings.device)
    mask = additive_mask(block_causal(positions, positions, block_size)[None, None], embeddings.dtype)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions[None], use_cache=False).logits


def choice_logits(model, context_ids, continuation_ids, *, block_size: int, mask_id: int,
                  eos_id: int) -> torch.Tensor:
    """The raw logits [P, V] of the one forward for this pair (before the token shift)."""
    row = loglik_input(context_ids, continuation_ids, block_size=block_size, mask_id=mask_id, eos_id=eos_id)
    return _forward(model, [row], block_size, mask_id)[0]


def _score(logits: torch.Tensor, context_length: int, first_token: int) -> float:
    # token shift: position n (the masked first continuation token) is predicted by the logits at n-1
    row = logits[context_length - 1].to(torch.promote_types(logits.dtype, torch.float32))
    return float(torch.log_softmax(row, dim=-1)[first_token])


def continuation_logprobs(model, context_ids, continuation_ids, *, block_size: int, mask_id: int,
                          eos_id: int) -> float:
    """The B3 log-likelihood score of a continuation after a context: log p(first continuation token)."""
    logits = choice_logits(model, context_ids, continuation_ids, block_size=block_size, mask_id=mask_id,
                           eos_id=eos_id)
    return _score(logits, len(context_ids), int(continuation_ids[0]))


def batched_continuation_logprobs(model, pairs, *, block_size: int, mask_id: int, eos_id: int) -> list[float]:
    """`continuation_logprobs` of each (context_ids, continuation_ids) pair, in one batched forward."""
    pairs = list(pairs)
    if not pairs:
        return []
    rows = [loglik_input(c, x, block_size=block_size, mask_id=mask_id, eos_id=eos_id) for c, x in pairs]
    logits = _forward(model, rows, block_size, mask_id)
    return [_score(logits[i], len(c), int(x[0])) for i, (c, x) in enumerate(pairs)]
