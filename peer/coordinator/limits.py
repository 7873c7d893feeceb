"""Per-client rate limits on the coordinator's calls: a bounded token-bucket table and a gRPC interceptor.

An outsider who can reach the coordinator could otherwise make it do unbounded
work (100,000 Joins in 32 s grew it to 438 MB). Every call is charged to its
client's address, in one of two classes with separate buckets:

- ``Join``: the expensive one (a new peer record, perhaps a state lookup), and rare
  for a real peer (once at start, again after a lease lapse): a few per second;
- every other coordinator call (Heartbeat, Quorum, Commit, Leave, Status): generous,
  since each live peer heartbeats every interval and asks for a quorum every round.

The standard health service is never limited: probes (Kubernetes, the peers'
failure detector) must see a busy coordinator as alive. A call over its limit is
refused with ``RESOURCE_EXHAUSTED`` before its handler runs, its message naming the
limit, and counted by method (``counts()``, for the metrics).

Why the client's address and not a peer id: the address is the one thing a caller
cannot choose freely. A peer id in the request or its metadata is whatever the
caller writes, and with a bounded table a caller that writes a fresh id on every
call would get a fresh bucket every time, which is no limit at all. IPv6 clients
are charged per ``/ipv6_prefix`` network (one host usually holds a whole /64).
Many peers behind one address (a benchmark's simulated peers on loopback, a NAT)
need a trusted network in ``exempt``, or higher rates.

The table is bounded (``max_clients_tracked``, least recently seen forgotten first),
so many clients cannot grow it without bound; a forgotten client starts again with a
full burst, which is what a client idle that long would have anyway.
"""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import time
import urllib.parse
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

import grpc

from collectives.errors import ConfigError
from collectives.membership.coordinatorerrors import RATE_LIMITED
from collectives.membership.session import RETRY_AFTER_MS, SESSIONS_FULL
from protos import membership_pb2 as pb

COORDINATOR_SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
HEALTH_PREFIX = "/grpc.health.v1.Health/"
# A refusal's message begins with RATE_LIMITED and its trailing metadata RETRY_AFTER_MS says when a token is next
# available (collectives.membership.client and collectives.membership.session, whose clients read them), so a client can
# tell a rate limit from an oversized message (also RESOURCE_EXHAUSTED) and back off.

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_UNSEEN = object()


def _option(name: str) -> str:
    """The command-line option of a CoordinatorLimits field, for error messages (its flag when flattened)."""
    found = next(f for f in dataclasses.fields(CoordinatorLimits) if f.name == name)
    return "--" + found.metadata.get("flag", name.replace("_", "-"))


