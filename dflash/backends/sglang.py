"""Backlog variant 9: SGLang as the serving backend, for concurrency sweeps (spec 5.8, benchmark_sglang.py).

SGLang runs DFlash in its own scheduler (`speculative_algorithm="DFLASH"`), with continuous batching, paged KV
and CUDA graphs, so it answers the question this project's loop cannot: what does DFlash buy at concurrency
1, 2, 4, 8, ... in a real server? This module is importable without SGLang; everything that needs SGLang or
CUDA happens in `open_engine` and the sweep, which the ablation (ablations/test_sglang.py, marked gpu) skips
with one line when either is absent. The pure parts (engine arguments, sampling parameters, request counts,
response parsing, aggregation) are unit-tested on CPU (tests/test_sglang_backend.py).

Measured as in the research script: per concurrency c, flush the cache, send c unmeasured warm-up prompts,
then time n(c) = min(base * c, cap) prompts with at most c in flight; output throughput = sum of
completion_tokens / elapsed seconds; tau per request = SGLang's `spec_accept_length` (completion_tokens /
spec_verify_ct, bonus token included), averaged over requests; `spec_verify_ct` must be > 0 on a DFLASH engine
(a server that silently did not speculate would otherwise look like a slow target-only run).

Argument names are SGLang's (ServerArgs / Engine keyword arguments): model_path, speculative_algorithm,
speculative_draft_model_path, speculative_num_draft_tokens (the DFlash block size), attention_backend, tp_size,
dtype, mem_fraction_static, max_running_requests, cuda_graph_bs, cuda_graph_max_bs, disable_radix_cache,
trust_remote_code, skip_tokenizer_init, enable_deterministic_inference.

Remote code is off: SGLang is started with trust_remote_code=False unless `EngineSettings.trust_remote_code` is
set explicitly (an opt-in for a checkpoint whose architecture needs its own Python code from the checkpoint
directory or hub repository, which then runs with this process's rights; the Qwen3 targets and z-lab DFlash
drafts this backend is measured with need none).
"""
from __future__ import annotations

import asyncio
import importlib.util
import statistics
import time
from dataclasses import asdict, dataclass, field

from ..errors import DFlashError
from ..registry import VariantSpec, register

SWEEP_CONCURRENCIES = (1, 2, 4, 8, 16, 32)  # the research script's default sweep


SUPPORTED_SGLANG = "<0.6"  # the engine arguments above are 0.5.x's; the pyproject extra `sglang` pins the same


def unavailable_reason() -> str | None:
    """Why SGLang cannot run here (one line), or None: not installed, outside the supported range, no DFLASH
    algorithm in its server arguments (it landed in sgl-project/sglang#22077), or no CUDA."""
    if importlib.util.find_spec("sglang") is None:
        return "SGLang is not installed (pip install '.[sglang]' on a CUDA machine)"
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet
    installed = version("sglang")
    if installed not in SpecifierSet(SUPPORTED_SGLANG):
        return f"SGLang {installed} is outside the supported range {SUPPORTED_SGLANG} (pip install '.[sglang]')"
    import dataclasses

    from sglang.srt.server_args import ServerArgs
    if "speculative_dflash_block_size" not in {f.name for f in dataclasses.fields(ServerArgs)}:
        return f"SGLang {installed} has no DFLASH speculative algorithm (a release with sgl-project/sglang#22077)"
    import torch
    if not torch.cuda.is_available():
        return "SGLang needs CUDA, which this machine does not have"
    return None


