"""Atomic file replacement shared by baselines and summaries: readers see the old file or the new one,
never a half-written one, even if the process dies mid-write.

The temp file is `.<name>.<pid>.<random>.tmp` next to the target. A writer killed with SIGKILL cannot remove
its temp file, so every write first removes the temp files of the same target whose writer is gone (its pid is
no longer alive), and `.*.tmp` is git-ignored.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

LEGACY_TEMP_MAX_AGE_S = 3600.0  # a pid-less temp file (written by an older version) this old is certainly stale


def temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError:
        return True  # cannot tell: keep the file
    return True


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files a killed writer of `path` left next to it: `.<name>.<pid>.<random>.tmp` whose pid
    is not alive, and pid-less `.<name>.<random>.tmp` (older versions) older than an hour. Returns them."""
    path = Path(path)
    ours = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[A-Za-z0-9_]+\.tmp")
    legacy = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = ours.fullmatch(entry.name)
        try:
            if match:
                stale = not _pid_alive(int(match.group(1)))
            elif legacy.fullmatch(entry.name):
                stale = now - entry.stat(follow_symlinks=False).st_mtime > LEGACY_TEMP_MAX_AGE_S
            else:
                continue
            if stale and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # gone already, or not ours to remove: the write itself decides
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` via a temp file in the same directory (same filesystem, so `os.replace` is
    atomic), fsynced before the rename. On any error the temp file is removed and `path` is untouched.
    Stale temp files of the same target (their writer was killed) are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (best effort: not every platform/filesystem allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
