"""Markdown summary: a syrupy snapshot of the renderer on fixed synthetic records (format regressions show
up as a snapshot diff; update deliberately with --snapshot-update), the INCOMPLETE banner, file output."""
import builtins

import pytest
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

from dflash.harness import plots
from dflash.harness.render import append_github_step_summary, plots_section, render_summary, table, write_summary
from dflash.harness.stats import tau_gate, throughput_gate


class MarkdownSnapshot(SingleFileSnapshotExtension):
    _write_mode = WriteMode.TEXT
    file_extension = "md"


FINGERPRINT = {"profile": "a100-qwen3-8b", "hardware": "NVIDIA A100 80GB PCIe", "torch": "2.9.0",
               "transformers": "4.57.1", "python": "3.11.9", "git_sha": "77a8085", "seeds": [0]}

BASE_TAU = [3.2, 3.6, 3.4, 3.5, 3.7, 3.3]


def sweep(bs, taus, speedups, **extra):
    return {"id": f"block_size/aime25/bs={bs}", "ablation_family": "decode", "experiment": "block_size", "group": "AIME25, max_new_tokens=256",
            "params": {"block_size": bs}, "metrics": {"per_prompt_tau": taus, "speedup_samples": speedups}, **extra}


def synthetic_records():
    """Fixed numbers shaped like the researcher's AIME25 results (no live timings)."""
    tau16 = [7.5, 7.8, 7.6, 7.7, 7.9, 7.6]
    gates_ok = [tau_gate(tau16, tau16).to_dict(), throughput_gate([6.2, 6.3, 6.2], [6.2, 6.3, 6.2]).to_dict()]
    dropped = [t * 0.85 for t in BASE_TAU]
    return [
        sweep(16, tau16, [6.18, 6.24, 6.32], gates=gates_ok),
        sweep(4, BASE_TAU, [2.82, 2.85, 3.05, 2.89], verdict="pass"),
        sweep(8, dropped, [4.35, 4.57, 4.46], gates=[tau_gate(BASE_TAU, dropped).to_dict()]),
        sweep(24, [5.04], [4.01], gates=[tau_gate([5.9], [5.04]).to_dict()]),
        {"id": "full_length/baseline", "ablation_family": "decode", "experiment": "full_length", "params": {"block_size": 1, "max_new_tokens": 2048},
         "metrics": {"per_prompt_tau": [1.0, 1.0, 1.0], "tpot_s": [0.0461, 0.0463, 0.0462],
                     "ttft_s": [0.110, 0.111, 0.109], "tokens_per_s": [21.6, 21.7, 21.65],
                     "output_tokens": [2048, 1437, 2048]}},
        {"id": "full_length/bs=16", "ablation_family": "decode", "experiment": "full_length", "params": {"block_size": 16, "max_new_tokens": 2048},
         "metrics": {"per_prompt_tau": [7.4, 7.5, 7.5], "tpot_s": [0.0078, 0.0079, 0.0079],
                     "ttft_s": [0.22, 0.23, 0.226], "tokens_per_s": [127.1, 128.0, 127.9],
                     "output_tokens": [2048, 1209, 2048], "exact_match": [True, True, False]},
         "gates": [tau_gate([7.5, 7.5, 7.5], [7.4, 7.5, 7.5]).to_dict()]},
        {"id": "dynamic/ewma", "ablation_family": "decode", "experiment": "dynamic", "params": {"scheduler": "ewma(alpha=0.10)"},
         "metrics": {"per_prompt_tau": [6.5, 6.6, 6.55], "block_usage": {"8": 826, "12": 1219, "16": 894},
                     "switches": 945, "transitions": 2939,
                     "realized_tokens_per_s": {"8": 104.25, "12": 133.63, "16": 150.81},
                     "speedup_vs_best_fixed": [0.93, 0.95, 0.94]}, "verdict": "pass"},
        {"id": "profiling/bs=16", "ablation_family": "decode", "experiment": "profiling",
         "metrics": {"time_s": {"draft": 12.0, "verify": 30.0, "other": 6.0}, "cycles": 1000,
                     "tau_by_bucket": {"1024-2047": [7.0, 7.2, 6.9], "0-1023": [7.8, 7.6, 7.7, 7.9]}}},
        {"id": "suffix_seed/dense", "ablation_family": "decode", "experiment": "suffix_seed", "params": {"seed_max_tokens": -1},
         "metrics": {"per_prompt_tau": [2.5, 2.6, 2.46], "seeded_tokens_per_cycle": 13.442},
         "verdict": "improvement"},
        {"id": "gpu/bs=32", "ablation_family": "decode", "experiment": "suffix_seed", "status": "skipped", "reason": "needs CUDA"},
    ]


