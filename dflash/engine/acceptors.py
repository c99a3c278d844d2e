"""Acceptor plug-ins: the engine's acceptance rules (dflash.engine.acceptance) applied to a Proposal, with the
run's random numbers drawn through `draw(n)`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DFlashError
from . import acceptance as rules
from .drafter import one_hot_law
from .protocol import Proposal


class GreedyAcceptor:
    """Temperature 0: follow the child whose token equals the target argmax (chains and trees)."""

    def accept(self, proposal: Proposal, logits: torch.Tensor, draw=None) -> tuple[list[int], int]:
        if proposal.is_chain:
            accepted, next_token = rules.greedy_accept(proposal.tokens.to(logits.device), logits)
            return list(range(accepted + 1)), next_token
        return rules.greedy_tree_accept(proposal.tokens, proposal.parents, logits)


@dataclass
class ChainSamplingAcceptor:
    """Temperature > 0, one chain: `rule` (speculative or match) with uniforms drawn from the run's generator."""
    temperature: float
    rule: rules.SamplingRule

    def accept(self, proposal: Proposal, logits: torch.Tensor, draw) -> tuple[list[int], int]:
        if not proposal.is_chain:
            raise DFlashError("ChainSamplingAcceptor verifies one chain; a tree proposal needs a tree acceptor "
                              "(dflash.engine.acceptors.TreeSamplingAcceptor).")
        k = proposal.size
        target_law = rules.probabilities(logits, self.temperature).cpu()
        tokens = proposal.tokens.cpu()
        draft_law = proposal.laws if proposal.laws is not None else one_hot_law(tokens, logits.shape[-1])
        accepted, next_token = rules.sampling_accept(tokens, draft_law.cpu(), target_law, draw(k),
                                                     float(draw(1)), self.rule)
        return list(range(accepted + 1)), next_token


@dataclass
class TreeSamplingAcceptor:
    """A tree of proposals: greedy, the argmax walk; sampling, the exact multi-proposal walk
    (`rules.multiround_tree_accept`) over the proposal's branches with their laws (none given: point masses,
    where the walk is SpecInfer's recursive rejection over siblings)."""
    temperature: float

    def accept(self, proposal: Proposal, logits: torch.Tensor, draw) -> tuple[list[int], int]:
        if self.temperature == 0:
            return GreedyAcceptor().accept(proposal, logits)
        target_law = rules.probabilities(logits, self.temperature).cpu()
        vocab = target_law.shape[-1]
        branches = proposal.leaf_paths() if proposal.size else []
        branch_tokens = [proposal.path_tokens(branch) for branch in branches]
        branch_laws = proposal.branch_laws or [None] * len(branches)
        laws = [law.cpu() if law is not None else one_hot_law(torch.tensor(tokens, dtype=torch.long), vocab)
                for tokens, law in zip(branch_tokens, branch_laws)]
        return rules.multiround_tree_accept(branches, branch_tokens, laws, target_law, draw)


def default_acceptor(temperature: float, acceptance: str = "speculative", tree: bool = False):
    """The acceptor for a chain (greedy, or the `acceptance` sampling rule) or, with `tree`, for a tree."""
    if tree:
        return TreeSamplingAcceptor(temperature)
    return GreedyAcceptor() if temperature == 0 else ChainSamplingAcceptor(temperature,
                                                                           rules.SAMPLING_RULES[acceptance])
