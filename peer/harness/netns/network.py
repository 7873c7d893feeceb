"""A small network on this machine: one Linux network namespace per process, a bridge, shaped links.

``loconet harness --netns`` puts the coordinator and every peer in its own
network namespace. The namespaces hang off one bridge in the root namespace
through veth pairs; ``tbf`` qdiscs cap each host's uplink and downlink, and a
link "cut" takes both ends of a host's veth pair down::

      root namespace
      +---------------------------------------------------------------+
      |  bridge <id>br  10.77.0.1/24                                  |
      |    |  (the root namespace reaches the hosts through it;       |
      |    |   it forwards nothing beyond the bridge)                 |
      |    +---------------------+--------- ...                       |
      |    |                     |                                    |
      |  <id>h0                <id>h1          tbf here: downlinks    |
      +----|---------------------|------------------------------------+
           | veth pair           | veth pair
      +----|--------------+ +----|--------------+
      |  <id>n0           | |  <id>n1           |  tbf on <id>nK: uplink of host K
      |  10.77.0.2/24     | |  10.77.0.3/24     |  lo up, default route via
      |  namespace        | |  namespace        |  10.77.0.1 (the bridge)
      |  <id>-coordinator | |  <id>-peer0       |  ...
      +-------------------+ +-------------------+

``<id>`` is the prefix plus a random 4-character token (``lcn`` + ``k3x9`` ->
``lcnk3x9``), so two harnesses can run side by side while
``cleanup_leftovers("lcn")`` still finds everything a crashed one left behind.
Names: bridge ``<id>br``, veth ends ``<id>h<i>`` (root side) and ``<id>n<i>``
(namespace side), namespaces ``<id>-<host name>``; interface names stay within
IFNAMSIZ (15 characters). With the default subnet, a network whose
10.77.0.0/24 is already taken (another harness) takes the next free /24 of
10.77.0.0/16; an explicit subnet that overlaps a route raises.

Shaping (``tbf_parameters``): rate = the cap; burst = max(rate x 10 ms,
4096 bytes); queue limit = burst + rate x 100 ms (clamped to 16 KiB .. 64 MiB: about ten
full frames at least, so a slow link still takes a few in a row; before
2026-12-06 the floor was 64 KiB, 2.6 s of queue at 200 kbit/s, and the
heartbeats queued behind a round's bytes lapsed the harness's 3 s leases).
10 ms of burst is at least rate/HZ for any kernel HZ >= 100 (so the bucket
can always refill between timer ticks and the full rate is reachable) yet lets
through at most 1 % more than the cap over one second, from 10 Mbit/s to
10 Gbit/s. The 100 ms queue absorbs TCP's bursts without turning every
overshoot into a loss (a drop-tail queue like a home router's). tbf counts
Ethernet frames, so TCP goodput is about 1448/1514 = 96 % of the cap.

Congestion control (``set_congestion_control``): a new namespace starts with
the host's default algorithm, which may be bbr. Through 100 Mbit/s tbf links
our all-reduce rounds used 0.84-0.89 of the cap under bbr and 0.94 under reno
(BENCHMARKS.md, issue 18), so ``bench allreduce --netns`` gives each namespace the
loss-based control most Linux hosts run (``LOSS_BASED_CONTROLS``: cubic, the
kernel's default, else reno where cubic is not allowed), the same for gloo and
for us.

Host-wide state: every instance records itself (owner pid and start time) in
``/run/loconet-netns/<id>.json`` so ``cleanup_leftovers`` spares networks whose
owner process is still alive (except the caller's own). When the
``br_netfilter`` sysctls ``net.bridge.bridge-nf-call-{ip,ip6,arp}tables`` are 1,
bridged traffic goes through the host's firewall (a ``FORWARD`` policy of DROP,
as Docker sets, would silently drop host-to-host traffic); they are set to 0
while any loconet network exists, and the original values (saved in
``/run/loconet-netns/bridge-nf.json``) are written back by the last instance to
clean up, or by ``cleanup_leftovers`` once no owner is alive. Nothing else on
the host changes: IPv6 is switched off per interface (no DAD, router
solicitations or MLD noise on the links), and namespaces cannot reach beyond
the bridge (the root namespace does not forward).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from collectives.errors import LoconetError, UsageError
from collectives.hostid import process_start
from collectives.ratelimit import burst_bytes

log = logging.getLogger(__name__)

DEFAULT_SUBNET = "10.77.0.0/24"
STATE_DIR = Path("/run/loconet-netns")
BRIDGE_NF_FILE = STATE_DIR / "bridge-nf.json"
BRIDGE_NF_KEYS = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables")
COMMAND_TIMEOUT_S = 20.0
IFNAMSIZ = 15  # longest interface name (IFNAMSIZ - 1 for the NUL)

# tbf: see the module docstring (its burst: collectives.ratelimit.burst_bytes).
QUEUE_SECONDS = 0.100
MIN_QUEUE_BYTES = 16 * 1024
MAX_QUEUE_BYTES = 64 * 1024 * 1024

# Loss-based TCP congestion controls in order of preference: cubic is Linux's default; a namespace may set
# only those in net.ipv4.tcp_allowed_congestion_control, where reno always is.
LOSS_BASED_CONTROLS = ("cubic", "reno")

_PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,6}")
_NAME_RE = re.compile(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*")
_TOKEN_CHARS = string.ascii_lowercase + string.digits


class NetnsUnavailable(LoconetError, RuntimeError):
    """Network namespaces cannot be used here (not root, no iproute2, no kernel support)."""


class NetnsError(LoconetError, RuntimeError):
    """A command that builds or changes the network failed."""

    def __init__(self, message: str, cmd: list[str] | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.cmd = cmd
        self.stderr = stderr


@dataclass(frozen=True)
class LinkSpec:
    """Caps of one host's link in bits/s; None: no cap in that direction."""

    up_bps: float | None = None  # egress of the host (namespace -> bridge)
    down_bps: float | None = None  # ingress of the host (bridge -> namespace)

    def __post_init__(self) -> None:
        for field_name in ("up_bps", "down_bps"):
            v = getattr(self, field_name)
            if v is not None and not (math.isfinite(v) and v >= 8000):
                raise ValueError(f"LinkSpec.{field_name} must be None or a rate of at least 8000 bit/s, got {v!r}")


