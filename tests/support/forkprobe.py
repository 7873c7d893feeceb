"""A plugin module that records, when imported, what the process it runs in was given (tests/test_forkserver.py).

``loconet --plugin tests.support.forkprobe ...`` imports it before parsing its options; it writes one JSON object
to the file named by ``LOCONET_PROBE_OUT``.
"""

from __future__ import annotations

import json
import os
import random
import sys

import numpy as np

_out = os.environ.get("LOCONET_PROBE_OUT")
if _out:
    with open(_out, "w") as f:
        json.dump({
            "pid": os.getpid(), "sid": os.getsid(0), "cwd": os.getcwd(), "argv": sys.argv,
            "value": os.environ.get("LOCONET_PROBE_VALUE"), "stdin_isatty": os.isatty(0),
            "random": random.random(), "numpy": float(np.random.rand()), "hash": hash("loconet"),
            "netns": os.readlink("/proc/self/ns/net"),
        }, f)
