"""The ip and tc commands that build, shape and inspect the namespaces, and a running process's way into one."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
from pathlib import Path

from collectives.errors import LoconetError
from peer.harness.netns.shaping import tbf_parameters

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 20.0


class NetnsError(LoconetError, RuntimeError):
    """A command that builds or changes the network failed."""

    def __init__(self, message: str, cmd: list[str] | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.cmd = cmd
        self.stderr = stderr


def run(cmd: list[str], timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run cmd (no shell); NetnsError naming the command and its stderr if it fails."""
    log.debug("run %s", shlex.join(cmd))
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.CalledProcessError as e:
        stderr = (e.stderr or "").strip()
        raise NetnsError(f"`{shlex.join(cmd)}` failed (exit {e.returncode}): {stderr}", cmd, stderr) from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`{shlex.join(cmd)}` did not finish within {timeout:g} s", cmd) from None
    except FileNotFoundError:
        raise NetnsError(f"`{cmd[0]}` not found (install iproute2): `{shlex.join(cmd)}`", cmd) from None


def run_json(cmd: list[str]) -> list:
    """Run an ``ip -j``/``tc -j`` command; its JSON output ([] for none)."""
    out = run(cmd).stdout.strip()
    return json.loads(out) if out else []


def link_exists(ifname: str) -> bool:
    """Whether the root namespace has an interface of that name."""
    return Path("/sys/class/net", ifname).exists()


# What a namespace name may be: a file name in /run/netns, never a path.
_NETNS_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def netns_exists(netns: str) -> bool:
    """Whether a network namespace of that name exists (``ip netns add`` made it); False for a name that is not one."""
    return bool(_NETNS_NAME_RE.fullmatch(netns)) and Path("/run/netns", netns).exists()


def root_links() -> list[str]:
    """Names of the root namespace's interfaces."""
    return [link["ifname"] for link in run_json(["ip", "-j", "link", "show"]) if "ifname" in link]


def netns_list() -> list[str]:
    """Names of the network namespaces ``ip netns`` knows."""
    return [n["name"] for n in run_json(["ip", "-j", "netns", "list"]) if "name" in n]


def disable_ipv6(ifname: str) -> None:
    """No IPv6 on a root-namespace interface (per interface: nothing global changes)."""
    path = Path("/proc/sys/net/ipv6/conf", ifname, "disable_ipv6")
    if path.exists():
        path.write_text("1")


def tc_qdisc(ns: str | None, dev: str, bps: float | None) -> None:
    """Put a tbf qdisc capping dev at bps at its root, or remove it (bps None)."""
    tc = ["tc"] + (["-n", ns] if ns else [])
    if bps is None:
        qdiscs = run_json(tc + ["-j", "qdisc", "show", "dev", dev])
        if any(q.get("kind") == "tbf" and q.get("root") for q in qdiscs):
            run(tc + ["qdisc", "del", "dev", dev, "root"])
        return
    rate, burst, limit = tbf_parameters(bps)
    run(tc + ["qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate}bit", "burst", str(burst),
              "limit", str(limit)])


def qdisc_stats(ns: str | None, dev: str) -> dict:
    """Counters of dev's tbf qdisc (in namespace ns, None: the root one); {} without one."""
    tc = ["tc"] + (["-n", ns] if ns else [])
    for q in run_json(tc + ["-s", "-j", "qdisc", "show", "dev", dev]):
        if q.get("kind") == "tbf":
            return {k: q.get(k, 0) for k in ("bytes", "packets", "drops", "overlimits", "backlog", "qlen")}
    return {}


_CLONE_NEWNET = 0x40000000


def netns_exec(netns: str) -> list[str]:
    """["ip", "netns", "exec", netns]: prepend to a command to run it in that network namespace."""
    return ["ip", "netns", "exec", netns]


def enter_netns(netns: str) -> None:
    """Move the calling thread (and every thread it starts later) into the named network namespace.

    For a worker process right after it starts, before it opens a socket or a thread: what
    `ip netns exec` does for a new program, for a process that is already running Python.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"could not enter network namespace {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def warn_processes(netns: str) -> None:
    """Log the processes still running in netns: deleting it then leaves it alive until they exit."""
    try:
        pids = run(["ip", "netns", "pids", netns]).stdout.split()
    except NetnsError:
        return
    if pids:
        log.warning("processes %s still run in namespace %s; it lives on (without links) until they exit",
                    " ".join(pids), netns)
