"""Online cascade learning over a finite set of threshold policies, with the cascade's chain feedback, evaluated
exactly by replay.

Queries arrive one at a time. A learner picks a threshold vector (an arm); the cascade runs until that arm
stops, so the stages 0..stop are revealed and nothing above them. Reward of arm a on query t: correct - lam *
cost of the stages a ran. An arm's reward is observable exactly when the learner ran at least as far as a would
have (every arm stopping at or before the realized stop), which is the feedback graph of the chain.

* `epsilon_greedy`: with probability eps_t = min(1, c * t^(-1/3)) run the full cascade (every arm observed),
  else play the arm with the best mean observed reward. Known result for this scheme: O(T^(2/3)) regret.
* `exp3`: exponential weights over the arms with importance-weighted rewards from the chain feedback (an arm's
  reward counts when observed, divided by the probability that it would be observed: Exp3 with a feedback
  graph, whose regret scales with the graph's independence number). No rate is claimed here for this setting;
  the report draws c * sqrt(T) only as a labelled reference curve.

Regret is measured against the best fixed arm in hindsight on the same stream (exact under replay).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .replay import Table, threshold_stops


@dataclass
class OnlineRun:
    name: str
    rewards: np.ndarray  # [T] reward the learner got
    best_fixed: np.ndarray  # [T] reward the best arm in hindsight got
    arms: list[tuple]

    @property
    def cumulative_regret(self) -> np.ndarray:
        return np.cumsum(self.best_fixed - self.rewards)


def arm_rewards(table: Table, scores: np.ndarray, arms: list[tuple], lam: float, with_samples: bool):
    """[T, A] rewards and [T, A] stops of every arm on every query."""
    paid = np.cumsum(table.stage_cost(with_samples), axis=1)
    rows = np.arange(table.size)
    stops = np.stack([threshold_stops(scores, arm) for arm in arms], axis=1)
    rewards = np.stack([table.correct[rows, s] - lam * paid[rows, s] for s in stops.T], axis=1)
    return rewards, stops


def epsilon_greedy(table: Table, scores: np.ndarray, arms: list[tuple], lam: float, with_samples: bool,
                   seed: int = 0, c: float = 1.0) -> OnlineRun:
    rng = np.random.default_rng(seed)
    rewards, stops = arm_rewards(table, scores, arms, lam, with_samples)
    last = table.stages - 1
    total, count = np.zeros(len(arms)), np.zeros(len(arms))
    got = np.empty(table.size)
    paid = np.cumsum(table.stage_cost(with_samples), axis=1)
    for t in range(table.size):
        if rng.random() < min(1.0, c * (t + 1) ** (-1 / 3)) or not count.any():
            # explore: the full cascade (its answer is the last stage's) reveals every arm
            got[t] = table.correct[t, last] - lam * paid[t, last]
            total += rewards[t]
            count += 1
        else:
            arm = int(np.argmax(np.where(count > 0, total / np.maximum(count, 1), -np.inf)))
            got[t] = rewards[t, arm]
            seen = stops[t] <= stops[t, arm]  # arms that stop no later are observed too
            total[seen] += rewards[t, seen]
            count[seen] += 1
    return OnlineRun("epsilon-greedy", got, rewards[:, rewards.sum(axis=0).argmax()], arms)


def exp3(table: Table, scores: np.ndarray, arms: list[tuple], lam: float, with_samples: bool, seed: int = 0,
         learning_rate: float | None = None) -> OnlineRun:
    rng = np.random.default_rng(seed)
    rewards, stops = arm_rewards(table, scores, arms, lam, with_samples)
    n_arms, horizon = len(arms), table.size
    rate = learning_rate if learning_rate is not None else np.sqrt(np.log(n_arms) / (horizon * n_arms))
    low, high = rewards.min(), rewards.max()  # rescale rewards to [0, 1] with the table's range
    scale = lambda r: (r - low) / (high - low) if high > low else np.zeros_like(r)  # noqa: E731
    log_weights = np.zeros(n_arms)
    got = np.empty(horizon)
    for t in range(horizon):
        probs = np.exp(log_weights - log_weights.max())
        probs /= probs.sum()
        arm = int(rng.choice(n_arms, p=probs))
        got[t] = rewards[t, arm]
        seen = stops[t] <= stops[t, arm]
        observed_prob = np.array([probs[stops[t] >= stops[t, a]].sum() for a in range(n_arms)])
        estimate = np.where(seen, scale(rewards[t]) / np.maximum(observed_prob, 1e-12), 0.0)
        log_weights += rate * estimate
    return OnlineRun("exp3", got, rewards[:, rewards.sum(axis=0).argmax()], arms)
