"""Markdown summary of a run from its case records (plain dicts, as stored by results.ResultsFile).

Case record layout (all keys but `id` optional):

    {"id": "block_size/bs=8",              # unique case id
     "experiment": "block_size",           # block_size | full_length | dynamic | profiling | any other name
     "group": "AIME25, max_new_tokens=256",# one table per (experiment, group)
     "title": "Fast-dLLM v2",              # its section's title (a family's display name); default from TITLES
     "params": {"block_size": 8},
     "metrics": {...},                     # per experiment, below
     "status": "done",                     # done | skipped | error (skipped: "not run", never "passed")
     "reason": "...",                      # why skipped / what failed
     "verdict": "pass",                    # overall; defaults to the worst of the gates' verdicts
     "gates": [GateResult.to_dict(), ...]}

Metrics read per experiment (lists are per prompt unless said otherwise):
  block_size:  per_prompt_tau, speedup_samples
  full_length: per_prompt_tau, tpot_s, ttft_s, tokens_per_s, output_tokens, exact_match (bools vs
               target-only); params: block_size (1 = baseline) or mode, max_new_tokens
  dynamic:     per_prompt_tau, block_usage {block size: cycles}, switches, transitions,
               realized_tokens_per_s {block size: tokens/s}, speedup_vs_best_fixed; params: scheduler
  profiling:   time_s {"draft": s, "verify": s, "other": s}, cycles, tau_by_bucket {"0-255": [per-cycle tau]}
  anything else goes to a generic table (lists of numbers as mean [CI]).

Every mean is shown with n and a 95% Student-t interval. If announced cases have no record (or there are
no records at all) the summary starts with "INCOMPLETE: k of n cases".
"""
from __future__ import annotations

import math
import os
import re
import statistics
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..errors import DFlashError
from .fileio import atomic_write_text
from .stats import mcnemar_exact, mean_ci, worst_verdict

TITLES = {"block_size": "Block-size sweep", "full_length": "Full-length runs",
          "peers": "Peer benchmark (transformers greedy / prompt lookup / target-only / DFlash)",
          "dynamic": "Dynamic block-size scheduling", "profiling": "Per-cycle profiling"}
FINGERPRINT_ORDER = ("profile", "testbed", "hardware", "torch", "transformers", "python", "dtype", "git_sha", "code",
                     "seeds")
FINGERPRINT_DETAIL = ("cpu", "gpu")  # shown as one line by "hardware"
DASH = "—"


# --------------------------------------------------------------------------------------------------
# Cell formatting


def decimals(x: float) -> int:
    """Decimals for a number of this size: 1 from 100 up, 2 from 1 up, else three significant digits
    (tau 5.40, tokens/s 127.7, ratio 0.940, TPOT 0.00787)."""
    if not math.isfinite(x) or abs(x) >= 100:
        return 1
    if abs(x) >= 1 or x == 0:
        return 2
    return 2 - math.floor(math.log10(abs(x)))


def fmt(x: float | None, places: int | None = None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return DASH
    if isinstance(x, (bool, int)):
        return str(x)
    return f"{x:.{decimals(x) if places is None else places}f}"


def mean_ci_cell(samples: Sequence[float] | None, scale: float = 1.0) -> str:
    """"5.40 [5.21, 5.59]" (the interval uses the mean's decimals); "[n/a]" when n == 1; a dash when
    there are no samples."""
    if not samples:
        return DASH
    try:
        mean, low, high = (v * scale for v in mean_ci(samples))
    except DFlashError:  # NaN or non-numeric samples: show it, never lose the whole summary over one cell
        return "invalid data"
    places = decimals(mean)
    interval = "n/a" if math.isnan(low) else f"{fmt(low, places)}, {fmt(high, places)}"
    return f"{fmt(mean, places)} [{interval}]"


def _range_cell(samples: Sequence[float]) -> str:
    """"2.82 to 3.05"; a dash when empty, "invalid data" when not all numbers."""
    if not samples:
        return DASH
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in samples):
        return "invalid data"
    return f"{fmt(min(samples))} to {fmt(max(samples))}"


def _ratio(k: int, n: int) -> str:
    return f"{k}/{n} ({k / n:.1%})" if n else DASH


def _p(gate: dict) -> str:
    adjusted = gate.get("p_adjusted")
    return f"p_adj={adjusted:.2g}" if adjusted is not None else f"p={gate.get('p_value', math.nan):.2g}"


def _measurements(gate: dict) -> str:
    """A re-measured throughput gate: both measurements' changes ("; measured -18.0%, then -2.1%")."""
    runs = gate.get("measurements") or []
    return " (measured " + ", then ".join(f"{m['rel_change']:+.1%}" for m in runs) + ")" if runs else ""


