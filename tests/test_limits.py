"""Per-client rate limits on the coordinator: the token-bucket table, and the interceptor on a real gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from collectives.errors import ConfigError
from peer.coordinator.limits import (
    COORDINATOR_SERVICE,
    RETRY_AFTER_MS,
    CoordinatorLimits,
    RateLimiter,
    RateLimitInterceptor,
    client_key,
)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(limiter: RateLimiter, clock: Clock, calls: list[tuple[float, str]]) -> list[float]:
    """acquire(key) at each (time, key); the waits it answers (0.0: allowed)."""
    out = []
    for at, key in calls:
        clock.now = at
        out.append(limiter.acquire(key))
    return out


# -- the token-bucket table ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "burst", "calls", "waits"),
    [
        # a burst is allowed at once; the next call waits for one token at the rate
        (1.0, 3, [(0, "a")] * 4, [0, 0, 0, 1.0]),
        (4.0, 2, [(0, "a")] * 3, [0, 0, 0.25]),
        # tokens come back at the rate: half a second at 2/s is one token
        (2.0, 1, [(0, "a"), (0, "a"), (0.5, "a"), (0.5, "a")], [0, 0.5, 0, 0.5]),
        # a refused call spends nothing: waiting half of the time leaves half of it to wait
        (1.0, 1, [(0, "a"), (0, "a"), (0.5, "a"), (1.0, "a")], [0, 1.0, 0.5, 0]),
        # a long idle refills up to the burst, no further
        (1.0, 2, [(0, "a"), (0, "a"), (100, "a"), (100, "a"), (100, "a")], [0, 0, 0, 0, 1.0]),
        # each key has its own bucket
        (1.0, 1, [(0, "a"), (0, "b"), (0, "a"), (0, "b")], [0, 0, 1.0, 1.0]),
    ],
)
def test_each_key_may_spend_its_burst_at_once_and_then_its_rate(rate, burst, calls, waits):
    clock = Clock()
    assert run(RateLimiter(rate, burst, max_keys=10, clock=clock), clock, calls) == waits


def test_the_table_holds_at_most_max_keys_forgetting_the_least_recently_seen():
    clock = Clock()
    limiter = RateLimiter(1.0, 1, max_keys=2, clock=clock)
    # a and b spend their token; a is seen again (refused), so b is the least recent when c comes
    assert run(limiter, clock, [(0, "a"), (0, "b"), (0, "a"), (0, "c")]) == [0, 0, 1.0, 0]
    assert len(limiter) == 2
    # b was forgotten: it starts again with a full burst; a is still remembered as empty
    assert run(limiter, clock, [(0, "b"), (0, "c")]) == [0, 1.0]


def test_many_keys_never_grow_the_table_beyond_its_bound():
    clock = Clock()
    limiter = RateLimiter(1.0, 1, max_keys=100, clock=clock)
    run(limiter, clock, [(0, f"10.0.{i // 256}.{i % 256}") for i in range(10_000)])
    assert len(limiter) == 100


@pytest.mark.parametrize(
    ("peer", "prefix", "key"),
    [
        ("ipv4:10.1.2.3:5555", 64, "10.1.2.3"),
        ("ipv6:%5B::1%5D:45880", 128, "::1"),
        ("ipv6:%5B::1%5D:45880", 64, "::/64"),
        ("ipv6:[2001:db8:1:2:3:4:5:6]:7070", 64, "2001:db8:1:2::/64"),
        ("ipv6:[2001:db8:1:2:3:4:5:6]:7070", 48, "2001:db8:1::/48"),
        ("ipv6:%5B::ffff:10.0.0.1%5D:7", 64, "10.0.0.1"),  # an IPv4 client of a dual-stack listener
        ("unix:/tmp/coordinator.sock", 64, "unix"),
        ("ipv4:not-an-address:1", 64, "ipv4"),
    ],
)
def test_a_caller_is_charged_as_its_address_or_its_ipv6_network(peer, prefix, key):
    assert client_key(peer, prefix) == key


@pytest.mark.parametrize(
    "kwargs",
    [
        {"join_rate_per_s": 0.0},
        {"call_rate_per_s": -1.0},
        {"join_burst": 0},
        {"call_burst": 0},
        {"max_clients_tracked": 0},
        {"sessions_per_client": 0},
        {"ipv6_prefix": 129},
        {"exempt": "127.0.0.0/8,localhost"},
    ],
)
def test_limits_that_make_no_sense_are_refused(kwargs):
    with pytest.raises(ConfigError):
        CoordinatorLimits(**kwargs)


def test_exempt_networks_are_read_from_a_comma_separated_list():
    assert [str(n) for n in CoordinatorLimits(exempt="127.0.0.0/8, ::1,10.0.0.7").exempt_networks] == [
        "127.0.0.0/8", "::1/128", "10.0.0.7/32"
    ]


@pytest.mark.parametrize(
    "limits, opens, refused",
    [
        # (limits, the client address of each stream opened in turn, which of them are refused)
        (CoordinatorLimits(sessions_per_client=2), ["ipv4:10.0.0.1:1", "ipv4:10.0.0.1:2", "ipv4:10.0.0.1:3"], [2]),
        (CoordinatorLimits(sessions_per_client=1), ["ipv4:10.0.0.1:1", "ipv4:10.0.0.2:1"], []),
        (CoordinatorLimits(sessions_per_client=1, exempt="10.0.0.0/8"), ["ipv4:10.0.0.1:1"] * 3, []),
        (CoordinatorLimits(sessions_per_client=None), ["ipv4:10.0.0.1:1"] * 3, []),
    ],
)
def test_a_client_address_holds_at_most_sessions_per_client_streams(limits, opens, refused):
    interceptor = RateLimitInterceptor(limits)
    answers = [interceptor.open_session(peer) for peer in opens]
    assert [i for i, why in enumerate(answers) if why] == refused


def test_a_closed_session_frees_its_place_and_closing_more_than_were_opened_changes_nothing():
    interceptor = RateLimitInterceptor(CoordinatorLimits(sessions_per_client=1))
    assert interceptor.open_session("ipv4:10.0.0.1:1") == ""
    interceptor.close_session("ipv4:10.0.0.1:1")
    interceptor.close_session("ipv4:10.0.0.1:1")
    assert interceptor.open_sessions() == 0
    assert interceptor.open_session("ipv4:10.0.0.1:2") == ""
    assert interceptor.open_session("ipv4:10.0.0.1:3").startswith("too many Session streams")


# -- the interceptor on a real server -----------------------------------------------------------

JOIN = f"/{COORDINATOR_SERVICE}/Join"
HEARTBEAT = f"/{COORDINATOR_SERVICE}/Heartbeat"
WATCH = f"/{COORDINATOR_SERVICE}/Watch"  # not a coordinator method: shows streaming handlers are guarded too


class FakeCoordinator:
    """A generic handler for the coordinator's service that counts the calls its behaviours ran."""

    def __init__(self) -> None:
        self.ran: dict[str, int] = {"Join": 0, "Heartbeat": 0, "Watch": 0}

    def handler(self) -> grpc.GenericRpcHandler:
        async def unary(name: str, request: bytes, context) -> bytes:
            self.ran[name] += 1
            return b"ok"

        async def watch(request: bytes, context):
            self.ran["Watch"] += 1
            for i in range(3):
                yield bytes([i])

        def handler_of(name):
            async def behaviour(request: bytes, context) -> bytes:
                return await unary(name, request, context)

            return grpc.unary_unary_rpc_method_handler(behaviour)

        return grpc.method_handlers_generic_handler(COORDINATOR_SERVICE, {
            "Join": handler_of("Join"), "Heartbeat": handler_of("Heartbeat"),
            "Watch": grpc.unary_stream_rpc_method_handler(watch),
        })


