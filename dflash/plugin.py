"""The pytest plugin of dflash-ablate (`pytest_plugins = ["dflash.plugin"]`): the ablation harness
(dflash.harness.plugin) with the package's ablation families registered, one line each, in report order. A
family outside the package registers when its ablation file imports its module (examples/majority_vote)."""
from .harness import decode_family  # noqa: F401
from .cascade import family as cascade_family  # noqa: F401
from .blockdiffusion import family as blockdiffusion_family  # noqa: F401
from .conformance import family as conformance_family  # noqa: F401

pytest_plugins = ["dflash.harness.plugin"]
