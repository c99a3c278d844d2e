"""Fast-dLLM v2 conversion of a causal LM into a block-diffusion LM (`dflash train block-diffusion`).

The recipe, in the order of this file:

1. data: chat samples (prompt + response + end token), each padded with the mask token to a fixed length L (a
   multiple of the block size D); only response positions carry labels;
2. noise: per sample t ~ U(eps, 1) and each response token masked with probability t; every sample is in the
   batch twice, with mask m and with its complement over the response, so each position is learned both
   masked and visible;
3. forward: the noisy and the clean stream side by side (2L tokens, positions 0..L-1 twice) under
   `masks.training_mask`, through the model's own forward;
4. loss with token shift: a masked position i is predicted from the output at i-1, which keeps the AR head's
   meaning. That is the noisy stream's output, except at a block's first position: its i-1 is the previous
   block's last position, read from the clean stream, as the finalize forward provides it when decoding;
5. AdamW with warmup then cosine, checkpoints every N steps (OUT/.work, safetensors + JSON), and an output that
   is a plain Hugging Face checkpoint plus manifest.json with the measured quality against the base.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from scipy.stats import binomtest

from ..cascade.ladder import LADDER_DIR, Budget
from ..cascade.tasks import Query, build_task_set
from ..engine.verifiers import additive_mask
from ..errors import DFlashError
from ..harness.stats import mcnemar_exact
from ..loading import PACKAGE_MODELS, chat_prompt_ids, load_target, load_tokenizer, quiet, resolve
from ..tinyworld.target import bf16_autocast_ok, greedy_continuations, warmup_cosine_lr
from ..training.train import load_state_file, save_state_file, unusable_file
from .masks import training_mask
from .reference import reference_decode

LADDER_BASE = "ladder-l4"  # the cascade ladder's largest model, trained on the graded tasks
DEFAULT_OUT = PACKAGE_MODELS / "block-diffusion"
BASE_TYPES = ("qwen2", "qwen3", "llama")  # their attention takes a 4-D float mask as given
CHECKPOINT_FORMAT = "dflash-block-diffusion-checkpoint-v1"
LADDER = Budget()  # the ladder's task set: same training samples and held-out queries as its rungs


@dataclass(frozen=True)
class Recipe:
    block_size: int = 32
    seq_len: int = 128  # L: every row is padded (with the mask token) to this length
    steps: int = 1300
    batch_size: int = 8  # samples per step; each is in the batch twice (mask m and 1 - m)
    # Gentle: higher rates lower the loss but erase more of the base's arithmetic. Pilots on the ladder base (200
    # held-out queries, threshold 1): 400 steps at 3e-3 / 1e-3 / 3e-4 / 1e-4 gave 0.18 / 0.47 / 0.77 / 0.70;
    # 1000 steps at 3e-4 / 1e-4 gave 0.82 / 0.85 (the base: 0.97).
    lr: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.1
    min_mask_ratio: float = 1e-3  # eps of t ~ U(eps, 1)
    seed: int = 0
    sub_block_size: int = 8  # decoding, for the measured quality
    eval_per_family: int = 200  # held-out graded queries per family (ladder base)
    max_new_tokens: int = 72


def shown_path(path: Path) -> str:
    """A path as a manifest records it: relative to the checkout when inside it (a manifest is shipped)."""
    from ..provenance import PROJECT_ROOT
    resolved = path.resolve()
    return str(resolved.relative_to(PROJECT_ROOT)) if resolved.is_relative_to(PROJECT_ROOT) else str(path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the base ------------------------------------------------------------------------------------------------------
def base_dir(base: str) -> Path:
    if base == LADDER_BASE:
        return LADDER_DIR / "l4"
    try:
        return resolve(base, "target")  # known name, local directory or cached hub id
    except DFlashError as error:
        raise DFlashError(f"--base {base!r} cannot be used: {error} The default base is {LADDER_BASE} (the cascade "
                          "ladder's largest model).") from None


def load_base(path: Path, mask_token: str | None):
    """(model in fp32, tokenizer, mask id) of a base that the conversion supports, or a DFlashError saying why not."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))  # `resolve` checked it is JSON
    if config.get("model_type") not in BASE_TYPES:
        raise DFlashError(f"The base {path} is a {config.get('model_type')!r} model; the block-diffusion conversion "
                          f"supports causal LMs of type {', '.join(BASE_TYPES)} (Qwen2/2.5, Qwen3, Llama), whose "
                          "attention takes the block-wise 4-D mask as given. Pass --base with one of those.")
    if any(kind != "full_attention" for kind in config.get("layer_types") or []):
        raise DFlashError(f"The base {path} has sliding-window layers (config.json 'layer_types'), which would change "
                          "the block-wise attention; pass a base with full attention in every layer.")
    tokenizer = load_tokenizer(str(path))
    mask_token = mask_token or tokenizer.mask_token
    mask_id = tokenizer.convert_tokens_to_ids(mask_token) if mask_token else None
    if mask_id is None or mask_id == tokenizer.unk_token_id and mask_token != tokenizer.unk_token:
        problem = (f"--mask-token {mask_token!r} is not in its vocabulary" if mask_token
                   else "it has no mask token (tokenizer_config.json 'mask_token')")
        raise DFlashError(f"The base's tokenizer ({path}) cannot be converted: {problem}. Block diffusion writes the "
                          "mask token into every position still to be predicted; pass --mask-token with an existing, "
                          "otherwise unused token.")
    if tokenizer.eos_token_id is None:
        raise DFlashError(f"The base's tokenizer ({path}) has no EOS token, which ends every response in training "
                          "and stops decoding; set eos_token in its tokenizer_config.json.")
    model = load_target(str(path), dtype="float32")
    if mask_id >= model.config.vocab_size:
        raise DFlashError(f"The mask token {mask_token!r} has id {mask_id}, outside the base's embedding "
                          f"({model.config.vocab_size} rows); pass --mask-token with a token the model embeds.")
    return model, tokenizer, mask_id


