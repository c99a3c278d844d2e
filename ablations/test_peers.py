"""Peer benchmark: DFlash against transformers greedy `generate`, transformers prompt-lookup decoding and this
project's target-only loop, on the same prompts in the same process, interleaved per prompt after a warm-up
(dflash.harness.peers). Meant for the `smol` profile (a real pretrained target on CPU):

    pytest ablations/ --profile smol -k peers --report

One row per target dtype (fp32, bf16): every mode of a row runs the same target weights; the draft is bf16 in
both (the profile's draft dtype). Per mode: tokens/s, ratio to transformers greedy, tau, outputs identical to transformers greedy; per DFlash mode
the cost-model ceiling tau * T(1) / (T(verify b) + T(draft b)) from the measured forward times and the efficiency
(realized ratio / ceiling). Every project mode must reproduce transformers greedy output (float ties excepted).
"""
import pytest

from dflash.harness.measure import rate
from dflash.harness.peers import HF_GREEDY, in_dtype, peer_metrics, peer_modes, run_peers


@pytest.mark.ablation("peers", ci_datasets=(), gated=False)  # slow on every dataset: a measurement, not a gate
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"], ids=["fp32", "bf16"])
def test_peers(case, dtype):
    profile = case.profile
    if profile.name != "smol":
        pytest.skip("the peer benchmark runs on a real pretrained target: pytest ablations --profile smol -k peers")
    models = case.models
    target, draft = in_dtype(models.target, models.draft, dtype)
    prompts = case.prompts(profile.prompts)
    candidates = tuple(sorted({2, *profile.scheduler_candidates}))
    modes = peer_modes(target, draft, block_sizes=(4, 8, 16), scheduler_candidates=candidates)
    runs = run_peers(modes, prompts, max_new_tokens=profile.max_new_tokens, stop_ids=models.stop_ids)
    metrics = peer_metrics(runs, prompts, target)
    best = metrics["best_dflash"]
    hf = runs[HF_GREEDY]
    metrics.update(
        per_prompt_tau=metrics["modes"][best]["per_prompt_tau"],
        speedup_samples=[rate(b) / rate(h) for b, h in zip(runs[best], hf)],
        exact_match=[b.output_ids == h.output_ids for b, h in zip(runs[best], hf)],
        float_ties=metrics["modes"][best]["float_ties"])
    params = {"prompts": len(prompts), "max_new_tokens": profile.max_new_tokens, "target_dtype": dtype,
              "draft_dtype": str(next(draft.parameters()).dtype).removeprefix("torch.")}
    record = case.finish(params, metrics, gates=[])
    broken = {name: row["mismatched_prompts"] for name, row in record["metrics"]["modes"].items()
              if name != "hf-prompt-lookup" and set(map(str, row["mismatched_prompts"])) - set(row["float_ties"])}
    assert not broken, f"project modes differ from transformers greedy (not float ties): {broken}"
