"""End to end at temperature 1 on the tiny pair: the tokens that the verification step commits follow the
target's exact distribution.

Each run decodes 3 new tokens with block size 4: token 1 comes from prefill, tokens 2-3 from the first
verification cycle (accepted drafts, a residual draw on rejection, or the bonus token) and, after a rejection,
from the following cycles. The exact law of the 3-token continuation is the product of the target's
conditionals. Bins are fixed before sampling from that exact law (every continuation whose expected count is at
least 5, plus one bin for the rest), so the chi-square test is calibrated: with a correct engine p < 1e-4
happens less than once in 10^4 runs, and the seeds are fixed.

The draft proposes at temperature 0.3 while the target samples at 1: a sharpened proposal is rejected often,
so residual draws are exercised as well as accepted drafts (any proposal law keeps the output exact).
Power is limited: on this pair, squaring min(1, p/q) or drawing rejections from p instead of the residual
moves the committed law too little to detect at 3000 runs (measured p = 0.24 and 0.27); the exact
enumeration in test_acceptance_exact.py is the test that catches those breaks.
"""
import pytest
import torch
from scipy.stats import chisquare

from dflash import generate, load_draft, load_target, load_tokenizer
from dflash.engine.acceptance import probabilities
from helpers import DEVICE, scaled

RUNS = 3000
NEW_TOKENS = 3
DRAFT_TEMPERATURE = 0.3
ALPHA = 1e-4


@pytest.fixture(scope="module")
def tiny():
    tokenizer = load_tokenizer("tiny")
    prompt = tokenizer("<|user|>\nWhat is 12 plus 7?<|end|>\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    return load_target("tiny", device=DEVICE), load_draft("tiny", device=DEVICE), prompt


@torch.inference_mode()
def exact_bins(target, prompt, runs, min_expected=5.0):
    """Continuations with expected count >= min_expected and their exact probabilities (a priori bins)."""
    frontier, bins = [((), 1.0)], {}
    while frontier:
        prefix, mass = frontier.pop()
        if len(prefix) == NEW_TOKENS:
            bins[prefix] = mass
            continue
        logits = target(input_ids=torch.tensor([prompt + list(prefix)], device=target.device)).logits[0, -1]
        law = probabilities(logits, 1.0)
        for token in torch.nonzero(law * mass * runs >= min_expected).flatten().tolist():
            frontier.append((prefix + (token,), mass * float(law[token])))
    return bins


@pytest.mark.parametrize("rule", ["speculative", "match"])
def test_committed_tokens_follow_the_target_distribution(tiny, rule):
    target, draft, prompt = tiny
    runs = scaled(RUNS)
    bins = exact_bins(target, prompt, runs)
    assert len(bins) >= 3, "the test needs several frequent continuations to have power"
    counts, accepted_drafts = dict.fromkeys(bins, 0), 0
    other = 0
    for seed in range(runs):
        result = generate(target, draft, prompt, max_new_tokens=NEW_TOKENS, block_size=4, temperature=1.0,
                          draft_temperature=DRAFT_TEMPERATURE, seed=seed, acceptance=rule)
        accepted_drafts += sum(t - 1 for t in result.acceptance_lengths)
        key = tuple(result.output_ids)
        if key in counts:
            counts[key] += 1
        else:
            other += 1
    assert accepted_drafts > runs // 4, "drafts must be accepted often, or the test only checks the target"
    expected = [p * runs for p in bins.values()] + [(1.0 - sum(bins.values())) * runs]
    observed = list(counts.values()) + [other]
    if expected[-1] < 1e-9:  # no mass outside the bins
        expected, observed = expected[:-1], observed[:-1]
    statistic, p_value = chisquare(observed, expected)
    assert p_value > ALPHA, f"{rule}: chi2 {statistic:.1f}, p {p_value:.2e}, bins {len(expected)}"
