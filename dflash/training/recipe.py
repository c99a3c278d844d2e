"""`dflash train`: the DFlash draft recipe end to end for any Hugging Face causal-LM target.

prompts -> the target's own greedy responses (batched self-distillation) -> cached context features -> draft
training (random anchors, exp(-(k-1)/gamma) loss weights; dflash.training.train) -> greedy tau per category and
block size on held-out prompts -> `out/` in the z-lab checkpoint format + manifest.json (command, seed, data sizes,
losses, quality, sha256 of every file, wall time).

Every stage is resumable: intermediate results live in `out/.work/` (distilled sequences, features, training
checkpoint) and `resume=True` picks up from the last finished stage / checkpoint. `.work` is removed on success.
The work files are safetensors (tensors, with JSON in the header), never pickles, so a crafted file in an output
directory cannot run code on `--resume`: it is a DFlashError naming the file, as is a truncated or corrupt file,
a stage made from other inputs or options, and an old `.pt` file from before this format.

  .work/sequences.safetensors  token_ids (int64, all sequences concatenated), offsets (int64 [N+1]: sequence i is
                               token_ids[offsets[i]:offsets[i+1]]), response_starts (int64 [N]); JSON: the key
                               (a fingerprint of the prompts, the distillation options and the target's shape)
  .work/features.safetensors   feature.<i> ([T_i, K*H] per sequence, in the stored dtype); JSON: the key (a
                               fingerprint of the sequences, layer ids, dtype, batch size and the target's shape)
  .work/checkpoint.safetensors the training checkpoint (dflash.training.train._save_checkpoint)
  .work/timings.json           stage wall times
"""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from ..errors import DFlashError
from ..harness.evaluation import greedy_quality
from ..loading import chat_prompt_ids
from .train import (DraftTrainingConfig, TrainingSequence, as_json, context_features, load_state_file,
                    save_state_file, self_distill, sequences_sha256, train_draft, unusable_file)


@dataclass
class RecipeData:
    """Token-id prompts for self-distillation (per category) and held-out prompts for the quality table."""
    train_prompts: dict[str, list[list[int]]]
    heldout_prompts: dict[str, list[list[int]]]
    mask_token_id: int
    stop_token_ids: list[int]
    pad_token_id: int
    description: dict = field(default_factory=dict)  # where the prompts came from, for the manifest


@dataclass
class RecipeOptions:
    distill_max_new_tokens: int = 128
    distill_batch_size: int = 16
    distill_bf16_autocast: bool = False  # faster generation; context features are always computed in fp32
    feature_batch_size: int = 8  # 1: no padding (the tiny build's original numerics)
    feature_dtype: str = "bfloat16"  # how cached features are stored (half the memory); float32: exact
    checkpoint_every: int = 50
    quality_block_sizes: tuple[int, ...] = (4, 8, 16)
    quality_max_new_tokens: int = 96
    resume: bool = False
    progress: bool = True


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SEQUENCES_FORMAT = "dflash-recipe-sequences-v1"
FEATURES_FORMAT = "dflash-recipe-features-v1"
LEGACY_WORK_FILES = ("sequences.pt", "features.pt", "checkpoint.pt")  # pickles (torch.save): never loaded


def _read_timings(times_file: Path) -> dict:
    """Stage wall times recorded so far; informational only, so an unreadable file counts as none."""
    try:
        times = json.loads(times_file.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in times.items() if type(v) in (int, float)} if isinstance(times, dict) else {}


def _stage(path: Path, resume: bool, compute, timings: dict, name: str, *, kind: str, key: dict, encode, decode):
    """Load a finished stage's result from `path` when resuming, else compute and store it. `encode(result)` ->
    tensors and `decode(path, tensors)` -> result (validated; DFlashError if it does not fit) convert to and from
    the safetensors file; `key` (JSON) identifies the inputs and options, and a stored stage with another key is
    an error, not a silent reuse. Stage wall times are kept in `timings.json` next to it, so a resumed run still
    reports what the stage cost."""
    times_file = path.parent / "timings.json"
    times = _read_timings(times_file)
    key = as_json(key)
    if resume and path.is_file():
        tensors, state = load_state_file(path, kind)
        stored = state.get("key")
        if stored != key:
            differ = sorted(k for k in key if not isinstance(stored, dict) or stored.get(k) != key[k])
            raise unusable_file(path, f"was made from other inputs or options ({', '.join(differ) or 'key'} "
                                      "differ from this run's)")
        result = decode(path, tensors)
        timings[name] = times.get(name)
        timings[f"{name}_resumed"] = True
        return result
    begin = time.perf_counter()
    result = compute()
    save_state_file(path, encode(result), {"key": key}, kind)
    timings[name] = times[name] = round(time.perf_counter() - begin, 1)
    times_file.write_text(json.dumps(times))
    return result


