"""Measure a target/draft pair: greedy tau per prompt category and block size, and losslessness."""
from __future__ import annotations

from collections.abc import Sequence

from ..engine import generate


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
                "float_ties": [f"prompt {i}: {tie}" for i, tie in float_ties(
                    target, category_prompts, references, [r.output_ids for r in results], block_size).items()],
            }
    table["mean"] = {str(b): {"tau_micro": sum(table[c][str(b)]["tau_micro"] for c in prompts) / len(prompts)}
                     for b in block_sizes}
    return table


def float_ties(target, prompts, references, results, block_size: int | Sequence[int] = 16) -> dict[str, str]:
    """Every greedy output in `results` that differs from its reference (target-only output of the same prompt),
    proven a float tie by `float_tie`: {prompt index (a string, as records store it): explanation}. A difference
    that is no float tie is left out, so a caller fails on every index that differs and is not here.
    `block_size` is the block size the outputs were decoded with, one for all or one per prompt."""
    sizes = [block_size] * len(prompts) if isinstance(block_size, int) else list(block_size)
    ties = {}
    for i, (prompt, expected, got, size) in enumerate(zip(prompts, references, results, sizes)):
        if list(got) != list(expected) and (tie := float_tie(target, prompt, expected, got, block_size=size)):
            ties[str(i)] = tie
    return ties


def float_tie(target, prompt: list[int], expected: list[int], got: list[int], *,
              block_size: int = 16) -> str | None:
    """Explain where two greedy outputs first differ, if it is a float tie; None when it is not (a bug).

    The numerical noise is measured, not assumed. At the first differing position k the target is run, in its
    own dtype and on its own weights (no copy, no cast), on prompt + common prefix along two kinds of path:

    * the one-token path, exactly as target-only greedy decoding computes position k: prefill of the prompt,
      then one token at a time with a KV cache (k one-token forwards: the proof costs about one target-only
      decode of the prefix);
    * block paths, the way speculative verification computes it: prefill of the prompt, the prefix committed in
      blocks of `block_size` tokens (pass the run's block size), then one block forward from an anchor whose
      rows include position k. The anchor is the token right before k or `block_size` tokens before it, and the
      block is `block_size` long or cut at the end of `got` (a cycle at the max_new_tokens cap): a row's
      rounding depends on the forward's shape, not on the tokens after it.

    The observed path noise is the largest |logit difference| over the vocabulary between the one-token path
    and any block path at position k. The divergence is a float tie only if (a) the two tokens are the top two
    in at least one path and (b) the gap between their logits is <= the observed noise in every path: the two
    computations disagree on which is larger by no more than they disagree on every other logit. Anything else
    (a gap above the noise, or a token that is no runner-up) is a bug. In bf16 the noise is 1-2 ulps of the
    logits (0.03-0.06 at a logit of 5), so a wrong token 4 ulps behind is caught, where the old tolerance of
    8 eps(dtype) x |top logit| let through gaps of 8-16 ulps (1.6 logits at 25); the tolerance follows the
    computation's own rounding in every dtype (fp32: ~1e-6 at a logit of 8; fp64: ~1e-15).
    """
    import torch

    from ..engine.cache import new_cache, with_cache
    k = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), None)
    if k is None:
        return None  # one is a prefix of the other: a length difference is never a tie
    first, second = int(expected[k]), int(got[k])
    vocab = target.get_input_embeddings().weight.shape[0]
    if not (0 <= first < vocab and 0 <= second < vocab):
        return None
    device = target.get_input_embeddings().weight.device
    block_size = max(1, int(block_size))
    prompt, prefix = [int(t) for t in prompt], [int(t) for t in expected[:k]]
    tokens = prefix + [int(t) for t in got[k:]]  # what a block after position k held (causally irrelevant)

    def forward(ids, cache, **kwargs):
        return target(input_ids=torch.tensor([ids], device=device), use_cache=True, **with_cache(target, cache),
                      **kwargs).logits[0]

    def one_token_path():
        cache = new_cache(target.config)
        logits = forward(prompt, cache, logits_to_keep=1)[-1]
        for token in prefix:
            logits = forward([token], cache)[-1]
        return logits

    def block_path(anchor, length):
        cache = new_cache(target.config)
        if k == 0:  # the first token comes from the prefill: all-position logits instead of the last only
            return forward(prompt, cache)[-1]
        forward(prompt, cache, logits_to_keep=1)
        for begin in range(0, anchor, block_size):
            forward(prefix[begin: min(anchor, begin + block_size)], cache)
        block = tokens[anchor: anchor + length]
        return forward(block + block[-1:] * (length - len(block)), cache)[k - anchor - 1]

    # Rows depend on the forward's shape: a block is `block_size` long, or shorter at the max_new_tokens cap.
    geometries = sorted({(anchor, length) for anchor in {k - 1, max(0, k - block_size)}
                         for length in {block_size, min(block_size, len(got) - anchor)}}) if k else [(0, 0)]
    with torch.inference_mode():
        paths = {"one-token": one_token_path().double()}
        for anchor, length in geometries:
            name = f"block [{anchor}, {anchor + length})" if k else "full prefill"
            paths[name] = block_path(anchor, length).double()
    reference = paths["one-token"]
    noise = max(float((logits - reference).abs().max()) for name, logits in paths.items() if name != "one-token")
    gaps = {name: float(logits[first] - logits[second]) for name, logits in paths.items()}

    def top_two(logits):
        others = logits.clone()
        others[[first, second]] = -float("inf")
        return bool(others.max() <= torch.minimum(logits[first], logits[second]))

    if not any(top_two(logits) for logits in paths.values()) or any(abs(g) > noise for g in gaps.values()):
        return None
    dtype = next(target.parameters()).dtype
    shown = ", ".join(f"{gap:+.3g} {name}" for name, gap in gaps.items())
    return (f"float tie at new token {k}: tokens {first} and {second} (logits {float(reference[first]):.6g} and "
            f"{float(reference[second]):.6g}) differ by {shown}, within the observed path noise {noise:.3g} "
            f"(max |logit difference| between the one-token and block computations in {dtype})")
