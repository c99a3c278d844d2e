"""Profiles: what an ablation run (`--profile NAME`) measures, in one table. A profile names its decode pair
(target, draft, device, dtype, datasets and sample counts) and, where it has them, the ladder its adaptive
cascades climb and the block-diffusion model its Fast-dLLM v2 cases decode; each family runs on the profiles
that name its part. Family-only profiles (a GPU ladder, the 7B block-diffusion model) are in LADDERS and
BLOCK_DIFFUSION_MODELS for their commands and GPU tests.

`tiny` (default) runs the embedded models on the CPU. `gpu-qwen3-4b` / `gpu-qwen3-8b` run the real checkpoints
in bf16 on CUDA with the datasets and prompt templates of the research repo (spec section 4, Qwen3's thinking
off), plus the same single-turn prompts with thinking on (`<dataset>-think`, dflash.datasets.GPU_THINKING_ON);
they are skipped with one line when CUDA, the weights or the datasets are not on the machine.
"""
from __future__ import annotations

from dataclasses import dataclass

from .blockdiffusion.convert import DEFAULT_OUT as TINY_BLOCK_DIFFUSION_MODEL
from .blockdiffusion.model_profile import FastDLLMProfile
from .blockdiffusion.tasks import GPU_TASKS, TINY_CHOICE_TASKS, TINY_GENERATIVE_TASKS
from .cascade.ladder import LADDER_DIR, RUNGS, Budget
from .cascade.ladder_profile import CascadeProfile
from .datasets import GPU_DATASETS, SMOL_DATASETS, TINY_DATASETS, DatasetSpec, dataset_unavailable_reason, hf_home
from .errors import DFlashError


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
    references: tuple[Reference, ...] = ()  # published figures, each for the cases it describes
    ci_cases: str | None = None  # regex of the case ids in the CI tier (None: the ablation markers decide)
    draft_dtype: str | None = None  # the draft's dtype when it differs from the target's (dflash.engine.draft_head)
    ladder: CascadeProfile | None = None  # the adaptive-cascades family's models and queries
    block_diffusion: FastDLLMProfile | None = None  # the Fast-dLLM v2 family's model, AR base and tasks

    def references_for(self, dataset: str, block_size, max_new_tokens, temperature=0.0, *,
                       thinking: bool = False) -> list[Reference]:
        return [r for r in self.references if r.matches(dataset, block_size, max_new_tokens, temperature, thinking)]

    def dataset(self, name: str) -> DatasetSpec:
        for spec in self.datasets:
            if spec.name == name:
                return spec
        raise DFlashError(f"Profile {self.name} has no dataset {name!r}; it has {[d.name for d in self.datasets]}.")


@dataclass(frozen=True)
class Reference:
    """A published figure for one kind of case: it is attached only to cases of the same dataset, block size,
    token budget, temperature and thinking mode, and shown next to the measured value in the report. Every
    figure here was measured with Qwen3's thinking off, so a thinking-on case never gets one."""
    dataset: str
    block_size: int
    max_new_tokens: int
    temperature: float
    tau: float
    tpot_speedup: float  # target-only TPOT / DFlash TPOT (the research's "decoding speedup")
    hardware: str
    source: str
    thinking: bool = False  # the chat template's thinking mode the figure was measured with

    def matches(self, dataset: str, block_size, max_new_tokens, temperature, thinking: bool = False) -> bool:
        return (self.dataset, self.block_size, self.max_new_tokens, self.temperature, self.thinking) == (
            dataset, block_size, max_new_tokens, temperature, thinking)


RESULTS_MD = ("AtharvRN/dflash results.md sections 1-2 (Qwen3-4B + z-lab/Qwen3-4B-DFlash-b16, bf16, greedy, 30 "
              "AIME25 samples; shared/reference/DFLASH_SEED_REPO_SPEC.md section 9)")
