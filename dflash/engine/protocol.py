"""The decode protocol's data and plug-in interfaces (the loop that drives them is dflash.engine.loop).

Per cycle: `BlockSizePolicy.choose` picks the length L; a **Drafter** proposes a `Proposal`; a **Verifier** runs
the target over it (`Verification`) and later `commit`s the accepted path to the target cache; an **Acceptor**
picks the accepted path and the token after it. What a cycle decided (`CycleOutcome`) goes back to the drafter,
what it cost (`CycleRecord`) to the policy.

`Proposal` is the ONE tree encoding. Node 0 is the anchor (the committed token at position `start`); nodes
1..N are the drafted tokens in topological order, each under a parent with a smaller index. A **path** is a list
of nodes from the root, always starting at 0: the accepted path, a branch and a leaf path are all written so.
A plain block is the chain 0 -> 1 -> 2 ...; node i sits at position `start + depth(i)`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch

from ..errors import DFlashError


@dataclass
class CycleRecord:
    cycle: int
    token_index: int  # tokens generated before this cycle
    block_size: int  # effective block size (anchor + drafted tokens; trees: the longest branch)
    acceptance_length: int  # tokens committed by this cycle: accepted drafts + the bonus token
    draft_s: float
    verify_s: float
    cycle_s: float
    generated_length: int = 0  # block length the draft meant to fill: up to its first drafted stop token
    verified_nodes: int = 0  # tokens the target processed to verify this cycle (anchor included)
    target_forwards: int = 0  # target forward passes spent verifying this cycle
    proposal_stats: dict = field(default_factory=dict)  # the drafter's cost and counters (draft passes, seeds...)
    accepted_path: list[int] = field(default_factory=list)  # accepted proposal nodes (0 = anchor); trees: which branch


@dataclass
class GenerationResult:
    output_ids: list[int]  # new tokens only
    acceptance_lengths: list[int]
    ttft_s: float  # target prefill + first token + context features
    decode_s: float  # everything after the first token (draft context prefill included)
    wall_s: float
    block_size: int  # requested block size (0: chosen per cycle by a policy)
    temperature: float
    stopped: bool  # ended on a stop token
    trace: list[CycleRecord] = field(default_factory=list)
    # Process CPU seconds of the whole decode (NaN on CUDA, where host CPU time is not the cost). On a CPU with
    # one torch thread this is the decode's compute cost, unaffected by other processes taking turns on the core.
    cpu_s: float = math.nan

    @property
    def num_cycles(self) -> int:
        return len(self.acceptance_lengths)

    @property
    def tau(self) -> float:
        """Mean acceptance length: committed tokens per verification cycle (micro average over cycles)."""
        return sum(self.acceptance_lengths) / len(self.acceptance_lengths) if self.acceptance_lengths else 0.0

    @property
    def tpot_s(self) -> float:
        """Decode time per output token after the first (prefill is TTFT's)."""
        return self.decode_s / max(1, len(self.output_ids) - 1)

    @property
    def tokens_per_s(self) -> float:
        return len(self.output_ids) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def acceptance_histogram(self) -> list[int]:
        """Index t: number of cycles with acceptance length t (t = 0 is always 0)."""
        histogram = [0] * (max(self.acceptance_lengths, default=0) + 1)
        for length in self.acceptance_lengths:
            histogram[length] += 1
        return histogram

    @property
    def per_position_acceptance(self) -> list[tuple[int, int]]:
        """Per draft position j = 1..B-1: (times accepted, times proposed)."""
        width = max((r.block_size for r in self.trace), default=1)
        counts = [[0, 0] for _ in range(width - 1)]
        for record in self.trace:
            for j in range(record.block_size - 1):
                counts[j][1] += 1
                counts[j][0] += j < record.acceptance_length - 1
        return [tuple(c) for c in counts]

    def stat_per_cycle(self, key: str) -> float:
        """Mean of a proposal stat (e.g. "draft_passes", "seeded_tokens") over cycles; 0 without cycles."""
        return sum(r.proposal_stats.get(key, 0) for r in self.trace) / len(self.trace) if self.trace else 0.0

    def to_dict(self, trace: bool = True) -> dict:
        out = {
            "output_ids": self.output_ids, "acceptance_lengths": self.acceptance_lengths, "tau": self.tau,
            "num_cycles": self.num_cycles, "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "decode_s": self.decode_s,
            "wall_s": self.wall_s, "cpu_s": None if math.isnan(self.cpu_s) else self.cpu_s,
            "tokens_per_s": self.tokens_per_s, "block_size": self.block_size,
            "temperature": self.temperature, "stopped": self.stopped,
            "acceptance_histogram": self.acceptance_histogram,
            "per_position_acceptance": [list(c) for c in self.per_position_acceptance],
        }
        if trace:
            out["trace"] = [asdict(r) for r in self.trace]
        return out


class BlockSizePolicy(Protocol):
    """Chooses the block size of each cycle and learns from what the cycle measured."""

    def choose(self, cycle: int) -> int: ...

    def observe(self, record: CycleRecord) -> None: ...


@dataclass
class FixedBlockSize:
    block_size: int

    def choose(self, cycle: int) -> int:
        return self.block_size

    def observe(self, record: CycleRecord) -> None:
        pass


@dataclass
class Proposal:
    """Draft tokens of one cycle as a tree over node 0 = the anchor (module docstring). Read nodes through the
    methods (`tokens_at`, `path_tokens`, `depths`, `ancestors`), which hide how nodes 1..N are stored."""
    tokens: torch.Tensor  # [N] long: tokens[i - 1] is node i's token
    parents: list[int]  # parents[i - 1]: parent of node i, in 0..i-1
    laws: torch.Tensor | None = None  # [N, V] float64: the law node i's token was drawn from (row i-1); None: greedy
    branches: list[list[int]] | None = None  # paths of a multi-proposal tree, in proposal order
    branch_laws: list[torch.Tensor | None] | None = None  # per branch [len - 1, V]: the law of each branch token
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.parents) != self.tokens.numel() or any(not 0 <= p < i for i, p in enumerate(self.parents, 1)):
            raise DFlashError(f"Proposal parents {self.parents} do not make a tree over {self.tokens.numel()} "
                              "drafted nodes: node i needs a parent in 0..i-1. Build trees with "
                              "Proposal.from_chains.")

    @classmethod
    def chain(cls, tokens: torch.Tensor, laws: torch.Tensor | None = None, **stats) -> "Proposal":
        return cls(tokens, list(range(tokens.numel())), laws, stats=stats)

    @classmethod
    def from_chains(cls, chains, laws: list[torch.Tensor | None] | None = None, node_budget: int | None = None,
                    **stats) -> "Proposal":
        """Merge chains (each: the tokens at depths 1..len) into a trie; chains sharing a prefix share its nodes.

        Chains are inserted in order. With `node_budget` (nodes counting the anchor) a chain that does not fit
        is cut to its longest prefix that does, so earlier (preferred) chains keep their full length. `branches`
        are the chains' paths, in order (a chain cut to nothing: [0]).
        """
        if node_budget is not None and node_budget < 1:
            raise DFlashError(f"node_budget must be >= 1 (the anchor alone), got {node_budget}.")
        tokens, parents, branches, children = [], [], [], {}
        for chain in chains:
            path = [0]
            for token in (chain.tolist() if torch.is_tensor(chain) else chain):
                key = (path[-1], int(token))
                if key not in children:
                    if node_budget is not None and len(tokens) + 1 >= node_budget:
                        break
                    tokens.append(int(token))
                    parents.append(path[-1])
                    children[key] = len(tokens)
                path.append(children[key])
            branches.append(path)
        device = chains[0].device if chains and torch.is_tensor(chains[0]) else None
        return cls(torch.tensor(tokens, dtype=torch.long, device=device), parents, None, branches,
                   list(laws) if laws is not None else None, stats=stats)

    @property
    def size(self) -> int:
        """Drafted nodes N (the anchor not counted)."""
        return len(self.parents)

    @property
    def is_chain(self) -> bool:
        return self.parents == list(range(self.size))

    def tokens_at(self, nodes) -> torch.Tensor:
        """The tokens of drafted nodes (each >= 1), as a tensor on the proposal's device."""
        return self.tokens[[node - 1 for node in nodes]]

    def path_tokens(self, path: list[int]) -> list[int]:
        """The drafted tokens along a path (its anchor, node 0, excluded)."""
        return self.tokens_at(path[1:]).tolist()

    def leaf_paths(self) -> list[list[int]]:
        """The paths worth verifying: `branches` when given, else one path per leaf (a chain: one)."""
        if self.branches is not None:
            return self.branches or [[0]]
        if self.is_chain:
            return [list(range(self.size + 1))]
        has_child = set(self.parents)
        paths = []
        for leaf in range(1, self.size + 1):
            if leaf not in has_child:
                path = [leaf]
                while path[-1]:
                    path.append(self.parents[path[-1] - 1])
                paths.append(path[::-1])
        return paths or [[0]]

    def depth(self) -> int:
        """Drafted tokens on the longest path."""
        return max(len(p) for p in self.leaf_paths()) - 1

    def depths(self) -> list[int]:
        """Per node 0..N: its distance from the anchor (the position offset it is verified at)."""
        depths = [0]
        for parent in self.parents:
            depths.append(depths[parent] + 1)
        return depths

    def ancestors(self) -> torch.Tensor:
        """[N+1, N+1] bool: entry (i, j) is True when node j is node i itself or one of its ancestors."""
        ancestors = torch.eye(self.size + 1, dtype=torch.bool)
        for node, parent in enumerate(self.parents, 1):
            ancestors[node] |= ancestors[parent]
        return ancestors


