"""The conformance family's registration, parameters, table and plot, from hand-made records (the cases
themselves run in ablations/test_conformance.py: the engine against itself always, vLLM where .venv-vllm is)."""
import json

import pytest

from dflash.conformance.family import CONFORMANCE, conformance_params, conformance_plots, conformance_table
from dflash.harness.family import get_family, sessions


def record(backend, block, passed=True, failures=()):
    return json.loads(json.dumps({
        "id": f"conformance/test_conformance[tiny-{backend}-bs{block}]", "ablation_family": "conformance",
        "experiment": "conformance", "status": "done",
        "params": {"backend": backend, "block_size": block, "max_new_tokens": 48, "mode": "paired"},
        "metrics": {"conformance_passed": passed, "failures": list(failures), "prompts": 6, "outputs_identical": 6,
                    "counts_equal": 5, "steps_compared": 148, "steps_diverging": 1,
                    "first_diverging_position": None if passed else 4, "tau_reference": [1.9, 2.0],
                    "tau_backend": [1.9, 2.04], "per_position_reference": [[49, 153], [27, 153], [18, 153]],
                    "per_position_backend": [[49, 152], [28, 152], [0, 0]], "speedup_samples": [0.9, 1.1]}}))


def test_registered_in_a_session_of_its_own():
    import dflash.plugin  # noqa: F401  (registers the package's families)
    assert get_family("conformance") is CONFORMANCE and CONFORMANCE.fixture == "conformance_case"
    assert "conformance" in sessions()


def test_params_cover_backends_and_block_sizes_on_the_cpu_profile():
    params = conformance_params(["tiny", "gpu-qwen3-8b"])
    assert [p.id for p in params] == ["tiny-engine-bs8", "tiny-engine-bs16", "tiny-vllm-bs8", "tiny-vllm-bs16"]
    assert all(any(m.name == "vllm" for m in p.marks) == (p.value.backend == "vllm") for p in params)


def test_table_and_plot(tmp_path):
    records = [record("vllm", 8), record("vllm", 16, False, ["per-position acceptance diverges first at draft "
                                                              "position 4: ..."]), record("engine", 8)]
    text = conformance_table(records)
    assert "| tiny-vllm-bs8 | vllm | 8 | 6/6 | 5/6 | 1/148 | 1.950 | 1.970 | - | 0.99x (not gated) | PASS |" in text
    assert "FAIL: per-position acceptance diverges first at draft position 4" in text
    assert text.index("tiny-engine-bs8") < text.index("tiny-vllm-bs8")
    paths = conformance_plots(records, tmp_path, [])
    assert [p.name for p in paths] == ["conformance_tiny-vllm-bs8.png", "conformance_tiny-vllm-bs16.png",
                                       "conformance_tiny-engine-bs8.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