def overall_verdict(record: dict) -> str:
    """skipped / error from the status, else the record's verdict, else the worst gate verdict."""
    status = record.get("status", "done")
    if status in ("skipped", "error"):
        return status
    gates = record.get("gates") or []
    return record.get("verdict") or (worst_verdict([g["verdict"] for g in gates]) if gates else "no gate")


def verdict_cell(record: dict) -> str:
    """Overall verdict in capitals, with the reason of a skip/error or the details of every gate that did
    not simply pass."""
    verdict = overall_verdict(record)
    if verdict in ("skipped", "error"):
        reason = record.get("reason")
        return f"{verdict.upper()}: {reason}" if reason else verdict.upper()
    details = [_gate_detail(g) for g in record.get("gates") or []
               if g.get("verdict") != "pass" or g.get("measurements") or g.get("not_gated")]
    return verdict.upper() + (f" ({'; '.join(details)})" if details else "")


def _gate_detail(gate: dict) -> str:
    kind = gate.get("kind", "gate")
    if gate.get("not_gated"):
        return f"{kind} not gated: {gate['not_gated']}"
    source = f" vs {gate['source']}" if gate.get("source") else ""
    return f"{kind} {gate.get('rel_change', math.nan):+.1%}{_measurements(gate)}, {_p(gate)}{source}"


def throughput_sources(records: Sequence[dict]) -> str:
    """What the run's throughput gates compared with: "12 stored baseline, testbed K; 3 not gated"."""
    counts: dict[str, int] = {}
    for record in records:
        for gate in record.get("gates") or []:
            source = "not gated" if gate.get("not_gated") else gate.get("source")
            if gate.get("kind") == "throughput" and source:
                counts[source] = counts.get(source, 0) + 1
    return "; ".join(f"{n} {source}" for source, n in sorted(counts.items()))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")  # newlines, CR, tabs, other controls, line separators


def inline(value) -> str:
    """Any text as one line of literal markdown: control characters (newline, CR, ...) become a space; a
    backslash, HTML (`&`, `<`, `>`), backticks and the `](` of a link are escaped. Record fields (case ids,
    params, groups, messages, skip reasons) come from test code and files: they must not open a tag, end a
    line or a table row, start a code span or make a link."""
    text = _CONTROL.sub(" ", str(value))
    text = text.replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("`", "\\`").replace("](", "]\\(")


def cell(value) -> str:
    """A table cell: `inline`, and pipes escaped so the cell cannot split the row."""
    return inline(value).replace("|", "\\|")


def code(value) -> str:
    """`value` as inline code (one line); text with a backtick or HTML characters as escaped plain text instead
    (inside a code span nothing can be escaped, so it could not be shown literally everywhere)."""
    text = _CONTROL.sub(" ", str(value))
    return inline(text) if re.search(r"[`<>&]", text) else f"`{text}`"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[bool] | None = None) -> str:
    """Generic markdown table; numeric columns are right-aligned. Every header and cell goes through `cell`
    (pipes, newlines, HTML, backticks escaped), so no value can break the table."""
    numeric = numeric or [False] * len(headers)
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---:" if right else "---" for right in numeric) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Per-experiment tables


def _metrics(record: dict) -> dict:
    return record.get("metrics") or {}


def _params(record: dict) -> dict:
    return record.get("params") or {}


def _block_size(record: dict) -> float:
    value = _params(record).get("block_size")
    return value if isinstance(value, (int, float)) else math.inf


def _is_baseline(record: dict) -> bool:
    return _params(record).get("mode") == "baseline" or _params(record).get("block_size") == 1


def block_size_table(records: list[dict]) -> str:
    rows = []
    for r in sorted(records, key=lambda r: (_block_size(r), r["id"])):
        m = _metrics(r)
        speedups, taus = m.get("speedup_samples") or [], m.get("per_prompt_tau") or []
        spread = _range_cell(speedups)
        rows.append([str(_params(r).get("block_size", r["id"])), str(len(taus)), str(len(speedups)),
                     mean_ci_cell(speedups), spread, mean_ci_cell(tpot_speedups(m)), mean_ci_cell(taus),
                     verdict_cell(r)])
    headers = ["Block size", "Prompts (n)", "Speedup runs (n)", "Speedup mean [95% CI]", "Speedup range",
               "TPOT speedup mean [95% CI]", "Tau mean [95% CI]", "Verdict"]
    return table(headers, rows, [True] * 7 + [False])


def tpot_speedups(metrics: dict) -> list[float]:
    """Per prompt: target-only TPOT / variant TPOT (prefill excluded), beside the gated tokens/s speedup (prefill
    included). Shown as a mean of per-prompt ratios with its interval; the research's "decoding speedup" (and
    the published TPOT speedups) is the ratio of the mean TPOTs, which weights slow prompts more."""
    return [b / v for b, v in zip(metrics.get("baseline_tpot_s") or [], metrics.get("tpot_s") or []) if b and v]


