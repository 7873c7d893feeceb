"""``loconet peer`` never hangs: a wrong coordinator is named within seconds, and SIGINT / SIGTERM end it at once,
cleanly, in every phase (connecting, joining, fetching the state, training, syncing)."""

from __future__ import annotations

import http.server
import json
import logging
import re
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from collectives.elastic import ElasticCollective, ElasticConfig, Stopped
from collectives.errors import ConfigError
from collectives.membership.coordinatorerrors import CoordinatorUnavailable, NotACoordinator
from collectives.net.addresses import coordinator_address
from collectives.net.transport import Transport
from peer.coordinator.config import CoordinatorConfig
from peer.runtime.daemon import PeerConfig
from support.coordinator import CoordinatorThread
from support.ports import free_port
from support.procs import CoordinatorProc, Proc, daemon_peer, stop_all

pytestmark = pytest.mark.timeout(120)

SMALL = ("--d-model", "32", "--layers", "2", "--heads", "2", "--seq-len", "32", "--batch-size", "8")
# A state of a few MB: behind a 1 Mbit/s link its fetch takes many seconds.
LARGER = ("--d-model", "128", "--layers", "2", "--heads", "2", "--seq-len", "32", "--batch-size", "8")
# The issue asks for an exit within 3 s; the bound leaves room for a busy 2-core machine.
EXIT_WITHIN_S = 6.0
SIGNALS = [pytest.param(signal.SIGTERM, 0, id="SIGTERM"), pytest.param(signal.SIGINT, 130, id="SIGINT")]


