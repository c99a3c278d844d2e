"""Draft candidates built from ONE non-autoregressive DFlash draft pass (pure functions, tensors in/out).

Every builder takes the draft's logits `draft_logits` [L, V] for the L drafted positions of a block (row j
predicts block position j + 1; block position 0 is the anchor) and returns candidate token sequences [L] with a
draft score each. Candidate 0 is always the greedy base (the per-position argmax). The candidates are packed
into one trie (dflash.tree) and verified in one target pass.

Modes follow the research repo's candidate-solution benchmark (spec 5.7): branch_beam, fixed_prefix_rank,
uncertainty_sparse_rank, plus the adaptive per-cycle candidate budget and the best-candidate tie-break.
"""
from __future__ import annotations

import itertools

import torch

from .errors import DFlashError

MODES = ("branch_beam", "fixed_prefix_rank", "uncertainty_sparse_rank")


def _probability_margins(draft_logits: torch.Tensor) -> torch.Tensor:
    """top-1 minus top-2 probability per position (full-vocabulary softmax); 1.0 when V == 1."""
    probs = torch.softmax(draft_logits.double(), dim=-1)
    if probs.shape[-1] < 2:
        return torch.ones(probs.shape[0], dtype=probs.dtype)
    top = probs.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def k_best_paths(draft_logits: torch.Tensor, num_paths: int) -> tuple[list[torch.Tensor], list[float]]:
    """The `num_paths` most likely blocks under the draft's per-position (independent) laws, best first.

    Beam search over positions with per-position top-`num_paths` options; because the draft's positions are
    independent, the beam keeps the exact k best joint log-probabilities. Path 0 is the greedy block.
    """
    if num_paths < 1:
        raise DFlashError(f"The number of tree candidates must be >= 1, got {num_paths}.")
    logp = torch.log_softmax(draft_logits.double(), dim=-1)
    k = min(num_paths, logp.shape[-1])
    options = logp.topk(k, dim=-1)
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    for j in range(logp.shape[0]):
        expanded = [(tokens + [int(options.indices[j, r])], score + float(options.values[j, r]))
                    for tokens, score in beams for r in range(k)]
        beams = sorted(expanded, key=lambda beam: -beam[1])[:num_paths]  # stable: ties keep lower ranks first
    return [torch.tensor(tokens, dtype=torch.long) for tokens, _ in beams], [score for _, score in beams]


def early_branch_paths(draft_logits: torch.Tensor, top_k: int, depth: int) -> list[torch.Tensor]:
    """Tree-lite: every combination of the top-k tokens at the first `depth` positions, each followed by the
    rest of the greedy block unchanged (k^depth paths; path 0 is the greedy block)."""
    if top_k < 1 or depth < 0:
        raise DFlashError(f"tree_lite needs top_k >= 1 and depth >= 0, got top_k={top_k}, depth={depth}.")
    greedy = draft_logits.argmax(dim=-1)
    depth = min(depth, greedy.numel())
    options = draft_logits.topk(min(top_k, draft_logits.shape[-1]), dim=-1).indices[:depth].tolist()
    return [torch.cat([torch.tensor(choice, dtype=torch.long), greedy[depth:]])
            for choice in itertools.product(*options)] if depth else [greedy]


def branch_beam(draft_logits: torch.Tensor, budget: int, branch_depth: int, top_k: int,
                margin_threshold: float = -1.0) -> tuple[list[torch.Tensor], list[float]]:
    """Beam over the top-k tokens at block positions 1..branch_depth (optionally only those whose top-1 minus
    top-2 probability is <= margin_threshold); each beam is applied to a copy of the greedy base."""
    base = draft_logits.argmax(dim=-1)
    logp = torch.log_softmax(draft_logits.double(), dim=-1)
    positions = list(range(min(base.numel(), branch_depth)))  # draft index j = block position j + 1
    if margin_threshold >= 0:
        margins = _probability_margins(draft_logits)
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
        margins = _probability_margins(draft_logits)
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


def check_candidate_knobs(mode: str, max_candidates: int, top_k: int, branch_depth: int, prefix_len: int,
                          sparse_max_positions: int, budgets, thresholds, warmup_cycles: int,
                          probe_interval: int) -> None:
    if mode not in MODES:
        raise DFlashError(f"Unknown candidate mode {mode!r}; choose one of {', '.join(MODES)}.")
    for name, value, low in [("max_candidates", max_candidates, 1), ("branch_top_k", top_k, 1),
                             ("branch_depth", branch_depth, 0), ("fixed_prefix_len", prefix_len, 0),
                             ("sparse_max_positions", sparse_max_positions, 1),
                             ("adaptive_warmup_cycles", warmup_cycles, 0),
                             ("adaptive_probe_interval", probe_interval, 0)]:
        if value < low:
            raise DFlashError(f"{name} must be >= {low}, got {value}.")
    if len(budgets) != 3 or min(budgets) < 1:
        raise DFlashError(f"adaptive_budgets must be three ints >= 1 (low, mid, high), got {budgets}.")
    if len(thresholds) != 2 or not all(0 <= t <= 1 for t in thresholds) or thresholds[0] < thresholds[1]:
        raise DFlashError(f"adaptive_thresholds must be two floats in [0, 1], high >= mid, got {thresholds}.")
