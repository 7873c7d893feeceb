"""Stand-in interpreters for the hivemind baselines: hivemind is not a dependency of loconet."""

from __future__ import annotations

import os
import stat
from pathlib import Path

# An interpreter that has hivemind, for the end-to-end tests (they skip without it).
HIVEMIND_PYTHON = os.environ.get("LOCONET_HIVEMIND_PYTHON")


def fake_python(tmp_path: Path, body: str) -> str:
    """An executable that stands in for an interpreter: a shell script with this body."""
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)
