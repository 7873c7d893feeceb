"""The loconet networks of this machine: their state files, the lock, the bridge-nf sysctls, leftovers' cleanup.

Host-wide state: every instance records itself (owner pid and start time) in
``/run/loconet-netns/<id>.json`` so ``cleanup_leftovers`` spares networks whose
owner process is still alive (except the caller's own). When the
``br_netfilter`` sysctls ``net.bridge.bridge-nf-call-{ip,ip6,arp}tables`` are 1,
bridged traffic goes through the host's firewall (a ``FORWARD`` policy of DROP,
as Docker sets, would silently drop host-to-host traffic); they are set to 0
while any loconet network exists, and the original values (saved in
``/run/loconet-netns/bridge-nf.json``) are written back by the last instance to
clean up, or by ``cleanup_leftovers`` once no owner is alive.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from collectives.hosts.identity import process_start
from peer.harness.netns.commands import (
    NetnsError,
    link_exists,
    netns_list,
    root_links,
    run,
    run_json,
    warn_processes,
)

log = logging.getLogger(__name__)

STATE_DIR = Path("/run/loconet-netns")
BRIDGE_NF_FILE = STATE_DIR / "bridge-nf.json"
BRIDGE_NF_KEYS = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables")


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Serialise changes to host-wide state across processes (not reentrant)."""
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a pid from its reuse), None if gone or a zombie.

    A string, as the state files have always recorded it.
    """
    start = process_start(pid)
    return None if start is None else str(start)


def owner_alive(state: dict) -> bool:
    """Whether the process that wrote this state file still runs (the same pid with the same start time)."""
    return start_time(int(state.get("pid", -1))) == state.get("start")


def read_states() -> dict[str, dict]:
    """Instance id -> its state file's content."""
    states = {}
    if STATE_DIR.is_dir():
        for path in STATE_DIR.glob("*.json"):
            if path == BRIDGE_NF_FILE:
                continue
            try:
                states[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError):
                log.warning("ignoring unreadable state file %s", path)
    return states


def bridge_nf_off() -> None:
    """Set the bridge-nf-call-* sysctls to 0, saving the values they had (call under the lock)."""
    saved: dict[str, str] = {}
    if BRIDGE_NF_FILE.exists():
        try:
            saved = json.loads(BRIDGE_NF_FILE.read_text())
        except (OSError, ValueError):
            saved = {}
    changed = False
    for key in BRIDGE_NF_KEYS:
        path = Path("/proc/sys/net/bridge", key)
        if not path.exists():
            continue  # br_netfilter not loaded: bridged traffic never meets the firewall
        value = path.read_text().strip()
        if value != "0":
            saved.setdefault(key, value)
            changed = True
    if not changed:
        return
    BRIDGE_NF_FILE.write_text(json.dumps(saved))  # first the originals, so a crash cannot lose them
    for key in saved:
        path = Path("/proc/sys/net/bridge", key)
        if path.exists() and path.read_text().strip() != "0":
            path.write_text("0")
            log.info("set net.bridge.%s=0 while loconet networks exist (was %s)", key, saved[key])


def bridge_nf_restore_if_unused() -> None:
    """Write back the saved bridge-nf-call-* values once no live instance remains (call under the lock)."""
    if not BRIDGE_NF_FILE.exists():
        return
    if any(owner_alive(s) for s in read_states().values()):
        return
    try:
        saved = json.loads(BRIDGE_NF_FILE.read_text())
    except (OSError, ValueError):
        saved = {}
    for key, value in saved.items():
        path = Path("/proc/sys/net/bridge", key)
        if path.exists():
            path.write_text(str(value))
            log.info("restored net.bridge.%s=%s", key, value)
    BRIDGE_NF_FILE.unlink(missing_ok=True)


def used_subnets() -> list[ipaddress.IPv4Network]:
    """IPv4 networks taken on this machine: the root namespace's addresses and routes, then live networks' subnets.

    Call under the lock (a network being built records its subnet under it).
    """
    nets = []
    for link in run_json(["ip", "-j", "-4", "addr", "show"]):
        for a in link.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for r in run_json(["ip", "-j", "-4", "route", "show"]):
        dst = r.get("dst")
        if dst and dst != "default":
            nets.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    for s in read_states().values():
        if s.get("subnet") and owner_alive(s):
            nets.append(ipaddress.ip_network(s["subnet"]))
    return nets


def cleanup_leftovers(prefix: str = "lcn") -> list[str]:
    """Delete namespaces and root-namespace links whose name starts with prefix; returns what it removed.

    Networks whose owner process is still alive (another harness) are spared, except this process's own.
    """
    if not prefix:
        raise ValueError("cleanup_leftovers needs a non-empty prefix")
    removed: list[str] = []
    with locked():
        states = {i: s for i, s in read_states().items() if i.startswith(prefix)}
        spared = tuple(i for i, s in states.items() if owner_alive(s) and int(s["pid"]) != os.getpid())
        for name in root_links():
            if name.startswith(prefix) and not name.startswith(spared) and link_exists(name):
                try:
                    run(["ip", "link", "del", "dev", name])
                    removed.append(name)
                except NetnsError as e:
                    if link_exists(name):
                        log.warning("could not delete leftover link %s: %s", name, e)
        for netns in netns_list():
            if netns.startswith(prefix) and not netns.startswith(spared):
                try:
                    warn_processes(netns)
                    run(["ip", "netns", "del", netns])
                    removed.append(netns)
                except NetnsError as e:
                    log.warning("could not delete leftover namespace %s: %s", netns, e)
        for i in states:
            if not i.startswith(spared):
                (STATE_DIR / f"{i}.json").unlink(missing_ok=True)
        bridge_nf_restore_if_unused()
    if removed:
        log.info("removed leftovers of earlier networks: %s", " ".join(removed))
    if spared:
        log.info("spared networks of live processes: %s", " ".join(spared))
    return removed
