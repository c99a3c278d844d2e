"""The A/B reference of a throughput gate: the code a baseline was recorded with (or `--ab-ref REF`), checked out
and measured on this machine, in this run, beside the current code (asv's `continuous`, Pinpoint's A/B on one
bot). A testbed that has no stored throughput of its own is gated this way, so a new runner needs no flag and no
re-recording to be gated honestly.

The reference runs its own test code, unchanged: a worker process per pytest process runs, in a checkout of the
reference commit of the repository under test (whose `dflash`, when it has one, is the one imported), the same case (`pytest <nodeid>`, in that checkout, against an empty
baselines directory) when the current case asks for it, right after the current case measured itself; the
samples come from the reference's own record. So every family (decode, outcomes, batched) and every
past commit whose case ids still match can be the reference, with no measurement protocol shared between
commits. The two sides alternate case by case on the same prompts (paired by prompt index); within each side,
variant and target-only are interleaved per prompt as always, so the speedup ratios cancel slow drift.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import select
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from ..errors import DFlashError
from .baselines import locked

GIT_TIMEOUT_S = 120
READY_TIMEOUT_S = 300
CASE_TIMEOUT_S = 1800

# Run by `python -c` with the reference checkout as the working directory, so `import dflash` finds that
# checkout first. pytest writes to fd 1, so the protocol keeps a duplicate of it and fd 1 goes to the log.
DRIVER = r"""
import json, os, sys
protocol = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = os.fdopen(1, "w", buffering=1)
tree = os.path.realpath(os.getcwd())
import pytest
import dflash
if os.path.isdir(os.path.join(tree, "dflash")) and not os.path.realpath(dflash.__file__).startswith(tree + os.sep):
    protocol.write(json.dumps({"error": "dflash was imported from " + dflash.__file__ + ", not from " + tree}) + "\n")
    sys.exit(1)
protocol.write(json.dumps({"ready": dflash.__file__}) + "\n")
package = os.path.join(tree, "dflash") + os.sep
for line in sys.stdin:
    request = json.loads(line)
    before = set(sys.modules)
    code = int(pytest.main(request["args"]))
    for name in set(sys.modules) - before:  # test modules and conftests: the next session imports them anew
        path = getattr(sys.modules[name], "__file__", None) or ""
        if path.startswith(tree + os.sep) and not path.startswith(package):
            del sys.modules[name]
    protocol.write(json.dumps({"exit": code}) + "\n")
