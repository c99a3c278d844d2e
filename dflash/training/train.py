"""The DFlash draft-training recipe, for any Hugging Face causal-LM target and any block size.

Recipe (DFlash paper as reconstructed in shared/reference/ANCHORS_ALGORITHMS.md A3):
  * data: the target's own responses to prompts (self-distillation), with the target's hidden states cached
    as context features;
  * each step samples random anchors in the response part of each sequence; a block is the real token at the
    anchor followed by B-1 masks at positions anchor .. anchor+B-1;
  * a block attends to context features strictly before its anchor (at inference the anchor's own feature is
    not computed yet), bidirectionally to itself, and never to other blocks;
  * output k of a block predicts the token at anchor+k (k = 1..B-1), weighted by exp(-(k-1)/gamma) because an
    early mistake wastes every later position at verification.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..engine import left_pad
from ..errors import DFlashError
from ..model import DFlashDraftModel, extract_context_feature, make_draft_config


def default_gamma(block_size: int) -> float:
    """Loss decay: 7 for B=16, 5 for B=10, 4 for B=8 (ModelOpt, citing the paper); interpolated otherwise."""
    return {16: 7.0, 10: 5.0, 8: 4.0}.get(block_size, max(1.0, block_size * 7.0 / 16.0))


@dataclass
class DraftTrainingConfig:
    num_layers: int = 2
    block_size: int = 16
    target_layer_ids: list[int] | None = None
    gamma: float | None = None  # None: default_gamma(block_size)
    anchors_per_sequence: int = 8
    batch_size: int = 8
    steps: int = 1000
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.04
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    bf16_autocast: bool = False  # draft forward/backward under CPU/CUDA bf16 autocast (weights stay fp32)
    # "full": cross-entropy over the target's whole vocabulary. "observed": over the tokens that occur in the
    # training sequences only (every label is one), a sampled-softmax approximation that skips the head rows no
    # label can need: SmolLM2's 49k-row head and loss were 2/3 of a CPU training step.
    loss_vocab: str = "full"


@dataclass
class TrainingSequence:
    token_ids: torch.Tensor  # [T] prompt + the target's own response
    response_start: int  # first position of the response; anchors are drawn from the response


@dataclass
class DraftTrainingStats:
    config: dict
    num_sequences: int
    num_parameters: int
    wall_s: float
    loss_first: float
    loss_last: float  # mean over the last 10% of steps
    loss_vocab_size: int = 0  # rows of the head the loss normalises over
    losses: list[float] = field(default_factory=list, repr=False)


@torch.inference_mode()
def self_distill(target, prompts: list[list[int]], *, max_new_tokens: int, stop_token_ids=(), pad_token_id: int = 0,
                 batch_size: int = 16, bf16_autocast: bool = False, progress: bool = True) -> list[TrainingSequence]:
    """Prompt + the target's own greedy response (cut after the first stop token) for every prompt.

    Batched: prompts are sorted by length and left padded with an attention mask, so a batch wastes little;
    sequences come back in the input order. `bf16_autocast` generates ~1.5-3x faster on CPUs with AVX512-BF16;
    the responses are then the target's greedy text under bf16 rounding (they may differ from fp32 greedy after
    a near-tie), which is still the target's own distribution for training purposes."""
    stops = list(stop_token_ids)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    sequences: list[TrainingSequence | None] = [None] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="self-distillation", disable=not progress):
        input_ids, valid, _ = left_pad([prompts[i] for i in batch], pad_token_id)
        width, attention_mask = input_ids.shape[1], valid.long()
        with torch.autocast(target.device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
            out = target.generate(input_ids=input_ids.to(target.device),
                                  attention_mask=attention_mask.to(target.device), do_sample=False,
                                  max_new_tokens=max_new_tokens, eos_token_id=stops or None,
                                  pad_token_id=pad_token_id)
        for row, i in enumerate(batch):
            response = out[row, width:].tolist()
            end = next((k + 1 for k, t in enumerate(response) if t in stops), len(response))
            sequences[i] = TrainingSequence(torch.tensor(list(prompts[i]) + response[:end]), len(prompts[i]))
    return sequences


@torch.inference_mode()
def context_features(target, sequences: list[TrainingSequence], layer_ids: list[int], *, batch_size: int = 8,
                     dtype: torch.dtype = torch.float32, progress: bool = False) -> list[torch.Tensor]:
    """Target features [T, K*H] per sequence, computed once and reused by every epoch.

    Batches are right padded: with causal attention a real position never sees the padding after it."""
    order = sorted(range(len(sequences)), key=lambda i: sequences[i].token_ids.numel())
    features: list[torch.Tensor | None] = [None] * len(sequences)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="context features", disable=not progress):
        lengths = [sequences[i].token_ids.numel() for i in batch]
        ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, :lengths[row]] = sequences[i].token_ids
        out = target(input_ids=ids.to(target.device), output_hidden_states=True, logits_to_keep=1)  # no logits needed
        fused = extract_context_feature(out.hidden_states, layer_ids).to("cpu", dtype)
        for row, i in enumerate(batch):
            features[i] = fused[row, :lengths[row]].clone()
    return features