def _mode(record: dict) -> str:
    params = _params(record)
    if params.get("mode"):
        return str(params["mode"])
    return "baseline (bs=1)" if _is_baseline(record) else f"bs={params.get('block_size', '?')}"


def full_length_table(records: list[dict]) -> str:
    base = next((r for r in records if _is_baseline(r) and _metrics(r).get("tpot_s")), None)
    base_tpot = sum(_metrics(base)["tpot_s"]) / len(_metrics(base)["tpot_s"]) if base else None
    rows = []
    for r in sorted(records, key=lambda r: (not _is_baseline(r), _block_size(r), r["id"])):
        m = _metrics(r)
        outputs, cap = m.get("output_tokens") or [], _params(r).get("max_new_tokens")
        hit_cap = _ratio(sum(o >= cap for o in outputs), len(outputs)) if outputs and cap else DASH
        matches = m.get("exact_match")
        exact = _ratio(sum(bool(x) for x in matches), len(matches)) if matches else DASH
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
        items.sort(key=lambda kv: (-kv[1], _numeric_key(kv[0])))
    else:
        items.sort(key=lambda kv: _numeric_key(kv[0]))
    return ", ".join(f"{k}: {value(v)}" for k, v in items)


def _numeric_key(text) -> tuple:
    match = re.match(r"\s*(-?\d+(?:\.\d+)?)", str(text))
    return (0, float(match.group(1)), str(text)) if match else (1, 0.0, str(text))


def dynamic_table(records: list[dict]) -> str:
    rows = []
    for r in sorted(records, key=lambda r: (str(_params(r).get("scheduler", "")), r["id"])):
        m = _metrics(r)
        usage = m.get("block_usage") or {}
        total = sum(usage.values())
        shares = {k: v / total for k, v in usage.items()} if total else {}
        switches, transitions = m.get("switches"), m.get("transitions")
        switch_rate = (f"{switches / transitions:.1%} ({switches}/{transitions})"
                       if switches is not None and transitions else DASH)
        taus = m.get("per_prompt_tau") or []
        rows.append([str(_params(r).get("scheduler", r["id"])), str(len(taus)), mean_ci_cell(taus),
                     _by_block_size(shares, lambda s: f"{s:.1%}", "share"), switch_rate,
                     _by_block_size(m.get("realized_tokens_per_s") or {}, fmt, "size"),
                     mean_ci_cell(m.get("speedup_vs_best_fixed")), verdict_cell(r)])
    headers = ["Scheduler", "n", "Tau [95% CI]", "Block usage (cycles)", "Switch rate",
               "Realized tokens/s by block size", "Speedup vs best fixed [95% CI]", "Verdict"]
    return table(headers, rows, [False, True, True, False, True, False, True, False])


def profiling_tables(records: list[dict]) -> str:
    shares, buckets = [], []
    for r in sorted(records, key=lambda r: r["id"]):
        m = _metrics(r)
        times = m.get("time_s") or {}
        total = sum(times.get(k, 0.0) for k in ("draft", "verify", "other"))
        cycles = m.get("cycles")
        share = [f"{times.get(k, 0.0) / total:.1%}" if total else DASH for k in ("draft", "verify", "other")]
        per_cycle = f"{1000 * total / cycles:.2f}" if total and cycles else DASH
        shares.append([r["id"], str(cycles if cycles is not None else DASH), *share, per_cycle, verdict_cell(r)])
        for bucket, taus in sorted((m.get("tau_by_bucket") or {}).items(), key=lambda kv: _numeric_key(kv[0])):
            buckets.append([r["id"], str(bucket), str(len(taus)), mean_ci_cell(taus)])
    parts = [table(["Case", "Cycles", "Draft time", "Verify time", "Other time", "Mean cycle ms", "Verdict"],
                   shares, [False] + [True] * 5 + [False])]
    if buckets:
        parts += ["Tau by token-index bucket (n = cycles):",
                  table(["Case", "Token index", "n", "Tau [95% CI]"], buckets, [False, False, True, True])]
    return "\n\n".join(parts)


def _generic_value(value) -> str:
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in value):
        return f"{mean_ci_cell(value)} (n={len(value)})"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_generic_value(v)}" for k, v in value.items()) or DASH
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt(value)
    return DASH if value is None else str(value)


def generic_table(records: list[dict], skip: Sequence[str] = ("cycle_trace",)) -> str:
    """Any other experiment: case id, every param and metric (union over the records), verdict."""
    param_keys = sorted({k for r in records for k in _params(r)})
    metric_keys = sorted({k for r in records for k in _metrics(r)} - set(skip))
    rows = [[r["id"], *(_generic_value(_params(r).get(k)) for k in param_keys),
             *(_generic_value(_metrics(r).get(k)) for k in metric_keys), verdict_cell(r)]
            for r in sorted(records, key=lambda r: r["id"])]
    return table(["Case", *param_keys, *metric_keys, "Verdict"], rows)


