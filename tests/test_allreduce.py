"""All-reduce between in-process endpoints over real gRPC on 127.0.0.1, and what a receiver rejects."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch

from collectives.allreduce import AllReduceConfig
from collectives.codecs import CodecConfig, make_codec
from collectives.codecs.dense import BlockCodec
from collectives.codecs.kernels import native_kernels
from collectives.errors import MemberFailure, NonFiniteError
from collectives.net.rpc import blocking_channel
from collectives.reduce.aggregators import AggregatorConfig, aggregate_rows, make_aggregator
from collectives.reduce.inbox import GATHER, SCATTER, Group
from collectives.reduce.parts import part_bounds
from collectives.reduce.round import ERROR_KIND_KEY, PUSH_METHOD, chunk_message

pytestmark = pytest.mark.timeout(60)

needs_fused_reduce = pytest.mark.skipif(
    native_kernels() is None or not native_kernels().has_reduce_quantized,
    reason="no native fused reduction (no kernels, or a CPU without FMA)",
)


def run_round(endpoints, xs, config=None, weights=None, round_id=None, epoch=0):
    groups = endpoints.groups(epoch=epoch, round_id=round_id)
    futures = [
        c.allreduce_async(g, x, config=config, weight=1.0 if weights is None else weights[i])
        for i, (c, g, x) in enumerate(zip(endpoints.collectives, groups, xs))
    ]
    return [f.result(timeout=30) for f in futures]


@pytest.mark.parametrize("codec", ["none", "int8", "int4", "fp16"])
def test_a_single_member_round_returns_its_input_exactly_whatever_the_codec(endpoints, codec):
    # Nothing crosses a wire: the codec's error bought nothing (it was the int8 round trip until 2026-12-06).
    e = endpoints(1)
    x = torch.randn(1000)
    (result,) = run_round(e, [x], config=AllReduceConfig(codec=CodecConfig(codec)))
    assert torch.equal(result.value, x)


def test_mean_of_two_members_is_exact_with_codec_none(endpoints):
    e = endpoints(2)
    xs = [torch.randn(10_001), torch.randn(10_001)]
    results = run_round(e, xs)
    want = aggregate_rows(make_aggregator("mean"), torch.stack(xs), [1.0, 1.0])
    assert all(torch.equal(r.value, want) for r in results)


def test_weights_make_a_weighted_mean(endpoints):
    e = endpoints(3)
    xs = [torch.full((7,), float(i)) for i in range(3)]
    results = run_round(e, xs, weights=[1.0, 0.0, 3.0])
    assert torch.allclose(results[0].value, torch.full((7,), 6.0 / 4.0))


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "int4", "int8+zstd"])
@pytest.mark.parametrize("numel", [0, 1, 2])
def test_a_round_of_fewer_elements_than_members_commits_on_every_codec(endpoints, codec, numel):
    # int8/int4 owners refused the empty parts as "undecodable payload": no such round ever committed, and a healthy
    # member was blamed for sending bad data.
    e = endpoints(3)
    xs = [torch.full((numel,), 2.0 * i) for i in range(3)]  # 0, 2, 4: exact in every codec
    results = run_round(e, xs, config=AllReduceConfig(codec=CodecConfig.parse(codec)))
    assert all(torch.equal(r.value, torch.full((numel,), 2.0)) for r in results)


def test_list_of_tensors_keeps_shapes_and_dtypes(endpoints):
    e = endpoints(2)
    a = [torch.ones(2, 3), torch.zeros(4, dtype=torch.float64)]
    b = [torch.full((2, 3), 3.0), torch.full((4,), 2.0, dtype=torch.float64)]
    r0, r1 = run_round(e, [a, b])
    assert r0.value[0].shape == (2, 3) and r0.value[1].dtype == torch.float64
    assert torch.equal(r0.value[0], torch.full((2, 3), 2.0)) and torch.equal(
        r1.value[1], torch.ones(4, dtype=torch.float64)
    )


def test_async_call_snapshots_the_input(endpoints):
    e = endpoints(2)
    xs = [torch.ones(100), torch.ones(100) * 3]
    groups = e.groups()
    first = e.collectives[0].allreduce_async(groups[0], xs[0])
    xs[0].mul_(100)  # training goes on while the round travels
    second = e.collectives[1].allreduce_async(groups[1], xs[1])
    assert torch.equal(first.result(timeout=30).value, torch.full((100,), 2.0))
    assert torch.equal(second.result(timeout=30).value, torch.full((100,), 2.0))


def _round_with_a_nan_at(endpoints, index: int):
    """Three members reduce 300 ones, member 1 with a NaN at ``index``; return each member's outcome."""
    e = endpoints(3)
    cfg = AllReduceConfig(codec=CodecConfig("int8"), timeout_s=60.0)
    xs = [torch.ones(300) for _ in range(3)]
    xs[1][index] = float("nan")
    futures = [c.allreduce_async(g, x, config=cfg) for c, g, x in zip(e.collectives, e.groups(), xs)]
    return [f.exception(timeout=30) for f in futures]


