"""Acceptance rules for verifying a drafted block. Pure functions: probabilities in, random numbers in.

Every sampling rule here is a pair (accept_probability, residual):
  * draft token x_j, drawn from the draft's distribution q_j, is accepted with accept_probability(p_j, q_j, x_j);
  * on the first rejection, the committed token is drawn from residual(p_j, q_j, x_j);
  * if every draft token is accepted, a bonus token is drawn from the target's next distribution.
Random numbers are arguments (uniforms in [0, 1)), so tests can place them exactly and enumerate outcomes.
Greedy decoding is the deterministic special case: accept iff the draft equals the target's argmax.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Tensor = torch.Tensor


def probabilities(logits: Tensor, temperature: float) -> Tensor:
    """Target/draft distribution at a temperature, in float64 so the acceptance math is not the noise floor."""
    return torch.softmax(logits.double() / temperature, dim=-1)


def sample_from(probs: Tensor, uniform: float) -> int:
    """Inverse-CDF sample: the smallest index whose cumulative probability exceeds `uniform`.

    Never returns a zero-probability index, even when rounding leaves the last cumulative value below `uniform`.
    """
    cdf = torch.cumsum(probs, dim=-1)
    index = int(torch.searchsorted(cdf, torch.tensor([uniform], dtype=cdf.dtype, device=cdf.device), right=True))
    if index >= probs.numel():  # rounding left the total mass just below `uniform`: take the last token with mass
        index = int(torch.nonzero(probs > 0).flatten()[-1])
    return index


def _normalized(weights: Tensor, fallback: Tensor) -> Tensor:
    total = weights.sum()
    return weights / total if total > 0 else fallback


# --- rule: standard speculative sampling (Leviathan et al. / Chen et al.) -------------------------------------

def speculative_accept_probability(p: Tensor, q: Tensor, tokens: Tensor) -> Tensor:
    """min(1, p(x)/q(x)) per position. A token with q(x) = 0 cannot have been proposed; it gets p(x) > 0."""
    p_x = p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    q_x = q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ratio = torch.where(q_x > 0, p_x / torch.where(q_x > 0, q_x, torch.ones_like(q_x)), (p_x > 0).to(p.dtype))
    return ratio.clamp(max=1.0)


def speculative_residual(p: Tensor, q: Tensor, token: int) -> Tensor:
    """norm(max(0, p - q)). When p == q no rejection can happen; p is returned so the value is still a law."""
    return _normalized((p - q).clamp(min=0.0), p)


# --- rule: the upstream DFlash rule: accept iff the draft equals an independent target sample ------------------

def match_accept_probability(p: Tensor, q: Tensor, tokens: Tensor) -> Tensor:
    return p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def match_residual(p: Tensor, q: Tensor, token: int) -> Tensor:
    """The target sample conditioned on not being the rejected draft token."""
    without = p.clone()
    without[token] = 0.0
    return _normalized(without, p)


@dataclass(frozen=True)
class SamplingRule:
    name: str
    accept_probability: Callable[[Tensor, Tensor, Tensor], Tensor]
    residual: Callable[[Tensor, Tensor, int], Tensor]


SAMPLING_RULES = {
    "speculative": SamplingRule("speculative", speculative_accept_probability, speculative_residual),
    "match": SamplingRule("match", match_accept_probability, match_residual),
}


def greedy_accept(draft_tokens: Tensor, target_logits: Tensor) -> tuple[int, int]:
    """Longest prefix of `draft_tokens` [k] equal to the target argmax; returns (accepted, next token).

    target_logits [k+1, V]: row j is the target's prediction for the position of draft token j (row k: bonus).
    """
    target_tokens = target_logits.argmax(dim=-1)
    k = draft_tokens.numel()
    accepted = int(torch.cumprod((draft_tokens == target_tokens[:k]).to(torch.int64), dim=0).sum()) if k else 0
    return accepted, int(target_tokens[accepted])


def sampling_accept(draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor, accept_uniforms: Tensor,
                    final_uniform: float, rule: SamplingRule) -> tuple[int, int]:
    """Verify k drafted tokens under a sampling rule; returns (accepted, next token).

    draft_tokens [k]; draft_probs [k, V] (the law each draft token was drawn from); target_probs [k+1, V];
    accept_uniforms [k]; final_uniform draws the residual (on rejection) or the bonus token (all accepted).
    """
    k = draft_tokens.numel()
    if k:
        accept = accept_uniforms < rule.accept_probability(target_probs[:k], draft_probs, draft_tokens)
        accepted = int(torch.cumprod(accept.to(torch.int64), dim=0).sum())
    else:
        accepted = 0
    if accepted == k:
        return k, sample_from(target_probs[k], final_uniform)
    j = accepted
    return j, sample_from(rule.residual(target_probs[j], draft_probs[j], int(draft_tokens[j])), final_uniform)


def multiround_accept(proposals: list[int], proposal_probs: list[Tensor], target_probs: Tensor,
                      accept_uniforms: list[float], final_uniform: float) -> tuple[int, int | None]:
    """Exact multi-round speculative sampling at one position; returns (token, index of accepted round or None).

    Round r proposes x_r ~ q_r; accept with min(1, p_r(x_r)/q_r(x_r)); on rejection p_{r+1} = norm(max(0, p_r - q_r)).
    After the last round the token is drawn from the final residual. The committed token is distributed as p_1.
    """
    residual = target_probs
    for round_index, (token, q) in enumerate(zip(proposals, proposal_probs)):
        accept_probability = speculative_accept_probability(residual[None], q[None], torch.tensor([token]))[0]
        if accept_uniforms[round_index] < accept_probability:
            return token, round_index
        residual = speculative_residual(residual, q, token)
    return sample_from(residual, final_uniform), None


# --- tree walks: one path from the anchor through a draft tree (dflash.engine.protocol.Proposal's encoding) ------

def greedy_tree_accept(tokens: Tensor, parents: list[int], target_logits: Tensor) -> tuple[list[int], int]:
    """Greedy verification of a draft tree; returns (accepted node path starting at 0, next token).

    tokens [N] are the tokens of nodes 1..N, parents[i-1] the parent of node i; target_logits [N+1, V]: row i is
    the target's prediction after node i. From the anchor (node 0), step to the child whose token equals the
    target argmax while one exists. A chain gives `greedy_accept`'s answer.
    """
    target_tokens = target_logits.argmax(dim=-1).tolist()
    children: dict[tuple[int, int], int] = {}
    for node, (parent, token) in enumerate(zip(parents, tokens.tolist()), start=1):
        children.setdefault((parent, token), node)  # duplicate siblings: the first one stands for all
    path = [0]
    while (path[-1], target_tokens[path[-1]]) in children:
        path.append(children[(path[-1], target_tokens[path[-1]])])
    return path, target_tokens[path[-1]]


def multiround_tree_accept(branches: list[list[int]], branch_tokens: list[list[int]], branch_laws: list[Tensor],
                           target_probs: Tensor, draw: Callable[[int], Tensor]) -> tuple[list[int], int]:
    """Exact sampling walk over a tree of proposals; returns (accepted node path from 0, next token).

    branches: per proposal (round or candidate), its path from node 0; branch_tokens[r][d] and branch_laws[r][d]
    are the token of node branches[r][d + 1] and the law [V] it was drawn from (a point mass when it was picked
    deterministically); target_probs [N+1, V]: row i is the target's law after node i; draw(n) -> n uniforms.
    At each node the proposals still alive (their path agrees with the walk so far) are tried in order with
    `multiround_accept`, drawing one accept uniform per alive proposal and one final uniform. An accepted
    proposal moves the walk to its child; when all are rejected the token comes from the last residual.
    A proposal's token at depth d is drawn independently of its other depths and of the other proposals, so the
    ones alive at a node propose with exactly their stated laws, which makes every step exact.
    """
    path = [0]
    while True:
        node, depth = path[-1], len(path) - 1
        alive = [r for r, branch in enumerate(branches) if len(branch) > depth + 1 and branch[depth] == node]
        uniforms = draw(len(alive) + 1).tolist()
        token, accepted = multiround_accept([branch_tokens[r][depth] for r in alive],
                                            [branch_laws[r][depth] for r in alive],
                                            target_probs[node], uniforms[:-1], uniforms[-1])
        if accepted is None:
            return path, token
        path.append(branches[alive[accepted]][depth + 1])
