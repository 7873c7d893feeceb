"""Reports printed as JSON: one line of strict JSON, which readers other than Python's can take."""

from __future__ import annotations

import json
import math


def json_line(value: object) -> str:
    """``value`` as one line of strict JSON: a NaN or infinite float (a loss that diverged) becomes null, since
    JSON has neither and readers other than Python's refuse them."""
    def finite(v: object) -> object:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), allow_nan=False)
