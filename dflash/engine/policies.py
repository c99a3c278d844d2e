"""Block-size policies: choose each cycle's block size from what earlier cycles measured.

Both schedulers implement the engine's `BlockSizePolicy` protocol (`choose(cycle)`, `observe(record)`), so they
plug into the one decode loop. A fresh policy object is used for every prompt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .protocol import CycleRecord


def _ewma(old: float | None, new: float, alpha: float) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new


@dataclass
class EWMAScheduler:
    """The research repo's throughput scheduler (spec 5.4): per size an EWMA of tau and of cycle time; switch to
    the size with the best tau_hat / cycle_hat after `required_streak` agreeing decisions, then `cooldown_cycles`
    without decisions; round-robin warm-up, periodic probes of other sizes, and a step down after
    `low_accept_streak` cycles with tau / bs < `low_accept_threshold`. `adl=True` adds the ADL variant: choices
    restricted to sizes near an EWMA estimate of the generated length plus `adl_delta` growth.

    Two research bugs are fixed (spec 8.1 item 7): a size with no score yet is eligible (the research version
    computed NaN and never switched), and the first cycle of a prompt, which carries the draft's context prefill,
    is not used to initialise the cycle-time estimate.
    """
    candidates: tuple[int, ...] = (8, 12, 16)
    warmup_cycles: int = 3
    alpha: float = 0.10
    switch_margin: float = 0.05
    required_streak: int = 2
    cooldown_cycles: int = 2
    probe_interval: int = 12
    low_accept_threshold: float = 0.35
    low_accept_streak: int = 2
    adl: bool = False
    adl_rho: float = 0.30
    adl_delta: float = 2.0
    adl_neighborhood: int = 4
    research_compat: bool = False  # True: keep the research version's behaviour for reproducing its numbers

    def __post_init__(self):
        self.candidates = tuple(sorted(set(self.candidates)))
        self.current = self.candidates[-1]
        self.tau_hat: dict[int, float | None] = dict.fromkeys(self.candidates)
        self.cycle_hat: dict[int, float | None] = dict.fromkeys(self.candidates)
        self.pending, self.streak, self.cooldown, self.low_count, self.probe_cursor = self.current, 0, 0, 0, 0
        self.lgen_hat = self.lacc_hat = None
        self.adl_target = self.current

    def score(self, size: int) -> float | None:
        if self.tau_hat[size] is None or self.cycle_hat[size] is None:
            return None
        return self.tau_hat[size] / max(1e-12, self.cycle_hat[size])

    def choose(self, cycle: int) -> int:
        if cycle < self.warmup_cycles:
            return self.candidates[cycle % len(self.candidates)]
        since = cycle - self.warmup_cycles
        if self.probe_interval > 0 and since % self.probe_interval == 0 and len(self.candidates) > 1:
            others = [c for c in self.candidates if c != self.current]
            choice = others[self.probe_cursor % len(others)]
            self.probe_cursor += 1
            return choice
        return self.current

    def observe(self, record: CycleRecord) -> None:
        size, tau = record.block_size, record.acceptance_length
        if size not in self.tau_hat:
            return  # tail cycles shrink below every candidate
        self.tau_hat[size] = _ewma(self.tau_hat[size], tau, self.alpha)
        if record.cycle > 0 or self.research_compat:  # cycle 0 includes the draft's context prefill
            self.cycle_hat[size] = _ewma(self.cycle_hat[size], record.cycle_s, self.alpha)
        if self.adl:
            self.lgen_hat = _ewma(self.lgen_hat, record.generated_length, self.adl_rho)
            self.lacc_hat = _ewma(self.lacc_hat, tau, self.adl_rho)
            growth = self.adl_delta if self.lacc_hat >= self.lgen_hat else 0.0
            target = min(max(math.ceil(self.lgen_hat + growth), self.candidates[0]), self.candidates[-1])
            self.adl_target = min(self.candidates, key=lambda c: (abs(c - target), -c))
        low = tau / max(1, size) < self.low_accept_threshold and size == self.current
        self.low_count = self.low_count + 1 if low else 0
        if self.low_count >= self.low_accept_streak:
            smaller = [c for c in self.candidates if c < self.current]
            if smaller:
                self.current, self.pending, self.streak, self.cooldown = smaller[-1], smaller[-1], 0, \
                    self.cooldown_cycles
            self.low_count = 0
        if record.cycle < self.warmup_cycles:
            return
        if self.cooldown > 0:
            self.cooldown -= 1
            return
        self._decide()

    def _decide(self) -> None:
        scored = {c: s for c in self.candidates if (s := self.score(c)) is not None}
        if self.adl:
            near = {c: s for c, s in scored.items() if abs(c - self.adl_target) <= self.adl_neighborhood}
            scored = near or scored
        if not scored:
            return
        best = max(scored, key=lambda c: (scored[c], -c))  # smallest size on ties
        current_score = self.score(self.current)
        if current_score is None:
            eligible = not self.research_compat  # research bug: NaN comparison, never eligible
        else:
            eligible = (scored[best] - current_score) / max(1e-12, abs(current_score)) > self.switch_margin
        if best == self.current or not eligible:
            self.pending, self.streak = self.current, 0
            return
        self.streak = self.streak + 1 if best == self.pending else 1
        self.pending = best
        if self.streak >= self.required_streak:
            self.current, self.streak, self.cooldown = best, 0, self.cooldown_cycles


@dataclass
class BreakEvenScheduler:
    """Online break-even between block sizes from measured cycle time (ideas backlog item 6).

    Instead of a separate tau estimate per size, it learns one acceptance model shared by all sizes: the
    conditional acceptance rate a_j of draft position j (given positions < j were accepted), counted from every
    cycle that reached j. Expected acceptance length at size b is then 1 + sum_{j<b} prod_{i<=j} a_i, for every
    size, observed or not. Cycle time is modelled as linear in b (intercept + slope, least squares with
    exponential forgetting), because verifying and drafting b tokens cost a fixed launch plus a per-token part.
    The chosen size maximises predicted tokens per second; growing from b to b+1 pays off exactly when the
    marginal acceptance prod_{i<=b} a_i exceeds tau(b) * (c(b+1) - c(b)) / c(b), the break-even.
    """
    candidates: tuple[int, ...] = (2, 4, 8, 12, 16)
    warmup_cycles: int = 3  # alternate largest / smallest first, to fit the cycle-time line
    forgetting: float = 0.95  # weight kept by older observations at each new one
    prior_acceptance: float = 0.5  # a_j before any evidence (one pseudo-observation)
    switch_margin: float = 0.03
    probe_interval: int = 16

    def __post_init__(self):
        self.candidates = tuple(sorted(set(self.candidates)))
        width = self.candidates[-1]
        self.reached, self.accepted = [0.0] * width, [0.0] * width
        self.fit = [0.0] * 5  # weighted sums: w, w*b, w*b^2, w*c, w*b*c
        self.current = self.candidates[-1]
        self.probe_cursor = 0

    def acceptance_rates(self) -> list[float]:
        return [(self.accepted[j] + self.prior_acceptance) / (self.reached[j] + 1.0) for j in range(len(self.reached))]

    def expected_tau(self, size: int) -> float:
        rates, survive, tau = self.acceptance_rates(), 1.0, 1.0
        for j in range(1, size):
            survive *= rates[j]
            tau += survive
        return tau

    def cycle_time(self, size: int) -> float | None:
        w, wb, wbb, wc, wbc = self.fit
        determinant = w * wbb - wb * wb
        if w <= 0 or determinant <= 1e-12 * max(1.0, w * wbb):
            return None
        slope = (w * wbc - wb * wc) / determinant
        intercept = (wc - slope * wb) / w
        return max(1e-9, intercept + slope * size)

    def predicted_rate(self, size: int) -> float | None:
        cycle = self.cycle_time(size)
        return None if cycle is None else self.expected_tau(size) / cycle

    def choose(self, cycle: int) -> int:
        if cycle < self.warmup_cycles or self.cycle_time(self.current) is None:
            # until two sizes are timed the line cannot be fitted (cycle 0, with the prefill, is not timed)
            return (self.candidates[-1], self.candidates[0])[cycle % 2]
        since = cycle - self.warmup_cycles
        if self.probe_interval > 0 and since % self.probe_interval == self.probe_interval - 1:
            others = [c for c in self.candidates if c != self.current]
            if others:
                choice = others[self.probe_cursor % len(others)]
                self.probe_cursor += 1
                return choice
        return self.current

    def observe(self, record: CycleRecord) -> None:
        size, accepted = record.block_size, record.acceptance_length - 1
        for j in range(1, size):  # positions reached: 1 .. accepted+1 (the first rejection is reached too)
            if j > accepted + 1:
                break
            self.reached[j] += 1
            self.accepted[j] += j <= accepted
        if record.cycle > 0:  # cycle 0 carries the draft's context prefill
            self.fit = [self.forgetting * s for s in self.fit]
            for k, value in enumerate((1.0, size, size * size, record.cycle_s, size * record.cycle_s)):
                self.fit[k] += value
        rates = {c: r for c in self.candidates if (r := self.predicted_rate(c)) is not None}
        if not rates:
            return
        best = max(rates, key=lambda c: (rates[c], -c))
        current = rates.get(self.current)
        if current is None or (rates[best] - current) / max(1e-12, current) > self.switch_margin:
            self.current = best
