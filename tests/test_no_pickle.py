"""Issue 10: nothing a user can put in an output directory runs code. The resumable work files of `dflash train`
(OUT/.work: stages and the training checkpoint) are safetensors + JSON, never unpickled: a crafted pickle under
the old `.pt` names or under the new names is refused with a DFlashError on --resume and its payload never runs;
a corrupt, truncated, forged or mismatched work file is a DFlashError naming the file; and the package source
has no pickle-loading call and no remote-code switch turned on. Cheap: the embedded tiny target, a few steps."""
import ast
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dflash
import dflash.training.train as train_module
from dflash.errors import DFlashError
from dflash.loading import load_target, load_tokenizer
from dflash.training.recipe import RecipeData, RecipeOptions, run_recipe
from dflash.training.train import DraftTrainingConfig

torch.set_num_threads(1)

PROMPTS = ["def add(a, b):", "What is 3 plus 4?", "import os\n"]
CONFIG = DraftTrainingConfig(num_layers=1, block_size=4, steps=4, batch_size=2, anchors_per_sequence=2)
OPTIONS = RecipeOptions(distill_max_new_tokens=8, quality_block_sizes=(4,), quality_max_new_tokens=4,
                        checkpoint_every=2, progress=False)
RESUME = RecipeOptions(**{**vars(OPTIONS), "resume": True})
WORK_FILES = ("sequences.safetensors", "features.safetensors", "checkpoint.safetensors")
LEGACY_FILES = ("sequences.pt", "features.pt", "checkpoint.pt")