# --- 1. data ---------------------------------------------------------------------------------------------------------
def ladder_samples(tokenizer, queries: list[Query]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + end token) of the graded tasks' worked answers, in the chat format."""
    return [(q.prompt_ids(tokenizer), tokenizer(q.worked_answer(), add_special_tokens=False)["input_ids"]
             + [tokenizer.eos_token_id]) for q in queries]


def jsonl_samples(path: Path, tokenizer) -> list[tuple[list[int], list[int]]]:
    """One {"prompt": ..., "response": ...} object per line. A prompt goes through the tokenizer's chat template
    when it has one (as `dflash generate --chat` renders it), else it is used as raw text."""
    if not path.is_file():
        raise DFlashError(f"--data {path}: no such file. Pass a .jsonl file with one "
                          '{"prompt": ..., "response": ...} object per line.')
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DFlashError(f"--data {path} is not UTF-8 text; re-encode it as UTF-8.") from None
    samples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DFlashError(f"--data {path}, line {number}: not valid JSON ({error.msg}); every line must be one "
                              '{"prompt": ..., "response": ...} object.') from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "response")):
            raise DFlashError(f"--data {path}, line {number}: needs the text fields \"prompt\" and \"response\" "
                              f"(found {sorted(row) if isinstance(row, dict) else type(row).__name__}).")
        prompt = (chat_prompt_ids(tokenizer, [{"role": "user", "content": row["prompt"]}]) if tokenizer.chat_template
                  else tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        samples.append((prompt, response))
    if not samples:
        raise DFlashError(f"--data {path} has no rows.")
    return samples


def make_rows(samples, seq_len: int, mask_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[N, L] token rows (prompt, response, then the mask token as padding), [N, L] bool response positions, and
    how many samples were dropped: longer than L, or with an empty prompt (position 0 has no i-1 to predict it)."""
    kept = [(p, r) for p, r in samples if p and len(p) + len(r) <= seq_len]
    if not kept:
        raise DFlashError(f"No training sample fits the sequence length {seq_len} (with a non-empty prompt); "
                          "shorten the samples.")
    tokens = torch.full((len(kept), seq_len), mask_id, dtype=torch.long)
    response = torch.zeros(len(kept), seq_len, dtype=torch.bool)
    for row, (prompt, answer) in enumerate(kept):
        tokens[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        response[row, len(prompt) : len(prompt) + len(answer)] = True
    return tokens, response, len(samples) - len(kept)


# --- 2. noise --------------------------------------------------------------------------------------------------------
def complementary_noise(tokens, response, mask_id: int, generator, min_ratio: float):
    """[B, L] rows -> (noisy [2B, L], masked [2B, L], clean [2B, L]): rows b and B + b are sample b with mask m
    and with the response positions m leaves visible. Only response positions are ever masked."""
    t = min_ratio + (1 - min_ratio) * torch.rand(len(tokens), 1, generator=generator)
    first = response & (torch.rand(tokens.shape, generator=generator) < t)
    masked = torch.cat([first, response & ~first])
    clean = tokens.repeat(2, 1)
    return clean.masked_fill(masked, mask_id), masked, clean


# --- 3. forward and 4. loss ------------------------------------------------------------------------------------------
def two_stream_logits(model, noisy, clean, block_size: int) -> torch.Tensor:
    """[2B, 2L, V]: the model over concat(noisy, clean) with positions 0..L-1 for each stream."""
    rows, length = noisy.shape
    positions = torch.arange(length).repeat(2)[None].expand(rows, -1)
    mask = additive_mask(training_mask(length, block_size), torch.float32)[None, None]
    return model(input_ids=torch.cat([noisy, clean], 1), position_ids=positions,
                 attention_mask=mask.expand(rows, 1, 2 * length, 2 * length)).logits


def shifted_loss(logits, clean, masked, block_size: int) -> torch.Tensor:
    """Mean cross-entropy over the masked positions, position i read at i-1 (see the module docstring)."""
    length = clean.shape[1]
    positions = torch.arange(length)
    source = torch.where(positions % block_size == 0, length + positions - 1, positions - 1)
    rows, cols = masked.nonzero(as_tuple=True)
    return F.cross_entropy(logits[rows, source[cols]].float(), clean[rows, cols])


def train_step(model, optimizer, noisy, masked, clean, block_size: int, bf16: bool) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = two_stream_logits(model, noisy, clean, block_size)
    loss = shifted_loss(logits, clean, masked, block_size)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# --- 5. checkpoints: parameters, AdamW moments and the noise generator, in one safetensors file ----------------------
def save_checkpoint(path: Path, model, optimizer, generator, document: dict) -> None:
    # named_parameters lists tied weights once (safetensors refuses tensors that share memory)
    tensors = {f"model.{name}": p.detach().clone() for name, p in model.named_parameters()}
    for index, entry in optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer.{index}.{name}": value.clone() for name, value in entry.items()})
    tensors["rng.noise"] = generator.get_state()
    save_state_file(path, tensors, document, CHECKPOINT_FORMAT)


def load_checkpoint(path: Path, key: dict, model, optimizer, generator) -> dict:
    tensors, document = load_state_file(path, CHECKPOINT_FORMAT)
    if type(document.get("step")) is not int or not isinstance(document.get("losses"), list):
        raise unusable_file(path, "has no valid step and loss history")
    if document.get("key") != key:
        raise DFlashError(f"The checkpoint {path} was made with another base, data or recipe; delete it (or run "
                          "without --resume) to start over.")
    parameters = dict(model.named_parameters())
    if {f"model.{n}" for n in parameters} != {n for n in tensors if n.startswith("model.")}:
        raise unusable_file(path, "does not hold this model's parameters")
    with torch.no_grad():
        for name, parameter in parameters.items():
            if tensors[f"model.{name}"].shape != parameter.shape:
                raise unusable_file(path, f"has {name} of shape {list(tensors[f'model.{name}'].shape)}")
            parameter.copy_(tensors[f"model.{name}"])
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            index, field = name.removeprefix("optimizer.").split(".", 1)
            state.setdefault(int(index), {})[field] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
        generator.set_state(tensors["rng.noise"])
    except (KeyError, RuntimeError, ValueError) as error:
        raise unusable_file(path, f"has an unusable optimizer or generator state ({error})") from None
    return document


def train_model(model, tokens, response, mask_id: int, recipe: Recipe, key: dict, checkpoint: Path, resume: bool,
                checkpoint_every: int) -> tuple[int, list[float], float, bool]:
    """Steps 2-5 of the recipe, in place; returns (step resumed at, losses, training seconds, bf16 autocast)."""
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]  # weight decay on matrices, not norms
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=recipe.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(recipe.seed)  # data order first, then every step's noise
    epochs = -(-recipe.steps * recipe.batch_size // len(tokens))
    order = torch.cat([torch.randperm(len(tokens), generator=generator) for _ in range(epochs)])
    start, losses, train_seconds = 0, [], 0.0
    if resume and checkpoint.exists():
        document = load_checkpoint(checkpoint, key, model, optimizer, generator)
        start, losses, train_seconds = document["step"], document["losses"], document["train_seconds"]
        print(f"block-diffusion: resumed at step {start}", flush=True)
    bf16 = bf16_autocast_ok()
    for step in range(start, recipe.steps):
        step_begin = time.perf_counter()
        batch = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
        noisy, masked, clean = complementary_noise(tokens[batch], response[batch], mask_id, generator,
                                                   recipe.min_mask_ratio)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, recipe.lr, recipe.warmup, recipe.steps)
        losses.append(train_step(model, optimizer, noisy, masked, clean, recipe.block_size, bf16))
        train_seconds += time.perf_counter() - step_begin
        if (step + 1) % checkpoint_every == 0 and step + 1 < recipe.steps:
            save_checkpoint(checkpoint, model, optimizer, generator,
                            {"key": key, "step": step + 1, "losses": losses, "train_seconds": train_seconds})
        if (step + 1) % 25 == 0 or step + 1 == recipe.steps:
            recent = losses[-25:]
            print(f"block-diffusion: step {step + 1}/{recipe.steps} loss {sum(recent) / len(recent):.4f} "
                  f"({train_seconds:.0f} s)", flush=True)
    model.eval()
    return start, losses, train_seconds, bf16


# --- measured quality (ladder base) ----------------------------------------------------------------------------------
def paired_comparison(base_ok: list[bool], converted_ok: list[bool]) -> dict:
    """Accuracies with Wilson 95% intervals, the discordant pairs, McNemar's exact p (a binomial test on the
    discordant pairs) and a paired bootstrap 95% interval of the difference (converted - base)."""
    n, base, converted = len(base_ok), np.array(base_ok, float), np.array(converted_ok, float)
    base_only, converted_only, mcnemar_p = mcnemar_exact(base_ok, converted_ok)
    resample = np.random.default_rng(0).integers(0, n, (4000, n))
    difference = converted[resample].mean(1) - base[resample].mean(1)

    def wilson(correct: np.ndarray) -> list[float]:
        interval = binomtest(int(correct.sum()), n).proportion_ci(0.95, method="wilson")
        return [round(interval.low, 4), round(interval.high, 4)]
    return {"n": n, "base_accuracy": base.mean(), "base_wilson95": wilson(base),
            "converted_accuracy": converted.mean(), "converted_wilson95": wilson(converted),
            "difference": converted.mean() - base.mean(),
            "difference_bootstrap95": [round(float(np.percentile(difference, q)), 4) for q in (2.5, 97.5)],
            "discordant": {"base_only": base_only, "converted_only": converted_only},
            "mcnemar_exact_p": mcnemar_p}


def measure_quality(converted, base, tokenizer, queries: dict[str, list[Query]], recipe: Recipe, mask_id: int,
                    stop_ids: list[int]) -> dict:
    """Exact-match accuracy on the same held-out queries: the base's greedy AR decoding vs the converted model
    decoded by `reference_decode`, one token per forward (threshold 1) and in parallel (threshold 0.9)."""
    flat = [q for family in queries.values() for q in family]
    families = [q.family for q in flat]
    base_replies = greedy_continuations(base, tokenizer, [q.prompt for q in flat], recipe.max_new_tokens)
    base_ok = [q.grade(tokenizer.decode(r, skip_special_tokens=True))[1] for q, r in zip(flat, base_replies)]

    def by_family(correct: list[bool]) -> dict:
        return {f: float(np.mean([c for c, g in zip(correct, families) if g == f])) for f in queries}
    quality = {"queries": {f: len(qs) for f, qs in queries.items()}, "max_new_tokens": recipe.max_new_tokens,
               "base_decoding": "greedy AR (transformers generate, batched with left padding)"}
    for threshold in (1.0, 0.9):
        begin = time.perf_counter()
        results = [reference_decode(converted, q.prompt_ids(tokenizer), block_size=recipe.block_size,
                                    sub_block_size=recipe.sub_block_size, threshold=threshold, mask_id=mask_id,
                                    stop_ids=stop_ids, max_new_tokens=recipe.max_new_tokens) for q in flat]
        ok = [q.grade(tokenizer.decode(r.ids, skip_special_tokens=True))[1] for q, r in zip(flat, results)]
        quality[f"threshold_{threshold}"] = {
            "decoding": f"reference_decode(block_size={recipe.block_size}, sub_block_size={recipe.sub_block_size}, "
                        f"threshold={threshold})", **paired_comparison(base_ok, ok),
            "base_accuracy_by_family": by_family(base_ok), "converted_accuracy_by_family": by_family(ok),
            "forwards_per_token": sum(r.forwards for r in results) / max(1, sum(len(r.ids) for r in results)),
            "tokens_per_query": sum(len(r.ids) for r in results) / len(results),
            "seconds": round(time.perf_counter() - begin, 1)}
    return quality


# --- the build -------------------------------------------------------------------------------------------------------
def convert(base: str = LADDER_BASE, out: str | os.PathLike | None = None, *, data: str | None = None,
            mask_token: str | None = None, recipe: Recipe = Recipe(), resume: bool = False,
            checkpoint_every: int = 50, threads: int = 1, command: str = "dflash train block-diffusion") -> dict:
    """Convert `base` (or keep OUT when its manifest matches the recipe); returns the manifest."""
    begin = time.perf_counter()
    out = Path(out) if out else DEFAULT_OUT
    if out.exists() and not out.is_dir():
        raise DFlashError(f"--out {out} is a file; pass a directory (it is created if missing).")
    if (out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").exists()
            and not any((out / name).exists() for name in (".work", ".staging"))):
        raise DFlashError(f"--out {out} holds files that are not a block-diffusion build; pass a new or empty "
                          "directory.")
    if recipe.seq_len % recipe.block_size or recipe.block_size % recipe.sub_block_size:
        raise DFlashError(f"The sequence length ({recipe.seq_len}) must be a multiple of the block size "
                          f"({recipe.block_size}), and that of the sub-block size ({recipe.sub_block_size}).")
    path = base_dir(base)
    model, tokenizer, mask_id = load_base(path, mask_token)
    ladder = path.resolve() == (LADDER_DIR / "l4").resolve()
    if data is None and not ladder:
        raise DFlashError(f"--data FILE.jsonl is needed for the base {base!r}: the graded tasks are the training "
                          f"data of the ladder base ({LADDER_BASE}) only.")
    tasks = build_task_set(0, LADDER.n_train, LADDER.n_heldout) if ladder else None
    samples = jsonl_samples(Path(data), tokenizer) if data else ladder_samples(tokenizer, tasks.train)
    tokens, response, dropped = make_rows(samples, recipe.seq_len, mask_id)
    stop_ids = [tokenizer.eos_token_id]
    key = {"base": {"name": base, "model_type": model.config.model_type,
                    "weights_sha256": {f.name: sha256(f) for f in sorted(path.glob("*.safetensors"))}},
           "data": {"source": f"jsonl {Path(data).name}" if data else "graded tasks build_task_set(0) train",
                    "sha256": hashlib.sha256(tokens.numpy().tobytes() + response.numpy().tobytes()).hexdigest(),
                    "rows": len(tokens), "dropped": dropped},
           "mask_token_id": mask_id, "stop_token_ids": stop_ids, "recipe": asdict(recipe),
           "torch": torch.__version__, "transformers": transformers.__version__}
    manifest_path = out / "manifest.json"
    try:
        old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        old = {}  # unreadable: rebuilt
    if old.get("recipe") == key:
        print(f"block-diffusion: {out} kept (its manifest matches the recipe)", flush=True)
        return old

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # a shared machine: no oversubscription, reproducible kernels
    try:
        start, losses, train_seconds, bf16 = train_model(model, tokens, response, mask_id, recipe, key,
                                                         out / ".work" / "checkpoint.safetensors", resume,
                                                         checkpoint_every)
        staging = out / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        model.config.block_diffusion = {"block_size": recipe.block_size, "mask_token_id": mask_id,
                                        "stop_token_ids": stop_ids}
        with quiet():  # its progress bar
            model.to(torch.bfloat16).save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        for file in staging.iterdir():
            file.chmod(0o644)  # save_pretrained leaves the weights owner-only; the package ships them readable
        if ladder:  # measured on the shipped (bf16) weights against the untouched base
            heldout = {f: qs[: recipe.eval_per_family] for f, qs in tasks.heldout.items()}
            quality = measure_quality(load_target(str(staging)), load_target(str(path)), tokenizer, heldout, recipe,
                                      mask_id, stop_ids)
        else:
            quality = {"measured": False, "why": "the graded tasks (and their chat format) belong to the ladder "
                                                 "base; other bases have no graded held-out set here"}
    finally:
        torch.set_num_threads(old_threads)

    base_manifest = path / "manifest.json"
    curve_every = -(-recipe.steps // 20)
    manifest = {
        "build_command": command, "recipe": key,
        "block_size": recipe.block_size, "mask_token_id": mask_id, "stop_token_ids": stop_ids,
        "base": {"path": shown_path(path), "manifest_sha256": sha256(base_manifest) if base_manifest.exists() else None,
                 "params": sum(p.numel() for p in model.parameters())},
        "data": {"file": str(data) if data else None, "file_sha256": sha256(Path(data)) if data else None},
        "training": {"train_seconds": round(train_seconds, 1), "bf16_autocast": bf16, "threads": threads,
                     "resumed_at_step": start, "tokens_per_step": 2 * recipe.batch_size * 2 * recipe.seq_len,
                     "loss_first": losses[0], "loss_last50_mean": sum(losses[-50:]) / len(losses[-50:]),
                     "loss_curve": [round(sum(losses[i : i + curve_every]) / len(losses[i : i + curve_every]), 4)
                                    for i in range(0, len(losses), curve_every)]},
        "quality": quality, "storage_dtype": "bfloat16",
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "transformers": transformers.__version__, "machine": platform.machine()},
        "build_seconds": round(time.perf_counter() - begin, 1),
        "files": {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size} for p in sorted(staging.iterdir())},
    }
    manifest_path.unlink(missing_ok=True)  # no manifest while files change: an interrupted swap is rebuilt
    for name in set(old.get("files", {})) - set(manifest["files"]):
        (out / name).unlink(missing_ok=True)
    for file in staging.iterdir():
        os.replace(file, out / file.name)
    manifest_path.with_name("manifest.json.partial").write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(manifest_path.with_name("manifest.json.partial"), manifest_path)
    shutil.rmtree(staging)
    shutil.rmtree(out / ".work", ignore_errors=True)
    return manifest
