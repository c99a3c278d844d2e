"""The testbed key: what sets relative speed names the machine, so throughput is gated only like with like."""
import copy

from dflash import provenance
from dflash.provenance import collect_fingerprint, cpu_facts

CPUINFO = """processor	: 0
vendor_id	: GenuineIntel
cpu family	: 6
model		: 207
model name	: Intel(R) Xeon(R) Processor
stepping	: 2

processor	: 1
vendor_id	: GenuineIntel
"""


def cpu_fingerprint(**cpu):
    base = {"vendor": "GenuineIntel", "family": "6", "model": "207", "stepping": "2",
            "model_name": "Intel(R) Xeon(R) Processor", "capability": "AVX512", "logical_cores": 2, "threads": 1}
    return {"cpu": {**base, **cpu}, "gpu": None}


def gpu_fingerprint(**gpu):
    base = {"name": "NVIDIA A100-SXM4-80GB", "memory_gib": 79, "capability": "8.0", "driver": "550.54.15",
            "cuda": "12.4", "cudnn": 90100}
    return {"cpu": cpu_fingerprint()["cpu"], "gpu": {**base, **gpu}}


def test_cpuinfo_is_read_from_the_first_processor():
    facts = cpu_facts(CPUINFO)
    assert (facts["vendor"], facts["family"], facts["model"], facts["stepping"]) == ("GenuineIntel", "6", "207", "2")


def test_the_same_machine_twice_gives_the_same_key():
    first, second = collect_fingerprint("tiny", None), collect_fingerprint("tiny", None)
    assert first["testbed"] == second["testbed"] and first["testbed"].startswith("cpu-")
    assert provenance.testbed_key(copy.deepcopy(first)) == first["testbed"]


def test_a_different_cpu_model_gives_another_key():
    keys = {provenance.testbed_key(cpu_fingerprint()), provenance.testbed_key(cpu_fingerprint(model="143")),
            provenance.testbed_key(cpu_fingerprint(stepping="8")), provenance.testbed_key(cpu_fingerprint(model_name="AMD EPYC 9R14")),
            provenance.testbed_key(cpu_fingerprint(capability="AVX2")), provenance.testbed_key(cpu_fingerprint(threads=2))}
    assert len(keys) == 6


def test_a_different_gpu_or_driver_gives_another_key():
    keys = {provenance.testbed_key(gpu_fingerprint()), provenance.testbed_key(gpu_fingerprint(name="NVIDIA A100-SXM4-40GB", memory_gib=39)),
            provenance.testbed_key(gpu_fingerprint(name="NVIDIA H100 80GB HBM3")), provenance.testbed_key(gpu_fingerprint(driver="560.1"))}
    assert len(keys) == 4
    assert provenance.testbed_key(gpu_fingerprint()) == provenance.testbed_key(gpu_fingerprint())
    assert provenance.testbed_key(gpu_fingerprint()) != provenance.testbed_key(cpu_fingerprint())  # a CPU run on a GPU machine


def test_an_ab_reference_that_cannot_be_checked_out_says_why_and_how():
    import pytest

    from dflash.harness.reference import ReferenceUnavailable, resolve_commit
    from dflash.provenance import PROJECT_ROOT
    with pytest.raises(ReferenceUnavailable, match="uncommitted changes on top of 0123abc"):
        resolve_commit("0123abc+feedfacecafe", PROJECT_ROOT)
    with pytest.raises(ReferenceUnavailable, match=r"not in this clone \(a shallow checkout\?\).*git fetch --unshallow"):
        resolve_commit("f" * 40, PROJECT_ROOT)
    head = resolve_commit("HEAD", PROJECT_ROOT)
    assert len(head) == 40 and resolve_commit(head[:10], PROJECT_ROOT) == head
