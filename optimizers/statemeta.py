"""Reading a state's metadata: values checked for type and range, or a ConfigError that names the field.

The run's digest covers a state's tensors, not the JSON metadata beside them (docs/security.md), so a donor
may send any JSON object there (``collectives/statesync/format.py`` bounds its size and refuses NaN and Inf).
Every optimizer reads its fields through these functions before it changes anything by them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from collectives.checks import is_finite_number, is_whole
from collectives.errors import ConfigError

# Counts in a state (steps, rounds, jobs) are at most this: far beyond any run, and exact in a float.
MAX_COUNT = 1 << 53
_MISSING = object()


def _refused(key: str, must: str, value: Any) -> ConfigError:
    return ConfigError(
        f"the run's state's {key!r} must be {must}, got {value!r:.60}: the peer that served it runs another "
        "version of loconet, or is not to be trusted"
    )


def _value(meta: Mapping[str, Any], key: str, default: Any) -> Any:
    value = meta.get(key, _MISSING) if isinstance(meta, Mapping) else _MISSING
    if value is _MISSING:
        if default is _MISSING:
            raise _refused(key, "present", None)
        return default
    return value


def meta_int(meta: Mapping[str, Any], key: str, default: Any = _MISSING, low: int = 0, high: int = MAX_COUNT) -> int:
    """meta[key] as a whole number in [low, high] (``default`` when absent; without one, absent is refused)."""
    value = _value(meta, key, default)
    if not is_whole(value, low, high):
        raise _refused(key, f"a whole number in [{low}, {high}]", value)
    return value


def meta_float(meta: Mapping[str, Any], key: str, default: Any = _MISSING, positive: bool = False) -> float:
    """meta[key] as a finite number (positive if asked)."""
    value = _value(meta, key, default)
    if not is_finite_number(value) or (positive and not value > 0):
        raise _refused(key, "a positive number" if positive else "a finite number", value)
    return float(value)


def meta_optional_int(meta: Mapping[str, Any], key: str, low: int = 0, high: int = MAX_COUNT) -> int | None:
    """meta[key] as a whole number in [low, high], or None (absent or null)."""
    return None if _value(meta, key, None) is None else meta_int(meta, key, low=low, high=high)


def meta_dict(meta: Mapping[str, Any], key: str, default: Any = _MISSING) -> dict:
    """meta[key] as a JSON object."""
    value = _value(meta, key, default)
    if not isinstance(value, dict):
        raise _refused(key, "an object", value)
    return value


def meta_ints(meta: Mapping[str, Any], key: str, default: Any = _MISSING, most: int = MAX_COUNT) -> list[int]:
    """meta[key] as a list of at most ``most`` whole numbers in [0, MAX_COUNT]."""
    value = _value(meta, key, default)
    if not isinstance(value, list) or len(value) > most or not all(is_whole(v, 0, MAX_COUNT) for v in value):
        raise _refused(key, f"a list of at most {most} whole numbers", value)
    return value


def meta_strs(meta: Mapping[str, Any], key: str, default: Any = _MISSING) -> list[str]:
    """meta[key] as a list of strings."""
    value = _value(meta, key, default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _refused(key, "a list of strings", value)
    return value


def meta_str(meta: Mapping[str, Any], key: str, default: Any = _MISSING) -> str:
    """meta[key] as a string."""
    value = _value(meta, key, default)
    if not isinstance(value, str):
        raise _refused(key, "a string", value)
    return value