@dataclass(frozen=True)
class Host:
    """One namespace of the network."""

    name: str  # logical name ("coordinator", "peer0", ...)
    netns: str  # the namespace name (with the prefix)
    ip: str  # its address on the bridge subnet
    veth_host: str  # the veth end in the root namespace (a bridge port)
    veth_ns: str  # the veth end inside the namespace


def tbf_parameters(bps: float) -> tuple[int, int, int]:
    """(rate in bit/s, burst in bytes, queue limit in bytes) of the tbf qdisc that caps a link at bps."""
    rate_bytes = bps / 8.0
    burst = burst_bytes(rate_bytes)
    queue = min(MAX_QUEUE_BYTES, max(MIN_QUEUE_BYTES, math.ceil(rate_bytes * QUEUE_SECONDS)))
    return round(bps), burst, burst + queue


# -- commands ----------------------------------------------------------------------------------


def _run(cmd: list[str], timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
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


def _json(cmd: list[str]) -> list:
    out = _run(cmd).stdout.strip()
    return json.loads(out) if out else []


def _link_exists(ifname: str) -> bool:
    return Path("/sys/class/net", ifname).exists()


# What a namespace name may be: a file name in /run/netns, never a path.
_NETNS_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def netns_exists(netns: str) -> bool:
    """Whether a network namespace of that name exists (``ip netns add`` made it); False for a name that is not one."""
    return bool(_NETNS_NAME_RE.fullmatch(netns)) and Path("/run/netns", netns).exists()


def _root_links() -> list[str]:
    return [link["ifname"] for link in _json(["ip", "-j", "link", "show"]) if "ifname" in link]


def _netns_list() -> list[str]:
    return [n["name"] for n in _json(["ip", "-j", "netns", "list"]) if "name" in n]


def _disable_ipv6(ifname: str) -> None:
    """No IPv6 on a root-namespace interface (per interface: nothing global changes)."""
    path = Path("/proc/sys/net/ipv6/conf", ifname, "disable_ipv6")
    if path.exists():
        path.write_text("1")


def _tc_qdisc(ns: str | None, dev: str, bps: float | None) -> None:
    """Put a tbf qdisc capping dev at bps at its root, or remove it (bps None)."""
    tc = ["tc"] + (["-n", ns] if ns else [])
    if bps is None:
        qdiscs = _json(tc + ["-j", "qdisc", "show", "dev", dev])
        if any(q.get("kind") == "tbf" and q.get("root") for q in qdiscs):
            _run(tc + ["qdisc", "del", "dev", dev, "root"])
        return
    rate, burst, limit = tbf_parameters(bps)
    _run(tc + ["qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate}bit", "burst", str(burst),
               "limit", str(limit)])


def _qdisc_stats(ns: str | None, dev: str) -> dict:
    tc = ["tc"] + (["-n", ns] if ns else [])
    for q in _json(tc + ["-s", "-j", "qdisc", "show", "dev", dev]):
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


# -- host-wide bookkeeping ---------------------------------------------------------------------


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise changes to host-wide state across processes (not reentrant)."""
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a pid from its reuse), None if gone or a zombie.

    A string, as the state files have always recorded it.
    """
    start = process_start(pid)
    return None if start is None else str(start)


def _owner_alive(state: dict) -> bool:
    return _start_time(int(state.get("pid", -1))) == state.get("start")


def _states() -> dict[str, dict]:
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


def _bridge_nf_off() -> None:
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


def _bridge_nf_restore_if_unused() -> None:
    """Write back the saved bridge-nf-call-* values once no live instance remains (call under the lock)."""
    if not BRIDGE_NF_FILE.exists():
        return
    if any(_owner_alive(s) for s in _states().values()):
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


def _used_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks of the root namespace's addresses and routes."""
    nets = []
    for link in _json(["ip", "-j", "-4", "addr", "show"]):
        for a in link.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for r in _json(["ip", "-j", "-4", "route", "show"]):
        dst = r.get("dst")
        if dst and dst != "default":
            nets.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    return nets


# -- availability ------------------------------------------------------------------------------


_WITHOUT = (
    "Run without --netns instead: every process then listens on 127.0.0.1 and --bandwidth is enforced by "
    "the transport's own token buckets (link cuts need --netns)."
)


def check_available() -> None:
    """Raise NetnsUnavailable, saying what is missing, unless namespaces, veth, bridges and tbf all work here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable(
            f"--netns needs root (uid 0; you are uid {os.geteuid()}): creating network namespaces, veth links, "
            f"a bridge and tc qdiscs needs CAP_SYS_ADMIN and CAP_NET_ADMIN. Run it as root "
            f"(e.g. `sudo -E` before this command). {_WITHOUT}"
        )
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(
                f"`{tool}` is not on PATH: --netns needs iproute2 (`apt-get install -y iproute2`, "
                f"`dnf install iproute iproute-tc`). {_WITHOUT}"
            )
    probe = f"loconet-probe-{os.getpid()}-{secrets.token_hex(2)}"
    steps = [
        (["ip", "netns", "add", probe],
         "network namespaces cannot be created (a container without CAP_SYS_ADMIN, or a kernel without CONFIG_NET_NS?)"),
        (["ip", "netns", "exec", probe, "true"], "`ip netns exec` does not work (mount namespaces?)"),
        (["ip", "-n", probe, "link", "add", "name", "v0", "type", "veth", "peer", "name", "v1"],
         "veth links are not available (kernel module `veth`)"),
        (["ip", "-n", probe, "link", "add", "name", "b0", "type", "bridge"],
         "bridges are not available (kernel module `bridge`)"),
        (["tc", "-n", probe, "qdisc", "add", "dev", "v0", "root", "tbf", "rate", "10mbit", "burst", "12500",
          "limit", "125000"], "the tbf qdisc is not available (kernel module `sch_tbf`)"),
    ]
    try:
        for cmd, meaning in steps:
            try:
                _run(cmd)
            except NetnsError as e:
                if "Operation not permitted" in str(e):  # EPERM: a capability is missing, not a kernel feature
                    meaning = "this process lacks CAP_NET_ADMIN (or CAP_SYS_ADMIN), which --netns needs"
                raise NetnsUnavailable(f"{meaning}: {e}. {_WITHOUT}") from None
    finally:
        if netns_exists(probe):
            try:
                _run(["ip", "netns", "del", probe])
            except NetnsError as e:
                log.warning("could not delete probe namespace %s: %s", probe, e)


# -- the network -------------------------------------------------------------------------------


class NetnsNetwork:
    """Namespaces joined by a bridge in the root namespace, with tbf shaping and link cuts; a context manager that always cleans up."""

    def __init__(self, prefix: str = "lcn", subnet: str = DEFAULT_SUBNET) -> None:
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"netns prefix must be a letter then up to 6 letters, digits or _, got {prefix!r}")
        self.prefix = prefix
        self.requested_subnet = ipaddress.ip_network(subnet, strict=True)
        if not isinstance(self.requested_subnet, ipaddress.IPv4Network) or self.requested_subnet.prefixlen > 29:
            raise ValueError(f"subnet must be an IPv4 network of /29 or larger, got {subnet!r}")
        self.subnet: ipaddress.IPv4Network | None = None
        self.gateway: str | None = None  # the bridge's address: the hosts' default route
        self.id = prefix + "".join(secrets.choice(_TOKEN_CHARS) for _ in range(4))
        self.bridge = f"{self.id}br"
        self.hosts: dict[str, Host] = {}
        self.links: dict[str, LinkSpec] = {}
        self._made_links: list[str] = []  # root-namespace links to delete, in order
        self._made_netns: list[str] = []
        self._state_file = STATE_DIR / f"{self.id}.json"
        self._created = False

    # -- building --------------------------------------------------------------------------

    def create(self, names: list[str], links: dict[str, LinkSpec] | None = None) -> dict[str, Host]:
        """Build the bridge and one namespace per name; links: name -> caps (missing: uncapped). Returns name -> Host."""
        if self._created:
            raise UsageError("this NetnsNetwork was already created; make a new one")
        links = dict(links or {})
        self._validate(names, links)
        self._created = True
        try:
            with _locked():
                while any(n.startswith(self.id) for n in _root_links() + _netns_list()) or self._state_file.exists():
                    self.id = self.prefix + "".join(secrets.choice(_TOKEN_CHARS) for _ in range(4))
                    self.bridge, self._state_file = f"{self.id}br", STATE_DIR / f"{self.id}.json"
                self.subnet = self._choose_subnet()
                self.gateway = str(next(self.subnet.hosts()))
                self._write_state()
                _bridge_nf_off()
                self._make_bridge()
            addresses = list(self.subnet.hosts())[1:]
            for i, name in enumerate(names):
                self._make_host(i, name, str(addresses[i]), links.get(name, LinkSpec()))
            self._write_state()
        except BaseException:
            log.warning("building network %s failed; cleaning up", self.id)
            self.cleanup()
            raise
        log.info("network %s: bridge %s %s/%d, hosts %s", self.id, self.bridge, self.gateway, self.subnet.prefixlen,
                 {h.name: h.ip for h in self.hosts.values()})
        return dict(self.hosts)

    def _validate(self, names: list[str], links: dict[str, LinkSpec]) -> None:
        if not names:
            raise ValueError("create() needs at least one host name")
        if len(set(names)) != len(names):
            raise ValueError(f"host names must be unique: {names}")
        bad = [n for n in names if not _NAME_RE.fullmatch(n) or len(n) > 64]
        if bad:
            raise ValueError(f"host names may hold letters, digits, '_', '.', '-' (at most 64): {bad}")
        unknown = set(links) - set(names)
        if unknown:
            raise ValueError(f"links given for unknown hosts: {sorted(unknown)}")
        if len(names) > self.requested_subnet.num_addresses - 3:
            raise ValueError(f"{len(names)} hosts do not fit in {self.requested_subnet} (one address is the bridge's)")
        longest = f"{self.id}h{len(names) - 1}"
        if len(longest) > IFNAMSIZ:
            raise ValueError(f"interface name {longest!r} would exceed {IFNAMSIZ} characters: use a shorter prefix")

    def _choose_subnet(self) -> ipaddress.IPv4Network:
        """The requested subnet, or (for the default one) the first free /24 of 10.77.0.0/16 (call under the lock)."""
        used = _used_networks()
        for s in _states().values():
            if s.get("subnet") and _owner_alive(s):
                used.append(ipaddress.ip_network(s["subnet"]))
        candidates = [self.requested_subnet]
        if str(self.requested_subnet) == DEFAULT_SUBNET:
            candidates = list(ipaddress.ip_network("10.77.0.0/16").subnets(new_prefix=24))
        for c in candidates:
            clash = [u for u in used if u.overlaps(c)]
            if not clash:
                return c
        raise NetnsError(
            f"subnet {self.requested_subnet} overlaps {clash[0]} in the root namespace (another network or harness); "
            f"pass another subnet"
        )

    def _write_state(self) -> None:
        state = {
            "id": self.id,
            "pid": os.getpid(),
            "start": _start_time(os.getpid()),
            "subnet": str(self.subnet) if self.subnet else None,
            "bridge": self.bridge,
            "netns": list(self._made_netns),
            "links": list(self._made_links),
            "argv": sys.argv[:4],
        }
        STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self._state_file)

    def _make_bridge(self) -> None:
        _run(["ip", "link", "add", "name", self.bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0"])
        self._made_links.append(self.bridge)
        _disable_ipv6(self.bridge)
        _run(["ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge])
        _run(["ip", "link", "set", "dev", self.bridge, "up"])

    def _make_host(self, index: int, name: str, ip: str, spec: LinkSpec) -> None:
        host = Host(name, f"{self.id}-{name}", ip, f"{self.id}h{index}", f"{self.id}n{index}")
        _run(["ip", "netns", "add", host.netns])
        self._made_netns.append(host.netns)
        # New interfaces in the namespace get no IPv6 (lo keeps ::1).
        sysctl = shutil.which("sysctl")
        if sysctl:
            _run(["ip", "netns", "exec", host.netns, sysctl, "-qw", "net.ipv6.conf.default.disable_ipv6=1"])
        else:
            _run(["ip", "netns", "exec", host.netns, sys.executable, "-S", "-c",
                  "open('/proc/sys/net/ipv6/conf/default/disable_ipv6', 'w').write('1')"])
        _run(["ip", "-n", host.netns, "link", "set", "dev", "lo", "up"])
        _run(["ip", "link", "add", "name", host.veth_host, "type", "veth",
              "peer", "name", host.veth_ns, "netns", host.netns])
        self._made_links.append(host.veth_host)
        _disable_ipv6(host.veth_host)
        _run(["ip", "link", "set", "dev", host.veth_host, "master", self.bridge])
        _run(["ip", "link", "set", "dev", host.veth_host, "up"])
        _run(["ip", "-n", host.netns, "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", host.veth_ns])
        _run(["ip", "-n", host.netns, "link", "set", "dev", host.veth_ns, "up"])
        _run(["ip", "-n", host.netns, "route", "replace", "default", "via", self.gateway, "dev", host.veth_ns])
        self.hosts[name] = host
        self.set_link(name, spec)

    # -- using -------------------------------------------------------------------------------

    def _host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise KeyError(f"no host {name!r} in network {self.id} (hosts: {sorted(self.hosts)})") from None

    def exec_prefix(self, name: str) -> list[str]:
        """["ip", "netns", "exec", <namespace>]: prepend to a child's argv to run it inside host name."""
        return netns_exec(self._host(name).netns)

    def end_processes(self, name: str, wait_s: float = 10.0) -> list[int]:
        """SIGKILL whatever still runs in host name's namespace (daemons that left their parent's process group,
        e.g. torch_shm_manager) and wait up to wait_s for them to go; returns the pids it killed."""
        netns = self._host(name).netns
        try:
            pids = [int(p) for p in _run(["ip", "netns", "pids", netns]).stdout.split()]
        except NetnsError:
            return []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + wait_s
        # A zombie (dead, waiting for its parent to reap it) holds nothing open: it counts as gone.
        while time.monotonic() < deadline and any(process_start(pid) is not None for pid in pids):
            time.sleep(0.05)
        return pids

    def netns_of(self, name: str) -> str:
        """The network namespace of host name (a process started in it is that host)."""
        return self._host(name).netns

    def cut(self, name: str) -> None:
        """Take the host's link down (both veth ends): its traffic stops, its TCP connections stall."""
        h = self._host(name)
        _run(["ip", "-n", h.netns, "link", "set", "dev", h.veth_ns, "down"])
        _run(["ip", "link", "set", "dev", h.veth_host, "down"])
        log.info("cut %s (%s)", name, h.ip)

    def restore(self, name: str) -> None:
        """Bring the host's link back up after cut (the default route, dropped with the link, comes back too)."""
        h = self._host(name)
        _run(["ip", "link", "set", "dev", h.veth_host, "up"])
        _run(["ip", "-n", h.netns, "link", "set", "dev", h.veth_ns, "up"])
        _run(["ip", "-n", h.netns, "route", "replace", "default", "via", self.gateway, "dev", h.veth_ns])
        log.info("restored %s (%s)", name, h.ip)

    def subnet_only(self, name: str) -> None:
        """Drop the host's default route: it reaches the subnet's hosts only.

        A DNS server beyond the bridge then fails at once (no route) instead of timing out
        unanswered, which torch's store otherwise waits 10 s for on every reverse lookup.
        """
        h = self._host(name)
        _run(["ip", "-n", h.netns, "route", "del", "default"])

    def set_congestion_control(self, name: str, algorithms: tuple[str, ...] = LOSS_BASED_CONTROLS) -> str:
        """Make the first of algorithms the namespace may use its TCP congestion control; which one it set.

        NetnsError lists what this kernel allows when none of them can be set."""
        h = self._host(name)
        errors = []
        for algorithm in algorithms:
            try:
                _run(["ip", "netns", "exec", h.netns, "sysctl", "-qw", f"net.ipv4.tcp_congestion_control={algorithm}"])
            except NetnsError as exc:
                errors.append(f"{algorithm}: {exc.stderr.strip() or exc}")
                continue
            log.info("%s: TCP congestion control %s", name, algorithm)
            return algorithm
        allowed = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read_text().split()
        raise NetnsError(
            f"could not set any of {', '.join(algorithms)} as {name}'s TCP congestion control "
            f"({'; '.join(errors)}); this kernel allows {', '.join(allowed)}"
        )

    def set_link(self, name: str, spec: LinkSpec) -> None:
        """Set the host's caps now (replaces the qdiscs; None in spec removes that direction's cap)."""
        h = self._host(name)
        _tc_qdisc(h.netns, h.veth_ns, spec.up_bps)  # uplink: leaves the namespace
        _tc_qdisc(None, h.veth_host, spec.down_bps)  # downlink: leaves the bridge towards the namespace
        self.links[name] = spec
        log.debug("link %s: %s", name, spec)

    def link_stats(self, name: str) -> dict:
        """Counters of the host's namespace-side veth: bytes/packets sent (tx) and received (rx), drops, state."""
        h = self._host(name)
        link = _json(["ip", "-n", h.netns, "-s", "-j", "link", "show", "dev", h.veth_ns])[0]
        st = link.get("stats64") or link.get("stats") or {}
        rx, tx = st.get("rx", {}), st.get("tx", {})
        return {
            "tx_bytes": tx.get("bytes", 0),
            "tx_packets": tx.get("packets", 0),
            "rx_bytes": rx.get("bytes", 0),
            "rx_packets": rx.get("packets", 0),
            "tx_dropped": tx.get("dropped", 0),
            "rx_dropped": rx.get("dropped", 0),
            "up": "UP" in link.get("flags", []),
            "uplink_qdisc": _qdisc_stats(h.netns, h.veth_ns),
            "downlink_qdisc": _qdisc_stats(None, h.veth_host),
        }

    # -- tearing down ----------------------------------------------------------------------

    def cleanup(self) -> None:
        """Delete every namespace, veth and bridge this instance made; idempotent; never raises (logs)."""
        if not self._created:
            return
        for ifname in list(reversed(self._made_links)):
            try:
                if _link_exists(ifname):
                    _run(["ip", "link", "del", "dev", ifname])
                self._made_links.remove(ifname)
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                log.warning("cleanup of %s: could not delete link %s: %s", self.id, ifname, e)
        for netns in list(self._made_netns):
            try:
                if netns_exists(netns):
                    _warn_processes(netns)
                    _run(["ip", "netns", "del", netns])
                self._made_netns.remove(netns)
            except Exception as e:  # noqa: BLE001
                log.warning("cleanup of %s: could not delete namespace %s: %s", self.id, netns, e)
        if self._made_links or self._made_netns:
            return  # keep the state file: cleanup_leftovers finds the rest
        try:
            with _locked():
                self._state_file.unlink(missing_ok=True)
                _bridge_nf_restore_if_unused()
        except Exception as e:  # noqa: BLE001
            log.warning("cleanup of %s: %s", self.id, e)

    def __enter__(self) -> NetnsNetwork:  # noqa: PYI034 - no typing.Self on Python 3.10
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _warn_processes(netns: str) -> None:
    try:
        pids = _run(["ip", "netns", "pids", netns]).stdout.split()
    except NetnsError:
        return
    if pids:
        log.warning("processes %s still run in namespace %s; it lives on (without links) until they exit",
                    " ".join(pids), netns)


def cleanup_leftovers(prefix: str = "lcn") -> list[str]:
    """Delete namespaces and root-namespace links whose name starts with prefix; returns what it removed.

    Networks whose owner process is still alive (another harness) are spared, except this process's own.
    """
    if not prefix:
        raise ValueError("cleanup_leftovers needs a non-empty prefix")
    removed: list[str] = []
    with _locked():
        states = {i: s for i, s in _states().items() if i.startswith(prefix)}
        spared = tuple(i for i, s in states.items() if _owner_alive(s) and int(s["pid"]) != os.getpid())
        for name in _root_links():
            if name.startswith(prefix) and not name.startswith(spared) and _link_exists(name):
                try:
                    _run(["ip", "link", "del", "dev", name])
                    removed.append(name)
                except NetnsError as e:
                    if _link_exists(name):
                        log.warning("could not delete leftover link %s: %s", name, e)
        for netns in _netns_list():
            if netns.startswith(prefix) and not netns.startswith(spared):
                try:
                    _warn_processes(netns)
                    _run(["ip", "netns", "del", netns])
                    removed.append(netns)
                except NetnsError as e:
                    log.warning("could not delete leftover namespace %s: %s", netns, e)
        for i in states:
            if not i.startswith(spared):
                (STATE_DIR / f"{i}.json").unlink(missing_ok=True)
        _bridge_nf_restore_if_unused()
    if removed:
        log.info("removed leftovers of earlier networks: %s", " ".join(removed))
    if spared:
        log.info("spared networks of live processes: %s", " ".join(spared))
    return removed
