"""The DFlash draft model: a small Qwen3-style block denoiser conditioned on target hidden states.

It has no embedding table and no LM head: it borrows the target's. One forward pass predicts a whole block
`[anchor, MASK, ..., MASK]`; the block attends non-causally to itself and to context keys/values computed from
fused target features of all committed positions before the anchor. Checkpoints use the z-lab format
(`config.json` with `block_size`, `num_target_layers`, `dflash_config`; safetensors keys `fc`, `hidden_norm`,
`layers.*`, `norm`) so the public `z-lab/*-DFlash-*` drafts load unchanged; vLLM's speculators format (the same
tensors, other config fields; dflash.speculators) loads too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding

from .errors import DFlashError
from .speculators import check_token_map, is_speculators, to_zlab_config

WEIGHTS_NAME = "model.safetensors"


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """Default taps: the middle layer for a 1-layer draft, else evenly spaced over [1, L-3] (z-lab rule)."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [round(start + i * (end - start) / (num_draft_layers - 1)) for i in range(num_draft_layers)]


def extract_context_feature(hidden_states: tuple[torch.Tensor, ...], layer_ids: list[int]) -> torch.Tensor:
    """Concatenate the outputs of decoder layers `layer_ids` (hidden_states[0] is the embedding output)."""
    return torch.cat([hidden_states[i + 1] for i in layer_ids], dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; x [B, heads, T, d], cos/sin [B, T, d]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DFlashRotaryEmbedding(Qwen3RotaryEmbedding):
    """Qwen3 RoPE whose frequencies stay float32 when the draft is cast (`.to(dtype)`, `.bfloat16()`, `.half()`,
    `from_pretrained(dtype=...)`); device moves still apply. A bf16 `inv_freq` is off by up to 0.4% (Qwen3-4B:
    head dim 128, theta 1e6), a phase error of 0.6 rad at distance 512 and 2.4 rad at 2048. As in transformers'
    targets, whose float32 buffers `from_pretrained` never casts, the angles are computed in float32 and only
    cos/sin come out in the activation dtype (the forward is transformers' own)."""

    FLOAT32_BUFFERS = ("inv_freq", "original_inv_freq")

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers[name] for name in self.FLOAT32_BUFFERS if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            moved = self._buffers[name]
            if moved.dtype != torch.float32:  # recompute from the float32 values, never round-trip
                self._buffers[name] = original.to(device=moved.device, dtype=torch.float32)
        return self


class DFlashAttention(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, x, context, cos, sin, cache=None, attention_mask=None):
        batch, q_len, _ = x.shape
        c_len = context.shape[1]
        query = self.q_norm(self.q_proj(x).view(batch, q_len, self.num_heads, self.head_dim)).transpose(1, 2)
        kv_input = torch.cat([context, x], dim=1)  # context keys first, then the block's own keys
        key = self.k_proj(kv_input).view(batch, c_len + q_len, self.num_kv_heads, self.head_dim)
        key = self.k_norm(key).transpose(1, 2)
        value = self.v_proj(kv_input).view(batch, c_len + q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        query = _rope(query, cos[:, c_len:], sin[:, c_len:])  # queries are block positions only
        key = _rope(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        groups = self.num_heads // self.num_kv_heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        # No mask at inference: the block sees every cached context position and itself, bidirectionally.
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, q_len, -1))


class DFlashDecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.self_attn = DFlashAttention(config, layer_idx)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, h, context, cos, sin, cache=None, attention_mask=None):
        # The fused context is shared by all layers and is not passed through input_layernorm.
        h = h + self.self_attn(self.input_layernorm(h), context, cos, sin, cache, attention_mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashDraftModel(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        dflash_config = getattr(config, "dflash_config", None) or {}
        self.num_target_layers = int(config.num_target_layers)
        self.target_layer_ids = list(dflash_config.get("target_layer_ids") or
                                     build_target_layer_ids(self.num_target_layers, config.num_hidden_layers))
        self.mask_token_id = dflash_config.get("mask_token_id")
        self.block_size = int(config.block_size)
        hidden = config.hidden_size
        self.fc = nn.Linear(len(self.target_layer_ids) * hidden, hidden, bias=False)
        self.hidden_norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = DFlashRotaryEmbedding(config=config)

    def forward(self, noise_embedding, target_hidden, context_position_ids, block_position_ids,
                past_key_values=None, attention_mask=None):
        """Hidden states [B, q, H] for the block; the caller applies the target's LM head.

        noise_embedding [B, q, H]: target embeddings of the block tokens; target_hidden [B, c, K*H]: raw
        concatenated target features of the c context positions not yet in `past_key_values`;
        *_position_ids [B, c] / [B, q]: absolute positions; attention_mask: optional bool
        [B, 1, q, cached + c + q] (True = attend), used by training to keep each block to its own context.
        """
        context = self.hidden_norm(self.fc(target_hidden))
        positions = torch.cat([context_position_ids, block_position_ids], dim=-1)
        cos, sin = self.rotary_emb(noise_embedding, positions)
        h = noise_embedding
        for layer in self.layers:
            h = layer(h, context, cos, sin, past_key_values, attention_mask)
        return self.norm(h)

    # --- z-lab checkpoint format -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> "DFlashDraftModel":
        path = Path(path)
        config = load_draft_config(path)
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            raise DFlashError(f"No *.safetensors weights in draft directory {path}. A DFlash draft directory "
                              "holds config.json and model.safetensors (z-lab format).")
        model = cls(config)
        try:
            state = {}
            for file in weights:
                state.update(load_file(str(file)))
            if is_speculators(read_config(path / "config.json", "draft config")):
                check_token_map(state, int(config.vocab_size), path)
                own = sorted(k for k in state if k.split(".")[0] in ("lm_head", "embed_tokens"))
                if own:
                    raise DFlashError(f"Draft weights in {path} ship their own {', '.join(own)}: vLLM would use "
                                      "them, while this engine borrows the target's embeddings and LM head, so the "
                                      "two would run different drafts. Use a draft without them.")
            missing, unexpected = model.load_state_dict(state, strict=False)
        except DFlashError:
            raise
        except Exception as error:  # unreadable file or tensors of the wrong shape
            raise DFlashError(f"Draft weights in {path} do not match the z-lab DFlash layout for its config.json: "
                              f"{str(error).strip().splitlines()[-1]}") from None
        if missing or unexpected:
            raise DFlashError(f"Draft weights in {path} do not match the z-lab DFlash layout: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}.")
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        config.update({
            "architectures": ["DFlashDraftModel"],
            "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
            "model_type": "qwen3",
            "block_size": self.block_size,
            "num_target_layers": self.num_target_layers,
            "dflash_config": {"target_layer_ids": self.target_layer_ids, "mask_token_id": self.mask_token_id},
        })
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})


