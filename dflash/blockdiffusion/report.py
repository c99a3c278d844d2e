"""The Fast-dLLM v2 family's report (dflash.blockdiffusion.family): the summary's table (threshold x cache,
sub-block, batch; the research notes' layer-reuse table against the k = 1 control; log-likelihood scoring) and
the accuracy-vs-tokens/s plot."""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Sequence

from ..harness.plots import colours, marker_path, means_with_errors, new_figure
from ..harness.render import DASH, fmt, geomean_ci_cell, mcnemar_cell, mean_ci_cell, metrics_of, params_of, ratio_cell, table, verdict_cell


def fastdllm_table(records: list[dict]) -> str:
    """Fast-dLLM v2 (dflash.blockdiffusion): threshold x cache, sub-block, batch; the layer-reuse table of the
    research notes (config, k, subset, accuracy, tokens/s, total time) with the trade-off against the k = 1
    control; log-likelihood scoring, where layer reuse is not applicable."""
    decoding = [r for r in records if params_of(r).get("task") == "generative" and "per_query" in metrics_of(r)]
    key = lambda p: (p.get("threshold"), p.get("sub_block_size"), p.get("batch"))  # noqa: E731
    exact = {key(params_of(r)): r for r in decoding
             if params_of(r).get("cache") == "prefix" and params_of(r).get("reuse_k") is None}
    rows = []
    for r in decoding:
        p, m = params_of(r), metrics_of(r)
        if p.get("reuse_k") is not None:
            continue
        outputs = m.get("outputs") or {}
        reference = exact.get(key(p))
        same = DASH
        if p.get("cache") == "dual" and reference is not None:
            theirs = (metrics_of(reference).get("outputs") or {}).get("output_digest") or []
            mine = outputs.get("output_digest") or []
            same = ratio_cell(sum(a == b for a, b in zip(mine, theirs)), len(mine))
        rows.append([r["id"].split("[")[-1].rstrip("]"), fmt(p.get("threshold")), str(p.get("cache")),
                     str(p.get("sub_block_size")), str(p.get("batch")), str(len(m["per_query"]["qids"])),
                     mean_ci_cell(m["per_query"]["correct"]), fmt(m.get("tokens_per_s")),
                     fmt(m.get("ar_tokens_per_s")), geomean_ci_cell(m.get("speed_ratio_samples")),
                     mean_ci_cell(outputs.get("forwards_per_token")), mean_ci_cell(outputs.get("tokens")),
                     ratio_cell(sum(outputs.get("agrees_with_ar") or []), len(outputs.get("agrees_with_ar") or [])),
                     same, verdict_cell(r)])
    text = ("Speed ratio: block-diffusion tokens/s over the AR base's (transformers greedy at the same batch "
            "size), measured interleaved on the same queries, one ratio per batch group, geometric mean "
            "[95% CI]; tokens/s columns are wall-clock. 'Same as exact': outputs identical to the prefix-cache "
            "(exact) decoder's with the same threshold, sub-block and batch (the dual cache is approximate).\n\n"
            + table(["Case", "threshold", "cache", "sub-block", "batch", "queries", "accuracy [95% CI]",
                     "tokens/s", "AR tokens/s", "speed ratio to AR", "forwards/token", "output tokens",
                     "same as AR", "same as exact", "Verdict"], rows,
                    [False, True, False, True, True, True, True, True, True, True, True, True, True, True, False]))
    reuse = [r for r in decoding if params_of(r).get("reuse_k") is not None]
    control = next((r for r in reuse if params_of(r)["reuse_k"] == 1), None)
    if reuse:
        rows = []
        base = metrics_of(control) if control else {}
        for r in sorted(reuse, key=lambda r: (params_of(r)["reuse_k"], params_of(r)["subset"], params_of(r)["mode"])):
            p, m = params_of(r), metrics_of(r)
            outputs = m.get("outputs") or {}
            staleness = ((m.get("reuse") or {}).get("staleness") or {})
            versus = DASH if r is control or not base else mcnemar_cell(base["per_query"]["correct"],
                                                                          m["per_query"]["correct"])
            speed = DASH if r is control or not base else fmt(
                math.exp(statistics.mean(map(math.log, m["speed_ratio_samples"]))
                         - statistics.mean(map(math.log, base["speed_ratio_samples"]))), 2) + "x"
            longer = DASH if r is control or not base else f"{statistics.mean(outputs['tokens']) / statistics.mean((base.get('outputs') or {})['tokens']) - 1:+.0%}"
            config = "k1 (control)" if r is control else f"k{p['reuse_k']}_{p['subset']}_{p['mode']}"
            rows.append([config, str(p["reuse_k"]), DASH if r is control else p["subset"],
                         DASH if r is control else p["mode"], mean_ci_cell(m["per_query"]["correct"]),
                         fmt(m.get("tokens_per_s")), fmt(m.get("total_seconds")), versus, speed, longer,
                         mean_ci_cell(outputs.get("repetition")),
                         ", ".join(f"L{layer} {value:.3g}" for layer, value in staleness.items()) or DASH,
                         verdict_cell(r)])
        by_config = {(params_of(r)["reuse_k"], params_of(r)["subset"], params_of(r)["mode"]): r for r in reuse}
        pairs = [[f"k{k}_{subset}", mcnemar_cell(metrics_of(r)["per_query"]["correct"],
                                                  metrics_of(by_config[k, subset, "residual"])["per_query"]["correct"])]
                 for (k, subset, mode), r in sorted(by_config.items())
                 if mode == "output" and k > 1 and (k, subset, "residual") in by_config]
        text += ("\n\nLayer reuse (dual cache, threshold and sub-block as the control): the research notes' "
                 "table with the trade-off against the k = 1 control on the same queries (accuracy change with "
                 "the exact McNemar p; speed: ratio of the two cases' speed ratios to AR; output length change). "
                 "Staleness: relative L2 of a reused output against fresh computation, per span layer (output "
                 "mode) or for the span (residual mode, at its first layer), on a few queries.\n\n"
                 + table(["Config", "k", "subset", "mode", "accuracy [95% CI]", "tokens/s", "total time (s)",
                          "accuracy vs k=1", "speed vs k=1", "output length vs k=1", "repetition (3-gram)",
                          "staleness", "Verdict"], rows,
                         [False, True, False, False, True, True, True, True, True, True, True, False, False]))
        if pairs:
            text += ("\n\nResidual (DeepCache-style) against output reuse (the fork's) at the same k and subset, "
                     "paired over queries: accuracy change of residual, lost/gained, exact McNemar p.\n\n"
                     + table(["k, subset", "residual - output"], pairs, [False, True]))
        timings = [(params_of(r)["reuse_k"], params_of(r)["subset"], params_of(r)["mode"], (metrics_of(r).get("reuse") or {}))
                   for r in reuse if (metrics_of(r).get("reuse") or {}).get("seconds_per_computed_layer_call")]
        if timings:
            text += ("\n\nLayer call times on sub-block steps (staleness run): "
                     + "; ".join(f"k{k}_{subset}_{mode}: computed {1e6 * t['seconds_per_computed_layer_call']:.0f} us,"
                                 f" reused {1e6 * t['seconds_per_reused_layer_call']:.0f} us, "
                                 f"{t['layer_calls_skipped']} calls skipped"
                                 for k, subset, mode, t in timings if t.get("seconds_per_reused_layer_call")) + ".")
    scoring = [r for r in records if params_of(r).get("task") == "loglik"]
    if scoring:
        rows, reasons = [], set()
        for r in scoring:
            m = metrics_of(r)
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


