"""The block-diffusion conversion (dflash.blockdiffusion.convert) and its plain reference decoder: the token-shift
loss, the complementary masks, a quick conversion of a stand-in Qwen3 through the CLI (output, kept build,
resume), bad input, and the decoder's pacing, stop and budget rules."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from dflash.blockdiffusion import convert as bd
from dflash.blockdiffusion.reference import reference_decode, reference_generate
from dflash.cli import main
from dflash.errors import DFlashError
from helpers import random_target

L4 = bd.LADDER_DIR / "l4"
MASK, EOS = 4, 1  # the ladder tokenizer's <|MASK|> and <|end|>
QUICK = ("--steps", "4", "--batch-size", "2", "--checkpoint-every", "2")


# --- the loss and the noise ------------------------------------------------------------------------------------------
def test_token_shift_reads_the_clean_stream_at_block_starts():
    length, block = 8, 4
    logits = 50 * torch.eye(2 * length)[None]  # output row r predicts class r: the loss shows which row was read
    masked = torch.zeros(1, length, dtype=torch.bool)
    masked[0, [1, 4, 5]] = True
    targets = torch.zeros(1, length, dtype=torch.long)
    targets[0, 1], targets[0, 4], targets[0, 5] = 0, length + 3, 4  # noisy 0, clean 3 (block start), noisy 4
    assert bd.shifted_loss(logits, targets, masked, block) < 1e-6
    targets[0, 4] = 3  # the noisy stream's position 3 would be the wrong source for a block's first position
    assert bd.shifted_loss(logits, targets, masked, block) > 10


def test_complementary_masks_cover_every_response_position_once():
    samples = [([5, 6, 7], [8, 9, EOS]), ([5] * 10, [10, 11, 12, 13, EOS]), ([7], [EOS]), ([5] * 14, [6, 7, EOS])]
    tokens, response, dropped = bd.make_rows(samples, 16, MASK)
    assert dropped == 1 and len(tokens) == 3  # 14 + 3 tokens do not fit 16
    assert tokens[0, 6:].eq(MASK).all() and not response[0, :3].any() and response[0, 3:6].all()
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        noisy, masked, clean = bd.complementary_noise(tokens, response, MASK, generator, 1e-3)
        first, second = masked[:3], masked[3:]
        assert torch.equal(first | second, response) and not (first & second).any()
        assert not masked[:, 0].any() and not masked[0, :3].any() and not masked[1, :10].any()  # prompts never
        assert torch.equal(clean, tokens.repeat(2, 1)) and torch.equal(noisy[~masked], clean[~masked])
        assert noisy[masked].eq(MASK).all()


# --- a quick conversion through the CLI ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    """A random one-layer Qwen3 with the ladder's tokenizer (it has <|MASK|> and a chat template)."""
    base = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=EOS, pad_token_id=0)
    Qwen3ForCausalLM(config).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(L4 / name, base / name)
    return base


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    rows = [{"prompt": f"Compute ({a} + {b}).", "response": f"{a} + {b} = {a + b}. The answer is {a + b}."}
            for a in range(4) for b in range(3)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train(*args) -> int:
    return main(["train", "block-diffusion", *map(str, args)])


def test_quick_conversion_writes_a_loadable_checkpoint_and_keeps_it(stand_in, data, tmp_path, capsys):
    out = tmp_path / "bd"
    assert train("--base", stand_in, "--data", data, "--out", out, *QUICK) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]
        assert (out / name).stat().st_size == entry["bytes"]
    assert (manifest["block_size"], manifest["mask_token_id"], manifest["stop_token_ids"]) == (32, MASK, [EOS])
    assert manifest["recipe"]["recipe"]["steps"] == 4 and manifest["recipe"]["data"]["rows"] == 12
    assert manifest["recipe"]["base"]["weights_sha256"]["model.safetensors"] == hashlib.sha256(
        (stand_in / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["quality"]["measured"] is False and not (out / ".work").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert model.config.block_diffusion == {"block_size": 32, "mask_token_id": MASK, "stop_token_ids": [EOS]}
    capsys.readouterr()
    assert train("--base", stand_in, "--data", data, "--out", out, *QUICK) == 0
    assert "kept" in capsys.readouterr().out


def test_an_interrupted_conversion_resumes_to_the_same_weights(stand_in, data, tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train("--base", stand_in, "--data", data, "--out", straight, *QUICK) == 0
    step, calls = bd.train_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after the checkpoint of step 2
            raise KeyboardInterrupt
        return step(*args, **kwargs)
    monkeypatch.setattr(bd, "train_step", interrupted)
    assert train("--base", stand_in, "--data", data, "--out", resumed, *QUICK) == 130
    assert (resumed / ".work" / "checkpoint.safetensors").exists() and not (resumed / "manifest.json").exists()
    monkeypatch.setattr(bd, "train_step", step)
    assert train("--base", stand_in, "--data", data, "--out", resumed, *QUICK, "--resume") == 0
    assert json.loads((resumed / "manifest.json").read_text())["training"]["resumed_at_step"] == 2
    assert (resumed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()


def edited_copy(source: Path, target: Path, name: str, edit) -> Path:
    shutil.copytree(source, target)
    (target / name).write_text(json.dumps(edit(json.loads((target / name).read_text()))))
    return target


@pytest.mark.parametrize("problem,words", [
    ("missing-base", r"--base '/nonexistent/base' cannot be used"),
    ("wrong-model-type", r"is a 'gpt2' model; the block-diffusion conversion supports"),
    ("no-mask-token", r"it has no mask token"),
    ("unknown-mask-token", r"--mask-token '<\|nope\|>' is not in its vocabulary"),
    ("no-data", r"--data FILE.jsonl is needed"),
    ("missing-data", r"no such file"),
    ("bad-data-line", r"rows.jsonl, line 2: not valid JSON"),
    ("missing-key", r"line 1: needs the text fields \"prompt\" and \"response\" \(found \['prompt'\]\)"),
])
def test_bad_input_is_one_clear_error(problem, words, stand_in, data, tmp_path, capsys):
    base, extra = stand_in, ["--data", data]
    if problem == "missing-base":
        base = "/nonexistent/base"
    elif problem == "wrong-model-type":
        base = edited_copy(stand_in, tmp_path / "gpt2", "config.json", lambda c: {**c, "model_type": "gpt2"})
    elif problem == "no-mask-token":
        base = edited_copy(stand_in, tmp_path / "nomask", "tokenizer_config.json",
                           lambda c: {k: v for k, v in c.items() if k != "mask_token"})
    elif problem == "unknown-mask-token":
        extra += ["--mask-token", "<|nope|>"]
    elif problem == "no-data":
        extra = []
    elif problem == "missing-data":
        extra = ["--data", tmp_path / "absent.jsonl"]
    else:
        bad = tmp_path / "rows.jsonl"
        bad.write_text('{"prompt": "a", "response": "b"}\n{not json\n' if problem == "bad-data-line"
                       else '{"prompt": "a"}\n')
        extra = ["--data", bad]
    assert train("--base", base, *extra, "--out", tmp_path / "out", *QUICK) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.startswith("dflash: error: ")
    assert __import__("re").search(words, error), error
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_quality_pairs_the_base_and_the_converted_model_on_the_same_queries():
    from dflash.cascade.tasks import build_task_set
    from dflash.loading import load_target, load_tokenizer
    tokenizer, model = load_tokenizer(str(L4)), load_target(str(L4))
    queries = {f: qs[:2] for f, qs in build_task_set(0, 10, 2).heldout.items()}
    quality = bd.measure_quality(model, model, tokenizer, queries, bd.Recipe(max_new_tokens=48), MASK, [EOS])
    for threshold in ("threshold_1.0", "threshold_0.9"):
        figures = quality[threshold]
        assert figures["n"] == 4 and 0 <= figures["converted_accuracy"] <= 1 and figures["forwards_per_token"] > 0
        changed = figures["discordant"]["base_only"] - figures["discordant"]["converted_only"]
        assert figures["base_accuracy"] - figures["converted_accuracy"] == pytest.approx(changed / 4)
    assert quality["threshold_1.0"]["forwards_per_token"] >= 1  # one token a forward, some past the stop (cut)


# --- the reference decoder -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return random_target(3, vocab_size=16)


def decode(model, prompt, **options):
    settings = dict(block_size=8, sub_block_size=4, threshold=1.0, mask_id=15, stop_ids=[], max_new_tokens=19)
    return reference_decode(model, prompt, **{**settings, **options})


@pytest.mark.parametrize("prompt_length,max_new_tokens", [(5, 3), (5, 11), (5, 19), (8, 8), (8, 16), (1, 15)])
def test_threshold_one_unmasks_one_token_per_forward(tiny, prompt_length, max_new_tokens):
    """Budgets that end at a block boundary: every forward (sub-block step, finalize or the first AR token) then
    yields exactly one kept token; threshold 0 fills a whole sub-block per forward."""
    prompt = list(range(1, prompt_length + 1))
    result = decode(tiny, prompt, max_new_tokens=max_new_tokens)
    assert len(result.ids) == max_new_tokens and result.forwards == max_new_tokens
    parallel = decode(tiny, prompt, max_new_tokens=max_new_tokens, threshold=0.0)
    assert len(parallel.ids) == max_new_tokens and parallel.forwards < max_new_tokens


def test_decoding_stops_at_the_first_stop_token(tiny):
    prompt = [3, 1, 4, 1, 5]
    free = decode(tiny, prompt)
    index = next(i for i, t in enumerate(free.ids) if i >= 2 and t not in free.ids[:i])
    stopped = decode(tiny, prompt, stop_ids=[free.ids[index]])
    assert stopped.ids == free.ids[: index + 1] and stopped.forwards <= free.forwards


def test_max_new_tokens_is_respected(tiny):
    prompt = [2, 7, 1, 8]
    longest = reference_generate(tiny, prompt, block_size=8, sub_block_size=4, threshold=0.5, mask_id=15,
                                 stop_ids=[], max_new_tokens=30)
    for budget in (1, 2, 4, 5, 13):
        assert reference_generate(tiny, prompt, block_size=8, sub_block_size=4, threshold=0.5, mask_id=15,
                                  stop_ids=[], max_new_tokens=budget) == longest[:budget]
    with pytest.raises(DFlashError, match="sub-blocks divide"):
        decode(tiny, prompt, sub_block_size=3)
