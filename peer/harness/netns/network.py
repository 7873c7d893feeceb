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

Each host's link is shaped by peer/harness/netns/shaping.py (tbf caps, TCP
congestion control); every network records itself in this machine's registry
(peer/harness/netns/registry.py), which ``cleanup_leftovers`` reads. Nothing
else on the host changes: IPv6 is switched off per interface (no DAD, router
solicitations or MLD noise on the links), and namespaces cannot reach beyond
the bridge (the root namespace does not forward).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from collectives.errors import UsageError
from collectives.hosts.identity import process_start
from peer.harness.netns.commands import (
    NetnsError,
    disable_ipv6,
    link_exists,
    netns_exec,
    netns_exists,
    netns_list,
    qdisc_stats,
    root_links,
    run,
    run_json,
    tc_qdisc,
    warn_processes,
)
from peer.harness.netns.registry import (
    STATE_DIR,
    bridge_nf_off,
    bridge_nf_restore_if_unused,
    locked,
    start_time,
    used_subnets,
)
from peer.harness.netns.shaping import LOSS_BASED_CONTROLS, LinkSpec

log = logging.getLogger(__name__)

DEFAULT_SUBNET = "10.77.0.0/24"
IFNAMSIZ = 15  # longest interface name (IFNAMSIZ - 1 for the NUL)

_PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,6}")
_NAME_RE = re.compile(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*")
_TOKEN_CHARS = string.ascii_lowercase + string.digits


@dataclass(frozen=True)
class Host:
    """One namespace of the network."""

    name: str  # logical name ("coordinator", "peer0", ...)
    netns: str  # the namespace name (with the prefix)
    ip: str  # its address on the bridge subnet
    veth_host: str  # the veth end in the root namespace (a bridge port)
    veth_ns: str  # the veth end inside the namespace


class NetnsNetwork:
    """Namespaces joined by a bridge in the root namespace, with tbf shaping and link cuts; a context manager that
    always cleans up."""

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
        """Build the bridge and one namespace per name; links: name -> caps (missing: uncapped).

        Returns name -> Host."""
        if self._created:
            raise UsageError("this NetnsNetwork was already created; make a new one")
        links = dict(links or {})
        self._validate(names, links)
        self._created = True
        try:
            with locked():
                while any(n.startswith(self.id) for n in root_links() + netns_list()) or self._state_file.exists():
                    self.id = self.prefix + "".join(secrets.choice(_TOKEN_CHARS) for _ in range(4))
                    self.bridge, self._state_file = f"{self.id}br", STATE_DIR / f"{self.id}.json"
                self.subnet = self._choose_subnet()
                self.gateway = str(next(self.subnet.hosts()))
                self._write_state()
                bridge_nf_off()
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
        used = used_subnets()
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
            "start": start_time(os.getpid()),
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
        run(["ip", "link", "add", "name", self.bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0"])
        self._made_links.append(self.bridge)
        disable_ipv6(self.bridge)
        run(["ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge])
        run(["ip", "link", "set", "dev", self.bridge, "up"])

    def _make_host(self, index: int, name: str, ip: str, spec: LinkSpec) -> None:
        host = Host(name, f"{self.id}-{name}", ip, f"{self.id}h{index}", f"{self.id}n{index}")
        run(["ip", "netns", "add", host.netns])
        self._made_netns.append(host.netns)
        # New interfaces in the namespace get no IPv6 (lo keeps ::1).
        sysctl = shutil.which("sysctl")
        if sysctl:
            run(["ip", "netns", "exec", host.netns, sysctl, "-qw", "net.ipv6.conf.default.disable_ipv6=1"])
        else:
            run(["ip", "netns", "exec", host.netns, sys.executable, "-S", "-c",
                 "open('/proc/sys/net/ipv6/conf/default/disable_ipv6', 'w').write('1')"])
        run(["ip", "-n", host.netns, "link", "set", "dev", "lo", "up"])
        run(["ip", "link", "add", "name", host.veth_host, "type", "veth",
             "peer", "name", host.veth_ns, "netns", host.netns])
        self._made_links.append(host.veth_host)
        disable_ipv6(host.veth_host)
        run(["ip", "link", "set", "dev", host.veth_host, "master", self.bridge])
        run(["ip", "link", "set", "dev", host.veth_host, "up"])
        run(["ip", "-n", host.netns, "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", host.veth_ns])
        run(["ip", "-n", host.netns, "link", "set", "dev", host.veth_ns, "up"])
        run(["ip", "-n", host.netns, "route", "replace", "default", "via", self.gateway, "dev", host.veth_ns])
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
            pids = [int(p) for p in run(["ip", "netns", "pids", netns]).stdout.split()]
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
        run(["ip", "-n", h.netns, "link", "set", "dev", h.veth_ns, "down"])
        run(["ip", "link", "set", "dev", h.veth_host, "down"])
        log.info("cut %s (%s)", name, h.ip)

    def restore(self, name: str) -> None:
        """Bring the host's link back up after cut (the default route, dropped with the link, comes back too)."""
        h = self._host(name)
        run(["ip", "link", "set", "dev", h.veth_host, "up"])
        run(["ip", "-n", h.netns, "link", "set", "dev", h.veth_ns, "up"])
        run(["ip", "-n", h.netns, "route", "replace", "default", "via", self.gateway, "dev", h.veth_ns])
        log.info("restored %s (%s)", name, h.ip)

    def subnet_only(self, name: str) -> None:
        """Drop the host's default route: it reaches the subnet's hosts only.

        A DNS server beyond the bridge then fails at once (no route) instead of timing out
        unanswered, which torch's store otherwise waits 10 s for on every reverse lookup.
        """
        h = self._host(name)
        run(["ip", "-n", h.netns, "route", "del", "default"])

    def set_congestion_control(self, name: str, algorithms: tuple[str, ...] = LOSS_BASED_CONTROLS) -> str:
        """Make the first of algorithms the namespace may use its TCP congestion control; which one it set.

        NetnsError lists what this kernel allows when none of them can be set."""
        h = self._host(name)
        errors = []
        for algorithm in algorithms:
            try:
                run(["ip", "netns", "exec", h.netns, "sysctl", "-qw", f"net.ipv4.tcp_congestion_control={algorithm}"])
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
        tc_qdisc(h.netns, h.veth_ns, spec.up_bps)  # uplink: leaves the namespace
        tc_qdisc(None, h.veth_host, spec.down_bps)  # downlink: leaves the bridge towards the namespace
        self.links[name] = spec
        log.debug("link %s: %s", name, spec)

    def link_stats(self, name: str) -> dict:
        """Counters of the host's namespace-side veth: bytes/packets sent (tx) and received (rx), drops, state."""
        h = self._host(name)
        link = run_json(["ip", "-n", h.netns, "-s", "-j", "link", "show", "dev", h.veth_ns])[0]
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
            "uplink_qdisc": qdisc_stats(h.netns, h.veth_ns),
            "downlink_qdisc": qdisc_stats(None, h.veth_host),
        }

    # -- tearing down ----------------------------------------------------------------------

    def cleanup(self) -> None:
        """Delete every namespace, veth and bridge this instance made; idempotent; never raises (logs)."""
        if not self._created:
            return
        for ifname in list(reversed(self._made_links)):
            try:
                if link_exists(ifname):
                    run(["ip", "link", "del", "dev", ifname])
                self._made_links.remove(ifname)
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                log.warning("cleanup of %s: could not delete link %s: %s", self.id, ifname, e)
        for netns in list(self._made_netns):
            try:
                if netns_exists(netns):
                    warn_processes(netns)
                    run(["ip", "netns", "del", netns])
                self._made_netns.remove(netns)
            except Exception as e:  # noqa: BLE001
                log.warning("cleanup of %s: could not delete namespace %s: %s", self.id, netns, e)
        if self._made_links or self._made_netns:
            return  # keep the state file: cleanup_leftovers finds the rest
        try:
            with locked():
                self._state_file.unlink(missing_ok=True)
                bridge_nf_restore_if_unused()
        except Exception as e:  # noqa: BLE001
            log.warning("cleanup of %s: %s", self.id, e)

    def __enter__(self) -> NetnsNetwork:  # noqa: PYI034 - no typing.Self on Python 3.10
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
