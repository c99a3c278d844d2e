"""The plain reference decoder of a block-diffusion LM (Fast-dLLM v2's `batch_sample` at temperature 0, one row).

It is the test oracle for faster decoders, so it is written to be obviously right rather than fast: no KV cache,
no batching; every forward recomputes the whole current sequence (committed blocks plus the current block, masks
included) under the block-causal mask. Committed blocks then see exactly what a prefix cache would give them, and
the current block sees itself bidirectionally, as in training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.verifiers import additive_mask
from ..errors import DFlashError
from .masks import block_causal


@dataclass
class ReferenceResult:
    ids: list[int]  # generated ids, cut after the first stop token and to max_new_tokens
    forwards: int  # model forwards it took (forwards per generated token is the decoder's cost)


@torch.no_grad()
def reference_decode(model, prompt_ids: list[int], *, block_size: int = 32, sub_block_size: int = 8,
                     threshold: float = 0.9, mask_id: int, stop_ids, max_new_tokens: int) -> ReferenceResult:
    """Greedy block-diffusion decoding. Blocks of `block_size` start at multiples of it (the first one may hold
    the prompt's tail); each sub-block is unmasked in steps, one forward each, taking every masked slot whose
    confidence (the probability of its argmax) is above `threshold` and always the most confident one, so
    threshold 1 unmasks one token a forward. A clean block is finalized by one more forward, whose last logit
    gives the next block's first token. Decoding stops once a stop token has no masked slot before it, or after
    the block in which `max_new_tokens` is reached."""
    if not prompt_ids or max_new_tokens < 1 or sub_block_size < 1 or block_size % sub_block_size:
        raise DFlashError(f"reference_decode needs a non-empty prompt, max_new_tokens >= 1 and a block size that "
                          f"sub-blocks divide (got {len(prompt_ids)} prompt tokens, max_new_tokens "
                          f"{max_new_tokens}, block {block_size}, sub-block {sub_block_size}).")
    D, S, n, stops = block_size, sub_block_size, len(prompt_ids), set(stop_ids)
    x, masked, forwards = list(prompt_ids), [False] * n, 0

    def logits() -> torch.Tensor:  # [len(x), V] fp32, row i predicts position i + 1 (the AR head's meaning)
        nonlocal forwards
        forwards += 1
        positions = torch.arange(len(x))
        mask = additive_mask(block_causal(positions, positions, D)[None, None], model.dtype)
        return model(input_ids=torch.tensor([x]), position_ids=positions[None], attention_mask=mask).logits[0].float()

    def finished() -> bool:  # a stop token was filled in and nothing before it (in the generated part) is masked
        for token, hidden in zip(x[n:], masked[n:]):
            if hidden:
                return False
            if token in stops:
                return True
        return False

    def result() -> ReferenceResult:
        out = x[n:][:max_new_tokens]
        cut = next((i + 1 for i, t in enumerate(out) if t in stops), len(out))
        return ReferenceResult(out[:cut], forwards)

    s = (n // D) * D
    if n % D == 0:  # the block starts right after the prompt: its first token comes AR-style from the last logit
        x.append(int(logits()[n - 1].argmax()))
        masked.append(False)
    while not finished():
        x += [mask_id] * (s + D - len(x))
        masked += [True] * (s + D - len(masked))
        for j in range(D // S):
            lo, hi = s + j * S, s + (j + 1) * S
            while any(masked[lo:hi]) and not finished():
                rows = (torch.arange(lo, hi) - 1).clamp(min=0)  # token shift: slot i reads logits[i - 1]
                probs = torch.softmax(logits()[rows], -1)  # (slot 0 is the prompt's, never masked)
                prediction = probs.argmax(-1)
                confidence = probs.gather(-1, prediction[:, None])[:, 0]
                still = torch.tensor(masked[lo:hi])
                confidence = confidence.masked_fill(~still, -1.0)
                chosen = (confidence > threshold) & still
                chosen[int(confidence.argmax())] = True  # always the most confident one (first on ties)
                for k in chosen.nonzero().flatten().tolist():
                    x[lo + k], masked[lo + k] = int(prediction[k]), False
            if finished():
                return result()
        if len(x) - n >= max_new_tokens:
            break
        x.append(int(logits()[s + D - 1].argmax()))  # finalize the clean block: its last logit opens the next
        masked.append(False)
        s += D
    return result()


def reference_generate(model, prompt_ids: list[int], **options) -> list[int]:
    """Generated ids only (options as `reference_decode`)."""
    return reference_decode(model, prompt_ids, **options).ids
