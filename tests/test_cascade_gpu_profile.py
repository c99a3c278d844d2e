"""The GPU cascade profile (Qwen3-0.6B / 1.7B / 4B / 8B on GSM8K) on a CPU: one-line skip reasons when weights,
data or CUDA are missing, and, on stand-ins in the real Hugging Face cache layout (dflash.standins), its GSM8K
queries, their grading and the same collect -> replay path as the tiny ladder."""
import dataclasses

import pytest

from dflash import loading, standins
from dflash.cascade import replay
from dflash.cascade.collect import collect, read_table
from dflash.cascade.ladder_profile import MathQuery
from dflash.profiles import get_ladder as get_profile

PROFILE = get_profile("gpu-cascade-qwen3")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    for index, (_, model) in enumerate(PROFILE.rungs):
        standins.build_hub_standins(home, target_id=model, draft_id=f"standin/unused-draft-{index}", seed=index)
    return home


@pytest.fixture
def hub(built, monkeypatch, tmp_path):
    standins.point_hf_home(monkeypatch, built, datasets_cache=tmp_path / "datasets")
    monkeypatch.setattr(loading, "_downloads_allowed", False, raising=False)
    return built


def test_skips_with_one_line_reasons(hub, monkeypatch):
    reason = PROFILE.unavailable()
    assert reason is not None and "\n" not in reason and "CUDA" in reason
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert PROFILE.unavailable() is None
    missing = dataclasses.replace(PROFILE, rungs=PROFILE.rungs[:3] + (("Qwen3-32B", "Qwen/Qwen3-32B"),))
    reason = missing.unavailable()
    assert "Qwen/Qwen3-32B" in reason and "hf download Qwen/Qwen3-32B" in reason and "\n" not in reason


def test_gsm8k_queries_are_graded_by_their_final_number(hub):
    queries = PROFILE.queries(3)
    rows = standins.gsm8k_rows("test", "main", 3)
    assert [q.answer for q in queries] == [3 * i + 3 for i in range(3)]
    assert [q.question for q in queries] == [r["question"] for r in rows]
    query = queries[1]
    assert query.grade("so she has \\boxed{6} apples") == (6, True)
    assert query.grade("6 apples, or maybe 7") == (7, False)
    assert query.grade("no idea") == (None, False)
    assert MathQuery("q", "gsm8k", "?", 1018, 1).grade("The answer is 1,018.") == (1018, True)


def test_collect_and_replay_run_on_the_standin_ladder(hub, tmp_path):
    profile = dataclasses.replace(PROFILE, device="cpu", dtype="float32", max_new_tokens=8)
    queries = profile.queries(2)
    path = collect(queries, tmp_path / "table.jsonl", profile, progress=False)
    header, rows = read_table(path)
    assert header["profile"] == PROFILE.name and set(header["models"]) == set(profile.rung_names)
    assert all(m["digest"] != "unavailable" for m in header["models"].values())
    table = replay.build_table(rows, list(profile.rung_names))
    assert table.size == 2 and table.stages == 4 and (table.greedy_s > 0).all()
    tokenizer = loading.load_tokenizer(profile.rungs[0][1])
    text = tokenizer.decode(queries[0].prompt_ids(tokenizer))
    assert text.startswith("<|im_start|>user\n" + queries[0].question) and "boxed" in text  # the chat template
    assert "<think>\n\n</think>" in text  # thinking off
