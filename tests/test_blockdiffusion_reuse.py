"""Layer reuse (dflash.blockdiffusion.reuse) is live where it can act and declared inert where it cannot:

* k = 1 is the control: wrapped layers compute everything, outputs bit-identical to no wrapper;
* k > 1 changes the generative computation (reuse steps taken, reused outputs differ from fresh ones);
* the fork's finding, as a check of the mechanism: in output mode only the span's first layer is stale;
* log-likelihood scoring has no denoising steps, so with the knob on its logits are bit-identical (the inertness
  the ablation declares as "not applicable" is itself checked);
* the decoder refuses the knob without the dual cache, where every step is a whole-block forward.
"""
import pytest
import torch

from dflash.blockdiffusion import LayerReuse, generate
from dflash.blockdiffusion.loglik import choice_logits
from dflash.blockdiffusion.reuse import ReusedLayer, installed
from dflash.blockdiffusion.tasks import arithmetic_choices, arithmetic_queries
from dflash.errors import DFlashError

MAX_NEW = 40


@pytest.fixture(scope="module")
def prompts(bd):
    return [q.prompt_ids(bd.tokenizer) for q in arithmetic_queries(3)]


def decode(bd, prompts, reuse, threshold=1.0):
    return generate(bd.model, prompts, mask_id=bd.mask_id, stop_ids=bd.stop_ids, block_size=bd.block_size,
                    threshold=threshold, cache="dual", max_new_tokens=MAX_NEW, layer_reuse=reuse)


def test_spans_follow_the_fork_on_28_layers_and_scale_down():
    spans = {s: LayerReuse(subset=s).span(28) for s in ("first", "middle", "last")}
    assert spans == {"first": range(1, 13), "middle": range(8, 20), "last": range(16, 28)}
    assert [list(LayerReuse(subset=s).span(5)) for s in ("first", "middle", "last")] == [[1, 2], [2, 3], [3, 4]]


@pytest.mark.parametrize("mode", ["output", "residual"])
def test_k1_is_the_control(bd, prompts, mode):
    plain = decode(bd, prompts, None)
    control = decode(bd, prompts, LayerReuse(k=1, subset="first", mode=mode))
    assert control.output_ids == plain.output_ids
    assert control.reuse["reuse_steps"] == 0 and control.reuse["compute_steps"] > 0


@pytest.mark.parametrize("mode", ["output", "residual"])
def test_reuse_changes_the_generative_computation(bd, prompts, mode):
    reused = decode(bd, prompts, LayerReuse(k=3, subset="first", mode=mode, staleness=True))
    assert reused.reuse["reuse_steps"] > 0 and reused.reuse["layer_calls_skipped"] > 0
    first = str(reused.reuse["span"][0])
    assert reused.reuse["staleness"][first] > 1e-3  # what the span returned is not what it would have computed
    assert not any(isinstance(layer, ReusedLayer) for layer in bd.model.model.layers)  # unwrapped afterwards


def test_output_mode_only_the_first_span_layer_is_stale(bd, prompts):
    """Later span layers receive their stored inputs, so their stored outputs equal fresh computation (float
    noise aside); the damage sits in one boundary layer (the fork measured 0.68 there, 0.04% beyond)."""
    stats = decode(bd, prompts, LayerReuse(k=2, subset="first", mode="output", staleness=True)).reuse
    first, *rest = stats["span"]
    assert stats["staleness"][str(first)] > 1e-3
    assert rest and all(stats["staleness"][str(layer)] < 1e-4 for layer in rest)


def test_loglik_logits_are_bit_identical_with_reuse_on(bd):
    question = arithmetic_choices(bd.tokenizer, 1)[0]
    args = dict(block_size=bd.block_size, mask_id=bd.mask_id, eos_id=bd.eos_id)
    plain = [choice_logits(bd.model, question.context_ids, option, **args) for option in question.option_ids]
    for mode in ("output", "residual"):
        with installed(bd.model, LayerReuse(k=3, subset="middle", mode=mode)) as runner:
            assert sum(isinstance(layer, ReusedLayer) for layer in bd.model.model.layers) == len(runner.span)
            with_reuse = [choice_logits(bd.model, question.context_ids, option, **args)
                          for option in question.option_ids]
        assert all(torch.equal(a, b) for a, b in zip(plain, with_reuse))
        assert runner.stats.reuse_steps == 0 and runner.stats.compute_steps == 0


@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_reuse_without_the_dual_cache_is_refused(bd, prompts, cache):
    with pytest.raises(DFlashError, match="only the dual cache"):
        generate(bd.model, prompts, mask_id=bd.mask_id, stop_ids=bd.stop_ids, cache=cache,
                 layer_reuse=LayerReuse(k=2), max_new_tokens=MAX_NEW)


@pytest.mark.parametrize("field, value", [("k", 0), ("subset", "top"), ("mode", "input"), ("share", 0)])
def test_bad_reuse_settings_are_refused(field, value):
    with pytest.raises(DFlashError, match=field if field != "share" else "share"):
        LayerReuse(**{field: value})