"""


class ReferenceUnavailable(DFlashError):
    """The reference cannot be measured here; the message says why and how to make it possible."""


def _git(repo: Path, *args: str, timeout: float = GIT_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=timeout)


def resolve_commit(ref: str, repo: Path) -> str:
    """The full sha of `ref` (a sha, branch or tag) in the clone at `repo`; a commit the clone lacks (a shallow
    CI checkout) is fetched from origin once. Raises ReferenceUnavailable saying how to get it."""
    if "+" in ref:
        raise ReferenceUnavailable(f"the reference {ref} was recorded from uncommitted changes on top of "
                                   f"{ref.split('+')[0][:12]}, which no checkout can reproduce; re-record the "
                                   "baseline from a clean tree, or name a commit with --ab-ref REF")
    for attempt in range(2):
        try:
            found = _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
        except (OSError, subprocess.SubprocessError) as error:
            raise ReferenceUnavailable(f"git could not be run to find the reference {ref} ({error})") from None
        if found.returncode == 0:
            return found.stdout.decode().strip()
        if attempt == 0:
            try:
                _git(repo, "fetch", "--quiet", "origin", ref)
            except (OSError, subprocess.SubprocessError):
                pass
    raise ReferenceUnavailable(f"the reference commit {ref} is not in this clone (a shallow checkout?) and could "
                               "not be fetched from origin; fetch it (`git fetch --unshallow`, or `actions/checkout` "
                               "with fetch-depth: 0) or pass --ab-ref REF")


def checkout(sha: str, repo: Path) -> Path:
    """A copy of commit `sha` of `repo` (`git archive`, no worktree bookkeeping), made once per machine under the
    temp directory and shared by every process and run; made under a lock, published by a rename."""
    root = Path(tempfile.gettempdir()) / f"dflash-ab-{hashlib.sha256(str(repo).encode()).hexdigest()[:8]}"
    tree = root / sha
    with locked(root):
        if (tree / ".complete").exists():
            return tree
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{sha[:12]}-"))
        try:
            archive = _git(repo, "archive", "--format=tar", sha)
            if archive.returncode:
                raise OSError(archive.stderr.decode(errors="replace").strip())
            with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
                tar.extractall(staging, filter="data")
            (staging / ".complete").write_text(sha + "\n")
            if tree.exists():
                shutil.rmtree(tree)
            staging.rename(tree)
        except (OSError, subprocess.SubprocessError, tarfile.TarError) as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise ReferenceUnavailable(f"commit {sha[:12]} could not be checked out for the A/B ({error})") from None
    return tree


class ReferenceWorker:
    """One process running the reference commit's own pytest, case by case, on request."""

    def __init__(self, sha: str, repo: Path, workdir: Path):
        self.sha, self.tree = sha, checkout(sha, repo)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "reference.log"
        self.calls = 0
        env = {k: v for k, v in os.environ.items()
               if k not in ("CI", "PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_XDIST_WORKER",
                            "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID", "PYTEST_CURRENT_TEST")}
        env["PYTHONPATH"] = str(self.tree)
        with open(self.log, "ab") as log:
            # unbuffered: `select` must see every reply line, none may wait in a Python buffer
            self.process = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=self.tree, env=env, bufsize=0,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        ready = self._reply(READY_TIMEOUT_S)
        if "ready" not in ready:
            self.close()
            raise ReferenceUnavailable(f"the reference {sha[:12]} could not start: {ready.get('error')} (log: "
                                       f"{self.log})")

    def _reply(self, timeout: float) -> dict:
        stream = self.process.stdout
        readable, _, _ = select.select([stream], [], [], timeout)
        line = stream.readline() if readable else b""
        if not line:
            self.close()
            what = "timed out" if not readable else f"exited with code {self.process.poll()}"
            return {"error": f"the reference process {what}"}
        return json.loads(line)

    def run_cases(self, nodeids: list[str], options: list[str]) -> tuple[dict[str, dict], str]:
        """Run `nodeids` in one reference session; (its records by case id, a line on what happened)."""
        if self.process.poll() is not None:
            raise ReferenceUnavailable(f"the reference process for {self.sha[:12]} is not running (log: {self.log})")
        self.calls += 1
        reports = self.workdir / f"run-{self.calls:04d}"
        empty = self.workdir / "no-baselines"
        empty.mkdir(exist_ok=True)
        # Every option value joined to its option, and the rootdir and conftest cut-off pinned to the checkout:
        # pytest reads the reference's plugin options only after its conftest is loaded, so a separate value such
        # as this run's reports path would first be taken for a test path, and the conftest.py above it (this
        # code's, not the reference's) loaded into the reference's session.
        args = [*nodeids, *options, f"--reports-dir={reports}", f"--baselines-dir={empty}", f"--rootdir={self.tree}",
                f"--confcutdir={self.tree}", "-p", "no:cacheprovider", "-p", "no:xdist", "-q"]
        started = time.monotonic()
        self.process.stdin.write((json.dumps({"args": args}) + "\n").encode())
        reply = self._reply(CASE_TIMEOUT_S)
        if "exit" not in reply:
            raise ReferenceUnavailable(f"{reply.get('error')} while running {len(nodeids)} case(s) (log: {self.log})")
        records = {}
        for path in sorted(reports.glob("*/results.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    records[record.get("id")] = record
        return records, f"exit {reply['exit']} in {time.monotonic() - started:.0f} s (log: {self.log})"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
