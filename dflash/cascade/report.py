"""The cascade report (`dflash cascade report`): every policy on the test folds with paired-bootstrap CIs, the
accuracy-cost frontier, the lam table with stage usage, predictor quality, the cross-family transfer, and online
learning's regret; markdown plus PNG plots. Every number is computed from the collected table by exact replay."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..harness.render import fmt, mean_ci_cell, metrics_of, params_of, table, verdict_cell
from . import evaluate as ev
from .online import epsilon_greedy, exp3
from .replay import (REPLY_FEATURES, StagePredictors, Table, cascade_outcome, expected_calibration_error, fixed, predictor_quality,
                     threshold_stops, tune_thresholds)

REPORT_LAMBDAS = (0.03, 0.1, 0.3)  # the lam values the summary tables spell out (all are plotted)
ONLINE_LAMBDA = 0.1
ONLINE_GRID = (0.3, 0.5, 0.7, 0.9, 1.01)  # per-stage thresholds of the online learners' arms (1.01: never stop)


def transfer(table: Table, tune_family: str, test_family: str, lam: float, seed: int = 0) -> dict:
    """Predictors and thresholds fitted on one family (half each), applied to the other family."""
    source = np.flatnonzero(table.families == tune_family)
    order = np.random.default_rng(seed).permutation(source)
    train, tune = table.subset(np.sort(order[::2])), table.subset(np.sort(order[1::2]))
    test = table.subset(np.flatnonzero(table.families == test_family))
    predictors = StagePredictors(REPLY_FEATURES, seed=seed).fit(train)
    theta = tune_thresholds(predictors.predict(tune), tune, lam, with_samples=False)
    outcome = cascade_outcome(test, threshold_stops(predictors.predict(test), theta), False)
    largest = fixed(test, test.stages - 1)
    return {"tune": tune_family, "test": test_family, "lam": lam, "n_test": test.size,
            "accuracy": outcome.accuracy, "cost": outcome.mean_cost, "largest_accuracy": largest.accuracy,
            "largest_cost": largest.mean_cost, "stage_usage": outcome.stage_usage(test.stages)}


def online_runs(table: Table, predicted: np.ndarray, seed: int = 0) -> list:
    """Both learners on the table as one stream in a seeded random order, scores = the cross-fitted predictions."""
    import itertools
    order = np.random.default_rng(seed).permutation(table.size)
    stream, scores = table.subset(order), predicted[order]
    arms = list(itertools.product(ONLINE_GRID, repeat=table.stages - 1))
    return [epsilon_greedy(stream, scores, arms, ONLINE_LAMBDA, False, seed=seed),
            exp3(stream, scores, arms, ONLINE_LAMBDA, False, seed=seed)]


def summarise(table: Table, *, seed: int = 0, lambdas=ev.LAMBDAS) -> dict:
    """Everything the report shows, as plain data (also written as summary.json)."""
    evaluation = ev.evaluate_policies(table, seed=seed, lambdas=lambdas)
    results = evaluation.results
    largest = next(r for r in results if r.policy == f"fixed-{table.rungs[-1]}")
    rows = []
    for r in results:
        rows.append({"policy": r.policy, "lam": r.lam, "accuracy": ev.paired_ci(r.correct.astype(float)),
                     "cost": ev.paired_ci(r.cost),
                     "accuracy_minus_largest": ev.paired_ci(r.correct.astype(float) - largest.correct),
                     "cost_ratio_to_largest": float(r.mean_cost / largest.mean_cost),
                     "stage_usage": [float((r.stop == k).mean()) for k in range(table.stages)]})
    runs = online_runs(table, evaluation.predicted, seed)
    return {
        "n": table.size, "families": {f: int((table.families == f).sum()) for f in np.unique(table.families)},
        "rungs": table.rungs, "lambdas": list(lambdas), "policies": rows,
        "invariant_violations": ev.invariants(results),
        "curves": ev.curve_metrics(results, table.rungs),
        "predictors": predictor_quality(evaluation.predicted, table),
        "transfer": [transfer(table, a, b, lam, seed) for a, b in (("story", "expression"), ("expression", "story"))
                     for lam in REPORT_LAMBDAS],
        "online": {run.name: {"final_regret": float(run.cumulative_regret[-1]), "horizon": table.size,
                              "arms": len(run.arms), "lam": ONLINE_LAMBDA,
                              "curve": run.cumulative_regret.tolist()} for run in runs},
        "_evaluation": evaluation,
    }


def write_report(table: Table, out_dir: Path, *, seed: int = 0, provenance: dict | None = None,
                 lambdas=ev.LAMBDAS) -> Path:
    summary = summarise(table, seed=seed, lambdas=lambdas)
    evaluation = summary.pop("_evaluation")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps({**summary, "provenance": provenance}, indent=1) + "\n")
    lines = [f"# Cascade report: {table.size} queries, ladder {' -> '.join(table.rungs)}", "",
             "Test folds of a 5-fold cross-fit (each query tested once, by policies fitted and tuned without it); "
             "95% paired-bootstrap CIs over queries. Cost: token-normalised seconds in units of the largest "
             "model's median query; a cascade pays every stage it ran (and the samples when it reads vote "
             "shares), a router or fixed model only the one it asked.", ""]
    if summary["invariant_violations"]:
        lines += ["**Invariant violations (bugs):** " + "; ".join(summary["invariant_violations"]), ""]
    lines += ["## Fixed models and the oracle", "", "| policy | accuracy | cost | stage usage |", "|---|---|---|---|"]
    for row in summary["policies"]:
        if row["lam"] is None:
            lines.append(f"| {row['policy']} | {_fmt(row['accuracy'])} | {_fmt(row['cost'])} | "
                         f"{_usage(row['stage_usage'])} |")
    for lam in REPORT_LAMBDAS:
        near = min(summary["lambdas"], key=lambda x: abs(np.log(x / lam)))
        lines += ["", f"## lam = {near:.3g}", "",
                  "| policy | accuracy | accuracy - largest | cost | cost / largest | stage usage |",
                  "|---|---|---|---|---|---|"]
        for row in summary["policies"]:
            if row["lam"] == near:
                lines.append(f"| {row['policy']} | {_fmt(row['accuracy'])} | {_fmt(row['accuracy_minus_largest'])} "
                             f"| {_fmt(row['cost'])} | {row['cost_ratio_to_largest']:.2f} | "
                             f"{_usage(row['stage_usage'])} |")
    lines += ["", "## Frontier metrics (over the lam grid)", "",
              "| policy | cost saving at matched accuracy | normalised area | APGR | best delta-IBC |",
              "|---|---|---|---|---|"]
    for policy, m in summary["curves"].items():
        lines.append(f"| {policy} | " + " | ".join("-" if m[k] is None else f"{m[k]:.3f}" for k in (
            "cost_saving_at_matched_accuracy", "normalised_area", "apgr", "best_delta_ibc")) + " |")
    lines += ["", "## Quality predictors (reply features, calibrated logistic regression, cross-fitted)", "",
              "| stage | accuracy | AUROC | ECE | Brier |", "|---|---|---|---|---|"]
    for rung, m in summary["predictors"].items():
        auroc = "-" if m["auroc"] is None else f"{m['auroc']:.3f}"
        lines.append(f"| {rung} | {m['accuracy']:.3f} | {auroc} | {m['ece']:.3f} | {m['brier']:.3f} |")
    lines += ["", "## Cross-family transfer (tuned on one family, tested on the other)", "",
              "| tuned on | tested on | lam | accuracy | cost | largest model: accuracy, cost |", "|---|---|---|---|---|---|"]
    for t in summary["transfer"]:
        lines.append(f"| {t['tune']} | {t['test']} | {t['lam']} | {t['accuracy']:.3f} | {t['cost']:.3f} | "
                     f"{t['largest_accuracy']:.3f}, {t['largest_cost']:.3f} |")
    lines += ["", f"## Online learning (lam = {ONLINE_LAMBDA}, arms: per-stage thresholds in {ONLINE_GRID})", "",
              "Cumulative regret against the best fixed arm in hindsight on the same stream (exact by replay). "
              "No regret rate is claimed; the plot's c*sqrt(T) curve is a labelled reference only.", "",
              "| learner | horizon | arms | final cumulative regret |", "|---|---|---|---|"]
    for name, run in summary["online"].items():
        lines.append(f"| {name} | {run['horizon']} | {run['arms']} | {run['final_regret']:.2f} |")
    plots = write_plots(summary, evaluation, table, out_dir)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _fmt(triple) -> str:
    mean, low, high = triple
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _usage(usage) -> str:
    return " / ".join(f"{100 * u:.1f}%" for u in usage)


def write_plots(summary: dict, evaluation, table: Table, out_dir: Path) -> list[Path]:
    from matplotlib.figure import Figure
    paths = []
    figure = Figure(figsize=(9, 5), layout="constrained")
    axis = figure.subplots()
    for policy in sorted({r["policy"] for r in summary["policies"] if r["lam"] is not None}):
        points = sorted((r["cost"][0], r["accuracy"][0]) for r in summary["policies"] if r["policy"] == policy)
        axis.plot(*zip(*points), marker=".", label=policy)
    for group, style in (("fixed-", dict(marker="s", color="black", linestyle="-")),
                         ("oracle-", dict(marker="*", markersize=10, color="black", linestyle=":"))):
        # lam-free policies as one series each, named left to right in the key instead of labels on points
        rows = sorted((r for r in summary["policies"] if r["lam"] is None and r["policy"].startswith(group)),
                      key=lambda r: (r["cost"][0], r["policy"]))
        if rows:
            axis.plot([r["cost"][0] for r in rows], [r["accuracy"][0] for r in rows], linewidth=1, **style,
                      label=f"{group.rstrip('-')}, left to right: " + ", ".join(r["policy"].removeprefix(group)
                                                                                 for r in rows))
    axis.set(xlabel="mean cost (largest model's median query = 1)", ylabel="accuracy", title="Accuracy-cost")
    figure.legend(loc="outside right upper", fontsize=7)
    paths.append(out_dir / "pareto.png")
    figure.savefig(paths[-1], dpi=110)

    figure = Figure(figsize=(7, 4), layout="constrained")
    axis = figure.subplots()
    horizon = 1
    for name, run in summary["online"].items():
        axis.plot(run["curve"], label=name)
        horizon = len(run["curve"])
    t = np.arange(1, horizon + 1)
    scale = max(max(run["curve"][-1] for run in summary["online"].values()), 1e-9) / np.sqrt(horizon)
    axis.plot(t, scale * np.sqrt(t), linestyle=":", color="grey", label="reference c*sqrt(T) (not a bound)")
    axis.set(xlabel="queries", ylabel="cumulative regret", title="Online learners vs best fixed arm")
    axis.legend(fontsize=7)
    paths.append(out_dir / "regret.png")
    figure.savefig(paths[-1], dpi=110)

    figure = Figure(figsize=(7, 4), layout="constrained")
    axis = figure.subplots()
    edges, single = np.linspace(0, 1, 11), []
    for k, rung in enumerate(table.rungs):
        p, y = evaluation.predicted[:, k], table.correct[:, k]
        index = np.clip(np.digitize(p, edges[1:-1]), 0, 9)
        xs = [p[index == b].mean() for b in range(10) if (index == b).any()]
        ys = [y[index == b].mean() for b in range(10) if (index == b).any()]
        if len(xs) < 2:  # every prediction in one bin: a point, no curve
            single.append(rung)
            continue
        axis.plot(xs, ys, marker="o", label=f"{rung} (ECE {expected_calibration_error(p, y):.3f})")
    axis.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axis.set(xlabel="predicted P(correct)", ylabel="observed accuracy", title="Calibration (test folds)" + (
        f"; every prediction in one bin, not drawn: {', '.join(single)}" if single else ""))
    axis.legend(fontsize=7)
    paths.append(out_dir / "calibration.png")
    figure.savefig(paths[-1], dpi=110)

    figure = Figure(figsize=(7, 4), layout="constrained")
    axis = figure.subplots()
    rows = [r for r in summary["policies"] if r["policy"] == "calibrated-threshold"]
    bottom = np.zeros(len(rows))
    for k, rung in enumerate(table.rungs):
        share = np.array([r["stage_usage"][k] for r in rows])
        axis.bar([f"{r['lam']:.2g}" for r in rows], share, bottom=bottom, label=rung)
        bottom += share
    axis.set(xlabel="lam", ylabel="share of queries stopping there", title="Stage usage (calibrated threshold)")
    axis.legend(fontsize=7)
    paths.append(out_dir / "stage_usage.png")
    figure.savefig(paths[-1], dpi=110)
    return paths


def cascade_table(records: list[dict]) -> str:
    """Cascade policies (dflash.cascade): accuracy and cost over the same queries, with 95% CIs, stage usage."""
    rows = []
    for r in sorted(records, key=lambda r: (params_of(r).get("policy", ""), params_of(r).get("lam") or 0)):
        m, per_query = metrics_of(r), metrics_of(r).get("per_query") or {}
        usage = " / ".join(f"{100 * u:.0f}%" for u in m.get("stage_usage") or [])
        lam = params_of(r).get("lam")
        rows.append([r["id"].split("[")[-1].rstrip("]"), "-" if lam is None else fmt(lam),
                     str(len(per_query.get("qids") or [])), mean_ci_cell(per_query.get("correct")),
                     mean_ci_cell(per_query.get("cost")), usage, verdict_cell(r)])
    return ("Cost: token-normalised seconds, the largest model's median query = 1; a cascade pays every stage it "
            "ran. The full cascade report of this run's table (frontier, lam table, calibration and regret "
            "plots) is in cascade-<profile>/summary.md next to this file.\n\n"
            + table(["Case", "lam", "queries", "accuracy", "cost", "stage usage (cheapest first)", "Verdict"], rows,
                    numeric=[False, True, True, True, True, False, False]))
