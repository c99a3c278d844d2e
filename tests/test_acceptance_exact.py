"""Exact-enumeration property tests: the acceptance rules in `dflash.engine.acceptance` are lossless.

No sampling anywhere. Every random choice (draft tokens, accept uniforms, the final uniform) is enumerated with its
exact weight, and the real functions (`sampling_accept`, `multiround_accept`, `sample_from`) are called at a point
inside each outcome's interval. The resulting law of committed tokens is compared to the target's law to 1e-9.

Conventions: a target table `cond[L]` has shape (V,)*L + (V,) and `cond[L][prefix]` is p(. | prefix) for a prefix of
length L (L = 0..k). A draft table `qcond[j]` has the same layout for j = 0..k-1; a non-autoregressive draft (DFlash)
is a table that is the same for every prefix.
"""
from __future__ import annotations

import itertools
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dflash.engine.acceptance import (
    SAMPLING_RULES,
    greedy_accept,
    multiround_accept,
    sample_from,
    sampling_accept,
    speculative_accept_probability,
    speculative_residual,
)

TOL = 1e-9
# Generation of the bigger tables is slowish by hypothesis' standards; the checks themselves are cheap.
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]


# --- strategies --------------------------------------------------------------------------------------------------

@st.composite
def distributions(draw, V: int, like: np.ndarray | None = None) -> np.ndarray:
    """An exact float64 law on V tokens: random weights with zeros, one-hot, or (given `like`) a copy of it / a copy
    with some entries zeroed and renormalised. Copies give the p == q cases where rejection must never happen."""
    kinds = ["random", "onehot"] + (["copy", "zeroed_copy"] if like is not None else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "copy":
        return like.copy()
    if kind == "onehot":
        weights = np.zeros(V)
        weights[draw(st.integers(0, V - 1))] = 1.0
    elif kind == "random":  # small integers: zeros are common, dirichlet-like otherwise
        weights = np.array(draw(st.lists(st.integers(0, 9), min_size=V, max_size=V)), dtype=np.float64)
        if weights.sum() == 0:
            weights[draw(st.integers(0, V - 1))] = 1.0
    else:  # zeroed_copy
        keep = np.array(draw(st.lists(st.booleans(), min_size=V, max_size=V)))
        weights = np.where(keep, like, 0.0)
        if weights.sum() == 0:
            return like.copy()
    return weights / weights.sum()


def prefixes(V: int, length: int):
    return itertools.product(range(V), repeat=length)


@st.composite
def target_tables(draw, V: int, k: int) -> list[np.ndarray]:
    """p(.|prefix) for every prefix of length 0..k. Each level draws a small pool of laws and assigns one to every
    prefix; a pool of one makes that level prefix-independent (so a copied draft equals p on every path)."""
    cond = []
    for L in range(k + 1):
        pool = draw(st.lists(distributions(V), min_size=1, max_size=3))
        table = np.empty((V,) * L + (V,))
        for prefix in prefixes(V, L):
            table[prefix] = pool[draw(st.integers(0, len(pool) - 1))]
        cond.append(table)
    return cond


@st.composite
def draft_tables(draw, V: int, k: int, cond: list[np.ndarray]) -> list[np.ndarray]:
    """q_j(.|x_<j) for j = 0..k-1: either non-autoregressive (one q_j for all prefixes, as DFlash drafts are) or
    prefix-dependent. Copies are taken from the target at the same prefix."""
    independent = draw(st.booleans())
    qcond = []
    for j in range(k):
        table = np.empty((V,) * j + (V,))
        if independent:
            table[...] = draw(distributions(V, like=cond[j][(0,) * j]))
        else:
            for prefix in prefixes(V, j):
                table[prefix] = draw(distributions(V, like=cond[j][prefix]))
        qcond.append(table)
    return qcond


@st.composite
def scenarios(draw):
    V = draw(st.integers(2, 6))
    k = draw(st.integers(0, 3))
    cond = draw(target_tables(V, k))
    return V, k, cond, draw(draft_tables(V, k, cond))


# --- exact-law helpers -------------------------------------------------------------------------------------------

def interval_midpoints(probs) -> list[tuple[float, float]]:
    """(midpoint, length) of each non-empty inverse-CDF interval of `probs`: enumerates the final uniform exactly."""
    out, low = [], 0.0
    for high in np.cumsum(np.asarray(probs, dtype=np.float64)):
        if high > low:
            out.append(((low + high) / 2, high - low))
        low = max(low, high)
    return out


def extend_with_target(mass: list[np.ndarray], cond: list[np.ndarray], k: int) -> np.ndarray:
    """Law of length-(k+1) sequences when a prefix committed with mass[L] (shape (V,)*L) is continued by the
    target's own conditionals: that is what decoding does after a commit."""
    law = mass[1]
    for L in range(1, k + 1):
        law = law[..., None] * cond[L] + mass[L + 1]
    return law


def target_law(cond: list[np.ndarray], k: int) -> np.ndarray:
    """p(s) = prod_i p(s_i | s_<i) over all length-(k+1) sequences."""
    V = cond[0].shape[-1]
    mass = [None, cond[0]] + [np.zeros((V,) * (L + 1)) for L in range(1, k + 1)]
    return extend_with_target(mass, cond, k)


def enumerate_sampling_accept(V, k, cond, qcond, rule):
    """Law of the committed prefix x[:accepted] + [next] under `rule`, by calling `sampling_accept` once per
    (draft path, acceptance pattern, final-uniform interval) with that outcome's exact weight.

    Returns (mass by committed length, E[accepted + 1])."""
    mass = [None] + [np.zeros((V,) * L) for L in range(1, k + 2)]
    expected_tau = 0.0
    for x in prefixes(V, k):
        path_weight = math.prod(qcond[j][x[:j]][x[j]] for j in range(k))
        if path_weight == 0:
            continue
        target_probs = torch.from_numpy(np.stack([cond[j][x[:j]] for j in range(k + 1)]))
        draft_probs = torch.from_numpy(np.stack([qcond[j][x[:j]] for j in range(k)]) if k else np.zeros((0, V)))
        draft_tokens = torch.tensor(x, dtype=torch.long)
        a = rule.accept_probability(target_probs[:k], draft_probs, draft_tokens).tolist() if k else []
        for m in range(k + 1):  # first m drafts accepted, draft m rejected (m == k: all accepted)
            weight = path_weight * math.prod(a[:m]) * (1.0 - a[m] if m < k else 1.0)
            if weight == 0:
                continue
            # Accept: a_j/2 < a_j. Reject: (1+a_m)/2 >= a_m. After the rejection, 0.0 would accept: it must be ignored.
            uniforms = [a_j / 2 for a_j in a[:m]] + ([(1.0 + a[m]) / 2] if m < k else []) + [0.0] * (k - m - 1)
            uniforms = torch.tensor(uniforms, dtype=torch.float64)
            final = rule.residual(target_probs[m], draft_probs[m], x[m]) if m < k else target_probs[k]
            for u, length in interval_midpoints(final):
                accepted, token = sampling_accept(draft_tokens, draft_probs, target_probs, uniforms, u, rule)
                assert accepted == m, f"uniforms placed for {m} acceptances, sampling_accept accepted {accepted}"
                mass[m + 1][x[:m] + (token,)] += weight * length
                expected_tau += weight * length * (accepted + 1)
    return mass, expected_tau


def closed_form_expected_tau(cond, qcond, k, rule_name) -> float:
    """1 + sum_{m=1..k} sum_{x_1..x_m} prod_{j<=m} g(p_j(x_j), q_j(x_j)), g = min(p, q) or p*q, along the path."""
    g = np.minimum if rule_name == "speculative" else np.multiply
    total, reach = 1.0, np.ones(())  # reach[x_<j] = prob. that drafts x_<j were drafted and all accepted
    for j in range(k):
        reach = reach[..., None] * g(cond[j], qcond[j])
        total += reach.sum()
    return total


# --- 1-3: block verification under each sampling rule is lossless ---------------------------------------------

@pytest.mark.parametrize("rule_name", sorted(SAMPLING_RULES))
@settings(deadline=None, max_examples=100, suppress_health_check=_SLOW_OK)
@given(scenario=scenarios())
def test_sampling_accept_commits_target_law(rule_name, scenario):
    V, k, cond, qcond = scenario
    mass, _ = enumerate_sampling_accept(V, k, cond, qcond, SAMPLING_RULES[rule_name])
    assert abs(sum(m.sum() for m in mass[1:]) - 1.0) < TOL, "committed-prefix mass is not 1"
    law = extend_with_target(mass, cond, k)
    expected = target_law(cond, k)
    worst = np.unravel_index(np.abs(law - expected).argmax(), law.shape)
    assert np.allclose(law, expected, rtol=0, atol=TOL), (
        f"{rule_name}: P{tuple(int(i) for i in worst)} = {float(law[worst])!r}, target {float(expected[worst])!r}")
    assert abs(law.sum() - 1.0) < TOL


@pytest.mark.parametrize("rule_name", sorted(SAMPLING_RULES))
@settings(deadline=None, max_examples=60, suppress_health_check=_SLOW_OK)
@given(scenario=scenarios())
def test_sampling_accept_expected_length_closed_form(rule_name, scenario):
    V, k, cond, qcond = scenario
    _, expected_tau = enumerate_sampling_accept(V, k, cond, qcond, SAMPLING_RULES[rule_name])
    closed = closed_form_expected_tau(cond, qcond, k, rule_name)
    assert abs(expected_tau - closed) < TOL, f"{rule_name}: E[tau] enumerated {float(expected_tau)!r}, closed form {float(closed)!r}"


def test_sampling_accept_draft_equal_to_target_accepts_everything():
    # q == p with "speculative" accepts every draft: E[tau] = k + 1 exactly, never a residual draw.
    V, k = 3, 2
    cond = [np.full((V,) * L + (V,), 1.0 / V) for L in range(k + 1)]
    mass, expected_tau = enumerate_sampling_accept(V, k, cond, cond[:k], SAMPLING_RULES["speculative"])
    assert expected_tau == pytest.approx(k + 1, abs=TOL)
    assert mass[k + 1].sum() == pytest.approx(1.0, abs=TOL)


# --- 4: greedy -------------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=200)
@given(data=st.data())
def test_greedy_accept_is_longest_argmax_prefix(data):
    V = data.draw(st.integers(2, 6), label="V")
    k = data.draw(st.integers(0, 4), label="k")
    # unique values per row: no ties, so the argmax is well defined
    rows = [data.draw(st.lists(st.floats(-50, 50, allow_nan=False), min_size=V, max_size=V, unique=True))
            for _ in range(k + 1)]
    argmax = [row.index(max(row)) for row in rows]
    # bias drafts toward the argmax so long accepted prefixes are common
    draft = [argmax[j] if data.draw(st.booleans()) else data.draw(st.integers(0, V - 1)) for j in range(k)]
    accepted = next((j for j in range(k) if draft[j] != argmax[j]), k)
    got = greedy_accept(torch.tensor(draft, dtype=torch.long), torch.tensor(rows, dtype=torch.float64))
    assert got == (accepted, argmax[accepted])


def test_greedy_accept_no_drafts():
    # k = 0: nothing to verify, the target's argmax at row 0 is the next token.
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9]])
    assert greedy_accept(torch.empty(0, dtype=torch.long), logits) == (0, 1)