def _encode_sequences(sequences: list[TrainingSequence]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([0] + [s.token_ids.numel() for s in sequences], dtype=torch.int64)
    flat = [s.token_ids.to(torch.int64) for s in sequences]
    return {"token_ids": torch.cat(flat) if flat else torch.zeros(0, dtype=torch.int64),
            "offsets": lengths.cumsum(0),
            "response_starts": torch.tensor([int(s.response_start) for s in sequences], dtype=torch.int64)}


def _decode_sequences(path: Path, tensors: dict, *, vocab_size: int) -> list[TrainingSequence]:
    if set(tensors) != {"token_ids", "offsets", "response_starts"}:
        raise unusable_file(path, f"has entries {sorted(tensors)[:4]}, expected token_ids, offsets, response_starts")
    ids, offsets, starts = tensors["token_ids"], tensors["offsets"], tensors["response_starts"]
    if (any(t.dtype != torch.int64 or t.dim() != 1 for t in (ids, offsets, starts))
            or offsets.numel() != starts.numel() + 1):
        raise unusable_file(path, "has sequence tensors of the wrong dtype or shape")
    lengths = offsets.diff()
    if (offsets[0] != 0 or offsets[-1] != ids.numel() or (lengths < 0).any() or (starts < 0).any()
            or (starts > lengths).any()):
        raise unusable_file(path, "has inconsistent sequence offsets or response starts")
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise unusable_file(path, f"has token ids outside the target's vocabulary (0..{vocab_size - 1})")
    bounds = offsets.tolist()
    return [TrainingSequence(ids[bounds[i]:bounds[i + 1]].clone(), start) for i, start in enumerate(starts.tolist())]


def _decode_features(path: Path, tensors: dict, *, sequences: list[TrainingSequence], width: int,
                     dtype: torch.dtype) -> list[torch.Tensor]:
    if set(tensors) != {f"feature.{i}" for i in range(len(sequences))}:
        raise unusable_file(path, f"does not hold one feature.<i> per sequence ({len(sequences)})")
    features = [tensors[f"feature.{i}"] for i in range(len(sequences))]
    for i, (feature, sequence) in enumerate(zip(features, sequences)):
        if feature.dtype != dtype or tuple(feature.shape) != (sequence.token_ids.numel(), width):
            raise unusable_file(path, f"feature.{i} is {feature.dtype} {list(feature.shape)}, expected {dtype} "
                                      f"{[sequence.token_ids.numel(), width]}")
    return features


def _target_signature(target) -> dict:
    """The target's shape, part of every stage key (a different target of the same shape is not detected)."""
    text = target.config.get_text_config()
    return {"model_type": getattr(text, "model_type", None), "hidden_size": text.hidden_size,
            "num_hidden_layers": text.num_hidden_layers, "vocab_size": target.get_input_embeddings().num_embeddings}


def _device_name(target) -> str:
    """Where the recipe ran: `cpu (N threads)`, or the CUDA device's name."""
    device = target.get_input_embeddings().weight.device
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def run_recipe(target, data: RecipeData, out_dir: str | Path, *, config: DraftTrainingConfig,
               options: RecipeOptions, command: str, extra_manifest: dict | None = None,
               log=print) -> dict:
    out = Path(out_dir)
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    timings = {}

    if options.resume:
        for legacy in LEGACY_WORK_FILES:
            if (work / legacy).exists():
                raise DFlashError(f"{work / legacy} is in the old, unsafe format (a pickle / torch.save file, "
                                  "which can run arbitrary code when loaded); it will not be unpickled. Delete it "
                                  f"(or the whole {work} directory), or run `dflash train` without --resume, to "
                                  "recompute it.")
    signature = _target_signature(target)
    vocab_size = signature["vocab_size"]

    categories = list(data.train_prompts)
    flat_prompts = [p for c in categories for p in data.train_prompts[c]]
    category_of = [c for c in categories for _ in data.train_prompts[c]]
    prompts_json = json.dumps({c: [[int(t) for t in p] for p in ps] for c, ps in data.train_prompts.items()})
    sequences: list[TrainingSequence] = _stage(work / "sequences.safetensors", options.resume, lambda: self_distill(
        target, flat_prompts, max_new_tokens=options.distill_max_new_tokens, stop_token_ids=data.stop_token_ids,
        pad_token_id=data.pad_token_id, batch_size=options.distill_batch_size,
        bf16_autocast=options.distill_bf16_autocast, progress=options.progress), timings, "self_distillation_s",
        kind=SEQUENCES_FORMAT, encode=_encode_sequences,
        decode=lambda path, tensors: _decode_sequences(path, tensors, vocab_size=vocab_size),
        key={"target": signature, "prompts_sha256": hashlib.sha256(prompts_json.encode()).hexdigest(),
             "max_new_tokens": options.distill_max_new_tokens, "stop_token_ids": list(data.stop_token_ids),
             "pad_token_id": data.pad_token_id, "batch_size": options.distill_batch_size,
             "bf16_autocast": options.distill_bf16_autocast})
    log(f"self-distillation: {len(sequences)} sequences, "
        f"{sum(s.token_ids.numel() - s.response_start for s in sequences)} response tokens")

    from ..model import build_target_layer_ids
    num_target_layers = target.config.get_text_config().num_hidden_layers
    layer_ids = config.target_layer_ids or build_target_layer_ids(num_target_layers, config.num_layers)
    feature_dtype = getattr(torch, options.feature_dtype)
    width = len(layer_ids) * signature["hidden_size"]
    features = _stage(work / "features.safetensors", options.resume, lambda: context_features(
        target, sequences, layer_ids, batch_size=options.feature_batch_size, dtype=feature_dtype,
        progress=options.progress), timings, "context_features_s",
        kind=FEATURES_FORMAT, encode=lambda result: {f"feature.{i}": f for i, f in enumerate(result)},
        decode=lambda path, tensors: _decode_features(path, tensors, sequences=sequences, dtype=feature_dtype,
                                                      width=width),
        key={"target": signature, "sequences_sha256": sequences_sha256(sequences), "layer_ids": list(layer_ids),
             "dtype": options.feature_dtype, "batch_size": options.feature_batch_size})

    t0 = time.perf_counter()
    draft, stats = train_draft(target, sequences, mask_token_id=data.mask_token_id, config=config,
                               progress=options.progress, features=features,
                               checkpoint_path=work / "checkpoint.safetensors",
                               checkpoint_every=options.checkpoint_every, resume=options.resume)
    timings["training_s"] = round(time.perf_counter() - t0, 1)
    del features
    log(f"draft: loss {stats.loss_first:.3f} -> {stats.loss_last:.3f} over {config.steps} steps")

    staging = out / ".staging"
    if staging.exists():
        shutil.rmtree(staging)
    draft.save_pretrained(staging)
    t0 = time.perf_counter()
    quality = greedy_quality(target, draft, data.heldout_prompts, block_sizes=options.quality_block_sizes,
                             max_new_tokens=options.quality_max_new_tokens, stop_token_ids=data.stop_token_ids)
    timings["quality_s"] = round(time.perf_counter() - t0, 1)
    response_tokens = {c: sum(s.token_ids.numel() - s.response_start for s, k in zip(sequences, category_of)
                              if k == c) for c in categories}
    manifest = {
        "command": command,
        "seed": config.seed,
        "wall_s": round(time.perf_counter() - begin, 1),
        "stage_wall_s": timings,
        "threads": torch.get_num_threads(),
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "transformers": transformers.__version__, "machine": platform.machine(),
                        "processor": platform.processor(), "device": _device_name(target)},
        "data": {**data.description,
                 "prompts_per_category": {c: len(p) for c, p in data.train_prompts.items()},
                 "response_tokens_per_category": response_tokens,
                 "sequences": len(sequences),
                 "total_tokens": sum(s.token_ids.numel() for s in sequences),
                 "distill_max_new_tokens": options.distill_max_new_tokens,
                 "distill_bf16_autocast": options.distill_bf16_autocast,
                 "feature_batch_size": options.feature_batch_size, "feature_dtype": options.feature_dtype,
                 "heldout_prompts_per_category": {c: len(p) for c, p in data.heldout_prompts.items()}},
        "draft": {**{k: v for k, v in vars(stats).items() if k != "losses"},
                  "loss_every_50_steps": [round(sum(stats.losses[i:i + 50]) / len(stats.losses[i:i + 50]), 4)
                                          for i in range(0, len(stats.losses), 50)]},
        "quality": {"metric": "greedy acceptance length tau (committed tokens per cycle) on held-out prompts",
                    "max_new_tokens": options.quality_max_new_tokens, "by_category_and_block_size": quality},
        **(extra_manifest or {}),
    }
    for path in [staging, *staging.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    manifest["files"] = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
                         for p in sorted(staging.iterdir()) if p.is_file()}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for path in staging.iterdir():
        path.replace(out / path.name)
    staging.rmdir()
    shutil.rmtree(work)
    log(json.dumps({"out": str(out), "wall_s": manifest["wall_s"], "mean_tau": quality["mean"]}))
    return manifest


def tokenize_prompts(texts: dict[str, list[str]], tokenizer, *, chat: bool) -> dict[str, list[list[int]]]:
    if chat:
        return {c: [chat_prompt_ids(tokenizer, [{"role": "user", "content": t}]) for t in ts]
                for c, ts in texts.items()}
    return {c: [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ts] for c, ts in texts.items()}