DRAFT_CONFIG_INTS = ("block_size", "num_target_layers", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "vocab_size")  # required, each >= 1
DRAFT_CONFIG_OPTIONAL_INTS = ("head_dim", "max_position_embeddings")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_config(file: Path, what: str) -> dict:
    """A checkpoint's config.json as a dict; unreadable or not an object: a DFlashError naming the file."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DFlashError(f"The {what} {file} is not valid JSON ({error}); restore it from the checkpoint it came "
                          "from.") from None
    if not isinstance(raw, dict):
        raise DFlashError(f"The {what} {file} is not a JSON object; restore it from the checkpoint it came from.")
    return raw


FULL_ATTENTION = "full_attention"
ONLY_FULL_ATTENTION = ("the DFlash draft implements full attention only (every layer attends to all context and "
                       "block positions), so a sliding-window draft would run silently wrong")


def check_full_attention(raw: dict, config_file: Path) -> None:
    """A draft config that asks for anything but full attention in any layer (`layer_types`, or
    `use_sliding_window` with a window shorter than the positions) is refused, file and key named."""
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        if not (isinstance(layer_types, list) and all(isinstance(t, str) for t in layer_types)):
            raise DFlashError(f"Draft config {config_file}: 'layer_types' must be a list of strings (every entry "
                              f"{FULL_ATTENTION!r}), got {layer_types!r}.")
        other = [(i, t) for i, t in enumerate(layer_types) if t != FULL_ATTENTION]
        if other:
            index, kind = other[0]
            raise DFlashError(f"Draft config {config_file}: 'layer_types' has {kind!r} at layer {index} "
                              f"({len(other)} of {len(layer_types)} layers not {FULL_ATTENTION!r}); "
                              f"{ONLY_FULL_ATTENTION}. Use a draft whose layer_types are all {FULL_ATTENTION!r}.")
    use_window, window = raw.get("use_sliding_window"), raw.get("sliding_window")
    if use_window is not None and not isinstance(use_window, bool):
        raise DFlashError(f"Draft config {config_file}: 'use_sliding_window' must be true or false, got "
                          f"{use_window!r}.")
    if window is not None and not (_is_int(window) and window >= 1):
        raise DFlashError(f"Draft config {config_file}: 'sliding_window' must be an integer >= 1 (or null), got "
                          f"{window!r}.")
    positions = raw.get("max_position_embeddings") or getattr(Qwen3Config, "max_position_embeddings", 32768)
    if use_window and window is not None and window < positions:
        raise DFlashError(f"Draft config {config_file}: 'use_sliding_window' is true with 'sliding_window' "
                          f"{window} < max_position_embeddings {positions}; {ONLY_FULL_ATTENTION}. Set "
                          "use_sliding_window to false (z-lab drafts: false, sliding_window null).")


def load_draft_config(path: Path) -> Qwen3Config:
    """The draft's config.json, checked against the fields the draft reads (type and range, file and key named)
    before transformers sees it."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DFlashError(f"No config.json in draft directory {path}.")
    raw = read_config(config_file, "draft config")
    if is_speculators(raw):  # vLLM's speculators format: the same model, other field names (dflash.speculators)
        raw = to_zlab_config(raw, config_file)

    def bad(key, expected):
        return DFlashError(f"Draft config {config_file}: '{key}' must be {expected}, got {raw.get(key)!r}.")
    for key in ("block_size", "num_target_layers"):
        if key not in raw:
            raise DFlashError(f"Draft config {config_file} has no '{key}'; it is not a DFlash draft checkpoint.")
    for key in DRAFT_CONFIG_INTS:
        if not (_is_int(raw.get(key)) and raw[key] >= 1):
            raise bad(key, "an integer >= 1")
    for key in DRAFT_CONFIG_OPTIONAL_INTS:
        if raw.get(key) is not None and not (_is_int(raw[key]) and raw[key] >= 1):
            raise bad(key, "an integer >= 1 (or absent)")
    eps = raw.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise bad("rms_norm_eps", "a number in (0, 1)")
    if raw["num_attention_heads"] % raw["num_key_value_heads"]:
        raise bad("num_key_value_heads", f"a divisor of num_attention_heads ({raw['num_attention_heads']})")
    check_full_attention(raw, config_file)
    extra = raw.get("dflash_config") or {}
    if not isinstance(extra, dict):
        raise bad("dflash_config", "an object with target_layer_ids and mask_token_id")
    layer_ids, mask = extra.get("target_layer_ids"), extra.get("mask_token_id")
    if layer_ids is not None and not (isinstance(layer_ids, list) and layer_ids and all(_is_int(i) for i in layer_ids)):
        raise DFlashError(f"Draft config {config_file}: 'dflash_config.target_layer_ids' must be a non-empty list of "
                          f"integers, got {layer_ids!r}.")
    if mask is not None and not _is_int(mask):
        raise DFlashError(f"Draft config {config_file}: 'dflash_config.mask_token_id' must be an integer, got "
                          f"{mask!r}.")
    try:
        return Qwen3Config.from_dict(raw)
    except Exception as error:  # transformers' own field validation (several exception types)
        raise DFlashError(f"Draft config {config_file} is not a valid Qwen3 config: "
                          f"{str(error).strip().splitlines()[0]}") from None


