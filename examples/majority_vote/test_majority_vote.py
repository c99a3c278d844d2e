"""The example family's ablation: accuracy of a majority of m answerers, gated per query against its baseline.
Run: pytest examples/majority_vote --profile tiny [--update-baselines] [--report]."""
import pytest

import majority_vote  # noqa: F401  (registers the family and its fixture, vote_case)


@pytest.mark.ablation("majority_vote")
@pytest.mark.parametrize("m", [1, 3, 5], ids=lambda m: f"m{m}")
def test_majority_vote(vote_case, m):
    metrics, gates = vote_case.measure(m, p_right=0.6)
    vote_case.finish({"m": m, "p_right": 0.6}, metrics, gates)
