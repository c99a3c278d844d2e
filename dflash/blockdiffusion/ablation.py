"""Fast-dLLM v2 settings as ablation cases, gated like every other ablation (the `fastdllm_case` fixture of the
Fast-dLLM v2 family, dflash.blockdiffusion.family).

A generative case decodes the profile's held-out queries with the block-diffusion model under its settings and,
on the same queries in the same process, interleaved (the order alternates per group) after a warm-up, with the
AR base model (transformers `generate`, greedy, at the same batch size). Per query it records exact-match
correctness, output length, repetition, forwards per token and agreement with the AR base's output; per batch
group the speed ratio (block-diffusion tokens/s over AR tokens/s, token-normalised, on the profile's clock).
Gates, against the case's baseline entry, paired over queries: accuracy by the exact McNemar gate
(`stats.accuracy_gate`), speed by the paired throughput gate on one ratio per group. Fast-dLLM v2 is not lossless,
so quality is measured, never assumed. A log-likelihood case scores the multiple-choice version of the queries
with one forward per choice (`loglik`); layer reuse is declared not applicable there (no denoising steps).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from ..engine.loop import clock
from ..harness.case import OutcomesCase
from .decode import generate
from .reuse import LayerReuse

WARM_UP_QUERIES = 1
ABLATION_QUERIES = 50  # per family: the run and its baselines decode the same queries
STALENESS_QUERIES = 4  # the untimed staleness diagnostic of a reuse case
NOT_APPLICABLE = ("layer reuse acts on denoising (sub-block) steps, and log-likelihood scoring has "
                  "none (one forward per choice); tests/test_blockdiffusion_reuse.py checks its logits are "
                  "bit-identical with the knob on")


@dataclass(frozen=True)
class Settings:
    """The decoder knobs of one case (each declared once; `decode_kwargs` hands them to `generate`)."""
    threshold: float = 0.9
    cache: str = "dual"
    sub_block_size: int = 8
    batch: int = 1
    reuse_k: int | None = None  # None: no wrapper; an int (1 = the control): the span is wrapped
    subset: str = "middle"
    mode: str = "output"

    def layer_reuse(self, staleness: bool = False) -> LayerReuse | None:
        if self.reuse_k is None:
            return None
        return LayerReuse(k=self.reuse_k, subset=self.subset, mode=self.mode, staleness=staleness)

    def decode_kwargs(self, block_size: int, staleness: bool = False) -> dict:
        return {"block_size": block_size, "sub_block_size": self.sub_block_size, "threshold": self.threshold,
                "cache": self.cache, "layer_reuse": self.layer_reuse(staleness)}


def repetition_rate(ids: list[int], n: int = 3) -> float:
    """Share of the output's n-grams that repeat an earlier n-gram of the same output (0 for short outputs)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def output_digest(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


