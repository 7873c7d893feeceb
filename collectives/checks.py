"""Predicates for values read from JSON or the network: a whole number, a finite number (a bool is neither).

JSON gives ints, floats, strings, lists and bools, and Python's bool is an int: every reader of a state or a
message that wants a count or a measurement asks these, so that ``True`` is never a count of 1.
"""

from __future__ import annotations

import math
from typing import Any


def is_whole(x: Any, low: float = -math.inf, high: float = math.inf) -> bool:
    """Whether x is an int (not a bool) in [low, high]."""
    return isinstance(x, int) and not isinstance(x, bool) and low <= x <= high


def is_finite_number(x: Any) -> bool:
    """Whether x is an int or a float (not a bool) and finite."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
