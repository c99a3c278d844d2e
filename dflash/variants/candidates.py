"""Backlog variant 7, the candidate-solution generator (the research repo's benchmark_candidate_solutions).

One greedy DFlash draft pass per cycle; a mode builds up to `budget` candidate blocks from its logits (below:
branch_beam, fixed_prefix_rank, uncertainty_sparse_rank; candidate 0 is the greedy base); the per-cycle budget is
`max_candidates`, or with `adaptive` the 1/4/8 policy (warm-up and probe cycles at the high budget, then by the
previous cycle's tau / block size).

Verification: the research repo stacked the C candidates as a batch (C rows of the full block, the cache copied
and repeated C times). Here they are packed into one trie and verified in one target pass instead
(dflash.engine.verifiers.TreeVerifier): candidates share their prefix up to the first replaced position, so the
packed node count is at most C x L and usually much less (fixed_prefix_rank: p + C (L - p)); there is no cache
copy, and keeping the winner is an index_select of its path. The best candidate is the longest accepted one, then
the higher draft score, then the lower index (the documented tie-break); every candidate reaching the walk's
accepted path commits the same tokens, so the tie-break only names the winner in the trace. The research script
was greedy only; here sampling uses the exact tree walk (point-mass candidates, recursive rejection over siblings;
see dflash.variants.tree).

Every builder takes the draft's logits [L, V] for the L drafted positions of a block (row j predicts block
position j + 1; block position 0 is the anchor) and returns candidate blocks [L] with a draft score each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine import CycleOutcome, Proposal, probability_margins
from ..errors import DFlashError
from ..registry import Plugins, VariantSpec, register
from .tree import CandidateTreeDrafter, tree_plugins

MODES = ("branch_beam", "fixed_prefix_rank", "uncertainty_sparse_rank")


def branch_beam(draft_logits: torch.Tensor, budget: int, branch_depth: int, top_k: int,
                margin_threshold: float = -1.0) -> tuple[list[torch.Tensor], list[float]]:
    """Beam over the top-k tokens at block positions 1..branch_depth (optionally only those whose top-1 minus
    top-2 probability is <= margin_threshold); each beam is applied to a copy of the greedy base."""
    base = draft_logits.argmax(dim=-1)
    logp = torch.log_softmax(draft_logits.double(), dim=-1)
    positions = list(range(min(base.numel(), branch_depth)))  # draft index j = block position j + 1
    if margin_threshold >= 0:
        margins = probability_margins(draft_logits)
        positions = [j for j in positions if margins[j] <= margin_threshold]
    base_score = float(sum(logp[j, base[j]] for j in positions))
    if not positions or budget <= 1:
        return [base], [base_score]
    k = min(top_k, logp.shape[-1])
    options = logp[positions].topk(k, dim=-1)
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    for i in range(len(positions)):
        expanded = [(tokens + [int(options.indices[i, r])], score + float(options.values[i, r]))
                    for tokens, score in beams for r in range(k)]
        beams = sorted(expanded, key=lambda beam: -beam[1])[:budget]
    candidates, scores = [base], [base_score]
    for tokens, score in beams:
        if len(candidates) >= budget:
            break
        candidate = base.clone()
        candidate[positions] = torch.tensor(tokens, dtype=torch.long)
        if any(torch.equal(candidate, c) for c in candidates):
            continue
        candidates.append(candidate)
        scores.append(score)
    return candidates, scores


def _suffix_start(prefix_len: int, block_length: int) -> int:
    """First drafted index of the suffix: block position max(1, min(prefix_len, B)) minus one."""
    return max(1, min(prefix_len, block_length)) - 1


def fixed_prefix_rank(draft_logits: torch.Tensor, budget: int, prefix_len: int,
                      top_k: int) -> tuple[list[torch.Tensor], list[float]]:
    """Candidate r replaces EVERY suffix position (block positions >= prefix_len) by its rank-(r+1) token."""
    base = draft_logits.argmax(dim=-1)
    s0 = _suffix_start(prefix_len, base.numel() + 1)
    count = min(budget, top_k, draft_logits.shape[-1])
    if s0 >= base.numel() or count <= 1:
        return [base], [float(draft_logits[s0:].max(dim=-1).values.sum())]
    ranked = draft_logits[s0:].topk(count, dim=-1)  # [S, C]
    candidates, scores = [], []
    for r in range(count):
        candidate = base.clone()
        candidate[s0:] = ranked.indices[:, r]
        candidates.append(candidate)
        scores.append(float(ranked.values[:, r].sum()))
    return candidates, scores


def uncertainty_sparse_rank(draft_logits: torch.Tensor, budget: int, prefix_len: int, top_k: int,
                            sparse_max_positions: int,
                            margin_threshold: float = -1.0) -> tuple[list[torch.Tensor], list[float]]:
    """Each candidate replaces ONE uncertain suffix position by an alternative; later greedy tokens are kept, so
    fixing the first draft error can recover a long accepted run."""
    base = draft_logits.argmax(dim=-1)
    s0 = _suffix_start(prefix_len, base.numel() + 1)
    k = min(top_k, draft_logits.shape[-1])
    if s0 >= base.numel() or k <= 1 or budget <= 1:
        return [base], [0.0]
    ranked = draft_logits.topk(k, dim=-1)
    uncertainty = -(ranked.values[:, 0] - ranked.values[:, 1])
    positions = sorted(range(s0, base.numel()), key=lambda j: -float(uncertainty[j]))  # stable on ties
    if margin_threshold >= 0:
        margins = probability_margins(draft_logits)
        positions = [j for j in positions if margins[j] <= margin_threshold]
    positions = positions[:sparse_max_positions]
    if not positions:
        return [base], [0.0]
    base_score = float(sum(ranked.values[j, 0] for j in positions))
    pool = [(j, r) for j in positions for r in range(1, k)]
    pool.sort(key=lambda item: -(float(uncertainty[item[0]]) * 1e6 + float(ranked.values[item])))
    count = min(budget, 1 + len(pool))
    candidates, scores = [base], [base_score]
    for j, r in pool[: count - 1]:
        candidate = base.clone()
        candidate[j] = ranked.indices[j, r]
        candidates.append(candidate)
        scores.append(base_score - float(ranked.values[j, 0]) + float(ranked.values[j, r]))
    return candidates, scores


def adaptive_budget(cycle: int, last_accept_ratio: float | None, budgets: tuple[int, int, int],
                    thresholds: tuple[float, float], warmup_cycles: int, probe_interval: int,
                    max_candidates: int) -> int:
    """Per-cycle candidate budget: the high budget during warm-up, on probe cycles and after a poor cycle; the
    low budget after a cycle that accepted most of its block (tau / B >= high threshold); else the mid one."""
    low, mid, high = budgets
    high_threshold, mid_threshold = thresholds
    if cycle < warmup_cycles or (probe_interval > 0 and cycle > 0 and cycle % probe_interval == 0):
        budget = high
    elif last_accept_ratio is None:
        budget = high
    elif last_accept_ratio >= high_threshold:
        budget = low
    elif last_accept_ratio >= mid_threshold:
        budget = mid
    else:
        budget = high
    return max(1, min(budget, max_candidates))


def choose_candidate(taus: list[int], scores: list[float]) -> int:
    """Best candidate: longest acceptance, then higher draft score, then lower index."""
    return max(range(len(taus)), key=lambda c: (taus[c], scores[c], -c))


@dataclass(frozen=True)
class CandidateKnobs:
    mode: str = "branch_beam"
    max_candidates: int = 4
    branch_top_k: int = 2
    branch_depth: int = 6
    margin_threshold: float = -1.0  # < 0: every position may branch
    fixed_prefix_len: int = 5
    sparse_max_positions: int = 4
    adaptive: bool = False
    adaptive_budgets: tuple = (1, 4, 8)  # low, mid, high
    adaptive_thresholds: tuple = (0.85, 0.65)  # tau / block size for the low, mid budget
    adaptive_warmup_cycles: int = 4
    adaptive_probe_interval: int = 16

    def __post_init__(self):
        if self.mode not in MODES:
            raise DFlashError(f"Unknown candidate mode {self.mode!r}; choose one of {', '.join(MODES)}.")
        for name, low in [("max_candidates", 1), ("branch_top_k", 1), ("branch_depth", 0), ("fixed_prefix_len", 0),
                          ("sparse_max_positions", 1), ("adaptive_warmup_cycles", 0), ("adaptive_probe_interval", 0)]:
            if getattr(self, name) < low:
                raise DFlashError(f"{name} must be >= {low}, got {getattr(self, name)}.")
        budgets, thresholds = self.adaptive_budgets, self.adaptive_thresholds
        if len(budgets) != 3 or min(budgets) < 1:
            raise DFlashError(f"adaptive_budgets must be three ints >= 1 (low, mid, high), got {budgets}.")
        if len(thresholds) != 2 or not all(0 <= t <= 1 for t in thresholds) or thresholds[0] < thresholds[1]:
            raise DFlashError(f"adaptive_thresholds must be two floats in [0, 1], high >= mid, got {thresholds}.")


class CandidateDrafter(CandidateTreeDrafter):
    def __init__(self, draft, target, knobs: CandidateKnobs):
        super().__init__(draft, target, self.build)
        self.knobs = knobs
        self.cycle, self.last_ratio, self.budget = 0, None, knobs.max_candidates

    def propose(self, anchor, start, length, context_features, temperature, generator) -> Proposal:
        k = self.knobs
        self.budget = (adaptive_budget(self.cycle, self.last_ratio, tuple(k.adaptive_budgets),
                                       tuple(k.adaptive_thresholds), k.adaptive_warmup_cycles,
                                       k.adaptive_probe_interval, k.max_candidates)
                       if k.adaptive else k.max_candidates)
        proposal = super().propose(anchor, start, length, context_features, temperature, generator)
        proposal.stats["cycle_budget"] = self.budget
        return proposal

    def build(self, logits):
        k = self.knobs
        if k.mode == "branch_beam":
            return branch_beam(logits, self.budget, k.branch_depth, k.branch_top_k, k.margin_threshold)
        if k.mode == "fixed_prefix_rank":
            return fixed_prefix_rank(logits, self.budget, k.fixed_prefix_len, k.branch_top_k)
        return uncertainty_sparse_rank(logits, self.budget, k.fixed_prefix_len, k.branch_top_k,
                                       k.sparse_max_positions, k.margin_threshold)

    def observe(self, outcome: CycleOutcome) -> None:
        self.cycle += 1
        self.last_ratio = len(outcome.path) / (outcome.proposal.depth() + 1)  # tau / the cycle's block size


@dataclass
class BestCandidateAcceptor:
    """The tree walk of `base`; also names the best candidate (tau, then draft score, then index) in the stats."""
    base: object

    def accept(self, proposal: Proposal, logits: torch.Tensor, draw=None):
        path, next_token = self.base.accept(proposal, logits, draw)
        if proposal.branches is None:  # a cycle with nothing drafted (length 1 at the end of the output)
            return path, next_token
        taus = []  # per candidate: the nodes its path shares with the accepted path (anchor included)
        for branch in proposal.branches:
            shared = 0
            while shared < min(len(branch), len(path)) and branch[shared] == path[shared]:
                shared += 1
            taus.append(shared)
        chosen = choose_candidate(taus, proposal.stats["candidate_scores"])
        assert taus[chosen] == len(path), "the walk's path must be the best candidate's accepted prefix"
        proposal.stats.update(candidate_taus=taus, chosen_candidate=chosen)
        return path, next_token


def make_plugins(draft, target, knobs: CandidateKnobs, temperature: float) -> Plugins:
    plugins = tree_plugins(CandidateDrafter(draft, target, knobs), temperature)
    plugins.acceptor = BestCandidateAcceptor(plugins.acceptor)
    return plugins


register(VariantSpec(
    name="candidates",
    knob_class=CandidateKnobs,
    make_plugins=make_plugins,
    knob_grid=({}, {"mode": "fixed_prefix_rank", "branch_top_k": 4},
               {"mode": "fixed_prefix_rank", "fixed_prefix_len": 1},
               {"mode": "uncertainty_sparse_rank", "branch_top_k": 3, "fixed_prefix_len": 2},
               {"mode": "uncertainty_sparse_rank", "sparse_max_positions": 1, "margin_threshold": 0.5},
               {"margin_threshold": 0.3, "branch_depth": 15}, {"max_candidates": 1},
               {"adaptive": True, "max_candidates": 8, "adaptive_warmup_cycles": 1, "adaptive_probe_interval": 3},
               {"adaptive": True, "adaptive_budgets": (2, 3, 5), "adaptive_thresholds": (0.5, 0.2)}),
    sampling=True,
    draft_temperature=False,
    description="candidate-solution generator: branch_beam / fixed_prefix_rank / uncertainty_sparse_rank "
                "candidates from one draft pass, adaptive 1/4/8 budget, verified as one packed trie",
))
