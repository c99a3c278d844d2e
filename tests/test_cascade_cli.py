"""`dflash cascade` on bad input: a clear one-line error and exit 2, never a traceback."""
import json
import subprocess
import sys

import pytest


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dflash.cli", "cascade", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args,words", [
    (("report", "--table", "nowhere.jsonl"), "No cascade table at nowhere.jsonl"),
    (("report", "--profile", "huge"), "Unknown cascade profile 'huge'"),
    (("collect", "--queries", "0"), "argument --queries"),
    (("collect", "--profile", "tiny", "--queries", "100000"), "--queries must be between 1 and"),
])
def test_bad_arguments(tmp_path, args, words):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr


def test_a_damaged_table_is_named_with_its_line(tmp_path):
    table = tmp_path / "table.jsonl"
    table.write_text(json.dumps({"table_version": 1}) + "\n" + "{not json\n" + json.dumps({"qid": "x"}) + "\n")
    result = run("report", "--table", str(table), cwd=tmp_path)
    assert result.returncode == 2 and "line 2 is not a table row" in result.stderr
    assert "Traceback" not in result.stderr
    table.write_text("")
    result = run("report", "--table", str(table), cwd=tmp_path)
    assert result.returncode == 2 and "is empty" in result.stderr