@pytest.mark.parametrize("index", [250, 150], ids=["in-a-part-it-sends", "in-its-own-part"])
def test_a_nan_input_aborts_the_round_on_every_member(endpoints, index):
    # Part 1 is [100, 200): member 1 reduces it itself; part 2 it encodes and sends.
    errors = _round_with_a_nan_at(endpoints, index)
    assert isinstance(errors[1], NonFiniteError) and "rank 1's input" in str(errors[1])
    for other in (errors[0], errors[2]):
        # Told by member 1's abort notice, long before the 60 s deadline.
        assert isinstance(other, MemberFailure) and other.failed_ranks == (1,)
        assert "reported by rank 1" in str(other) and "not finite" in str(other)


def test_error_feedback_updates_the_residual_of_sent_parts_only(endpoints):
    e = endpoints(2)
    cfg = AllReduceConfig(codec=CodecConfig("int4"))
    xs = [torch.randn(1000), torch.randn(1000)]
    residuals = [torch.zeros(1000), torch.zeros(1000)]
    groups = e.groups()
    futures = [
        c.allreduce_async(g, x, config=cfg, residual=res)
        for c, g, x, res in zip(e.collectives, groups, xs, residuals)
    ]
    for f in futures:
        f.result(timeout=30)
    (a0, b0), (a1, b1) = part_bounds(1000, 2)
    # Member 0 owns part 0 (contributed exactly), member 1 sent it quantized.
    assert torch.count_nonzero(residuals[0][a0:b0]) == 0 and torch.count_nonzero(residuals[0][a1:b1]) > 0
    assert torch.count_nonzero(residuals[1][a1:b1]) == 0 and torch.count_nonzero(residuals[1][a0:b0]) > 0


def test_a_failed_round_leaves_the_error_feedback_residual_unchanged(endpoints):
    e = endpoints(2, chunk_bytes=1024)
    cfg = AllReduceConfig(codec=CodecConfig("int4"), timeout_s=0.5, blame_grace_s=0.0)
    residual = torch.full((4000,), 0.25)
    # Member 1 never joins the round: member 0 encodes and streams its part, then misses the deadline.
    with pytest.raises(MemberFailure):
        e.collectives[0].allreduce_async(e.groups()[0], torch.randn(4000), config=cfg, residual=residual).result(30)
    assert torch.equal(residual, torch.full((4000,), 0.25))


# -- what a receiver rejects ------------------------------------------------------------


