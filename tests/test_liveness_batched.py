"""Every knob of the batched variant is live: changing it changes the target forwards that actually run
(rows per forward, attended cache length, block width), observed with a forward hook on the target."""
import pytest

from dflash.variants import VARIANTS


def _forwards(target, draft, **knobs):
    """(rows, key length, query length) of every target forward of one registry decode."""
    seen = []

    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        seen.append((mask.shape[0], mask.shape[-1], kwargs["input_ids"].shape[1]))
    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        spec = VARIANTS["batched"]
        settings = {**spec.knobs, **knobs}
        result = spec.decode(target, draft, [1, 2, 3], max_new_tokens=30, stop_token_ids=[], temperature=0.0, seed=0,
                             **settings)
    finally:
        handle.remove()
    return seen, result


def test_batch_size_is_live(pair):
    one, single = _forwards(*pair, block_size=8, batch_size=1)
    three, batched = _forwards(*pair, block_size=8, batch_size=3)
    assert {rows for rows, _, _ in one} == {1}
    assert three[0][0] == 3 and max(rows for rows, _, _ in three) == 3
    assert single.output_ids == batched.output_ids  # and it changes nothing in the output


def test_compact_is_live(pair):
    compacted, a = _forwards(*pair, block_size=8, batch_size=3, compact=True)
    masked, b = _forwards(*pair, block_size=8, batch_size=3, compact=False)
    # Mask-only keeps every rejected slot: the attended cache grows by the block width per cycle.
    assert max(keys for _, keys, _ in masked) > max(keys for _, keys, _ in compacted)
    assert masked[2][1] - masked[1][1] == 8  # forward 0 is the prefill; then one block of 8 per cycle
    assert a.output_ids == b.output_ids


def test_block_size_is_live(pair):
    four, _ = _forwards(*pair, block_size=4, batch_size=2)
    twelve, _ = _forwards(*pair, block_size=12, batch_size=2)
    assert max(q for _, _, q in four[1:]) == 4 and max(q for _, _, q in twelve[1:]) == 12
