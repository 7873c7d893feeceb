"""Network namespaces with capped links for a benchmark's processes (``--netns``, ``--bandwidth``).

Each named host gets its own namespace on one bridge (``peer/harness/netns/network.py``); the capped ones sit behind
``tbf`` on their uplink and downlink alike. Every namespace runs the same TCP congestion control, a loss-based one
unless asked otherwise (this kernel lets no namespace pick cubic, Linux's default; reno is its loss-based
neighbour), so every method a benchmark compares meets the same links.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from peer.bench.progress import Progress
from peer.harness.loopback import LOOPBACK
from peer.harness.netns.network import NetnsNetwork
from peer.harness.netns.registry import cleanup_leftovers
from peer.harness.netns.shaping import LOSS_BASED_CONTROLS, LinkSpec
from peer.harness.procgroup import Placement

# The namespaces' prefix: cleanup_leftovers removes what a killed benchmark or harness left under it.
PREFIX = "lcn"


@dataclass(frozen=True)
class CappedNetwork:
    """A benchmark's namespaces: the network (see NetnsNetwork) and the congestion control they run."""

    network: NetnsNetwork
    congestion_control: str

    def netns(self, name: str) -> str:
        """The namespace host name's processes run in."""
        return self.network.netns_of(name)

    def ip(self, name: str) -> str:
        """Host name's address on the bridge."""
        return self.network.hosts[name].ip

    def interface(self, name: str) -> str:
        """Host name's one network interface (gloo is told to use it)."""
        return self.network.hosts[name].veth_ns

    def placement(self, name: str) -> Placement:
        """Where a process of host name lives: its namespace, address and interface."""
        return Placement(netns=self.netns(name), ip=self.ip(name), interface=self.interface(name))

    def exec_prefix(self, name: str) -> list[str]:
        """The argv prefix that runs a command in host name's namespace (``ip netns exec ...``)."""
        return self.network.exec_prefix(name)

    def end_processes(self, name: str) -> None:
        """Kill what still runs in host name's namespace (a daemon that outlived the process that started it)."""
        self.network.end_processes(name)

    def tx_bytes(self, names: Sequence[str]) -> list[int]:
        """The bytes each of names has sent over its link so far (its veth's counter: what crossed the cap)."""
        return [self.network.link_stats(name)["tx_bytes"] for name in names]

    @property
    def gateway(self) -> str:
        """The bridge's address: where a process of the root namespace serves every host."""
        return self.network.gateway


def peer_names(peers: int) -> list[str]:
    """The hosts of ranks 0, 1, ... in a benchmark's namespaces: peer0, peer1, ..."""
    return [f"peer{rank}" for rank in range(peers)]


@contextlib.contextmanager
def on_hosts(capped: CappedNetwork | None, names: Sequence[str]) -> Iterator[tuple[list[list[str]], list[str]]]:
    """For one command per host of names: the argv prefix that runs it there and the address it serves on (none
    and 127.0.0.1 without namespaces). On exit, whatever outlived its command in a namespace is killed (a daemon
    such as hivemind's p2pd or torch's shared-memory manager leaves its parent's process group)."""
    if capped is None:
        yield [[] for _ in names], [LOOPBACK] * len(names)
        return
    try:
        yield [capped.exec_prefix(n) for n in names], [capped.ip(n) for n in names]
    finally:
        for name in names:
            capped.end_processes(name)


@contextlib.contextmanager
def link_traffic(capped: CappedNetwork | None, names: Sequence[str]) -> Iterator[list[int]]:
    """The bytes each of names sent over its link during the block, in the list yielded (filled on leaving it;
    empty without namespaces)."""
    sent: list[int] = []
    before = capped.tx_bytes(names) if capped is not None else []
    yield sent
    if capped is not None:
        sent.extend(b - a for a, b in zip(before, capped.tx_bytes(names), strict=True))


@contextlib.contextmanager
def capped_network(
    names: Sequence[str], capped: Sequence[str], bandwidth_bps: float | None, progress: Progress,
    congestion_control: str | None = None, subnet_only: bool = False,
) -> Iterator[CappedNetwork]:
    """One namespace per name, the links of capped at bandwidth_bps both ways (None: uncapped), TCP with
    congestion_control (None: a loss-based one); subnet_only: no route beyond the bridge. Removed on exit."""
    cleanup_leftovers(PREFIX)  # what a killed harness or benchmark left behind
    progress.begin(f"building {len(names)} network namespaces")
    with NetnsNetwork(prefix=PREFIX) as network:
        network.create(list(names), {n: LinkSpec(bandwidth_bps, bandwidth_bps) for n in capped})
        algorithms = (congestion_control,) if congestion_control else LOSS_BASED_CONTROLS
        used = ""
        for name in names:
            if subnet_only:
                network.subnet_only(name)
            # The first of algorithms the kernel allows: one kernel, so the same in every namespace.
            used = network.set_congestion_control(name, algorithms)
        progress.end()
        yield CappedNetwork(network, used)