def batched_table(records: list[dict]) -> str:
    """Batched prompts: throughput ratios per group of prompts (all against target-only, one prompt at a time),
    what batching costs per batch cycle, and per-prompt tau and exact match."""
    rows = []
    for r in sorted(records, key=lambda r: r["id"]):
        m, p = _metrics(r), _params(r)
        exact = m.get("exact_match") or []
        rows.append([r["id"], str(p.get("batch_size")), "compact" if p.get("compact") else "mask-only",
                     mean_ci_cell(m.get("speedup_samples")), mean_ci_cell(m.get("speedup_vs_unbatched_samples")),
                     mean_ci_cell(m.get("target_batched_speedup_samples")), mean_ci_cell(m.get("per_prompt_tau")),
                     fmt(m.get("rows_per_cycle")), fmt(m.get("verify_s_per_cycle")), fmt(m.get("padding_fraction")),
                     _ratio(sum(exact), len(exact)), verdict_cell(r)])
    headers = ["Case", "Batch", "Cache", "Speedup vs target-only [95% CI]", "vs unbatched DFlash",
               "Target-only batched vs target-only", "Tau mean [95% CI]", "Rows/cycle", "Verify s/cycle",
               "Masked cache share", "Exact match", "Verdict"]
    return table(headers, rows, [False, True, False] + [True] * 8 + [False])


