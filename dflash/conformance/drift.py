"""Planted drifts the conformance gate must catch, modelled on real port bugs (docs/vllm.md):
- `shifted_layer_draft`: a copy of a draft whose `target_layer_ids` are shifted by one (a target layer-index
  offset, as in vllm#42704): the draft reads the wrong target features, its acceptance falls;
- `too_few_tokens`: server settings with fewer speculative tokens than the draft's block size - 1 (an off-by-one
  in `speculative_tokens`, speculators#456): positions past k are never drafted.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..errors import DFlashError


def shifted_layer_draft(source, out, *, shift: int = 1) -> Path:
    """Copy draft checkpoint `source` (a known name or directory, z-lab or speculators format) to `out`, z-lab
    format, with every target layer id moved by `shift`. Refused when a shifted id would leave the target's
    layers (the loader would refuse the pair, which is a different failure from a silent drift)."""
    from ..loading import load_draft
    draft = load_draft(source)
    shifted = [i + shift for i in draft.target_layer_ids]
    if min(shifted) < 0 or max(shifted) >= draft.num_target_layers:
        raise DFlashError(f"Shifting target_layer_ids {draft.target_layer_ids} by {shift} leaves the target's "
                          f"{draft.num_target_layers} layers; pick another shift.")
    draft.save_pretrained(out)
    config_file = Path(out) / "config.json"
    config = json.loads(config_file.read_text())
    config["dflash_config"]["target_layer_ids"] = shifted
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out)


def too_few_tokens(settings, k: int):
    """The same vLLM server settings with num_speculative_tokens = k (fewer than the draft's block size - 1)."""
    if settings.num_speculative_tokens is not None and k >= settings.num_speculative_tokens:
        raise DFlashError(f"too_few_tokens plants fewer speculative tokens: {k} is not below "
                          f"{settings.num_speculative_tokens}.")
    return replace(settings, num_speculative_tokens=k)