def block_attention_mask(anchors: torch.Tensor, context_length: int, block_size: int) -> torch.Tensor:
    """Bool mask [A*B, context_length + A*B]: block a sees context < anchor_a and only its own block."""
    num_blocks = anchors.numel()
    block_of_query = torch.arange(num_blocks).repeat_interleave(block_size)
    sees_context = torch.arange(context_length)[None, :] < anchors[block_of_query][:, None]
    sees_block = block_of_query[:, None] == block_of_query[None, :]
    return torch.cat([sees_context, sees_block], dim=1)


LOSS_VOCABS = ("full", "observed")


class RestrictedHead(torch.nn.Module):
    """The target's LM head over `token_ids` only; labels are mapped to their row here (`rows`)."""

    def __init__(self, head: torch.nn.Module, token_ids: torch.Tensor):
        super().__init__()
        token_ids = token_ids.to(head.weight.device)
        self.weight = head.weight[token_ids].detach()
        self.bias = head.bias[token_ids].detach() if getattr(head, "bias", None) is not None else None
        self.rows = torch.full((head.weight.shape[0],), -100, dtype=torch.long, device=head.weight.device)
        self.rows[token_ids] = torch.arange(token_ids.numel(), device=head.weight.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias)

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.where(labels == -100, labels, self.rows[labels.clamp(min=0)])


def loss_head(head, sequences: list[TrainingSequence], loss_vocab: str):
    """The head the loss is computed with: the target's own ("full") or its rows for the observed tokens."""
    if loss_vocab == "full":
        return head
    return RestrictedHead(head, torch.unique(torch.cat([s.token_ids for s in sequences])))


