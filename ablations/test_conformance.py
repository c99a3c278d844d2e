"""The conformance family (dflash/conformance/family.py): each backend (the engine itself; vLLM where .venv-vllm
exists, `make vllm`) against the reference engine on the profile's prompts, per block size; the case fails with
the first diverging position named. Run: pytest ablations/test_conformance.py --profile tiny [--report]."""
import pytest


@pytest.mark.ablation("conformance", gated=False)
def test_conformance(conformance_case):
    metrics, gates = conformance_case.measure()
    conformance_case.finish(conformance_case.params, metrics, gates)