@dataclass
class Verification:
    logits: torch.Tensor  # [N + 1, V]: row i is the target's next-token prediction after node i
    features: torch.Tensor | None  # [1, N + 1, K*H]: the draft's context feature of every node (None: no draft)
    verified_nodes: int  # tokens the target processed
    target_forwards: int


@dataclass
class CycleOutcome:
    """What a cycle decided; drafters learn from it (e.g. suffix recycling keeps the rejected suffix)."""
    start: int  # absolute position of the anchor
    anchor: int
    proposal: Proposal
    path: list[int]  # accepted nodes, starting with 0 (the anchor)
    next_token: int  # the bonus/correction token: the next anchor, at position start + len(path)
    stopped: bool


class Drafter(Protocol):
    def propose(self, anchor: int, start: int, length: int, context_features: torch.Tensor, temperature: float,
                generator: torch.Generator) -> Proposal: ...

    def observe(self, outcome: CycleOutcome) -> None: ...


class Verifier(Protocol):
    def verify(self, target, cache, anchor: int, proposal: Proposal, start: int,
               feature_layers: list[int] | None) -> Verification: ...

    def commit(self, cache, start: int, path: list[int]) -> None: ...


class Acceptor(Protocol):
    def accept(self, proposal: Proposal, logits: torch.Tensor,
               draw: Callable[[int], torch.Tensor]) -> tuple[list[int], int]: ...
