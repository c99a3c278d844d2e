"""Every knob is live: changing any ablation parameter or scheduler setting changes the computation.

(The research notes lost a whole table to a flag that was parsed and never applied.) Each test changes one
knob and asserts that something downstream of it differs: the decoded trace, the chosen block sizes, or a
gate verdict.
"""
import dataclasses

import pytest

from dflash import generate
from dflash.engine import CycleRecord
from dflash.harness.measure import Variant
from dflash.harness.stats import tau_gate, throughput_gate
from dflash.engine.policies import BreakEvenScheduler, EWMAScheduler


# --- decoding knobs ---------------------------------------------------------------------------------------------

def test_block_size_is_live(pair):
    target, draft = pair
    a = generate(target, draft, [1, 2, 3], max_new_tokens=40, block_size=4)
    b = generate(target, draft, [1, 2, 3], max_new_tokens=40, block_size=12)
    assert max(r.block_size for r in a.trace) == 4 and max(r.block_size for r in b.trace) == 12
    assert a.acceptance_lengths != b.acceptance_lengths


def test_temperature_seed_and_acceptance_rule_are_live(pair):
    target, draft = pair
    runs = {(t, s, rule): generate(target, draft, [1, 2, 3], max_new_tokens=30, block_size=8, temperature=t,
                                   seed=s, acceptance=rule).output_ids
            for t in (0.0, 1.0) for s in (0, 1) for rule in ("speculative", "match")}
    assert runs[(0.0, 0, "speculative")] == runs[(0.0, 1, "speculative")]  # greedy ignores the seed
    assert runs[(1.0, 0, "speculative")] != runs[(0.0, 0, "speculative")]
    assert runs[(1.0, 0, "speculative")] != runs[(1.0, 1, "speculative")]
    assert runs[(1.0, 0, "speculative")] != runs[(1.0, 0, "match")]


def test_max_new_tokens_and_stop_tokens_are_live(pair):
    target, draft = pair
    long = generate(target, draft, [1, 2, 3], max_new_tokens=30, block_size=8)
    assert len(generate(target, draft, [1, 2, 3], max_new_tokens=9, block_size=8).output_ids) == 9
    stop = long.output_ids[4]
    assert len(generate(target, draft, [1, 2, 3], max_new_tokens=30, block_size=8,
                        stop_token_ids=[stop]).output_ids) < 30


def test_variant_fields_are_live(pair):
    target, draft = pair

    class Models:
        pass
    models = Models()
    models.target, models.draft = target, draft
    base = Variant("v", block_size=8)
    results = {field: dataclasses.replace(base, **{field: value}).run(models, [1, 2, 3], 30, [], seed=0)
               for field, value in [("block_size", 8), ("use_draft", False), ("temperature", 1.0)]}
    results["policy"] = dataclasses.replace(base, policy=lambda: EWMAScheduler(candidates=(2, 3))).run(
        models, [1, 2, 3], 30, [], seed=0)
    results["acceptance"] = dataclasses.replace(base, temperature=1.0, acceptance="match").run(
        models, [1, 2, 3], 30, [], seed=0)
    default = results.pop("block_size")
    assert results["use_draft"].tau == 1.0 and default.tau > 1.0
    assert {r.block_size for r in results["policy"].trace} <= {1, 2, 3}
    assert results["temperature"].output_ids != default.output_ids
    assert results["acceptance"].output_ids != results["temperature"].output_ids


# --- scheduler knobs ---------------------------------------------------------------------------------------------

def simulate(policy, cycles=80, all_accepted_until=0):
    """A scripted environment: tau and cycle time depend on the block size and drift halfway through, so
    every rule of a scheduler (warm-up, probes, margins, streaks, step-downs) has something to react to.
    Optionally every draft is accepted for the first cycles (ADL only grows when acceptance keeps up)."""
    chosen = []
    for cycle in range(cycles):
        size = policy.choose(cycle)
        late = cycle >= cycles // 2
        tau = max(1, min(size, (2 + (cycle * 7) % 5 if not late else 1 + (cycle * 3) % 3)))
        if cycle < all_accepted_until:
            tau = size
        cycle_s = 0.010 + 0.0015 * size + (0.004 if cycle % 9 == 0 else 0.0)
        drafted_stop = size - 2 if cycle % 11 == 0 and size > 2 else None
        policy.observe(CycleRecord(cycle, cycle * 4, size, tau, 0.3 * cycle_s, 0.6 * cycle_s, cycle_s,
                                   generated_length=drafted_stop or size))
        chosen.append(size)
    return chosen


