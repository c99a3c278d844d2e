"""`make report` until the ablation harness exists: greedy and sampled DFlash on the tiny pair against
target-only, same process, warmed up, interleaved per prompt, token-normalized."""
from __future__ import annotations

import json
import platform
import subprocess

import torch
import transformers

from .engine import generate
from .loading import PACKAGE_MODELS, load_draft, load_target, load_tokenizer


def heldout_prompts(tokenizer) -> dict[str, list[list[int]]]:
    texts = json.loads((PACKAGE_MODELS / "tiny" / "heldout.json").read_text())
    return {c: [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ts] for c, ts in texts.items()}


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run_quick_report(max_new_tokens: int = 96, block_size: int = 8) -> None:
    target, draft, tokenizer = load_target("tiny"), load_draft("tiny"), load_tokenizer("tiny")
    prompts = [p for ps in heldout_prompts(tokenizer).values() for p in ps]
    stop = [tokenizer.eos_token_id]
    modes = {  # name: (draft, block size, temperature)
        "target-only greedy": (None, 1, 0.0), f"DFlash greedy bs={block_size}": (draft, block_size, 0.0),
        "target-only T=1": (None, 1, 1.0), f"DFlash T=1 bs={block_size}": (draft, block_size, 1.0),
    }
    for d, b, t in modes.values():  # warm-up: allocator, kernels, lazy imports
        generate(target, d, prompts[0], max_new_tokens=16, block_size=b, temperature=t, seed=0)
    totals = {m: {"tokens": 0, "seconds": 0.0, "committed": 0, "cycles": 0, "outputs": []} for m in modes}
    for seed, prompt in enumerate(prompts):
        for mode, (d, b, t) in modes.items():  # interleaved: every mode sees the same machine state per prompt
            r = generate(target, d, prompt, max_new_tokens=max_new_tokens, block_size=b, temperature=t, seed=seed,
                         stop_token_ids=stop)
            row = totals[mode]
            row["tokens"] += len(r.output_ids)
            row["seconds"] += r.wall_s
            row["committed"] += sum(r.acceptance_lengths)
            row["cycles"] += r.num_cycles
            row["outputs"].append(r.output_ids)
    print(f"tiny pair, {len(prompts)} held-out prompts (math, code, chat), max_new_tokens={max_new_tokens}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, git {_git_sha()}")
    print(f"{'mode':26s} {'tokens':>7s} {'tau':>6s} {'tokens/s':>9s} {'speedup':>8s}  output")
    names = list(modes)
    for mode in names:
        row = totals[mode]
        baseline = totals[names[0] if modes[mode][2] == 0 else names[2]]
        rate = row["tokens"] / row["seconds"]
        speedup = rate / (baseline["tokens"] / baseline["seconds"])
        tau = row["committed"] / row["cycles"] if row["cycles"] else 1.0
        if modes[mode][2] == 0:
            same = sum(a == b for a, b in zip(row["outputs"], totals[names[0]]["outputs"]))
            note = f"{same}/{len(prompts)} identical to target-only"
        else:
            note = "sampled (lossless in distribution)"
        print(f"{mode:26s} {row['tokens']:7d} {tau:6.2f} {rate:9.1f} {speedup:7.2f}x  {note}")
