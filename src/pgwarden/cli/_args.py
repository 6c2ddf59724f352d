"""argparse value types shared by the subcommands: clear messages for bad input."""

from __future__ import annotations

import argparse
import math

__all__ = ["port", "positive_float"]


def positive_float(text: str) -> float:
    """A finite number > 0 (seconds, rates)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def port(text: str) -> int:
    """A TCP port, 0 meaning "pick a free one"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535: {text!r}")
    return value