class OpenRound:
    """Member 1 of a two-member round waits for member 0's contribution; the test plays member 0 by hand."""

    def __init__(self, endpoints, numel=64, epoch=2, round_id=7, timeout_s=10.0, codec="none"):
        self.e = endpoints(2)
        self.numel = numel
        self.config = AllReduceConfig(codec=CodecConfig.parse(codec), timeout_s=timeout_s)
        self.groups = self.e.groups(epoch=epoch, round_id=round_id)
        self.future = self.e.collectives[1].allreduce_async(self.groups[1], torch.ones(numel), config=self.config)
        self.channel = blocking_channel(self.e.addresses[1], self.e.transports[1].config.rpc_settings())
        self.bounds = part_bounds(numel, 2)

    def chunk(self, group=None, phase=SCATTER, part=1, offset=0, count=None, payload=None, weight=1.0, codec="none"):
        a, b = self.bounds[part]
        count = (b - a) if count is None else count
        cfg = CodecConfig.parse(codec)
        if payload is None:
            payload = make_codec(cfg).encode(torch.full((count,), 5.0))
        return chunk_message(
            group or self.groups[0],
            self.numel,
            AggregatorConfig(),
            cfg,
            phase,
            part,
            b - a,
            offset,
            count,
            weight,
            payload,
        )

    def push(self, *messages: bytes):
        call = self.channel.stream_unary(PUSH_METHOD, request_serializer=lambda m: m, response_deserializer=lambda m: m)
        return call(iter(messages), timeout=5)

    def rejection(self, *messages: bytes) -> tuple[grpc.StatusCode, str | None]:
        with pytest.raises(grpc.RpcError) as info:
            self.push(*messages)
        kind = dict(info.value.trailing_metadata() or ()).get(ERROR_KIND_KEY)
        return info.value.code(), kind

    def close(self):
        self.future.cancel()
        self.channel.close()


@pytest.fixture
def open_round(endpoints):
    r = OpenRound(endpoints)
    yield r
    r.close()


def test_stale_epoch_message_is_rejected(open_round):
    g = open_round.groups[0]
    stale = Group(g.run_id, g.epoch - 1, g.round_id, g.members, g.rank)
    assert open_round.rejection(open_round.chunk(group=stale)) == (grpc.StatusCode.FAILED_PRECONDITION, "stale")


def test_foreign_run_message_is_rejected(open_round):
    g = open_round.groups[0]
    foreign = Group("another-run", g.epoch, g.round_id, g.members, g.rank)
    assert open_round.rejection(open_round.chunk(group=foreign)) == (grpc.StatusCode.FAILED_PRECONDITION, "foreign-run")


def test_malformed_bytes_are_rejected(open_round):
    assert open_round.rejection(b"\x0b\x00garbage") == (grpc.StatusCode.INVALID_ARGUMENT, "invalid")


def test_oversized_payload_is_rejected_and_its_sender_blamed(open_round):
    huge = open_round.chunk(payload=b"\x00" * 100_000)
    assert open_round.rejection(huge) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid")
    with pytest.raises(MemberFailure) as info:
        open_round.future.result(timeout=10)
    assert info.value.failed_ranks == (0,) and "too big" in str(info.value)


def test_nan_payload_from_a_member_fails_the_round_naming_it(open_round):
    bad = make_codec(CodecConfig("none")).encode(torch.ones(32))
    bad = bad[:8] + torch.tensor([float("nan")]).numpy().tobytes() + bad[12:]
    assert open_round.rejection(open_round.chunk(payload=bad))[0] == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(MemberFailure) as info:
        open_round.future.result(timeout=10)
    assert info.value.failed_ranks == (0,)


@needs_fused_reduce
def test_an_int8_chunk_with_a_bad_scale_is_rejected_as_it_arrives_and_its_sender_blamed(endpoints):
    # The owner keeps int8 scatter chunks undecoded for its fused reduction; their scales are still checked at once.
    r = OpenRound(endpoints, codec="int8")
    try:
        payload = bytearray(make_codec(CodecConfig("int8")).encode(torch.full((32,), 5.0)))
        payload[:4] = torch.tensor([-1.0]).numpy().tobytes()
        assert r.rejection(r.chunk(payload=bytes(payload), codec="int8"))[0] == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(MemberFailure) as info:
            r.future.result(timeout=10)
        assert info.value.failed_ranks == (0,) and "invalid block scale" in str(info.value)
    finally:
        r.close()