@dataclass(frozen=True)
class EngineSettings:
    """One SGLang engine. draft=None: the target-only baseline engine. trust_remote_code=False (the default):
    SGLang does not import Python code from the checkpoints; set it True only for checkpoints you trust."""
    target: str  # local directory or hub id already in the HF cache
    draft: str | None = None
    block_size: int | None = None  # speculative_num_draft_tokens; None: the draft config's block size
    attention_backend: str = "flashinfer"
    tp_size: int = 1
    dtype: str = "bfloat16"
    mem_fraction_static: float = 0.75
    max_running_requests: int = 64
    cuda_graph_max_bs: int = 32
    disable_radix_cache: bool = True  # every prompt is new; a warm prefix cache would flatter later levels
    deterministic: bool = False  # enable_deterministic_inference: batch-invariant kernels, for parity checks
    # Opt-in only: run Python code shipped with the target/draft checkpoint (see the module docstring).
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.block_size is not None and self.block_size < 2:
            raise DFlashError(f"SGLang DFLASH block_size (speculative_num_draft_tokens) must be >= 2, got "
                              f"{self.block_size}; leave it None to use the draft's own block size.")
        if self.block_size is not None and self.draft is None:
            raise DFlashError("block_size was given without a draft: the target-only engine does not speculate.")
        if not 0 < self.mem_fraction_static < 1:
            raise DFlashError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}.")
        if not isinstance(self.trust_remote_code, bool):  # a string such as "false" must not switch it on
            raise DFlashError(f"trust_remote_code must be True or False, got {self.trust_remote_code!r}.")


def engine_arguments(settings: EngineSettings) -> dict:
    """Keyword arguments for `sglang.Engine` (the same names as `python -m sglang.launch_server` flags)."""
    args = dict(
        model_path=settings.target, trust_remote_code=settings.trust_remote_code,
        attention_backend=settings.attention_backend,
        tp_size=settings.tp_size, dtype=settings.dtype, mem_fraction_static=settings.mem_fraction_static,
        max_running_requests=settings.max_running_requests,
        cuda_graph_bs=list(range(1, settings.cuda_graph_max_bs + 1)), cuda_graph_max_bs=settings.cuda_graph_max_bs,
        disable_radix_cache=settings.disable_radix_cache, skip_tokenizer_init=True,  # token ids in and out
        log_level="error",
    )
    if settings.deterministic:
        args["enable_deterministic_inference"] = True
    if settings.draft is not None:
        args.update(speculative_algorithm="DFLASH", speculative_draft_model_path=settings.draft)
        if settings.block_size is not None:
            args["speculative_num_draft_tokens"] = settings.block_size
    return args


def attention_backends(requested: str, sm_major: int) -> list[str]:
    """The research script's rule: fa3 only on SM 90 (Hopper), fa4 only on SM >= 100; nothing left: flashinfer."""
    keep = []
    for name in (b.strip() for b in requested.split(",") if b.strip()):
        if (name == "fa3" and sm_major != 9) or (name == "fa4" and sm_major < 10):
            continue
        keep.append(name)
    return keep or ["flashinfer"]


def greedy_sampling(max_new_tokens: int) -> dict:
    """Temperature 0, top_p 1, top_k 1, no stop strings (the research script's sampling for the sweep)."""
    if max_new_tokens < 1:
        raise DFlashError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    return {"temperature": 0.0, "top_p": 1.0, "top_k": 1, "max_new_tokens": int(max_new_tokens)}


def requests_per_level(concurrency: int, base: int = 128, cap: int = 1024) -> int:
    """n(c) = min(base * c, cap) timed requests at concurrency c."""
    if concurrency < 1:
        raise DFlashError(f"concurrency must be >= 1, got {concurrency}.")
    return min(base * concurrency, cap)


@dataclass(frozen=True)
class RequestResult:
    output_ids: tuple[int, ...]
    completion_tokens: int
    verify_ct: int | None  # None: the engine does not speculate
    accept_length: float | None  # SGLang's spec_accept_length (completion tokens per verify step)


def parse_response(out: dict) -> RequestResult:
    """One `Engine.generate` output dict -> RequestResult. Older SGLang versions report only spec_verify_ct;
    the accept length is then completion_tokens / spec_verify_ct, the same definition."""
    meta = out.get("meta_info") if isinstance(out, dict) else None
    if not isinstance(meta, dict) or "completion_tokens" not in meta:
        raise DFlashError(f"SGLang response has no meta_info.completion_tokens (got keys "
                          f"{sorted(out) if isinstance(out, dict) else type(out).__name__}): this SGLang version "
                          "does not report what the sweep measures.")
    completion = int(meta["completion_tokens"])
    verify = meta.get("spec_verify_ct")
    verify = int(verify) if verify is not None else None
    accept = meta.get("spec_accept_length")
    if accept is None and verify:
        accept = completion / verify
    return RequestResult(tuple(int(t) for t in out.get("output_ids") or ()), completion, verify,
                         float(accept) if accept is not None and verify else None)


