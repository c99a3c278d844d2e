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


def _rolling_mean(values: Sequence[float], window: int) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    window = max(1, min(window, x.size))
    return np.convolve(x, np.ones(window) / window, mode="valid")


def plot_tau_vs_cycle(trace: dict, path: Path, title: str = "") -> Path:
    """Accepted length per cycle, one colour per block size in use."""
    figure, (axis,) = _figure()
    taus, sizes = np.asarray(trace["tau"], float), np.asarray(trace["block_size"])
    cycles = np.arange(taus.size)
    for size in sorted(set(sizes.tolist())):
        chosen = sizes == size
        axis.scatter(cycles[chosen], taus[chosen], s=6, label=f"bs={size}")
    axis.set(xlabel="cycle", ylabel="tau (tokens committed)", title=title or "tau per cycle")
    axis.legend(loc="upper right", fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def plot_rolling_tau_cycle_time(trace: dict, path: Path, window: int = 50, title: str = "") -> Path:
    """Rolling mean of tau and of the cycle time (ms): drift over a long generation shows up here."""
    figure, (top, bottom) = _figure(2)
    top.plot(_rolling_mean(trace["tau"], window))
    top.set(ylabel=f"tau (rolling {window})", title=title or "rolling tau and cycle time")
    bottom.plot(_rolling_mean(np.asarray(trace["cycle_s"], float) * 1000, window), color="tab:orange")
    bottom.set(xlabel="cycle", ylabel=f"cycle ms (rolling {window})")
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


def plot_accuracy_vs_speed(records: list[dict], path: Path, title: str = "") -> Path:
    """Accuracy (mean, 95% CI bars) against tokens/s, one labelled point per generative case (Fast-dLLM v2)."""
    figure, (axis,) = _figure(1)
    figure.set_size_inches(8, 5)
    for record in records:
        metrics = record.get("metrics") or {}
        correct = (metrics.get("per_query") or {}).get("correct")
        if not correct or metrics.get("tokens_per_s") is None:
            continue
        means, (below, above) = _means_with_errors([correct])
        mean = means[0]
        axis.errorbar([metrics["tokens_per_s"]], [mean], yerr=[below, above], marker="o", capsize=3)
        axis.annotate(record["id"].split("[")[-1].rstrip("]").split("-", 1)[-1], (metrics["tokens_per_s"], mean),
                      fontsize=6, xytext=(3, 3), textcoords="offset points")
    axis.set(xlabel="tokens/s (wall)", ylabel="accuracy", title=title or "accuracy vs tokens/s")
    figure.savefig(path, dpi=120)
    return path


def write_plots(records: Sequence[dict], directory: str | Path) -> list[Path]:
    """Every plot the records support, as PNG files in `directory`; [] when matplotlib is missing."""
    if not plots_available():
        return []
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for record in records:
        trace = (record.get("metrics") or {}).get("cycle_trace")
        if trace and trace.get("tau"):
            name = _safe_name(record["id"])
            if trace.get("block_size"):
                written.append(plot_tau_vs_cycle(trace, directory / f"{name}_tau_vs_cycle.png", record["id"]))
            if trace.get("cycle_s"):
                written.append(plot_rolling_tau_cycle_time(trace, directory / f"{name}_rolling_tau_cycle_time.png",
                                                           title=record["id"]))
    sweeps: dict[str, list[dict]] = {}
    for record in records:
        if record.get("experiment") == "block_size":
            sweeps.setdefault(str(record.get("group", "")), []).append(record)
    for group, rows in sorted(sweeps.items()):
        name = "tau_speedup_by_block_size" + (f"_{_safe_name(group)}" if group else "")
        written.append(plot_by_block_size(rows, directory / f"{name}.png", group))
    decoding = [r for r in records if r.get("experiment") == "fastdllm"
                and (r.get("params") or {}).get("task") == "generative"]
    if decoding:
        written.append(plot_accuracy_vs_speed(decoding, directory / "fastdllm_accuracy_vs_tokens_per_s.png",
                                              "Fast-dLLM v2: accuracy vs tokens/s"))
    return written
