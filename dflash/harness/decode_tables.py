"""The decode family's tables (dflash.harness.decode_family): one per experiment of the engine's ablations, from
the case records of dflash.harness.render.

Metrics read per experiment (lists are per prompt unless said otherwise):
  block_size:  per_prompt_tau, speedup_samples
  full_length: per_prompt_tau, tpot_s, ttft_s, tokens_per_s, output_tokens, exact_match (bools vs
               target-only); params: block_size (1 = baseline) or mode, max_new_tokens
  dynamic:     per_prompt_tau, block_usage {block size: cycles}, switches, transitions,
               realized_tokens_per_s {block size: tokens/s}, speedup_vs_best_fixed; params: scheduler
  profiling:   time_s {"draft": s, "verify": s, "other": s}, cycles, tau_by_bucket {"0-255": [per-cycle tau]}
  the research-backlog variants: the variant table (knobs, tau, speedup, per-cycle costs); an ablation of a new
  idea without a table of its own gets it too (with full case ids), or, when it did not measure tau and speedup
  against target-only, a generic table of every metric.
"""
from __future__ import annotations

import math
import statistics
from typing import Callable

from .render import (DASH, fmt, generic_table, generic_value, inline, mean_ci_cell, metrics_of, numeric_key, params_of,
                     range_cell, ratio_cell, table, tpot_speedups, verdict_cell)

TITLES = {"block_size": "Block-size sweep", "full_length": "Full-length runs",
          "peers": "Peer benchmark (transformers greedy / prompt lookup / target-only / DFlash)",
          "dynamic": "Dynamic block-size scheduling", "profiling": "Per-cycle profiling"}


def _block_size(record: dict) -> float:
    value = params_of(record).get("block_size")
    return value if isinstance(value, (int, float)) else math.inf


def _is_baseline(record: dict) -> bool:
    return params_of(record).get("mode") == "baseline" or params_of(record).get("block_size") == 1


def block_size_table(records: list[dict]) -> str:
    rows = []
    for r in sorted(records, key=lambda r: (_block_size(r), r["id"])):
        m = metrics_of(r)
        speedups, taus = m.get("speedup_samples") or [], m.get("per_prompt_tau") or []
        spread = range_cell(speedups)
        rows.append([str(params_of(r).get("block_size", r["id"])), str(len(taus)), str(len(speedups)),
                     mean_ci_cell(speedups), spread, mean_ci_cell(tpot_speedups(m)), mean_ci_cell(taus),
                     verdict_cell(r)])
    headers = ["Block size", "Prompts (n)", "Speedup runs (n)", "Speedup mean [95% CI]", "Speedup range",
               "TPOT speedup mean [95% CI]", "Tau mean [95% CI]", "Verdict"]
    return table(headers, rows, [True] * 7 + [False])


def _mode(record: dict) -> str:
    params = params_of(record)
    if params.get("mode"):
        return str(params["mode"])
    return "baseline (bs=1)" if _is_baseline(record) else f"bs={params.get('block_size', '?')}"


def full_length_table(records: list[dict]) -> str:
    base = next((r for r in records if _is_baseline(r) and metrics_of(r).get("tpot_s")), None)
    base_tpot = sum(metrics_of(base)["tpot_s"]) / len(metrics_of(base)["tpot_s"]) if base else None
    rows = []
    for r in sorted(records, key=lambda r: (not _is_baseline(r), _block_size(r), r["id"])):
        m = metrics_of(r)
        outputs, cap = m.get("output_tokens") or [], params_of(r).get("max_new_tokens")
        hit_cap = ratio_cell(sum(o >= cap for o in outputs), len(outputs)) if outputs and cap else DASH
        matches = m.get("exact_match")
        exact = ratio_cell(sum(bool(x) for x in matches), len(matches)) if matches else DASH
        if matches and m.get("float_ties"):
            exact += f" (+{len(m['float_ties'])} float tie{'s' if len(m['float_ties']) > 1 else ''})"
        tpot = m.get("tpot_s") or []
        speedup = f"{base_tpot / (sum(tpot) / len(tpot)):.2f}x" if base_tpot and tpot and sum(tpot) > 0 else DASH
        n = len(m.get("per_prompt_tau") or tpot or outputs)
        rows.append([_mode(r), str(n), mean_ci_cell(tpot, 1000), mean_ci_cell(m.get("ttft_s"), 1000),
                     mean_ci_cell(m.get("tokens_per_s")), mean_ci_cell(m.get("per_prompt_tau")),
                     mean_ci_cell(outputs), hit_cap, exact, speedup, verdict_cell(r)])
    headers = ["Mode", "n", "TPOT ms [95% CI]", "TTFT ms [95% CI]", "Tokens/s [95% CI]", "Tau [95% CI]",
               "Avg output tokens [95% CI]", "Hit cap", "Exact match vs target-only", "TPOT speedup", "Verdict"]
    return table(headers, rows, [False] + [True] * 9 + [False])


