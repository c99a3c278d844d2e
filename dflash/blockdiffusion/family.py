"""The Fast-dLLM v2 ablation family: block-diffusion decoding settings (threshold x cache, sub-block, layer
reuse, batch, log-likelihood scoring) against the AR base, gated on per-query accuracy and the speed ratio to AR,
on the profiles that name a block-diffusion model (dflash.profiles). Its cases run in a pytest session of their
own in `make test` (session "fastdllm"): a timed case shares the cores only with the cases it shared them with
when its baselines were recorded."""
from __future__ import annotations

from ..harness.family import FamilySpec, profiles_naming, register_family
from .ablation import FastDLLMCase
from .report import fastdllm_plots, fastdllm_table

FASTDLLM = register_family(FamilySpec(
    name="fastdllm", display_name="Fast-dLLM v2", fixture="fastdllm_case", params=profiles_naming("block_diffusion"),
    make_case=FastDLLMCase.on_part("block_diffusion"), renderers={"fastdllm": fastdllm_table},
    titles={"fastdllm": "Fast-dLLM v2"}, plots=fastdllm_plots, baseline_kind="outcomes", session="fastdllm",
    description="block-diffusion LM decoding (not lossless) against its AR base"))
