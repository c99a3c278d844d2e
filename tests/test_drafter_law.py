"""The drafter records the law its tokens were really drawn from: `DFlashDrafter.pick(logits, T, generator)`.

Every sampling acceptance rule (min(1, p/q), the residual norm(max(0, p - q)), the multi-round walk) is exact only
if q, the law handed to the acceptor with the proposal, is the law the draft token was drawn from. Two checks:

* the recorded law is softmax(logits / T) in float64, to 1e-12, at several draft temperatures;
* the drawn tokens follow the recorded law: for a few fixed logit rows, each repeated REPEATS times in one call,
  the token counts are chi-square tested (scipy.stats.chisquare, fixed seed) against the recorded law of that row.

Power: a law computed at the wrong temperature (e.g. softmax(logits / 1) while sampling at 0.3 or 2.5) misses the
1e-12 comparison by orders of magnitude (measured: 0.48 and 0.41), and with REPEATS = 6000 draws per row the
chi-square statistic of such a mismatch is in the thousands (measured on the peaked row: 2.3e3 at T = 0.3, 2.2e4
at T = 2.5), where ALPHA = 1e-4 needs about 21 to 26 on these 3 to 5 degrees of freedom. A correct drafter fails a
chi-square check with probability ALPHA per row, and the seed is fixed, so the test is deterministic.
Temperature 0 is greedy: the argmax and no law.
"""
import pytest
import torch
from scipy.stats import chisquare

from dflash.engine import DFlashDrafter

torch.set_num_threads(1)

VOCAB = 6
ROWS = 3  # distinct logit rows (a peaked one, a flat one, a random one)
REPEATS = 6000  # draws per distinct row
ALPHA = 1e-4
TEMPERATURES = (0.3, 1.0, 2.5)


def logit_rows(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64)
    return rows * torch.tensor([[3.0], [0.3], [1.5]], dtype=torch.float64)  # peaked, near flat, in between


def pooled_bins(observed: torch.Tensor, expected: torch.Tensor) -> tuple[list[float], list[float]]:
    """Bins fixed a priori from the expected counts: each token with expected count >= 5 is a bin, the rest are
    pooled into one bin (folded into the smallest kept bin when the pool itself expects fewer than 5)."""
    kept = (expected >= 5).nonzero().flatten().tolist()
    rest = (expected < 5).nonzero().flatten().tolist()
    obs, exp = [float(observed[t]) for t in kept], [float(expected[t]) for t in kept]
    if rest:
        pool_obs, pool_exp = float(observed[rest].sum()), float(expected[rest].sum())
        if pool_exp >= 5:
            obs, exp = obs + [pool_obs], exp + [pool_exp]
        else:
            smallest = exp.index(min(exp))
            obs[smallest] += pool_obs
            exp[smallest] += pool_exp
    return obs, exp


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_recorded_law_is_the_tempered_softmax(temperature):
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2.0
    tokens, law = DFlashDrafter.pick(logits, temperature, torch.Generator().manual_seed(0))
    assert law is not None and law.dtype == torch.float64 and law.shape == logits.shape
    assert tokens.shape == (64,) and tokens.dtype == torch.long
    expected = torch.softmax(logits / temperature, dim=-1)
    error = float((law - expected).abs().max())
    assert error <= 1e-12, f"T={temperature}: recorded law differs from softmax(logits / T) by {error:.3g}"
    assert bool((law.gather(-1, tokens[:, None]) > 0).all()), "a token outside the support of its own law"


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_draws_follow_the_recorded_law(temperature):
    base = logit_rows(11)
    logits = base.repeat_interleave(REPEATS, dim=0)  # row r occupies rows r*REPEATS .. (r+1)*REPEATS - 1
    tokens, law = DFlashDrafter.pick(logits, temperature, torch.Generator().manual_seed(2024))
    for row in range(ROWS):
        block = slice(row * REPEATS, (row + 1) * REPEATS)
        row_law = law[row * REPEATS]
        assert torch.equal(law[block], row_law.expand(REPEATS, VOCAB)), "equal logits must get equal laws"
        observed = torch.bincount(tokens[block], minlength=VOCAB).double()
        obs, exp = pooled_bins(observed, row_law * REPEATS)
        assert len(exp) >= 2, "the row needs at least two testable bins"
        statistic, p_value = chisquare(obs, exp)
        assert p_value > ALPHA, (f"T={temperature}, row {row}: draws do not follow the recorded law: chi2 "
                                 f"{statistic:.1f} on {len(exp)} bins, p {p_value:.2e}; observed "
                                 f"{[int(o) for o in obs]}, expected {[round(e, 1) for e in exp]}")


def test_temperature_zero_is_argmax_without_law():
    logits = logit_rows(3)
    generator = torch.Generator().manual_seed(0)
    tokens, law = DFlashDrafter.pick(logits, 0.0, generator)
    assert law is None
    assert torch.equal(tokens, logits.argmax(dim=-1))
