"""The SGLang backend's CPU-testable parts: engine arguments, response parsing, the sweep driver (against a fake
engine that answers like SGLang's Engine), aggregation, the skip reason, and knob liveness. The real engine
runs only in ablations/test_sglang.py (marked gpu)."""
import pytest

from dflash import DFlashError
from dflash.variants import VARIANTS
from dflash.backends import sglang as sg

# meta_info as SGLang reports it for one finished DFLASH request (fields the sweep reads, plus a few others).
RECORDED = {"output_ids": [11, 12, 13, 14, 15, 16], "meta_info": {
    "id": "a1", "finish_reason": {"type": "length", "length": 6}, "prompt_tokens": 9, "completion_tokens": 6,
    "cached_tokens": 0, "spec_verify_ct": 2, "spec_accept_length": 3.0, "spec_accept_rate": 0.4,
    "e2e_latency": 0.05}}


def test_engine_arguments_use_sglang_names():
    args = sg.engine_arguments(sg.EngineSettings("Qwen/Qwen3-8B", "z-lab/Qwen3-8B-DFlash-b16", block_size=16,
                                                 attention_backend="fa3", cuda_graph_max_bs=4))
    assert args["speculative_algorithm"] == "DFLASH"
    assert args["speculative_draft_model_path"] == "z-lab/Qwen3-8B-DFlash-b16"
    assert args["speculative_num_draft_tokens"] == 16
    assert args["model_path"] == "Qwen/Qwen3-8B" and args["attention_backend"] == "fa3"
    assert args["cuda_graph_bs"] == [1, 2, 3, 4] and args["cuda_graph_max_bs"] == 4
    assert args["skip_tokenizer_init"] and args["disable_radix_cache"]
    assert args["trust_remote_code"] is False  # no code from the checkpoints unless asked for
    assert "enable_deterministic_inference" not in args


def test_trust_remote_code_is_an_explicit_opt_in():
    assert sg.EngineSettings("Qwen/Qwen3-8B").trust_remote_code is False
    opted_in = sg.engine_arguments(sg.EngineSettings("Qwen/Qwen3-8B", trust_remote_code=True))
    assert opted_in["trust_remote_code"] is True


def test_baseline_engine_does_not_speculate():
    args = sg.engine_arguments(sg.EngineSettings("Qwen/Qwen3-8B", deterministic=True))
    assert not any(k.startswith("speculative") for k in args)
    assert args["enable_deterministic_inference"] is True


