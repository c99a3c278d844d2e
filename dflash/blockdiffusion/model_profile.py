"""A Fast-dLLM v2 profile: which block-diffusion model, AR base (for the speed comparison), device, dtype,
decoding constants and tasks a run uses. The profiles themselves are in dflash.profiles:

* `tiny`: the package's converted tiny model (dflash/models/block-diffusion) on the CPU in float32, block 32; its
  mask id and stop ids are read from the model directory; AR base: ladder rung l4, which it is converted from.
* `gpu-fastdllm-v2-7b`: Efficient-Large-Model/Fast_dLLM_v2_7B in bf16 on CUDA (mask 151665, stop 151645 =
  <|im_end|>, B1), AR base Qwen/Qwen2.5-7B-Instruct, tasks GSM8K 0-shot boxed, MMLU 5-shot, HumanEval pass@1.
Weights come from the local directory or the local Hugging Face cache, never downloaded; `unavailable()` says in
one line why a profile cannot run here. Models load with trust_remote_code=False.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DFlashError
from ..loading import DTYPES, check_device, load_target, load_tokenizer, quiet, resolve
from .convert import DEFAULT_OUT as TINY_MODEL
from .tasks import task_unavailable


@dataclass(frozen=True)
class Loaded:
    """A loaded block-diffusion model with the ids its decoding and scoring need."""
    model: object
    tokenizer: object
    mask_id: int
    stop_ids: tuple[int, ...]
    eos_id: int  # what log-likelihood scoring puts after the continuation (the tokenizer's EOS, as upstream)
    block_size: int


@dataclass(frozen=True)
class FastDLLMProfile:
    name: str
    description: str
    model: str  # directory or hub id
    ar_base: str  # the autoregressive model the speed is compared with
    device: str
    dtype: str
    tasks: tuple[str, ...]
    max_new_tokens: int
    block_size: int = 32
    small_block_size: int = 8
    threshold: float = 0.9  # the harness's; upstream's GSM8K / MATH / IFEval runs use 1 (B2, B3)
    mask_id: int | None = None  # None: read from the model directory
    stop_ids: tuple[int, ...] | None = None  # None: read from the model directory

    def unavailable(self) -> str | None:
        """Why this profile cannot run here (one line), or None."""
        import torch
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            return f"profile {self.name} needs CUDA, which this machine does not have"
        for which, model in (("model", self.model), ("AR base", self.ar_base)):
            if (reason := _weights_missing(model)) is not None:
                return f"profile {self.name}: {which} {reason}"
        for task in self.tasks:
            if (reason := task_unavailable(task)) is not None:
                return f"profile {self.name}: {reason}"
        return None

    def load(self) -> Loaded:
        """The block-diffusion model (eval mode) and its tokenizer, mask id, stop ids and EOS. Ids the profile
        does not fix come from the model directory: its manifest.json (`dflash train block-diffusion`), else
        config.json, the generation config and the tokenizer."""
        path = resolve(self.model, "target")
        config = json.loads((path / "config.json").read_text())
        manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").is_file() else {}
        trained = manifest.get("block_size", config.get("bd_size", self.block_size))
        if trained != self.block_size:
            raise DFlashError(f"{path} was trained with block size {trained}, profile {self.name} decodes with "
                              f"{self.block_size}.")
        if config.get("model_type") == "Fast_dLLM_Qwen":
            model = _load_qwen2(path, config, self.device, self.dtype)
        else:
            model = load_target(str(path), device=self.device, dtype=self.dtype)
        tokenizer = load_tokenizer(str(path))
        mask_id = next((i for i in (self.mask_id, manifest.get("mask_token_id"), config.get("mask_token_id"),
                                    tokenizer.mask_token_id) if i is not None), None)
        stop_ids = (self.stop_ids or _ids(manifest.get("stop_token_ids")) or _ids(model.generation_config.eos_token_id)
                    or _ids(tokenizer.eos_token_id))
        if mask_id is None or not stop_ids or tokenizer.eos_token_id is None:
            raise DFlashError(f"{path} names no mask token (manifest or config mask_token_id, or the tokenizer's "
                              "mask_token) or no EOS (tokenizer eos_token): a block-diffusion model needs both.")
        return Loaded(model, tokenizer, int(mask_id), stop_ids, int(tokenizer.eos_token_id), self.block_size)

    def load_ar_base(self):
        return load_target(self.ar_base, device=self.device, dtype=self.dtype), load_tokenizer(self.ar_base)


def _ids(value) -> tuple[int, ...]:
    return () if value is None else tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def _weights_missing(model: str) -> str | None:
    try:
        path = resolve(model, "target")
    except DFlashError:
        if Path(model) == TINY_MODEL:
            return f"{model} is missing: build it with `dflash train block-diffusion`"
        if Path(model).is_absolute():
            return f"{model} is missing (a model directory with config.json and *.safetensors weights)"
        return (f"weights {model} are not in the local Hugging Face cache (run `hf download {model}` where there is "
                "network)")
    return None if any(path.glob("*.safetensors")) else f"{path} has no *.safetensors weights"


def _load_qwen2(path: Path, config: dict, device: str, dtype: str):
    """Fast_dLLM_v2_7B's config names its remote-code classes (model_type "Fast_dLLM_Qwen", architecture
    Fast_dLLM_QwenForCausalLM, an auto_map into its own modeling.py). Its weights are a plain Qwen2.5 checkpoint
    with the same tensor names, and the block-wise attention that remote code adds is given here as 4-D masks,
    so the config is mapped to the standard Qwen2Config and the model loads as Qwen2ForCausalLM without remote
    code."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    check_device(device)
    qwen2 = Qwen2Config.from_dict({k: v for k, v in config.items()
                                   if k not in ("model_type", "architectures", "auto_map")})
    try:
        with quiet():
            model, info = AutoModelForCausalLM.from_pretrained(str(path), config=qwen2, dtype=DTYPES[dtype],
                                                               local_files_only=True, trust_remote_code=False,
                                                               use_safetensors=True, output_loading_info=True)
    except Exception as error:  # config, weights and architecture errors come as several types
        message = str(error).strip().splitlines()
        raise DFlashError(f"{path} could not be loaded as Qwen2ForCausalLM ({type(error).__name__}: "
                          f"{message[0] if message else 'no message'}).") from None
    if info.get("missing_keys"):
        raise DFlashError(f"{path} lacks tensors Qwen2ForCausalLM needs ({sorted(info['missing_keys'])[:5]}); "
                          "transformers would fill them with random values. Restore the full checkpoint.")
    return model.to(device).eval()
