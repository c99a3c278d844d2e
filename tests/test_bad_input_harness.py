"""Bad input to the ablation plugin never crashes, hangs, lies or runs code (issue 10, harness part).

Every probe runs a real pytest session on a tiny ablation project written into pytester's directory: one case
that records fixed per-prompt taus through the real `case` fixture and `Case.finish` (no model is loaded, nothing
is decoded), so a session costs well under a second. The sessions run in-process (pytester's default), since the
simulated faults below patch this interpreter. Each asserts what the user sees (the exit status, one clear
message) and what must not happen: no "Traceback", no "INTERNALERROR", and no change to any file that existed
before the run (the baselines and the earlier runs are hashed before and after).

Failing file systems are simulated, not made with chmod (the tests may run as root, whom chmod does not stop):
`Faults` makes every write under one directory fail with EROFS or ENOSPC, at the os level (os.open, os.mkdir,
os.replace, open(...)), either from the start or only once the cases have run (`pytest_runtestloop` done: a
failure that appears at session end, after everything was measured).
"""
from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dflash.errors import DFlashError
from dflash.harness import fileio
from dflash.harness.baselines import load_baselines
from dflash.harness.recording import baselines_from_run
from dflash.harness.runs import RUN_FILE
from dflash.harness.render import render_summary, table
from dflash.harness.results import ResultsFile, ResultsFileError, load

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
BASE_ARGS = ("-p", "no:xdist", "-p", "no:cacheprovider", "-p", "no:randomly", "--profile", "tiny",
             "--reports-dir", "reports", "--baselines-dir", "baselines", "-k", "math")
USAGE_ERROR = pytest.ExitCode.USAGE_ERROR  # 4

CONFTEST = 'pytest_plugins = ["dflash.plugin"]\n'
ABLATION = '''
import json
import os

import pytest

TAUS = [4.0 + 0.25 * i for i in range(12)]
PARAM = json.loads(os.environ.get("BAD_PARAM", '"plain"'))


@pytest.mark.ablation("wire")
@pytest.mark.parametrize("p", [pytest.param(PARAM, id=os.environ.get("BAD_ID") or None)])
def test_case(case, p):
    metrics = {"per_prompt_tau": TAUS, "speedup_samples": [1.0] * 12}
    case.finish({"p": p}, metrics, case.gate(metrics))  # reads the baseline file, if there is one
'''
CASE_ID = "wire/test_case[tiny-math-plain]"