def test_greedy_accept_all_accepted_takes_bonus_row():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    assert greedy_accept(torch.tensor([0, 1]), logits) == (2, 2)
    assert greedy_accept(torch.tensor([0, 2]), logits) == (1, 1)


# --- 5: multi-round speculative sampling at one position -------------------------------------------------------

@st.composite
def multiround_setups(draw):
    V = draw(st.integers(2, 6))
    R = draw(st.integers(1, 3))
    p = draw(distributions(V))
    proposal_laws, residual = [], torch.from_numpy(p)
    for _ in range(R):
        # q_r may copy p itself or the current residual p_r (then round r can never reject)
        like = p if draw(st.booleans()) else residual.numpy()
        q = draw(distributions(V, like=like))
        proposal_laws.append(q)
        residual = speculative_residual(residual, torch.from_numpy(q), 0)  # the residual ignores the token
    return V, R, p, proposal_laws


@settings(deadline=None, max_examples=150, suppress_health_check=_SLOW_OK)
@given(setup=multiround_setups())
def test_multiround_accept_commits_target_law(setup):
    V, R, p, proposal_laws = setup
    qs = [torch.from_numpy(q) for q in proposal_laws]
    law = np.zeros(V)
    for x in prefixes(V, R):  # proposals x_r ~ q_r, independent across rounds
        path_weight = math.prod(proposal_laws[r][x[r]] for r in range(R))
        if path_weight == 0:
            continue
        # the residual chain p_1 = p, p_{r+1} = norm(max(0, p_r - q_r)) and each round's acceptance probability
        chain, a = [torch.from_numpy(p)], []
        for r in range(R):
            a.append(float(speculative_accept_probability(chain[r][None], qs[r][None], torch.tensor([x[r]]))[0]))
            chain.append(speculative_residual(chain[r], qs[r], x[r]))
        for s in range(R + 1):  # rounds < s rejected, round s accepted (s == R: every round rejected)
            weight = path_weight * math.prod(1.0 - a_r for a_r in a[:s]) * (a[s] if s < R else 1.0)
            if weight == 0:
                continue
            uniforms = [(1.0 + a_r) / 2 for a_r in a[:s]] + ([a[s] / 2] if s < R else []) + [0.0] * (R - s - 1)
            finals = interval_midpoints(chain[R]) if s == R else [(0.5, 1.0)]
            for u, length in finals:
                token, round_index = multiround_accept(list(x), qs, torch.from_numpy(p), uniforms, u)
                assert round_index == (s if s < R else None)
                if s < R:
                    assert token == x[s], "an accepted round must commit its own proposal"
                law[token] += weight * length
    assert abs(law.sum() - 1.0) < TOL
    assert np.allclose(law, p, rtol=0, atol=TOL), f"multiround law {law.tolist()} != target {p.tolist()}"