@pytest.mark.parametrize("kwargs,message", [
    (dict(draft="d", block_size=1), "must be >= 2"),
    (dict(block_size=8), "without a draft"),
    (dict(mem_fraction_static=1.5), "mem_fraction_static"),
    (dict(trust_remote_code="false"), "trust_remote_code"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(DFlashError, match=message):
        sg.EngineSettings("t", **kwargs)


def test_attention_backend_rule():
    assert sg.attention_backends("flashinfer,fa3,fa4", sm_major=9) == ["flashinfer", "fa3"]
    assert sg.attention_backends("flashinfer,fa3,fa4", sm_major=10) == ["flashinfer", "fa4"]
    assert sg.attention_backends("fa3", sm_major=8) == ["flashinfer"]


def test_request_counts_and_sampling():
    assert [sg.requests_per_level(c, 128, 1024) for c in (1, 4, 8, 16)] == [128, 512, 1024, 1024]
    assert sg.greedy_sampling(32) == {"temperature": 0.0, "top_p": 1.0, "top_k": 1, "max_new_tokens": 32}
    with pytest.raises(DFlashError):
        sg.requests_per_level(0)


def test_parse_recorded_response():
    result = sg.parse_response(RECORDED)
    assert result == sg.RequestResult((11, 12, 13, 14, 15, 16), 6, 2, 3.0)


def test_parse_older_response_derives_accept_length_and_target_only_has_none():
    old = {"output_ids": [1, 2, 3], "meta_info": {"completion_tokens": 3, "spec_verify_ct": 2}}
    assert sg.parse_response(old).accept_length == 1.5
    plain = {"output_ids": [1, 2], "meta_info": {"completion_tokens": 2}}
    assert sg.parse_response(plain).accept_length is None and sg.parse_response(plain).verify_ct is None
    with pytest.raises(DFlashError, match="completion_tokens"):
        sg.parse_response({"text": "hi"})


def test_a_dflash_engine_that_never_verified_is_an_error():
    plain = sg.parse_response({"output_ids": [1], "meta_info": {"completion_tokens": 1, "spec_verify_ct": 0}})
    with pytest.raises(DFlashError, match="did not speculate"):
        sg.summarize_level(1, [plain], 1.0, speculative=True)
    assert sg.summarize_level(1, [plain], 1.0, speculative=False).accept_length is None


class FakeEngine:
    """Answers like sglang.Engine with skip_tokenizer_init: output ids = prompt reversed, 2 tokens per verify."""

    def __init__(self, speculative=True):
        self.speculative, self.calls, self.flushes, self.in_flight, self.peak = speculative, [], 0, 0, 0

    def _answer(self, prompt):
        meta = {"completion_tokens": len(prompt)}
        if self.speculative:
            steps = (len(prompt) + 1) // 2
            meta.update(spec_verify_ct=steps, spec_accept_length=len(prompt) / steps)
        return {"output_ids": prompt[::-1], "meta_info": meta}

    def generate(self, input_ids, sampling_params):
        self.calls.append(len(input_ids))
        return [self._answer(p) for p in input_ids]

    async def async_generate(self, input_ids, sampling_params):
        import asyncio
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(0)
        self.in_flight -= 1
        self.calls.append(1)
        return self._answer(input_ids)

    def flush_cache(self):
        self.flushes += 1


@pytest.mark.parametrize("mode", ["chunked", "concurrent"])
def test_sweep_driver_warms_up_times_and_aggregates(mode):
    engine = FakeEngine()
    ticks = iter([10.0, 12.0])
    level = sg.run_level(engine, [[1, 2, 3, 4], [5, 6]], 2, max_new_tokens=8, base=3, cap=100, speculative=True,
                         mode=mode, clock=lambda: next(ticks))
    assert engine.flushes == 1
    assert level.requests == 6 and level.elapsed_s == 2.0  # n(2) = min(3 * 2, 100), warm-up not counted
    # prompts cycle: the 2 warm-up prompts, then [1,2,3,4], [5,6], ... -> 3 x 4 + 3 x 2 tokens
    assert level.output_tokens == 18 and level.tokens_per_s == 9.0
    assert level.accept_length == pytest.approx((2.0 + 2.0) / 2)
    if mode == "chunked":
        assert engine.calls == [2, 2, 2, 2]  # one generate call per chunk of c prompts
    else:
        assert engine.peak <= 2 and len(engine.calls) == 8


def test_compare_levels_speedup_and_exact_match():
    base = sg.LevelResult(1, 2, 100, 10.0, output_ids=[(1, 2), (3,)])
    spec = sg.LevelResult(1, 2, 100, 4.0, [3.0, 5.0], 50, output_ids=[(1, 2), (4,)])
    row = sg.compare_levels([base], [spec])[0]
    assert row["speedup"] == 2.5 and row["accept_length"] == 4.0
    assert (row["exact_match"], row["compared"]) == (1, 2)


def test_skip_reason_is_one_line():
    reason = sg.unavailable_reason()
    spec = VARIANTS["sglang"]
    try:
        import sglang  # noqa: F401
    except ImportError:
        assert reason and "not installed" in reason
    registry_reason = spec.unavailable()
    assert registry_reason and "\n" not in registry_reason


def test_draft_and_target_path_knobs_are_live(monkeypatch):
    """The path knobs pick the engine SGLang is started with (a fake engine stands in for sglang.Engine)."""
    opened = []

    def fake_open(settings):
        opened.append(settings)
        return FakeEngine()
    monkeypatch.setattr(sg, "open_engine", fake_open)
    monkeypatch.setattr(sg, "_ENGINES", {})
    decode = VARIANTS["sglang"].decode
    for draft_path in ("drafts/a", "drafts/b"):
        result = decode(None, None, [1, 2, 3], max_new_tokens=8, block_size=16, target_path="targets/t",
                        draft_path=draft_path)
    assert [s.draft for s in opened] == ["drafts/a", "drafts/b"] and opened[0].target == "targets/t"
    assert result.output_ids == [3, 2, 1] and result.tau == 1.5 and result.num_cycles == 2
    decode(None, None, [1], max_new_tokens=8, block_size=16, target_path="targets/u", draft_path="drafts/a")
    assert opened[-1].target == "targets/u"
    with pytest.raises(DFlashError, match="has no path"):
        decode(object(), object(), [1], max_new_tokens=8, block_size=16)


@pytest.mark.parametrize("installed,fields,reason", [
    ("0.6.1", ("speculative_dflash_block_size",), "outside the supported range <0.6"),
    ("0.5.3", (), "has no DFLASH speculative algorithm"),
])
def test_an_unsupported_sglang_is_named_before_anything_starts(monkeypatch, installed, fields, reason):
    import dataclasses
    import importlib.metadata
    import sys
    import types
    server_args = types.ModuleType("sglang.srt.server_args")
    server_args.ServerArgs = dataclasses.make_dataclass("ServerArgs", [(f, int, 0) for f in fields])
    for name, module in (("sglang", types.ModuleType("sglang")), ("sglang.srt", types.ModuleType("sglang.srt")),
                         ("sglang.srt.server_args", server_args)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(sg.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(importlib.metadata, "version", lambda name: installed)
    assert reason in sg.unavailable_reason()