def ar_generate(model, prompts: list[list[int]], *, pad_id: int, stop_ids, max_new_tokens: int) -> list[list[int]]:
    """The AR base's greedy outputs (transformers `generate`, left-padded batch), cut after the first stop."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    stops = list(stop_ids)
    generated = model.generate(input_ids=ids.to(model.device), attention_mask=attention.to(model.device),
                               do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops,
                               pad_token_id=pad_id)[:, width:].tolist()
    cut = []
    for row in generated:
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        cut.append(row[:end])
    return cut


def timed(run, device):
    """(value, wall seconds, process CPU seconds) of run()."""
    start, start_cpu = clock(device), time.process_time()
    value = run()
    return value, clock(device) - start, time.process_time() - start_cpu


def measure_generative(bd_model, ar_model, queries, tokenizer, settings: Settings, *, block_size: int, mask_id: int,
                       stop_ids, pad_id: int, max_new_tokens: int, gate_clock: str) -> dict:
    """Every query decoded by both models, interleaved per batch group (block diffusion first on even groups,
    AR first on odd ones), after a warm-up of both. Per query: correctness, cost (1 / the group's speed ratio
    on `gate_clock`: "cpu" = process CPU time, "wall"), output statistics; per group: the speed ratio."""
    device = bd_model.get_input_embeddings().weight.device
    prompts = [q.prompt_ids(tokenizer) for q in queries]
    kwargs = dict(settings.decode_kwargs(block_size), mask_id=mask_id, stop_ids=stop_ids,
                  max_new_tokens=max_new_tokens)
    warm = prompts[:max(WARM_UP_QUERIES, settings.batch)]
    generate(bd_model, warm, **kwargs)
    ar_generate(ar_model, warm, pad_id=pad_id, stop_ids=stop_ids, max_new_tokens=max_new_tokens)
    per_query = {key: [] for key in ("qids", "correct", "cost", "tokens", "ar_tokens", "forwards_per_token",
                                     "repetition", "agrees_with_ar", "output_digest")}
    totals = dict.fromkeys(("bd_wall", "ar_wall", "bd_cpu", "ar_cpu", "bd_tokens", "ar_tokens"), 0.0)
    group_ratios = []
    for start in range(0, len(prompts), settings.batch):
        group = prompts[start:start + settings.batch]

        def run_bd():
            return generate(bd_model, group, **kwargs)

        def run_ar():
            return ar_generate(ar_model, group, pad_id=pad_id, stop_ids=stop_ids, max_new_tokens=max_new_tokens)
        if (start // settings.batch) % 2 == 0:
            (bd, bd_wall, bd_cpu), (ar, ar_wall, ar_cpu) = timed(run_bd, device), timed(run_ar, device)
        else:
            (ar, ar_wall, ar_cpu), (bd, bd_wall, bd_cpu) = timed(run_ar, device), timed(run_bd, device)
        n_bd, n_ar = sum(map(len, bd.output_ids)), sum(map(len, ar))
        bd_s, ar_s = (bd_cpu, ar_cpu) if gate_clock == "cpu" else (bd_wall, ar_wall)
        ratio = (max(n_bd, 1) / bd_s) / (max(n_ar, 1) / ar_s)
        group_ratios.append(ratio)
        for key, value in (("bd_wall", bd_wall), ("ar_wall", ar_wall), ("bd_cpu", bd_cpu), ("ar_cpu", ar_cpu),
                           ("bd_tokens", n_bd), ("ar_tokens", n_ar)):
            totals[key] += value
        for offset, (ids, ar_ids) in enumerate(zip(bd.output_ids, ar)):
            query = queries[start + offset]
            per_query["qids"].append(query.qid)
            per_query["correct"].append(int(query.grade(tokenizer.decode(ids, skip_special_tokens=True))[1]))
            per_query["cost"].append(1.0 / ratio)
            per_query["tokens"].append(len(ids))
            per_query["ar_tokens"].append(len(ar_ids))
            per_query["forwards_per_token"].append(bd.row_forwards[offset] / max(1, len(ids)))
            per_query["repetition"].append(repetition_rate(ids))
            per_query["agrees_with_ar"].append(int(ids == ar_ids))
            per_query["output_digest"].append(output_digest(ids))
    return {"per_query": per_query, "group_ratios": group_ratios, **totals}


def staleness_diagnostic(bd_model, queries, tokenizer, settings: Settings, *, block_size: int, mask_id: int,
                         stop_ids, max_new_tokens: int) -> dict | None:
    """Per-layer staleness (relative L2 of the reused output against fresh computation) and the measured layer
    call times, on a few queries, untimed: the diagnostic computes every reused layer twice."""
    if not settings.reuse_k or settings.reuse_k == 1:
        return None
    prompts = [q.prompt_ids(tokenizer) for q in queries]
    out = generate(bd_model, prompts, **settings.decode_kwargs(block_size, staleness=True), mask_id=mask_id,
                   stop_ids=stop_ids, max_new_tokens=max_new_tokens)
    return out.reuse


@dataclass
class Environment:
    """What every case of a profile shares in one process: both models, the queries and the choice questions."""
    bd: object  # profiles.Loaded
    ar_model: object
    pad_id: int
    queries: list
    questions: list


_ENVIRONMENTS: dict[tuple[str, int], Environment] = {}


def environment(profile, count: int = ABLATION_QUERIES) -> Environment:
    """Loaded once per process and profile: `count` items of each of the profile's tasks (per family for the
    tiny generative tasks), generative ones in `queries`, multiple-choice ones in `questions`."""
    key = (profile.name, count)
    if key not in _ENVIRONMENTS:
        from .tasks import is_choice_task, load_task
        bd = profile.load()
        ar_model, ar_tokenizer = profile.load_ar_base()
        pad = ar_tokenizer.pad_token_id if ar_tokenizer.pad_token_id is not None else ar_tokenizer.eos_token_id
        items = {task: load_task(task, bd.tokenizer, count) for task in profile.tasks}
        _ENVIRONMENTS[key] = Environment(
            bd, ar_model.eval(), pad, [q for task, got in items.items() if not is_choice_task(task) for q in got],
            [q for task, got in items.items() if is_choice_task(task) for q in got])
    return _ENVIRONMENTS[key]


def decoding_metrics(env: Environment, settings: Settings, max_new_tokens: int, gate_clock: str):
    """A generative case's metrics, and the measurement itself (a re-measurement runs it again)."""
    bd = env.bd
    options = dict(block_size=bd.block_size, mask_id=bd.mask_id, stop_ids=bd.stop_ids, max_new_tokens=max_new_tokens)

    def measure():
        return measure_generative(bd.model, env.ar_model, env.queries, bd.tokenizer, settings, pad_id=env.pad_id,
                                  gate_clock=gate_clock, **options)
    measured = measure()
    per_query = measured["per_query"]
    metrics = {"accuracy": sum(per_query["correct"]) / len(per_query["correct"]),
               "tokens_per_s": measured["bd_tokens"] / measured["bd_wall"],
               "ar_tokens_per_s": measured["ar_tokens"] / measured["ar_wall"],
               "total_seconds": measured["bd_wall"], "speed_ratio_samples": measured["group_ratios"],
               "speed_clock": gate_clock,
               "per_query": {k: per_query[k] for k in ("qids", "correct", "cost")},
               "outputs": {k: v for k, v in per_query.items() if k not in ("qids", "correct", "cost")},
               "reuse": staleness_diagnostic(bd.model, env.queries[:STALENESS_QUERIES], bd.tokenizer, settings,
                                             **options)}
    return metrics, measure


