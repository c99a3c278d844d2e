"""argparse `type=` callables for numbers and lists with ranges, shared by the CLI and the pytest plugin's options:
a value out of range is an argparse error (exit 2 on the CLI, a usage error under pytest), never a traceback."""
from __future__ import annotations

import argparse
import math


def bounded_int(low: int, high: int | None = None):
    """argparse type: an integer in [low, high] (argparse prints the error and exits 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high if high is not None else 'inf'}]"
                                             f", got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def finite_float(low: float, high: float | None = None, *, low_open: bool = False):
    """argparse type: a finite float in [low, high] ((low, high] with low_open); nan and inf are refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or (high is not None and
                                                                                      value > high):
            bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}{')' if high is None else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {bounds}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def int_list(low: int = 0):
    """argparse type: comma-separated integers, each >= low, at least one."""
    def parse(text: str) -> list[int]:
        parts = [t.strip() for t in text.split(",") if t.strip()]
        try:
            values = [int(t) for t in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or min(values) < low:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {low}, got {text!r}")
        return values
    parse.__name__ = "list"
    return parse
