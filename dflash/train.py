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

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .model import DFlashDraftModel, extract_context_feature, make_draft_config


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
    losses: list[float] = field(default_factory=list, repr=False)


@torch.inference_mode()
def context_features(target, sequences: list[TrainingSequence], layer_ids: list[int]) -> list[torch.Tensor]:
    """Target features [T, K*H] per sequence, computed once and reused by every epoch."""
    features = []
    for sequence in sequences:
        out = target(input_ids=sequence.token_ids[None], output_hidden_states=True)
        features.append(extract_context_feature(out.hidden_states, layer_ids)[0].float())
    return features


def block_attention_mask(anchors: torch.Tensor, context_length: int, block_size: int) -> torch.Tensor:
    """Bool mask [A*B, context_length + A*B]: block a sees context < anchor_a and only its own block."""
    num_blocks = anchors.numel()
    block_of_query = torch.arange(num_blocks).repeat_interleave(block_size)
    sees_context = torch.arange(context_length)[None, :] < anchors[block_of_query][:, None]
    sees_block = block_of_query[:, None] == block_of_query[None, :]
    return torch.cat([sees_context, sees_block], dim=1)


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
                progress: bool = True) -> tuple[DFlashDraftModel, DraftTrainingStats]:
    """Train a DFlash draft for `target` on its own responses; returns the draft (eval mode) and statistics."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    block = config.block_size
    gamma = config.gamma or default_gamma(block)
    draft = DFlashDraftModel(make_draft_config(target.config, num_layers=config.num_layers, block_size=block,
                                               mask_token_id=mask_token_id,
                                               target_layer_ids=config.target_layer_ids)).float().train()
    features = context_features(target, sequences, draft.target_layer_ids)
    usable = [i for i, s in enumerate(sequences) if s.token_ids.numel() - 2 >= max(1, s.response_start - 1)]
    if not usable:
        raise ValueError("no training sequence has a response to learn from")
    embed, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    position_weights = torch.exp(-torch.arange(block - 1, dtype=torch.float32) / gamma)  # k = 1..B-1

    optimizer = torch.optim.AdamW(draft.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = max(1, int(config.warmup_fraction * config.steps))

    def learning_rate_scale(step: int) -> float:  # linear warm-up, cosine decay
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_scale)
    losses, begin = [], time.perf_counter()
    for _ in tqdm(range(config.steps), desc="draft", disable=not progress):
        chosen = [usable[i] for i in torch.randint(len(usable), (config.batch_size,), generator=generator)]
        loss = _batch_loss(draft, embed, lm_head, [sequences[i] for i in chosen], [features[i] for i in chosen],
                           config.anchors_per_sequence, block, mask_token_id, position_weights, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    tail = losses[-max(1, len(losses) // 10):]
    stats = DraftTrainingStats(config={**asdict(config), "gamma": gamma, "target_layer_ids": draft.target_layer_ids},
                               num_sequences=len(sequences), num_parameters=sum(p.numel() for p in draft.parameters()),
                               wall_s=time.perf_counter() - begin, loss_first=losses[0],
                               loss_last=sum(tail) / len(tail), losses=losses)
    return draft.eval(), stats


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
        context[row, : feature.shape[0]] = feature
    block_ids = torch.stack(block_ids)
    with torch.no_grad():
        noise = embed(block_ids)
    hidden = draft(noise, context, torch.arange(context_length)[None].expand(len(sequences), -1),
                   torch.stack(block_positions), attention_mask=torch.stack(masks)[:, None])
    hidden = hidden.view(len(sequences), num_blocks, block, -1)[:, :, 1:]  # drop the anchor's output
    logits = lm_head(hidden).float()
    labels = torch.stack(labels).flatten()
    token_loss = F.cross_entropy(logits.flatten(0, 2), labels, reduction="none", ignore_index=-100)
    weights = position_weights.expand(len(sequences), num_blocks, -1).flatten() * (labels != -100)
    return (token_loss * weights).sum() / weights.sum()