def sample_anchors(sequence: TrainingSequence, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` anchors in the response (the last prompt token may anchor the first response block); each
    anchor needs at least one token after it. Blocks may run past the end of a short response: those
    positions carry no loss. Sampled without replacement when there is room, else with replacement."""
    low = max(1, sequence.response_start - 1)
    high = sequence.token_ids.numel() - 2  # inclusive
    available = high - low + 1
    if available >= count:
        picks = torch.randperm(available, generator=generator)[:count]
    else:
        picks = torch.randint(available, (count,), generator=generator)
    return (low + picks).sort().values


def train_draft(target, sequences: list[TrainingSequence], *, mask_token_id: int, config: DraftTrainingConfig,
                progress: bool = True, features: list[torch.Tensor] | None = None,
                checkpoint_path: str | os.PathLike | None = None, checkpoint_every: int = 100,
                resume: bool = False) -> tuple[DFlashDraftModel, DraftTrainingStats]:
    """Train a DFlash draft for `target` on its own responses; returns the draft (eval mode) and statistics.

    `features`: precomputed `context_features` (else computed here). `checkpoint_path`: every
    `checkpoint_every` steps the draft, optimizer, scheduler, sampler state and losses are saved there
    (atomically, as one safetensors file: see `_save_checkpoint`; never a pickle); `resume=True` continues from
    it, giving the bitwise same result as an uninterrupted run. A checkpoint that is unreadable or was made with
    another config, other sequences or another draft shape is a DFlashError, never loaded."""
    if config.loss_vocab not in LOSS_VOCABS:
        raise DFlashError(f"loss_vocab must be one of {', '.join(LOSS_VOCABS)}, got {config.loss_vocab!r}.")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    block = config.block_size
    gamma = config.gamma or default_gamma(block)
    draft = DFlashDraftModel(make_draft_config(target.config, num_layers=config.num_layers, block_size=block,
                                               mask_token_id=mask_token_id,
                                               target_layer_ids=config.target_layer_ids)).float().train()
    draft.to(target.get_input_embeddings().weight.device)  # the target's device: a GPU trains in minutes
    if features is None:  # one sequence per forward: no padding, the tiny build's original numerics
        features = context_features(target, sequences, draft.target_layer_ids, batch_size=1)
    usable = [i for i, s in enumerate(sequences) if s.token_ids.numel() - 2 >= max(1, s.response_start - 1)]
    if not usable:
        raise ValueError("no training sequence has a response to learn from")
    embed = target.get_input_embeddings()
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    lm_head = loss_head(target.get_output_embeddings(), sequences, config.loss_vocab)
    position_weights = torch.exp(-torch.arange(block - 1, dtype=torch.float32) / gamma).to(embed.weight.device)

    optimizer = torch.optim.AdamW(draft.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = max(1, int(config.warmup_fraction * config.steps))

    def learning_rate_scale(step: int) -> float:  # linear warm-up, cosine decay
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_scale)
    losses, wall_before, first_step = [], 0.0, 0
    data_sha256 = sequences_sha256(sequences)
    if resume and checkpoint_path is not None and Path(checkpoint_path).is_file():
        first_step, losses, wall_before = _load_checkpoint(Path(checkpoint_path), config, data_sha256, draft,
                                                           optimizer, scheduler, generator)
    device_type = next(target.parameters()).device.type
    begin = time.perf_counter()
    for step in tqdm(range(first_step, config.steps), desc="draft", disable=not progress, initial=first_step,
                     total=config.steps):
        chosen = [usable[i] for i in torch.randint(len(usable), (config.batch_size,), generator=generator)]
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.bf16_autocast):
            loss = _batch_loss(draft, embed, lm_head, [sequences[i] for i in chosen],
                               [features[i] for i in chosen], config.anchors_per_sequence, block, mask_token_id,
                               position_weights, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if checkpoint_path is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == config.steps):
            _save_checkpoint(checkpoint_path, {
                "config": asdict(config), "step": step + 1, "draft": draft.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "losses": losses,
                "wall_s": wall_before + time.perf_counter() - begin, "data_sha256": data_sha256})
    tail = losses[-max(1, len(losses) // 10):]
    stats = DraftTrainingStats(config={**asdict(config), "gamma": gamma, "target_layer_ids": draft.target_layer_ids},
                               num_sequences=len(sequences), num_parameters=sum(p.numel() for p in draft.parameters()),
                               loss_vocab_size=int(lm_head.weight.shape[0]),
                               wall_s=wall_before + time.perf_counter() - begin, loss_first=losses[0],
                               loss_last=sum(tail) / len(tail), losses=losses)
    return draft.eval(), stats


# --- safe on-disk state: safetensors + JSON, never pickle ----------------------------------------------------------
# A resumable file is one safetensors file: its tensors, plus a JSON document and a format tag in the safetensors
# metadata (the header). Reading it parses a bounded header and copies raw tensor bytes: no code runs, whatever
# the file holds. One file means one rename, so a save is atomic.
FORMAT_FIELD = "dflash_format"
STATE_FIELD = "dflash_state"
RECOVERY_HINT = "Delete it (or run `dflash train` without --resume) to recompute it."
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip container; a pickle of protocol >= 2


def unusable_file(path: Path, problem: str) -> DFlashError:
    """The one error for a resumable file that will not be used: which file, what is wrong, how to fix it."""
    return DFlashError(f"{path}: {problem}. {RECOVERY_HINT}")


def save_state_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], state: dict, kind: str) -> None:
    """Write `tensors` and the JSON-serialisable `state` to `path` (safetensors), write-then-rename: an
    interrupted save leaves at most a `.partial` file, never a truncated `path`."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, str(partial),
              metadata={FORMAT_FIELD: kind, STATE_FIELD: json.dumps(state)})
    with open(partial, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)


def load_state_file(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) from a `save_state_file` file of this `kind`. Never unpickles: an old torch.save / pickle
    file, a truncated or corrupt file, or a file of another kind is a DFlashError naming the file."""
    from safetensors import safe_open
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as error:
        raise unusable_file(path, f"cannot be read ({error.strerror or error})") from None
    # a safetensors file opens with its header length (8 bytes, little endian: the first may be 0x80) and "{"
    if head.startswith(_PICKLE_MAGIC) and head[8:9] != b"{":
        raise unusable_file(path, "is in the old, unsafe format (a pickle / torch.save file, which can run arbitrary "
                                  "code when loaded); it will not be unpickled")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get(FORMAT_FIELD) != kind:
                raise unusable_file(path, f"is not a {kind} file (format tag {metadata.get(FORMAT_FIELD)!r})")
            state = json.loads(metadata[STATE_FIELD])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except DFlashError:
        raise
    except Exception as error:  # anything a damaged file can make the parser raise
        message = " ".join(str(error).split())[:200] or type(error).__name__
        raise unusable_file(path, f"is corrupt, truncated or not a {kind} file ({message})") from None
    if not isinstance(state, dict):
        raise unusable_file(path, f"is not a {kind} file (its state is not a JSON object)")
    return tensors, state


def sequences_sha256(sequences: list[TrainingSequence]) -> str:
    """A fingerprint of training sequences (token ids and response starts), to tie cached state to its data."""
    digest = hashlib.sha256()
    for sequence in sequences:
        ids = sequence.token_ids.detach().to("cpu", torch.int64).contiguous()
        digest.update(f"{ids.numel()},{int(sequence.response_start)};".encode())
        digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def as_json(value):
    """`value` as it comes back from JSON (tuples become lists), for comparing with a loaded document."""
    return json.loads(json.dumps(value))


CHECKPOINT_FORMAT = "dflash-train-checkpoint-v1"
_ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")


def _save_checkpoint(path, state: dict) -> None:
    """One safetensors file, written then renamed. Tensors: `draft.<name>` (the draft's state dict),
    `optimizer.<param index>.<step|exp_avg|exp_avg_sq>` (AdamW state), `rng.generator` and `rng.torch` (uint8 RNG
    states). JSON metadata: config, step, losses, wall_s, data_sha256, scheduler (LambdaLR state_dict without
    its lr_lambdas, which are code) and the optimizer's param_groups."""
    tensors = {f"draft.{name}": t.detach().clone() for name, t in state["draft"].items()}
    for index, entry in state["optimizer"]["state"].items():
        for name, value in entry.items():
            tensors[f"optimizer.{index}.{name}"] = value.detach().clone()
    tensors["rng.generator"], tensors["rng.torch"] = state["generator"], state["torch_rng"]
    document = {key: state[key] for key in ("config", "step", "losses", "wall_s", "data_sha256")}
    document["scheduler"] = {k: v for k, v in state["scheduler"].items() if k != "lr_lambdas"}
    document["optimizer_param_groups"] = state["optimizer"]["param_groups"]
    save_state_file(path, tensors, document, CHECKPOINT_FORMAT)


def _same_structure(fresh, loaded) -> bool:
    """`loaded` (from JSON) has the keys, lengths and leaf types of `fresh` (a live state_dict)."""
    if isinstance(fresh, (list, tuple)):
        return isinstance(loaded, list) and len(loaded) == len(fresh) and all(map(_same_structure, fresh, loaded))
    if isinstance(fresh, dict):
        return (isinstance(loaded, dict) and set(loaded) == {str(k) for k in fresh}
                and all(_same_structure(v, loaded[str(k)]) for k, v in fresh.items()))
    return type(loaded) is type(fresh)


def _load_checkpoint(path: Path, config: DraftTrainingConfig, data_sha256: str, draft, optimizer, scheduler,
                     generator) -> tuple[int, list[float], float]:
    """Validate everything in the checkpoint against the live objects first, then restore them; returns
    (first step, losses so far, wall seconds so far)."""
    tensors, state = load_state_file(path, CHECKPOINT_FORMAT)
    if state.get("config") != as_json(asdict(config)):
        raise DFlashError(f"Checkpoint {path} was made with another training config; delete it or train with "
                          "the same options (or run `dflash train` without --resume).")
    if state.get("data_sha256") != data_sha256:
        raise unusable_file(path, "was made from other training sequences than this run's")
    step, losses, wall_s = state.get("step"), state.get("losses"), state.get("wall_s")
    if type(step) is not int or not 1 <= step <= config.steps:
        raise unusable_file(path, f"has an invalid step {step!r} (expected 1..{config.steps})")
    if not isinstance(losses, list) or len(losses) != step or not all(type(x) in (float, int) for x in losses):
        raise unusable_file(path, f"has an invalid loss history (expected {step} numbers)")
    if type(wall_s) not in (float, int) or not wall_s >= 0:
        raise unusable_file(path, f"has an invalid wall_s {wall_s!r}")

    def take(prefix: str) -> dict[str, torch.Tensor]:
        return {name[len(prefix):]: tensors.pop(name) for name in [n for n in tensors if n.startswith(prefix)]}

    weights, expected = take("draft."), draft.state_dict()
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise unusable_file(path, f"does not fit this draft (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, value in weights.items():
        if value.shape != expected[name].shape or value.dtype != expected[name].dtype:
            raise unusable_file(path, f"does not fit this draft: {name} is {value.dtype} {list(value.shape)}, "
                                      f"expected {expected[name].dtype} {list(expected[name].shape)}")

    parameters = list(draft.parameters())
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in take("optimizer.").items():
        index, _, field_name = name.partition(".")
        if not index.isdigit() or int(index) >= len(parameters) or field_name not in _ADAMW_STATE:
            raise unusable_file(path, f"has an unexpected optimizer entry {name!r}")
        parameter = parameters[int(index)]
        shape = () if field_name == "step" else tuple(parameter.shape)
        if tuple(value.shape) != shape or value.dtype != torch.float32:
            raise unusable_file(path, f"has an optimizer entry {name!r} of the wrong shape or dtype")
        moments.setdefault(int(index), {})[field_name] = value
    if any(set(entry) != set(_ADAMW_STATE) for entry in moments.values()):
        raise unusable_file(path, "has an incomplete optimizer state")
    fresh_groups = optimizer.state_dict()["param_groups"]
    groups = state.get("optimizer_param_groups")
    if (not isinstance(groups, list) or len(groups) != len(fresh_groups)
            or any(not isinstance(g, dict) or set(g) != set(f) or type(g["lr"]) is not float
                   or any(as_json(f[k]) != g[k] for k in f if k != "lr") for f, g in zip(fresh_groups, groups))):
        raise unusable_file(path, "has optimizer settings that do not match this run")
    fresh_scheduler = scheduler.state_dict()
    scheduler_state = state.get("scheduler")
    if not _same_structure({k: v for k, v in fresh_scheduler.items() if k != "lr_lambdas"}, scheduler_state):
        raise unusable_file(path, "has a learning-rate schedule state that does not match this run")

    rng = take("rng.")
    if set(rng) != {"generator", "torch"} or tensors:
        raise unusable_file(path, f"has unexpected or missing entries {sorted(tensors)[:3] or sorted(rng)}")
    for name, value in rng.items():
        try:
            torch.Generator().set_state(value)  # validates on a scratch generator before touching real ones
        except (RuntimeError, TypeError, ValueError):
            raise unusable_file(path, f"has an invalid random-number state rng.{name}") from None

    draft.load_state_dict(weights)
    optimizer.load_state_dict({"state": moments,
                               "param_groups": [{**f, "lr": g["lr"]} for f, g in zip(fresh_groups, groups)]})
    scheduler.load_state_dict({**scheduler_state, "lr_lambdas": fresh_scheduler["lr_lambdas"]})
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    return step, [float(x) for x in losses], float(wall_s)


def _batch_loss(draft, embed, lm_head, sequences, features, anchors_per_sequence, block, mask_token_id,
                position_weights, generator) -> torch.Tensor:
    """Weighted cross-entropy of every block of every sequence in the batch, in one draft forward."""
    num_blocks = anchors_per_sequence
    anchors = [sample_anchors(s, num_blocks, generator) for s in sequences]
    context_length = max(f.shape[0] for f in features)
    hidden_width = features[0].shape[1]
    block_ids, block_positions, labels, masks = [], [], [], []
    context = torch.zeros(len(sequences), context_length, hidden_width)
    for row, (sequence, feature, anchor) in enumerate(zip(sequences, features, anchors)):
        offsets = anchor[:, None] + torch.arange(block)[None, :]  # [A, B] absolute positions
        ids = torch.full((num_blocks, block), mask_token_id, dtype=torch.long)
        ids[:, 0] = sequence.token_ids[anchor]
        block_ids.append(ids.flatten())
        block_positions.append(offsets.flatten())
        targets = offsets[:, 1:]  # tokens at anchor+1 .. anchor+B-1; past the end: no loss
        inside = targets < sequence.token_ids.numel()
        labels.append(torch.where(inside, sequence.token_ids[targets.clamp(max=sequence.token_ids.numel() - 1)],
                                  torch.full_like(targets, -100)))
        masks.append(block_attention_mask(anchor, context_length, block))
        context[row, : feature.shape[0]] = feature.float()  # features may be cached in a narrower dtype
    device = embed.weight.device
    block_ids = torch.stack(block_ids).to(device)
    with torch.no_grad():
        noise = embed(block_ids)
    hidden = draft(noise, context.to(device), torch.arange(context_length, device=device)[None].expand(len(sequences), -1),
                   torch.stack(block_positions).to(device), attention_mask=torch.stack(masks)[:, None].to(device))
    hidden = hidden.view(len(sequences), num_blocks, block, -1)[:, :, 1:]  # drop the anchor's output
    logits = lm_head(hidden).float()
    labels = torch.stack(labels).flatten().to(device)
    if isinstance(lm_head, RestrictedHead):
        labels = lm_head.labels(labels)
    token_loss = F.cross_entropy(logits.flatten(0, 2), labels, reduction="none", ignore_index=-100)
    weights = position_weights.expand(len(sequences), num_blocks, -1).flatten() * (labels != -100)
    return (token_loss * weights).sum() / weights.sum()