def peers_table(records: list[dict]) -> str:
    """Peer benchmark (dflash.harness.peers): one row per decoding mode of each case, against transformers greedy."""
    def mode_order(mode: str) -> tuple:  # peers first, then DFlash by block size, the scheduler last
        fixed = {"hf-greedy": 0, "hf-prompt-lookup": 1, "target-only": 2, "dflash scheduler": 99}
        return (fixed.get(mode, 3), _numeric_key(mode.rpartition("=")[2]))

    rows = []
    for r in sorted(records, key=lambda r: r["id"]):
        modes = _metrics(r).get("modes") or {}
        for mode in sorted(modes, key=mode_order):
            m = modes[mode]
            ties = len(m.get("float_ties") or {})
            milliseconds = [fmt(1e3 * m[k]) if k in m else DASH for k in ("t1_s", "t_verify_s", "t_draft_s")]
            rows.append([r["id"], mode, fmt(m.get("tokens_per_s")), fmt(m.get("ratio_to_hf_greedy")),
                         fmt(m.get("tau")), _ratio(m.get("identical_to_hf_greedy", 0), m.get("n", 0)) +
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
    costs = sorted({k for r in records for k in _metrics(r) if k.endswith("_per_cycle")}
                   - {"draft_s_per_cycle", "verify_s_per_cycle"})  # seconds get their own ms columns
    versus_dflash = any("speedup_vs_dflash_samples" in _metrics(r) for r in records)
    rows = []
    for r in sorted(records, key=lambda r: r["id"]):
        m, p = _metrics(r), _params(r)
        exact = m.get("exact_match") or []
        knobs = ", ".join(f"{k}={_generic_value(v) if not isinstance(v, list) else tuple(v)}" for k, v in p.items())
        rows.append([r["id"] if full_ids else r["id"].split("[")[-1].rstrip("]"), knobs, str(len(m.get("per_prompt_tau") or [])),
                     mean_ci_cell(m.get("per_prompt_tau")), fmt(m.get("tokens_per_s_total")),
                     mean_ci_cell(m.get("speedup_samples")),
                     *([mean_ci_cell(m.get("speedup_vs_dflash_samples"))] if versus_dflash else []),
                     _ratio(sum(bool(x) for x in exact), len(exact)),
                     fmt(1e3 * m["draft_s_per_cycle"]) if "draft_s_per_cycle" in m else DASH,
                     fmt(1e3 * m["verify_s_per_cycle"]) if "verify_s_per_cycle" in m else DASH,
                     *(fmt(m.get(k)) if k in m else DASH for k in costs), verdict_cell(r)])
    headers = ["Case", "Knobs", "Prompts (n)", "Tau mean [95% CI]", "Tokens/s", "Speedup vs target-only [95% CI]",
               *(["Speed vs plain DFlash [95% CI]"] if versus_dflash else []), "Exact match", "Draft ms/cycle",
               "Verify ms/cycle", *(k.removesuffix("_per_cycle").replace("_", " ") + "/cycle" for k in costs),
               "Verdict"]
    text = table(headers, rows, [False, False] + [True] * (7 + versus_dflash + len(costs)) + [False])
    sweeps = [m["verify_s_by_packed_nodes"] for m in map(_metrics, records) if m.get("verify_s_by_packed_nodes")]
    if sweeps:
        nodes = sorted({k for sweep in sweeps for k in sweep}, key=_numeric_key)
        cells = [f"{inline(k)}: {fmt(1e3 * statistics.median(s[k] for s in sweeps if k in s))} ms" for k in nodes]
        text += (f"\n\nTarget verify time by packed node count (median over {len(sweeps)} cases): "
                 + ", ".join(cells) + ".")
    return text


def cascade_table(records: list[dict]) -> str:
    """Cascade policies (dflash.cascade): accuracy and cost over the same queries, with 95% CIs, stage usage."""
    rows = []
    for r in sorted(records, key=lambda r: (_params(r).get("policy", ""), _params(r).get("lam") or 0)):
        m, per_query = _metrics(r), _metrics(r).get("per_query") or {}
        usage = " / ".join(f"{100 * u:.0f}%" for u in m.get("stage_usage") or [])
        lam = _params(r).get("lam")
        rows.append([r["id"].split("[")[-1].rstrip("]"), "-" if lam is None else fmt(lam),
                     str(len(per_query.get("qids") or [])), mean_ci_cell(per_query.get("correct")),
                     mean_ci_cell(per_query.get("cost")), usage, verdict_cell(r)])
    return ("Cost: token-normalised seconds, the largest model's median query = 1; a cascade pays every stage it "
            "ran. The full cascade report of this run's table (frontier, lam table, calibration and regret "
            "plots) is in cascade-<profile>/summary.md next to this file.\n\n" + table(["Case", "lam", "queries", "accuracy", "cost", "stage usage (cheapest first)",
                                 "Verdict"], rows, numeric=[False, True, True, True, True, False, False]))


def _mcnemar_cell(control: list[int], new: list[int]) -> str:
    """Accuracy change against a control on the same queries: difference, lost/gained and the exact two-sided
    McNemar p (binomial on the discordant queries)."""
    lost, gained, p = mcnemar_exact(control, new)
    return f"{(gained - lost) / len(new):+.3f} (-{lost}/+{gained}, p {p:.2g})"


def _geomean_ci_cell(samples: Sequence[float] | None) -> str:
    """Geometric mean with the 95% t interval of the log samples ("1.52x [1.40, 1.65]")."""
    if not samples:
        return DASH
    centre, low, high = (math.exp(v) for v in mean_ci([math.log(x) for x in samples]))
    interval = "n/a" if math.isnan(low) else f"{low:.2f}, {high:.2f}"
    return f"{centre:.2f}x [{interval}]"


def _reuse_schedule(params: dict) -> str:
    """A layer-reuse case's step schedule; a record from before the knob existed ran the only rule there was,
    the one now called "since_full"."""
    return params.get("reuse_schedule", "since_full")


def fastdllm_table(records: list[dict]) -> str:
    """Fast-dLLM v2 (dflash.blockdiffusion): threshold x cache, sub-block, batch; the layer-reuse table of the
    research notes (config, k, subset, schedule, accuracy, tokens/s, total time, reused and computed sub-block
    steps) with the trade-off against the k = 1 control and between the schedules; log-likelihood scoring, where
    layer reuse is not applicable."""
    decoding = [r for r in records if _params(r).get("task") == "generative" and "per_query" in _metrics(r)]
    key = lambda p: (p.get("threshold"), p.get("sub_block_size"), p.get("batch"))  # noqa: E731
    exact = {key(_params(r)): r for r in decoding
             if _params(r).get("cache") == "prefix" and _params(r).get("reuse_k") is None}
    rows = []
    for r in decoding:
        p, m = _params(r), _metrics(r)
        if p.get("reuse_k") is not None:
            continue
        outputs = m.get("outputs") or {}
        reference = exact.get(key(p))
        same = DASH
        if p.get("cache") == "dual" and reference is not None:
            theirs = (_metrics(reference).get("outputs") or {}).get("output_digest") or []
            mine = outputs.get("output_digest") or []
            same = _ratio(sum(a == b for a, b in zip(mine, theirs)), len(mine))
        rows.append([r["id"].split("[")[-1].rstrip("]"), fmt(p.get("threshold")), str(p.get("cache")),
                     str(p.get("sub_block_size")), str(p.get("batch")), str(len(m["per_query"]["qids"])),
                     mean_ci_cell(m["per_query"]["correct"]), fmt(m.get("tokens_per_s")),
                     fmt(m.get("ar_tokens_per_s")), _geomean_ci_cell(m.get("speed_ratio_samples")),
                     mean_ci_cell(outputs.get("forwards_per_token")), mean_ci_cell(outputs.get("tokens")),
                     _ratio(sum(outputs.get("agrees_with_ar") or []), len(outputs.get("agrees_with_ar") or [])),
                     same, verdict_cell(r)])
    text = ("Speed ratio: block-diffusion tokens/s over the AR base's (transformers greedy at the same batch "
            "size), measured interleaved on the same queries, one ratio per batch group, geometric mean "
            "[95% CI]; tokens/s columns are wall-clock. 'Same as exact': outputs identical to the prefix-cache "
            "(exact) decoder's with the same threshold, sub-block and batch (the dual cache is approximate).\n\n"
            + table(["Case", "threshold", "cache", "sub-block", "batch", "queries", "accuracy [95% CI]",
                     "tokens/s", "AR tokens/s", "speed ratio to AR", "forwards/token", "output tokens",
                     "same as AR", "same as exact", "Verdict"], rows,
                    [False, True, False, True, True, True, True, True, True, True, True, True, True, True, False]))
    reuse = [r for r in decoding if _params(r).get("reuse_k") is not None]
    control = next((r for r in reuse if _params(r)["reuse_k"] == 1), None)
    if reuse:
        rows = []
        base = _metrics(control) if control else {}
        def config_key(r):
            p = _params(r)
            return p["reuse_k"], p["subset"], p["mode"], _reuse_schedule(p)
        for r in sorted(reuse, key=config_key):
            p, m = _params(r), _metrics(r)
            outputs = m.get("outputs") or {}
            staleness = ((m.get("reuse") or {}).get("staleness") or {})
            versus = DASH if r is control or not base else _mcnemar_cell(base["per_query"]["correct"],
                                                                          m["per_query"]["correct"])
            speed = DASH if r is control or not base else fmt(
                math.exp(statistics.mean(map(math.log, m["speed_ratio_samples"]))
                         - statistics.mean(map(math.log, base["speed_ratio_samples"]))), 2) + "x"
            longer = DASH if r is control or not base else f"{statistics.mean(outputs['tokens']) / statistics.mean((base.get('outputs') or {})['tokens']) - 1:+.0%}"
            schedule = _reuse_schedule(p)
            config = ("k1 (control)" if r is control
                      else f"k{p['reuse_k']}_{p['subset']}_{p['mode']}" + ("" if schedule == "fork" else f"_{schedule}"))
            steps = (DASH if m.get("reused_steps") is None
                     else f"{m['reused_steps']} / {m['reused_steps'] + m['computed_steps']}")
            rows.append([config, str(p["reuse_k"]), DASH if r is control else p["subset"],
                         DASH if r is control else p["mode"], DASH if r is control else schedule,
                         mean_ci_cell(m["per_query"]["correct"]), steps,
                         fmt(m.get("tokens_per_s")), fmt(m.get("total_seconds")), versus, speed, longer,
                         mean_ci_cell(outputs.get("repetition")),
                         ", ".join(f"L{layer} {value:.3g}" for layer, value in staleness.items()) or DASH,
                         verdict_cell(r)])
        by_config = {config_key(r): r for r in reuse}

        def paired(a, b):
            return _mcnemar_cell(_metrics(a)["per_query"]["correct"], _metrics(b)["per_query"]["correct"])
        pairs = [[f"k{k}_{subset}" + ("" if schedule == "fork" else f" ({schedule})"),
                  paired(r, by_config[k, subset, "residual", schedule])]
                 for (k, subset, mode, schedule), r in sorted(by_config.items())
                 if mode == "output" and k > 1 and (k, subset, "residual", schedule) in by_config]
        schedules = [[f"k{k}_{subset}_{mode}", schedule, paired(by_config[k, subset, mode, "fork"], r)]
                     for (k, subset, mode, schedule), r in sorted(by_config.items())
                     if schedule != "fork" and k > 1 and (k, subset, mode, "fork") in by_config]
        text += ("\n\nLayer reuse (dual cache, threshold and sub-block as the control): the research notes' "
                 "table with the trade-off against the k = 1 control on the same queries (accuracy change with "
                 "the exact McNemar p; speed: ratio of the two cases' speed ratios to AR; output length change). "
                 "Schedule: which sub-block steps reuse; \"fork\" is the research fork's step counter (reset once "
                 "per block, every step counted), \"since_full\" resets it at every whole-block forward and "
                 "counts only sub-block steps (more reuse at the same k). Reused steps: sub-block steps that "
                 "skipped the span, of all sub-block steps, over the case's decodes. Staleness: relative L2 of a "
                 "reused output against fresh computation, per span layer (output mode) or for the span (residual "
                 "mode, at its first layer), on a few queries.\n\n"
                 + table(["Config", "k", "subset", "mode", "schedule", "accuracy [95% CI]", "reused / sub-block steps",
                          "tokens/s", "total time (s)", "accuracy vs k=1", "speed vs k=1", "output length vs k=1",
                          "repetition (3-gram)", "staleness", "Verdict"], rows,
                         [False, True, False, False, False, True, True, True, True, True, True, True, True, False,
                          False]))
        if pairs:
            text += ("\n\nResidual (DeepCache-style) against output reuse (the fork's) at the same k, subset and "
                     "schedule, paired over queries: accuracy change of residual, lost/gained, exact McNemar p.\n\n"
                     + table(["k, subset", "residual - output"], pairs, [False, True]))
        if schedules:
            text += ("\n\nAnother schedule against the fork's at the same k, subset and mode, paired over queries: "
                     "accuracy change of the other schedule, lost/gained, exact McNemar p.\n\n"
                     + table(["Config", "schedule", "schedule - fork"], schedules, [False, False, True]))
        timings = [(*config_key(r), (_metrics(r).get("reuse") or {}))
                   for r in reuse if (_metrics(r).get("reuse") or {}).get("seconds_per_computed_layer_call")]
        if timings:
            text += ("\n\nLayer call times on sub-block steps (staleness run): "
                     + "; ".join(f"k{k}_{subset}_{mode}{'' if schedule == 'fork' else '_' + schedule}: computed "
                                 f"{1e6 * t['seconds_per_computed_layer_call']:.0f} us,"
                                 f" reused {1e6 * t['seconds_per_reused_layer_call']:.0f} us, "
                                 f"{t['layer_calls_skipped']} calls skipped"
                                 for k, subset, mode, schedule, t in timings
                                 if t.get("seconds_per_reused_layer_call")) + ".")
    scoring = [r for r in records if _params(r).get("task") == "loglik"]
    if scoring:
        rows, reasons = [], set()
        for r in scoring:
            m = _metrics(r)
            if "not_applicable" in m:
                reasons.add(m["not_applicable"])
                rows.append([r["id"].split("[")[-1].rstrip("]"), "not applicable", "not applicable"])
            else:
                rows.append([r["id"].split("[")[-1].rstrip("]"), mean_ci_cell(m["per_query"]["correct"]),
                             verdict_cell(r)])
        text += ("\n\nLog-likelihood scoring (multiple choice, one forward per choice):\n\n"
                 + table(["Case", "accuracy [95% CI]", "Verdict"], rows, [False, False, False])
                 + "".join(f"\n\nNot applicable: {reason}." for reason in sorted(reasons)))
    return text


RENDERERS = {"block_size": block_size_table, "full_length": full_length_table, "dynamic": dynamic_table,
             "profiling": profiling_tables, "batched": batched_table, "peers": peers_table, "cascade": cascade_table,
             "fastdllm": fastdllm_table,
             **dict.fromkeys(("multiround", "suffix_recycling", "refinement", "candidate_diversity",
                              "tree_variants"), protocol_variant_table)}


def default_renderer(records: list[dict]):
    """A new ablation without a table of its own: the variant table when its cases measured tau and speedup
    against target-only (`case.measure`), with full case ids, else every metric."""
    measured = all({"per_prompt_tau", "speedup_samples", "exact_match", "tokens_per_s_total"} <= set(_metrics(r))
                   for r in records)
    return (lambda group: protocol_variant_table(group, full_ids=True)) if measured else generic_table


# --------------------------------------------------------------------------------------------------
# Summary


def _dedupe(records: Sequence[dict]) -> list[dict]:
    """Last record per id wins (a resumed case), keeping first-seen order."""
    latest: dict[str, dict] = {}
    for record in records:
        latest[record["id"]] = record
    return list(latest.values())


def _header(records: list[dict], fingerprint: dict, announced: Sequence[str] | None, title: str,
            skipped: dict[str, str] | None = None) -> list[str]:
    lines = [f"# {inline(title)}", ""]
    missing = [a for a in announced if a not in {r["id"] for r in records}] if announced is not None else []
    if not records:
        total = len(announced) if announced else 0
        lines += [f"> **INCOMPLETE: 0 of {total} cases.** No case records: this is not a result.", ""]
    elif missing:
        shown = ", ".join(code(m) for m in missing[:10]) + (", ..." if len(missing) > 10 else "")
        lines += [f"> **INCOMPLETE: {len(announced) - len(missing)} of {len(announced)} cases.** "
                  f"Missing: {shown}.", ""]
    unbaselined = [r["id"] for r in records if r.get("verdict") == "no baseline"]
    if unbaselined:
        shown = ", ".join(code(m) for m in unbaselined[:10]) + (", ..." if len(unbaselined) > 10 else "")
        lines += [f"> **NO BASELINE: {len(unbaselined)} case(s) were not gated** (record them with "
                  f"--update-baselines): {shown}.", ""]
    not_gated = {r["id"]: g["not_gated"] for r in records for g in r.get("gates") or []
                 if g.get("kind") == "throughput" and g.get("not_gated")}
    if not_gated:
        reasons = sorted({inline(reason) for reason in not_gated.values()})
        lines += [f"> **THROUGHPUT NOT GATED: {len(not_gated)} case(s)** ({'; '.join(reasons[:3])}"
                  f"{'; ...' if len(reasons) > 3 else ''}): "
                  + ", ".join(code(m) for m in list(not_gated)[:10]) + (", ..." if len(not_gated) > 10 else "") + ".",
                  ""]
    if skipped:
        reasons = sorted({inline(reason) for reason in skipped.values()})
        lines += [f"Skipped: {len(skipped)} case(s) ({'; '.join(reasons[:3])}{'; ...' if len(reasons) > 3 else ''}).",
                  ""]
    keys = [k for k in FINGERPRINT_ORDER if k in fingerprint] + sorted(set(fingerprint) - set(FINGERPRINT_ORDER)
                                                                        - set(FINGERPRINT_DETAIL))
    rows = [[k.replace("_", " "), str(fingerprint[k])] for k in keys]
    prompts = sorted({len(_metrics(r).get("per_prompt_tau") or []) for r in records} - {0})
    n = f"{len(records)} cases"
    if prompts:
        n += f", {prompts[0]}" + (f"-{prompts[-1]}" if len(prompts) > 1 else "") + " prompts per case"
    rows.append(["cases (n)", n])
    counts: dict[str, int] = {}
    for record in records:
        verdict = overall_verdict(record)
        counts[verdict] = counts.get(verdict, 0) + 1
    rows.append(["verdicts", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or DASH])
    if sources := throughput_sources(records):
        rows.append(["throughput gated against", sources])
    lines += [table(["Run", ""], rows), "",
              "Mean [95% CI]: Student-t interval over n samples (prompts unless a column says otherwise); "
              "n/a when n = 1. Verdicts: regression fails; inconclusive, improvement and not gated are "
              "reported only.", ""]
    return lines


def references_table(records: list[dict]) -> str:
    """Measured next to published: every case that a published figure describes (same dataset, block size,
    budget and temperature), measured tau and speedups against the figure's tau and TPOT speedup."""
    rows = []
    for record in records:
        metrics = _metrics(record)
        for ref in record.get("references") or []:
            rows.append([record.get("id", "?"), mean_ci_cell(metrics.get("per_prompt_tau")),
                         mean_ci_cell(tpot_speedups(metrics)),
                         mean_ci_cell(metrics.get("wall_speedup_samples")), fmt(ref.get("tau")),
                         fmt(ref.get("tpot_speedup")), ref.get("hardware", DASH), ref.get("source", DASH)])
    return table(["case", "tau (measured)", "TPOT speedup (measured)", "tokens/s speedup (measured)",
                  "tau (published)", "TPOT speedup (published)", "published on", "source"], rows,
                 [False, True, True, True, True, True, False, False]) if rows else ""


def render_summary(records: Sequence[dict], fingerprint: dict, *, announced: Sequence[str] | None = None,
                   skipped: dict[str, str] | None = None,
                   title: str = "DFlash ablation summary") -> str:
    """Markdown: header (fingerprint, n, verdict counts, INCOMPLETE banner when cases are missing), then one
    table per (experiment, group): known experiments first in a fixed order, others alphabetically."""
    records = _dedupe(records)
    lines = _header(records, fingerprint, announced, title, skipped)
    order = {name: i for i, name in enumerate(RENDERERS)}
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        key = (str(record.get("experiment", "other")), str(record.get("group", "")))
        groups.setdefault(key, []).append(record)
    for experiment, group in sorted(groups, key=lambda k: (order.get(k[0], len(order)), k)):
        heading = next((r["title"] for r in groups[(experiment, group)] if isinstance(r.get("title"), str)),
                       TITLES.get(experiment, experiment.replace("_", " ").capitalize()))
        lines += [f"## {inline(heading)}" + (f": {inline(group)}" if group else ""), ""]
        render = RENDERERS.get(experiment, default_renderer(groups[(experiment, group)]))
        lines += [render(groups[(experiment, group)]), ""]
    if published := references_table(records):
        lines += ["## Published figures for these cases", "", published, ""]
    return "\n".join(lines).rstrip() + "\n"


def plots_section(files: Sequence[str], notes: Sequence[str] = ()) -> str:
    """The run's pictures (PNG files next to summary.md, as images) and one line per plot left out, saying why;
    "" when there is neither."""
    if not files and not notes:
        return ""
    lines = ["## Plots", ""] + [f"![{inline(Path(name).stem)}]({inline(Path(name).name)})" for name in files]
    if notes:
        lines += ([""] if files else []) + ["Left out:", ""] + [f"- {inline(note)}" for note in notes]
    return "\n".join(lines) + "\n"


def write_summary(directory: str | os.PathLike, text: str, name: str = "summary.md") -> Path:
    """Atomically write the summary to directory/name (a reader never sees a half-written file)."""
    return atomic_write_text(Path(directory) / name, text)


def append_github_step_summary(text: str) -> bool:
    """Append to $GITHUB_STEP_SUMMARY when set (GitHub Actions job summary); False when not in Actions."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return False
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(text if text.endswith("\n") else text + "\n")
    return True
