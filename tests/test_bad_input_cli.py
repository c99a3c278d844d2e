"""Bad input to the `dflash` command line: every row gets exit code 2 and one clear message (what was wrong, how
to fix it), never a traceback, a hang or output from a broken input, and leaves every file that existed before
unchanged. `python tests/test_bad_input_cli.py` prints the table (input, exit code, first line) from subprocesses.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from dflash.cli import main

TINY = Path(__file__).resolve().parents[1] / "dflash" / "models" / "tiny"


# --- broken checkpoints: copies of the tiny pair with one thing wrong -----------------------------------------

def target_copy(out: Path, drop=()) -> Path:
    shutil.copytree(TINY / "target", out, ignore=shutil.ignore_patterns(*drop))
    return out


def target_without_weights(out: Path) -> Path:
    return target_copy(out, drop=["*.safetensors"])


def target_with_corrupt_weights(out: Path) -> Path:
    target_copy(out)
    (out / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    return out


def target_without_embeddings(out: Path) -> Path:
    from safetensors.torch import load_file, save_file
    target_copy(out)
    state = load_file(str(out / "model.safetensors"))
    del state["model.embed_tokens.weight"]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def target_without_tokenizer(out: Path) -> Path:
    return target_copy(out, drop=["tokenizer*", "chat_template.jinja"])


def target_with_config(text: str) -> Callable[[Path], Path]:
    def make(out: Path) -> Path:
        target_copy(out)
        (out / "config.json").write_text(text)
        return out
    return make


def draft_with_config(edit: dict | str) -> Callable[[Path], Path]:
    """A copy of the tiny draft whose config.json has `edit` merged in (a str replaces the whole file)."""
    def make(out: Path) -> Path:
        shutil.copytree(TINY / "draft", out)
        config = out / "config.json"
        if isinstance(edit, str):
            config.write_text(edit)
        else:
            raw = json.loads(config.read_text())
            for key, value in edit.items():
                if "." in key:
                    outer, inner = key.split(".")
                    raw[outer][inner] = value
                else:
                    raw[key] = value
            config.write_text(json.dumps(raw))
        return out
    return make


def prompts_file(content: str | bytes, suffix: str = ".txt") -> Callable[[Path], Path]:
    def make(out: Path) -> Path:
        out = out.with_suffix(suffix)
        out.write_bytes(content.encode() if isinstance(content, str) else content)
        return out
    return make


@dataclass(frozen=True)
class BadInput:
    id: str
    argv: tuple[str, ...]  # "{x}" is replaced by the path `make` built
    message: str  # regex the error must match
    make: Callable[[Path], Path] | None = None


GENERATE = ("generate", "--max-new-tokens", "4")
TRAIN = ("train", "--target", "tiny", "--heldout", "tiny-heldout", "--out", "/nonexistent/never-written")
CASES = [
    BadInput("prompt-id-beyond-vocab", (*GENERATE, "--prompt-ids", "5,99999"), r"token id 99999, outside the "
             r"target's vocabulary \(0\.\.2047\)"),
    BadInput("prompt-id-negative", (*GENERATE, "--prompt-ids", "5,-3"), r"--prompt-ids: expected comma-separated "
             r"integers >= 0"),
    BadInput("prompt-ids-not-numbers", (*GENERATE, "--prompt-ids", "5,x"), r"--prompt-ids: expected comma-sep"),
    BadInput("temperature-nan", (*GENERATE, "--prompt", "x", "--temperature", "nan"), r"--temperature: must be a "
             r"finite number"),
    BadInput("temperature-inf", (*GENERATE, "--prompt", "x", "--temperature", "inf"), r"--temperature: must be a "
             r"finite number"),
    BadInput("temperature-negative", (*GENERATE, "--prompt", "x", "--temperature", "-1"), r"--temperature: must "),
    BadInput("seed-huge", (*GENERATE, "--prompt", "x", "--seed", "99999999999999999999999"), r"--seed: must be an "
             r"integer in \[0, 9223372036854775807\]"),
    BadInput("seed-negative", (*GENERATE, "--prompt", "x", "--seed", "-1"), r"--seed: must be an integer"),
    BadInput("max-new-tokens-huge", ("generate", "--prompt", "x", "--max-new-tokens", "99999999999999999999"),
             r"--max-new-tokens: must be an integer in \[1, 2147483648\]"),
    BadInput("max-new-tokens-past-positions", ("generate", "--prompt", "x", "--max-new-tokens", "5000"),
             r"plus max_new_tokens \(5000\) exceeds the target's 1024 positions.*Lower max_new_tokens to at most"),
    BadInput("prompt-past-positions", ("generate", "--max-new-tokens", "4", "--prompt-ids", ",".join(["7"] * 1500)),
             r"The prompt \(1500 tokens\) plus max_new_tokens \(4\) exceeds the target's 1024 positions.*Shorten"),
    BadInput("max-new-tokens-zero", ("generate", "--prompt", "x", "--max-new-tokens", "0"), r"--max-new-tokens: must"),
    BadInput("block-size-zero", (*GENERATE, "--prompt", "x", "--block-size", "0"), r"--block-size: must be"),
    BadInput("block-size-beyond-draft", (*GENERATE, "--prompt", "x", "--block-size", "17"),
             r"block_size must be between 1 and 16, got 17: the draft was trained with block size 16"),
    BadInput("acceptance-unknown", (*GENERATE, "--prompt", "x", "--acceptance", "magic"), r"--acceptance: invalid "
             r"choice"),
    BadInput("device-unknown", (*GENERATE, "--prompt", "x", "--device", "foo"), r"Unknown device 'foo'"),
    BadInput("device-cuda-absent", (*GENERATE, "--prompt", "x", "--device", "cuda"),
             r"needs CUDA, which this machine does not have" if not __import__("torch").cuda.is_available()
             else r"."),
    BadInput("dtype-int8", (*GENERATE, "--prompt", "x", "--dtype", "int8"), r"--dtype: invalid choice: 'int8'"),
    BadInput("draft-config-not-json", (*GENERATE, "--prompt", "x", "--draft", "{x}"), r"config.json is not valid "
             r"JSON", draft_with_config("{not json")),
    BadInput("draft-config-not-object", (*GENERATE, "--prompt", "x", "--draft", "{x}"), r"is not a JSON object",
             draft_with_config("[1, 2]")),
    BadInput("draft-block-size-text", (*GENERATE, "--prompt", "x", "--draft", "{x}"), r"config.json: 'block_size' "
             r"must be an integer >= 1, got 'sixteen'", draft_with_config({"block_size": "sixteen"})),
    BadInput("draft-block-size-zero", (*GENERATE, "--prompt", "x", "--draft", "{x}"), r"'block_size' must be an "
             r"integer >= 1, got 0", draft_with_config({"block_size": 0})),
    BadInput("draft-hidden-size-text", (*GENERATE, "--prompt", "x", "--draft", "{x}"), r"'hidden_size' must be an "
             r"integer >= 1, got '192'", draft_with_config({"hidden_size": "192"})),
    BadInput("draft-heads-indivisible", (*GENERATE, "--prompt", "x", "--draft", "{x}"), r"'num_key_value_heads' "
             r"must be a divisor of num_attention_heads", draft_with_config({"num_key_value_heads": 3})),
    BadInput("draft-layer-ids-text", (*GENERATE, "--prompt", "x", "--draft", "{x}"), r"target_layer_ids' must be a "
             r"non-empty list of integers", draft_with_config({"dflash_config.target_layer_ids": ["1"]})),
    BadInput("draft-mask-id-text", (*GENERATE, "--prompt", "x", "--draft", "{x}"), r"'dflash_config.mask_token_id' "
             r"must be an integer", draft_with_config({"dflash_config.mask_token_id": "4"})),
    BadInput("draft-eps-negative", (*GENERATE, "--prompt", "x", "--draft", "{x}"), r"'rms_norm_eps' must be a "
             r"number in \(0, 1\)", draft_with_config({"rms_norm_eps": -1})),
    BadInput("target-without-weights", (*GENERATE, "--prompt", "x", "--target", "{x}"), r"No \*\.safetensors "
             r"weights in target directory", target_without_weights),
    BadInput("target-corrupt-weights", (*GENERATE, "--prompt", "x", "--target", "{x}"), r"Target checkpoint .* "
             r"could not be loaded", target_with_corrupt_weights),
    BadInput("target-missing-embeddings", (*GENERATE, "--prompt", "x", "--target", "{x}"), r"lacks tensors its "
             r"config.json needs \(missing \[.*'model.embed_tokens.weight'\]", target_without_embeddings),
    BadInput("target-without-tokenizer", (*GENERATE, "--prompt", "x", "--target", "{x}"), r"has no tokenizer",
             target_without_tokenizer),
    BadInput("target-config-not-json", (*GENERATE, "--prompt-ids", "5", "--target", "{x}"), r"config.json is not "
             r"valid JSON", target_with_config("{not json")),
    BadInput("target-config-unknown-architecture", (*GENERATE, "--prompt-ids", "5", "--target", "{x}"),
             r"Target checkpoint .* could not be loaded", target_with_config('{"model_type": "no-such-arch"}')),
    BadInput("target-unknown-name", (*GENERATE, "--prompt", "x", "--target", "no-such-model"), r"Unknown target "
             r"model 'no-such-model'"),
    BadInput("gate-quality-block-sizes-text", ("gate-quality", "--block-sizes", "abc"), r"--block-sizes: expected "
             r"comma-separated integers"),
    BadInput("gate-quality-repeats-zero", ("gate-quality", "--repeats", "0"), r"--repeats: must be an integer"),
    BadInput("gate-quality-hogs-negative", ("gate-quality", "--hogs", "-1"), r"--hogs: must be an integer"),
    BadInput("train-layer-ids-text", ("train", "--target", "tiny", "--target-layer-ids", "a,b"),
             r"--target-layer-ids: expected comma-separated integers"),
    BadInput("train-steps-zero", ("train", "--steps", "0"), r"--steps: must be an integer"),
    BadInput("train-lr-nan", ("train", "--lr", "nan"), r"--lr: must be a finite number"),
    BadInput("train-missing-options", ("train", "--target", "tiny"), r"needs --target, --prompts and --out"),
    BadInput("train-prompts-missing", (*TRAIN, "--prompts", "/nonexistent/prompts.txt"), r"not a named set .* and "
             r"not a file"),
    BadInput("train-prompts-empty", (*TRAIN, "--prompts", "{x}"), r"hold no prompts", prompts_file("\n \n")),
    BadInput("train-prompts-not-utf8", (*TRAIN, "--prompts", "{x}"), r"is not UTF-8 text",
             prompts_file(b"caf\xe9\n")),
    BadInput("train-prompts-bad-json", (*TRAIN, "--prompts", "{x}"), r"Cannot read prompts from",
             prompts_file('{"code": "not a list"}', ".json")),
    BadInput("train-layer-ids-beyond-target", (*TRAIN, "--prompts", "tiny-heldout", "--target-layer-ids", "1,6"),
             r"include layers outside the target's 6 decoder layers"),
    BadInput("train-out-is-a-file", ("train", "--target", "tiny", "--prompts", "tiny-heldout", "--out", "{x}"),
             r"--out .* is a file", prompts_file("x")),
    BadInput("train-device-on-tiny", ("train", "tiny", "--device", "cpu"), r"unrecognized arguments: --device cpu"),
    BadInput("train-device-without-cuda", (*TRAIN, "--prompts", "tiny-heldout", "--device", "cuda"), r"needs CUDA"),
    BadInput("bench-dtype-unknown", ("bench", "--dtype", "int8"), r"--dtype"),
    BadInput("bench-threads-zero", ("bench", "--threads", "0"), r"--threads: must be an integer"),
    BadInput("bench-unknown-profile", ("bench", "--profile", "nope"), r"nope"),
    BadInput("baselines-without-action", ("baselines",), r"needs --check or --from-run"),
]


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots: what a bad input must leave alone."""
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for root in roots if root.exists()
            for f in sorted(root.rglob("*")) if f.is_file()}