CACHE_MARKERS = {"none": "o", "prefix": "s", "dual": "^"}


def _decoding_series(records: list[dict]) -> dict[str, list[dict]]:
    """Fast-dLLM v2 cases as series, each in the order of its knob (named in the series' label): one threshold
    sweep per cache; a sub-block size or batch other than the sweep's over its caches; each layer-reuse subset and
    mode over k, from the k = 1 control."""
    params = [r.get("params") or {} for r in records]
    sub_blocks = [p.get("sub_block_size") for p in params if p.get("reuse_k") is None]
    usual = max(set(sub_blocks), key=sub_blocks.count) if sub_blocks else None
    caches = list(CACHE_MARKERS)
    series: dict[tuple, list[tuple]] = {}
    for record, p in zip(records, params):
        cache = caches.index(p["cache"]) if p.get("cache") in caches else len(caches)
        if p.get("reuse_k") is not None:
            keys = [("reuse", p.get("subset"), p.get("mode"))] if p["reuse_k"] != 1 else []
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
            label = f"reuse {key[1]}, {key[2]}: k = {', '.join(str(k) for _, _, k in knobs)}"
        else:
            label = f"{key[0]} {key[1]}: {', '.join(f'{c} cache' for _, c, _ in knobs)}"
        named[label] = [record for _, _, record in points]
    return named


def plot_accuracy_vs_speed(records: list[dict], path: Path, title: str = "", notes: list[str] | None = None) -> Path:
    """Accuracy (mean, 95% CI bars) against tokens/s of the generative cases (Fast-dLLM v2), as series of one
    colour each (`_decoding_series`) with a marker per cache: a key beside the plot instead of a label on every
    point, so close cases stay legible."""
    from matplotlib.lines import Line2D

    figure, (axis,) = new_figure(1)
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
    for colour, (name, points) in zip(colours(len(series)), series.items()):
        speeds = [r["metrics"]["tokens_per_s"] for r in points]
        means, errors = means_with_errors([r["metrics"]["per_query"]["correct"] for r in points])
        axis.errorbar(speeds, means, yerr=errors, color=colour, linewidth=0.8, capsize=2, label=name)
        markers = axis.scatter(speeds, means, color=colour, s=30, zorder=3)
        markers.set_paths([marker_path(CACHE_MARKERS.get((r.get("params") or {}).get("cache"), "D"))
                           for r in points])
    keys = [Line2D([], [], linestyle="none", marker=marker, color="grey", label=f"{cache} cache")
            for cache, marker in CACHE_MARKERS.items()]
    axis.set(xlabel="tokens/s (wall)", ylabel="accuracy (95% CI)", title=title or "accuracy vs tokens/s")
    figure.legend(handles=axis.get_legend_handles_labels()[0] + keys, loc="outside right upper", fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def fastdllm_plots(records: Sequence[dict], directory: Path, notes: list[str]) -> list[Path]:
    """The family's plot: accuracy against tokens/s of the generative cases."""
    decoding = [r for r in records if (r.get("params") or {}).get("task") == "generative"]
    if not decoding:
        return []
    return [plot_accuracy_vs_speed(decoding, directory / "fastdllm_accuracy_vs_tokens_per_s.png",
                                   "Fast-dLLM v2: accuracy vs tokens/s", notes)]
