"""The runner's options: --shard I/N with `dflash report --merge`, the device / dtype / budget overrides and the
per-worker GPU, the gate family of the cases that can run here, and published figures attached only to the
case they describe. Inner sessions are pytester projects whose cases only record hand-built taus (no decode)."""
import json
import re
import types
from pathlib import Path

import pytest

from dflash.errors import DFlashError
from dflash.profiles import get_profile
from dflash.harness.runs import merge_runs, run_profile

pytest_plugins = ["pytester"]

CASES = '''
import pytest

from dflash.harness.stats import tau_gate

TAUS = [4.0 + 0.25 * i for i in range(12)]


@pytest.mark.ablation("shards")
@pytest.mark.parametrize("k", [pytest.param(k, id=f"k{k}") for k in range(5)])
def test_case(case, k):
    taus = [t + k for t in TAUS]
    case.finish({"k": k}, {"per_prompt_tau": taus}, [tau_gate(taus, taus, case_id=case.experiment_id)])
'''


@pytest.fixture
def project(pytester, monkeypatch):
    for name in ("CI", "GITHUB_STEP_SUMMARY", "PYTEST_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    pytester.makefile(".ini", pytest="[pytest]\n")
    pytester.makeconftest('pytest_plugins = ["dflash.plugin"]\n')
    pytester.makepyfile(test_shards=CASES)
    return pytester


def run(pytester, *args):
    return pytester.runpytest("-p", "no:xdist", "-p", "no:cacheprovider", "-p", "no:randomly", "--profile", "tiny",
                              "-k", "math", "--baselines-dir", "baselines", *args)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line.strip()]


def test_shards_partition_the_selection_share_the_family_and_merge_into_one_report(project):
    runs = []
    for index in (1, 2):
        result = run(project, "--shard", f"{index}/2", "--reports-dir", f"shard{index}")
        assert result.ret == 0, result.stdout.str()
        runs.append(next((project.path / f"shard{index}").glob("tiny-*")))
    ids = [[r["id"] for r in records(d)] for d in runs]
    assert sorted(ids[0] + ids[1]) == sorted(f"shards/test_case[tiny-math-k{k}]" for k in range(5))
    assert not set(ids[0]) & set(ids[1]) and ids[0] and ids[1]
    assert {r["family"] for d in runs for r in records(d)} == {2 * 5}  # the whole selection, in both shards

    merged = merge_runs(runs, project.path / "merged")
    summary = (merged / "summary.md").read_text()
    assert all(f"k{k}" in summary for k in range(5)) and "merged from 2 runs, Holm over 10 gates" in summary
    assert sorted(r["id"] for r in records(merged)) == sorted(ids[0] + ids[1])

    with pytest.raises(DFlashError, match="measured in both"):  # the same run twice is not a matrix
        merge_runs([runs[0], runs[0]], project.path / "twice")
    other = run(project, "--shard", "2/2", "--tau-margin", "0.05", "--reports-dir", "other")
    assert other.ret == 0
    with pytest.raises(DFlashError, match="the runs differ in options"):
        merge_runs([runs[0], next((project.path / "other").glob("tiny-*"))], project.path / "mixed")


@pytest.mark.parametrize("value", ["0/2", "3/2", "a/b", "2"])
def test_a_bad_shard_is_a_usage_error(project, value):
    result = run(project, "--shard", value, "--reports-dir", "reports")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--shard needs I/N with 1 <= I <= N" in result.stderr.str()


def test_the_family_counts_only_cases_that_can_run_here(monkeypatch):
    """On a machine without CUDA the GPU profile's cases all skip: they are no looks and cost no alpha."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU profile's cases could run")
    from dflash.cli import collected_family
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert collected_family(["-k", "math and test_block_size"], profile="tiny") == 2 * 6
    assert collected_family(["-k", "test_block_size"], profile="gpu-qwen3-4b") == 0


def options(**values):
    defaults = {"dflash_device": None, "dflash_dtype": None, "dflash_prompts": None, "dflash_max_new_tokens": None}
    return {**defaults, **values}


def config(workerid=None, **values):
    return types.SimpleNamespace(getoption=options(**values).__getitem__,
                                 workerinput={"workerid": workerid} if workerid else None)


def test_device_override_rehearses_a_gpu_profile_on_the_cpu():
    profile = run_profile(config(dflash_device="cpu", dflash_dtype="float32", dflash_prompts=2,
                                        dflash_max_new_tokens=16), "gpu-qwen3-4b")
    assert (profile.device, profile.dtype, profile.needs_cuda, profile.clock) == ("cpu", "float32", False, "cpu")
    assert (profile.prompts, profile.prompts_cap, profile.max_new_tokens, profile.full_length_max_new_tokens) == \
        (2, 2, 16, 16)
    assert run_profile(config(), "gpu-qwen3-4b") is get_profile("gpu-qwen3-4b")  # no override: unchanged


@pytest.mark.parametrize("workerid,gpus,device", [("gw0", 4, "cuda:0"), ("gw5", 4, "cuda:1"), ("gw3", 1, "cuda"),
                                                  (None, 4, "cuda")])
def test_each_xdist_worker_binds_its_own_gpu(monkeypatch, workerid, gpus, device):
    import torch
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert run_profile(config(workerid), "gpu-qwen3-4b").device == device


def test_published_figures_attach_only_to_the_case_they_describe():
    profile = get_profile("gpu-qwen3-4b")
    full = profile.references_for("aime25", 16, 2048)
    assert [(r.hardware, r.tau, r.tpot_speedup) for r in full] == [("A100 80GB PCIe", 7.47, 5.86),
                                                                    ("B200", 7.28, 5.79)]
    assert profile.references_for("aime25", 16, 512) == []  # the 512-token sweep is not what was published
    assert profile.references_for("aime25", 2, 2048) == []
    assert [r.tau for r in get_profile("gpu-qwen3-8b").references_for("gsm8k", 16, 2048)] == [6.55]


def test_gpu_ci_tier_is_the_block_size_sweep_at_8_and_16_on_two_datasets():
    tier = re.compile(get_profile("gpu-qwen3-4b").ci_cases)
    chosen = [f"block_size/test_block_size[gpu-qwen3-4b-{d}-bs{b}]" for d in ("gsm8k", "humaneval")
              for b in (8, 16)]
    assert all(tier.search(case) for case in chosen)
    assert not any(tier.search(case) for case in ("block_size/test_block_size[gpu-qwen3-4b-gsm8k-bs1]",
                                                  "block_size/test_block_size[gpu-qwen3-4b-aime25-bs16]",
                                                  "full_length/test_full_length[gpu-qwen3-4b-gsm8k-bs16]"))


def test_allow_downloads_reaches_the_weights_too(monkeypatch):
    """Offline by default; --allow-downloads (enforce_offline(allow_downloads=True)) lets resolve fetch weights."""
    import huggingface_hub

    from dflash import loading
    asked = []

    def snapshot(repo_id, local_files_only):
        asked.append(local_files_only)
        raise OSError("not cached")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(loading, "_downloads_allowed", False)
    for allow in (False, True):
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        loading.enforce_offline(allow_downloads=allow)
        with pytest.raises(DFlashError, match="not available offline"):
            loading.resolve("someone/model", "target")
    assert asked == [True, False]
    loading.enforce_offline()
