"""The registry of decoding methods an ablation can name: protocol variants (dflash.variants) and backends
(dflash.backends). Importing `dflash.variants` fills it with both.

A method declares its knobs ONCE, as a dataclass: field defaults are the knob defaults and `__post_init__`
validates them, so every entry point (`decode`, the lossless property test, ablation cases, fixtures) gets the
same checks and the same error. A **protocol variant** gives `make_plugins(draft, target, knobs, temperature)
-> Plugins` and decodes through the engine's one loop; a **backend** is a decoder of its own, `run(target,
draft, prompt, knobs, *, max_new_tokens, block_size, temperature, seed, stop_token_ids)`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from .engine import GenerationResult, generate
from .errors import DFlashError


@dataclass(frozen=True)
class NoKnobs:
    """A method without knobs."""


@dataclass
class Plugins:
    """What a protocol variant puts into the engine loop (None: the loop's default plug-in)."""
    drafter: object
    verifier: object = None
    acceptor: object = None


@dataclass(frozen=True)
class VariantSpec:
    name: str
    knob_class: type = NoKnobs  # a dataclass: defaults + validation (every knob has a liveness test)
    make_plugins: Callable[..., Plugins] | None = None  # protocol variant: (draft, target, knobs, temperature)
    run: Callable[..., GenerationResult] | None = None  # backend: its own decoder (module docstring)
    knob_grid: tuple = ({},)  # knob settings the lossless property test draws from (merged over the defaults)
    sampling: bool = False  # supports temperature > 0 (and then has an exact-enumeration test)
    # whether the draft's sampling law follows `draft_temperature`; False where proposals are picked from the
    # draft's raw logits at every temperature (the knob is then refused rather than silently dead)
    draft_temperature: bool = True
    unavailable: Callable[[], str | None] = staticmethod(lambda: None)  # why it cannot run here (one line)
    description: str = ""

    def __post_init__(self):
        if (self.make_plugins is None) == (self.run is None):
            raise ValueError(f"variant {self.name!r}: give exactly one of make_plugins (a protocol variant) or run "
                             "(a backend)")

    @property
    def knobs(self) -> dict:
        """Knob defaults, by name."""
        return dataclasses.asdict(self.knob_class())

    def settings(self, **knobs):
        """The validated knob dataclass for these knob values (defaults for the rest)."""
        unknown = sorted(set(knobs) - set(self.knobs))
        if unknown:
            raise DFlashError(f"Unknown knob(s) {', '.join(unknown)} for variant {self.name!r}; its knobs are: "
                              f"{', '.join(self.knobs) or 'none'}.")
        return self.knob_class(**knobs)

    def decode(self, target, draft, prompt, *, max_new_tokens: int, block_size, temperature: float = 0.0,
               seed: int | None = None, stop_token_ids=None, draft_temperature: float | None = None,
               **knobs) -> GenerationResult:
        """Decode one prompt with this method; at temperature 0 the output is the target's own greedy output."""
        settings = self.settings(**knobs)
        if draft_temperature is not None and not self.draft_temperature:
            raise DFlashError(f"The {self.name} variant picks its proposals from the draft's raw logits at every "
                              "temperature, so draft_temperature would have no effect; leave it unset.")
        if self.run is not None:  # a backend checks its own arguments
            return self.run(target, draft, prompt, settings, max_new_tokens=max_new_tokens, block_size=block_size,
                            temperature=temperature, seed=seed, stop_token_ids=stop_token_ids)
        if temperature != 0 and not self.sampling:
            raise DFlashError(f"The {self.name} variant decodes greedily only (temperature 0), got {temperature}.")
        if draft is None:
            raise DFlashError(f"The {self.name} variant needs a DFlash draft model (got None).")
        plugins = self.make_plugins(draft, target, settings, temperature)
        return generate(target, draft, prompt, max_new_tokens=max_new_tokens, block_size=block_size,
                        temperature=temperature, seed=seed, stop_token_ids=stop_token_ids,
                        draft_temperature=draft_temperature, drafter=plugins.drafter, verifier=plugins.verifier,
                        acceptor=plugins.acceptor)


VARIANTS: dict[str, VariantSpec] = {}


def register(spec: VariantSpec) -> VariantSpec:
    if spec.name in VARIANTS:
        raise ValueError(f"variant {spec.name!r} registered twice")
    VARIANTS[spec.name] = spec
    return spec


def get_variant(name: str) -> VariantSpec:
    if name not in VARIANTS:
        raise DFlashError(f"Unknown variant {name!r}; choose one of {', '.join(sorted(VARIANTS))}.")
    return VARIANTS[name]
