"""The worked example of adding an ablation family (examples/majority_vote/, docs/extending.md) run end to end, so
it cannot rot: the folder alone registers the family and its fixture, its ablation records baselines, gates
against them under CI with its own table in the report, and a worse run fails its accuracy gate."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "majority_vote"


def run(tmp_path, *args, ci=False):
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "GITHUB_STEP_SUMMARY")}
    return subprocess.run([sys.executable, "-m", "pytest", str(EXAMPLE), "--profile", "tiny", "-q", "-n", "0",
                           "-p", "no:randomly", "-p", "no:cacheprovider", "--baselines-dir", str(tmp_path / "baselines"),
                           "--reports-dir", str(tmp_path / "reports"), *args], cwd=ROOT,
                          env={**env, "CI": "true"} if ci else env, capture_output=True, text=True, timeout=300)


def test_the_example_family_records_gates_reports_and_fails_a_worse_run(tmp_path):
    recorded = run(tmp_path, "--update-baselines")
    assert recorded.returncode == 0, recorded.stdout[-3000:]
    stored = tmp_path / "baselines" / "tiny" / "majority_vote.json"
    entries = {c["id"]: c for c in json.loads(stored.read_text())["cases"]}
    assert sorted(entries) == [f"majority_vote/test_majority_vote[tiny-m{m}]" for m in (1, 3, 5)]
    assert all(c["kind"] == "outcomes" and len(c["per_query"]["correct"]) == 120 for c in entries.values())

    gated = run(tmp_path, "--report", ci=True)
    assert gated.returncode == 0, gated.stdout[-3000:]
    summary = (sorted((tmp_path / "reports").glob("tiny-*"))[-1] / "summary.md").read_text()
    assert "## Majority vote (example family): toy-queries\n" in summary
    assert "| Case | answerers m | p(right) each | accuracy [95% CI] | calls per query | Verdict |" in summary
    assert "| tiny-m5 | 5 | 0.6 | 0.650 [0.563, 0.737] | 5 | PASS |" in summary

    # A baseline that was right on every query: the same run is now a regression (exact McNemar, 42 lost).
    data = json.loads(stored.read_text())
    for case in data["cases"]:
        if case["id"].endswith("m5]"):
            case["per_query"]["correct"] = [1] * len(case["per_query"]["correct"])
    stored.write_text(json.dumps(data))
    worse = run(tmp_path, ci=True)
    assert worse.returncode == 1
    assert "majority_vote/test_majority_vote[tiny-m5]: accuracy regression: baseline 1.000 -> new 0.650" in worse.stdout
