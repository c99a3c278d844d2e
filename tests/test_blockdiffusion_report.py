"""The Fast-dLLM v2 summary table (dflash.blockdiffusion.report.fastdllm_table) and plot from hand-made records: the seed's
reuse table against the k = 1 control with the exact McNemar p, the dual cache's agreement with the exact
decoder, and log-likelihood reuse cases shown as not applicable, never as accuracies."""
from scipy.stats import binomtest

from dflash.blockdiffusion.report import fastdllm_table, plot_accuracy_vs_speed


def record(case_id, params, correct, digests=None, ratios=(1.5, 1.6), reuse=None):
    n = len(correct)
    return {"id": f"fastdllm/test_fastdllm_decoding[tiny-{case_id}]", "ablation_family": "fastdllm", "experiment": "fastdllm",
            "params": {"task": "generative", "threshold": 0.9, "sub_block_size": 8, "batch": 1, "reuse_k": None,
                       "subset": "middle", "mode": "output", **params},
            "metrics": {"per_query": {"qids": [f"q{i}" for i in range(n)], "correct": correct, "cost": [0.6] * n},
                        "tokens_per_s": 600.0, "ar_tokens_per_s": 400.0, "total_seconds": 2.0,
                        "speed_ratio_samples": list(ratios), "reuse": reuse,
                        "outputs": {"tokens": [30] * n, "forwards_per_token": [0.4] * n, "repetition": [0.05] * n,
                                    "agrees_with_ar": [1] * n, "output_digest": digests or ["a"] * n}},
            "gates": [], "verdict": "pass"}


def test_table_pairs_reuse_with_its_control_and_dual_with_the_exact_decoder(tmp_path):
    control = record("k1-control", {"cache": "dual", "reuse_k": 1}, [1, 1, 1, 1, 0, 1])
    reused = record("k2-first-output", {"cache": "dual", "reuse_k": 2, "subset": "first"}, [0, 0, 1, 1, 0, 1],
                    reuse={"staleness": {"1": 0.53, "2": 1e-8}, "seconds_per_computed_layer_call": 6e-4,
                           "seconds_per_reused_layer_call": 7e-6, "layer_calls_skipped": 10})
    residual = record("k2-first-residual", {"cache": "dual", "reuse_k": 2, "subset": "first", "mode": "residual"},
                      [1, 0, 1, 1, 1, 1])
    prefix = record("t0.9-prefix", {"cache": "prefix"}, [1] * 6, digests=list("abcdef"))
    dual = record("t0.9-dual", {"cache": "dual"}, [1] * 6, digests=list("abcxyz"))
    na = {"id": "fastdllm/test_fastdllm_loglik_reuse_not_applicable[tiny-loglik-k2-first]", "ablation_family": "fastdllm", "experiment": "fastdllm",
          "params": {"task": "loglik", "applicable": False}, "metrics": {"not_applicable": "no denoising steps"}}
    text = fastdllm_table([control, reused, residual, prefix, dual, na])
    p = binomtest(2, 2, 0.5).pvalue
    assert f"-0.333 (-2/+0, p {p:.2g})" in text  # k2 output against the control
    assert "+0.333 (-0/+2" in text  # residual against output at the same k and subset
    assert "3/6 (50.0%)" in text  # the dual cache's outputs identical to the prefix cache's on 3 of 6
    assert "L1 0.53, L2 1e-08" in text
    line = next(row for row in text.splitlines() if "loglik-k2-first" in row)
    assert line.count("not applicable") == 2 and "0." not in line
    assert "Not applicable: no denoising steps." in text
    assert plot_accuracy_vs_speed([control, reused], tmp_path / "plot.png").stat().st_size > 0