@dataclass
class LevelResult:
    """One concurrency level of one engine."""
    concurrency: int
    requests: int
    output_tokens: int
    elapsed_s: float
    accept_lengths: list[float] = field(default_factory=list)  # per request (speculative engines)
    verify_ct_sum: int = 0
    output_ids: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def accept_length(self) -> float | None:
        """Mean over requests of SGLang's per-request accept length (the research script's tau)."""
        return statistics.fmean(self.accept_lengths) if self.accept_lengths else None

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("output_ids")
        out.update(tokens_per_s=self.tokens_per_s, accept_length=self.accept_length)
        return out


def summarize_level(concurrency: int, results: list[RequestResult], elapsed_s: float, *,
                    speculative: bool) -> LevelResult:
    verify = sum(r.verify_ct or 0 for r in results)
    if speculative and results and verify == 0:
        raise DFlashError("The DFLASH engine reported spec_verify_ct = 0 for every request: it did not speculate "
                          "(check speculative_algorithm / speculative_draft_model_path and the server log).")
    return LevelResult(concurrency, len(results), sum(r.completion_tokens for r in results), elapsed_s,
                       [r.accept_length for r in results if r.accept_length is not None], verify,
                       [r.output_ids for r in results])


def _as_list(outputs) -> list[dict]:
    return outputs if isinstance(outputs, list) else [outputs]


def run_chunked(engine, prompts: list[list[int]], concurrency: int, sampling: dict) -> list[RequestResult]:
    """Batched mode (the research script's --batch-requests): one generate call per chunk of c prompts."""
    results = []
    for start in range(0, len(prompts), concurrency):
        chunk = prompts[start:start + concurrency]
        results += [parse_response(o) for o in _as_list(engine.generate(input_ids=chunk, sampling_params=sampling))]
    return results


def run_concurrent(engine, prompts: list[list[int]], concurrency: int, sampling: dict) -> list[RequestResult]:
    """Closed loop with at most c requests in flight (the research script's thread pool of c workers)."""
    async def main():
        gate = asyncio.Semaphore(concurrency)

        async def one(prompt):
            async with gate:
                return await engine.async_generate(input_ids=prompt, sampling_params=sampling)
        return await asyncio.gather(*(one(p) for p in prompts))
    # The engine's tokenizer manager lives on the thread's event loop (Engine.generate runs on it too).
    try:
        loop = asyncio.get_event_loop()
    except RuntimeError:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
    return [parse_response(o) for o in loop.run_until_complete(main())]


def run_level(engine, prompts: list[list[int]], concurrency: int, *, max_new_tokens: int, base: int, cap: int,
              speculative: bool, mode: str = "concurrent", clock=time.perf_counter) -> LevelResult:
    """Flush, warm up with c unmeasured prompts, then time n(c) prompts (prompts cycle if there are too few)."""
    if mode not in ("concurrent", "chunked"):
        raise DFlashError(f"Unknown sweep mode {mode!r}; choose 'concurrent' or 'chunked'.")
    if not prompts:
        raise DFlashError("The SGLang sweep got no prompts.")
    n = requests_per_level(concurrency, base, cap)
    pool = [prompts[i % len(prompts)] for i in range(concurrency + n)]
    sampling = greedy_sampling(max_new_tokens)
    run = run_concurrent if mode == "concurrent" else run_chunked
    engine.flush_cache()
    run(engine, pool[:concurrency], concurrency, sampling)
    begin = clock()
    results = run(engine, pool[concurrency:], concurrency, sampling)
    return summarize_level(concurrency, results, clock() - begin, speculative=speculative)


def sweep(engine, prompts, concurrencies=SWEEP_CONCURRENCIES, *, max_new_tokens: int, base: int = 128,
          cap: int = 1024, speculative: bool, mode: str = "concurrent") -> list[LevelResult]:
    return [run_level(engine, prompts, c, max_new_tokens=max_new_tokens, base=base, cap=cap,
                      speculative=speculative, mode=mode) for c in concurrencies]


