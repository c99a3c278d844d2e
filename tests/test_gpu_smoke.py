"""The GPU smoke run (scripts/gpu_smoke.sh, `make gpu-smoke`) rehearsed on CPU, so it cannot rot before a GPU is
lent: DEVICE=cpu runs every step, shrunk, with a Python that lacks what the bare GPU image lacks (datasets,
pyarrow and pandas are hidden: a virtual environment whose site-packages links to everything else of this one's),
and writes summary.md and summary.json. Also: the wheels step installs a missing package from a carried wheel,
and the summary's verdicts."""
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from dflash import gpu_smoke

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = {"datasets", "pyarrow", "pandas"}  # not in the GPU image, and the smoke must not need them
STEPS = ["nvidia-smi", "wheels", "environment", "lossless-float32", "lossless-bfloat16", "variants-lossless",
         "sampling", "fastdllm-vs-cpu", "standins", "gpu-tier-bootstrap", "gpu-tier-gated", "timing"]


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A Python with this environment's packages but HIDDEN."""
    home = tmp_path_factory.mktemp("bare-python")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True, timeout=120)
    python = home / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name.split("-")[0].split(".")[0].lower() not in HIDDEN and not (Path(site) / entry.name).exists():
            (Path(site) / entry.name).symlink_to(entry)
    return python


def test_the_cpu_rehearsal_passes_every_step_without_datasets(bare_python, tmp_path):
    hidden = subprocess.run([str(bare_python), "-c", "import datasets"], capture_output=True, text=True)
    assert hidden.returncode == 1 and "No module named 'datasets'" in hidden.stderr
    out = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(out), "PYTHON": str(bare_python),
           "WHEELS": str(tmp_path / "no-wheels")}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_smoke.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    steps = {s["name"]: s for s in summary["steps"]}
    assert sorted(steps) == sorted(STEPS)  # in the order they finished
    for name, step in steps.items():
        assert step["verdict"] == "pass" or (name == "nvidia-smi" and step["verdict"] == "skip"
                                             and step["error"] == ["nvidia-smi is not on this machine"]), step
        assert (out / step["log"]).is_file()
    assert steps["gpu-tier-gated"]["tally"].startswith("4 passed")
    baseline = json.loads((out / "gpu-tier" / "baselines" / "gpu-qwen3-4b" / "block_size.json").read_text())
    assert len(baseline) >= 4
    assert [row["mode"] for row in summary["timing"]] == [m for m, _ in gpu_smoke.MODES] * 2
    assert summary["environment"]["testbed"].startswith("cpu-")
    markdown = (out / "summary.md").read_text()
    assert "| lossless-bfloat16 | pass |" in markdown and "sizes: test sizes x0.04" in markdown
    assert markdown in run.stdout


def fake_wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel of distribution `name` holding module `name`."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{name}/__init__.py", "VALUE = 7\n")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                          "Tag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def test_the_wheels_step_installs_only_what_is_missing(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "wheels"
    monkeypatch.setattr(gpu_smoke, "WHEELS", {"smokeprobe==1.0": "smokeprobe", "pytest==0": "pytest"})
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert gpu_smoke.install_wheels(folder) == 1
    assert "no wheel for some of smokeprobe" in capsys.readouterr().out
    fake_wheel(folder, "smokeprobe")
    assert gpu_smoke.install_wheels(folder) == 0
    assert (folder / "site" / "smokeprobe" / "__init__.py").is_file()
    assert "missing here: smokeprobe" in capsys.readouterr().out


@pytest.mark.parametrize("rc, lines, verdict, why", [
    (0, ["..", "3 passed in 2.80s"], "pass", []),
    (0, ["SKIPPED [4] x.py:3: needs CUDA", "===== 4 skipped in 1.0s ====="], "skip",
     ["4 skipped in 1.0s", "SKIPPED [4] x.py:3: needs CUDA"]),
    (1, ["E   assert 1 == 2", "FAILED t.py::test_a - assert 1 == 2", "1 failed in 1s"], "fail",
     ["FAILED t.py::test_a - assert 1 == 2", "E   assert 1 == 2"]),
    (124, ["collecting"], "fail", ["timed out after 60 s", "collecting"]),
    (77, ["nvidia-smi is not on this machine"], "skip", ["nvidia-smi is not on this machine"]),
    (1, ["Traceback (most recent call last):", "  File x", "RuntimeError: CUDA error"], "fail",
     ["Traceback (most recent call last):", "File x", "RuntimeError: CUDA error"]),
])
def test_step_verdicts(rc, lines, verdict, why):
    assert gpu_smoke.step_verdict(rc, 60, lines) == (verdict, why)
