"""The DFlash decode loop: prefill, then per cycle propose -> verify -> accept -> commit.

The protocol (every research variant is a small plug-in, never a copy of this loop):

* `BlockSizePolicy.choose(cycle)` picks the cycle's length L (anchor + up to L-1 drafted positions).
* A **Drafter** (`propose(anchor, start, length, context_features, temperature, generator) -> Proposal`,
  `observe(CycleOutcome)`) proposes draft tokens. A `Proposal` is a tree over node 0 = the anchor: `tokens[i-1]`
  is node i's token and `parents[i-1]` its parent (< i); a plain block is the chain 0 -> 1 -> 2 ...; `laws` [N, V]
  are the laws the tokens were drawn from (None: greedy); `branches` lists the root-to-leaf node paths of a
  multi-proposal tree, in proposal order, with per-branch `branch_laws`; `stats` is free-form and lands in the
  cycle record (draft passes, seeded tokens, ...). `DFlashDrafter` is the default; its `draft_logits` runs one
  draft pass over any block inputs, keeping the draft's context cache exact (one entry per position < anchor),
  so a drafter may run several passes per cycle.
* A **Verifier** (`verify(target, cache, anchor, proposal, start, feature_layers) -> Verification`,
  `commit(cache, start, path)`) runs the target over the proposal: `Verification.logits` [N+1, V] (row i: the
  target's prediction after node i) and `features` [1, N+1, K*H] (the draft's context features per node).
  `commit` leaves the target cache holding exactly the prompt, the committed text before the anchor, the anchor
  and the accepted nodes. `LinearVerifier` (default) runs one forward per root-to-leaf branch: a plain block is
  one forward, as before. A tree verifier (ancestor-only mask, one forward) plugs in here.
* An **Acceptor** (`accept(proposal, logits, draw) -> (path, next_token)`) picks the accepted node path
  [0, n1, n2, ...] and the token after it; `draw(n)` returns n uniforms from the run's generator, so the rules
  stay pure functions of their random numbers (dflash.acceptance). `GreedyAcceptor` follows the child equal to the
  target argmax (chains and trees); `ChainSamplingAcceptor` is speculative/match sampling for chains.
* The **commit** step is shared: extend the output, stop tokens (new tokens only), `verifier.commit`, the
  committed nodes' context features for the next draft, a `CycleRecord` (with cost: `verified_nodes`,
  `target_forwards`, `proposal_stats`, and the `accepted_path`), `policy.observe`, `drafter.observe`.
  `protocol_costs(results)` turns those into per-cycle cost metrics for an ablation table.

`generate(..., drafter=, verifier=, acceptor=)` takes the plug-ins; a variant module builds them and calls it.
Target-only decoding is the same loop with block size 1 and no draft, so timings compare like with like.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch

from . import acceptance as rules
from .cache import cache_length, crop_cache, new_cache, with_cache
from .errors import DFlashError
from .model import DFlashDraftModel, extract_context_feature


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
            "wall_s": self.wall_s, "cpu_s": None if math.isnan(self.cpu_s) else self.cpu_s, "tokens_per_s": self.tokens_per_s,
            "block_size": self.block_size,
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


# --- the protocol's data ----------------------------------------------------------------------------------------

@dataclass
class Proposal:
    """Draft tokens of one cycle, as a tree over node 0 = the anchor (see the module docstring)."""
    tokens: torch.Tensor  # [N] long: tokens of nodes 1..N
    parents: list[int]  # parents[i - 1]: parent node of node i, in 0..i-1
    laws: torch.Tensor | None = None  # [N, V] float64 law each token was drawn from; None: greedy
    branches: list[list[int]] | None = None  # root-to-leaf node paths (without node 0), in proposal order
    branch_laws: list[torch.Tensor | None] | None = None  # per branch [len, V]: the law of each branch token
    stats: dict = field(default_factory=dict)

    @classmethod
    def chain(cls, tokens: torch.Tensor, laws: torch.Tensor | None = None, **stats) -> "Proposal":
        return cls(tokens, list(range(tokens.numel())), laws, stats=stats)

    @classmethod
    def from_chains(cls, chains: list[torch.Tensor], laws: list[torch.Tensor | None] | None = None,
                    **stats) -> "Proposal":
        """Merge chains (each: tokens for depths 1..len) into a trie: chains sharing a prefix share its nodes."""
        tokens, parents, branches, children = [], [], [], {}
        for chain in chains:
            node, path = 0, []
            for token in chain.tolist():
                key = (node, token)
                if key not in children:
                    tokens.append(token)
                    parents.append(node)
                    children[key] = len(tokens)
                node = children[key]
                path.append(node)
            branches.append(path)
        device = chains[0].device if chains else None
        return cls(torch.tensor(tokens, dtype=torch.long, device=device), parents, None, branches,
                   list(laws) if laws is not None else None, stats=stats)

    @property
    def size(self) -> int:
        return len(self.parents)

    @property
    def is_chain(self) -> bool:
        return self.parents == list(range(self.size))

    def leaf_paths(self) -> list[list[int]]:
        """Root-to-leaf node paths (node 0 left out): `branches` when given, else every leaf of the tree."""
        if self.branches is not None:
            return self.branches or [[]]
        if self.is_chain:
            return [list(range(1, self.size + 1))]
        has_child = set(self.parents)
        paths = []
        for leaf in range(1, self.size + 1):
            if leaf not in has_child:
                path, node = [], leaf
                while node:
                    path.append(node)
                    node = self.parents[node - 1]
                paths.append(path[::-1])
        return paths or [[]]

    def depth(self) -> int:
        return max(len(p) for p in self.leaf_paths())


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


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B, P], valid [B, P] (False on padding) and positions [B, P] (0 on padding) of left-padded prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        valid[row, width - len(prompt):] = True
    positions = (valid.cumsum(dim=1) - 1).clamp(min=0)
    return ids, valid, positions


# --- pair and argument checks -----------------------------------------------------------------------------------

def check_pair(target, draft: DFlashDraftModel) -> None:
    """Fail early, with a fix, when a draft cannot work with a target."""
    text = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    vocab = target.get_input_embeddings().weight.shape[0]
    if draft.config.hidden_size != text.hidden_size:
        raise DFlashError(f"Draft hidden size {draft.config.hidden_size} does not match the target's "
                          f"{text.hidden_size}: this draft was trained for another target. Use the draft made for "
                          "this target (e.g. z-lab/Qwen3-4B-DFlash-b16 with Qwen/Qwen3-4B).")
    if draft.config.vocab_size != vocab:
        raise DFlashError(f"Draft vocabulary size {draft.config.vocab_size} does not match the target's embedding "
                          f"table ({vocab} rows): the draft borrows the target's embeddings and LM head, so they "
                          "must be the same model family.")
    bad = [i for i in draft.target_layer_ids if not 0 <= i < text.num_hidden_layers]
    if bad:
        raise DFlashError(f"Draft target_layer_ids {draft.target_layer_ids} include {bad}, outside the target's "
                          f"{text.num_hidden_layers} decoder layers (valid: 0..{text.num_hidden_layers - 1}). Fix "
                          "dflash_config.target_layer_ids in the draft's config.json.")
    if draft.mask_token_id is None or not 0 <= int(draft.mask_token_id) < vocab:
        raise DFlashError(f"Draft mask_token_id {draft.mask_token_id!r} is missing or outside the vocabulary "
                          f"(0..{vocab - 1}). Set dflash_config.mask_token_id in the draft's config.json to the id "
                          "of the <|MASK|> token the draft was trained with.")


SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


def target_positions(target) -> int | None:
    """The number of positions the target was built for (max_position_embeddings), if its config says."""
    text = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    return getattr(text, "max_position_embeddings", None)


def check_prompt(target, input_ids: torch.Tensor, max_new_tokens: int, what: str = "The prompt") -> None:
    """A prompt the target can decode: not empty, every id in its vocabulary, and prompt plus new tokens within
    the positions it was built for (past them a RoPE model still runs, silently wrong)."""
    if input_ids.numel() == 0:
        raise DFlashError(f"{what} is empty: give at least one token (for example the chat template's "
                          "generation prompt).")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DFlashError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
    vocab = target.get_input_embeddings().weight.shape[0]
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise DFlashError(f"{what} holds token id {bad}, outside the target's vocabulary (0..{vocab - 1}). Use ids "
                          "from this target's tokenizer, or pass text instead of ids.")
    positions = target_positions(target)
    if positions is not None and input_ids.numel() + max_new_tokens > positions:
        room = positions - input_ids.numel()
        raise DFlashError(f"{what} ({input_ids.numel()} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                          f"target's {positions} positions (max_position_embeddings). " +
                          (f"Lower max_new_tokens to at most {room}." if room >= 1 else "Shorten the prompt."))


def check_temperature(temperature, name: str = "temperature") -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise DFlashError(f"{name} must be a finite number >= 0 (0 = greedy), got {temperature!r}.")


def check_block_size(draft, block_size) -> None:
    if isinstance(block_size, int):
        limit = draft.block_size if draft is not None else 1
        if not 1 <= block_size <= limit:
            raise DFlashError(f"block_size must be between 1 and {limit}, got {block_size}: " + (
                f"the draft was trained with block size {draft.block_size}." if draft is not None else
                "target-only decoding (no draft) verifies one token per cycle; pass block_size=1."))


TAIL_BLOCKS = ("cut", "full")


def _check_arguments(target, draft, input_ids, max_new_tokens, block_size, temperature, acceptance, seed,
                     tail_blocks="cut"):
    if tail_blocks not in TAIL_BLOCKS:
        raise DFlashError(f"tail_blocks must be one of {TAIL_BLOCKS}, got {tail_blocks!r}.")
    # full tail blocks verify up to a block past the budget: those positions must exist too
    check_prompt(target, input_ids, max_new_tokens + (max(1, draft.block_size) - 1 if tail_blocks == "full" and
                                                      draft is not None else 0))
    check_temperature(temperature)
    if acceptance not in rules.SAMPLING_RULES:
        raise DFlashError(f"Unknown acceptance rule {acceptance!r}; choose one of {sorted(rules.SAMPLING_RULES)}.")
    if seed is not None and not (isinstance(seed, int) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise DFlashError(f"seed must be an integer in [-2**63, 2**64 - 1], got {seed!r}.")
    check_block_size(draft, block_size)


def cpu_seconds(device: torch.device, since: float) -> float:
    """Process CPU seconds since `since` (a `time.process_time()`), NaN on CUDA."""
    return math.nan if device.type == "cuda" else time.process_time() - since


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# --- default plug-ins -------------------------------------------------------------------------------------------

def one_hot_law(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """The law of a deterministic (greedy or rank-picked) draft token: a point mass."""
    return torch.nn.functional.one_hot(tokens.cpu(), vocab).double()


class DFlashDrafter:
    """Proposes a block with the DFlash draft; owns the draft's context cache (one entry per position < anchor)."""

    def __init__(self, draft: DFlashDraftModel, target):
        self.draft, self.target = draft, target
        self.embed = target.get_input_embeddings()
        self.lm_head = target.get_output_embeddings()
        self.cache = new_cache()
        self.mask_token_id = int(draft.mask_token_id)

    def masked_block(self, anchor: int, length: int) -> torch.Tensor:
        """[anchor, MASK, ..., MASK]: the block the draft was trained to fill."""
        block = torch.full((length,), self.mask_token_id, dtype=torch.long, device=self.embed.weight.device)
        block[0] = anchor
        return block

    def draft_logits(self, block: torch.Tensor, start: int, context_features: torch.Tensor) -> torch.Tensor:
        """One draft pass over block inputs [L] (block[0] = anchor at position `start`); logits [L-1, V], row j
        predicting block position j+1.

        context_features [1, c, K*H] are the target features of positions start-c .. start-1. The first pass of a
        cycle appends them to the draft's context cache; later passes of the same cycle (refinement, rounds) find
        them cached and reuse the cache, so every pass sees the whole history at its true positions.
        """
        device = self.embed.weight.device
        if cache_length(self.cache) == start:
            context_features = context_features[:, :0]
        context_length = context_features.shape[1]
        assert cache_length(self.cache) == start - context_length, "draft cache out of step with the committed text"
        context_positions = torch.arange(start - context_length, start, device=device)[None]
        block_positions = torch.arange(start, start + block.numel(), device=device)[None]
        hidden = self.draft(self.embed(block[None]), context_features.to(self.embed.weight.dtype), context_positions,
                            block_positions, past_key_values=self.cache)
        crop_cache(self.cache, start)  # keep context K/V only; the block is re-drafted next pass/cycle
        return self.lm_head(hidden[0, 1:])  # output j predicts the token at block position j ("no shift")

    @staticmethod
    def pick(logits: torch.Tensor, temperature: float,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy (temperature 0: argmax, law None) or sampled tokens with the law they were drawn from."""
        if temperature == 0:
            return logits.argmax(dim=-1), None
        probs = rules.probabilities(logits, temperature)
        uniforms = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64)
        tokens = torch.tensor([rules.sample_from(probs[j], float(uniforms[j])) for j in range(logits.shape[0])],
                              dtype=torch.long, device=logits.device)
        return tokens, probs

    def propose(self, anchor: int, start: int, length: int, context_features: torch.Tensor, temperature: float,
                generator: torch.Generator) -> Proposal:
        """Draft tokens for positions start+1 .. start+length-1 (temperature 0: greedy)."""
        logits = self.draft_logits(self.masked_block(anchor, length), start, context_features)
        tokens, laws = self.pick(logits, temperature, generator)
        return Proposal.chain(tokens, laws, draft_passes=1)

    def observe(self, outcome: CycleOutcome) -> None:
        pass


def maximal_paths(paths: list[list[int]]) -> list[list[int]]:
    """The paths that are not a prefix of another (duplicates kept once), in order: the forwards worth running."""
    out = []
    for index, path in enumerate(paths):
        longer = [p for i, p in enumerate(paths) if i != index and p[: len(path)] == path]
        if not any(len(p) > len(path) or (len(p) == len(path) and paths.index(p) < index) for p in longer):
            out.append(path)
    return out


class LinearVerifier:
    """Verifies each root-to-leaf branch with one plain causal forward (a chain: one forward, today's block
    verification). Trees work too, at one forward per branch: the K/V of every branch but the last is kept
    aside so `commit` can install the accepted branch's without re-running the target."""

    def __init__(self):
        self._stash: list[tuple[list[int], list | None]] = []

    def verify(self, target, cache, anchor: int, proposal: Proposal, start: int,
               feature_layers: list[int] | None) -> Verification:
        device = target.get_input_embeddings().weight.device
        tokens = proposal.tokens.to(device)
        n = proposal.size
        branches = maximal_paths(proposal.leaf_paths())
        logits = features = None
        self._stash, nodes_done, verified = [], set(), 0
        for index, path in enumerate(branches):
            crop_cache(cache, start)
            ids = torch.cat([torch.tensor([anchor], device=device), tokens[[p - 1 for p in path]]])
            out = target(input_ids=ids[None], **with_cache(target, cache), use_cache=True,
                         output_hidden_states=feature_layers is not None)
            verified += ids.numel()
            branch_features = (extract_context_feature(out.hidden_states, feature_layers)
                               if feature_layers is not None else None)
            if len(branches) == 1 and len(path) == n:  # a chain: rows are already in node order
                logits, features = out.logits[0], branch_features
            else:
                if logits is None:
                    logits = out.logits.new_zeros((n + 1, out.logits.shape[-1]))
                    if branch_features is not None:
                        features = branch_features.new_zeros((1, n + 1, branch_features.shape[-1]))
                rows = [row for row, node in enumerate([0] + path) if node not in nodes_done]
                nodes = [([0] + path)[row] for row in rows]
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
        """Keep the anchor and the accepted nodes `path[1:]` in the target cache."""
        accepted = path[1:]
        for path_nodes, kv in reversed(self._stash):  # the last verified branch is still in the cache
            if path_nodes[: len(accepted)] == accepted:
                crop_cache(cache, start if kv is not None else start + len(path))
                if kv is not None:
                    for layer_index, (keys, values) in enumerate(kv):
                        cache.update(keys[..., : len(path), :], values[..., : len(path), :], layer_index)
                self._stash = []
                return
        raise AssertionError(f"accepted path {path} is not on any verified branch")


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
                              "(e.g. dflash.variants.multiround.MultiRoundAcceptor).")
        k = proposal.size
        target_law = rules.probabilities(logits, self.temperature).cpu()
        tokens = proposal.tokens.cpu()
        draft_law = proposal.laws if proposal.laws is not None else one_hot_law(tokens, logits.shape[-1])
        accepted, next_token = rules.sampling_accept(tokens, draft_law.cpu(), target_law, draw(k),
                                                     float(draw(1)), self.rule)
        return list(range(accepted + 1)), next_token


