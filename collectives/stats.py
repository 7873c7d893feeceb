"""Counters of the data plane: bytes on the wire and time per phase of a round."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field


@dataclass
class TrafficCounters:
    """Bytes and messages a transport moved since it started, in total and per remote address."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    sent_to: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    received_from: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def count_sent(self, address: str, nbytes: int) -> None:
        """Record one message of nbytes sent to address."""
        self.bytes_sent += nbytes
        self.messages_sent += 1
        self.sent_to[address] += nbytes

    def count_received(self, sender: str, nbytes: int) -> None:
        """Record one message of nbytes received (sender: a rank or address label)."""
        self.bytes_received += nbytes
        self.messages_received += 1
        self.received_from[sender] += nbytes

    def snapshot(self) -> dict:
        """A plain-dict copy, safe to hand to another thread or serialise."""
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "messages_sent": self.messages_sent,
            "messages_received": self.messages_received,
            "sent_to": dict(self.sent_to),
            "received_from": dict(self.received_from),
        }


@dataclass
class RoundStats:
    """What one round of a collective cost, as seen by one member."""

    run_id: str
    epoch: int
    round_id: int
    group_size: int
    numel: int
    codec: str
    bytes_sent: int = 0
    bytes_received: int = 0
    encode_s: float = 0.0
    decode_s: float = 0.0
    reduce_s: float = 0.0
    scatter_s: float = 0.0
    gather_s: float = 0.0
    wall_s: float = 0.0
    # The rank whose data arrived last here (-1: fewer than two senders), and how long after every other's: whom
    # the round waited for (a slow link's peer stretches every round it is in).
    waited_for_rank: int = -1
    waited_s: float = 0.0

    def as_dict(self) -> dict:
        """Plain dict for JSON output and metric reports."""
        return asdict(self)
