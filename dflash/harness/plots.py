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

from .family import FAMILIES
from .stats import mean_ci


def plots_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def new_figure(rows: int = 1):
    # The object API (no pyplot) keeps no global state and needs no display backend.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3 * rows), layout="constrained")
    return figure, figure.subplots(rows, 1, squeeze=False)[:, 0]


def safe_name(text: str) -> str:
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
    figure, (axis,) = new_figure()
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
    figure, (top, bottom) = new_figure(2)
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


def means_with_errors(samples_per_size: list[list[float]]) -> tuple[list[float], list[list[float]]]:
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
    figure, (top, bottom) = new_figure(2)
    for axis, key, label in ((top, "per_prompt_tau", "tau"), (bottom, "speedup_samples", "speedup (x)")):
        means, errors = means_with_errors([(r.get("metrics") or {}).get(key) or [] for r in rows])
        axis.errorbar(sizes, means, yerr=errors, marker="o", capsize=3)
        axis.set(ylabel=label, xticks=sizes)
    top.set(title=title or "tau and speedup by block size")
    bottom.set(xlabel="block size")
    figure.savefig(path, dpi=120)
    return path


def marker_path(marker: str):
    """A marker's path at unit size, for a scatter whose points have markers of their own."""
    from matplotlib.markers import MarkerStyle
    style = MarkerStyle(marker)
    return style.get_path().transformed(style.get_transform())


def colours(count: int) -> list:
    """`count` distinguishable colours (tab10, then tab20 for more series)."""
    from matplotlib import colormaps
    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(k % palette.N) for k in range(count)]


def decode_plots(records: Sequence[dict], directory: Path, notes: list[str]) -> list[Path]:
    """The decode family's plots: per-cycle traces (tau per cycle; rolling tau and cycle time when the trace is
    long enough for a rolling mean) and tau / speedup by block size per group."""
    written = []
    for record in records:
        trace = (record.get("metrics") or {}).get("cycle_trace")
        if trace and trace.get("tau"):
            name, cycles = safe_name(record["id"]), len(trace["tau"])
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
        name = "tau_speedup_by_block_size" + (f"_{safe_name(group)}" if group else "")
        if len({(r.get("params") or {}).get("block_size") for r in rows}) >= 2:
            written.append(plot_by_block_size(rows, directory / f"{name}.png", group))
        else:
            notes.append(f"{name}: no plot, one block size measured")
    return written


def write_plots(records: Sequence[dict], directory: str | Path, notes: list[str] | None = None) -> list[Path]:
    """Every plot the records support, as PNG files in `directory`, drawn by the family that wrote them
    (FamilySpec.plots); [] when matplotlib is missing. A plot the data cannot fill (a trace too short for a
    rolling mean, one block size) is left out, and `notes` (when given) gets a line saying which and why."""
    if not plots_available():
        return []
    notes = [] if notes is None else notes
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    by_family: dict[str, list[dict]] = {}
    for record in records:
        by_family.setdefault(str(record.get("ablation_family")), []).append(record)
    written = []
    for name, spec in FAMILIES.items():
        if spec.plots is not None and name in by_family:
            written += spec.plots(by_family[name], directory, notes)
    return written
