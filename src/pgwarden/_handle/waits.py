"""The one exception both shells raise when a bounded wait runs out."""

from __future__ import annotations

__all__ = ["WaitTimeout"]


class WaitTimeout(Exception):
    """A bounded wait (a shared flight, a connect made for a call) ran out; the
    work itself may go on. Classified as "timed out" (at connect: nothing ran)."""