def scoring_metrics(env: Environment) -> dict:
    """A log-likelihood case's metrics: multiple-choice accuracy (argmax of the B3 scores) per question."""
    from .tasks import choice_scores
    bd = env.bd
    scores = choice_scores(bd.model, env.questions, block_size=bd.block_size, mask_id=bd.mask_id, eos_id=bd.eos_id)
    correct = [int(max(range(len(s)), key=s.__getitem__) == q.gold) for q, s in zip(env.questions, scores)]
    return {"accuracy": sum(correct) / len(correct),
            "per_query": {"qids": [q.qid for q in env.questions], "correct": correct, "cost": [1.0] * len(correct)}}


class FastDLLMCase(OutcomesCase):
    """One Fast-dLLM v2 setting of a profile: measured outcomes, gates against the baseline (accuracy, and the
    speed ratio to AR: one sample per batch group). Each `measure_*` returns the case's params, metrics and
    gates for `finish`."""
    dataset_name = "graded"

    @property
    def budget(self) -> int:
        return self.family_profile.max_new_tokens

    def measure_decoding(self, settings) -> tuple[dict, dict, list]:
        env = environment(self.family_profile)
        metrics, measure = decoding_metrics(env, settings, self.family_profile.max_new_tokens, self.clock)
        gates = self.outcome_gates(metrics, speedups=metrics["speed_ratio_samples"], stride=settings.batch,
                                   remeasure=lambda: measure()["group_ratios"])
        return settings.params(task="generative", queries=len(env.queries)), metrics, gates

    def measure_scoring(self, settings) -> tuple[dict, dict, list]:
        env = environment(self.family_profile)
        metrics = scoring_metrics(env)
        return settings.params(task="loglik", queries=len(env.questions)), metrics, \
            self.outcome_gates(metrics, speed=False)

    def not_applicable(self, settings, reason: str) -> tuple[dict, dict, list]:
        """A setting whose knob cannot act on this task: recorded as such (no accuracy is reported for it)."""
        return settings.params(task="loglik", applicable=False), {"not_applicable": reason}, []
