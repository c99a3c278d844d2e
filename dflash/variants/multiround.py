"""Exact multi-round speculative sampling over DFlash blocks (backlog idea 3), with candidate diversity (idea 7).

Each cycle runs R rounds of proposals for the same anchor: round r drafts a block of `round_block_sizes[r]`
(capped by the cycle's length) from the draft's full context cache at the true positions (the research script
gave the draft one context vector labelled one position off, and no cache: spec 8.1.3). The R chains are merged
into one tree and verified together. Acceptance walks the tree from the anchor: at a node, the rounds whose chain
passes through it propose their next tokens x_r ~ q_r in round order; round r is accepted with
min(1, r_r(x_r) / q_r(x_r)) against the running residual r_1 = p, r_{r+1} = norm(max(0, r_r - q_r)); an accepted
round moves the walk to its child, and when every round is rejected the token is drawn from the last residual
(the bonus from p when no round reaches further). `dflash.acceptance.multiround_accept` is the per-node rule; the
walk is proven exact by enumeration in tests/test_acceptance_multiround_tree.py.

Why the walk is exact: a round's token at depth d is drawn from its law independently of the other depths and of
the other rounds, so the rounds still alive at a node (chains that agree with the accepted path so far) propose
with exactly their stated laws; a token picked deterministically (greedy, or a rank-r alternative) has a point
mass as its law.

Diversity (`diversity`): "none" - rounds differ only by block size (and, when sampling, by independent draws);
"rank" - round r (r >= 1) puts its pass's rank-(r+1) token at every uncertain position (draft top-1 minus top-2
probability <= `margin_threshold`); "sparse" - round r swaps only the r-th most uncertain position to its rank-2
token and keeps the rest, so fixing an early error can keep a long accepted run; "block_sizes" - round r drafts
L - 4r positions of the cycle's length L (the sizes in `round_block_sizes` are then ignored, only their count).

Rounds with equal block sizes share one draft pass (its logits do not depend on sampled tokens). Verification:
"linear" runs one target forward per distinct branch (dflash.engine.LinearVerifier); "tree" packs the tree into
one forward with an ancestor-only mask (dflash.tree). `proposal_depth=1` keeps only each round's first token: the
research script's one-position rounds, with the bonus token after an accepted round.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import acceptance as rules
from ..engine import DFlashDrafter, GenerationResult, GreedyAcceptor, LinearVerifier, Proposal, generate, one_hot_law
from ..errors import DFlashError
from ..tree import TreeVerifier
from . import VariantSpec, register

DIVERSITY_MODES = ("none", "rank", "sparse", "block_sizes")
BLOCK_SIZE_STEP = 4  # "block_sizes" diversity: round r drafts L - 4r positions


def uncertain_positions(logits: torch.Tensor, margin_threshold: float) -> list[int]:
    """Block rows whose draft top-1 minus top-2 probability is <= margin_threshold, most uncertain first."""
    if logits.shape[-1] < 2 or logits.shape[0] == 0:
        return []
    top = torch.softmax(logits.double(), dim=-1).topk(2, dim=-1).values
    margins = top[:, 0] - top[:, 1]
    order = torch.argsort(margins, stable=True).tolist()
    return [j for j in order if float(margins[j]) <= margin_threshold]


def diversify(round_index: int, logits: torch.Tensor, tokens: torch.Tensor, laws: torch.Tensor | None,
              mode: str, margin_threshold: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round `round_index`'s tokens after the diversity rule; swapped positions get a point-mass law."""
    if mode in ("none", "block_sizes") or round_index == 0:
        return tokens, laws
    uncertain = uncertain_positions(logits, margin_threshold)
    if mode == "rank":
        rank = round_index  # 0-based: round r takes the rank-(r+1) token
        swaps = [(j, rank) for j in uncertain] if rank < logits.shape[-1] else []
    else:  # sparse
        swaps = [(uncertain[round_index - 1], 1)] if round_index - 1 < len(uncertain) else []
    if not swaps:
        return tokens, laws
    tokens = tokens.clone()
    ranked = logits.topk(max(rank for _, rank in swaps) + 1, dim=-1).indices
    for j, rank in swaps:
        tokens[j] = ranked[j, rank]
    if laws is not None:
        laws = laws.clone()
        rows = [j for j, _ in swaps]
        laws[rows] = one_hot_law(tokens[rows], laws.shape[-1]).to(laws.dtype)
    return tokens, laws


