"""`dflash train tiny`: build the embedded tiny target + DFlash draft from scratch, deterministically.

corpus -> BPE tokenizer -> Qwen3 target -> the DFlash recipe of `dflash train` (dflash.training.recipe: the target's
greedy responses to training prompts, cached features, draft training, measured quality) -> manifest with
sha256 of every file. `dflash train --target tiny --prompts tiny-train ...` retrains the draft alone through the
same recipe, for the shipped (frozen) target.
"""
from __future__ import annotations

import hashlib
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from ..harness.evaluation import greedy_quality
from ..loading import PACKAGE_MODELS
from ..training.recipe import RecipeData, RecipeOptions, run_recipe
from ..training.train import DraftTrainingConfig
from .corpus import build_corpus
from .target import distillation_prompts, train_target
from .tokenizer import MASK_TOKEN, train_tokenizer

SEED = 0
FULL = dict(target_steps=700, distill_prompts=900, fresh_code_prompts=300, distill_tokens=96, draft_steps=2000)
QUICK = dict(target_steps=4, distill_prompts=12, fresh_code_prompts=4, distill_tokens=24, draft_steps=4)
VERBS = "get set add make read write parse load find check update build run open close format split join count sort"
NOUNS = "name path value item data file line key list text node size mode args result table entry token"
ARGS = ["a", "b", "x", "y", "n", "path", "name", "value", "data", "key", "default=None", "*args", "**kwargs"]


def fresh_code_prompts(count: int, seed: int) -> list[str]:
    """Function headers the target has never seen (random verb_noun names and arguments, no trailing newline).

    The target continues unseen code differently from memorised training code (often with loops such as
    "a, b, b, b"); the draft must see such continuations, or it fails on every new prompt. These headers are
    made of common words, not taken from the held-out modules."""
    rng = random.Random(seed)
    verbs, nouns = VERBS.split(), NOUNS.split()
    prompts = []
    for _ in range(count):
        args = ", ".join(rng.sample(ARGS, rng.randint(1, 3)))
        method = rng.random() < 0.3
        header = f"def {rng.choice(verbs)}_{rng.choice(nouns)}({'self, ' if method else ''}{args}):"
        prompts.append(("    " + header) if method else header)
    return prompts
QUALITY_BLOCK_SIZES = (2, 4, 8, 16)
QUALITY_MAX_NEW_TOKENS = 64


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_distillation_prompts(tokenizer, corpus=None, budget: dict = FULL) -> dict[str, list[str]]:
    """The draft's training prompts: windows of the training corpus and fresh code headers."""
    corpus = corpus or build_corpus(seed=SEED)
    return {"corpus": distillation_prompts(corpus, tokenizer, budget["distill_prompts"], seed=SEED + 1),
            "fresh_code": fresh_code_prompts(budget["fresh_code_prompts"], seed=SEED + 2)}


def tiny_draft_recipe(tokenizer, prompts: dict[str, list[str]], heldout: dict[str, list[str]], steps: int
                      ) -> tuple[RecipeData, DraftTrainingConfig, RecipeOptions]:
    """The tiny draft's recipe settings (also what `dflash train --target tiny` reproduces)."""
    def ids(table):
        return {c: [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ps] for c, ps in table.items()}
    data = RecipeData(ids(prompts), ids(heldout), mask_token_id=tokenizer.convert_tokens_to_ids(MASK_TOKEN),
                      stop_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                      description={"target": "tiny", "prompts": "tiny-train", "heldout": "tiny-heldout",
                                   "chat_template": False, "mask_token": MASK_TOKEN})
    config = DraftTrainingConfig(num_layers=2, block_size=16, steps=steps, seed=SEED)
    options = RecipeOptions(distill_max_new_tokens=FULL["distill_tokens"], distill_batch_size=32,
                            feature_batch_size=1, feature_dtype="float32", quality_block_sizes=QUALITY_BLOCK_SIZES,
                            quality_max_new_tokens=QUALITY_MAX_NEW_TOKENS, progress=True)
    return data, config, options


def build_tiny_world(out_dir: str | None = None, *, quick: bool = False) -> dict:
    budget = QUICK if quick else FULL
    out = Path(out_dir) if out_dir else PACKAGE_MODELS / "tiny"
    begin = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible kernels and no oversubscription on a shared 2-core machine
    staging = None
    try:
        corpus = build_corpus(seed=SEED)
        tokenizer = train_tokenizer(corpus.train_texts)
        target, target_stats = train_target(corpus, tokenizer, seed=SEED, steps=budget["target_steps"])

        # Write to a temporary directory first, then swap it in: a failed build never leaves half a model behind.
        staging = Path(tempfile.mkdtemp(prefix="tiny-", dir=out.parent if out.parent.exists() else None))
        target.save_pretrained(staging / "target")
        tokenizer.save_pretrained(staging / "target")
        (staging / "heldout.json").write_text(json.dumps(corpus.heldout, indent=2) + "\n")
        prompts = tiny_distillation_prompts(tokenizer, corpus, budget)
        heldout = {c: ps[:2] for c, ps in corpus.heldout.items()} if quick else corpus.heldout  # quick: pipeline only
        data, config, options = tiny_draft_recipe(tokenizer, prompts, heldout, budget["draft_steps"])
        options.distill_max_new_tokens = budget["distill_tokens"]
        command = "dflash train tiny" + (" --quick" if quick else "")
        recipe = run_recipe(target, data, staging / "draft", config=config, options=options, command=command)
        quality = recipe["quality"]["by_category_and_block_size"]
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)

    mask_id = data.mask_token_id
    manifest = {
        "build_command": command,
        "seed": SEED,
        "budget": budget,
        "wall_s": round(time.perf_counter() - begin, 1),
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "transformers": transformers.__version__, "machine": platform.machine(),
                        "processor": platform.processor()},
        "corpus": {
            "description": "Python standard library source (training modules listed), generated arithmetic word "
                           "problems with worked answers, chat pairs from stdlib docstrings, function tasks and "
                           "facts; held-out prompts come from held-out modules, names, numbers, tasks and facts",
            "train_documents": len(corpus.train_texts), "train_characters": corpus.num_chars(),
            "train_modules": corpus.modules, "heldout_modules": corpus.heldout_modules,
        },
        "tokenizer": {"vocab_size": len(tokenizer), "mask_token": MASK_TOKEN, "mask_token_id": mask_id,
                      "eos_token": tokenizer.eos_token},
        "target": target_stats,
        "distillation": {"prompts": sum(len(p) for p in prompts.values()),
                         "fresh_code_prompts": budget["fresh_code_prompts"],
                         "max_new_tokens": budget["distill_tokens"],
                         "response_tokens": sum(recipe["data"]["response_tokens_per_category"].values())},
        "draft": recipe["draft"],
        "quality": recipe["quality"],
    }
    for path in [staging, *staging.rglob("*")]:  # mkdtemp and safetensors create private modes; ship readable files
        path.chmod(0o755 if path.is_dir() else 0o644)
    manifest["files"] = {str(p.relative_to(staging)): {"sha256": sha256(p), "bytes": p.stat().st_size}
                         for p in sorted(staging.rglob("*")) if p.is_file()}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(out))
    print(json.dumps({"out": str(out), "wall_s": manifest["wall_s"], "mean_tau": quality["mean"]}, indent=2))
    return manifest