def default_acceptor(temperature: float, acceptance: str = "speculative"):
    return GreedyAcceptor() if temperature == 0 else ChainSamplingAcceptor(temperature,
                                                                           rules.SAMPLING_RULES[acceptance])


# --- the loop ---------------------------------------------------------------------------------------------------

@torch.inference_mode()
def generate(target, draft: DFlashDraftModel | None, input_ids, *, max_new_tokens: int,
             block_size: int | BlockSizePolicy = 1, temperature: float = 0.0, seed: int | None = None,
             stop_token_ids=None, acceptance: str = "speculative", draft_temperature: float | None = None,
             drafter: Drafter | None = None, verifier: Verifier | None = None,
             acceptor: Acceptor | None = None, tail_blocks: str = "cut") -> GenerationResult:
    """Speculative decoding with a DFlash draft (or target-only with draft=None, block_size=1).

    Greedy (temperature 0) output equals the target's own greedy decoding; sampled output is distributed as
    the target's, under the `acceptance` rule ("speculative": min(1, p/q) with residual resampling; "match":
    the upstream rule that accepts a greedy draft token iff it equals an independent target sample).
    `draft_temperature` (default: `temperature`) sharpens or flattens the draft's proposal law q only; any q
    keeps the output distribution exact, so it is a tuning knob, not a correctness one.
    `drafter`, `verifier`, `acceptor`: the protocol's plug-ins (module docstring); defaults are plain DFlash.
    `tail_blocks`: "cut" shrinks the last block to the tokens left in the budget; "full" keeps full-size blocks
    to the end and counts what they accept, as upstream's loop does (its published tau), then truncates the
    output to the budget. The output is the same either way; only the last cycle's tau (and cost) differ.
    """
    input_ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    _check_arguments(target, draft, input_ids, max_new_tokens, block_size, temperature, acceptance, seed,
                     tail_blocks)
    draft_temperature = temperature if draft_temperature is None else draft_temperature
    if not isinstance(draft_temperature, (int, float)) or not math.isfinite(draft_temperature):
        check_temperature(draft_temperature, "draft_temperature")
    if draft_temperature < 0 or (draft_temperature == 0) != (temperature == 0):
        raise DFlashError(f"draft_temperature must be > 0 when sampling (temperature {temperature}) and 0 when "
                          f"greedy; got {draft_temperature}.")
    if draft is not None:
        check_pair(target, draft)
    elif drafter is not None:
        raise DFlashError("A drafter was given without a draft model: pass the draft it was built for.")
    policy = FixedBlockSize(block_size) if isinstance(block_size, int) else block_size
    max_block = draft.block_size if draft is not None else 1
    stop_ids = set(int(t) for t in (stop_token_ids or []))
    if temperature == 0 or acceptance == "match":
        draft_temperature = 0.0  # upstream's match rule drafts greedily
    device = target.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    prompt_length = input_ids.shape[1]
    feature_layers = list(draft.target_layer_ids) if draft is not None else None
    verifier = verifier if verifier is not None else LinearVerifier()
    acceptor = acceptor if acceptor is not None else default_acceptor(temperature, acceptance)

    def next_uniforms(n: int) -> torch.Tensor:
        return torch.rand(n, generator=generator, dtype=torch.float64)

    begin, begin_cpu = _clock(device), time.process_time()
    target_cache = new_cache(target.config)
    prefill = target(input_ids=input_ids, **with_cache(target, target_cache), use_cache=True,
                     output_hidden_states=draft is not None, logits_to_keep=1)
    last_logits = prefill.logits[0, -1]
    if temperature == 0:
        first = int(last_logits.argmax())
    else:
        first = rules.sample_from(rules.probabilities(last_logits, temperature), float(next_uniforms(1)))
    if draft is not None and drafter is None:
        drafter = DFlashDrafter(draft, target)
    pending = (extract_context_feature(prefill.hidden_states, feature_layers)
               if draft is not None else None)  # target features of committed positions the draft has not seen
    output = [first]
    stopped = first in stop_ids
    ttft = _clock(device) - begin
    empty = Proposal.chain(torch.empty(0, dtype=torch.long, device=device))

    records: list[CycleRecord] = []
    acceptance_lengths: list[int] = []
    while not stopped and len(output) < max_new_tokens:
        cycle_begin = _clock(device)
        budget = max_new_tokens - len(output) if tail_blocks == "cut" else max_block
        length = max(1, min(int(policy.choose(len(records))), max_block, budget))
        anchor, start = output[-1], prompt_length + len(output) - 1  # the anchor is committed but not yet cached
        proposal = empty
        if length > 1:
            proposal = drafter.propose(anchor, start, length, pending, draft_temperature, generator)
            pending = pending[:, :0]
        draft_end = _clock(device)

        verification = verifier.verify(target, target_cache, anchor, proposal, start, feature_layers)
        verify_end = _clock(device)

        path, next_token = acceptor.accept(proposal, verification.logits, next_uniforms)
        node_tokens = proposal.tokens.tolist()
        committed = [node_tokens[node - 1] for node in path[1:]] + [next_token]
        # Stop tokens are looked for in the newly committed tokens only.
        for i, token in enumerate(committed):
            if token in stop_ids:
                committed, stopped = committed[: i + 1], True
                break
        output.extend(committed)
        verifier.commit(target_cache, start, path)  # anchor + accepted nodes; the bonus is the next anchor
        if draft is not None:
            pending = torch.cat([pending, verification.features[:, path]], dim=1)
        main_branch = [node_tokens[node - 1] for node in proposal.leaf_paths()[0]]
        drafted_stops = [i for i, t in enumerate(main_branch) if t in stop_ids]
        record = CycleRecord(len(records), len(output) - len(committed), length, len(path),
                             draft_end - cycle_begin, verify_end - draft_end, _clock(device) - cycle_begin,
                             generated_length=min(drafted_stops[0] + 2, length) if drafted_stops else length,
                             verified_nodes=verification.verified_nodes,
                             target_forwards=verification.target_forwards, proposal_stats=dict(proposal.stats),
                             accepted_path=list(path))
        records.append(record)
        acceptance_lengths.append(len(path))
        policy.observe(record)
        if drafter is not None:
            drafter.observe(CycleOutcome(start, anchor, proposal, path, next_token, stopped))

    end = _clock(device)
    stopped = stopped and any(t in stop_ids for t in output[:max_new_tokens])  # a full tail block may pass it
    return GenerationResult(output_ids=output[:max_new_tokens], acceptance_lengths=acceptance_lengths, ttft_s=ttft,
                            decode_s=end - begin - ttft, wall_s=end - begin,
                            block_size=block_size if isinstance(block_size, int) else 0,
                            temperature=temperature, stopped=stopped, trace=records,
                            cpu_s=cpu_seconds(device, begin_cpu))


def protocol_costs(results: list[GenerationResult]) -> dict:
    """Per-cycle cost of a set of decodes (cycles that drafted nothing included): target work, draft work and
    every proposal stat the drafter reported, plus draft/verify seconds per cycle."""
    records = [r for result in results for r in result.trace]
    n = max(1, len(records))
    stats = sorted({key for r in records for key, value in r.proposal_stats.items()
                    if isinstance(value, (int, float))})
    return {"verified_nodes_per_cycle": sum(r.verified_nodes for r in records) / n,
            "target_forwards_per_cycle": sum(r.target_forwards for r in records) / n,
            "draft_s_per_cycle": sum(r.draft_s for r in records) / n,
            "verify_s_per_cycle": sum(r.verify_s for r in records) / n,
            **{f"{key}_per_cycle": sum(r.proposal_stats.get(key, 0) for r in records) / n for key in stats}}