def _by_block_size(mapping: dict, value: Callable[[float], str], order: str) -> str:
    if not mapping:
        return DASH
    items = list(mapping.items())
    if order == "share":
        items.sort(key=lambda kv: (-kv[1], numeric_key(kv[0])))
    else:
        items.sort(key=lambda kv: numeric_key(kv[0]))
    return ", ".join(f"{k}: {value(v)}" for k, v in items)


def dynamic_table(records: list[dict]) -> str:
    rows = []
    for r in sorted(records, key=lambda r: (str(params_of(r).get("scheduler", "")), r["id"])):
        m = metrics_of(r)
        usage = m.get("block_usage") or {}
        total = sum(usage.values())
        shares = {k: v / total for k, v in usage.items()} if total else {}
        switches, transitions = m.get("switches"), m.get("transitions")
        switch_rate = (f"{switches / transitions:.1%} ({switches}/{transitions})"
                       if switches is not None and transitions else DASH)
        taus = m.get("per_prompt_tau") or []
        rows.append([str(params_of(r).get("scheduler", r["id"])), str(len(taus)), mean_ci_cell(taus),
                     _by_block_size(shares, lambda s: f"{s:.1%}", "share"), switch_rate,
                     _by_block_size(m.get("realized_tokens_per_s") or {}, fmt, "size"),
                     mean_ci_cell(m.get("speedup_vs_best_fixed")), verdict_cell(r)])
    headers = ["Scheduler", "n", "Tau [95% CI]", "Block usage (cycles)", "Switch rate",
               "Realized tokens/s by block size", "Speedup vs best fixed [95% CI]", "Verdict"]
    return table(headers, rows, [False, True, True, False, True, False, True, False])


def profiling_tables(records: list[dict]) -> str:
    shares, buckets = [], []
    for r in sorted(records, key=lambda r: r["id"]):
        m = metrics_of(r)
        times = m.get("time_s") or {}
        total = sum(times.get(k, 0.0) for k in ("draft", "verify", "other"))
        cycles = m.get("cycles")
        share = [f"{times.get(k, 0.0) / total:.1%}" if total else DASH for k in ("draft", "verify", "other")]
        per_cycle = f"{1000 * total / cycles:.2f}" if total and cycles else DASH
        shares.append([r["id"], str(cycles if cycles is not None else DASH), *share, per_cycle, verdict_cell(r)])
        for bucket, taus in sorted((m.get("tau_by_bucket") or {}).items(), key=lambda kv: numeric_key(kv[0])):
            buckets.append([r["id"], str(bucket), str(len(taus)), mean_ci_cell(taus)])
    parts = [table(["Case", "Cycles", "Draft time", "Verify time", "Other time", "Mean cycle ms", "Verdict"],
                   shares, [False] + [True] * 5 + [False])]
    if buckets:
        parts += ["Tau by token-index bucket (n = cycles):",
                  table(["Case", "Token index", "n", "Tau [95% CI]"], buckets, [False, False, True, True])]
    return "\n\n".join(parts)


def batched_table(records: list[dict]) -> str:
    """Batched prompts: throughput ratios per group of prompts (all against target-only, one prompt at a time),
    what batching costs per batch cycle, and per-prompt tau and exact match."""
    rows = []
    for r in sorted(records, key=lambda r: r["id"]):
        m, p = metrics_of(r), params_of(r)
        exact = m.get("exact_match") or []
        rows.append([r["id"], str(p.get("batch_size")), "compact" if p.get("compact") else "mask-only",
                     mean_ci_cell(m.get("speedup_samples")), mean_ci_cell(m.get("speedup_vs_unbatched_samples")),
                     mean_ci_cell(m.get("target_batched_speedup_samples")), mean_ci_cell(m.get("per_prompt_tau")),
                     fmt(m.get("rows_per_cycle")), fmt(m.get("verify_s_per_cycle")), fmt(m.get("padding_fraction")),
                     ratio_cell(sum(exact), len(exact)), verdict_cell(r)])
    headers = ["Case", "Batch", "Cache", "Speedup vs target-only [95% CI]", "vs unbatched DFlash",
               "Target-only batched vs target-only", "Tau mean [95% CI]", "Rows/cycle", "Verify s/cycle",
               "Masked cache share", "Exact match", "Verdict"]
    return table(headers, rows, [False, True, False] + [True] * 8 + [False])


