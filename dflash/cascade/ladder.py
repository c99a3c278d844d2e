"""The model ladder of the cascade world: four tiny Qwen3 models of increasing size trained on the same graded
tasks (dflash.cascade.tasks) with one command, `dflash train ladder`.

Every rung sees the same data in the same order for the same number of steps; only its size differs, so accuracy
and cost grow along the ladder by construction of the recipe, and the manifest records how much (measured on
the held-out queries). Rungs are plain Hugging Face checkpoints (Qwen3ForCausalLM + the tokenizer, with the
tiny world's chat format and a <|MASK|> token), stored in bf16 to keep the package small, so other families
(Fast-dLLM v2) can reuse them. The build is resumable per rung: a rung whose manifest matches the recipe is kept.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from ..engine import generate
from ..loading import PACKAGE_MODELS
from ..tinyworld.corpus import Corpus, chat_sample
from ..tinyworld.target import greedy_continuations, train_target
from ..tinyworld.tokenizer import train_tokenizer
from .tasks import FAMILIES, Query, build_task_set

LADDER_DIR = PACKAGE_MODELS / "ladder"
SEED = 0


@dataclass(frozen=True)
class Rung:
    name: str
    config: dict  # Qwen3Config overrides of the tiny world's target config


RUNGS = (
    Rung("l1", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                    intermediate_size=192)),
    Rung("l2", dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                    intermediate_size=256)),
    Rung("l3", dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                    intermediate_size=256)),
    Rung("l4", dict(hidden_size=192, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=48, intermediate_size=576)),
)


@dataclass(frozen=True)
class Budget:
    steps: int = 1200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    n_train: int = 24000  # worked training samples (both families)
    n_heldout: int = 600  # held-out queries per family
    timed_queries: int = 24  # per family: batch-1 greedy decodes timed for the cost column
    max_new_tokens: int = 72  # a 4-step worked answer is about 45 tokens


QUICK = Budget(steps=30, n_train=2000, n_heldout=24, timed_queries=4)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recipe_key(rung: Rung, budget: Budget, data_sha256: str) -> dict:
    """What a rung's weights are a function of (the training texts by digest): a kept rung must match it."""
    return {"rung": asdict(rung), "budget": asdict(budget), "seed": SEED, "data_sha256": data_sha256,
            "torch": torch.__version__, "transformers": transformers.__version__}


@dataclass
class RungQuality:
    accuracy: dict = field(default_factory=dict)  # family -> exact-match accuracy on held-out queries
    accuracy_by_steps: dict = field(default_factory=dict)  # family -> {steps: accuracy}
    n: dict = field(default_factory=dict)  # family -> queries
    seconds_per_query: dict = field(default_factory=dict)  # family -> mean wall s, batch-1 greedy incl. prefill
    new_tokens_per_query: dict = field(default_factory=dict)  # family -> mean generated tokens (timed queries)
    timed: dict = field(default_factory=dict)  # family -> timed queries


def evaluate(model, tokenizer, heldout: dict[str, list[Query]], budget: Budget) -> RungQuality:
    """Exact-match accuracy of greedy answers on every held-out query, and the cost of answering: wall seconds
    and tokens of a batch-1 target-only decode (prefill included) on the first `timed_queries` per family."""
    quality = RungQuality()
    eos = tokenizer.eos_token_id
    for family, queries in heldout.items():
        replies = greedy_continuations(model, tokenizer, [q.prompt for q in queries], budget.max_new_tokens)
        correct = [q.grade(tokenizer.decode(r, skip_special_tokens=True))[1] for r, q in zip(replies, queries)]
        quality.accuracy[family] = sum(correct) / len(correct)
        quality.n[family] = len(correct)
        quality.accuracy_by_steps[family] = {
            str(k): sum(c for c, q in zip(correct, queries) if q.difficulty == k)
            / max(1, sum(q.difficulty == k for q in queries)) for k in sorted({q.difficulty for q in queries})}
        timed = queries[: budget.timed_queries]
        seconds, tokens = [], []
        for query in timed:
            ids = query.prompt_ids(tokenizer)
            result = generate(model, None, ids, max_new_tokens=budget.max_new_tokens, stop_token_ids=[eos])
            seconds.append(result.wall_s)
            tokens.append(len(result.output_ids))
        quality.seconds_per_query[family] = sum(seconds) / len(seconds)
        quality.new_tokens_per_query[family] = sum(tokens) / len(tokens)
        quality.timed[family] = len(timed)
    return quality