@pytest.fixture
def project(pytester, monkeypatch):
    for name in ("CI", "GITHUB_STEP_SUMMARY", "BAD_PARAM", "BAD_ID", "PYTEST_PLUGINS", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(name, raising=False)
    pytester.makefile(".ini", pytest="[pytest]\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_wire=ABLATION)
    return pytester


def run(pytester, *args, plugins=()):
    return pytester.runpytest(*BASE_ARGS, *args, plugins=list(plugins))


def output(result) -> str:
    return result.stdout.str() + "\n" + result.stderr.str()


def files(root: Path) -> dict[str, str]:
    """Every file under root (bytecode caches aside) with its digest."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def assert_clean(result) -> None:
    text = output(result)
    assert "Traceback" not in text and "INTERNALERROR" not in text, text


def run_dirs(pytester) -> list[Path]:
    return sorted(p for p in (pytester.path / "reports").glob("tiny-*") if p.is_dir())


# --- simulated failing file systems ----------------------------------------------------------------------

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | getattr(os, "O_TMPFILE", 0)


class Faults:
    """Writes under `root` fail with `code` (EROFS: a read-only file system, ENOSPC: a full disk) while active;
    `after_cases=True` activates it only once the test loop is done (a failure that appears at session end).
    Registered as a plugin of the inner session; the monkeypatched os functions are restored after the test."""

    def __init__(self, monkeypatch, root: Path, code: int = errno.EROFS, *, after_cases: bool = False):
        self.root, self.code, self.active = os.path.abspath(root), code, not after_cases
        real_open, real_os_open = builtins.open, os.open

        def refuse(path):
            if self.active and os.path.abspath(os.fspath(path)).startswith(self.root):
                raise OSError(self.code, os.strerror(self.code), os.fspath(path))

        def os_open(path, flags, *args, **kwargs):
            if flags & WRITE_FLAGS:
                refuse(path)
            return real_os_open(path, flags, *args, **kwargs)

        def py_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+"):
                refuse(file)
            return real_open(file, mode, *args, **kwargs)

        def one_path(real):
            return lambda path, *args, **kwargs: (refuse(path), real(path, *args, **kwargs))[1]

        def two_paths(real):
            return lambda src, dst, *args, **kwargs: (refuse(src), refuse(dst), real(src, dst, *args, **kwargs))[2]

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", py_open)
        monkeypatch.setattr(io, "open", py_open)
        for name in ("mkdir", "unlink", "remove", "rmdir"):
            monkeypatch.setattr(os, name, one_path(getattr(os, name)))
        for name in ("replace", "rename"):
            monkeypatch.setattr(os, name, two_paths(getattr(os, name)))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session):
        result = yield
        self.active = True
        return result


# --- 1. bad options and inputs: a usage error before anything is measured ------------------------------------

@dataclass(frozen=True)
class Probe:
    args: tuple[str, ...]
    message: str  # a regex the output must contain
    setup: str = ""  # what to prepare in the project first (see `prepare`)


def prepare(pytester, monkeypatch, setup: str) -> list:
    """Makes the situation a probe needs; returns the plugins for the inner session."""
    if setup in ("resume-garbage-middle", "resume-garbage-last", "resume-run-json-list", "resume-run-json-garbage",
                 "resume-bad-gate", "resume-read-only"):
        first = run(pytester)
        assert first.ret == 0, output(first)
        (run_dir,) = run_dirs(pytester)
        results = run_dir / "results.jsonl"
        record = json.loads(results.read_text())
        if setup == "resume-garbage-middle":
            results.write_text("garbage\n" + results.read_text())
        elif setup == "resume-garbage-last":
            results.write_text(results.read_text() + "garbage\n")
        elif setup == "resume-run-json-list":
            (run_dir / RUN_FILE).write_text("[]\n")
        elif setup == "resume-run-json-garbage":
            (run_dir / RUN_FILE).write_text("{not json")
        elif setup == "resume-bad-gate":
            record["gates"] = [{"kind": "tau", "case_id": record["id"], "p_value": "small"}]
            results.write_text(json.dumps(record) + "\n")
        elif setup == "resume-read-only":
            return [Faults(monkeypatch, run_dir)]
    elif setup == "a-file":
        (pytester.path / "a-file").write_text("not a directory\n")
    elif setup == "read-only-reports":
        return [Faults(monkeypatch, pytester.path / "reports")]
    elif setup == "read-only-baselines":
        (pytester.path / "baselines" / "tiny").mkdir(parents=True)
        (pytester.path / "baselines" / "tiny" / "wire.json").write_text("{}\n")
        return [Faults(monkeypatch, pytester.path / "baselines")]
    elif setup == "newline-id":  # pytest escapes ids unless told not to; then a raw newline reaches the id
        pytester.makefile(".ini", pytest="[pytest]\ndisable_test_id_escaping_and_forfeit_all_rights_to_community"
                                         "_support = true\n")
        monkeypatch.setenv("BAD_ID", "x\n<script>alert(1)</script>")
    elif setup == "unnamed-ablation":
        pytester.makepyfile(test_wire=ABLATION.replace('@pytest.mark.ablation("wire")', "@pytest.mark.ablation"))
    elif setup == "path-ablation":
        pytester.makepyfile(test_wire=ABLATION.replace('@pytest.mark.ablation("wire")',
                                                       '@pytest.mark.ablation("../../escape")'))
    else:
        assert not setup, setup
    return []


def number(option: str, value: str, requirement: str = "") -> pytest.param:
    """A numeric gate option refused when parsed (an argparse type error, which pytest makes a usage error)."""
    message = re.escape(f"argument {option}: '{value}' is not accepted: {option} must be {requirement}")
    return pytest.param(Probe((option, value), message), id=f"{option.lstrip('-')}={value}")


def usage(id: str, args: tuple[str, ...], message: str, setup: str = "") -> pytest.param:
    return pytest.param(Probe(args, message, setup), id=id)


ALPHA, MARGIN, FACTOR = "--gate-alpha", "--tau-margin", "--throughput-factor"
USAGE_PROBES = [
    number(ALPHA, "0", "a significance level in the open interval (0, 1) (e.g. --gate-alpha 0.05)"),
    number(ALPHA, "nan"), number(ALPHA, "1.5"), number(ALPHA, "1"), number(ALPHA, "1e999"), number(ALPHA, "abc"),
    number(MARGIN, "2", "a fraction in [0, 1) (e.g. --tau-margin 0.03)"),
    number(MARGIN, "-1"), number(MARGIN, "1"), number(MARGIN, "inf"), number(MARGIN, "nan"),
    number(FACTOR, "0.5", "a finite factor >= 1 (e.g. --throughput-factor 1.10)"),
    number(FACTOR, "inf"), number(FACTOR, "NaN"), number(FACTOR, "0"),
    usage("prompts-zero", ("--prompts", "0"), r"argument --prompts: must be an integer in \[1, inf\], got 0"),
    usage("max-new-tokens-text", ("--max-new-tokens", "many"), r"argument --max-new-tokens: expected an integer"),
    usage("shard-out-of-range", ("--shard", "3/2"), r"--shard needs I/N with 1 <= I <= N"),
    usage("profile-unknown", ("--profile", "nope"), r"unknown --profile 'nope'; choose one of tiny"),
    usage("reports-dir-empty", ("--reports-dir", ""), r"'' is not accepted: --reports-dir needs a directory path"),
    usage("reports-dir-is-a-file", ("--reports-dir", "a-file"), r"--reports-dir \S+/a-file is a file, not a directory",
          "a-file"),
    usage("baselines-dir-is-a-file", ("--baselines-dir", "a-file"),
          r"--baselines-dir \S+/a-file is a file, not a directory", "a-file"),
    usage("reports-dir-read-only", (), r"--reports-dir \S+/reports: cannot create a run directory there \(Read-only "
          r"file system.*Nothing was measured\. Pass a writable --reports-dir DIR", "read-only-reports"),
    usage("update-baselines-read-only", ("--update-baselines",), r"--update-baselines would measure every case and "
          r"then fail to write the baselines under \S+/baselines/tiny: no file can be created in \S+ \(Read-only "
          r"file system\)\. Nothing was measured", "read-only-baselines"),
    usage("draft-unknown", ("--draft", "no/such/dir"),
          r"--draft no/such/dir: Unknown draft model 'no/such/dir': not a known name"),
    usage("resume-garbage-first-line", ("--resume",), r"--resume cannot continue \S+: Corrupt results file "
          r"\S+results\.jsonl, line 1: .*delete that line, or move the run directory away", "resume-garbage-middle"),
    usage("resume-garbage-complete-last-line", ("--resume", "--report"),
          r"Corrupt results file \S+results\.jsonl, line 2: ", "resume-garbage-last"),
    usage("resume-run-json-not-an-object", ("--resume",), r"--resume: \S+ has no readable run\.json \(a JSON object\)",
          "resume-run-json-list"),
    usage("resume-run-json-corrupt", ("--resume",), r"--resume: \S+ has no readable run\.json",
          "resume-run-json-garbage"),
    usage("resume-record-with-a-bad-gate", ("--resume",), r"Bad record in results file \S+results\.jsonl, line 1: "
          r"gate #0 \(tau\) lacks numeric baseline, new, rel_change, p_value", "resume-bad-gate"),
    usage("resume-read-only-run", ("--resume",), r"--resume cannot continue \S+: no file can be created in \S+ "
          r"\(Read-only file system\).*Nothing was measured", "resume-read-only"),
    usage("case-id-with-a-newline", (), r"1 ablation case\(s\) cannot be recorded as written, nothing was measured: "
          r".*the id 'wire/test_case\[tiny-math-x\\n<script>alert\(1\)</script>\]' contains non-printable "
          r"character\(s\) '\\n'.*pytest\.param\(value, id=\.\.\.\)", "newline-id"),
    usage("ablation-without-a-name", (), r"@pytest\.mark\.ablation needs the ablation's name as its first argument",
          "unnamed-ablation"),
    usage("ablation-name-with-a-path", (), r"a plain file name \(letters, digits, _ \. -\), got '\.\./\.\./escape'",
          "path-ablation"),
]


@pytest.mark.parametrize("probe", USAGE_PROBES)
def test_bad_input_is_a_usage_error_before_anything_is_measured(project, monkeypatch, probe):
    plugins = prepare(project, monkeypatch, probe.setup)
    before = files(project.path)
    result = run(project, *probe.args, plugins=plugins)
    assert result.ret == USAGE_ERROR, output(result)
    assert_clean(result)
    assert re.search(probe.message, output(result), re.S), output(result)
    assert files(project.path) == before  # nothing written, changed or removed (no run directory either)


# --- 2. session-end failures: one clear error, nothing measured is lost -------------------------------------

def test_baselines_that_cannot_be_written_at_session_end_leave_the_report_and_say_how_to_write_them(project,
                                                                                                   monkeypatch):
    baselines = project.path / "baselines" / "tiny"
    baselines.mkdir(parents=True)
    (baselines / "other.json").write_text('{"kept": "as it was"}\n')
    before = files(project.path / "baselines")
    faults = Faults(monkeypatch, project.path / "baselines", after_cases=True)
    result = run(project, "--update-baselines", "--report", plugins=[faults])
    assert result.ret == pytest.ExitCode.TESTS_FAILED, output(result)
    assert_clean(result)
    result.assert_outcomes(passed=1)
    (run_dir,) = run_dirs(project)
    assert (run_dir / "summary.md").is_file() and CASE_ID in (run_dir / "summary.md").read_text()
    text = output(result)
    command = f"dflash baselines --from-run {run_dir} --baselines-dir {project.path / 'baselines'} --write"
    assert ("ERROR: --update-baselines: the baselines were NOT WRITTEN to " in text and "(Read-only file system"
            in text and f"every finished case of this run is recorded in {run_dir / 'results.jsonl'}" in text
            and f"`{command}`" in text), text
    assert "dflash baselines updated" not in text  # nothing claims they were written
    assert files(project.path / "baselines") == before

    faults.active = False  # the cause is fixed: the advised command writes them without measuring again
    from dflash.cli import main as dflash
    assert dflash(command.split()[1:]) == 0
    assert list(load_baselines(baselines / "wire.json").cases) == [CASE_ID]


def test_a_full_disk_at_session_end_names_where_the_measured_cases_are_and_resume_renders_them(project,
                                                                                                monkeypatch):
    faults = Faults(monkeypatch, project.path / "reports", errno.ENOSPC, after_cases=True)
    result = run(project, "--report", plugins=[faults])
    assert result.ret == pytest.ExitCode.TESTS_FAILED, output(result)
    assert_clean(result)
    (run_dir,) = run_dirs(project)
    assert not (run_dir / "summary.md").exists()
    text = output(result)
    assert (f"ERROR: --report: the tiny summary was NOT WRITTEN to {run_dir} (No space left on device" in text
            and f"recorded in {run_dir / 'results.jsonl'}" in text and "--resume --report" in text), text
    assert len(load(run_dir / "results.jsonl")) == 1

    faults.active = False
    again = run(project, "--resume", "--report")  # what the message advises: re-applied, not measured again
    assert again.ret == 0, output(again)
    again.assert_outcomes(skipped=1)
    assert len(load(run_dir / "results.jsonl")) == 1 and CASE_ID in (run_dir / "summary.md").read_text()


def test_a_record_that_cannot_be_appended_fails_its_case_clearly_and_still_reaches_the_report(project,
                                                                                               monkeypatch):
    def full_disk(self, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
    monkeypatch.setattr(ResultsFile, "append", full_disk)
    result = run(project, "--report")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, output(result)
    assert_clean(result)
    result.assert_outcomes(failed=1)
    assert re.search(re.escape(CASE_ID) + r": measured, but its record could not be appended to \S+results\.jsonl "
                     r"\(No space left on device\)", output(result)), output(result)
    (run_dir,) = run_dirs(project)
    assert CASE_ID in (run_dir / "summary.md").read_text()  # the measured case is not lost from the report


def test_an_unwritable_github_step_summary_says_so_without_losing_the_summary(project, monkeypatch):
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(project.path))  # a directory: appending to it fails
    result = run(project, "--report")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, output(result)
    assert_clean(result)
    (run_dir,) = run_dirs(project)
    assert (run_dir / "summary.md").is_file()
    assert f"ERROR: --report: {run_dir / 'summary.md'} is written, but $GITHUB_STEP_SUMMARY could not be " \
        "(IsADirectoryError" in output(result), output(result)


# --- 3. bad baseline files: the case fails naming the file, --check-baselines lists it ------------------------

BAD_BASELINES = [
    pytest.param(b"{not json", r"invalid JSON at line 1, column 2", id="invalid-json"),
    pytest.param(b"\xff\xfe\x00garbage", r"not UTF-8 text", id="binary"),
    pytest.param(json.dumps({"schema_version": 2, "profile": "tiny", "ablation": "wire",
                             "cases": [{"id": CASE_ID, "per_prompt_tau": "many", "code": "",
                                        "throughput": {"cpu-a": {"speedup_samples": [True], "fingerprint": {},
                                                                 "code": "a", "recorded": "x"}},
                                        "counters": [], "fingerprint": 7, "provenance": {}}]}).encode(),
                 r"case '\S+': per_prompt_tau must be a non-empty list of finite numbers; .*code must name the commit"
                 r".*speedup_samples must be a list of positive numbers; .*counters must be an object; "
                 r".*fingerprint must be an object", id="wrong-types"),
    pytest.param(json.dumps({"schema_version": 1, "profile": "tiny", "ablation": "wire", "cases": []}).encode(),
                 r"schema_version is 1, this code reads version 2", id="old-schema"),
    pytest.param(json.dumps({"schema_version": 2, "profile": "tiny", "ablation": "wire", "cases": "none"}).encode(),
                 r"cases must be a list", id="cases-not-a-list"),
    pytest.param(None, r"cannot be read \(Is a directory\)", id="a-directory"),
]


@pytest.mark.parametrize("content, message", BAD_BASELINES)
def test_a_bad_baseline_file_fails_the_case_naming_the_file(project, content, message):
    path = project.path / "baselines" / "tiny" / "wire.json"
    path.parent.mkdir(parents=True)
    path.mkdir() if content is None else path.write_bytes(content)
    before = files(project.path)
    result = run(project)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, output(result)
    assert_clean(result)
    result.assert_outcomes(failed=1)
    assert re.search(re.escape(CASE_ID) + r": Bad baseline file \S+/baselines/tiny/wire\.json: " + message,
                     output(result)), output(result)
    check = run(project, "--collect-only", "--check-baselines")
    assert check.ret == pytest.ExitCode.TESTS_FAILED, output(check)
    assert_clean(check)
    assert re.search(r"unreadable: Bad baseline file \S+/baselines/tiny/wire\.json: " + message, output(check))
    assert {k: v for k, v in files(project.path).items() if k in before} == before


# --- 4. report injection ---------------------------------------------------------------------------------------

EVIL = "a|b\r\nc <script>alert(1)</script> & `x` [l](javascript:y)"


def test_render_escapes_markdown_and_html_in_every_cell_and_heading():
    record = {"id": f"evil/{EVIL}", "ablation_family": "decode", "experiment": "evil", "group": f"g\n# {EVIL}", "params": {"p": EVIL, EVIL: 1},
              "metrics": {"note": EVIL}, "status": "skipped", "reason": EVIL}
    text = render_summary([record], {"profile": "tiny", "hardware": EVIL}, announced=[record["id"], f"gone`{EVIL}"],
                          skipped={"x": EVIL})
    assert "<script>" not in text and "<" not in text.replace("&lt;", "")
    assert "](" not in text and "\r" not in text
    lines = text.splitlines()
    headings = [line for line in lines if line.startswith("#")]
    assert len(headings) == 2 and headings[1].startswith("## Evil: g # a|b c &lt;script&gt;"), headings
    rows = [line for line in lines if line.startswith("|")]
    assert len(rows) == 6 + 3  # the run table (header, rule, 4 rows), then the case table (header, rule, 1 row)
    for table_lines in (rows[:6], rows[6:]):
        widths = {len(re.findall(r"(?<!\\)\|", line)) for line in table_lines}
        assert len(widths) == 1, table_lines  # no cell splits its row
    assert "a\\|b c &lt;script&gt;alert(1)&lt;/script&gt; &amp; \\`x\\` [l]\\(javascript:y)" in text
    banner = next(line for line in lines if "INCOMPLETE" in line)
    assert "gone\\`a|b c &lt;script&gt;" in banner and "`evil/" not in banner, banner  # plain text, not code


def test_table_escapes_each_cell_in_one_place():
    assert table(["h|<i>"], [["x|y\nz <b>&"]]).splitlines() == ["| h\\|&lt;i&gt; |", "|---|",
                                                                "| x\\|y z &lt;b&gt;&amp; |"]


def test_a_param_with_html_and_newlines_reaches_the_summary_escaped(project, monkeypatch):
    monkeypatch.setenv("BAD_PARAM", json.dumps(EVIL))
    result = run(project, "-k", "math", "--report")
    assert result.ret == 0, output(result)
    (run_dir,) = run_dirs(project)
    summary = (run_dir / "summary.md").read_text()
    assert "<script>" not in summary and "&lt;script&gt;" in summary
    lines = summary.splitlines()
    header = lines.index("| Case | p | per_prompt_tau | speedup_samples | Verdict |")
    (row,) = [line for line in lines if line.startswith("| wire/")]
    assert lines[header + 2] == row and len(re.findall(r"(?<!\\)\|", row)) == 6, summary


# --- 5. ids with control characters are refused where they enter ----------------------------------------------

def _recording(tmp_path, case_id: str) -> Path:
    identity = {"profile": "tiny", "target": "tiny", "draft": "tiny", "overrides": [], "code": "abc",
                "options": {"update_baselines": True}}
    from dflash.harness.runs import identity_digest
    record = {"id": "block_size/ok", "ablation": "block_size", "ablation_family": "decode", "profile": "tiny",
              "dataset": "math",
              "metrics": {"per_prompt_tau": [2.0], "speedup_samples": [1.0]}, "outcome": "passed", "recording": True,
              "identity": identity_digest(identity), "fingerprint": {"testbed": "cpu-a", "code": "abc"}}
    run_dir = tmp_path / "reports" / "tiny-1"
    run_dir.mkdir(parents=True)
    (run_dir / RUN_FILE).write_text(json.dumps(identity))
    lines = [json.dumps(record), json.dumps({**record, "id": case_id})]
    (run_dir / "results.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def test_from_run_refuses_an_id_with_a_newline_naming_file_and_line(tmp_path, capsys):
    run_dir = _recording(tmp_path, "block_size/x\n<script>alert(1)</script>")
    with pytest.raises(ResultsFileError, match=r"Bad record in results file \S+results\.jsonl, line 2: the id "
                       r"'block_size/x\\n<script>alert\(1\)</script>' contains non-printable character\(s\) '\\n'"):
        baselines_from_run(run_dir, tmp_path / "baselines", write=True)
    assert not (tmp_path / "baselines").exists()
    from dflash.cli import main as dflash
    assert dflash(["baselines", "--from-run", str(run_dir), "--baselines-dir", str(tmp_path / "baselines")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dflash: error: Bad record in results file") and "Traceback" not in err


def test_from_run_into_a_baselines_dir_that_is_a_file_or_read_only_is_a_clear_error(tmp_path, monkeypatch):
    run_dir = _recording(tmp_path, "block_size/fine")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DFlashError, match="is a file, not a directory"):
        baselines_from_run(run_dir, tmp_path / "a-file", write=True)
    Faults(monkeypatch, tmp_path / "baselines")
    with pytest.raises(DFlashError, match=r"could not be written to \S+ \(Read-only file system"):
        baselines_from_run(run_dir, tmp_path / "baselines", write=True)


@pytest.mark.parametrize("bad", ["a\nb", "tab\there", "nul\x00", "bidi\u202e", "line\u2028sep", ""])
def test_results_refuse_a_non_printable_id_on_append_and_on_load(tmp_path, bad):
    results = ResultsFile(tmp_path / "results.jsonl")
    with pytest.raises(DFlashError, match="non-empty string|non-printable"):
        results.append({"id": bad})
    assert not results.path.exists()
    results.path.write_text(json.dumps({"id": bad}) + "\n")
    with pytest.raises(ResultsFileError, match=r"results\.jsonl, line 1"):
        results.load()


def test_only_a_torn_last_line_is_tolerated(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", "metr')  # what a killed append leaves: tolerated
    with pytest.warns(UserWarning, match="truncated last line"):
        assert [r["id"] for r in load(path)] == ["a"]
    for bad in ('{"id": "a"}\ngarbage', '{"id": "a"}\n{"id": "b", "metr\n'):  # not a record / a complete line
        path.write_text(bad)
        with pytest.raises(ResultsFileError, match="line 2"):
            load(path)


# --- 6. stale temp files after a kill ----------------------------------------------------------------------------

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_atomic_write_removes_temp_files_whose_writer_is_dead_and_keeps_live_ones(tmp_path):
    target = tmp_path / "wire.json"
    dead, live = _dead_pid(), os.getpid()
    stale = tmp_path / f".wire.json.{dead}.abc_123.tmp"
    alive = tmp_path / f".wire.json.{live}.def456.tmp"
    old_legacy, new_legacy = tmp_path / ".wire.json.abcd1234.tmp", tmp_path / ".wire.json.efgh5678.tmp"
    other = tmp_path / f".other.json.{dead}.abc123.tmp"
    for path in (stale, alive, old_legacy, new_legacy, other):
        path.write_text("partial")
    os.utime(old_legacy, (time.time() - 2 * fileio.LEGACY_TEMP_MAX_AGE_S,) * 2)
    fileio.atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (target, alive, new_legacy, other))


def _killed_mid_write(path: str) -> None:
    os.fsync = lambda fd: time.sleep(600)  # hold the temp file open until killed
    fileio.atomic_write_text(path, "half")


def test_a_writer_killed_mid_write_leaves_a_temp_file_named_by_its_pid_that_the_next_write_removes(tmp_path):
    target = tmp_path / "summary.md"
    child = multiprocessing.get_context("fork").Process(target=_killed_mid_write, args=(str(target),))
    child.start()
    deadline = time.time() + 30
    while not list(tmp_path.glob(".summary.md.*.tmp")) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    (left,) = tmp_path.glob(".summary.md.*.tmp")
    assert left.name.startswith(f".summary.md.{child.pid}.") and not target.exists()
    fileio.atomic_write_text(target, "whole\n")
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"] and target.read_text() == "whole\n"


@pytest.mark.parametrize("name", ["baselines/tiny/.wire.json.123.abc_12.tmp", "baselines/tiny/.wire.json.k2j4x8qz.tmp",
                                  "reports/.summary.md.9.x.tmp", "baselines/tiny/wire.json.partial"])
def test_temp_files_are_ignored_by_git(name):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", name]).returncode == 0

