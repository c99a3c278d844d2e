"""Exact enumeration: the multi-round tree walk (dflash.variants.multiround) commits exactly the target's law.

R rounds each draft a chain (lengths 1..k, like different block sizes); round r's token at depth d is drawn from
q_r[d], independently of the other depths and rounds (a DFlash pass; a point mass models a greedy or rank-picked
token). The chains are merged into a trie and `TreeSamplingAcceptor.accept` walks it. Every random choice is
enumerated with its exact weight: the drafted tokens of every round, and, at every node the walk visits, which
alive round is accepted (uniforms placed inside the accept/reject intervals) or, when all are rejected, each
interval of the final residual. The uniforms are served in the order the acceptor asks for them, and every tape
must be consumed exactly. Conventions and helpers are those of test_acceptance_exact.py.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_acceptance_exact import TOL, _SLOW_OK, distributions, extend_with_target, interval_midpoints, target_law, \
    target_tables

from dflash.engine.acceptance import speculative_accept_probability, speculative_residual
from dflash.engine import Proposal, TreeSamplingAcceptor


@st.composite
def round_setups(draw):
    V = draw(st.integers(2, 3))
    k = draw(st.integers(1, 2))
    R = draw(st.integers(1, 3))
    cond = draw(target_tables(V, k))
    lengths = [draw(st.integers(1, k)) for _ in range(R)]
    # q_r[d]: prefix-independent, like a DFlash pass; copies of p at the all-zero prefix give p == q cases
    laws = [[draw(distributions(V, like=cond[d][(0,) * d])) for d in range(lengths[r])] for r in range(R)]
    return V, k, cond, laws


class Tape:
    def __init__(self, values):
        self.values, self.used = list(values), 0

    def __call__(self, n):
        assert self.used + n <= len(self.values), "the acceptor asked for more uniforms than the walk needs"
        out = self.values[self.used: self.used + n]
        self.used += n
        return torch.tensor(out, dtype=torch.float64)


def enumerate_walk(V, k, cond, laws):
    """Mass of each committed sequence (accepted path tokens + next token), by committed length."""
    R = len(laws)
    mass = [None] + [np.zeros((V,) * L) for L in range(1, k + 2)]
    acceptor = TreeSamplingAcceptor(temperature=1.0)
    for drafts in itertools.product(*[itertools.product(range(V), repeat=len(q)) for q in laws]):
        weight = math.prod(laws[r][d][drafts[r][d]] for r in range(R) for d in range(len(laws[r])))
        if weight == 0:
            continue
        q_tensors = [torch.from_numpy(np.stack(q)) for q in laws]
        proposal = Proposal.from_chains([torch.tensor(x, dtype=torch.long) for x in drafts], q_tensors)
        node_prefix = {0: ()}
        for branch, x in zip(proposal.branches, drafts):
            for depth, node in enumerate(branch[1:]):
                node_prefix[node] = tuple(x[: depth + 1])
        target_probs = np.stack([cond[len(node_prefix[n])][node_prefix[n]] for n in range(proposal.size + 1)])
        logits = torch.from_numpy(np.log(np.where(target_probs > 0, target_probs, 1e-300)))  # softmax(log p) = p (0 -> 1e-300: far below TOL)

        def explore(prefix, tape, path_weight):
            depth, p = len(prefix), torch.from_numpy(cond[len(prefix)][prefix])
            alive = [r for r in range(R) if len(drafts[r]) > depth and drafts[r][:depth] == prefix]
            chain, a = [p], []
            for r in alive:
                q = q_tensors[r][depth]
                token = drafts[r][depth]
                a.append(float(speculative_accept_probability(chain[-1][None], q[None], torch.tensor([token]))[0]))
                chain.append(speculative_residual(chain[-1], q, token))
            for s in range(len(alive) + 1):  # alive rounds < s rejected, round s accepted (s == len: all rejected)
                w = path_weight * math.prod(1.0 - a_r for a_r in a[:s]) * (a[s] if s < len(alive) else 1.0)
                if w == 0:
                    continue
                uniforms = [(1.0 + a_r) / 2 for a_r in a[:s]] + ([a[s] / 2] if s < len(alive) else [])
                uniforms += [0.0] * (len(alive) - len(uniforms))
                if s < len(alive):
                    explore(prefix + (drafts[alive[s]][depth],), tape + uniforms + [0.5], w)
                    continue
                for u, length in interval_midpoints(chain[-1]):
                    served = Tape(tape + uniforms + [u])
                    path, token = acceptor.accept(proposal, logits, served)
                    assert served.used == len(served.values), "the acceptor left uniforms of the walk unused"
                    assert tuple(int(proposal.tokens[n - 1]) for n in path[1:]) == prefix
                    mass[depth + 1][prefix + (token,)] += w * length

        explore((), [], weight)
    return mass


@settings(deadline=None, max_examples=60, suppress_health_check=_SLOW_OK)
@given(setup=round_setups())
def test_multiround_tree_walk_commits_target_law(setup):
    V, k, cond, laws = setup
    mass = enumerate_walk(V, k, cond, laws)
    assert abs(sum(m.sum() for m in mass[1:]) - 1.0) < TOL, "committed-prefix mass is not 1"
    law, expected = extend_with_target(mass, cond, k), target_law(cond, k)
    worst = np.unravel_index(np.abs(law - expected).argmax(), law.shape)
    assert np.allclose(law, expected, rtol=0, atol=TOL), (
        f"P{tuple(int(i) for i in worst)} = {float(law[worst])!r}, target {float(expected[worst])!r}")


def test_a_second_round_raises_expected_acceptance():
    """Guards the enumeration's power: with two rounds of point masses on different tokens, the first drafted
    position is accepted with p(x1) + p(x2), not p(x1)."""
    V, k = 3, 1
    p = np.array([0.5, 0.3, 0.2])
    cond = [p, np.tile(p, (V, 1))]
    laws = [[np.eye(V)[0]], [np.eye(V)[1]]]
    mass = enumerate_walk(V, k, cond, laws)
    assert abs(mass[2].sum() - 0.8) < TOL  # a round accepted: 2 tokens committed
    single = enumerate_walk(V, k, cond, laws[:1])
    assert abs(single[2].sum() - 0.5) < TOL