EWMA_KNOBS = {
    "candidates": (2, 4, 8), "warmup_cycles": 6, "alpha": 0.9, "switch_margin": 0.5, "required_streak": 5,
    "cooldown_cycles": 8, "probe_interval": 3, "low_accept_threshold": 0.6, "low_accept_streak": 1,
    "adl": True, "research_compat": True,
}
ADL_KNOBS = {"adl_rho": 0.9, "adl_neighborhood": 0}


@pytest.mark.parametrize("knob,value", list(EWMA_KNOBS.items()))
def test_ewma_scheduler_knob_is_live(knob, value):
    default = EWMAScheduler(candidates=(4, 8, 12, 16))
    changed = dataclasses.replace(default, **{knob: value})
    assert simulate(changed) != simulate(dataclasses.replace(default))


@pytest.mark.parametrize("knob,value", list(ADL_KNOBS.items()))
def test_adl_knob_is_live(knob, value):
    default = EWMAScheduler(candidates=(4, 8, 12, 16), adl=True)
    changed = dataclasses.replace(default, **{knob: value})
    assert simulate(changed, all_accepted_until=30) != simulate(dataclasses.replace(default), all_accepted_until=30)


def test_adl_delta_is_live():
    """Growth applies only while acceptance keeps up with the drafted length: feed fully accepted 8-blocks."""
    targets = {}
    for delta in (2.0, 8.0):
        policy = EWMAScheduler(candidates=(4, 8, 12, 16), adl=True, adl_delta=delta)
        for cycle in range(10):
            policy.observe(CycleRecord(cycle, 0, 8, 8, 0.0, 0.0, 0.01, generated_length=8))
        targets[delta] = policy.adl_target
    assert targets == {2.0: 12, 8.0: 16}


BREAK_EVEN_KNOBS = {"candidates": (2, 4, 6), "warmup_cycles": 6, "forgetting": 0.3, "prior_acceptance": 0.99,
                    "switch_margin": 0.8, "probe_interval": 3}


@pytest.mark.parametrize("knob,value", list(BREAK_EVEN_KNOBS.items()))
def test_break_even_scheduler_knob_is_live(knob, value):
    default = BreakEvenScheduler(candidates=(2, 4, 8, 12, 16))
    assert simulate(dataclasses.replace(default, **{knob: value})) != simulate(dataclasses.replace(default))


def test_break_even_prefers_the_size_whose_marginal_acceptance_pays_for_its_cost():
    """With per-position acceptance 0.9 and nearly free extra positions, big blocks win; with expensive extra
    positions the break-even moves to small blocks."""
    def run(slope):
        policy = BreakEvenScheduler(candidates=(2, 4, 8, 16))
        for cycle in range(60):
            size = policy.choose(cycle)
            accepted = 0
            while accepted < size - 1 and (cycle * 31 + accepted * 17) % 10 != 0:  # ~0.9 per position
                accepted += 1
            policy.observe(CycleRecord(cycle, 0, size, accepted + 1, 0.0, 0.0, 0.01 + slope * size))
        return policy.current
    assert run(0.0001) >= 8
    assert run(0.01) <= 4


# --- gate knobs ---------------------------------------------------------------------------------------------------

def test_tau_gate_margin_and_alpha_are_live():
    baseline = [5.0 + 0.1 * i for i in range(20)]
    new = [t * 0.95 for t in baseline]  # a consistent 5% drop
    assert tau_gate(baseline, new, margin=0.03).verdict == "regression"
    assert tau_gate(baseline, new, margin=0.10).verdict == "pass"
    assert tau_gate(baseline[:6], new[:6], margin=0.03, alpha=0.05).verdict == "regression"
    assert tau_gate(baseline[:6], new[:6], margin=0.03, alpha=0.01).verdict == "inconclusive"


def test_throughput_gate_factor_is_live():
    baseline = [2.0 + 0.01 * i for i in range(12)]
    new = [s / 1.15 for s in baseline]
    assert throughput_gate(baseline, new, factor=1.10).verdict == "regression"
    assert throughput_gate(baseline, new, factor=1.20).verdict == "pass"


def test_draft_temperature_is_live(pair):
    target, draft = pair
    runs = [generate(target, draft, [1, 2, 3], max_new_tokens=30, block_size=8, temperature=1.0, seed=0,
                     draft_temperature=t).acceptance_lengths for t in (1.0, 0.2)]
    assert runs[0] != runs[1]
