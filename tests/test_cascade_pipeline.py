"""The cascade pipeline end to end on the shipped ladder, through the command line: collect a small table (and
resume it), then replay every policy into a report whose mathematical invariants hold."""
import json
import subprocess
import sys

import pytest

from dflash.profiles import get_ladder as get_profile


def test_collect_resume_and_report(tmp_path):
    reason = get_profile("tiny").unavailable()
    if reason:
        pytest.skip(f"cascade profile tiny: {reason}")
    table = tmp_path / "table.jsonl"

    def cascade(*args):
        return subprocess.run([sys.executable, "-m", "dflash.cli", "cascade", *args, "--table", str(table)],
                              capture_output=True, text=True, timeout=900)
    first = cascade("collect", "--queries", "8")
    assert first.returncode == 0, first.stderr[-2000:]
    lines = table.read_text().splitlines()
    assert len(lines) == 1 + 16 * 4  # header + every rung on every query
    again = cascade("collect", "--queries", "10")  # resumes: only the new queries run
    assert again.returncode == 0 and len(table.read_text().splitlines()) == 1 + 20 * 4
    assert table.read_text().splitlines()[: len(lines)] == lines
    report = cascade("report", "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr[-2000:]
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["invariant_violations"] == [] and summary["n"] == 20
    fixed = {r["policy"]: r for r in summary["policies"] if r["lam"] is None}
    assert fixed["oracle-cascade"]["accuracy"][0] >= max(r["accuracy"][0] for r in summary["policies"])
    assert (tmp_path / "report" / "pareto.png").exists()
