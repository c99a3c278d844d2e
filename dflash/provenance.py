"""What a measurement ran on: the testbed (the hardware that sets relative speed, read from the machine), the
software, and the code identity (git sha plus a digest of uncommitted changes). Baselines, run records and
cascade tables all carry them.

A speedup ratio (variant / target-only) is a property of the testbed: the relative costs of a draft step, a
block verification and a one-token step differ between CPU microarchitectures and between GPUs. `testbed_key`
names a testbed from what sets those costs (CPU vendor, family/model/stepping, the ISA torch dispatches to,
cores and threads; GPU name, memory, compute capability, driver and CUDA), so throughput is gated only against
numbers measured on the same key (asv's per-machine results, Bencher's testbeds).
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the checkout holding dflash/ (git runs there, whatever the cwd)
CPUINFO = Path("/proc/cpuinfo")


def cpu_facts(cpuinfo: str | None = None) -> dict:
    """The CPU as the kernel describes it: vendor, family/model/stepping, model name (Linux /proc/cpuinfo; on
    other systems what `platform` knows), logical cores, memory, and the ISA level torch dispatches to."""
    import torch
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor's block is enough: the testbed has one kind of core
            continue
        fields.setdefault(key.strip(), value.strip())
    memory = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    return {"arch": platform.machine(),
            "vendor": fields.get("vendor_id") or fields.get("CPU implementer") or platform.processor() or "unknown",
            "family": fields.get("cpu family") or fields.get("CPU architecture") or "",
            "model": fields.get("model") or fields.get("CPU part") or "",
            "stepping": fields.get("stepping") or fields.get("CPU variant") or "",
            "model_name": fields.get("model name") or fields.get("Hardware") or platform.processor() or "",
            "capability": torch.backends.cpu.get_cpu_capability(),
            "logical_cores": os.cpu_count(), "memory_gib": memory}


def gpu_facts(device: str) -> dict:
    """The CUDA device a run uses: name, memory, compute capability, driver, CUDA and cuDNN versions."""
    import torch
    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30),
            "capability": f"{props.major}.{props.minor}", "driver": _nvidia_driver(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def _slug(text) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-") or "unknown"


def testbed_key(fingerprint: dict) -> str:
    """A stable, readable name of the testbed a fingerprint describes: the same machine gives the same key
    run after run, and a different CPU model, GPU, driver or thread count gives another, e.g.
    `cpu-genuineintel-6.207.2-avx512-2c-1t` or `cuda-nvidia-a100-sxm4-80gb-sm8.0-drv550.54.15-cu12.4`. The
    model name is in the key only through a short digest: it is long, and family/model/stepping say more."""
    gpu = fingerprint.get("gpu")
    if gpu:
        return "-".join(["cuda", _slug(gpu["name"]), f"{gpu.get('memory_gib')}gb", f"sm{gpu.get('capability')}",
                         f"drv{_slug(gpu.get('driver'))}", f"cu{_slug(gpu.get('cuda'))}"])
    cpu = fingerprint.get("cpu") or {}
    name_digest = hashlib.sha256(str(cpu.get("model_name", "")).encode()).hexdigest()[:6]
    return "-".join(["cpu", _slug(cpu.get("vendor")),
                     ".".join(_slug(cpu.get(k)) for k in ("family", "model", "stepping")) + f".{name_digest}",
                     _slug(cpu.get("capability")), f"{cpu.get('logical_cores')}c", f"{cpu.get('threads')}t"])


def collect_fingerprint(profile: str, seeds, *, git_sha: str | None = None, device: str = "cpu",
                        dtype: str | None = None, repo: Path = PROJECT_ROOT) -> dict:
    """The testbed and software fingerprint of a run on `device` of the code in `repo` (imports
    torch/transformers lazily: they are slow). A CPU run on a machine with a GPU is fingerprinted as the CPU it
    ran on; `threads` is the torch intra-op thread count at the time of the call (the ablations run one per
    process)."""
    import torch
    import transformers

    cpu = {**cpu_facts(), "threads": torch.get_num_threads()}
    gpu = gpu_facts(device) if str(device).startswith("cuda") and torch.cuda.is_available() else None
    fingerprint = {"cpu": cpu, "gpu": gpu, "torch": str(torch.__version__),
                   "transformers": str(transformers.__version__), "python": platform.python_version(),
                   "dtype": dtype, "git_sha": git_sha or _git_sha(repo), "code": code_identity(repo), "profile": profile,
                   "seeds": seeds}
    fingerprint["hardware"] = describe_hardware(fingerprint)
    fingerprint["testbed"] = testbed_key(fingerprint)
    return fingerprint


def describe_hardware(fingerprint: dict) -> str:
    """One line for a report header: the GPU, or the CPU with its family/model/stepping and ISA."""
    gpu = fingerprint.get("gpu")
    if gpu:
        return (f"{gpu['name']} ({gpu.get('memory_gib')} GiB, sm {gpu.get('capability')}, driver "
                f"{gpu.get('driver')}, CUDA {gpu.get('cuda')})")
    cpu = fingerprint.get("cpu") or {}
    return (f"{cpu.get('model_name') or 'cpu'} ({cpu.get('vendor')} family {cpu.get('family')} model "
            f"{cpu.get('model')} stepping {cpu.get('stepping')}, {cpu.get('arch')}, "
            f"{str(cpu.get('capability')).lower()}), {cpu.get('logical_cores')} cores, {cpu.get('threads')} "
            f"thread(s), {cpu.get('memory_gib')} GiB")


def code_identity(repo: Path = PROJECT_ROOT) -> str:
    """The code a run measured: the commit of the checkout at `repo` plus a digest of uncommitted changes to its
    tracked files other than baselines and prose ("<sha>" or "<sha>+<digest>"); "unknown" outside a git
    checkout."""
    sha = _git_sha(repo, full=True)
    try:
        diff = subprocess.run(["git", "-C", str(repo), "diff", "HEAD", "--", ".", ":(exclude)baselines",
                               ":(exclude)*.md"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return sha
    return f"{sha}+{hashlib.sha256(diff).hexdigest()[:12]}" if diff else sha


def _git_sha(repo: Path = PROJECT_ROOT, full: bool = False) -> str:
    try:
        result = subprocess.run(["git", "-C", str(repo), "rev-parse", *([] if full else ["--short"]), "HEAD"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"
