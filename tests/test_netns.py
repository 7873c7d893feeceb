"""peer/harness/netns/: namespaces on a bridge, tbf caps, link cuts, cleanup. Needs root; skipped otherwise.

No timing thresholds: throughput is only checked against an upper bound (the cap
times 1.25: the shaping works), and the measured numbers are printed.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peer.harness.forkserver import ForkServer
from peer.harness.netns import availability
from peer.harness.netns.availability import NetnsUnavailable, check_available
from peer.harness.netns.commands import NetnsError
from peer.harness.netns.network import NetnsNetwork
from peer.harness.netns.registry import cleanup_leftovers
from peer.harness.netns.shaping import LinkSpec

sys.path.insert(0, str(Path(__file__).parent))
from support.forkspawn import PROBE, probe, spawn

pytestmark = pytest.mark.timeout(120)

try:
    check_available()
except NetnsUnavailable as _e:  # pragma: no cover - depends on the machine
    pytest.skip(f"network namespaces unavailable: {_e}", allow_module_level=True)

PY = [sys.executable, "-S", "-c"]
PORT = 5701

ECHO_SERVER = """
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("ready", flush=True)
def serve(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                return
            c.sendall(d)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

ECHO_CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
        c.sendall(b"ping")
        print("ok" if c.recv(4) == b"ping" else "bad", flush=True)
except OSError as e:
    print("fail", type(e).__name__, flush=True)
"""

RECEIVER = """
import json, socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(60)
expected, n, first, start = int(sys.argv[3]), 0, 0, None
while n < expected:
    d = c.recv(1 << 16)
    if not d:
        break
    if start is None:
        start, first = time.monotonic(), len(d)
    n += len(d)
end = time.monotonic()
print(json.dumps({"bytes": n, "timed_bytes": n - first, "seconds": end - start}), flush=True)
"""

SENDER = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as c:
    c.sendall(bytes(int(sys.argv[3])))
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
"""


def _random_prefix() -> str:
    """6 characters; prefixes of one length are never prefixes of each other."""
    return "t" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(5))


def _objects(prefix: str) -> list[str]:
    """Namespaces and root-namespace links whose name starts with prefix (checked independently of the module)."""
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout)
    spaces = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True, check=True).stdout.strip()
    names = [link["ifname"] for link in links] + [n["name"] for n in json.loads(spaces or "[]")]
    names += [p.name for p in Path("/run/netns").glob(f"{prefix}*")] if Path("/run/netns").is_dir() else []
    return sorted({n for n in names if n.startswith(prefix)})


