"""Every picture the report writers produce shows its data legibly: each figure, caught as it is saved, is laid
out with a renderer, and every axes must hold at least two finite points per plotted series (a line, a
scatter, a set of bars), and no two text labels of the figure (titles, axis and tick labels, annotations, legend
entries) may overlap. The pictures come from synthetic records shaped like the tiny profile's (a 32-cycle
trace, the whole Fast-dLLM v2 grid at close speeds, a cascade table), not from an ablation run."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.axis import XAxis  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dflash.harness import plots  # noqa: E402


def _finite_points(xy) -> int:
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    return int(np.isfinite(xy).all(axis=1).sum())


def _series(axes) -> list[tuple[str, int]]:
    """(name, finite points) of every series the axes plots: lines, scatters, bar sets."""
    found = [(f"line {line.get_label()!r}", _finite_points(line.get_xydata())) for line in axes.lines]
    found += [(f"scatter {c.get_label()!r}", _finite_points(c.get_offsets())) for c in axes.collections
              if isinstance(c, PathCollection)]
    found += [(f"bars {c.get_label()!r}", sum(math.isfinite(p.get_height()) for p in c.patches))
              for c in axes.containers if isinstance(c, BarContainer)]
    return found


def _tick_labels(axis) -> list:
    """The tick labels drawn: visible, with text, at a tick inside the view."""
    low, high = sorted(axis.get_view_interval())
    slack = 1e-9 * max(1.0, abs(high - low))
    return [label for location, label in zip(axis.get_majorticklocs(), axis.get_majorticklabels())
            if label.get_visible() and label.get_text() and low - slack <= location <= high + slack]


def _texts(figure) -> list:
    """Every text label of the figure that carries words."""
    texts = [figure._suptitle, *figure.texts]
    for axes in figure.axes:
        texts += [axes.title, axes._left_title, axes._right_title, axes.xaxis.label, axes.yaxis.label, *axes.texts]
        texts += _tick_labels(axes.xaxis) + _tick_labels(axes.yaxis)
        texts += [legend for legend in [axes.get_legend()] if legend]
    texts += figure.legends
    expanded = []
    for text in texts:
        if text is None:
            continue
        if hasattr(text, "get_texts"):  # a legend: its entries and title
            expanded += [*text.get_texts(), text.get_title()]
        else:
            expanded.append(text)
    return [t for t in expanded if t.get_visible() and t.get_text().strip()]


def figure_problems(figure) -> list[str]:
    """What makes this figure unreadable: an axes with no series or a series with fewer than two finite points;
    two text labels whose window extents overlap (after the layout, by more than a pixel)."""
    canvas = FigureCanvasAgg(figure)
    figure.draw_without_rendering()
    renderer = canvas.get_renderer()
    problems = []
    for index, axes in enumerate(figure.axes):
        if hasattr(axes, "_colorbar"):
            continue  # a colour key, not data
        name = axes.get_title() or f"axes {index}"
        series = _series(axes)
        if not series:
            problems.append(f"{name}: no series plotted")
        problems += [f"{name}: {what} has {n} finite point(s)" for what, n in series if n < 2]
    boxes = [(text, text.get_window_extent(renderer).expanded(1, 1).padded(-1)) for text in _texts(figure)]
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        if box_a.width > 0 and box_b.width > 0 and box_a.overlaps(box_b):
            problems.append(f"labels overlap: {a.get_text()!r} and {b.get_text()!r}")
    return problems


@pytest.fixture
def checked(monkeypatch):
    """Every figure saved while the test runs: {file name: its problems}, checked just before it is written."""
    seen: dict[str, list[str]] = {}
    save = Figure.savefig

    def checking_save(figure, fname, *args, **kwargs):
        seen[Path(fname).name] = figure_problems(figure)
        return save(figure, fname, *args, **kwargs)
    monkeypatch.setattr(Figure, "savefig", checking_save)
    return seen


# --- synthetic records shaped like the tiny profile's --------------------------------------------------------


def cycle_trace(cycles: int, seed: int = 0, block_size: int = 16) -> dict:
    rng = np.random.default_rng(seed)
    sizes = [block_size] * cycles
    for end in range(cycles // 3, cycles, cycles // 3 or 1):  # a prompt's last block, cut by the budget
        sizes[end] = int(rng.integers(1, block_size))
    return {"prompt": [3 * i // cycles for i in range(cycles)], "block_size": sizes,
            "tau": rng.integers(1, 6, cycles).tolist(), "cycle_s": rng.uniform(0.02, 0.05, cycles).tolist(),
            "token_index": list(range(cycles))}


def profiling_record(dataset: str, cycles: int) -> dict:
    return {"id": f"profiling/test_cycle_profile[tiny-{dataset}]", "ablation_family": "decode", "experiment": "profiling",
            "group": f"{dataset}, max_new_tokens=64", "params": {"block_size": 16},
            "metrics": {"time_s": {"draft": 1.0, "verify": 2.0, "other": 0.5}, "cycles": cycles,
                        "cycle_trace": cycle_trace(cycles, seed=cycles)}}


def sweep_record(block_size: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"id": f"block_size/test_block_size[tiny-math-bs{block_size}]", "ablation_family": "decode", "experiment": "block_size",
            "group": "math, max_new_tokens=64", "params": {"block_size": block_size},
            "metrics": {"per_prompt_tau": rng.uniform(1, 3, 8).tolist(),
                        "speedup_samples": rng.uniform(0.8, 1.6, 8).tolist()}}


FASTDLLM_CASES = ([(f"t{t:g}-{cache}", {"threshold": t, "cache": cache})
                   for t in (0.5, 0.7, 0.9, 1.0) for cache in ("none", "prefix", "dual")]
                  + [(f"sub4-{cache}", {"sub_block_size": 4, "cache": cache}) for cache in ("prefix", "dual")]
                  + [("k1-control", {"reuse_k": 1})]
                  + [(f"k{k}-{subset}-{mode}", {"reuse_k": k, "subset": subset, "mode": mode})
                     for k in (2, 3) for subset in ("first", "middle", "last") for mode in ("output", "residual")]
                  + [(f"batch4-{cache}", {"batch": 4, "cache": cache}) for cache in ("prefix", "dual")])


def fastdllm_records(queries: int = 20) -> list[dict]:
    """The tiny profile's generative grid, every case between 800 and 950 tokens/s at similar accuracies (where
    labels on points piled up)."""
    rng = np.random.default_rng(5)
    records = []
    for case, knobs in FASTDLLM_CASES:
        params = {"task": "generative", "threshold": 0.9, "cache": "dual", "sub_block_size": 8, "batch": 1,
                  "reuse_k": None, "subset": "middle", "mode": "output", **knobs}
        records.append({"id": f"fastdllm/test_fastdllm_decoding[tiny-{case}]", "ablation_family": "fastdllm", "experiment": "fastdllm",
                        "group": "graded, max_new_tokens=48", "params": params,
                        "metrics": {"tokens_per_s": float(rng.uniform(800, 950)),
                                    "per_query": {"qids": [f"q{i}" for i in range(queries)],
                                                  "correct": (rng.random(queries) < 0.6).astype(int).tolist(),
                                                  "cost": [1.0] * queries}}})
    return records


def report_records() -> list[dict]:
    return ([profiling_record("math", 32), profiling_record("chat", 55), profiling_record("code", 336)]
            + [sweep_record(bs, bs) for bs in (2, 4, 8, 16)] + fastdllm_records())


# --- the tests --------------------------------------------------------------------------------------------------


def test_every_summary_picture_shows_its_data_legibly(tmp_path, checked):
    written = plots.write_plots(report_records(), tmp_path)
    assert {p.name for p in written} == set(checked) and len(written) == 8
    assert {name: problems for name, problems in checked.items() if problems} == {}


def test_every_cascade_report_picture_shows_its_data_legibly(tmp_path, checked):
    from dflash.cascade.report import write_report
    from test_cascade_replay import synthetic_table
    write_report(synthetic_table(n=100, seed=10), tmp_path, lambdas=(0.03, 0.1, 0.3))
    assert set(checked) == {"pareto.png", "regret.png", "calibration.png", "stage_usage.png"}
    assert {name: problems for name, problems in checked.items() if problems} == {}


def old_rolling_plot(trace: dict, path, window: int = 50):
    """The rolling plot before issue 28: a 50-cycle window clamped to the trace, the rolling mean alone."""
    figure, (top, bottom) = plots.new_figure(2)
    for axis, values in ((top, trace["tau"]), (bottom, np.asarray(trace["cycle_s"]) * 1000)):
        x = np.asarray(values, dtype=float)
        size = max(1, min(window, x.size))
        axis.plot(np.convolve(x, np.ones(size) / size, mode="valid"))
    figure.savefig(path, dpi=120)


def test_the_check_fails_an_empty_rolling_plot_and_overlapping_labels(tmp_path, checked):
    trace = cycle_trace(32)
    old_rolling_plot(trace, tmp_path / "old.png")
    plots.plot_rolling_tau_cycle_time(trace, tmp_path / "new.png")
    assert checked["old.png"] == ["axes 0: line '_child0' has 1 finite point(s)",
                                                  "axes 1: line '_child0' has 1 finite point(s)"]
    assert checked["new.png"] == []
    figure = Figure()
    axis = figure.subplots()
    axis.plot([1, 2], [1, 2])
    for label in ("k2-middle-output", "k3-first-output"):  # labels on two close points
        axis.annotate(label, (1.5, 1.5))
    assert figure_problems(figure) == ["labels overlap: 'k2-middle-output' and 'k3-first-output'"]


def test_a_trace_too_short_for_a_rolling_mean_gets_a_note_instead_of_a_plot(tmp_path):
    notes = []
    written = plots.write_plots([profiling_record("math", plots.MIN_ROLLING_CYCLES - 1)], tmp_path, notes)
    assert [p.name for p in written] == ["profiling_test_cycle_profile_tiny-math_tau_vs_cycle.png"]
    assert notes == [f"profiling/test_cycle_profile[tiny-math]: no rolling tau / cycle time plot, "
                     f"{plots.MIN_ROLLING_CYCLES - 1} cycles traced (a rolling mean needs {plots.MIN_ROLLING_CYCLES})"]
    assert plots.rolling_window(32) == 8 and plots.rolling_window(55) == 13 and plots.rolling_window(336) == 50
