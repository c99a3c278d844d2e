"""Adaptive cascades over the tiny ladder: every policy (each learned one at three prices of time, lam), replayed
exactly on a fresh table of 100 held-out queries, cross-fitted, gated against its baseline paired over queries
(accuracy; cost is reported, see CascadeCase.cost_not_gated). Cascades are not lossless: quality is measured, never assumed."""
from dataclasses import dataclass

import pytest

from dflash.cascade.ablation import ABLATION_LAMBDAS
from dflash.cascade.ladder import RUNGS
from dflash.harness.ablation_cases import as_params

LEARNED = ("calibrated-threshold", "calibrated-threshold+votes", "logprob-threshold", "vote-threshold",
           "backward-induction", "lookahead", "best-pair", "router", "random")


@dataclass(frozen=True)
class Policy:
    id: str
    name: str
    lam: float | None = None


CASES = ([Policy(f"fixed-{r.name}", f"fixed-{r.name}") for r in RUNGS]
         + [Policy(name, name) for name in ("oracle-cascade", "oracle-router")]
         + [Policy(f"{name}-lam{lam:g}", name, lam) for name in LEARNED for lam in ABLATION_LAMBDAS])


@pytest.mark.ablation("cascade")
@pytest.mark.parametrize("policy", as_params(CASES))
def test_cascade(cascade_case, policy):
    metrics, gates = cascade_case.measure(policy.name, policy.lam)
    queries = len(metrics["per_query"]["qids"])
    cascade_case.finish({"policy": policy.name, "lam": policy.lam, "queries": queries}, metrics, gates)


@pytest.mark.gpu
def test_gpu_cascade_profile_collects_and_replays(tmp_path):
    """gpu-cascade-qwen3 (Qwen3-0.6B/1.7B/4B/8B on GSM8K, bf16) through the same collect -> replay path; one
    line of skip reason where CUDA, the weights or GSM8K are missing. Not gated: no GPU baseline exists yet."""
    from dflash.cascade import evaluate as ev
    from dflash.cascade.collect import collect, read_table
    from dflash.profiles import get_ladder as get_profile
    from dflash.cascade.replay import build_table
    profile = get_profile("gpu-cascade-qwen3")
    reason = profile.unavailable()
    if reason:
        pytest.skip(reason)
    path = collect(profile.queries(40), tmp_path / "table.jsonl", profile, progress=False)
    table = build_table(read_table(path)[1], list(profile.rung_names)).token_normalised()
    results = ev.evaluate_policies(table, lambdas=ABLATION_LAMBDAS).results
    assert ev.invariants(results) == []
