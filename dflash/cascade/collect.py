"""Collect once, replay exactly: run every rung of the ladder on every query one time and store what any policy
could observe or pay (`dflash cascade collect`).

Per (query, rung) the table row holds: the greedy reply, its parsed answer and correctness; per-token log
probabilities and entropies of the reply (one teacher-forced forward over prompt + reply); m samples at
T = 0.7 (one batched sampling call, seeded by the query and rung) and their parsed answers; the measured cost:
seconds and tokens of the batch-1 greedy decode (prefill included) and of the sampling call, on the process's CPU
clock on a CPU (one torch thread: the work done, whatever else the machine runs; lam-priced policies decide on
these costs, so wall time under another process's load moved their accuracy by 70 points) and on the wall clock
on CUDA. Rows are
appended to a JSONL file as they finish (one line per row, flushed), after a header line with the provenance
(git sha, hardware, versions, the ladder's manifest digest), so an interrupted collection resumes where it
stopped and a table is never half a line.
"""
from __future__ import annotations

import hashlib
import math
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..engine import generate
from ..errors import DFlashError
from ..loading import load_target, load_tokenizer
from .tasks import Query

SAMPLES = 5
SAMPLE_TEMPERATURE = 0.7
TABLE_VERSION = 2  # 2: costs on the CPU clock on a CPU (1: wall clock)


@dataclass
class StageRow:
    """What running one rung on one query produced and cost."""
    qid: str
    family: str
    difficulty: int
    rung: str
    reply: str
    answer: int | None
    correct: bool
    token_logprobs: list[float]
    token_entropies: list[float]
    new_tokens: int
    greedy_s: float  # batch-1 greedy decode, prefill included
    sample_answers: list[int | None] = field(default_factory=list)
    sample_s: float = 0.0  # the batched sampling call


def reply_statistics(model, prompt_ids: list[int], reply_ids: list[int]) -> tuple[list[float], list[float]]:
    """Per reply token: its log probability and the entropy of the model's next-token law, from one
    teacher-forced forward over prompt + reply (float64 softmax)."""
    if not reply_ids:
        return [], []
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([prompt_ids + reply_ids], device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1: -1].double()
    logp = torch.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, torch.tensor(reply_ids, device=device)[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    return token_logp.tolist(), entropy.tolist()


def stage_clock(device: torch.device) -> float:
    """The cost clock of a stage: process CPU seconds on a CPU, wall seconds (synchronized) on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def sample_seed(qid: str, rung: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{qid}/{rung}".encode()).digest()[:8], "little") >> 1


def sampled_answers(model, tokenizer, query: Query, prompt_ids: list[int], seed: int,
                    max_new_tokens: int) -> tuple[list[int | None], float]:
    """SAMPLES replies at SAMPLE_TEMPERATURE in one batched call (pure temperature sampling: no top-k/top-p),
    seeded; their parsed answers and the call's seconds (`stage_seconds`)."""
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([prompt_ids] * SAMPLES, device=device)
    begin = stage_clock(device)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             temperature=SAMPLE_TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    seconds = stage_clock(device) - begin
    replies = [tokenizer.decode(row[len(prompt_ids):], skip_special_tokens=True) for row in out.tolist()]
    return [query.grade(r)[0] for r in replies], seconds


def run_stage(model, tokenizer, query: Query, rung: str, *, max_new_tokens: int,
              with_samples: bool = True) -> StageRow:
    """One rung on one query: what the table stores, and what a live cascade computes at that stage."""
    prompt_ids = query.prompt_ids(tokenizer)
    eos = tokenizer.eos_token_id
    result = generate(model, None, prompt_ids, max_new_tokens=max_new_tokens, stop_token_ids=[eos])
    reply_ids = [t for t in result.output_ids if t != eos]
    reply = tokenizer.decode(reply_ids, skip_special_tokens=True)
    logprobs, entropies = reply_statistics(model, prompt_ids, reply_ids)
    answer, correct = query.grade(reply)
    row = StageRow(query.qid, query.family, query.difficulty, rung, reply, answer, correct, logprobs, entropies,
                   len(result.output_ids), result.wall_s if math.isnan(result.cpu_s) else result.cpu_s)
    if with_samples:
        row.sample_answers, row.sample_s = sampled_answers(model, tokenizer, query, prompt_ids,
                                                           sample_seed(query.qid, rung), max_new_tokens)
    return row


def provenance(profile) -> dict:
    """What a table's rows are a function of: the code, the machine, every rung's model digest, the settings."""
    from ..loading import model_digest
    from ..provenance import code_identity, collect_fingerprint
    return {"table_version": TABLE_VERSION, "profile": profile.name, "code": code_identity(),
            "fingerprint": collect_fingerprint(profile.name, seeds=None, device=profile.device),
            "threads": torch.get_num_threads(),
            "models": {name: {"location": location, "digest": model_digest(location, "target")}
                       for name, location in profile.rungs},
            "samples": SAMPLES, "sample_temperature": SAMPLE_TEMPERATURE, "max_new_tokens": profile.max_new_tokens}


def read_table(path: Path) -> tuple[dict, list[StageRow]]:
    """The header and the complete rows of a table (a torn last line from an interrupted run is dropped)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise DFlashError(f"{path} is empty: not a cascade table. Delete it and collect again.")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        raise DFlashError(f"{path} does not start with a cascade table header. Delete it and collect again.")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            rows.append(StageRow(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            if number == len(lines):
                break  # the row being written when the run stopped
            raise DFlashError(f"{path} line {number} is not a table row. Delete the file and collect again.")
    return header, rows


def load_rung(profile, location: str):
    return (load_target(location, device=profile.device, dtype=profile.dtype), load_tokenizer(location))


def collect(queries: list[Query], out: Path, profile, *, progress: bool = True) -> Path:
    """Run every rung on every query once (resuming an earlier table at `out` with the same provenance)."""
    from tqdm.auto import tqdm
    header = provenance(profile)
    done: set[tuple[str, str]] = set()
    if out.exists():
        old_header, rows = read_table(out)
        keys = ("table_version", "profile", "models", "samples", "sample_temperature", "max_new_tokens")
        if any(old_header.get(k) != header[k] for k in keys):
            raise DFlashError(f"{out} was collected with other models or settings ({', '.join(keys)} differ); "
                              "collect into a new file, or delete it to start over.")
        done = {(r.qid, r.rung) for r in rows}
        with out.open("w", encoding="utf-8") as handle:  # rewrite without a torn last line
            handle.write(json.dumps(old_header) + "\n")
            handle.writelines(json.dumps(asdict(r)) + "\n" for r in rows)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(header) + "\n", encoding="utf-8")
    todo = [(name, q) for name, _ in profile.rungs for q in queries if (q.qid, name) not in done]
    bar = tqdm(total=len(todo), desc="collect", disable=not progress)
    with out.open("a", encoding="utf-8") as handle:
        for name, location in profile.rungs:
            pending = [q for rung, q in todo if rung == name]
            if not pending:
                continue
            model, tokenizer = load_rung(profile, location)
            for query in pending:
                row = run_stage(model, tokenizer, query, name, max_new_tokens=profile.max_new_tokens)
                handle.write(json.dumps(asdict(row)) + "\n")
                handle.flush()
                bar.update(1)
    bar.close()
    return out
