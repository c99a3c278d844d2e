"""Measure a target/draft pair: greedy tau per prompt category and block size, and losslessness."""
from __future__ import annotations

from .engine import generate


def greedy_quality(target, draft, prompts: dict[str, list[list[int]]], *, block_sizes, max_new_tokens: int,
                   stop_token_ids=()) -> dict:
    """Per category and block size: tau (micro: committed tokens / cycles; macro: mean of per-prompt tau),
    n prompts, how many outputs equal target-only greedy output, and the differing ones proven float ties."""
    table = {}
    for category, category_prompts in prompts.items():
        references = [generate(target, None, p, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids)
                      .output_ids for p in category_prompts]
        table[category] = {}
        for block_size in block_sizes:
            results = [generate(target, draft, p, max_new_tokens=max_new_tokens, block_size=block_size,
                                stop_token_ids=stop_token_ids) for p in category_prompts]
            cycles = sum(r.num_cycles for r in results)
            table[category][str(block_size)] = {
                "n": len(results),
                "tau_micro": sum(sum(r.acceptance_lengths) for r in results) / max(1, cycles),
                "tau_macro": sum(r.tau for r in results if r.num_cycles) / max(1, sum(bool(r.num_cycles)
                                                                                      for r in results)),
                "identical_to_target_only": sum(r.output_ids == ref for r, ref in zip(results, references)),
                "float_ties": [f"prompt {i}: {tie}" for i, (p, r, ref) in enumerate(zip(category_prompts, results,
                                                                                       references))
                               if r.output_ids != ref and (tie := float_tie(target, p, ref, r.output_ids))],
            }
    table["mean"] = {str(b): {"tau_micro": sum(table[c][str(b)]["tau_micro"] for c in prompts) / len(prompts)}
                     for b in block_sizes}
    return table


def float_tie(target, prompt: list[int], expected: list[int], got: list[int], *, ulps: float = 8.0) -> str | None:
    """Explain where two greedy outputs first differ, if it is a float tie; None when it is not (a bug).

    At the first differing position the target is re-run on prompt + common prefix in float64 (float32 for
    models above 200M parameters, where a float64 copy would not fit). It is a tie when both tokens are within
    `ulps` units of the model dtype's rounding of the top logit: then a block forward and a one-token forward
    may legitimately disagree on which is larger."""
    import copy

    import torch
    k = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), None)
    if k is None:
        return None  # one is a prefix of the other: a length difference is never a tie
    param = next(target.parameters())
    big = sum(p.numel() for p in target.parameters()) > 200_000_000
    precise = target if big and param.dtype == torch.float32 else copy.deepcopy(target).to(
        torch.float32 if big else torch.float64)
    ids = torch.tensor([list(prompt) + list(expected[:k])], device=param.device)
    with torch.inference_mode():
        logits = precise(input_ids=ids).logits[0, -1].double()
    top = float(logits.max())
    tolerance = ulps * torch.finfo(param.dtype).eps * max(1.0, abs(top))
    a, b = float(logits[expected[k]]), float(logits[got[k]])
    if top - a <= tolerance and top - b <= tolerance:
        return (f"float tie at new token {k}: tokens {expected[k]} and {got[k]} have logits {a:.9g} and {b:.9g} "
                f"in {precise.dtype} (gap {abs(a - b):.2g} <= {tolerance:.2g}, "
                f"{ulps:g} ulps of {param.dtype} at the top logit)")
    return None
