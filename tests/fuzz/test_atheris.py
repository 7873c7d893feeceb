"""The coverage-guided targets of atheris_fuzz.py, each run for its share of the fuzzing budget.

Only in fuzz mode (LOCONET_FUZZ_SECONDS set) and where atheris is installed (``pip install atheris``;
it is not a dependency of loconet): skipped otherwise, saying why. A target's crash fails the
test and leaves the input libFuzzer saved in the test's temporary directory.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

atheris = pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")

ENTRY = Path(__file__).with_name("atheris_fuzz.py")
# Each target's process imports torch before it fuzzes: that much of its share goes to starting.
STARTUP_S = 3


@pytest.mark.parametrize("target", ["wire", "statechunk", "manifest"])
def test_atheris_target_runs_without_a_crash(fuzz, target, tmp_path):
    if not fuzz.seconds:
        pytest.skip("coverage-guided fuzzing runs only with LOCONET_FUZZ_SECONDS set")
    seconds = max(1, int(fuzz.seconds - STARTUP_S))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(ENTRY), target, f"-max_total_time={seconds}", f"-artifact_prefix={tmp_path}/",
         "-print_final_stats=1"],
        check=False, capture_output=True, text=True, timeout=seconds + STARTUP_S + 120,
    )
    runs = re.search(r"^Done (\d+) runs", done.stderr, re.MULTILINE)
    fuzz.add(int(runs.group(1)) if runs else 0, time.monotonic() - started, crashed=done.returncode != 0)
    assert done.returncode == 0, f"atheris target {target} crashed:\n{done.stderr[-4000:]}"
