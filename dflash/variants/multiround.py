"""Exact multi-round speculative sampling over DFlash blocks (backlog idea 3), with candidate diversity (idea 7).

Each cycle runs R rounds of proposals for the same anchor: round r drafts a block of `round_block_sizes[r]`
(capped by the cycle's length) from the draft's full context cache at the true positions (the research script
gave the draft one context vector labelled one position off, and no cache: spec 8.1.3). The R chains are merged
into one tree and verified together. Acceptance walks the tree from the anchor: at a node, the rounds whose chain
passes through it propose their next tokens x_r ~ q_r in round order; round r is accepted with
min(1, r_r(x_r) / q_r(x_r)) against the running residual r_1 = p, r_{r+1} = norm(max(0, r_r - q_r)); an accepted
round moves the walk to its child, and when every round is rejected the token is drawn from the last residual
(the bonus from p when no round reaches further).

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
"linear" runs one plain causal forward per distinct branch (`BranchwiseVerifier`, below); "tree" packs the tree
into one forward with an ancestor-only mask (dflash.engine.verifiers.TreeVerifier). `proposal_depth=1` keeps only
each round's first token: the research script's one-position rounds, with the bonus token after an accepted
round. Acceptance is the engine's tree walk (dflash.engine.acceptance.multiround_tree_accept), proven exact by
enumeration in tests/test_acceptance_multiround_tree.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine import DFlashDrafter, Proposal, TreeSamplingAcceptor, TreeVerifier, Verification, one_hot_law
from ..engine import probability_margins
from ..engine.cache import crop_cache, with_cache
from ..engine.verifiers import check_cache_at, context_features
from ..errors import DFlashError
from ..registry import Plugins, VariantSpec, register

DIVERSITY_MODES = ("none", "rank", "sparse", "block_sizes")
BLOCK_SIZE_STEP = 4  # "block_sizes" diversity: round r drafts L - 4r positions


def uncertain_positions(logits: torch.Tensor, margin_threshold: float) -> list[int]:
    """Block rows whose draft top-1 minus top-2 probability is <= margin_threshold, most uncertain first."""
    if logits.shape[-1] < 2 or logits.shape[0] == 0:
        return []
    margins = probability_margins(logits)
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


@dataclass(frozen=True)
class MultiRoundKnobs:
    round_block_sizes: tuple = (16, 12)  # block size per round (capped by the cycle's length), cycled for more rounds
    rounds: int | None = None  # None: one round per entry of round_block_sizes
    diversity: str = "none"  # DIVERSITY_MODES (module docstring)
    margin_threshold: float = 1.0  # "rank"/"sparse": a position is uncertain when top-1 - top-2 <= this
    proposal_depth: int | None = None  # drafted tokens kept per round; None: whole blocks
    verifier: str = "linear"  # VERIFIERS

    def __post_init__(self):
        sizes = tuple(self.round_block_sizes)
        if not sizes or min(sizes) < 1 or (self.rounds is not None and self.rounds < 1):
            raise DFlashError(f"round_block_sizes must be a non-empty list of sizes >= 1 and rounds >= 1; got "
                              f"{self.round_block_sizes!r} and {self.rounds!r}. Example: round_block_sizes=(16, 12).")
        if self.diversity not in DIVERSITY_MODES:
            raise DFlashError(f"Unknown diversity mode {self.diversity!r}; choose one of "
                              f"{', '.join(DIVERSITY_MODES)}.")
        if self.proposal_depth is not None and self.proposal_depth < 1:
            raise DFlashError(f"proposal_depth must be >= 1 or None (whole blocks), got {self.proposal_depth}.")
        if self.verifier not in VERIFIERS:
            raise DFlashError(f"Unknown verifier {self.verifier!r}; choose one of {', '.join(VERIFIERS)}.")


class MultiRoundDrafter(DFlashDrafter):
    """R rounds of DFlash proposals for one anchor, merged into a tree (branches in round order)."""

    def __init__(self, draft, target, knobs: MultiRoundKnobs):
        super().__init__(draft, target)
        sizes = tuple(int(b) for b in knobs.round_block_sizes)
        rounds = len(sizes) if knobs.rounds is None else int(knobs.rounds)
        self.sizes = [sizes[r % len(sizes)] for r in range(rounds)]  # cycle through the sizes for more rounds
        self.diversity, self.margin_threshold = knobs.diversity, knobs.margin_threshold
        self.proposal_depth = knobs.proposal_depth

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


def maximal_paths(paths: list[list[int]]) -> list[list[int]]:
    """The paths that are not a prefix of another (duplicates kept once), in order: the forwards worth running."""
    out = []
    for index, path in enumerate(paths):
        longer = [p for i, p in enumerate(paths) if i != index and p[: len(path)] == path]
        if not any(len(p) > len(path) or (len(p) == len(path) and paths.index(p) < index) for p in longer):
            out.append(path)
    return out


class BranchwiseVerifier:
    """Verifies each distinct root-to-leaf branch with one plain causal forward (the cost a tree verifier saves).
    The K/V of every branch but the last is kept aside so `commit` installs the accepted branch's without
    re-running the target."""

    def __init__(self):
        self._stash: list[tuple[list[int], list | None]] = []

    def verify(self, target, cache, anchor: int, proposal: Proposal, start: int,
               feature_layers: list[int] | None) -> Verification:
        check_cache_at(cache, start)
        device = target.get_input_embeddings().weight.device
        n = proposal.size
        branches = maximal_paths(proposal.leaf_paths())
        logits = features = None
        self._stash, nodes_done, verified = [], set(), 0
        for index, path in enumerate(branches):
            crop_cache(cache, start)
            ids = torch.cat([torch.tensor([anchor], device=device), proposal.tokens_at(path[1:]).to(device)])
            out = target(input_ids=ids[None], **with_cache(target, cache), use_cache=True,
                         output_hidden_states=feature_layers is not None)
            verified += ids.numel()
            branch_features = context_features(out, feature_layers)
            if logits is None:
                logits = out.logits.new_zeros((n + 1, out.logits.shape[-1]))
                if branch_features is not None:
                    features = branch_features.new_zeros((1, n + 1, branch_features.shape[-1]))
            rows = [row for row, node in enumerate(path) if node not in nodes_done]
            nodes = [path[row] for row in rows]
            nodes_done.update(nodes)
            logits[nodes] = out.logits[0, rows]
            if features is not None:
                features[0, nodes] = branch_features[0, rows]
            last = index == len(branches) - 1
            kv = None if last else [(layer.keys[..., start:, :].clone(), layer.values[..., start:, :].clone())
                                    for layer in cache.layers]
            self._stash.append((path, kv))
        return Verification(logits, features, verified, len(branches))

    def commit(self, cache, start: int, path: list[int]) -> None:
        """Keep the anchor and the accepted nodes in the target cache."""
        for branch, kv in reversed(self._stash):  # the last verified branch is still in the cache
            if branch[: len(path)] == path:
                crop_cache(cache, start if kv is not None else start + len(path))
                if kv is not None:
                    for layer_index, (keys, values) in enumerate(kv):
                        cache.update(keys[..., : len(path), :], values[..., : len(path), :], layer_index)
                self._stash = []
                return
        raise AssertionError(f"accepted path {path} is not on any verified branch")


VERIFIERS = {"linear": BranchwiseVerifier, "tree": TreeVerifier}  # tree: one forward, ancestor-only mask


def make_plugins(draft, target, knobs: MultiRoundKnobs, temperature: float) -> Plugins:
    return Plugins(MultiRoundDrafter(draft, target, knobs), VERIFIERS[knobs.verifier](),
                   TreeSamplingAcceptor(temperature))


register(VariantSpec(
    name="multiround",
    knob_class=MultiRoundKnobs,
    make_plugins=make_plugins,
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