class Lab:
    """Networks and child processes of one test; everything is stopped and removed afterwards."""

    def __init__(self) -> None:
        self.networks: list[NetnsNetwork] = []
        self.procs: list[subprocess.Popen] = []

    def network(self, names: list[str], links: dict[str, LinkSpec] | None = None, prefix: str | None = None):
        net = NetnsNetwork(prefix=prefix or _random_prefix())
        self.networks.append(net)
        net.create(names, links)
        return net

    def start(self, net: NetnsNetwork, host: str, code: str, *args: object) -> subprocess.Popen:
        """Run a python snippet inside host; waits for its "ready" line if it prints one first."""
        p = subprocess.Popen(net.exec_prefix(host) + PY + [code, *map(str, args)], stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def server(self, net: NetnsNetwork, host: str, code: str, *args: object) -> subprocess.Popen:
        p = self.start(net, host, code, *args)
        assert p.stdout.readline().strip() == "ready"
        return p

    def run(self, net: NetnsNetwork, host: str, code: str, *args: object) -> str:
        out = subprocess.run(net.exec_prefix(host) + PY + [code, *map(str, args)], capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
            if p.stdout:
                p.stdout.close()
        for net in self.networks:
            net.cleanup()
        for net in self.networks:
            assert _objects(net.prefix) == [], f"leftovers of {net.prefix}"


@pytest.fixture
def lab():
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


def _transfer(lab: Lab, net: NetnsNetwork, src: str, dst: str, nbytes: int) -> float:
    """Send nbytes over TCP from host src to host dst; the rate measured by the receiver, bits/s."""
    receiver = lab.server(net, dst, RECEIVER, net.hosts[dst].ip, PORT, nbytes)
    lab.run(net, src, SENDER, net.hosts[dst].ip, PORT, nbytes)
    result = json.loads(receiver.stdout.readline())
    assert result["bytes"] == nbytes
    return result["timed_bytes"] * 8 / result["seconds"]


def test_hosts_reach_each_other_and_the_root_namespace_reaches_them(lab):
    net = lab.network(["a", "b"])
    a = net.hosts["a"]
    lab.server(net, "a", ECHO_SERVER, a.ip, PORT)
    assert lab.run(net, "b", ECHO_CLIENT, a.ip, PORT, 10) == "ok"
    with socket.create_connection((a.ip, PORT), timeout=10) as c:
        c.sendall(b"root")
        assert c.recv(4) == b"root"


@pytest.mark.parametrize("mbit", [20, 100])
def test_tbf_caps_the_uplink(lab, mbit):
    cap = mbit * 1e6
    net = lab.network(["a", "b"], {"a": LinkSpec(up_bps=cap)})
    rate = _transfer(lab, net, "a", "b", int(cap / 8 * 1.6))  # ~1.6 s at the cap (4 MB at 20 Mbit/s)
    print(f"uplink cap {mbit} Mbit/s: measured {rate / 1e6:.1f} Mbit/s ({rate / cap:.0%} of the cap)")
    assert rate < cap * 1.25


@pytest.mark.parametrize("mbit", [20, 100])
def test_tbf_caps_the_downlink(lab, mbit):
    cap = mbit * 1e6
    net = lab.network(["a", "b"], {"b": LinkSpec(down_bps=cap)})
    rate = _transfer(lab, net, "a", "b", int(cap / 8 * 1.6))
    print(f"downlink cap {mbit} Mbit/s: measured {rate / 1e6:.1f} Mbit/s ({rate / cap:.0%} of the cap)")
    assert rate < cap * 1.25


def test_set_link_replaces_and_removes_the_qdiscs(lab):
    net = lab.network(["a"], {"a": LinkSpec(up_bps=20e6, down_bps=50e6)})
    a = net.hosts["a"]

    def rates() -> tuple[list, list]:
        up = json.loads(subprocess.run(["tc", "-n", a.netns, "-j", "qdisc", "show", "dev", a.veth_ns],
                                       capture_output=True, text=True, check=True).stdout)
        down = json.loads(subprocess.run(["tc", "-j", "qdisc", "show", "dev", a.veth_host],
                                         capture_output=True, text=True, check=True).stdout)
        return ([q["options"]["rate"] for q in up if q["kind"] == "tbf"],
                [q["options"]["rate"] for q in down if q["kind"] == "tbf"])

    assert rates() == ([20e6 / 8], [50e6 / 8])  # tc -j reports bytes/s
    net.set_link("a", LinkSpec(up_bps=1e9, down_bps=None))
    assert rates() == ([1e9 / 8], [])
    net.set_link("a", LinkSpec())
    assert rates() == ([], [])


def _congestion_control(net: NetnsNetwork, name: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", net.hosts[name].netns, "sysctl", "-n", "net.ipv4.tcp_congestion_control"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_a_host_gets_the_first_congestion_control_the_kernel_lets_it_set(lab):
    net = lab.network(["a", "b"])
    # reno is built into every kernel and always allowed; an unknown name is passed over.
    assert net.set_congestion_control("a", ("no-such-control", "reno")) == "reno"
    assert _congestion_control(net, "a") == "reno"
    assert _congestion_control(net, "b") == Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()


def test_a_congestion_control_no_host_may_use_is_an_error_naming_the_allowed_ones(lab):
    net = lab.network(["a"])
    with pytest.raises(NetnsError, match="could not set any of no-such-control as a's TCP congestion control"):
        net.set_congestion_control("a", ("no-such-control",))


def test_link_stats_count_what_the_host_sends_and_receives(lab):
    net = lab.network(["a", "b"])
    before_a, before_b = net.link_stats("a"), net.link_stats("b")
    _transfer(lab, net, "a", "b", 1_000_000)
    after_a, after_b = net.link_stats("a"), net.link_stats("b")
    assert after_a["tx_bytes"] - before_a["tx_bytes"] >= 1_000_000
    assert after_b["rx_bytes"] - before_b["rx_bytes"] >= 1_000_000
    assert after_b["tx_bytes"] - before_b["tx_bytes"] < 1_000_000  # only acks go back
    assert after_a["up"] and after_b["up"]


def test_cut_stops_traffic_and_restore_brings_it_back(lab):
    net = lab.network(["a", "b"], {"a": LinkSpec(up_bps=50e6, down_bps=50e6)})
    a = net.hosts["a"]
    lab.server(net, "a", ECHO_SERVER, a.ip, PORT)
    held = socket.create_connection((a.ip, PORT), timeout=10)  # an open connection across the cut
    held.sendall(b"1")
    assert held.recv(1) == b"1"

    net.cut("a")
    assert not net.link_stats("a")["up"]
    held.settimeout(1)
    held.sendall(b"2")
    with pytest.raises(socket.timeout):
        held.recv(1)  # the data does not get through, the connection is not reset either
    with pytest.raises(OSError):
        socket.create_connection((a.ip, PORT), timeout=1).close()
    assert lab.run(net, "b", ECHO_CLIENT, a.ip, PORT, 1).startswith("fail")

    net.restore("a")
    assert net.link_stats("a")["up"]
    assert lab.run(net, "b", ECHO_CLIENT, a.ip, PORT, 10) == "ok"
    with socket.create_connection((a.ip, PORT), timeout=10) as c:
        c.sendall(b"3")
        assert c.recv(1) == b"3"
    held.settimeout(30)
    assert held.recv(1) == b"2"  # TCP retransmits: the stalled connection resumes
    held.close()
    assert net.links["a"] == LinkSpec(50e6, 50e6)  # the caps survive the cut
    up = subprocess.run(["tc", "-n", a.netns, "qdisc", "show", "dev", a.veth_ns], capture_output=True, text=True,
                        check=True)
    assert "tbf" in up.stdout


def test_cleanup_removes_everything_and_is_idempotent(lab):
    net = lab.network(["a", "b", "c"], {"b": LinkSpec(10e6, 10e6)})
    assert len(_objects(net.prefix)) == 3 + 3 + 1  # namespaces, root-side veths, bridge
    net.cleanup()
    assert _objects(net.prefix) == []
    net.cleanup()
    assert _objects(net.prefix) == []


def test_end_processes_kills_what_left_its_parents_session_and_only_in_that_host(lab):
    net = lab.network(["a", "b"])
    # setsid: a daemon out of its starter's process group, as torch_shm_manager is.
    daemon = subprocess.Popen([*net.exec_prefix("a"), "setsid", "sleep", "300"])
    bystander = subprocess.Popen([*net.exec_prefix("b"), "sleep", "300"])
    try:
        deadline = time.monotonic() + 10
        while not subprocess.run(
            ["ip", "netns", "pids", net.netns_of("a")], capture_output=True, text=True, check=True
        ).stdout:
            assert time.monotonic() < deadline, "the daemon never appeared in its namespace"
            time.sleep(0.05)
        killed = net.end_processes("a")
        assert daemon.wait(timeout=10) == -signal.SIGKILL
        assert killed == [daemon.pid]
        assert bystander.poll() is None
    finally:
        for proc in (daemon, bystander):
            proc.kill()
            proc.wait(timeout=10)


def test_context_manager_cleans_up_after_an_error():
    prefix = _random_prefix()
    with pytest.raises(RuntimeError, match="boom"), NetnsNetwork(prefix=prefix) as net:
        net.create(["a"])
        raise RuntimeError("boom")
    assert _objects(prefix) == []


def test_cleanup_leftovers_removes_a_crashed_network_and_spares_other_prefixes(lab):
    crashed = lab.network(["a", "b"])
    other = lab.network(["a", "b"])
    assert crashed.subnet != other.subnet  # two networks side by side get distinct subnets
    others_before = _objects(other.prefix)
    removed = cleanup_leftovers(crashed.prefix)  # crashed.cleanup() was never called
    assert set(removed) == {crashed.bridge, *(h.veth_host for h in crashed.hosts.values()),
                            *(h.netns for h in crashed.hosts.values())}
    assert _objects(crashed.prefix) == []
    assert _objects(other.prefix) == others_before
    assert cleanup_leftovers(crashed.prefix) == []


def test_cleanup_leftovers_spares_a_network_whose_owner_is_alive(lab):
    prefix = _random_prefix()
    code = (
        "import sys; from peer.harness.netns.network import NetnsNetwork\n"
        f"with NetnsNetwork(prefix={prefix!r}) as net:\n"
        "    net.create(['a'])\n"
        "    print('ready', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert owner.stdout.readline().strip() == "ready"
        alive = _objects(prefix)
        assert len(alive) == 3
        assert cleanup_leftovers(prefix) == []
        assert _objects(prefix) == alive
    finally:
        owner.communicate(timeout=30)  # closing stdin lets it clean up
    assert owner.returncode == 0
    assert _objects(prefix) == []


def test_check_available_explains_that_root_is_needed(monkeypatch):
    monkeypatch.setattr(availability.os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsUnavailable) as info:
        check_available()
    message = str(info.value)
    assert "root" in message and "without --netns" in message


def test_bad_names_are_refused_before_anything_is_made():
    with pytest.raises(ValueError):
        NetnsNetwork(prefix="much-too-long")
    with pytest.raises(ValueError):
        NetnsNetwork(prefix="tq").create(["a b"])
    with pytest.raises(ValueError):
        LinkSpec(up_bps=0)
    assert _objects("tq") == []


def test_a_loconet_child_forked_into_a_host_runs_in_that_hosts_network_namespace(lab, tmp_path):
    # What the harness does for --netns peers: fork them from the fork server, then enter the host's namespace.
    net = lab.network(["a"])
    netns = net.netns_of("a")
    server = ForkServer()
    try:
        assert spawn(server, tmp_path, "coordinator", *PROBE, "--help", netns=netns).wait(60) == 0
    finally:
        server.close()
    seen = probe(tmp_path)
    assert seen["netns"] == f"net:[{os.stat(f'/run/netns/{netns}').st_ino}]"
    assert seen["netns"] != os.readlink("/proc/self/ns/net")