# --- 6: inverse-CDF sampling -----------------------------------------------------------------------------------

def _bits(u: float) -> int:
    return struct.unpack("<q", struct.pack("<d", u))[0]


def _float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def first_uniform_above(probs: torch.Tensor, index: int) -> float:
    """Smallest float u in [0, 1) with sample_from(probs, u) > index (1.0 if none), by bisection on the float bits
    (non-negative doubles order like their bit patterns): the exact right edge of the interval of `index`."""
    low, high = 0, _bits(1.0)  # invariant: answer in [low, high]; high == bits(1.0) stands for "none"
    while low < high:
        mid = (low + high) // 2
        if sample_from(probs, _float(mid)) > index:
            high = mid
        else:
            low = mid + 1
    return _float(low)


@st.composite
def sparse_laws(draw):
    V = draw(st.integers(1, 8))
    p = draw(distributions(V))
    # pad with leading / trailing zeros: the classic places where inverse-CDF sampling returns a dead index
    lead, trail = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    return np.concatenate([np.zeros(lead), p, np.zeros(trail)])


@settings(deadline=None, max_examples=200)
@given(p=sparse_laws())
def test_sample_from_intervals_have_the_probabilities(p):
    probs = torch.from_numpy(p)
    n = len(p)
    edges = [0.0] + [first_uniform_above(probs, i) for i in range(n - 1)] + [1.0]
    lengths = np.diff(edges)
    assert np.all(lengths >= 0), "sample_from is not monotone in the uniform"
    assert np.allclose(lengths, p, rtol=0, atol=1e-12), f"interval lengths {lengths.tolist()} != probs {p.tolist()}"
    # every probe point, including both ends and every CDF edge with its float neighbours, lands on live mass
    probes = {0.0, 1 - 1e-17, np.nextafter(1.0, 0.0)}
    for edge in np.cumsum(p).tolist() + edges:
        probes |= {edge, np.nextafter(edge, 0.0), np.nextafter(edge, 2.0)}
    for u in sorted(v for v in probes if 0.0 <= v <= 1.0):
        index = sample_from(probs, float(u))
        assert 0 <= index < n and p[index] > 0, f"sample_from(u={u!r}) returned index {index} with probability 0"


def test_sample_from_rounding_at_the_top_and_leading_zeros():
    # float cumsum of 0.7 + 0.2 + 0.1 is 0.9999999999999999: the largest uniform below 1 falls past the CDF
    probs = torch.tensor([0.0, 0.7, 0.2, 0.1, 0.0, 0.0], dtype=torch.float64)
    assert float(torch.cumsum(probs, 0)[-1]) < 1.0
    for u in (np.nextafter(1.0, 0.0), 1 - 1e-17):
        assert sample_from(probs, float(u)) == 3
    assert sample_from(probs, 0.0) == 1  # leading zero skipped at u = 0
    assert sample_from(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), 0.0) == 2
    # u exactly on an edge next to an interior zero goes to the next live index
    assert sample_from(torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0], dtype=torch.float64), 0.5) == 3