def argv_for(case: BadInput, tmp_path: Path) -> list[str]:
    made = case.make(tmp_path / "input") if case.make else None
    return [a.replace("{x}", str(made)) for a in case.argv]


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse reports usage errors by exiting 2
        return exit_.code


@pytest.mark.parametrize("bad", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_cli_input_exits_2_with_one_clear_message(bad, tmp_path, capsys):
    argv = argv_for(bad, tmp_path)
    before = snapshot(tmp_path, TINY)
    code = run_main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    assert out == ""  # nothing produced from a broken input
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))
             and "Loading weights" not in line]
    assert len(lines) == 1 and re.search(bad.message, lines[0]), err
    assert lines[0].startswith(("dflash: error: ", "dflash ")), err
    assert snapshot(tmp_path, TINY) == before


def test_a_table_row_gives_the_same_answer_from_a_subprocess(tmp_path):
    """The in-process table above stands for the real command: one row run end to end."""
    run = subprocess.run([sys.executable, "-m", "dflash.cli", *argv_for(CASES[0], tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("dflash: error: The prompt holds token id 99999"), run.stderr


def test_prompt_that_is_not_utf8_is_refused():
    prompt = b"caf\xe9 au lait"  # Latin-1 bytes, as a shell in another locale would pass them
    run = subprocess.run([os.fsencode(sys.executable), b"-m", b"dflash.cli", b"generate", b"--prompt", prompt,
                          b"--max-new-tokens", b"4"], capture_output=True, timeout=120)
    assert run.returncode == 2 and b"Traceback" not in run.stderr, run.stderr
    assert b"--prompt is not valid UTF-8 text" in run.stderr and run.stdout == b""


def test_closed_stdout_is_an_error_not_a_silent_success():
    run = subprocess.run(f"'{sys.executable}' -m dflash.cli generate --prompt x --max-new-tokens 4 --json >&-",
                         shell=True, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "standard output is closed" in run.stderr


def test_reader_that_goes_away_gives_one_line_and_exit_2():
    """`dflash generate ... | head -c0`: the pipe closes before the result is written."""
    process = subprocess.Popen([sys.executable, "-m", "dflash.cli", "generate", "--prompt", "x", "--max-new-tokens",
                                "4", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 2 and "Traceback" not in err, err
    assert "broken pipe" in err


def test_ctrl_c_gives_one_line_and_exit_130(monkeypatch, capsys):
    import dflash.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_generate", interrupted)
    assert run_main(["generate", "--prompt", "x"]) == 128 + signal.SIGINT
    assert capsys.readouterr().err == "dflash: interrupted.\n"


@pytest.mark.parametrize("command,resume", [("generate", False), ("train", True)])
def test_a_path_the_environment_refuses_gives_one_line(monkeypatch, capsys, command, resume):
    import dflash.cli as cli

    def refused(args):
        raise PermissionError(13, "Permission denied", "/read-only/out")
    monkeypatch.setattr(cli, f"cmd_{command}", refused)
    monkeypatch.setattr(cli, "build_parser", lambda: _parser_for(refused))
    assert run_main([command]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dflash: error: Permission denied (/read-only/out). Check the path") and \
        err.count("\n") == 1 and ("--resume" in err) == resume


def _parser_for(func):
    import argparse
    parser = argparse.ArgumentParser(prog="dflash")
    parser.add_argument("command")
    parser.set_defaults(func=func)
    return parser


def test_ctrl_c_of_a_real_process_gives_no_traceback(tmp_path):
    """SIGINT at a random point of start-up or decoding (here: 2 s in) never prints a traceback."""
    process = subprocess.Popen([sys.executable, "-m", "dflash.cli", "generate", "--prompt", "x", "--draft", "none",
                                "--block-size", "1", "--no-stop", "--max-new-tokens", "1000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        process.wait(timeout=2)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert "Traceback" not in err, err
    # 130 from our handler, or -SIGINT when Python re-raises the signal at exit: a shell shows both as $? = 130
    assert process.returncode in (0, 128 + signal.SIGINT, -signal.SIGINT), (process.returncode, err)


if __name__ == "__main__":  # the probe table for a note: input | exit code | first line of the message
    import tempfile
    print("| input | exit | first line |\n| --- | --- | --- |")
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            run = subprocess.run([sys.executable, "-m", "dflash.cli", *argv_for(case, Path(tmp))],
                                 capture_output=True, text=True, timeout=300)
        lines = [line for line in run.stderr.splitlines() if line.strip() and not line.startswith(("usage:", " "))
                 and "Loading weights" not in line]
        first = (lines or ["(none)"])[0].replace("|", "\\|")
        shown = " ".join(a if len(a) < 40 else a[:37] + "..." for a in case.argv)
        print(f"| {case.id}: `{shown}` | {run.returncode} | {first[:160]} |")