def test_wrong_part_is_rejected(open_round):
    assert open_round.rejection(open_round.chunk(part=0))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_gap_between_chunks_is_rejected(open_round):
    first = open_round.chunk(count=10)
    gap = open_round.chunk(offset=20, count=12)
    assert open_round.rejection(first, gap)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_duplicate_stream_is_rejected_and_not_counted_twice(open_round):
    whole = open_round.chunk()
    open_round.push(whole)
    assert open_round.rejection(whole) == (grpc.StatusCode.ALREADY_EXISTS, "duplicate")
    g = open_round.groups[1]
    inbox = open_round.e.collectives[1].registry.open_inbox(g.round_id, g.epoch)
    a, b = open_round.bounds[1]
    assert inbox.scatter_progress[0] == b - a, "member 0's contribution is in once"
    assert torch.equal(inbox.rows[0], torch.full((b - a,), 5.0))
    assert inbox.bytes_received == len(whole), "the duplicate's bytes were never taken in"


def test_message_for_a_finished_round_is_rejected(endpoints):
    r = OpenRound(endpoints, timeout_s=0.2)
    with pytest.raises(MemberFailure, match="deadline"):
        r.future.result(timeout=10)  # set only after the round has closed
    assert r.rejection(r.chunk(phase=GATHER, part=0)) == (grpc.StatusCode.FAILED_PRECONDITION, "closed")
    r.close()


def test_codec_work_on_the_event_loop_gives_the_same_bits_as_on_codec_threads(endpoints):
    xs = [torch.randn(50_003, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    cfg = AllReduceConfig(codec=CodecConfig("int8"))
    threaded = run_round(endpoints(3, chunk_bytes=4096), xs, config=cfg)
    inline = run_round(endpoints(3, chunk_bytes=4096, codec_threads=0), xs, config=cfg)
    assert all(torch.equal(a.value, threaded[0].value) for a in threaded + inline)


def _quantized_mean(endpoints, xs, name: str, *, keep: bool, monkeypatch, chunk_bytes=(4096, 4096, 4096)):
    """Each member's result of a weighted mean of xs with codec ``name`` (int8 or int4), the owners reducing from
    kept payloads or not."""
    monkeypatch.setattr(BlockCodec, "reduces_quantized", property(lambda self: keep and native_kernels() is not None
                                                                    and native_kernels().has_reduce_quantized))
    e = endpoints(len(xs))
    for t, size in zip(e.transports, chunk_bytes):
        t.config = dataclasses.replace(t.config, chunk_bytes=size)
    cfg = AllReduceConfig(codec=CodecConfig(name))
    return [r.value for r in run_round(e, xs, config=cfg, weights=[1.0, 2.0, 0.5])]


@needs_fused_reduce
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_owners_reducing_kept_payloads_get_the_bits_of_decoding_them_into_rows(endpoints, monkeypatch, name):
    xs = [torch.randn(50_003, generator=torch.Generator().manual_seed(i)) * (i + 1) for i in range(3)]
    kept = _quantized_mean(endpoints, xs, name, keep=True, monkeypatch=monkeypatch)
    rows = _quantized_mean(endpoints, xs, name, keep=False, monkeypatch=monkeypatch)
    assert all(torch.equal(v, rows[0]) for v in kept + rows)


@needs_fused_reduce
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_a_sender_with_another_chunk_size_is_decoded_into_its_row_with_the_same_bits(endpoints, monkeypatch, name):
    xs = [torch.randn(50_003, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    sizes = (4096, 3000, 10_000)
    kept = _quantized_mean(endpoints, xs, name, keep=True, monkeypatch=monkeypatch, chunk_bytes=sizes)
    rows = _quantized_mean(endpoints, xs, name, keep=False, monkeypatch=monkeypatch, chunk_bytes=sizes)
    assert all(torch.equal(v, rows[0]) for v in kept + rows)