def test_render_summary_snapshot(snapshot):
    text = render_summary(synthetic_records(), FINGERPRINT)
    assert "INCOMPLETE" not in text
    assert text == snapshot(extension_class=MarkdownSnapshot)


def test_render_is_independent_of_record_order():
    records = synthetic_records()
    assert render_summary(records[::-1], FINGERPRINT) == render_summary(records, FINGERPRINT)


def test_missing_announced_cases_make_the_summary_incomplete():
    records = synthetic_records()
    announced = [r["id"] for r in records] + ["block_size/aime25/bs=12", "block_size/aime25/bs=20"]
    text = render_summary(records, FINGERPRINT, announced=announced)
    first_lines = text.splitlines()[:4]
    assert any(f"INCOMPLETE: {len(records)} of {len(records) + 2} cases" in line for line in first_lines)
    assert "`block_size/aime25/bs=12`" in text


def test_no_records_is_never_presented_as_complete():
    text = render_summary([], FINGERPRINT)
    assert "INCOMPLETE: 0 of 0 cases" in text.splitlines()[2]
    assert "INCOMPLETE: 0 of 3 cases" in render_summary([], FINGERPRINT, announced=["a", "b", "c"])


def test_all_announced_present_is_complete():
    records = synthetic_records()
    assert "INCOMPLETE" not in render_summary(records, FINGERPRINT, announced=[r["id"] for r in records])


def test_generic_table_escapes_pipes():
    assert table(["a"], [["x|y"]]).splitlines()[-1] == "| x\\|y |"


def test_write_summary_and_github_step_summary(tmp_path, monkeypatch):
    path = write_summary(tmp_path / "report", "# hello\n")
    assert path.read_text() == "# hello\n"
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    assert append_github_step_summary("# x") is False
    step = tmp_path / "step.md"
    step.write_text("earlier\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    assert append_github_step_summary("# x") is True
    assert step.read_text() == "earlier\n# x\n"


def test_plots_are_skipped_cleanly_without_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib (simulated)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(plots.importlib.util, "find_spec", lambda name: None)
    assert plots.write_plots(synthetic_records(), tmp_path / "plots") == []
    assert not (tmp_path / "plots").exists()


def test_plots_are_written_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    records = synthetic_records()
    records[0]["metrics"]["cycle_trace"] = {"block_size": [8, 16, 16, 8] * 30, "tau": [5, 8, 7, 4] * 30,
                                            "cycle_s": [0.04, 0.05, 0.05, 0.04] * 30}
    written = plots.write_plots(records, tmp_path)
    assert len(written) == 3 and all(p.stat().st_size > 0 for p in written)


def test_a_bad_metric_shows_as_invalid_instead_of_losing_the_summary():
    record = sweep(8, [5.0, float("nan")], ["fast"])
    row = "| 8 | 2 | 1 | invalid data | invalid data | — | invalid data | NO GATE |"  # no TPOT recorded: a dash
    assert row in render_summary([record], FINGERPRINT)


def test_a_family_display_name_titles_its_section():
    record = {"id": "fastdllm/test_fastdllm_loglik[tiny-loglik]", "ablation_family": "fastdllm", "experiment": "fastdllm", "group": "graded",
              "title": "Fast-dLLM v2", "params": {"task": "loglik"},
              "metrics": {"per_query": {"qids": ["q0", "q1"], "correct": [1, 0], "cost": [1.0, 1.0]}}}
    text = render_summary([record], FINGERPRINT)
    assert "## Fast-dLLM v2: graded" in text and "Fastdllm" not in text


def test_the_plots_section_shows_each_picture_and_why_one_was_left_out():
    section = plots_section(["a_tau_vs_cycle.png"], ["case[x]: no rolling plot, 9 cycles traced"])
    assert section == ("## Plots\n\n![a_tau_vs_cycle](a_tau_vs_cycle.png)\n\nLeft out:\n\n"
                       "- case[x]: no rolling plot, 9 cycles traced\n")
    assert plots_section([], []) == ""