def peers_table(records: list[dict]) -> str:
    """Peer benchmark (dflash.harness.peers): one row per decoding mode of each case, against transformers greedy."""
    def mode_order(mode: str) -> tuple:  # peers first, then DFlash by block size, the scheduler last
        fixed = {"hf-greedy": 0, "hf-prompt-lookup": 1, "target-only": 2, "dflash scheduler": 99}
        return (fixed.get(mode, 3), numeric_key(mode.rpartition("=")[2]))

    rows = []
    for r in sorted(records, key=lambda r: r["id"]):
        modes = metrics_of(r).get("modes") or {}
        for mode in sorted(modes, key=mode_order):
            m = modes[mode]
            ties = len(m.get("float_ties") or {})
            milliseconds = [fmt(1e3 * m[k]) if k in m else DASH for k in ("t1_s", "t_verify_s", "t_draft_s")]
            rows.append([r["id"], mode, fmt(m.get("tokens_per_s")), fmt(m.get("ratio_to_hf_greedy")),
                         fmt(m.get("tau")), ratio_cell(m.get("identical_to_hf_greedy", 0), m.get("n", 0)) +
                         (f" ({ties} float ties)" if ties else ""), *milliseconds, fmt(m.get("ceiling")),
                         fmt(m.get("efficiency")), fmt(m.get("efficiency_vs_target_only")), verdict_cell(r)])
    headers = ["Case", "Mode", "Tokens/s", "Ratio to HF greedy", "Tau", "Identical to HF greedy", "T(1) ms",
               "T(verify) ms", "T(draft) ms", "Ceiling tau*T(1)/(T(verify)+T(draft))", "Efficiency (ratio / ceiling)",
               "Efficiency vs own target-only", "Verdict"]
    return table(headers, rows, [False, False] + [True] * 10 + [False])


def protocol_variant_table(records: list[dict], full_ids: bool = False) -> str:
    """Backlog variants through the engine protocol (multiround, suffix_recycling, refinement,
    candidate_diversity, the tree variants): knobs, tau, throughput and speedup vs target-only (and vs plain
    DFlash where the case measured it), and what the variant costs per cycle (the `*_per_cycle` metrics of
    dflash.engine.protocol_costs). A verify-time-vs-packed-nodes sweep, when recorded, follows the table."""
    costs = sorted({k for r in records for k in metrics_of(r) if k.endswith("_per_cycle")}
                   - {"draft_s_per_cycle", "verify_s_per_cycle"})  # seconds get their own ms columns
    versus_dflash = any("speedup_vs_dflash_samples" in metrics_of(r) for r in records)
    rows = []
    for r in sorted(records, key=lambda r: r["id"]):
        m, p = metrics_of(r), params_of(r)
        exact = m.get("exact_match") or []
        knobs = ", ".join(f"{k}={generic_value(v) if not isinstance(v, list) else tuple(v)}" for k, v in p.items())
        rows.append([r["id"] if full_ids else r["id"].split("[")[-1].rstrip("]"), knobs, str(len(m.get("per_prompt_tau") or [])),
                     mean_ci_cell(m.get("per_prompt_tau")), fmt(m.get("tokens_per_s_total")),
                     mean_ci_cell(m.get("speedup_samples")),
                     *([mean_ci_cell(m.get("speedup_vs_dflash_samples"))] if versus_dflash else []),
                     ratio_cell(sum(bool(x) for x in exact), len(exact)),
                     fmt(1e3 * m["draft_s_per_cycle"]) if "draft_s_per_cycle" in m else DASH,
                     fmt(1e3 * m["verify_s_per_cycle"]) if "verify_s_per_cycle" in m else DASH,
                     *(fmt(m.get(k)) if k in m else DASH for k in costs), verdict_cell(r)])
    headers = ["Case", "Knobs", "Prompts (n)", "Tau mean [95% CI]", "Tokens/s", "Speedup vs target-only [95% CI]",
               *(["Speed vs plain DFlash [95% CI]"] if versus_dflash else []), "Exact match", "Draft ms/cycle",
               "Verify ms/cycle", *(k.removesuffix("_per_cycle").replace("_", " ") + "/cycle" for k in costs),
               "Verdict"]
    text = table(headers, rows, [False, False] + [True] * (7 + versus_dflash + len(costs)) + [False])
    sweeps = [m["verify_s_by_packed_nodes"] for m in map(metrics_of, records) if m.get("verify_s_by_packed_nodes")]
    if sweeps:
        nodes = sorted({k for sweep in sweeps for k in sweep}, key=numeric_key)
        cells = [f"{inline(k)}: {fmt(1e3 * statistics.median(s[k] for s in sweeps if k in s))} ms" for k in nodes]
        text += (f"\n\nTarget verify time by packed node count (median over {len(sweeps)} cases): "
                 + ", ".join(cells) + ".")
    return text


def default_renderer(records: list[dict]):
    """A new ablation without a table of its own: the variant table when its cases measured tau and speedup
    against target-only (`case.measure`), with full case ids, else every metric."""
    measured = all({"per_prompt_tau", "speedup_samples", "exact_match", "tokens_per_s_total"} <= set(metrics_of(r))
                   for r in records)
    return (lambda group: protocol_variant_table(group, full_ids=True)) if measured else generic_table
