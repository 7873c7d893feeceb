"""Every listener a benchmark or the harness's worker group starts binds 127.0.0.1: torch's TCP store, gloo's
connections, loconet's own servers; and the sources start none another way."""

from __future__ import annotations

import ast
import datetime
import ipaddress
import os
import sys
from pathlib import Path

import pytest

from peer.harness.loopback import LOOPBACK, loopback_store
from peer.harness.procgroup import ProcessGroup

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    # /proc/net/tcp* print addresses as 32-bit words in host (little-endian) order.
    address = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
    # gRPC listens on 127.0.0.1 through an IPv6 socket: ::ffff:127.0.0.1 is the same address.
    return str(getattr(address, "ipv4_mapped", None) or address)


def listening(pid: int) -> set[tuple[str, int]]:
    """The (address, port) of every TCP socket process pid listens on (Linux /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state == LISTEN and inode in inodes:
                    address, port = local.split(":")
                    found.add((_address(address), int(port, 16)))
    return found


needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads listening sockets from /proc")


@needs_proc
def test_the_store_listens_on_loopback_only_and_serves():
    import torch.distributed as dist

    store = loopback_store(2, datetime.timedelta(seconds=30))
    assert {a for a in listening(os.getpid()) if a[1] == store.port} == {(LOOPBACK, store.port)}
    client = dist.TCPStore(LOOPBACK, store.port, 2, is_master=False, timeout=datetime.timedelta(seconds=30))
    client.set("k", "v")
    assert store.get("k") == b"v"


@needs_proc
def test_a_worker_group_with_gloo_listens_on_loopback_only():
    # What `bench allreduce` starts: loconet transports and, for the baseline, a gloo group and its store.
    with ProcessGroup(2) as group:
        group.gloo_init()
        addresses = set().union(*(listening(pid) for pid in group.pids))
    assert addresses, "the workers listen on something"
    assert {host for host, _ in addresses} == {LOOPBACK}


# ---- the sources start no listener another way ---------------------------------------------

SOURCES = sorted((ROOT / "peer" / "bench").rglob("*.py")) + sorted((ROOT / "peer" / "harness").rglob("*.py"))
WILDCARDS = {"0.0.0.0", "::", "[::]"}


def _calls(path: Path) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]


def _name(call: ast.Call) -> str:
    return call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_benchmark_source_binds_every_interface(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and node.value in WILDCARDS:
            pytest.fail(f"{path.name}:{node.lineno}: a wildcard address {node.value!r}")
    for call in _calls(path):
        host = _keyword(call, "host")
        if isinstance(host, ast.Constant) and host.value == "":
            pytest.fail(f"{path.name}:{call.lineno}: host='' binds every interface")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_torch_stores_and_process_groups_are_made_on_loopback(path):
    for call in _calls(path):
        name = _name(call)
        if name == "TCPStore" and path.name != "loopback.py":
            # A client only: a store server is loopback_store's (torch's own listens on every interface).
            is_master = _keyword(call, "is_master")
            assert isinstance(is_master, ast.Constant) and is_master.value is False, f"{path.name}:{call.lineno}"
        if name == "init_process_group":
            # From a store, never init_method / MASTER_ADDR (torch would start a store on every interface).
            assert _keyword(call, "store") is not None, f"{path.name}:{call.lineno}"
            assert _keyword(call, "init_method") is None, f"{path.name}:{call.lineno}"
    if path.name != "loopback.py":  # its docstring names what the others must not do
        assert "MASTER_ADDR" not in path.read_text()
        assert 'setdefault("GLOO_SOCKET_IFNAME"' not in path.read_text()
