"""Layer reuse on the sub-block steps of the dual cache (ANCHORS_ALGORITHMS B4), done two ways.

A span of decoder layers (first / middle / last, a fixed share of the depth: 12 of 28 in the research fork) is
wrapped. Every whole-block forward computes the span and stores its output over the whole block; a step counter
decides which sub-block forwards skip it instead, by one of two schedules (`reuse_schedule`):

* "fork" (the default; the research fork's code, `v2/experiments/00_baseline/generation_functions.py`, as
  ANCHORS_ALGORITHMS B4 now describes it): the counter is reset once per block and counts every denoising step
  of the block, whole-block forwards included (those always compute); a sub-block step reuses iff its index
  within the block (0 for the block's first step) mod k != 0;
* "since_full" (what this module did before the fork's code was read): the counter is reset by every
  whole-block forward and counts only sub-block steps; the n-th sub-block step after a whole-block forward
  (n = 1, 2, ...) reuses iff n mod k != 0. Over the same step sequence it never reuses fewer steps than "fork"
  (in every run of sub-block steps after a whole-block forward, "fork" computes on at least as many).

Either way k = 1 never reuses (the control). What a reusing step returns:

* mode "output" (the fork's mechanism): each span layer returns its stored output at the sub-block's slots. Only
  the span's first layer then sees an input that differs from the one it stored with, so it is the one stale
  layer; the later ones receive stored inputs and their stored outputs equal fresh computation.
* mode "residual" (DeepCache-style): the whole span is skipped but carries its stored residual delta,
  h_out(t) = h_in(t) + [h_out - h_in](t_last), so fresh information from the layers below still flows up.

Skipped layers write no fresh K/V into the block cache (it stays as the last computing step left it), as in the
fork. One difference from the fork's code remains under either schedule: a sub-block step that computes the span
also refreshes the stored output (or delta) at its slots, where the fork's wrapper stores only on whole-block
forwards, so a later reusing step here returns the fresher value. Prefill and finalize forwards, and every forward of a decoder without the dual cache, compute all layers:
the knob acts only on sub-block steps (the decoder refuses it elsewhere). `staleness=True` also computes each
reused layer fresh, without touching the cache, and records the relative L2 distance of the reused output.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import DFlashError

SUBSETS = ("first", "middle", "last")
MODES = ("output", "residual")
SCHEDULES = ("fork", "since_full")
FORK_SHARE = 12 / 28  # the fork patched 12 of Qwen2.5-7B's 28 layers


@dataclass(frozen=True)
class LayerReuse:
    k: int = 1  # reuse on k-1 of every k sub-block steps; k = 1 is the no-reuse control
    subset: str = "middle"
    mode: str = "output"
    share: float = FORK_SHARE  # of the decoder layers, rounded, at least 1
    staleness: bool = False  # also compute reused layers fresh (diagnostic; costs a full span per step)
    schedule: str = "fork"  # which sub-block steps reuse (module docstring): "fork" or "since_full"

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise DFlashError(f"layer reuse k must be an integer >= 1 (1 = no reuse), got {self.k!r}.")
        if self.subset not in SUBSETS:
            raise DFlashError(f"layer reuse subset must be one of {', '.join(SUBSETS)}, got {self.subset!r}.")
        if self.mode not in MODES:
            raise DFlashError(f"layer reuse mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        if self.schedule not in SCHEDULES:
            raise DFlashError(f"layer reuse schedule must be one of {', '.join(SCHEDULES)} (\"fork\": the research "
                              f"fork's step counter, reset once per block; \"since_full\": reset at every "
                              f"whole-block forward), got {self.schedule!r}.")
        if not 0 < self.share <= 1:
            raise DFlashError(f"layer reuse share must be in (0, 1], got {self.share!r}.")

    def reuses(self, index: int) -> bool:
        """Whether a sub-block step with this counter value skips the span: under "fork" the step's index within
        its block (0-based, whole-block forwards counted), under "since_full" its 1-based count of sub-block steps
        since the last whole-block forward."""
        return index % self.k != 0

    def span(self, num_layers: int) -> range:
        """The wrapped layers. "first" starts at layer 1, as the fork's did (its layer 0 set up the cache);
        "middle" is centred on the middle of the stack; "last" ends at the top layer."""
        width = min(num_layers - 1, max(1, round(num_layers * self.share)))
        if num_layers < 2:
            raise DFlashError(f"layer reuse needs a model with at least 2 decoder layers, this one has {num_layers}.")
        start = {"first": 1, "middle": max(1, round(num_layers / 2 - width / 2)), "last": num_layers - width}
        return range(start[self.subset], start[self.subset] + width)


@dataclass
class ReuseStats:
    span: list[int]
    schedule: str = "fork"
    reuse_steps: int = 0  # sub-block forwards that reused the span
    compute_steps: int = 0  # sub-block forwards that computed it
    # per block of the decode, one character per denoising step: "B" whole-block forward (computes and stores),
    # "c" sub-block forward that computed the span, "r" one that reused it
    decisions: list[str] = field(default_factory=list)
    layer_calls_skipped: int = 0
    computed_seconds: list[float] = field(default_factory=list)  # per span layer call on a computing sub step
    reused_seconds: list[float] = field(default_factory=list)  # per span layer call on a reusing sub step
    staleness: dict[int, list[float]] = field(default_factory=dict)  # layer -> relative L2 per reuse step

    def summary(self) -> dict:
        mean = (lambda xs: sum(xs) / len(xs) if xs else None)
        computed, reused = mean(self.computed_seconds), mean(self.reused_seconds)
        return {"span": self.span, "schedule": self.schedule, "reuse_steps": self.reuse_steps,
                "compute_steps": self.compute_steps, "decisions": list(self.decisions),
                "layer_calls_skipped": self.layer_calls_skipped,
                "seconds_per_computed_layer_call": computed, "seconds_per_reused_layer_call": reused,
                "seconds_saved_per_reused_layer_call": None if computed is None or reused is None
                else computed - reused,
                "staleness": {str(layer): mean(values) for layer, values in sorted(self.staleness.items())}}


def relative_l2(reused: torch.Tensor, fresh: torch.Tensor) -> float:
    return float((reused.float() - fresh.float()).norm() / fresh.float().norm().clamp_min(1e-12))


class ReuseRunner:
    """The step counter and the stored block outputs (or span delta) of one decode."""

    def __init__(self, reuse: LayerReuse, span: range):
        self.reuse, self.span = reuse, span
        self.phase = "pass"  # "pass": compute, store nothing; "full": compute, store; "sub": sub-block step
        self.index = 0  # "fork": denoising steps of this block so far; "since_full": sub steps since a full one
        self.reusing = False  # the current forward's decision
        self.offset = 0  # the sub-block's first slot within the block
        self.stored: dict[int, torch.Tensor] = {}  # output mode: layer -> [B, D, H]; residual: -1 -> delta
        self.span_input: torch.Tensor | None = None
        self.stats = ReuseStats(list(span), reuse.schedule)
        self.cache = None  # the decoder's BlockCache (dry runs for the staleness diagnostic)

    def start_block(self) -> None:
        """A new block's denoising begins (the decoder calls this once per block, before its first step)."""
        self.stats.decisions.append("")
        if self.reuse.schedule == "fork":
            self.index = 0

    def start(self, phase: str, offset: int = 0) -> None:
        """A forward begins: "full" (whole block), "sub" (sub-block step) or "pass" (prefill, finalize)."""
        self.phase, self.offset, self.reusing = phase, offset, False
        if phase == "pass":
            return
        if not self.stats.decisions:
            self.stats.decisions.append("")
        fork = self.reuse.schedule == "fork"
        if phase == "full":  # always computes: under "fork" its index is forced to 0 for this forward only
            self.stats.decisions[-1] += "B"
            self.index = self.index + 1 if fork else 0  # fork: the step still counts; since_full: restart
            return
        self.index += 1
        self.reusing = self.reuse.reuses(self.index - 1 if fork else self.index)
        self.stats.decisions[-1] += "r" if self.reusing else "c"
        if self.reusing:
            self.stats.reuse_steps += 1
            self.stats.layer_calls_skipped += len(self.span)
        else:
            self.stats.compute_steps += 1

    def select_rows(self, keep: torch.Tensor) -> None:
        self.stored = {layer: value[keep] for layer, value in self.stored.items()}

    def _store(self, key: int, value: torch.Tensor) -> None:
        if self.phase == "full":
            self.stored[key] = value.detach().clone()
        else:
            self.stored[key][:, self.offset:self.offset + value.shape[1]] = value.detach()

    def _fresh(self, layers, hidden, args, kwargs) -> torch.Tensor:
        """The span layers' fresh output, computed without writing K/V into the cache."""
        self.cache.dry = True
        try:
            for layer in layers:
                hidden = layer.inner(hidden, *args, **kwargs)
        finally:
            self.cache.dry = False
        return hidden

    def layer_forward(self, wrapper: "ReusedLayer", hidden: torch.Tensor, args, kwargs) -> torch.Tensor:
        index, first, last = wrapper.index, wrapper.index == self.span[0], wrapper.index == self.span[-1]
        if self.phase == "pass":
            return wrapper.inner(hidden, *args, **kwargs)
        width = hidden.shape[1]
        slots = slice(self.offset, self.offset + width)
        begin = time.perf_counter()
        if not self.reusing:
            out = wrapper.inner(hidden, *args, **kwargs)
            if self.reuse.mode == "output":
                self._store(index, out)
            else:
                if first:
                    self.span_input = hidden
                if last:
                    self._store(-1, out - self.span_input)
            if self.phase == "sub":
                self.stats.computed_seconds.append(time.perf_counter() - begin)
            return out
        if self.reuse.mode == "output":
            out = self.stored[index][:, slots]
            self.stats.reused_seconds.append(time.perf_counter() - begin)
            if self.reuse.staleness:
                fresh = self._fresh([wrapper], hidden, args, kwargs)
                self.stats.staleness.setdefault(index, []).append(relative_l2(out, fresh))
            return out
        if not first:
            self.stats.reused_seconds.append(time.perf_counter() - begin)
            return hidden  # the span's delta was added at its first layer
        out = hidden + self.stored[-1][:, slots]
        self.stats.reused_seconds.append(time.perf_counter() - begin)
        if self.reuse.staleness:
            fresh = self._fresh(wrapper.span_layers, hidden, args, kwargs)
            self.stats.staleness.setdefault(index, []).append(relative_l2(out, fresh))
        return out


