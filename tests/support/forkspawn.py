"""Fork a real ``loconet`` command from a fork server and read what tests/support/forkprobe.py recorded of it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from peer.harness.forkserver import ForkedChild, ForkServer

CLI = [sys.executable, "-m", "peer.cli"]
# Loaded as the command's plugin, the probe records what the process was given (tests/support/forkprobe.py).
PROBE = ("--plugin", "tests.support.forkprobe")


def spawn(server: ForkServer, tmp_path: Path, *args: str, netns: str | None = None, **env: str) -> ForkedChild:
    """Fork ``loconet ARGS`` (in network namespace netns, if given) with the probe's output file in its
    environment; its stderr goes to tmp_path/err."""
    with open(tmp_path / "err", "w") as err:
        return server.spawn([*CLI, *args], {**os.environ, "LOCONET_PROBE_OUT": str(tmp_path / "probe.json"), **env},
                            err.fileno(), netns=netns)


def probe(tmp_path: Path) -> dict:
    """What the probe recorded of the child spawned with this tmp_path."""
    return json.loads((tmp_path / "probe.json").read_text())
