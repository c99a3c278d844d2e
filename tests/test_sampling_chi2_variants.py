"""End to end at temperature 1, for every way of decoding that samples: the committed tokens follow the target's
exact law.

What runs: the plain engine (`dflash.generate`) under each acceptance rule in `dflash.engine.acceptance.SAMPLING_RULES`,
and every registry variant with `sampling=True` (dflash.variants), at its default knobs, plus selective
refinement (kept tokens carry point-mass laws next to sampled ones). `test_every_sampling_path_has_a_case`
fails when a sampling variant or rule is added without a row in CASES.

The pair: a random float64 Qwen3 target and DFlash draft with a 4-token vocabulary and unit-scale logits, so both
laws are high-entropy and unrelated: the draft's law q differs from the target's p at every position, more than
half of the drafting cycles end at a rejection (a residual draw) and drafts are still accepted (each case asserts
both). Each run decodes NEW_TOKENS = 4 tokens with block size 4: token 1 from prefill, then a cycle of 2 drafted
tokens and, after a rejection, a second cycle (where suffix recycling seeds its hints). The draft samples at
DRAFT_TEMPERATURE = 0.3 where a variant lets it: any proposal law keeps the output exact, so the draft temperature
is a tuning knob, and a law recorded at the wrong temperature becomes visible.

The reference: the exact law of the 4-token continuation, the product of the target's conditionals, enumerated
with the target's own forward (4^4 = 256 continuations). Bins are fixed from it before sampling: every
continuation with expected count >= 5, the rest pooled (59 bins at RUNS = 1000). scipy's chisquare at ALPHA = 1e-4
with fixed seeds: a correct engine fails with probability 1e-4 per case, and the seeds make the outcome
reproducible.

Power (measured when this test was written, RUNS = 1000 per case): recording the draft law at temperature 1 while
sampling at DRAFT_TEMPERATURE (a planted `DFlashDrafter.pick` bug) gives p < 1e-38 in every case with
`draft_samples=True`; drawing rejections from p instead of the residual (`speculative_residual` and
`match_residual` returning p) gives p < 1e-19 in every case. Cases with `draft_samples=False` propose
deterministically (point-mass laws: the match rule's greedy draft, the tree variants' candidates), so the pick bug
cannot touch them; they are here for the residual and tree-walk paths. The file takes about 40 s on one core.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from scipy.stats import chisquare

from dflash import generate
from dflash.engine.acceptance import SAMPLING_RULES, probabilities
from helpers import DEVICE, random_draft, random_target, scaled
from dflash.variants import VARIANTS

torch.set_num_threads(1)

VOCAB = 4
HIDDEN = 16
LOGIT_STD = 1.0  # target and draft share the LM head: unit-scale logits, high-entropy laws for both
PROMPT = [1, 2, 0, 3]
NEW_TOKENS = 4
BLOCK_SIZE = 4
DRAFT_TEMPERATURE = 0.3
RUNS = 1000
MIN_EXPECTED = 5.0
ALPHA = 1e-4
MIN_REJECTED_CYCLES = 0.2  # share of drafting cycles that stop short of their block (a residual draw)
MIN_ACCEPTED_DRAFTS = 0.2  # accepted draft tokens per drafting cycle


@dataclass(frozen=True)
class Case:
    id: str
    variant: str | None  # registry name; None: the plain engine, dflash.generate
    knobs: dict = field(default_factory=dict)  # over the variant's registered defaults
    acceptance: str = "speculative"  # plain engine only
    draft_samples: bool = True  # the drafter samples at DRAFT_TEMPERATURE and its recorded law enters acceptance
    what: str = ""


CASES = [
    Case("plain-speculative", None, what="min(1, p/q) and the residual norm(max(0, p - q))"),
    Case("plain-match", None, acceptance="match", draft_samples=False,
         what="upstream rule: greedy draft, accepted iff it equals a target sample"),
    Case("multiround", "multiround", what="two sampled rounds per cycle, multi-round residual walk"),
    Case("candidate_diversity", "candidate_diversity",
         what="three rounds, rank-2 swaps at uncertain positions, one tree forward"),
    Case("refinement", "refinement", what="two draft passes, the last one sampled (the default full rewrite re-masks "
         "every position, so pass 2 reads pass 1's input and this row decodes exactly like plain-speculative)"),
    Case("refinement-selective", "refinement", {"selective": True, "threshold": 0.4},
         what="confident tokens kept from the greedy pass (point masses), the others sampled"),
    Case("suffix_recycling", "suffix_recycling", what="rejected suffix fed back as the next block's inputs"),
    Case("tree", "tree", draft_samples=False, what="4 best candidate blocks (point masses), sibling rejection"),
    Case("tree_lite", "tree_lite", draft_samples=False, what="top-2 branches at the first 2 positions"),
    Case("candidates", "candidates", draft_samples=False, what="branch-beam candidate blocks, best-candidate walk"),
]


@pytest.fixture(scope="module")
def pair():
    target = random_target(0, vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=2, num_heads=2, num_kv_heads=1)
    with torch.no_grad():  # hidden states are RMS-normalized: weights of std LOGIT_STD / sqrt(H) give logits ~ N(0, 1)
        target.lm_head.weight.normal_(0.0, LOGIT_STD / HIDDEN ** 0.5, generator=torch.Generator().manual_seed(5))
    target.to(DEVICE)  # drawn on the CPU (its generator), then moved
    return target, random_draft(target, 1, block_size=BLOCK_SIZE)


@pytest.fixture(scope="module")
def exact_law(pair):
    """Exact probability of every NEW_TOKENS-token continuation of PROMPT under the target at temperature 1."""
    target, _ = pair
    law = {(): 1.0}
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            prefixes = list(law)
            ids = torch.tensor([PROMPT + list(prefix) for prefix in prefixes], device=target.device)
            logits = target(input_ids=ids).logits[:, -1]
            conditionals = probabilities(logits, 1.0).tolist()
            law = {prefix + (token,): law[prefix] * conditionals[row][token]
                   for row, prefix in enumerate(prefixes) for token in range(VOCAB)}
    return law


def a_priori_bins(law: dict, runs: int) -> tuple[dict, list[float]]:
    """continuation -> bin index, and each bin's probability: continuations with expected count >= MIN_EXPECTED
    are bins of their own, the rest one pooled bin (folded into the smallest bin if it expects < MIN_EXPECTED)."""
    kept = sorted((c for c in law if law[c] * runs >= MIN_EXPECTED), key=law.get, reverse=True)
    index = {c: i for i, c in enumerate(kept)}
    probs = [law[c] for c in kept]
    rest = [c for c in law if c not in index]
    pool = sum(law[c] for c in rest)
    pool_bin = len(kept) if pool * runs >= MIN_EXPECTED else len(kept) - 1
    if pool_bin == len(kept):
        probs.append(pool)
    else:
        probs[pool_bin] += pool
    index.update(dict.fromkeys(rest, pool_bin))
    return index, probs


def decode(case: Case, pair, seed: int):
    target, draft = pair
    common = dict(max_new_tokens=NEW_TOKENS, block_size=BLOCK_SIZE, temperature=1.0, seed=seed)
    draft_temperature = {"draft_temperature": DRAFT_TEMPERATURE} if case.draft_samples else {}
    if case.variant is None:
        return generate(target, draft, PROMPT, acceptance=case.acceptance, **common, **draft_temperature)
    spec = VARIANTS[case.variant]
    return spec.decode(target, draft, PROMPT, stop_token_ids=None, **common, **{**spec.knobs, **case.knobs},
                       **draft_temperature)


def test_every_sampling_path_has_a_case():
    covered = {case.variant for case in CASES}
    missing = sorted(name for name, spec in VARIANTS.items() if spec.sampling and name not in covered)
    assert not missing, f"sampling variants without a chi-square case: {missing}"
    assert {case.acceptance for case in CASES if case.variant is None} == set(SAMPLING_RULES)
    for case in CASES:  # draft_samples must say what the variant declares about draft_temperature
        if case.variant is not None:
            takes = VARIANTS[case.variant].draft_temperature
            assert takes == case.draft_samples, (case.id, "draft_samples disagrees with the variant's declaration")


def test_the_pair_is_high_entropy(exact_law):
    assert abs(sum(exact_law.values()) - 1.0) < 1e-12
    entropy = -sum(p * math.log(p) for p in exact_law.values() if p > 0)
    assert entropy > 0.75 * NEW_TOKENS * math.log(VOCAB), f"continuation entropy {entropy:.2f} nats is too low"
    _, probs = a_priori_bins(exact_law, RUNS)
    assert len(probs) >= 20, "too few a-priori bins for the chi-square test to have power"


@pytest.mark.parametrize("sampling_case", CASES, ids=[case.id for case in CASES])  # `case`: the plugin's fixture
def test_committed_tokens_follow_the_target_law(pair, exact_law, sampling_case):
    name = sampling_case.id
    runs = scaled(RUNS, minimum=RUNS // 4)  # a shrunk run (DFLASH_TEST_SCALE) keeps 250: several a-priori bins
    index, probs = a_priori_bins(exact_law, runs)
    observed = [0] * len(probs)
    drafting_cycles = rejected_cycles = accepted_drafts = 0
    for seed in range(runs):
        result = decode(sampling_case, pair, seed)
        assert len(result.output_ids) == NEW_TOKENS
        observed[index[tuple(result.output_ids)]] += 1
        for record in result.trace:
            if record.block_size > 1:
                drafting_cycles += 1
                rejected_cycles += record.acceptance_length < record.block_size
                accepted_drafts += record.acceptance_length - 1
    assert rejected_cycles >= MIN_REJECTED_CYCLES * drafting_cycles, (
        f"{name}: only {rejected_cycles} of {drafting_cycles} cycles drew a residual: the test would mostly "
        "check accepted drafts")
    assert accepted_drafts >= MIN_ACCEPTED_DRAFTS * drafting_cycles, (
        f"{name}: only {accepted_drafts} drafts accepted in {drafting_cycles} cycles: the test would only "
        "check the target's own samples")
    expected = [p * runs for p in probs]
    statistic, p_value = chisquare(observed, expected)
    worst = sorted(range(len(probs)), key=lambda b: -abs(observed[b] - expected[b]) / expected[b] ** 0.5)[:3]
    assert p_value > ALPHA, (
        f"{name}: committed tokens do not follow the target law: chi2 {statistic:.1f} on {len(probs)} bins, "
        f"p {p_value:.2e} < {ALPHA}; worst bins (observed/expected): "
        + ", ".join(f"{observed[b]}/{expected[b]:.1f}" for b in worst))