@dataclass
class Served:
    """A running server with the interceptor, and a channel to it from 127.0.0.1."""

    port: int
    channel: grpc.aio.Channel
    fake: FakeCoordinator
    interceptor: RateLimitInterceptor


@contextlib.asynccontextmanager
async def serving(limits: CoordinatorLimits, ipv6: bool = False):
    """A server on 127.0.0.1 (and ::1 on the same port with ipv6) with the interceptor; its clock stands still."""
    clock = Clock()
    interceptor = RateLimitInterceptor(limits, clock=clock)
    fake = FakeCoordinator()
    server = grpc.aio.server(interceptors=(interceptor,))
    server.add_generic_rpc_handlers((fake.handler(),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    if ipv6:
        try:
            bound = server.add_insecure_port(f"[::1]:{port}")
        except RuntimeError:
            bound = 0
        if bound != port:
            pytest.skip("this machine has no IPv6 loopback (::1) to be a second client address")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Served(port, channel, fake, interceptor)
    finally:
        await server.stop(None)


async def call(channel: grpc.aio.Channel, method: str) -> grpc.StatusCode:
    """The status of one unary call of method."""
    try:
        await channel.unary_unary(method)(b"", timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


OK, LIMITED = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_21st_join_of_a_burst_is_refused_before_the_handler_runs_with_a_message_naming_the_limit():
    async def scenario():
        async with serving(CoordinatorLimits(join_rate_per_s=5.0, join_burst=20)) as served:
            codes = [await call(served.channel, JOIN) for _ in range(20)]
            refused = served.channel.unary_unary(JOIN)(b"", timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await refused
            return codes, failed.value, dict(await refused.trailing_metadata()), served.fake.ran["Join"]

    codes, error, trailers, ran = asyncio.run(scenario())
    assert codes == [OK] * 20 and ran == 20
    assert error.code() == LIMITED
    assert error.details() == (
        "rate limited: this coordinator allows 5 Join calls per second (bursts of 20) per client address; "
        "retry in 0.20 s"
    )
    assert trailers[RETRY_AFTER_MS] == "200"


def test_a_client_out_of_joins_may_still_heartbeat():
    async def scenario():
        async with serving(CoordinatorLimits(join_burst=2, call_burst=3)) as served:
            joins = [await call(served.channel, JOIN) for _ in range(3)]
            beats = [await call(served.channel, HEARTBEAT) for _ in range(4)]
            return joins, beats, served.fake.ran

    joins, beats, ran = asyncio.run(scenario())
    assert joins == [OK, OK, LIMITED] and beats == [OK, OK, OK, LIMITED]
    assert ran == {"Join": 2, "Heartbeat": 3, "Watch": 0}


def test_another_client_address_is_not_affected_by_one_client_out_of_joins():
    async def scenario():
        async with serving(CoordinatorLimits(join_burst=2), ipv6=True) as served:
            first = [await call(served.channel, JOIN) for _ in range(3)]
            async with grpc.aio.insecure_channel(f"[::1]:{served.port}") as other:
                return first, [await call(other, JOIN) for _ in range(3)]

    assert asyncio.run(scenario()) == ([OK, OK, LIMITED], [OK, OK, LIMITED])


def test_the_health_check_is_never_limited():
    async def scenario():
        async with serving(CoordinatorLimits(join_burst=1, call_burst=1)) as served:
            stub = health_pb2_grpc.HealthStub(served.channel)
            limited = [await call(served.channel, HEARTBEAT) for _ in range(2)]
            replies = [await stub.Check(health_pb2.HealthCheckRequest(), timeout=10) for _ in range(50)]
            return limited, [r.status for r in replies], served.interceptor.counts()

    limited, statuses, counts = asyncio.run(scenario())
    assert limited == [OK, LIMITED]
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 50
    assert counts == {"Heartbeat": 1}


def test_refusals_are_counted_by_method():
    async def scenario():
        async with serving(CoordinatorLimits(join_burst=1, call_burst=1)) as served:
            for method, times in ((JOIN, 4), (HEARTBEAT, 3)):
                for _ in range(times):
                    await call(served.channel, method)
            return served.interceptor.counts(), served.interceptor.tracked_clients()

    assert asyncio.run(scenario()) == ({"Join": 3, "Heartbeat": 2}, 2)


def test_a_streaming_call_over_the_limit_is_refused_before_its_first_response():
    async def scenario():
        async with serving(CoordinatorLimits(call_burst=1)) as served:
            watch = served.channel.unary_stream(WATCH)
            first = [r async for r in watch(b"", timeout=10)]
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                [r async for r in watch(b"", timeout=10)]
            return first, failed.value.code(), served.fake.ran["Watch"], served.interceptor.counts()

    assert asyncio.run(scenario()) == ([b"\x00", b"\x01", b"\x02"], LIMITED, 1, {"Watch": 1})


@pytest.mark.parametrize(
    "limits",
    [CoordinatorLimits(join_burst=1, exempt="127.0.0.0/8"), CoordinatorLimits(join_burst=1, join_rate_per_s=None)],
    ids=["exempt-network", "no-join-limit"],
)
def test_a_client_in_an_exempt_network_or_without_a_limit_is_never_refused(limits):
    async def scenario():
        async with serving(limits) as served:
            codes = [await call(served.channel, JOIN) for _ in range(30)]
            return codes, served.fake.ran["Join"], served.interceptor.counts()

    assert asyncio.run(scenario()) == ([OK] * 30, 30, {})
