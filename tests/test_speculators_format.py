"""vLLM's speculators checkpoint format (dflash.speculators): the converter writes the shipped tiny draft in it,
`load_draft` reads it back to the same tensors and settings, and the engine gives identical outputs and taus from
both formats. Bad fields are refused with the file and key named. That vLLM loads the converted draft (with the
same counts as the z-lab one) is tested against a real server in tests/test_vllm_backend.py."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dflash import DFlashError, generate, load_draft, load_target
from dflash.cli import main
from dflash.loading import KNOWN_MODELS, PACKAGE_MODELS
from dflash.speculators import save_speculators


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("spec") / "tiny-speculators"
    assert main(["convert-draft", "--to", "speculators", "tiny", str(out)]) == 0
    return out


def test_converted_config_is_the_speculators_layout(converted):
    config = json.loads((converted / "config.json").read_text())
    zlab = json.loads((PACKAGE_MODELS / "tiny" / "draft" / "config.json").read_text())
    assert config["speculators_model_type"] == "dflash" and config["architectures"] == ["DFlashSpeculator"]
    method = config["speculators_config"]["proposal_methods"][0]
    assert method["speculative_tokens"] == zlab["block_size"] - 1 and config["block_size"] == zlab["block_size"]
    assert config["speculators_config"]["verifier"]["name_or_path"] == KNOWN_MODELS["tiny"].location("target")
    # hidden-state indices: z-lab layer id + 1
    assert config["aux_hidden_state_layer_ids"] == [i + 1 for i in zlab["dflash_config"]["target_layer_ids"]]
    assert config["mask_token_id"] == zlab["dflash_config"]["mask_token_id"]
    assert config["draft_vocab_size"] == config["transformer_layer_config"]["vocab_size"] == zlab["vocab_size"]
    assert config["sliding_window_non_causal"] is True and config["sample_from_anchor"] is False
    assert config["transformer_layer_config"]["num_hidden_layers"] == zlab["num_hidden_layers"]
    assert "d2t" not in load_file(str(converted / "model.safetensors"))  # full vocabulary: no token map


def test_both_formats_load_the_same_draft(converted):
    zlab, spec = load_draft("tiny"), load_draft(str(converted))
    assert (spec.target_layer_ids, spec.mask_token_id, spec.block_size, spec.num_target_layers) == \
        (zlab.target_layer_ids, zlab.mask_token_id, zlab.block_size, zlab.num_target_layers)
    a, b = zlab.state_dict(), spec.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_engine_outputs_and_taus_identical_from_both_formats(converted):
    from dflash import load_tokenizer
    from dflash.profiles import get_profile
    from dflash.prompts import load_prompts
    target, zlab, spec = load_target("tiny"), load_draft("tiny"), load_draft(str(converted))
    profile, tokenizer = get_profile("tiny"), load_tokenizer("tiny")
    prompts = [load_prompts(profile, profile.dataset(name), tokenizer, 1)[0] for name in ("math", "code", "chat")]
    for prompt in prompts:
        for block in (4, 8):
            a = generate(target, zlab, prompt, max_new_tokens=32, block_size=block)
            b = generate(target, spec, prompt, max_new_tokens=32, block_size=block)
            assert a.output_ids == b.output_ids and a.acceptance_lengths == b.acceptance_lengths


def test_round_trip_back_to_zlab(converted, tmp_path):
    assert main(["convert-draft", "--to", "zlab", str(converted), str(tmp_path / "back")]) == 0
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["dflash_config"] == json.loads((PACKAGE_MODELS / "tiny" / "draft" / "config.json").read_text())[
        "dflash_config"]
    assert main(["convert-draft", "--to", "zlab", str(converted), str(tmp_path / "back")]) == 2  # never overwrites


def _copy(converted, tmp_path, edit=None, tensors=None):
    out = tmp_path / "edited"
    out.mkdir()
    config = json.loads((converted / "config.json").read_text())
    if edit:
        edit(config)
    (out / "config.json").write_text(json.dumps(config))
    state = load_file(str(converted / "model.safetensors"))
    state.update(tensors or {})
    save_file(state, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(speculators_model_type="eagle3"), "speculators_model_type"),
    (lambda c: c["speculators_config"].pop("verifier"), "verifier.name_or_path"),
    (lambda c: c.update(aux_hidden_state_layer_ids=[0, 3]), "aux_hidden_state_layer_ids"),
    (lambda c: c.update(mask_token_id="4"), "mask_token_id"),
    (lambda c: c.update(sample_from_anchor=True), "sample_from_anchor"),
    (lambda c: c.update(draft_vocab_size=1024), "draft_vocab_size 1024 is smaller"),
    (lambda c: c["speculators_config"]["proposal_methods"][0].update(speculative_tokens=16), "speculative_tokens"),
    (lambda c: c.update(transformer_layer_config=None), "transformer_layer_config"),
])
def test_bad_speculators_configs_name_the_key(converted, tmp_path, edit, message):
    with pytest.raises(DFlashError, match=message) as error:
        load_draft(str(_copy(converted, tmp_path, edit)))
    assert "config.json" in str(error.value)


def test_token_maps_and_own_heads(converted, tmp_path):
    vocab = 2048
    identity = _copy(converted, tmp_path, tensors={"d2t": torch.zeros(vocab, dtype=torch.long),
                                                   "t2d": torch.ones(vocab, dtype=torch.bool)})
    assert load_draft(str(identity)).block_size == 16  # an identity map is the full vocabulary
    shifted = torch.zeros(vocab, dtype=torch.long)
    shifted[5] = 1
    (tmp_path / "edited").rename(tmp_path / "identity")
    with pytest.raises(DFlashError, match="d2t is not the identity"):
        load_draft(str(_copy(converted, tmp_path, tensors={"d2t": shifted})))
    (tmp_path / "edited").rename(tmp_path / "shifted")
    with pytest.raises(DFlashError, match="own lm_head"):
        load_draft(str(_copy(converted, tmp_path, tensors={"lm_head.weight": torch.zeros(vocab, 192)})))


def test_the_verifier_is_required_for_a_directory(converted, tmp_path):
    draft = load_draft(str(converted))
    save_speculators(draft, tmp_path / "ok", verifier="Qwen/Qwen3-4B")
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["speculators_config"]["verifier"][
        "name_or_path"] == "Qwen/Qwen3-4B"
    assert main(["convert-draft", "--to", "speculators", str(converted), str(tmp_path / "no")]) == 2
