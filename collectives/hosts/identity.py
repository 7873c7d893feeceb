"""Which processes share a host, and whether a process recorded by pid is still the one running.

A host id names the processes that can share ``/dev/shm`` and see each
other's pids: the kernel's boot id, the host name, and the process's pid and
mount namespaces (``detect_host_id``). Two containers of one machine thus get
different ids unless the user gives them one (``--host-id``), which is also
how a test or the network-namespace harness makes peers of one machine
count as separate hosts. A configured id is qualified by what shared memory
needs (``sharing_fingerprint``, ``resolve_host_id``).

A process is named by its pid and its start time (``process_start``), so that
a reused pid is never taken for it (``process_state``, ``alive``): this is how
the members of a host's shared-memory round (``collectives/hosts/local.py``)
tell a dead member from a live one, and how the harness waits for the
processes it started to be gone. Both read Linux's ``/proc``.
"""

from __future__ import annotations

import hashlib
import os
import socket

# Where the processes of one host share memory (the segments of collectives/hosts/local.py live there).
SHM_DIR = "/dev/shm"


def detect_host_id() -> str:
    """This process's host id: processes with the same id share /dev/shm and each other's pid namespace."""
    parts = [socket.gethostname(), _boot_id(), *(_namespace(ns) for ns in ("pid", "mnt", "ipc"))]
    return "auto-" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def sharing_fingerprint() -> str:
    """What processes that reduce through shared memory must share: the kernel's boot, the pid namespace (a
    member's death is read from its pid) and /dev/shm itself (by device and inode, however it is mounted)."""
    try:
        shm = os.stat(SHM_DIR)
        shm_id = f"{shm.st_dev}:{shm.st_ino}"
    except OSError:
        shm_id = ""
    parts = [_boot_id(), _namespace("pid"), shm_id]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


def _boot_id() -> str:
    """The kernel's boot id ("" where it cannot be read)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _namespace(name: str) -> str:
    """This process's namespace of a kind, e.g. "pid:[4026531836]" ("" where it cannot be read)."""
    try:
        return os.readlink(f"/proc/self/ns/{name}")
    except OSError:
        return ""


def resolve_host_id(configured: str) -> str:
    """The host id a peer announces: the detected one for "auto"; a configured one qualified by what shared memory
    needs (sharing_fingerprint), so that peers given one id but not one pid namespace or /dev/shm (two containers)
    are two hosts that reduce over the network, not members that each think the other died in every round."""
    if configured == "auto":
        return detect_host_id()
    return f"{configured}~{sharing_fingerprint()}"


def _process_stat(pid: int) -> tuple[str, int] | None:
    """A live process's state letter (R, S, T, ...) and start time (clock ticks since boot); None if it is gone
    or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if not fields or fields[0] in (b"Z", b"X", b"x"):
        return None
    return fields[0].decode(), int(fields[19])


def process_start(pid: int) -> int | None:
    """The start time of a live process (clock ticks since boot), or None if it is gone or a zombie."""
    stat = _process_stat(pid)
    return None if stat is None else stat[1]


def process_state(pid: int, start: int) -> str | None:
    """The state letter of the process pid that started at start (T: stopped by a signal), or None if it is
    gone (a reused pid is not it)."""
    stat = _process_stat(pid) if pid > 0 else None
    return stat[0] if stat is not None and stat[1] == start else None


def alive(pid: int, start: int) -> bool:
    """Whether the process pid that started at start is still running (a reused pid is not it)."""
    return process_state(pid, start) is not None