class ReusedLayer(nn.Module):
    """A decoder layer whose forward the runner decides (compute, or return what is stored)."""

    def __init__(self, inner: nn.Module, index: int, runner: ReuseRunner):
        super().__init__()
        self.inner, self.index = inner, index
        self.runner = runner
        self.span_layers: list[ReusedLayer] = []

    def forward(self, hidden_states, *args, **kwargs):
        return self.runner.layer_forward(self, hidden_states, args, kwargs)


def decoder_layers(model) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise DFlashError(f"layer reuse needs a decoder with model.model.layers (Qwen2/Qwen3/Llama); "
                          f"{type(model).__name__} has none.")
    return layers


@contextmanager
def installed(model, reuse: LayerReuse | None):
    """Wrap the span's layers for one decode (yields the runner, or None without reuse); always unwraps."""
    if reuse is None:
        yield None
        return
    layers = decoder_layers(model)
    runner = ReuseRunner(reuse, reuse.span(len(layers)))
    originals = {i: layers[i] for i in runner.span}
    wrappers = [ReusedLayer(layers[i], i, runner) for i in runner.span]
    for wrapper in wrappers:
        wrapper.span_layers = wrappers
        layers[wrapper.index] = wrapper
    try:
        yield runner
    finally:
        for i, layer in originals.items():
            layers[i] = layer