def wait_for_log(proc, pattern: str, timeout: float = 60.0) -> None:
    """Until the process's log (its stderr, with -v) matches pattern."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, proc.log_path.read_text(errors="replace")):
            return
        assert proc.alive, f"{proc.name} exited ({proc.proc.returncode}):{proc.stderr_tail()}"
        time.sleep(0.1)
    raise AssertionError(f"{proc.name}: no {pattern!r} in its log within {timeout:g} s{proc.stderr_tail()}")


def stop_with(proc, sig: int) -> tuple[int, float]:
    """Send sig; (exit code, seconds until the process ended)."""
    sent = time.monotonic()
    proc.signal(sig)
    code = proc.proc.wait(timeout=30)
    return code, time.monotonic() - sent


def assert_ended_cleanly(proc, sig: int, code: int, took: float, expected: int) -> None:
    assert took < EXIT_WITHIN_S, f"{proc.name} took {took:.1f} s to exit after {signal.Signals(sig).name}"
    assert code == expected
    assert "Traceback" not in proc.log_path.read_text(errors="replace")


def peer_states(coordinator: CoordinatorProc) -> dict[str, str]:
    """name -> state ("active", "left", ...) of every peer the coordinator knows."""
    with urllib.request.urlopen(coordinator.dashboard.rstrip("/") + "/api/status", timeout=10) as reply:
        return {p["name"]: p["state"] for p in json.load(reply)["peers"]}


# -- the coordinator's address ------------------------------------------------------------------


@pytest.mark.parametrize(
    "given,address",
    [("7070", "127.0.0.1:7070"), ("10.0.0.5:7070", "10.0.0.5:7070"), ("coordinator:7070", "coordinator:7070"),
     ("[::1]:7070", "[::1]:7070"), (" localhost:80 ", "localhost:80")],
)
def test_a_coordinator_address_is_host_and_port_and_a_bare_port_means_this_machine(given, address):
    assert coordinator_address(given) == address


@pytest.mark.parametrize(
    "given,says",
    [("localhost", "no port"), ("10.0.0.5:", "port must be a number"), ("host:70000", "port must be a number"),
     ("http://host:7070", "not a URL"), ("::1:7070", "bracket an IPv6 host"), ("[::1]", "no port"),
     ("bad host:7070", "not a host name")],
)
def test_a_malformed_coordinator_address_is_a_config_error_naming_the_fix(given, says):
    with pytest.raises(ConfigError, match=says) as caught:
        coordinator_address(given)
    assert "HOST:PORT" in str(caught.value)


def test_the_peer_config_checks_its_coordinator_address_before_anything_starts():
    assert PeerConfig(coordinator="7070").coordinator == "127.0.0.1:7070"
    with pytest.raises(ConfigError, match="--coordinator 'localhost': no port"):
        PeerConfig(coordinator="localhost")


@pytest.mark.parametrize(
    ("settings", "says"),
    [({"keep_checkpoints": 0}, "--keep must be at least 1 (checkpoints kept), got 0"),
     ({"keep_checkpoints": -2}, "--keep must be at least 1 (checkpoints kept), got -2"),
     ({"checkpoint_every": 0}, "--checkpoint-every must be at least 1 (committed rounds), got 0"),
     ({"keep_results": -1}, "--keep-results must be >= 0 (0: keep none), got -1")],
)
def test_what_a_peer_keeps_below_its_least_is_refused(settings, says):
    # --keep 0 kept every checkpoint, a full one per round, for good.
    with pytest.raises(ConfigError) as refused:
        PeerConfig(**settings)
    assert str(refused.value) == says


# -- a wrong coordinator, in process ---------------------------------------------------------------


def start_in_thread(member: ElasticCollective) -> tuple[threading.Thread, dict]:
    """member.start() on a thread; the dict gets its "error" (or "result") and "at" (monotonic end time)."""
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = member.start()
        except BaseException as exc:  # noqa: BLE001 - the test inspects what start raised
            out["error"] = exc
        out["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


@pytest.mark.timeout(30)
def test_no_coordinator_is_said_within_seconds_with_a_countdown_then_given_up_after_the_connect_timeout(caplog):
    port = free_port()
    member = ElasticCollective(ElasticConfig(coordinator=f"127.0.0.1:{port}", run_id="r", connect_timeout_s=10))
    began, began_wall = time.monotonic(), time.time()
    with (
        caplog.at_level(logging.WARNING, logger="collectives.membership.client"),
        pytest.raises(CoordinatorUnavailable) as caught,
    ):
        member.start()
    took = time.monotonic() - began
    notes = [(r.created, r.getMessage()) for r in caplog.records]
    assert notes[0][1].startswith(f"no coordinator answers at 127.0.0.1:{port} (connection refused")
    assert notes[0][0] - began_wall < 3
    assert any(text.startswith(f"still no coordinator at 127.0.0.1:{port}") for _, text in notes[1:])
    countdown = [int(m.group(1)) for _, text in notes if (m := re.search(r"giving up in (\d+) s", text))]
    assert countdown == sorted(countdown, reverse=True) and countdown[0] <= 10
    assert 8 <= took < 13
    assert str(caught.value).startswith(f"no loconet coordinator answered at 127.0.0.1:{port} for 10 s")
    assert "--connect-timeout" in str(caught.value)


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.timeout(30)
def test_an_http_server_at_the_coordinators_address_is_named_at_once_as_not_a_coordinator():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        member = ElasticCollective(ElasticConfig(coordinator=f"127.0.0.1:{server.server_port}", run_id="r"))
        began = time.monotonic()
        with pytest.raises(NotACoordinator) as caught:
            member.start()
        assert time.monotonic() - began < 3
    finally:
        server.shutdown()
        server.server_close()
    assert str(caught.value).startswith(f"127.0.0.1:{server.server_port} answers but is not a loconet coordinator")
    assert "dashboard" in str(caught.value)


@pytest.mark.timeout(30)
def test_a_peers_data_plane_port_at_the_coordinators_address_is_named_at_once_as_not_a_coordinator():
    with Transport() as other:
        address = other.start()
        member = ElasticCollective(ElasticConfig(coordinator=address, run_id="r"))
        with pytest.raises(NotACoordinator, match=f"^{re.escape(address)} answers gRPC but is not a loconet"):
            member.start()


@pytest.mark.timeout(30)
def test_interrupt_cuts_a_start_that_waits_for_a_coordinator_short():
    member = ElasticCollective(ElasticConfig(coordinator=f"127.0.0.1:{free_port()}", run_id="r"))
    thread, out = start_in_thread(member)
    time.sleep(1.0)
    asked = time.monotonic()
    member.interrupt("stopped by the test")
    thread.join(timeout=5)
    assert isinstance(out["error"], Stopped) and str(out["error"]) == "stopped by the test"
    assert out["at"] - asked < 1.5
    assert not member.transport.running  # closed


@pytest.mark.timeout(30)
def test_interrupt_cuts_a_sync_waiting_for_its_quorum_short_and_later_syncs_raise_at_once():
    coordinator = CoordinatorThread(CoordinatorConfig(run_id="q", port=0, dashboard_port=None, min_peers=2))
    member = ElasticCollective(ElasticConfig(coordinator=coordinator.server.address, run_id="q"))
    try:
        member.start(has_state=True)
        pending = member.sync_async(torch.ones(8))  # alone: the quorum waits for a second peer
        time.sleep(1.0)
        assert not pending.done()
        asked = time.monotonic()
        member.interrupt()
        with pytest.raises(Stopped):
            pending.result(timeout=5)
        assert time.monotonic() - asked < 1.5
        with pytest.raises(Stopped):
            member.sync(torch.ones(8))
    finally:
        member.close()
        coordinator.close()
    assert coordinator.server.coordinator.status()["peers"][0]["state"] == "left"


# -- a real `loconet peer`, in each phase -----------------------------------------------------------

PHASES = ("connecting", "joining", "fetching", "training", "syncing")


class Network:
    """Coordinators for each phase and one peer per (phase, signal), all started at once.

    The peers wait at a gate (``--start-when``, as the harness starts its joiners) so that
    their start-up (seconds of imports each) overlaps, and each test releases its own.
    """

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list = []

        def coordinator(name: str, *extra: str):
            return self._add(CoordinatorProc(tmp / f"{name}.log", "r", 0, "--startup-grace", "0", *extra))

        # connecting: nothing listens at the address.
        nowhere = f"127.0.0.1:{free_port()}"
        # joining: a coordinator that accepts connections (the kernel does) but answers nothing.
        self.silent = coordinator("silent")
        # fetching: the run's only peer serves its state (a few MB) at 1 Mbit/s, so a fetch takes many seconds.
        # Its model comes from another seed: a joiner whose initial state is the founder's keeps it, fetching nothing.
        self.slow = coordinator("slow")
        # It trains slowly on purpose (the harness's slowdown control): its steps would take a core from the others.
        (tmp / "donor.control").write_text(json.dumps({"slowdown": 20}))
        self.donor = self._add(daemon_peer(
            tmp, self.slow.address, "r", "donor", *LARGER, "--seed", "1", "--bandwidth", "1mbit", "--steps", "100000",
            "--control", str(tmp / "donor.control"),
        ))
        # training: a run of one, that never syncs.
        self.plain = coordinator("plain")
        # syncing: a run that needs three peers for a round: the peer's first sync waits in its quorum.
        self.crowd = coordinator("crowd", "--min-peers", "3")
        self.coordinators = {
            "connecting": nowhere, "joining": self.silent.address, "fetching": self.slow.address,
            "training": self.plain.address, "syncing": self.crowd.address,
        }
        options = {
            "connecting": SMALL, "joining": SMALL, "fetching": LARGER,
            "training": (*SMALL, "--sync-every", "100000"), "syncing": (*SMALL, "--sync-every", "5"),
        }
        self.peers = {}
        for phase in PHASES:
            for sig in (signal.SIGTERM, signal.SIGINT):
                name = f"{phase}-{signal.Signals(sig).name}"
                gate = tmp / f"{name}.go"
                self.peers[phase, sig] = self._add(daemon_peer(
                    tmp, self.coordinators[phase], "r", name, *options[phase], "--steps", "100000",
                    "--start-when", str(gate),
                ))
        self.silent.signal(signal.SIGSTOP)

    def _add(self, proc):
        self.procs.append(proc)
        return proc

    def release(self, phase: str, sig: int):
        """The peer of this phase and signal, past its start-up and let go."""
        peer = self.peers[phase, sig]
        peer.wait_event(lambda e: e["event"] == "waiting", 120)
        (self.tmp / f"{peer.name}.go").touch()
        return peer

    def close(self) -> None:
        stop_all([p for p in self.procs if not isinstance(p, CoordinatorProc)])
        stop_all([p for p in self.procs if isinstance(p, CoordinatorProc)])


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    net = Network(tmp_path_factory.mktemp("signals"))
    yield net
    net.close()


@pytest.mark.parametrize("sig,code", SIGNALS)
def test_a_signal_while_connecting_to_no_coordinator_ends_the_peer_at_once(network, sig, code):
    peer = network.release("connecting", sig)
    # Within seconds of trying, it says where it tries and that nothing answers there.
    address = re.escape(network.coordinators["connecting"])
    wait_for_log(peer, rf"WARNING .*no coordinator answers at {address} \(connection refused")
    assert_ended_cleanly(peer, sig, *stop_with(peer, sig), expected=code)


@pytest.mark.parametrize("sig,code", SIGNALS)
def test_a_signal_while_joining_a_coordinator_that_does_not_answer_ends_the_peer_at_once(network, sig, code):
    peer = network.release("joining", sig)
    peer.wait_event(lambda e: e["event"] == "connecting", 30)
    time.sleep(1.0)  # in its Join call, which has a 5 s deadline
    assert_ended_cleanly(peer, sig, *stop_with(peer, sig), expected=code)


@pytest.mark.parametrize("sig,code", SIGNALS)
def test_a_signal_while_fetching_the_state_ends_the_peer_at_once_and_it_leaves_the_run(network, sig, code):
    network.donor.wait_event(lambda e: e["event"] == "joined", 120)
    peer = network.release("fetching", sig)
    wait_for_log(peer, r"joined run r as .* state from 127\.0\.0\.1:")
    time.sleep(1.0)
    assert not any(e["event"] == "joined" for e in peer.events)  # still fetching
    assert_ended_cleanly(peer, sig, *stop_with(peer, sig), expected=code)
    assert peer_states(network.slow)[peer.name] == "left"


@pytest.mark.parametrize("sig,code", SIGNALS)
def test_a_signal_while_training_ends_the_peer_at_once_and_it_leaves_the_run(network, sig, code):
    peer = network.release("training", sig)
    peer.wait_event(lambda e: e["event"] == "joined", 30)
    time.sleep(1.0)
    assert_ended_cleanly(peer, sig, *stop_with(peer, sig), expected=code)
    assert peer.wait_event(lambda e: e["event"] == "finished", 1)["stopped"] is True
    assert peer_states(network.plain)[peer.name] == "left"


@pytest.mark.parametrize("sig,code", SIGNALS)
def test_a_signal_while_a_round_waits_for_peers_ends_the_peer_at_once_and_it_leaves_the_run(network, sig, code):
    peer = network.release("syncing", sig)
    peer.wait_event(lambda e: e["event"] == "sync-start", 30)
    time.sleep(1.0)
    assert peer.events[-1]["event"] == "sync-start"  # still in its round
    assert_ended_cleanly(peer, sig, *stop_with(peer, sig), expected=code)
    assert peer_states(network.crowd)[peer.name] == "left"


def test_a_peer_pointed_at_the_dashboard_port_says_so_in_one_line(tmp_path, network):
    dashboard = network.plain.dashboard.removeprefix("http://").rstrip("/")
    # As a user runs it: no -v, so an error is one line and no traceback.
    peer = Proc([sys.executable, "-m", "peer.cli", "peer", "--coordinator", dashboard, "--run", "r", *SMALL],
                tmp_path / "misdirected.log")
    network.procs.append(peer)
    assert peer.proc.wait(timeout=60) == 1
    (line,) = peer.log_path.read_text().splitlines()
    assert line.startswith(f"loconet: error: {dashboard} answers but is not a loconet coordinator")
    assert "is it the dashboard's HTTP port?" in line