PAPER = ("DFlash README/paper headline table (transformers backend, thinking off, temperature 0; "
         "shared/reference/ANCHORS_ALGORITHMS.md A2)")


def _paper(model: str, figures: dict) -> tuple[Reference, ...]:
    return tuple(Reference(dataset, 16, 2048, 0.0, tau, speedup, "B200", f"{PAPER}, DFlash {model}")
                 for dataset, (speedup, tau) in figures.items())


QWEN3_4B_REFERENCES = (
    Reference("aime25", 16, 2048, 0.0, 7.47, 5.86, "A100 80GB PCIe", RESULTS_MD),
    *_paper("Qwen3-4B", {"aime25": (5.79, 7.28), "gsm8k": (5.17, 6.50), "humaneval": (5.26, 6.63),
                         "mt-bench": (2.87, 4.35)}),
)
QWEN3_8B_REFERENCES = _paper("Qwen3-8B", {"aime25": (5.85, 7.31), "gsm8k": (5.20, 6.55), "humaneval": (5.20, 6.55),
                                          "mt-bench": (2.79, 4.25)})
# The GPU CI tier (`-m "gpu and not slow"`): the block-size sweep at 8 and 16 on GSM8K and HumanEval, thinking
# off; every other GPU case is the full tier. Estimated from the research's A100 figures (target-only TPOT 43.1 ms,
# bs16 7.3 ms, 30 prompts x 512 tokens: about 11 min of target-only and 2-3 min of DFlash per case): about 55
# GPU-minutes. The thinking-on cases (`<dataset>-think`) are full tier only: the thinking flag changes the prompt
# ids and nothing the engine does, so an engine regression shows in the thinking-off cases already, and what is
# particular to thinking (the template, the flag reaching it, the record) is tested on CPU with the stand-ins
# (tests/test_gpu_profile_data.py, tests/test_gpu_rehearsal.py); adding them would take the tier past its hour.
# The regex leaves them out by construction: "-gsm8k-think-bs8" does not match "-(gsm8k|humaneval)-bs".
GPU_CI_CASES = r"^block_size/test_block_size\[[^\]]*-(gsm8k|humaneval)-bs(8|16)\]$"

LADDERS = {p.name: p for p in [
    CascadeProfile("tiny", "the embedded ladder (four tiny Qwen3 models) on held-out graded arithmetic, two "
                   "families (story, expression)", tuple((r.name, str(LADDER_DIR / r.name)) for r in RUNGS),
                   Budget().n_heldout, Budget().max_new_tokens),
    CascadeProfile("gpu-cascade-qwen3", "Qwen3-0.6B / 1.7B / 4B / 8B (thinking off, bf16) on GSM8K test",
                   tuple((m.split("/")[-1], m) for m in ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B",
                                                         "Qwen/Qwen3-8B")),
                   1319, 512, device="cuda", dtype="bfloat16", dataset=next(d for d in GPU_DATASETS
                                                                            if d.name == "gsm8k")),
]}
BLOCK_DIFFUSION_MODELS = {p.name: p for p in [
    FastDLLMProfile("tiny", "the package's tiny block-diffusion model (converted from ladder rung l4) on the "
                    "graded arithmetic tasks, CPU, float32", str(TINY_BLOCK_DIFFUSION_MODEL), str(LADDER_DIR / "l4"),
                    "cpu", "float32", TINY_CHOICE_TASKS + TINY_GENERATIVE_TASKS,
                    max_new_tokens=Budget().max_new_tokens),
    FastDLLMProfile("gpu-fastdllm-v2-7b", "Fast-dLLM v2 7B (bf16, CUDA) vs Qwen2.5-7B-Instruct on GSM8K 0-shot "
                    "boxed, MMLU 5-shot and HumanEval pass@1", "Efficient-Large-Model/Fast_dLLM_v2_7B",
                    "Qwen/Qwen2.5-7B-Instruct", "cuda", "bfloat16", GPU_TASKS, max_new_tokens=2048,
                    mask_id=151665, stop_ids=(151645,)),
]}