def build_ladder(out_dir: str | None = None, *, quick: bool = False, rungs: tuple[str, ...] | None = None) -> dict:
    """Train (or keep) every rung, then write the ladder manifest. Returns the manifest."""
    budget = QUICK if quick else Budget()
    out = Path(out_dir) if out_dir else LADDER_DIR
    out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible kernels and no oversubscription on a shared 2-core machine
    try:
        tasks = build_task_set(SEED, budget.n_train, budget.n_heldout)
        data_sha256 = hashlib.sha256("\x00".join(tasks.train_texts).encode()).hexdigest()
        tokenizer = train_tokenizer(tasks.train_texts, vocab_size=512)
        corpus = Corpus(train_texts=tasks.train_texts, train_categories=["math"] * len(tasks.train_texts),
                        heldout={f: [q.prompt for q in qs[:1]] for f, qs in tasks.heldout.items()},
                        heldout_texts={f: [chat_sample(q.question, q.worked_answer()) for q in qs]
                                       for f, qs in tasks.heldout.items()},
                        modules=[], heldout_modules=[], seed=SEED)
        selected = [r for r in RUNGS if rungs is None or r.name in rungs]
        built = []
        for rung in selected:
            rung_dir = out / rung.name
            manifest_path = rung_dir / "manifest.json"
            recipe = recipe_key(rung, budget, data_sha256)
            if manifest_path.exists() and json.loads(manifest_path.read_text()).get("recipe") == recipe:
                print(f"ladder: {rung.name} kept (its manifest matches the recipe)")
                continue
            rung_begin = time.perf_counter()
            model, stats = train_target(corpus, tokenizer, seed=SEED, steps=budget.steps,
                                        batch_size=budget.batch_size, seq_len=budget.seq_len, lr=budget.lr,
                                        config_overrides=rung.config, exact_answer_category="story",
                                        n_math_eval=8)
            quality = evaluate(model, tokenizer, tasks.heldout, budget)
            staging = Path(tempfile.mkdtemp(prefix=f"{rung.name}-", dir=out))
            try:
                model.to(torch.bfloat16).save_pretrained(staging)
                tokenizer.save_pretrained(staging)
                manifest = {"rung": rung.name, "recipe": recipe, "params": stats["params"],
                            "training": {k: stats[k] for k in ("steps", "batch_size", "seq_len", "lr",
                                                                "tokens_seen", "epochs", "train_loss",
                                                                "heldout_loss", "train_seconds")},
                            "quality": asdict(quality), "storage_dtype": "bfloat16",
                            "build_seconds": round(time.perf_counter() - rung_begin, 1)}
                for path in [staging, *staging.rglob("*")]:
                    path.chmod(0o755 if path.is_dir() else 0o644)
                manifest["files"] = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
                                     for p in sorted(staging.iterdir()) if p.is_file()}
                (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
                if rung_dir.exists():
                    shutil.rmtree(rung_dir)
                staging.rename(rung_dir)
                built.append(rung.name)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            print(f"ladder: {rung.name} {stats['params']:,} params, accuracy "
                  + ", ".join(f"{f} {a:.3f}" for f, a in quality.accuracy.items())
                  + f", {quality.seconds_per_query['story'] * 1000:.0f} ms/query")
    finally:
        torch.set_num_threads(threads)
    rung_manifests = {r.name: json.loads((out / r.name / "manifest.json").read_text())
                      for r in RUNGS if (out / r.name / "manifest.json").exists()}
    manifest = {
        "build_command": "dflash train ladder" + (" --quick" if quick else ""),
        "seed": SEED, "budget": asdict(budget),
        "last_invocation": {"wall_s": round(time.perf_counter() - begin, 1), "rungs_built": built,
                            "threads": 1},
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "transformers": transformers.__version__, "machine": platform.machine()},
        "tasks": {"families": list(FAMILIES), "train_samples": budget.n_train,
                  "heldout_per_family": budget.n_heldout,
                  "description": "multi-step arithmetic (1-4 operations, values 0..60, operands up to 10) as word "
                                 "problems and bracketed expressions; held-out problems never occur in training"},
        "rungs": {name: {"params": m["params"], "accuracy": m["quality"]["accuracy"],
                         "seconds_per_query": m["quality"]["seconds_per_query"],
                         "new_tokens_per_query": m["quality"]["new_tokens_per_query"]}
                  for name, m in rung_manifests.items()},
        "bytes": sum(f["bytes"] for m in rung_manifests.values() for f in m["files"].values()),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
