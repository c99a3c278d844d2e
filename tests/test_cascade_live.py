"""A live cascade (the ladder's models run in sequence under a policy's decisions) reproduces the replay of the
collected table: the same stopping stage and answer for every query, exactly the tokens the replay charges,
and its measured seconds within timing noise. The check has power: replay with a broken cost rule (charging only
the stopping stage, not every stage run) disagrees with the live run."""
import dataclasses

import numpy as np
import pytest

from dflash.cascade import replay
from dflash.cascade.collect import collect, read_table
from dflash.cascade.live import run_live
from dflash.profiles import get_ladder as get_profile

PROFILE = get_profile("tiny")


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    reason = PROFILE.unavailable()
    if reason:
        pytest.skip(f"cascade profile tiny: {reason}")
    queries = PROFILE.queries(8)
    path = collect(queries, tmp_path_factory.mktemp("cascade") / "table.jsonl", PROFILE, progress=False)
    table = replay.build_table(read_table(path)[1], list(PROFILE.rung_names))
    # Platt scaling keeps the predictions continuous on so few queries; the vote share makes the live cascade
    # draw samples too. Never stopping at l1 or l2 and stopping at l3 above its median prediction splits the
    # queries between l3 and l4, so the cost rule is exercised.
    predictors = replay.StagePredictors(features=("mean_logprob", "vote_share"), calibration="sigmoid").fit(table)
    predicted = predictors.predict(table)
    thresholds = (np.inf, np.inf, float(np.median(predicted[:, 2])))
    live = run_live(queries, predictors, thresholds, PROFILE)
    return table, replay.threshold_stops(predicted, thresholds), live


def stop_only(table, stop, with_samples):
    """The broken rule: a cascade charged only for the stage it stopped at."""
    rows = np.arange(table.size)
    return replay.Outcome(stop, table.correct[rows, stop], table.stage_cost(with_samples)[rows, stop])


@pytest.mark.parametrize("accounting", ["every stage run", "broken: stopping stage only"])
def test_live_cascade_equals_replay(collected, accounting):
    table, stop, live = collected
    assert len(set(stop.tolist())) > 1, "the policy stops at one stage only: the cost check would have no power"
    outcome_of = replay.cascade_outcome if accounting == "every stage run" else stop_only
    by_tokens = dataclasses.replace(table, greedy_s=table.new_tokens, sample_s=np.zeros_like(table.sample_s))
    tokens = outcome_of(by_tokens, stop, False).cost
    seconds = outcome_of(table, stop, True).cost
    same = ([r.stop for r in live] == stop.tolist()
            and [r.answer for r in live] == [table.answers[i, k] for i, k in enumerate(stop)]
            and [r.new_tokens for r in live] == tokens.astype(int).tolist()
            and 0.6 < sum(r.cost_s for r in live) / seconds.sum() < 1.6)
    assert same == (accounting == "every stage run")