def make_draft_config(target_config, *, num_layers: int, block_size: int, mask_token_id: int,
                      target_layer_ids: list[int] | None = None, **overrides) -> Qwen3Config:
    """A draft config matching a target (hidden size, heads, RoPE, vocab) with the DFlash extra keys."""
    text = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    num_target_layers = text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rope = getattr(text, "rope_parameters", None) or {"rope_type": "default",
                                                      "rope_theta": getattr(text, "rope_theta", 10000.0)}
    fields = dict(
        hidden_size=text.hidden_size, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, head_dim=head_dim,
        intermediate_size=text.intermediate_size, rms_norm_eps=text.rms_norm_eps, vocab_size=text.vocab_size,
        max_position_embeddings=text.max_position_embeddings,
        # both spellings: transformers 5.x reads rope_parameters, 4.57 reads rope_theta/rope_scaling
        rope_parameters=dict(rope), rope_theta=rope.get("rope_theta", 10000.0),
        num_hidden_layers=num_layers, attention_bias=False, tie_word_embeddings=False,
        block_size=block_size, num_target_layers=num_target_layers,
        dflash_config={"target_layer_ids": list(target_layer_ids or build_target_layer_ids(num_target_layers,
                                                                                            num_layers)),
                       "mask_token_id": mask_token_id},
    )
    fields.update(overrides)
    return Qwen3Config(**fields)
