"""Measure a target/draft pair: greedy tau per prompt category and block size, and losslessness."""
from __future__ import annotations

from .engine import generate


def greedy_quality(target, draft, prompts: dict[str, list[list[int]]], *, block_sizes, max_new_tokens: int,
                   stop_token_ids=()) -> dict:
    """Per category and block size: tau (micro: committed tokens / cycles; macro: mean of per-prompt tau),
    n prompts, and how many outputs equal target-only greedy output."""
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
            }
    table["mean"] = {str(b): {"tau_micro": sum(table[c][str(b)]["tau_micro"] for c in prompts) / len(prompts)}
                     for b in block_sizes}
    return table