PROFILES = {p.name: p for p in [
    Profile("tiny", "tiny", "tiny", "cpu", "float32", TINY_DATASETS, prompts=12, prompts_cap=48,
            max_new_tokens=64, full_length_max_new_tokens=160, scheduler_candidates=(2, 4, 8, 16),
            ladder=LADDERS["tiny"], block_diffusion=BLOCK_DIFFUSION_MODELS["tiny"]),
    # smol: a bf16 draft beside the fp32 target (a CPU's small-row fp32 GEMMs made the fp32 draft step 1/4 of a
    # cycle); 20 prompts per dataset, 64 new tokens: the peer benchmark's 7 modes took 38 min per dtype.
    Profile("smol", "smol", "smol", "cpu", "float32", SMOL_DATASETS, prompts=20, prompts_cap=20,
            max_new_tokens=64, full_length_max_new_tokens=256, scheduler_candidates=(4, 8, 16),
            draft_dtype="bfloat16"),
    Profile("gpu-qwen3-4b", "Qwen/Qwen3-4B", "z-lab/Qwen3-4B-DFlash-b16", "cuda", "bfloat16", GPU_DATASETS,
            prompts=30, prompts_cap=60, max_new_tokens=512, full_length_max_new_tokens=2048, needs_cuda=True,
            clock="wall", references=QWEN3_4B_REFERENCES, ci_cases=GPU_CI_CASES),
    Profile("gpu-qwen3-8b", "Qwen/Qwen3-8B", "z-lab/Qwen3-8B-DFlash-b16", "cuda", "bfloat16", GPU_DATASETS,
            prompts=30, prompts_cap=60, max_new_tokens=512, full_length_max_new_tokens=2048, needs_cuda=True,
            clock="wall", references=QWEN3_8B_REFERENCES, ci_cases=GPU_CI_CASES),
]}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise DFlashError(f"Unknown profile {name!r}; choose one of {', '.join(PROFILES)} (--profile NAME).")
    return PROFILES[name]


def get_ladder(name: str) -> CascadeProfile:
    if name not in LADDERS:
        raise DFlashError(f"Unknown cascade profile {name!r}; choose one of {', '.join(LADDERS)}.")
    return LADDERS[name]


def get_block_diffusion_model(name: str) -> FastDLLMProfile:
    if name not in BLOCK_DIFFUSION_MODELS:
        raise DFlashError(f"Unknown Fast-dLLM profile {name!r}; choose one of {', '.join(BLOCK_DIFFUSION_MODELS)}.")
    return BLOCK_DIFFUSION_MODELS[name]


def unavailable_reason(profile: Profile, datasets=None) -> str | None:
    """Why this profile cannot run here (one line), or None. `datasets`: names of the profile's datasets that
    must be present too (None: all of them; () or []: none), so a case skips with one line rather than failing
    on a missing dataset."""
    import torch

    from .loading import resolve
    if profile.target == "smol":
        from .smol import missing_dependency
        if (reason := missing_dependency()) is not None:
            return f"profile smol: {reason}"
    if profile.needs_cuda and not torch.cuda.is_available():
        return f"profile {profile.name} needs CUDA, which this machine does not have"
    for which in ("target", "draft"):
        try:
            resolve(getattr(profile, which), which)
        except DFlashError:
            return (f"profile {profile.name}: {which} weights {getattr(profile, which)} are not in the local Hugging "
                    f"Face cache (run `hf download {getattr(profile, which)}` where there is network; the cache "
                    f"must be under $HF_HOME, here {hf_home()})")
    names = [d.name for d in profile.datasets] if datasets is None else list(datasets)
    for name in names:
        if (reason := dataset_unavailable_reason(profile.dataset(name))) is not None:
            return f"profile {profile.name}: {reason}"
    return None