def _networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Comma-separated networks (CIDR, or a single address) from the command line."""
    networks = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(
                f"{_option('exempt')}: {part!r} is not an address or a CIDR network; write e.g. 127.0.0.0/8,::1"
            ) from None
    return tuple(networks)


@dataclass(frozen=True)
class CoordinatorLimits:
    """What one client address may cost the coordinator (the bound on peers is CoordinatorConfig.max_peers)."""

    join_rate_per_s: float | None = field(
        default=5.0,
        metadata={"help": "Join calls per second one client address may make (none: no limit)", "flag": "join-rate"},
    )
    join_burst: int = field(default=20, metadata={"help": "Join calls one client address may make at once"})
    call_rate_per_s: float | None = field(
        default=100.0,
        metadata={"help": "other coordinator calls (heartbeats, quorums, commits, status) per second one client "
                  "address may make (none: no limit)", "flag": "call-rate"},
    )
    call_burst: int = field(
        default=500, metadata={"help": "other coordinator calls one client address may make at once"}
    )
    sessions_per_client: int | None = field(
        default=256,
        metadata={"help": "Session streams one client address may hold open at once: a peer holds one, and peers "
                  "behind one NAT share an address (none: no limit)"},
    )
    max_clients_tracked: int = field(
        default=20_000,
        metadata={"help": "client addresses whose call rates are remembered (the least recently seen are forgotten)",
                  "flag": "rate-limit-clients"},
    )
    exempt: str = field(
        default="",
        metadata={"help": "comma-separated networks whose clients are not rate limited, e.g. 127.0.0.0/8,::1 for "
                  "many simulated peers on this machine (empty: none)", "flag": "rate-limit-exempt"},
    )
    ipv6_prefix: int = field(
        default=64,
        metadata={"help": "IPv6 clients are rate limited per network of this prefix length (128: per address)",
                  "flag": "rate-limit-ipv6-prefix"},
    )

    def __post_init__(self) -> None:
        for name in ("join_rate_per_s", "call_rate_per_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{_option(name)} must be positive (or none for no limit), got {value}")
        for name in ("join_burst", "call_burst", "max_clients_tracked", "sessions_per_client"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{_option(name)} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.ipv6_prefix <= 128:
            raise ConfigError(f"{_option('ipv6_prefix')} must be between 0 and 128, got {self.ipv6_prefix}")
        self.exempt_networks  # noqa: B018 - raises ConfigError for a malformed network

    @property
    def exempt_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """The networks ``exempt`` names."""
        return _networks(self.exempt)


class RateLimiter:
    """Token buckets per key: each key may spend ``burst`` at once, refilled at ``rate_per_s``.

    Holds at most ``max_keys`` keys; a new key beyond that evicts the least recently
    used. Pure apart from ``clock`` (injected for tests). Not thread-safe: one event loop.
    """

    def __init__(self, rate_per_s: float, burst: int, max_keys: int, clock: Callable[[], float] = time.monotonic):
        if not rate_per_s > 0 or burst < 1 or max_keys < 1:
            raise ConfigError(f"a rate limiter needs rate > 0, burst >= 1, max_keys >= 1; got {rate_per_s}, "
                              f"{burst}, {max_keys}")
        self.rate = float(rate_per_s)
        self.burst = float(burst)
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (tokens, as of)

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, key: Hashable) -> float:
        """Spend one of key's tokens: 0.0 if there was one; else seconds until there is (nothing spent)."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
            tokens = self.burst
        else:
            self._buckets.move_to_end(key)
            tokens, then = bucket
            tokens = min(self.burst, tokens + max(0.0, now - then) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


def client_address(peer: str) -> Address | None:
    """The IP address in a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:%5B::1%5D:5``); None for other kinds."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = urllib.parse.unquote(rest).rpartition(":")[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d
    return address


def client_key(peer: str, ipv6_prefix: int = 64) -> str:
    """What a caller is charged as: its IPv4 address, its IPv6 network, or the peer string's kind (unix...)."""
    address = client_address(peer)
    if address is None:
        return peer.partition(":")[0]
    if isinstance(address, ipaddress.IPv6Address) and ipv6_prefix < 128:
        return str(ipaddress.ip_network(f"{address}/{ipv6_prefix}", strict=False))
    return str(address)


Admit = Callable[[grpc.aio.ServicerContext], Awaitable[None]]


def _guarded(handler: grpc.RpcMethodHandler, admit: Admit) -> grpc.RpcMethodHandler:
    """handler with admit(context) awaited before its behaviour (asyncio behaviours, as loconet's servers have)."""
    streaming = (handler.request_streaming, handler.response_streaming)
    behavior = {
        (False, False): handler.unary_unary, (False, True): handler.unary_stream,
        (True, False): handler.stream_unary, (True, True): handler.stream_stream,
    }[streaming]
    if not handler.response_streaming:

        async def guarded(request, context):
            await admit(context)
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result

    elif inspect.iscoroutinefunction(behavior):  # writes its responses with context.write

        async def guarded(request, context):
            await admit(context)
            await behavior(request, context)

    else:

        async def guarded(request, context):
            await admit(context)
            responses = behavior(request, context)
            if hasattr(responses, "__aiter__"):
                async for response in responses:
                    yield response
            else:
                for response in responses:
                    yield response

    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler,
    }[streaming]
    return factory(
        guarded, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class RateLimitInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a client's coordinator calls beyond its rate with RESOURCE_EXHAUSTED; counts refusals by method.

    The interceptor sees only the method and the metadata; the client's address is
    on the call's context, so the check runs first in the handler's behaviour (before
    the request is used), and the health service's handlers are returned untouched.
    """

    def __init__(
        self, limits: CoordinatorLimits, service: str = COORDINATOR_SERVICE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self._join_method = f"/{service}/Join"
        self._exempt = limits.exempt_networks
        self._join = self._limiter(limits.join_rate_per_s, limits.join_burst, clock)
        self._call = self._limiter(limits.call_rate_per_s, limits.call_burst, clock)
        self._refused: Counter[str] = Counter()
        # Client key by the peer string without its port (None: exempt), so parsing happens once per
        # client address, not per call; bounded like the rate tables (oldest first out).
        self._keys: dict[str, str | None] = {}
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        # Session streams open per client key: an entry lives while its client holds one, so the table is bounded
        # by the streams gRPC lets in.
        self._sessions: Counter[str] = Counter()

    def _limiter(self, rate: float | None, burst: int, clock: Callable[[], float]) -> RateLimiter | None:
        return None if rate is None else RateLimiter(rate, burst, self.limits.max_clients_tracked, clock)

    def counts(self) -> dict[str, int]:
        """Calls refused so far, by method name (e.g. {"Join": 12}); methods never refused are absent."""
        return dict(self._refused)

    def tracked_clients(self) -> int:
        """Client keys remembered now (both classes): bounded by twice max_clients_tracked. Used by tests to check
        that bound (a flood of client addresses must not grow the coordinator's memory)."""
        return sum(len(lim) for lim in (self._join, self._call) if lim is not None)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The method's handler, guarded by its class's limit (the health service's and unknown ones as they are)."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        limiter = self._join if method == self._join_method else self._call
        if limiter is None:
            return handler
        # Wrap each method's handler once; only methods with a handler get here, so this stays small.
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _guarded(handler, self._admission(method.rpartition("/")[2], limiter))
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _client(self, peer: str) -> str | None:
        """The key a call from peer (``context.peer()``) is charged to; None if its network is exempt."""
        host = peer.rpartition(":")[0]
        key = self._keys.get(host, _UNSEEN)
        if key is _UNSEEN:
            address = client_address(peer)
            exempt = address is not None and any(address in network for network in self._exempt)
            key = None if exempt else client_key(peer, self.limits.ipv6_prefix)
            if len(self._keys) >= self.limits.max_clients_tracked:
                del self._keys[next(iter(self._keys))]
            self._keys[host] = key
        return key

    def limit_text(self, limiter: RateLimiter) -> str:
        """How a refusal by limiter begins: RATE_LIMITED, then the limit."""
        calls = "Join calls" if limiter is self._join else "coordinator calls other than Join"
        rate = f"{limiter.rate:g} {calls} per second"
        return f"{RATE_LIMITED}: this coordinator allows {rate} (bursts of {limiter.burst:g}) per client address"

    def charge(self, peer: str, name: str) -> tuple[float, str]:
        """Charge one call named name (not Join) from peer (``context.peer()``): (0.0, "") if it may go on, else
        (seconds until it may, the refusal's message), counted as refused. A Session stream's messages are
        charged here one by one, as their own calls would be."""
        return (0.0, "") if self._call is None else self._spend(self._call, peer, name)

    def open_session(self, peer: str) -> str:
        """Count a Session stream from peer (``context.peer()``) as open: "" if it may stay, else the refusal's
        message (then it is not counted). Every "" is matched by one ``close_session``."""
        cap = self.limits.sessions_per_client
        client = self._client(peer)
        if cap is None or client is None:
            return ""
        if self._sessions[client] >= cap:
            self._refused["Session"] += 1
            return (f"{SESSIONS_FULL}: this coordinator allows {cap} open Session streams per client address "
                    "(a peer needs one); close the others, or raise --sessions-per-client for peers behind one NAT")
        self._sessions[client] += 1
        return ""

    def close_session(self, peer: str) -> None:
        """A Session stream open_session let in has ended."""
        client = self._client(peer)
        if self.limits.sessions_per_client is None or client is None or not self._sessions[client]:
            return
        self._sessions[client] -= 1
        if not self._sessions[client]:
            del self._sessions[client]

    def open_sessions(self) -> int:
        """Session streams counted as open now (exempt clients' are not counted). Used by tests to check that every
        stream let in is counted out when it ends."""
        return sum(self._sessions.values())

    def _spend(self, limiter: RateLimiter, peer: str, name: str) -> tuple[float, str]:
        client = self._client(peer)
        if client is None:
            return 0.0, ""
        wait_s = limiter.acquire(client)
        if wait_s <= 0:
            return 0.0, ""
        self._refused[name] += 1
        return wait_s, f"{self.limit_text(limiter)}; retry in {wait_s:.2f} s"

    def _admission(self, name: str, limiter: RateLimiter) -> Admit:
        async def admit(context: grpc.aio.ServicerContext) -> None:
            wait_s, why = self._spend(limiter, context.peer(), name)
            if wait_s > 0:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, why,
                    trailing_metadata=((RETRY_AFTER_MS, str(retry_after_ms(wait_s))),),
                )

        return admit


def retry_after_ms(wait_s: float) -> int:
    """RETRY_AFTER_MS's value for a wait of wait_s seconds (at least 1 ms)."""
    return max(1, round(wait_s * 1000))
