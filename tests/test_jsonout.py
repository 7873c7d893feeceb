"""Reports printed as JSON are strict JSON: a diverged loss is null, not NaN."""

from __future__ import annotations

import json
import math

from peer.jsonout import json_line


def test_non_finite_floats_become_null_at_any_depth_and_the_rest_is_kept():
    report = {"loss": math.nan, "runs": [{"x": math.inf, "n": 3}, (1.5, -math.inf)], "name": "fedavg", "ok": True}
    line = json_line(report)
    assert "\n" not in line
    assert json.loads(line) == {"loss": None, "runs": [{"x": None, "n": 3}, [1.5, None]], "name": "fedavg", "ok": True}
