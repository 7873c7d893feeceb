"""The README's Python API example, run as written on two machines (network namespaces). Needs root; skipped otherwise.

Machine "a" runs the coordinator and peer A, machine "b" peer B; both run the
README's code block (with a tiny model, its own data, and the coordinator's
real address), train, commit rounds together and end identical. Without the
example's TransportConfig, peer B refuses to start and says what to set.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from peer.harness.netns.availability import NetnsUnavailable, check_available
from peer.harness.netns.network import NetnsNetwork
from tests.support.procs import CoordinatorProc, Proc, stop_all

pytestmark = pytest.mark.timeout(90)

try:
    check_available()
except NetnsUnavailable as _e:  # pragma: no cover - depends on the machine
    pytest.skip(f"network namespaces unavailable: {_e}", allow_module_level=True)

README = Path(__file__).resolve().parents[1] / "README.md"
STEPS = 30
SYNC_EVERY = 10
PORT = 7070

# What the README leaves to the reader: a model, a loader of (x, y) batches, a loss function.
SETUP = f"""
import json, sys
import torch
seed = int(sys.argv[1])
torch.manual_seed(0)  # the run's state decides the parameters anyway: the joiner takes the first peer's
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
g = torch.Generator().manual_seed(seed)
loader = [(torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)) for _ in range({STEPS})]
loss_fn = torch.nn.functional.mse_loss
"""

REPORT = """
s = peer.status
print(json.dumps({
    "address": peer.address,
    "digest": opt.state.digest(),
    "rounds": [r.round_id for r in opt.history if r.committed],
    "status": [s.step, s.samples, s.loss],
    "last_loss": loss.item(),
}), flush=True)
"""


def readme_example() -> str:
    """The code block of the README's "The Python API" section."""
    text = README.read_text()
    section = text[text.index("## The Python API"):]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README's Python API section has no python block"
    return match.group(1)


def substitute(code: str, replacements: dict[str, str]) -> str:
    """The example with each placeholder replaced; each must be there, so the README cannot drift from this test."""
    for old, new in replacements.items():
        assert code.count(old) == 1, f"the README's example no longer contains {old!r} once"
        code = code.replace(old, new)
    return code


def script(path: Path, coordinator: str, *, drop: str = "") -> Path:
    """A peer program: the setup, the README's example pointed at coordinator (minus drop), the report."""
    replacements = {'"10.0.0.1:7070"': repr(coordinator), "sync_every=500": f"sync_every={SYNC_EVERY}"}
    if drop:
        replacements[drop] = ""
    path.write_text(SETUP + substitute(readme_example(), replacements) + REPORT)
    return path


@pytest.fixture
def net():
    network = NetnsNetwork(prefix="lapi")
    network.create(["a", "b"])
    try:
        yield network
    finally:
        network.cleanup()


def test_the_readme_example_trains_across_two_machines(net, tmp_path):
    a, b = net.hosts["a"], net.hosts["b"]
    procs: list[Proc] = []
    try:
        coordinator = CoordinatorProc(
            tmp_path / "coordinator.log", "myrun", PORT,
            "--host", a.ip, "--dashboard-port", "none", "--min-peers", "2", "--startup-grace", "0",
            prefix=net.exec_prefix("a"),
        )
        procs.append(coordinator)
        program = script(tmp_path / "peer.py", coordinator.address)
        for name, seed in (("a", 1), ("b", 2)):
            procs.append(
                Proc([sys.executable, str(program), str(seed)], tmp_path / f"peer-{name}.log", net.exec_prefix(name))
            )
        results = [p.wait_event(lambda e: "digest" in e, timeout=60) for p in procs[1:]]
    finally:
        stop_all(procs)
    got_a, got_b = results
    # Each tells the others its own machine's address, found on its route to the coordinator.
    assert got_a["address"].rpartition(":")[0] == a.ip
    assert got_b["address"].rpartition(":")[0] == b.ip
    rounds = list(range(1, STEPS // SYNC_EVERY + 1))
    assert got_a["rounds"] == got_b["rounds"] == rounds
    assert got_a["digest"] == got_b["digest"]
    for got in results:
        # The optimizer filled the status the dashboard shows: steps, examples (16 per batch), the last loss.
        assert got["status"] == [STEPS, STEPS * 16, got["last_loss"]]


def test_a_peer_left_on_loopback_refuses_a_coordinator_on_another_machine(net, tmp_path):
    # The README's example without its TransportConfig: the default binds 127.0.0.1.
    program = script(
        tmp_path / "peer.py", f"{net.hosts['a'].ip}:{PORT}", drop='transport=TransportConfig(host="0.0.0.0"),'
    )
    done = subprocess.run(
        net.exec_prefix("b") + [sys.executable, str(program), "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    b_ip = re.escape(net.hosts["b"].ip)
    assert re.fullmatch(
        rf'collectives\.errors\.ConfigError: .*is on another machine.*TransportConfig\(host="0\.0\.0\.0", '
        rf'advertise="{b_ip}"\).*--host 0\.0\.0\.0 --advertise {b_ip} on the command line',
        last,
    ), last
