"""Append-only JSONL results file: one line per completed case, written as soon as the case finishes.

Every append is a single write under an exclusive `fcntl.flock`, followed by fsync, so a killed run keeps
every completed case and several pytest-xdist workers can share one file. A process killed mid-write can
leave a truncated last line (the start of a record, no newline after it): readers ignore it with a warning,
and the next append cuts it off first (under the lock) so the file stays valid. Anything else that is not a
JSON object with a printable string id, anywhere in the file, is an error naming file and line.
"""
from __future__ import annotations

import fcntl
import json
import os
import warnings
from pathlib import Path

from ..errors import DFlashError


class ResultsFileError(DFlashError):
    """A results file is corrupt (not just truncated at the end by a killed run). `path` and `line` (1-based;
    None when the whole file is unreadable) say where."""

    def __init__(self, message: str, path: Path | None = None, line: int | None = None):
        super().__init__(message)
        self.path, self.line = path, line


def id_problem(value) -> str | None:
    """Why `value` cannot be a case id (None when it can): a non-empty string of printable characters only.
    Ids end up in markdown tables, terminal lines and file names: a newline or other control character there
    forges lines."""
    if not isinstance(value, str) or not value:
        return f"the id must be a non-empty string, got {value!r}"
    bad = sorted({ch for ch in value if not ch.isprintable()})
    if bad:
        shown = ", ".join(repr(ch) for ch in bad[:5])
        return f"the id {value!r} contains non-printable character(s) {shown}; ids must be printable text"
    return None


def _parse(path: Path, text: str, check=None) -> tuple[list[dict], str | None]:
    """Records of `text` plus the unparsable last line (None when there is none). Only the last line may
    be broken: it is the one a killed writer can leave behind. Every record needs a printable string id;
    `check(record)` may name further problems (a string) that make the file unusable."""
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records: list[dict] = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            if index == last == len(lines) - 1 and line.lstrip().startswith("{"):
                return records, line  # a prefix of a record, no newline after it: what a killed append leaves
            raise ResultsFileError(f"Corrupt results file {path}, line {index + 1}: {error}. Only a truncated "
                                   "last line (a killed run) is tolerated: delete that line, or move the run "
                                   "directory away and start a new run.", path, index + 1) from None
        problem = id_problem(record.get("id")) or (check(record) if check is not None else None)
        if problem:
            raise ResultsFileError(f"Bad record in results file {path}, line {index + 1}: {problem}. This plugin "
                                   "never writes such a record: delete that line, or move the run directory "
                                   "away and start a new run.", path, index + 1)
        records.append(record)
    return records, None


def load(path: str | os.PathLike, check=None) -> list[dict]:
    """All complete records in file order (a missing file has none). A truncated last line is skipped
    with a warning. `check(record)`: an extra validation returning a problem (str) or None."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ResultsFileError(f"Results file {path} cannot be read ({error}): move it away or start a new run.",
                               path) from None
    records, tail = _parse(path, text, check)
    if tail is not None:
        warnings.warn(f"{path}: ignoring a truncated last line (an interrupted run?): {tail[:80]!r}",
                      stacklevel=2)
    return records


def latest_by_id(records: list[dict]) -> dict[str, dict]:
    """The last record of each case id (a resumed or repeated case supersedes its earlier record)."""
    return {record["id"]: record for record in records if "id" in record}


class ResultsFile:
    """One JSONL file of case records. Records are plain JSON-serialisable dicts with a string 'id'."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, case_record: dict) -> None:
        """Write one line, flushed and fsynced before returning; safe against concurrent appenders."""
        if not isinstance(case_record.get("id"), str) or not case_record["id"]:
            raise DFlashError(f"A case record needs a non-empty string 'id'; got {case_record.get('id')!r}.")
        problem = id_problem(case_record["id"])
        if problem:
            raise DFlashError(f"Refusing to record a case in {self.path}: {problem}.")
        line = (json.dumps(case_record, sort_keys=True, allow_nan=True) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, also if the process dies
            self._drop_truncated_tail(fd)
            view = memoryview(line)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _drop_truncated_tail(self, fd: int) -> None:
        """If a killed writer left a partial last line, cut it off so our line does not get glued to it."""
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        data = os.pread(fd, size, 0)
        keep = data.rfind(b"\n") + 1
        tail = data[keep:]
        try:
            json.loads(tail)
        except ValueError:
            warnings.warn(f"{self.path}: dropping a truncated last line before appending: {tail[:80]!r}",
                          stacklevel=3)
            os.ftruncate(fd, keep)
        else:
            os.write(fd, b"\n")  # complete record without its newline: keep it

    def load(self, check=None) -> list[dict]:
        return load(self.path, check)

    def completed_ids(self) -> set[str]:
        """Ids of the cases already recorded, for --resume (a record is only appended once a case ends)."""
        return {record["id"] for record in load(self.path) if "id" in record}
