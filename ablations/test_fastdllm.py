"""Fast-dLLM v2 on the tiny block-diffusion model (converted from ladder rung l4): threshold x cache, sub-block
size, layer reuse k x subset x mode (against the k = 1 control), batch size, and log-likelihood scoring. Each case
decodes the same held-out queries and, interleaved in the same process, the AR base; accuracy (exact McNemar) and
speed ratio to AR (paired, one ratio per batch group) are gated against baselines/<profile>/fastdllm.json.
Fast-dLLM v2 is not lossless: quality is measured, never assumed."""
from dataclasses import dataclass

import pytest

from dflash.blockdiffusion.ablation import NOT_APPLICABLE, Settings
from dflash.harness.ablation_cases import KnobCase, as_params


@dataclass(frozen=True)
class Decoding(Settings, KnobCase):
    """A generative case: its id and the decoder settings (dflash.blockdiffusion.ablation.Settings)."""


@dataclass(frozen=True)
class Scoring(KnobCase):
    """A log-likelihood case (multiple choice); reuse_k > 1 is declared not applicable."""
    reuse_k: int | None = None
    subset: str = "middle"
    mode: str = "output"


THRESHOLD_CACHE = [Decoding(f"t{t:g}-{cache}", threshold=t, cache=cache)
                   for t in (0.5, 0.7, 0.9, 1.0) for cache in ("none", "prefix", "dual")]
SUB_BLOCK = [Decoding(f"sub4-{cache}", sub_block_size=4, cache=cache) for cache in ("prefix", "dual")]
# k = 1 computes every layer whatever the subset or mode (tests/test_blockdiffusion_reuse.py): one control
REUSE = [Decoding("k1-control", reuse_k=1)] + [
    Decoding(f"k{k}-{subset}-{mode}", reuse_k=k, subset=subset, mode=mode)
    for k in (2, 3) for subset in ("first", "middle", "last") for mode in ("output", "residual")]
BATCH = [Decoding(f"batch4-{cache}", batch=4, cache=cache) for cache in ("prefix", "dual")]
GPU_QUERIES = 40  # per task of the GPU profile (GSM8K, HumanEval, MMLU)
SCORING = [Scoring("loglik")] + [Scoring(f"loglik-k{k}-{subset}", reuse_k=k, subset=subset)
                                 for k in (2, 3) for subset in ("first", "middle", "last")]


@pytest.mark.ablation("fastdllm")
@pytest.mark.parametrize("settings", as_params(THRESHOLD_CACHE + SUB_BLOCK + REUSE + BATCH))
def test_fastdllm_decoding(fastdllm_case, settings):
    params, metrics, gates = fastdllm_case.measure_decoding(settings)
    fastdllm_case.finish(params, metrics, gates)


@pytest.mark.ablation("fastdllm")
@pytest.mark.parametrize("settings", as_params(SCORING[:1]))
def test_fastdllm_loglik(fastdllm_case, settings):
    params, metrics, gates = fastdllm_case.measure_scoring(settings)
    fastdllm_case.finish(params, metrics, gates)


@pytest.mark.ablation("fastdllm", gated=False)
@pytest.mark.parametrize("settings", as_params(SCORING[1:]))
def test_fastdllm_loglik_reuse_not_applicable(fastdllm_case, settings):
    """Reported as not applicable, never as a table of identical accuracies (the research notes' MMLU table)."""
    params, metrics, gates = fastdllm_case.not_applicable(settings, NOT_APPLICABLE)
    fastdllm_case.finish(params, metrics, gates)


@pytest.mark.gpu
@pytest.mark.parametrize("settings", as_params(THRESHOLD_CACHE + SUB_BLOCK + REUSE + BATCH + SCORING[:1]))
def test_gpu_fastdllm_v2_7b(settings, record_property):
    """gpu-fastdllm-v2-7b (Fast_dLLM_v2_7B vs Qwen2.5-7B-Instruct, bf16, CUDA; GSM8K 0-shot boxed, HumanEval
    pass@1 in a subprocess, MMLU 5-shot by log-likelihood): the same cases through the same measurement, one line
    of skip reason where CUDA, the weights or the data are missing. Reported, not gated: no GPU baseline yet."""
    from dflash.blockdiffusion.ablation import decoding_metrics, environment, scoring_metrics
    from dflash.profiles import get_block_diffusion_model as get_profile
    profile = get_profile("gpu-fastdllm-v2-7b")
    reason = profile.unavailable()
    if reason:
        pytest.skip(reason)
    env = environment(profile, count=GPU_QUERIES)
    if isinstance(settings, Scoring):
        metrics = scoring_metrics(env)
    else:
        metrics, _ = decoding_metrics(env, settings, profile.max_new_tokens, "wall")
        assert all(r > 0 for r in metrics["speed_ratio_samples"])
    assert 0 <= metrics["accuracy"] <= 1
    record_property("fastdllm_gpu_metrics", {k: v for k, v in metrics.items() if k != "outputs"})
