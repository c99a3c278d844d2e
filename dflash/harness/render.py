"""Markdown summary of a run from its case records (plain dicts, as stored by results.ResultsFile).

Case record layout (all keys but `id` optional):

    {"id": "block_size/bs=8",              # unique case id
     "experiment": "block_size",           # block_size | full_length | dynamic | profiling | any other name
     "ablation_family": "decode",          # the family that wrote it (dflash.harness.family): it renders it
     "group": "AIME25, max_new_tokens=256",# one table per (experiment, group)
     "params": {"block_size": 8},
     "metrics": {...},                     # per experiment, below
     "status": "done",                     # done | skipped | error (skipped: "not run", never "passed")
     "reason": "...",                      # why skipped / what failed
     "verdict": "pass",                    # overall; defaults to the worst of the gates' verdicts
     "gates": [GateResult.to_dict(), ...]}

What each experiment's table reads is its family's (the decode family's tables: dflash.harness.decode_tables).
Here: the cells every table is built from, the run header, and the summary.

Every mean is shown with n and a 95% Student-t interval. If announced cases have no record (or there are
no records at all) the summary starts with "INCOMPLETE: k of n cases".
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import DFlashError
from .family import FAMILIES, get_family
from .fileio import atomic_write_text
from .stats import mcnemar_exact, mean_ci, worst_verdict

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


def range_cell(samples: Sequence[float]) -> str:
    """"2.82 to 3.05"; a dash when empty, "invalid data" when not all numbers."""
    if not samples:
        return DASH
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in samples):
        return "invalid data"
    return f"{fmt(min(samples))} to {fmt(max(samples))}"


def ratio_cell(k: int, n: int) -> str:
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


def metrics_of(record: dict) -> dict:
    return record.get("metrics") or {}


def params_of(record: dict) -> dict:
    return record.get("params") or {}


def tpot_speedups(metrics: dict) -> list[float]:
    """Per prompt: target-only TPOT / variant TPOT (prefill excluded), beside the gated tokens/s speedup (prefill
    included). Shown as a mean of per-prompt ratios with its interval; the research's "decoding speedup" (and
    the published TPOT speedups) is the ratio of the mean TPOTs, which weights slow prompts more."""
    return [b / v for b, v in zip(metrics.get("baseline_tpot_s") or [], metrics.get("tpot_s") or []) if b and v]


def numeric_key(text) -> tuple:
    match = re.match(r"\s*(-?\d+(?:\.\d+)?)", str(text))
    return (0, float(match.group(1)), str(text)) if match else (1, 0.0, str(text))


def generic_value(value) -> str:
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in value):
        return f"{mean_ci_cell(value)} (n={len(value)})"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {generic_value(v)}" for k, v in value.items()) or DASH
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt(value)
    return DASH if value is None else str(value)


def generic_table(records: list[dict], skip: Sequence[str] = ("cycle_trace",)) -> str:
    """Any other experiment: case id, every param and metric (union over the records), verdict."""
    param_keys = sorted({k for r in records for k in params_of(r)})
    metric_keys = sorted({k for r in records for k in metrics_of(r)} - set(skip))
    rows = [[r["id"], *(generic_value(params_of(r).get(k)) for k in param_keys),
             *(generic_value(metrics_of(r).get(k)) for k in metric_keys), verdict_cell(r)]
            for r in sorted(records, key=lambda r: r["id"])]
    return table(["Case", *param_keys, *metric_keys, "Verdict"], rows)


def mcnemar_cell(control: list[int], new: list[int]) -> str:
    """Accuracy change against a control on the same queries: difference, lost/gained and the exact two-sided
    McNemar p (binomial on the discordant queries)."""
    lost, gained, p = mcnemar_exact(control, new)
    return f"{(gained - lost) / len(new):+.3f} (-{lost}/+{gained}, p {p:.2g})"


def geomean_ci_cell(samples: Sequence[float] | None) -> str:
    """Geometric mean with the 95% t interval of the log samples ("1.52x [1.40, 1.65]")."""
    if not samples:
        return DASH
    centre, low, high = (math.exp(v) for v in mean_ci([math.log(x) for x in samples]))
    interval = "n/a" if math.isnan(low) else f"{low:.2f}, {high:.2f}"
    return f"{centre:.2f}x [{interval}]"


def _dedupe(records: Sequence[dict]) -> list[dict]:
    """Last record per id wins (a resumed case), keeping first-seen order."""
    latest: dict[str, dict] = {}
    for record in records:
        latest[record["id"]] = record
    return list(latest.values())


def prompt_renderings(records: Sequence[dict]) -> str:
    """The records' prompt renderings, each with its datasets: "chat:1a2b3c4d5e6f thinking off (gsm8k,
    humaneval); chat:1a2b3c4d5e6f thinking on (gsm8k-think)"; "" when no record carries one."""
    found: dict[tuple[str, str], list[str]] = {}
    for record in records:
        template, thinking = record.get("prompt_template"), record.get("thinking")
        if template is None:
            continue
        datasets = found.setdefault((str(template), str(thinking)), [])
        if str(record.get("dataset")) not in datasets:
            datasets.append(str(record.get("dataset")))
    return "; ".join(f"{template}" + (f" thinking {thinking}" if thinking not in ("none", "None") else "")
                     + f" ({', '.join(datasets)})" for (template, thinking), datasets in found.items())


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
    prompts = sorted({len(metrics_of(r).get("per_prompt_tau") or []) for r in records} - {0})
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
    if renderings := prompt_renderings(records):
        rows.append(["prompts rendered", renderings])
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
        metrics = metrics_of(record)
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
    table per (experiment, group), rendered by the family that wrote the records (dflash.harness.family):
    families in registration order, each family's experiments in the order of its renderers, others after
    them alphabetically. A record of an unregistered family, or an experiment its family has no table for, is
    an error (DFlashError), never a table of some other shape."""
    records = _dedupe(records)
    lines = _header(records, fingerprint, announced, title, skipped)
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for record in records:
        family = record.get("ablation_family")
        if not isinstance(family, str):
            raise DFlashError(f"record {record.get('id')!r} names no ablation family (ablation_family): it was "
                              "written before families were recorded; measure it again")
        key = (family, str(record.get("experiment", "other")), str(record.get("group", "")))
        groups.setdefault(key, []).append(record)
    families = {name: get_family(name) for name in {family for family, _, _ in groups}}
    order = {name: k for k, name in enumerate(FAMILIES)}

    def position(key):
        family, experiment, group = key
        known = list(families[family].renderers)
        return (order[family], known.index(experiment) if experiment in known else len(known), experiment, group)
    for key in sorted(groups, key=position):
        family, experiment, group = key
        spec = families[family]
        lines += [f"## {inline(spec.title(experiment))}" + (f": {inline(group)}" if group else ""), ""]
        lines += [spec.renderer(experiment, groups[key])(groups[key]), ""]
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
