"""What a measurement ran on: the machine/software fingerprint and the code identity (git sha plus a digest of
uncommitted changes). Baselines, run records and cascade tables all carry them."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the checkout holding dflash/ (git runs there, whatever the cwd)


def collect_fingerprint(profile: str, seeds, *, git_sha: str | None = None, device: str = "cpu") -> dict:
    """The machine/software fingerprint of a run on `device` (imports torch/transformers lazily: they are
    slow). A CPU run on a machine with a GPU is fingerprinted as the CPU it ran on."""
    import torch
    import transformers

    if str(device).startswith("cuda") and torch.cuda.is_available():
        hardware = torch.cuda.get_device_name(torch.device(device))
    else:
        hardware = f"cpu {platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores"
    return {"hardware": hardware, "torch": str(torch.__version__), "transformers": str(transformers.__version__),
            "python": platform.python_version(), "git_sha": git_sha or _git_sha(), "profile": profile,
            "seeds": seeds}


def code_identity() -> str:
    """The code a run measured: the git commit plus a digest of uncommitted changes to tracked files
    ("<sha>" or "<sha>+<digest>"); "unknown" outside a git checkout."""
    import hashlib
    sha = _git_sha()
    try:
        diff = subprocess.run(["git", "-C", str(PROJECT_ROOT), "diff", "HEAD", "--", "dflash", "ablations"],
                              capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return sha
    return f"{sha}+{hashlib.sha256(diff).hexdigest()[:12]}" if diff else sha


def _git_sha() -> str:
    try:
        result = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"
