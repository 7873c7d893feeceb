"""The suite's files ordered slowest first, so that two xdist workers finish together.

``pytest -n 2 --dist loadfile`` hands out whole files in the order it is given them. xdist's default
(``loadscopereorder``) puts the files with the most tests first, which in this suite are the quick,
table-like ones: the few long multi-process files then start last and one worker finishes minutes
before the other. ``durations.json`` holds each file's measured seconds (setup, call and teardown of
all its tests); the conftest orders the files by it, longest first, and turns xdist's reordering off.
A file it does not know yet goes first, as if it were slow, until the file is measured.

Refresh it after a change in the suite's balance:

    python -m pytest -q -n 2 --dist loadfile --durations=0 --durations-min=0 > /tmp/suite.txt
    python -m tests.support.durations < /tmp/suite.txt > tests/support/durations.json
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

DURATIONS_FILE = Path(__file__).with_name("durations.json")
# "12.34s call     tests/test_x.py::test_y[param]" in pytest's --durations report.
_LINE = re.compile(r"^\s*([0-9.]+)s\s+(?:setup|call|teardown)\s+(\S+?)::")


def load(path: Path = DURATIONS_FILE) -> dict[str, float]:
    """File path (as in node ids) -> its measured seconds; empty when the file is missing."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def file_of(nodeid: str) -> str:
    """The file part of a test's node id."""
    return nodeid.split("::", 1)[0]


def slowest_first(nodeids: Iterable[str], seconds: dict[str, float]) -> list[str]:
    """The node ids with their files ordered longest first (unknown files before all), each file's tests in their
    own order."""
    unknown = max(seconds.values(), default=0.0) + 1.0
    ids = list(nodeids)
    return sorted(ids, key=lambda nodeid: -seconds.get(file_of(nodeid), unknown))


def parse(report: Iterable[str]) -> dict[str, float]:
    """Seconds per file from the lines of a pytest ``--durations=0`` report."""
    total: dict[str, float] = defaultdict(float)
    for line in report:
        match = _LINE.match(line)
        if match:
            total[match.group(2)] += float(match.group(1))
    return {path: round(s, 1) for path, s in sorted(total.items())}


if __name__ == "__main__":
    json.dump(parse(sys.stdin), sys.stdout, indent=1)
    sys.stdout.write("\n")