class MultiRoundDrafter(DFlashDrafter):
    """R rounds of DFlash proposals for one anchor, merged into a tree (branches in round order)."""

    def __init__(self, draft, target, *, round_block_sizes=(16, 12), rounds: int | None = None,
                 diversity: str = "none", margin_threshold: float = 1.0, proposal_depth: int | None = None):
        super().__init__(draft, target)
        sizes = tuple(int(b) for b in round_block_sizes)
        rounds = len(sizes) if rounds is None else int(rounds)
        if not sizes or min(sizes) < 1 or rounds < 1:
            raise DFlashError(f"round_block_sizes must be a non-empty list of sizes >= 1 and rounds >= 1; got "
                              f"{round_block_sizes!r} and {rounds!r}. Example: round_block_sizes=(16, 12).")
        if diversity not in DIVERSITY_MODES:
            raise DFlashError(f"Unknown diversity mode {diversity!r}; choose one of {', '.join(DIVERSITY_MODES)}.")
        if proposal_depth is not None and proposal_depth < 1:
            raise DFlashError(f"proposal_depth must be >= 1 or None (whole blocks), got {proposal_depth}.")
        self.sizes = [sizes[r % len(sizes)] for r in range(rounds)]  # cycle through the sizes for more rounds
        self.diversity, self.margin_threshold, self.proposal_depth = diversity, margin_threshold, proposal_depth

    def propose(self, anchor, start, length, context_features, temperature, generator) -> Proposal:
        passes: dict[int, torch.Tensor] = {}
        chains, laws = [], []
        for round_index, size in enumerate(self.sizes):
            size = max(2, min(size, length))
            if self.diversity == "block_sizes":
                size = max(2, length - BLOCK_SIZE_STEP * round_index)
            if size not in passes:  # a pass's logits depend only on the context, anchor and block size
                passes[size] = self.draft_logits(self.masked_block(anchor, size), start, context_features)
            logits = passes[size]
            tokens, law = self.pick(logits, temperature, generator)  # fresh draws per round
            tokens, law = diversify(round_index, logits, tokens, law, self.diversity, self.margin_threshold)
            depth = self.proposal_depth or tokens.numel()
            chains.append(tokens[:depth])
            laws.append(law[:depth] if law is not None else None)
        proposal = Proposal.from_chains(chains, laws if temperature > 0 else None, draft_passes=len(passes),
                                        rounds=len(chains))
        proposal.stats["tree_nodes"] = proposal.size
        return proposal


@dataclass
class MultiRoundAcceptor:
    """Greedy: the tree's argmax path. Sampling: the multi-round residual walk described in the module docstring."""
    temperature: float

    def accept(self, proposal: Proposal, logits: torch.Tensor, draw) -> tuple[list[int], int]:
        if self.temperature == 0:
            return GreedyAcceptor().accept(proposal, logits)
        target_law = rules.probabilities(logits, self.temperature).cpu()
        vocab = target_law.shape[-1]
        tokens = proposal.tokens.cpu()
        branches = proposal.leaf_paths() if proposal.size else []
        branch_laws = proposal.branch_laws or [None] * len(branches)
        return multiround_tree_accept(tokens, branches, [
            law.cpu() if law is not None else one_hot_law(tokens[[n - 1 for n in branch]], vocab)
            for branch, law in zip(branches, branch_laws)], target_law, draw)


def multiround_tree_accept(tokens: torch.Tensor, branches: list[list[int]], branch_laws: list[torch.Tensor],
                           target_probs: torch.Tensor, draw) -> tuple[list[int], int]:
    """The multi-round walk over a tree of round chains; returns (accepted node path from 0, next token).

    tokens [N] (node i's token at i-1); branches: per round, its nodes at depths 1..len; branch_laws: per round
    [len, V], the law each of its tokens was drawn from; target_probs [N+1, V]; draw(n) -> n uniforms. At each node
    the walk draws (alive rounds + 1) uniforms: one accept uniform per alive round, one final uniform.
    """
    path = [0]
    while True:
        node, depth = path[-1], len(path) - 1
        alive = [r for r, branch in enumerate(branches)
                 if len(branch) > depth and (depth == 0 or branch[depth - 1] == node)]
        uniforms = draw(len(alive) + 1).tolist()
        proposals = [int(tokens[branches[r][depth] - 1]) for r in alive]
        token, accepted = rules.multiround_accept(proposals, [branch_laws[r][depth] for r in alive],
                                                  target_probs[node], uniforms[:-1], uniforms[-1])
        if accepted is None:
            return path, token
        path.append(branches[alive[accepted]][depth])


VERIFIERS = {"linear": LinearVerifier, "tree": TreeVerifier}  # tree: one forward, ancestor-only mask


def decode_multiround(target, draft, prompt, *, max_new_tokens, block_size, temperature=0.0, seed=None,
                      stop_token_ids=None, round_block_sizes=(16, 12), rounds=None, diversity="none",
                      margin_threshold=1.0, proposal_depth=None, verifier="linear",
                      draft_temperature=None) -> GenerationResult:
    if verifier not in VERIFIERS:
        raise DFlashError(f"Unknown verifier {verifier!r}; choose one of {', '.join(VERIFIERS)}.")
    drafter = MultiRoundDrafter(draft, target, round_block_sizes=round_block_sizes, rounds=rounds,
                                diversity=diversity, margin_threshold=margin_threshold,
                                proposal_depth=proposal_depth)
    return generate(target, draft, prompt, max_new_tokens=max_new_tokens, block_size=block_size,
                    temperature=temperature, seed=seed, stop_token_ids=stop_token_ids,
                    draft_temperature=draft_temperature, drafter=drafter, verifier=VERIFIERS[verifier](),
                    acceptor=MultiRoundAcceptor(temperature))


register(VariantSpec(
    name="multiround",
    decode=decode_multiround,
    knobs={"round_block_sizes": (16, 12), "rounds": None, "diversity": "none", "margin_threshold": 1.0,
           "proposal_depth": None, "verifier": "linear"},
    knob_grid=({}, {"round_block_sizes": (8, 4)}, {"round_block_sizes": (4,), "rounds": 3},
               {"rounds": 1}, {"proposal_depth": 1}, {"verifier": "tree"},
               {"round_block_sizes": (3, 16, 2), "verifier": "tree"},
               # greedy rounds of one size coincide: diversity makes real branching trees for both verifiers
               {"diversity": "sparse", "rounds": 3, "verifier": "tree"}, {"diversity": "rank", "rounds": 3},
               {"diversity": "block_sizes", "rounds": 2, "proposal_depth": 1, "verifier": "tree"}),
    sampling=True,
    description="R rounds of DFlash proposals per cycle merged into a tree; exact multi-round residual "
                "acceptance (greedy: the argmax path)",
))