class Payload:
    """Unpickling this creates `marker` (the same mechanism as os.system or any other call: __reduce__)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def crafted_pickle(marker: Path, container: str) -> bytes:
    if container == "torch.save":  # the zip container of the old work files
        import io
        buffer = io.BytesIO()
        torch.save({"sequences": Payload(marker)}, buffer)
        return buffer.getvalue()
    return pickle.dumps(Payload(marker), protocol=int(container.removeprefix("pickle-")))


@pytest.fixture(scope="module")
def tiny():
    tok = load_tokenizer("tiny")
    target = load_target("tiny")
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in PROMPTS]
    data = RecipeData({"code": ids[:2], "chat": ids[2:]}, {"code": ids[:1]},
                      mask_token_id=tok.convert_tokens_to_ids("<|MASK|>"), stop_token_ids=[tok.eos_token_id],
                      pad_token_id=tok.pad_token_id)
    return target, data


def recipe(tiny, out: Path, options=RESUME, data=None):
    target, default = tiny
    return run_recipe(target, data or default, out, config=CONFIG, options=options, command="test",
                      log=lambda *_: None)


@pytest.fixture(scope="module")
def interrupted_work(tiny, tmp_path_factory):
    """A real OUT/.work left by a run killed right after its step-2 checkpoint (every work file present)."""
    out = tmp_path_factory.mktemp("interrupted")
    save = train_module._save_checkpoint

    class Crash(Exception):
        pass

    def save_then_crash(path, state):
        save(path, state)
        raise Crash
    train_module._save_checkpoint = save_then_crash
    try:
        with pytest.raises(Crash):
            recipe(tiny, out, OPTIONS)
    finally:
        train_module._save_checkpoint = save
    assert {p.name for p in (out / ".work").iterdir()} == {*WORK_FILES, "timings.json"}
    return out / ".work"


def out_with(tmp_path: Path, template: Path | None) -> Path:
    out = tmp_path / "out"
    if template is not None:
        shutil.copytree(template, out / ".work")
    else:
        (out / ".work").mkdir(parents=True)
    return out


@pytest.mark.parametrize("container", ["torch.save", "pickle-4", "pickle-0"])
@pytest.mark.parametrize("name", LEGACY_FILES + WORK_FILES)
def test_crafted_pickle_in_work_dir_never_runs(tiny, tmp_path, name, container):
    if container != "torch.save":  # control: the payload is live when unpickled (torch.save: the next test)
        pickle.loads(crafted_pickle(tmp_path / "control", container))
        assert (tmp_path / "control").exists()
    marker = tmp_path / "pwned"
    out = out_with(tmp_path, None)
    (out / ".work" / name).write_bytes(crafted_pickle(marker, container))
    with pytest.raises(DFlashError) as caught:
        recipe(tiny, out)
    message = str(caught.value)
    assert not marker.exists(), "the crafted pickle's payload ran"
    assert name in message and "without --resume" in message and "Delete it" in message
    old_or_unsafe = name.endswith(".pt") or container != "pickle-0"  # a protocol-0 pickle has no magic bytes
    assert ("old, unsafe format" in message) if old_or_unsafe else ("corrupt" in message)
    assert "\n" not in message


def test_crafted_torch_save_payload_is_live(tmp_path):
    """Control for the torch.save container: the crafted file does run code when loaded the old way."""
    marker = tmp_path / "control"
    path = tmp_path / "sequences.pt"
    path.write_bytes(crafted_pickle(marker, "torch.save"))
    torch.load(path, weights_only=False)  # only this control unpickles; the package never does
    assert marker.exists()


def test_old_pt_files_are_ignored_without_resume(tiny, tmp_path):
    marker = tmp_path / "pwned"
    out = out_with(tmp_path, None)
    for name in LEGACY_FILES:
        (out / ".work" / name).write_bytes(crafted_pickle(marker, "pickle-4"))
    manifest = recipe(tiny, out, OPTIONS)  # computed from scratch; .work (with the old files) removed
    assert not marker.exists() and not (out / ".work").exists() and manifest["files"]


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path):
    path.write_bytes(b"\x00\xff" * 64)


def _empty(path: Path):
    path.write_bytes(b"")


def _huge_header(path: Path):  # a header length far past the end of the file
    data = path.read_bytes()
    path.write_bytes((2 ** 40).to_bytes(8, "little") + data[8:])


def _broken_json(path: Path):
    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, str(path), metadata={**metadata, "dflash_state": "{not json"})


@pytest.mark.parametrize("damage", [_truncate, _garbage, _empty, _huge_header, _broken_json])
@pytest.mark.parametrize("name", WORK_FILES)
def test_corrupt_work_file_is_a_clear_error(tiny, interrupted_work, tmp_path, name, damage):
    out = out_with(tmp_path, interrupted_work)
    damage(out / ".work" / name)
    with pytest.raises(DFlashError, match=re.escape(name)) as caught:
        recipe(tiny, out)
    assert "without --resume" in str(caught.value)


def _rewrite(path: Path, change):
    """Rewrite a valid work file with `change(tensors, state)` applied: a forged file that parses."""
    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    state = json.loads(metadata["dflash_state"])
    change(tensors, state)
    save_file(tensors, str(path), metadata={**metadata, "dflash_state": json.dumps(state)})


def _out_of_vocab(tensors, state):
    tensors["token_ids"][0] = 10 ** 9


def _bad_offsets(tensors, state):
    tensors["offsets"][-1] += 5


def _wrong_feature_shape(tensors, state):
    tensors["feature.0"] = tensors["feature.0"][:, :3].contiguous()


def _missing_feature(tensors, state):
    del tensors["feature.0"]


def _draft_shape(tensors, state):
    name = next(k for k in tensors if k.startswith("draft.") and tensors[k].dim() == 2)
    tensors[name] = tensors[name][:, :1].contiguous()


def _optimizer_shape(tensors, state):
    name = next(k for k in tensors if k.endswith(".exp_avg"))
    tensors[name] = torch.zeros(3)


def _rng_state(tensors, state):
    tensors["rng.generator"] = torch.zeros(7, dtype=torch.uint8)


def _step_past_end(tensors, state):
    state["step"] = 99


def _scheduler(tensors, state):
    state["scheduler"]["optimizer"] = "not a scheduler field"


def _other_key(tensors, state):
    state["key"]["max_new_tokens"] = 999


@pytest.mark.parametrize("name,change,message", [
    ("sequences.safetensors", _out_of_vocab, "vocabulary"),
    ("sequences.safetensors", _bad_offsets, "offsets"),
    ("sequences.safetensors", _other_key, "max_new_tokens differ"),
    ("features.safetensors", _wrong_feature_shape, "feature.0 is"),
    ("features.safetensors", _missing_feature, "one feature"),
    ("checkpoint.safetensors", _draft_shape, "does not fit this draft"),
    ("checkpoint.safetensors", _optimizer_shape, "optimizer entry"),
    ("checkpoint.safetensors", _rng_state, "random-number state"),
    ("checkpoint.safetensors", _step_past_end, "invalid step"),
    ("checkpoint.safetensors", _scheduler, "learning-rate schedule"),
])
def test_forged_work_file_is_a_clear_error(tiny, interrupted_work, tmp_path, name, change, message):
    out = out_with(tmp_path, interrupted_work)
    _rewrite(out / ".work" / name, change)
    with pytest.raises(DFlashError, match=message) as caught:
        recipe(tiny, out)
    assert name in str(caught.value) and "without --resume" in str(caught.value)


def test_work_file_of_another_kind_or_run_is_refused(tiny, interrupted_work, tmp_path):
    out = out_with(tmp_path, interrupted_work)
    shutil.copy(out / ".work" / "features.safetensors", out / ".work" / "sequences.safetensors")
    with pytest.raises(DFlashError, match="sequences.safetensors: is not a dflash-recipe-sequences"):
        recipe(tiny, out)
    target, data = tiny
    other = RecipeData({"code": data.train_prompts["code"][::-1], "chat": data.train_prompts["chat"]},
                       data.heldout_prompts, data.mask_token_id, data.stop_token_ids, data.pad_token_id)
    out = out_with(tmp_path / "other", interrupted_work)
    with pytest.raises(DFlashError, match="prompts_sha256 differ"):
        recipe(tiny, out, data=other)


def test_resume_from_intact_work_dir_still_works(tiny, interrupted_work, tmp_path):
    out = out_with(tmp_path, interrupted_work)
    (out / ".work" / "timings.json").write_text("[not an object")  # informational only: ignored
    manifest = recipe(tiny, out)
    assert manifest["stage_wall_s"]["context_features_s_resumed"] and manifest["draft"]["config"]["steps"] == 4


# --- static: no pickle-loading call and no remote-code switch in the package --------------------------------------
FORBIDDEN_TEXT = ("weights_only=" + "False", "trust_remote_code=" + "True", "allow_pickle=" + "True")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _package_sources():
    root = Path(dflash.__file__).parent
    return sorted(root.rglob("*.py"))


def test_package_source_has_no_unsafe_loading():
    problems = []
    for path in _package_sources():
        text = path.read_text()
        compact = re.sub(r"\s+", "", text)
        problems += [f"{path}: {bad}" for bad in FORBIDDEN_TEXT if bad in compact]
        for node in ast.walk(ast.parse(text, str(path))):
            where = f"{path}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                problems.append(f"{where}: from {node.module} import")
            elif isinstance(node, ast.Call):
                keywords = {k.arg: k.value for k in node.keywords if k.arg}
                for name, unsafe in (("weights_only", False), ("trust_remote_code", True), ("allow_pickle", True)):
                    value = keywords.get(name)
                    if value is not None and not (isinstance(value, ast.Constant) and value.value is not unsafe):
                        # a constant safe value is fine; anything else must be an explicit, documented opt-in
                        if not (name == "trust_remote_code" and ast.unparse(value) == "settings.trust_remote_code"):
                            problems.append(f"{where}: {name}={ast.unparse(value)}")
                func = ast.unparse(node.func)
                if func in ("torch.load", "torch.serialization.load"):
                    safe = keywords.get("weights_only")
                    if not (isinstance(safe, ast.Constant) and safe.value is True):
                        problems.append(f"{where}: {func} without weights_only=True")
    assert not problems, "\n".join(problems)


def test_sglang_remote_code_is_an_explicit_default_off_setting():
    from dflash.backends import sglang as sg
    assert sg.EngineSettings("t").trust_remote_code is False
    assert sg.engine_arguments(sg.EngineSettings("t"))["trust_remote_code"] is False
