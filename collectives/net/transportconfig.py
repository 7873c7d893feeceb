"""A peer's transport settings: where it listens and how it moves bytes (``TransportConfig``).

The typed config that ``loconet peer``'s network options are built from, its checks, and what follows from it:
the gRPC message limit a chunk needs (``message_bound``), the settings of the peer's servers and channels
(``rpc_settings``) and the caps its handlers enforce (``admission_limits``). ``codec_threads_for`` picks the
codec threads for peers that share a machine's cores. The running endpoint is ``collectives.net.transport``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from collectives.errors import ConfigError
from collectives.net.addresses import LOCAL_HOST, MAX_PORT, parse_advertise
from collectives.net.admission import AdmissionLimits
from collectives.net.ratelimit import format_bandwidth, parse_bandwidth
from collectives.net.rpc import DEFAULT_KEEPALIVE_S, DEFAULT_MESSAGE_BYTES, RpcSecurity, RpcSettings

# Room for a chunk's header next to its payload inside one gRPC message.
HEADER_SLACK_BYTES = 64 * 1024


def message_bound(chunk_bytes: int) -> int:
    """Largest gRPC message a chunk of chunk_bytes raw payload can become (zstd's worst case, header)."""
    return chunk_bytes + chunk_bytes // 64 + HEADER_SLACK_BYTES


@dataclass(frozen=True)
class TransportConfig:
    """Where a peer listens and how it moves bytes."""

    # Loopback unless the user asks for more (never all interfaces by default).
    host: str = field(
        default=LOCAL_HOST, metadata={"help": "interface this peer's data-plane server binds (0.0.0.0: all)"}
    )
    port: int = field(default=0, metadata={"help": "data-plane port (0: any free port)"})
    advertise: str | None = field(
        default=None,
        metadata={
            "help": "HOST[:PORT] other peers reach this one at (HOST alone: the bound port); "
            "without it, --host, or with --host 0.0.0.0 this machine's address on its route to the coordinator"
        },
    )
    # The host this peer runs on: members of a round with one host id reduce through shared memory and one of
    # them takes the host into the all-reduce (collectives/hosts/round.py). "auto": the processes that can share
    # /dev/shm (collectives.hosts.identity.detect_host_id); a distinct value per peer keeps every peer on its own.
    host_id: str = field(
        default="auto",
        metadata={"help": "host this peer runs on: peers with one id reduce through shared memory first "
                  "(auto: detected; give each peer its own id to keep them apart)"},
    )
    # Largest payload per streamed message; parts are cut into chunks of this size.
    chunk_bytes: int = field(default=1 << 20, metadata={"cli": False})
    # gRPC send/receive limit per message (None: 4 MiB, or what chunk_bytes needs if more).
    # Every peer of a run must accept the chunks the others send.
    max_message_bytes: int | None = field(default=None, metadata={"cli": False})
    # Cap on bytes sent and, separately, bytes received, in bits per second (None: no cap).
    bandwidth_bps: float | None = field(
        default=None,
        metadata={
            "help": "cap this peer's send and receive rate, e.g. 100mbit",
            "flag": "bandwidth",
            "parse": parse_bandwidth,
            "format": format_bandwidth,
        },
    )
    # Caps on the calls this peer's handlers serve at once, so other peers cannot make it hold
    # unbounded state; a call beyond them is refused at once (RESOURCE_EXHAUSTED, retried by a
    # sender within its deadline). The health service is outside them and always answers.
    # A legitimate round never reaches them: per round a member takes from each other member one
    # scatter and one gather stream, a statistic share per statistic round (Krum: 1, Bulyan: 2) and
    # at most one abort notice, i.e. at most 5 calls; a peer has at most 2-3 rounds in flight at once
    # (a fast member opens round r+1 while a slow one ends r; streaming DiLoCo keeps one fragment's
    # round in flight), plus a state fetch. That is about 16 per connection: 64 leaves 4x headroom.
    # In total: 2 streams x 3 rounds x members, so 1024 holds groups of about 170 members.
    max_calls_per_client: int = field(default=64, metadata={"cli": False})
    max_concurrent_rpcs: int = field(default=1024, metadata={"cli": False})
    # Longest a stream or share for a round this member has not opened waits for it before it is
    # refused as retryable (the sender retries until its own deadline): a slow member opening
    # late still gets its data, while a stream for a round that never opens holds a slot seconds,
    # not the round's deadline.
    open_wait_s: float = field(default=5.0, metadata={"cli": False})
    # A client stream that sends no first message within this is closed. Senders produce and pace
    # their first message before opening a stream, so this only covers one message's transit:
    # 1 MiB at 20 mbit takes 0.4 s alone, ~3 s behind 7 parallel streams on one uplink.
    first_message_timeout_s: float = field(default=10.0, metadata={"cli": False})
    # HTTP/2 keepalive ping interval; a peer that stops answering loses its connection.
    keepalive_s: float = field(default=DEFAULT_KEEPALIVE_S, metadata={"cli": False})
    # Threads that encode and decode payloads off the event loop (torch and numpy release the GIL),
    # so the loop keeps every stream moving while chunks are being (de)quantized. 0 runs that
    # work on the loop itself: better when peer processes share the cores (a local harness or
    # benchmark with more peers than cores) and nothing else limits the round, where the processes
    # are the parallelism and extra threads only queue for the GIL; see codec_threads_for.
    codec_threads: int = field(
        default=2,
        metadata={
            "help": "threads that encode and decode off the event loop; 0 when peers on this machine fill its cores"
        },
    )
    security: RpcSecurity = field(
        default=RpcSecurity(),
        metadata={"help": "TLS and the run secret of the peer's servers and channels", "flatten": True},
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= MAX_PORT:
            raise ConfigError(f"port must be in 0..{MAX_PORT}, got {self.port}")
        if self.advertise is not None:
            parse_advertise(self.advertise)
        if self.chunk_bytes < 1024:
            raise ConfigError(f"chunk_bytes must be at least 1024, got {self.chunk_bytes}")
        if not self.host_id or len(self.host_id) > 128 or not self.host_id.isprintable():
            raise ConfigError(f"--host-id must be 1-128 printable characters (or auto), got {self.host_id!r}")
        if self.max_message_bytes is not None and self.max_message_bytes < message_bound(self.chunk_bytes):
            raise ConfigError(
                f"max_message_bytes ({self.max_message_bytes}) must exceed chunk_bytes ({self.chunk_bytes}) "
                f"by at least {message_bound(self.chunk_bytes) - self.chunk_bytes}; raise it or lower chunk_bytes"
            )
        if self.bandwidth_bps is not None and self.bandwidth_bps <= 0:
            raise ConfigError(f"bandwidth must be positive, got {self.bandwidth_bps} bit/s")
        if self.codec_threads < 0:
            raise ConfigError(f"codec_threads must be 0 (on the event loop) or more, got {self.codec_threads}")
        if not self.open_wait_s > 0:
            raise ConfigError(f"open_wait_s must be positive, got {self.open_wait_s}")
        self.admission_limits()  # checks the caps and the first-message timeout

    @property
    def message_limit(self) -> int:
        """The effective gRPC message size limit in bytes."""
        if self.max_message_bytes is not None:
            return self.max_message_bytes
        return max(DEFAULT_MESSAGE_BYTES, message_bound(self.chunk_bytes))

    def rpc_settings(self) -> RpcSettings:
        """The settings of this peer's gRPC server and channels (collectives.net.rpc)."""
        return RpcSettings(
            max_receive_bytes=self.message_limit,
            max_send_bytes=self.message_limit,
            keepalive_s=self.keepalive_s,
            # No server-wide gRPC cap: it would shed health checks too. Our handlers enforce
            # admission_limits(); this per-connection HTTP/2 bound only backs them for calls that
            # never reach a handler (a unary call whose request never comes).
            max_concurrent_rpcs=None,
            max_streams_per_connection=4 * self.max_calls_per_client,
            security=self.security,
        )

    def admission_limits(self) -> AdmissionLimits:
        """The caps this peer's handlers enforce (collectives.net.admission)."""
        return AdmissionLimits(
            per_client=self.max_calls_per_client,
            total=self.max_concurrent_rpcs,
            first_message_timeout_s=self.first_message_timeout_s,
        )


def codec_threads_for(peer_processes: int, cores: int | None = None, link_limited: bool = False) -> int:
    """Codec threads for each of peer_processes peers sharing this machine's cores: fewer once they fill the cores.

    Then 0 (the codec on the event loop) when the CPU sets the round time; 1 when capped links do
    (``link_limited``): the C codec loops release the GIL, so one thread lets a peer quantise the next
    chunk while its loop feeds gRPC, which is worth more there than the hand-off (BENCHMARKS.md).
    """
    cores = cores or os.cpu_count() or 1
    if peer_processes < cores:
        return TransportConfig.codec_threads
    return 1 if link_limited else 0
