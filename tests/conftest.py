"""Tests use tiny models: one thread per process avoids oversubscribing the cores under pytest-xdist."""
import pytest
import torch

from helpers import random_draft, random_target

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pair():
    """A random float64 target with a 5-token vocabulary and a random draft for it: drafts are often accepted, and
    often not, so acceptance varies. Module-scoped: a module may change the models without reaching another."""
    target = random_target(1, vocab_size=5)
    return target, random_draft(target, 2)


@pytest.fixture(scope="module")
def bd():
    """The shipped tiny block-diffusion model with its ids (dflash.blockdiffusion.model_profile.Loaded), one thread."""
    from dflash.profiles import get_block_diffusion_model as get_profile
    torch.set_num_threads(1)
    return get_profile("tiny").load()
