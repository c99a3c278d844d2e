"""Optional PNG plots for a summary. matplotlib is not a dependency: without it every function here is a
no-op that returns no paths, so reports never fail for lack of plotting.

Inputs are the case records of render.py. Per-cycle plots read `metrics.cycle_trace`, a columnar dict
{"block_size": [...], "tau": [...], "cycle_s": [...]} with one entry per draft/verify cycle in order.
"""
from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .stats import mean_ci


def plots_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _figure(rows: int = 1):
    # The object API (no pyplot) keeps no global state and needs no display backend.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3 * rows), layout="constrained")
    return figure, figure.subplots(rows, 1, squeeze=False)[:, 0]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "case"


ROLLING_WINDOW = 50  # cycles, on a trace long enough for it (a quarter of the trace at most)
MIN_ROLLING_CYCLES = 16  # fewer traced cycles leave no drift to see: the rolling plot is left out, with a note


def rolling_window(cycles: int, window: int = ROLLING_WINDOW) -> int:
    """The window the rolling plot uses on a trace of `cycles`: `window`, or a quarter of the trace when that
    is shorter, so the rolling mean keeps three quarters of the points."""
    return max(1, min(window, cycles // 4))


def _rolling_mean(values: Sequence[float], window: int) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    return np.convolve(x, np.ones(window) / window, mode="valid")


def plot_tau_vs_cycle(trace: dict, path: Path, title: str = "") -> Path:
    """Accepted length per cycle, coloured by block size when more than one is in use (a prompt's last block
    shrinks to the token budget)."""
    figure, (axis,) = _figure()
    taus, sizes = np.asarray(trace["tau"], float), np.asarray(trace["block_size"], float)
    cycles = np.arange(taus.size)
    if np.unique(sizes).size > 1:
        points = axis.scatter(cycles, taus, s=6, c=sizes, cmap="viridis")
        figure.colorbar(points, ax=axis, label="block size")
    else:
        axis.scatter(cycles, taus, s=6, label=f"bs={sizes[0]:g}")
        axis.legend(loc="upper right", fontsize="small")
    axis.set(xlabel="cycle", ylabel="tau (tokens committed)", title=title or "tau per cycle")
    figure.savefig(path, dpi=120)
    return path


def plot_rolling_tau_cycle_time(trace: dict, path: Path, window: int = ROLLING_WINDOW, title: str = "") -> Path:
    """Tau and cycle time (ms) per cycle, with their rolling mean over a window that fits the trace
    (`rolling_window`): drift over a long generation shows up here. The window is stated on the plot."""
    figure, (top, bottom) = _figure(2)
    window = rolling_window(len(trace["tau"]), window)
    for axis, values, colour, label in ((top, np.asarray(trace["tau"], float), "tab:blue", "tau"),
                                        (bottom, np.asarray(trace["cycle_s"], float) * 1000, "tab:orange",
                                         "cycle ms")):
        cycles = np.arange(values.size)
        axis.plot(cycles, values, color=colour, alpha=0.3, linewidth=0.8, label="per cycle")
        axis.plot(cycles[window - 1:], _rolling_mean(values, window), color=colour, linewidth=2,
                  label=f"rolling mean, {window} cycles")
        axis.set(ylabel=label)
        axis.legend(loc="upper right", fontsize="small")
    top.set(title=f"{title or 'tau and cycle time'}: rolling mean over {window} of {len(trace['tau'])} cycles")
    bottom.set(xlabel="cycle (the rolling mean at its window's last cycle)")
    figure.savefig(path, dpi=120)
    return path


def _means_with_errors(samples_per_size: list[list[float]]) -> tuple[list[float], list[list[float]]]:
    means, errors = [], [[], []]
    for samples in samples_per_size:
        mean, low, high = mean_ci(samples) if samples else (math.nan,) * 3
        means.append(mean)
        errors[0].append(0.0 if math.isnan(low) else mean - low)
        errors[1].append(0.0 if math.isnan(high) else high - mean)
    return means, errors


def plot_by_block_size(records: list[dict], path: Path, title: str = "") -> Path:
    """Tau and speedup (mean with 95% CI bars) against block size, from block_size sweep records."""
    rows = sorted((r for r in records if isinstance((r.get("params") or {}).get("block_size"), (int, float))),
                  key=lambda r: r["params"]["block_size"])
    sizes = [r["params"]["block_size"] for r in rows]
    figure, (top, bottom) = _figure(2)
    for axis, key, label in ((top, "per_prompt_tau", "tau"), (bottom, "speedup_samples", "speedup (x)")):
        means, errors = _means_with_errors([(r.get("metrics") or {}).get(key) or [] for r in rows])
        axis.errorbar(sizes, means, yerr=errors, marker="o", capsize=3)
        axis.set(ylabel=label, xticks=sizes)
    top.set(title=title or "tau and speedup by block size")
    bottom.set(xlabel="block size")
    figure.savefig(path, dpi=120)
    return path


CACHE_MARKERS = {"none": "o", "prefix": "s", "dual": "^"}


def _decoding_series(records: list[dict]) -> dict[str, list[dict]]:
    """Fast-dLLM v2 cases as series, each in the order of its knob (named in the series' label): one threshold
    sweep per cache; a sub-block size or batch other than the sweep's over its caches; each layer-reuse subset,
    mode and schedule over k, from the k = 1 control."""
    params = [r.get("params") or {} for r in records]
    sub_blocks = [p.get("sub_block_size") for p in params if p.get("reuse_k") is None]
    usual = max(set(sub_blocks), key=sub_blocks.count) if sub_blocks else None
    caches = list(CACHE_MARKERS)
    series: dict[tuple, list[tuple]] = {}
    for record, p in zip(records, params):
        cache = caches.index(p["cache"]) if p.get("cache") in caches else len(caches)
        if p.get("reuse_k") is not None:
            # a record from before the schedule knob ran the rule now called since_full
            schedule = p.get("reuse_schedule", "since_full")
            keys = [("reuse", p.get("subset"), p.get("mode"), schedule)] if p["reuse_k"] != 1 else []
            order = p["reuse_k"]
        elif (p.get("batch") or 1) != 1:
            keys, order = [("batch", p["batch"])], cache
        elif p.get("sub_block_size") != usual:
            keys, order = [("sub-block", p.get("sub_block_size"))], cache
        else:
            keys, order = [("threshold", p.get("cache"))], p.get("threshold") or 0
        knobs = (p.get("threshold"), p.get("cache"), p.get("reuse_k"))
        for key in keys:
            series.setdefault(key, []).append((order, knobs, record))
    controls = [(1, (p.get("threshold"), p.get("cache"), 1), r) for r, p in zip(records, params)
                if p.get("reuse_k") == 1]
    for key in series:
        if key[0] == "reuse":
            series[key] += controls
    named = {}
    for key, points in series.items():
        points.sort(key=lambda point: point[0])
        knobs = [knob for _, knob, _ in points]
        if key[0] == "threshold":
            label = f"threshold {', '.join(str(t) for t, _, _ in knobs)} ({key[1]} cache)"
        elif key[0] == "reuse":
            schedule = "" if key[3] == "fork" else f", {key[3]} schedule"
            label = f"reuse {key[1]}, {key[2]}{schedule}: k = {', '.join(str(k) for _, _, k in knobs)}"
        else:
            label = f"{key[0]} {key[1]}: {', '.join(f'{c} cache' for _, c, _ in knobs)}"
        named[label] = [record for _, _, record in points]
    return named


def plot_accuracy_vs_speed(records: list[dict], path: Path, title: str = "", notes: list[str] | None = None) -> Path:
    """Accuracy (mean, 95% CI bars) against tokens/s of the generative cases (Fast-dLLM v2), as series of one
    colour each (`_decoding_series`) with a marker per cache: a key beside the plot instead of a label on every
    point, so close cases stay legible."""
    from matplotlib.lines import Line2D

    figure, (axis,) = _figure(1)
    figure.set_size_inches(10, 5)
    rows = [r for r in records if (r.get("metrics") or {}).get("tokens_per_s") is not None
            and ((r.get("metrics") or {}).get("per_query") or {}).get("correct")]
    series = _decoding_series(rows)
    for name, points in list(series.items()):
        if len(points) < 2:  # a selection of cases (-k) can leave a series of one: no line to draw
            del series[name]
            if notes is not None:
                notes.append(f"{path.name}: {', '.join(r['id'] for r in points)} left out (the only case of "
                             f"its series, {name})")
    for colour, (name, points) in zip(_colours(len(series)), series.items()):
        speeds = [r["metrics"]["tokens_per_s"] for r in points]
        means, errors = _means_with_errors([r["metrics"]["per_query"]["correct"] for r in points])
        axis.errorbar(speeds, means, yerr=errors, color=colour, linewidth=0.8, capsize=2, label=name)
        markers = axis.scatter(speeds, means, color=colour, s=30, zorder=3)
        markers.set_paths([_marker_path(CACHE_MARKERS.get((r.get("params") or {}).get("cache"), "D"))
                           for r in points])
    keys = [Line2D([], [], linestyle="none", marker=marker, color="grey", label=f"{cache} cache")
            for cache, marker in CACHE_MARKERS.items()]
    axis.set(xlabel="tokens/s (wall)", ylabel="accuracy (95% CI)", title=title or "accuracy vs tokens/s")
    figure.legend(handles=axis.get_legend_handles_labels()[0] + keys, loc="outside right upper", fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def _marker_path(marker: str):
    """A marker's path at unit size, for a scatter whose points have markers of their own."""
    from matplotlib.markers import MarkerStyle
    style = MarkerStyle(marker)
    return style.get_path().transformed(style.get_transform())


def _colours(count: int) -> list:
    """`count` distinguishable colours (tab10, then tab20 for more series)."""
    from matplotlib import colormaps
    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(k % palette.N) for k in range(count)]


def write_plots(records: Sequence[dict], directory: str | Path, notes: list[str] | None = None) -> list[Path]:
    """Every plot the records support, as PNG files in `directory`; [] when matplotlib is missing. A plot the
    data cannot fill (a trace too short for a rolling mean, one block size) is left out, and `notes` (when given)
    gets a line saying which and why."""
    if not plots_available():
        return []
    notes = [] if notes is None else notes
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for record in records:
        trace = (record.get("metrics") or {}).get("cycle_trace")
        if trace and trace.get("tau"):
            name, cycles = _safe_name(record["id"]), len(trace["tau"])
            if trace.get("block_size") and cycles >= 2:
                written.append(plot_tau_vs_cycle(trace, directory / f"{name}_tau_vs_cycle.png", record["id"]))
            if trace.get("cycle_s") and cycles >= MIN_ROLLING_CYCLES:
                written.append(plot_rolling_tau_cycle_time(trace, directory / f"{name}_rolling_tau_cycle_time.png",
                                                           title=record["id"]))
            elif trace.get("cycle_s"):
                notes.append(f"{record['id']}: no rolling tau / cycle time plot, {cycles} cycles traced (a rolling "
                             f"mean needs {MIN_ROLLING_CYCLES})")
    sweeps: dict[str, list[dict]] = {}
    for record in records:
        if record.get("experiment") == "block_size":
            sweeps.setdefault(str(record.get("group", "")), []).append(record)
    for group, rows in sorted(sweeps.items()):
        name = "tau_speedup_by_block_size" + (f"_{_safe_name(group)}" if group else "")
        if len({(r.get("params") or {}).get("block_size") for r in rows}) >= 2:
            written.append(plot_by_block_size(rows, directory / f"{name}.png", group))
        else:
            notes.append(f"{name}: no plot, one block size measured")
    decoding = [r for r in records if r.get("experiment") == "fastdllm"
                and (r.get("params") or {}).get("task") == "generative"]
    if decoding:
        written.append(plot_accuracy_vs_speed(decoding, directory / "fastdllm_accuracy_vs_tokens_per_s.png",
                                              "Fast-dLLM v2: accuracy vs tokens/s", notes))
    return written
