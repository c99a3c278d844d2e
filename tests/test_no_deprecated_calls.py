"""This project's own calls into transformers and torch raise no deprecation warnings: a deprecated keyword
(e.g. `past_key_values=`, removed in transformers 5.40) would break a later version inside the allowed range."""
import warnings

import pytest

from dflash import generate
from helpers import random_draft, random_target


@pytest.fixture(scope="module")
def pair():
    target = random_target(0, vocab_size=24, num_layers=3)
    return target, random_draft(target, 1)


def decode_every_path(target, draft):
    from dflash.variants import VARIANTS
    from dflash.backends.batched import generate_batch
    generate(target, None, [1, 2, 3], max_new_tokens=6)
    generate(target, draft, [1, 2, 3], max_new_tokens=6, block_size=4)
    generate(target, draft, [1, 2, 3], max_new_tokens=6, block_size=4, temperature=1.0, seed=0)
    generate_batch(target, draft, [[1, 2, 3], [4, 5]], max_new_tokens=6, block_size=4)
    for variant in VARIANTS.values():
        if variant.unavailable() is None:
            variant.decode(target, draft, [1, 2, 3], max_new_tokens=6, block_size=4, stop_token_ids=[],
                           temperature=0.0, seed=0, **variant.knobs)


def test_no_deprecation_warnings_from_decoding(pair):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode_every_path(*pair)
    deprecations = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                    if issubclass(w.category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning))]
    assert not deprecations, "\n".join(deprecations)
