"""Fast checks of the tiny world: corpus, tokenizer, target helpers (tiny models only)."""

import dataclasses
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

from dflash.tinyworld import (MASK_TOKEN, SPECIAL_TOKENS, build_corpus, chat_prompt, chat_sample,
                              distillation_prompts, greedy_continuations, make_target_config,
                              train_target, train_tokenizer)
from dflash.tinyworld.corpus import HELDOUT_PROMPTS

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=32, intermediate_size=128)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models gain nothing from threads, and spinning OpenMP threads get very slow
    # when other processes share the 2 cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(seed=0)


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus.train_texts)


@pytest.fixture(scope="module")
def tiny_model(tok):
    torch.manual_seed(0)
    # a large init scale makes the random model's logits peaked, like a trained model's
    return Qwen3ForCausalLM(make_target_config(tok, initializer_range=0.2, **TINY)).eval()


def test_corpus_deterministic_and_sized(corpus):
    again = build_corpus(seed=0)
    assert again.train_texts == corpus.train_texts
    assert again.heldout == corpus.heldout and again.heldout_texts == corpus.heldout_texts
    assert build_corpus(seed=1).train_texts != corpus.train_texts
    assert 1_500_000 <= corpus.num_chars() <= 3_000_000
    assert set(corpus.train_categories) == {"code", "math", "chat"}
    assert len(corpus.modules) >= 60 and not set(corpus.modules) & set(corpus.heldout_modules)


def test_heldout_prompts_not_in_training(corpus):
    assert sorted(corpus.heldout) == ["chat", "code", "math"]
    for cat, prompts in corpus.heldout.items():
        assert len(prompts) == HELDOUT_PROMPTS and len(set(prompts)) == HELDOUT_PROMPTS
        for p in prompts:
            assert not any(p in t for t in corpus.train_texts), (cat, p)
            if cat == "code":  # no trailing newline: "\n    " is one token (see corpus.code_prompt)
                assert p.startswith("def ") and p.endswith('"""')
            else:
                assert p.startswith("<|user|>\n") and p.endswith("<|end|>\n<|assistant|>\n")
    # the shipped held-out file is exactly what the corpus code makes
    import json

    from dflash.loading import PACKAGE_MODELS
    assert json.loads((PACKAGE_MODELS / "tiny" / "heldout.json").read_text()) == corpus.heldout
    # held-out math answers are in the trained format
    assert corpus.heldout_texts["math"][0].rstrip().endswith("<|end|>")
    assert "The answer is" in corpus.heldout_texts["math"][0]


def test_tokenizer_special_tokens(corpus, tok):
    assert [tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.mask_token == MASK_TOKEN and tok(MASK_TOKEN, add_special_tokens=False)["input_ids"] == [4]
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|pad|>"
    # ordinary text never produces the mask (or pad) token, and decodes back exactly
    ids = tok(corpus.train_texts[:300], add_special_tokens=False)["input_ids"]
    assert all(tok.mask_token_id not in x and tok.pad_token_id not in x for x in ids)
    assert tok.decode(ids[0]) == corpus.train_texts[0]
    assert train_tokenizer(corpus.train_texts).backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_tokenizer_roundtrip_and_chat_template(tok, tmp_path):
    msgs = [{"role": "user", "content": "What is 2 plus 3?"},
            {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}]
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for t in (tok, loaded):
        assert t.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True) == chat_prompt(msgs[0]["content"])
        assert t.apply_chat_template(msgs, tokenize=False) == chat_sample(msgs[0]["content"], msgs[1]["content"])
    text = chat_sample("Write a function that returns the square of x.", "def square(x):\n    return x * x")
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.mask_token_id == tok.mask_token_id and loaded.eos_token_id == tok.eos_token_id
    assert len(loaded) == len(tok)


def test_greedy_continuations_match_unbatched(corpus, tok, tiny_model):
    # prompts of different lengths in one batch exercise the left padding
    prompts = corpus.heldout["math"][:3] + corpus.heldout["code"][:3] + distillation_prompts(corpus, tok, 6, seed=3)
    outs = greedy_continuations(tiny_model, tok, prompts, max_new_tokens=12, batch_size=6)
    eos = tok.eos_token_id
    for p, out in zip(prompts, outs):
        ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ref = tiny_model.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=eos,
                                  pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        ref = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert out == ref


def test_distillation_prompts(corpus, tok):
    prompts = distillation_prompts(corpus, tok, 30, seed=0)
    assert prompts == distillation_prompts(corpus, tok, 30, seed=0) and len(prompts) == 30
    chat = [p for p in prompts if p.startswith("<|user|>")]
    assert len(chat) == 20 and all(p.endswith("<|end|>\n<|assistant|>\n") for p in chat)
    code = [p for p in prompts if not p.startswith("<|user|>")]
    assert all(p.strip() and not p.endswith("\n") and len(tok(p)["input_ids"]) <= 160 for p in code)
    assert all(any(p in t for t in corpus.train_texts) for p in code)  # windows of training text


def test_train_target_smoke(corpus, tok, tmp_path):
    small = dataclasses.replace(corpus, train_texts=corpus.train_texts[:200],
                                train_categories=corpus.train_categories[:200],
                                heldout_texts={k: v[:4] for k, v in corpus.heldout_texts.items()})
    model, stats = train_target(small, tok, steps=3, batch_size=4, seq_len=64, out_dir=str(tmp_path),
                                progress=False, config_overrides=TINY, n_math_eval=4)
    assert {"params", "train_loss", "heldout_loss", "wall_seconds", "samples"} <= set(stats)
    assert set(stats["samples"]) == {"code", "math", "chat"} and stats["heldout_loss"]["all"] > 0
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok)
    assert os.path.exists(tmp_path / "model.safetensors") and os.path.exists(tmp_path / "config.json")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.tensor([[2, 100, 200, 1]])
    torch.testing.assert_close(reloaded(x).logits, model(x).logits)