def compare_levels(baseline: list[LevelResult], dflash: list[LevelResult]) -> list[dict]:
    """Per concurrency: baseline and DFLASH tokens/s, speedup, accept length, and how many of the timed requests
    produced exactly the baseline's tokens (same prompt order in both runs, greedy)."""
    rows = []
    for base, spec in zip(baseline, dflash):
        if base.concurrency != spec.concurrency:
            raise DFlashError(f"Sweeps are out of step: concurrency {base.concurrency} vs {spec.concurrency}.")
        same = [a == b for a, b in zip(base.output_ids, spec.output_ids) if a and b]
        rows.append({"concurrency": base.concurrency, "requests": spec.requests,
                     "baseline_tokens_per_s": base.tokens_per_s, "dflash_tokens_per_s": spec.tokens_per_s,
                     "speedup": spec.tokens_per_s / base.tokens_per_s if base.tokens_per_s else None,
                     "accept_length": spec.accept_length, "exact_match": sum(same), "compared": len(same)})
    return rows


def open_engine(settings: EngineSettings):
    """Start an in-process SGLang engine (minutes: weights, CUDA graphs). Call `.shutdown()` when done."""
    reason = unavailable_reason()
    if reason:
        raise DFlashError(reason)
    import sglang
    return sglang.Engine(**engine_arguments(settings))


_ENGINES: dict[EngineSettings, object] = {}


def _checkpoint(model, knob: str | None, which: str) -> str:
    path = knob or getattr(model, "name_or_path", None)
    if not path:
        raise DFlashError(f"SGLang serves checkpoints, and this {which} model has no path (in-memory models, such "
                          f"as the tests' random pairs, cannot be served). Pass {which}_path=<directory or "
                          "hub id>.")
    return str(path)


@dataclass(frozen=True)
class SGLangKnobs:
    target_path: str | None = None  # checkpoint SGLang serves (None: the target's name_or_path)
    draft_path: str | None = None  # the draft's checkpoint (None: the draft's name_or_path)


def decode_sglang(target, draft, prompt, knobs: SGLangKnobs, *, max_new_tokens, block_size, stop_token_ids=None,
                  temperature=0.0, seed=None):
    """One prompt through a (cached) SGLang DFLASH engine, as a GenerationResult with SGLang's counters: no
    per-cycle trace (SGLang does not expose one); acceptance lengths are spread from completion / verify count."""
    from ..engine import GenerationResult
    if temperature != 0:
        raise DFlashError("The SGLang variant is measured greedy (temperature 0), as the research sweep is.")
    settings = EngineSettings(_checkpoint(target, knobs.target_path, "target"),
                              _checkpoint(draft, knobs.draft_path, "draft"),
                              block_size=block_size if block_size and block_size > 1 else None)
    if settings not in _ENGINES:
        _ENGINES[settings] = open_engine(settings)
    sampling = {**greedy_sampling(max_new_tokens), "stop_token_ids": list(stop_token_ids or [])}
    begin = time.perf_counter()
    result = parse_response(_as_list(_ENGINES[settings].generate(input_ids=[list(prompt)],
                                                                 sampling_params=sampling))[0])
    wall = time.perf_counter() - begin
    steps = result.verify_ct or 0
    lengths = [result.completion_tokens // steps + (i < result.completion_tokens % steps) for i in range(steps)]
    output = list(result.output_ids)
    return GenerationResult(output_ids=output, acceptance_lengths=lengths, ttft_s=0.0, decode_s=wall, wall_s=wall,
                            block_size=block_size, temperature=0.0,
                            stopped=bool(output) and output[-1] in set(stop_token_ids or []))


def _registry_unavailable() -> str | None:
    reason = unavailable_reason()
    if reason:
        return reason
    return ("SGLang serves checkpoints in its own scheduler, so the registry's in-memory float64 random pairs "
            "cannot be decoded by it; its parity is measured by ablations/test_sglang.py (exact match against "
            "SGLang's own target-only engine)")


SPEC = register(VariantSpec(
    "sglang", knob_class=SGLangKnobs, run=decode_sglang,
    unavailable=_registry_unavailable,
    description="SGLang DFLASH serving backend: concurrency sweep of output throughput and accept length"))
