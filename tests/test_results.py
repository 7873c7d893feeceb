"""Committed results a member keeps for late peers: what is kept, how it is served, how it is checked, how a late
peer fetches one from its holders (real gRPC on 127.0.0.1)."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from collectives.codecs import CodecConfig, make_codec
from collectives.membership.roundplan import MissedRound
from collectives.net.transport import Transport
from collectives.net.transportconfig import TransportConfig
from collectives.reduce.parts import part_bounds
from collectives.reduce.results import (
    NEAR_ROUNDS,
    ResultStore,
    decode_result,
    expected_wire_bytes,
    fetch_result,
    result_digest,
)
from collectives.statesync import ResultNotYet, StateServer, StateSnapshot, StateSyncConfig, StateSyncError
from support.proxy import TcpProxy

INT8 = CodecConfig.parse("int8")


def committed(numel: int = 4096, seed: int = 0, codec: CodecConfig = INT8, parts: int = 1) -> torch.Tensor:
    """A result as members hold it: each member's part, the decoding of its encoded values."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    c = make_codec(codec)
    return torch.cat([c.decode(c.encode(x[a:b]), b - a) for a, b in part_bounds(numel, parts)])


def test_the_last_keep_rounds_are_kept():
    store = ResultStore(keep=2)
    for r in range(1, 6):
        store.keep(r, "", committed(seed=r), INT8)
    assert store.rounds() == [4, 5]


def test_results_after_a_pinned_round_are_kept_beyond_keep():
    store = ResultStore(keep=1)
    for r in range(1, 7):
        store.keep(r, "", committed(seed=r), INT8, hold_after=2)
    assert store.rounds() == [3, 4, 5, 6]


def test_held_results_are_dropped_oldest_first_beyond_max_bytes():
    store = ResultStore(keep=1, max_bytes=3 * 4096 * 4)
    for r in range(1, 7):
        store.keep(r, "", committed(seed=r), INT8, hold_after=0)
    assert store.rounds() == [4, 5, 6]


def test_keep_zero_without_a_pin_keeps_nothing():
    store = ResultStore(keep=0)
    store.keep(1, "", committed(), INT8)
    assert store.rounds() == [] and store.snapshot(1) is None


def test_a_round_newer_than_the_last_commit_is_not_yet_kept_and_an_older_one_is_gone():
    store = ResultStore(keep=1)
    store.keep(4, "", committed(seed=4), INT8)
    store.keep(5, "", committed(seed=5), INT8)
    assert store.snapshot(4) is None
    with pytest.raises(ResultNotYet, match="round 6 is newer than this member's last commit"):
        store.snapshot(6)


def test_a_round_far_past_the_last_commit_is_not_kept_at_once_rather_than_waited_for():
    # A request for round 2^64-1 held a fetch slot for result_wait_s (probe I).
    store = ResultStore(keep=1)
    store.keep(5, "", committed(seed=5), INT8)
    with pytest.raises(ResultNotYet):
        store.snapshot(5 + NEAR_ROUNDS)
    assert store.snapshot(6 + NEAR_ROUNDS) is None and store.snapshot(2**64 - 1) is None


class _SlowCopy:
    """A result whose copy (``keep`` copies what it keeps) waits until released, to look in meanwhile."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value
        self.copying = threading.Event()
        self.release = threading.Event()

    def detach(self) -> _SlowCopy:
        return self

    def to(self, *args) -> _SlowCopy:
        return self

    def clone(self) -> torch.Tensor:
        self.copying.set()
        assert self.release.wait(10)
        return self.value.clone()


def test_a_round_asked_for_while_its_result_is_being_copied_is_not_yet_kept_rather_than_gone():
    store = ResultStore(keep=1)
    slow = _SlowCopy(committed(seed=1))
    keeping = threading.Thread(target=store.keep, args=(1, "", slow, INT8))
    keeping.start()
    try:
        assert slow.copying.wait(10)
        with pytest.raises(ResultNotYet, match="round 1 is newer than this member's last commit"):
            store.snapshot(1)
    finally:
        slow.release.set()
        keeping.join(10)
    assert store.snapshot(1).round_id == 1


def test_a_member_that_keeps_nothing_still_knows_its_last_commit():
    store = ResultStore(keep=0)
    store.keep(1, "", committed(), INT8)
    assert store.snapshot(1) is None
    with pytest.raises(ResultNotYet):
        store.snapshot(2)


def test_a_result_the_codec_reproduces_is_served_encoded_and_decodes_to_the_same_values():
    value = committed(numel=10_000)
    store = ResultStore(keep=1)
    store.keep(7, "fragment1", value, INT8)
    snap = store.snapshot(7)
    assert snap.meta == {
        "tag": "fragment1",
        "codec": "int8",
        "numel": 10_000,
        "sizes": [snap.tensors["result"].numel()],
    }
    assert snap.tensors["result"].dtype == torch.uint8
    assert snap.tensors["result"].numel() < value.numel() * 4 / 3
    assert torch.equal(decode_result(snap, 10_000, "fragment1", "peer1"), value)


def test_a_result_of_a_three_member_round_is_encoded_part_by_part_as_the_round_did():
    value = committed(numel=10_000, parts=3)  # 3333 values a part: the int8 blocks of 64 restart at each part
    store = ResultStore(keep=2)
    store.keep(1, "", value, INT8, parts=3)
    store.keep(2, "", value, INT8, parts=1)
    by_parts, whole = store.snapshot(1), store.snapshot(2)
    assert len(by_parts.meta["sizes"]) == 3
    assert torch.equal(decode_result(by_parts, 10_000, "", "peer1"), value)
    assert whole.meta["codec"] == "none", "cut otherwise, the blocks do not reproduce the values"


def test_a_result_the_codec_does_not_reproduce_is_served_as_fp32():
    value = torch.randn(4096)  # not the decoding of an int8 payload
    store = ResultStore(keep=1)
    store.keep(3, "", value, INT8)
    snap = store.snapshot(3)
    assert snap.meta["codec"] == "none"
    assert torch.equal(decode_result(snap, 4096, "", "peer1"), value)


def test_a_round_without_a_codec_is_served_as_fp32():
    store = ResultStore(keep=1)
    store.keep(3, "", torch.ones(8), None)
    assert store.snapshot(3).meta == {"tag": "", "codec": "none"}


def raw(value: torch.Tensor, **meta) -> StateSnapshot:
    return StateSnapshot(round_id=5, tensors={"result": value}, meta={"tag": "", "codec": "none", **meta})


def encoded(numel: int, payload: torch.Tensor, codec: str = "int8", sizes: list | None = None) -> StateSnapshot:
    meta = {"tag": "", "codec": codec, "numel": numel, "sizes": [payload.numel()] if sizes is None else sizes}
    return StateSnapshot(round_id=5, tensors={"result": payload}, meta=meta)


GOOD = make_codec(INT8).encode(committed(numel=256))


@pytest.mark.parametrize(
    "snap, problem",
    [
        (raw(torch.ones(8), tag="other"), "as 'other'"),
        (raw(torch.ones(7)), "not 8 fp32 values"),
        (raw(torch.ones(8, dtype=torch.float64)), "not 8 fp32 values"),
        (raw(torch.tensor([1.0, float("nan"), 0, 0, 0, 0, 0, 0])), "NaN or Inf"),
        (encoded(255, torch.frombuffer(bytearray(GOOD), dtype=torch.uint8)), "not of 8 values"),
        (encoded(8, torch.zeros(10_000, dtype=torch.uint8)), "does not decode"),
        (encoded(8, torch.zeros(16, dtype=torch.uint8), codec="gzip"), "does not decode"),
        (encoded(8, torch.zeros(16, dtype=torch.uint8), sizes=[8, 4]), "do not add up"),
        (encoded(8, torch.zeros(16, dtype=torch.uint8), sizes=[8, -1, 9]), "do not add up"),
        (encoded(8, torch.zeros(16, dtype=torch.uint8), sizes="16"), "do not add up"),
        (StateSnapshot(round_id=5, tensors={}, meta={"tag": ""}), "without a result tensor"),
    ],
)
def test_a_bad_result_is_refused_with_the_source_named(snap, problem):
    with pytest.raises(StateSyncError, match="peer9") as info:
        decode_result(snap, 8, "", "peer9")
    assert problem in str(info.value)


def test_expected_wire_bytes_follow_the_codec():
    assert expected_wire_bytes(1000, None) == 4000
    assert expected_wire_bytes(1000, CodecConfig()) == 4000
    assert expected_wire_bytes(1024, INT8) == make_codec(INT8).max_payload_size(1024) < 4096


def test_a_kept_result_is_had_again_only_for_its_round_tag_and_epoch():
    store = ResultStore(keep=2)
    value = committed()
    store.keep(3, "g", value, INT8, epoch=2)
    got = store.get(3, "g", 2)
    assert torch.equal(got.value, value) and (got.round_id, got.epoch, got.codec) == (3, 2, INT8)
    assert (store.get(3, "g", 1), store.get(3, "h", 2), store.get(4, "g", 2)) == (None, None, None)
    assert store.attempts() == [(3, 2, "")]
    assert store.digest(3) == result_digest(value) and store.attempts() == [(3, 2, result_digest(value))]


def test_keeping_the_same_attempt_again_copies_nothing_and_makes_it_the_newest():
    # A peer that kept a round for the run and then catches up from that copy keeps it again.
    store = ResultStore(keep=2)
    value = committed()
    store.keep(3, "g", value, INT8, epoch=2)
    store.keep(4, "g", committed(seed=4), INT8, epoch=2)
    store.keep(3, "g", torch.zeros_like(value), INT8, epoch=2, digest="d" * 64)
    assert store.rounds() == [4, 3] and torch.equal(store.get(3, "g", 2).value, value)
    assert store.attempts()[-1] == (3, 2, "d" * 64)
    store.keep(3, "g", torch.zeros_like(value), INT8, epoch=5)  # another attempt of round 3 replaces it
    assert torch.equal(store.get(3, "g", 5).value, torch.zeros_like(value)) and store.get(3, "g", 2) is None


def test_a_fetched_result_with_another_digest_than_its_members_is_refused():
    value = torch.ones(8)
    assert torch.equal(decode_result(raw(value), 8, "", "peer1", digest=result_digest(value)), value)
    with pytest.raises(StateSyncError, match="peer1 served round 5's result with another digest than its members'"):
        decode_result(raw(value), 8, "", "peer1", digest=result_digest(torch.zeros(8)))


def test_a_result_kept_with_its_known_digest_reports_it_without_hashing_again():
    store = ResultStore(keep=2)
    value = committed()
    store.keep(3, "g", value, INT8, epoch=2, digest=result_digest(value))
    assert store.attempts() == [(3, 2, result_digest(value))] and store.get(3, "g", 2).digest == result_digest(value)


# -- fetching a result from its holders ---------------------------------------------------------------

RUN = "run-r"
ROUND = 3
VALUE = torch.arange(1000, dtype=torch.float32)
# A holder stalls for ANSWER_S before it answers: longer than the short window, far shorter than the patient one.
SHORT = StateSyncConfig(timeout_s=60, stall_timeout_s=0.2)
PATIENT = StateSyncConfig(timeout_s=60, stall_timeout_s=60)
ANSWER_S = 1.5


class Holder:
    """A member's kept results as its state server reads them: whether it keeps round ROUND's (and with which tag),
    how long it takes to answer (a link busy with the run's rounds), and how many times it was asked."""

    def __init__(self, keeps: bool = True, tag: str = "g", answer_s: float = 0.0) -> None:
        self.store = ResultStore(keep=2)
        self.store.keep(ROUND if keeps else ROUND + 1, tag, VALUE)
        self.answer_s = answer_s
        self.asked = 0
        self._lock = threading.Lock()

    def results(self, round_id: int) -> StateSnapshot | None:
        with self._lock:
            self.asked += 1
        time.sleep(self.answer_s)  # on the server's thread: its stream sends nothing meanwhile
        return self.store.snapshot(round_id)


@pytest.fixture
def holders():
    """holders(*Holder) -> (a client transport, the round's MissedRound naming a started server for each holder);
    everything is closed after the test."""
    made: list[Transport] = []

    def make(*kept: Holder) -> tuple[Transport, MissedRound]:
        members = []
        for i, holder in enumerate(kept):
            t = Transport(TransportConfig())
            made.append(t)
            members.append((f"m{i}", t.start(StateServer(t, RUN, lambda: None, results=holder.results).handlers())))
        client = Transport(TransportConfig())
        made.append(client)
        client.start(())
        return client, MissedRound(ROUND, 0, "g", tuple(members))

    yield make
    for t in made:
        t.close()


def fetch(client: Transport, missed: MissedRound):
    return client.submit(fetch_result(client, RUN, "late", SHORT, missed, VALUE.numel(), patient=PATIENT)).result(60)


@pytest.mark.timeout(90)
def test_holders_that_all_stalled_are_asked_again_with_the_patient_window(holders):
    slow = Holder(answer_s=ANSWER_S)
    client, missed = holders(slow)
    got = fetch(client, missed)
    assert got is not None and torch.equal(got.value, VALUE) and got.source == missed.members[0][1]
    assert slow.asked == 2


@pytest.mark.timeout(90)
@pytest.mark.parametrize("other", [{"keeps": False}, {"tag": "h"}], ids=["does not keep it", "serves another tag"])
def test_a_holder_that_does_not_serve_the_result_is_not_asked_again(holders, other):
    # One holder refused: the link carries data, and the stalled one is not waited for longer.
    slow, other = Holder(answer_s=ANSWER_S), Holder(**other)
    client, missed = holders(slow, other)
    assert fetch(client, missed) is None
    assert (slow.asked, other.asked) == (1, 1)


def paused(client: Transport, holder_address: str) -> TcpProxy:
    """A proxy to holder_address that the client has a connection through, then paused: the holder as a
    SIGSTOPped process is (its kernel holds the connection, nothing answers)."""
    proxy = TcpProxy(holder_address)

    async def connected() -> None:
        await client.channel(proxy.address).channel_ready()

    client.submit(connected()).result(10)
    proxy.pause()
    return proxy


@pytest.mark.timeout(40)
def test_only_the_stalled_holders_whose_server_answers_are_asked_again(holders):
    stopped, slow = Holder(), Holder(answer_s=ANSWER_S)
    client, missed = holders(stopped, slow)
    proxy = paused(client, missed.members[0][1])
    try:
        # Asked again, the paused holder would hold the fetch for the patient window (60 s), past this test's timeout.
        got = fetch(client, dataclasses.replace(missed, members=(("m0", proxy.address), missed.members[1])))
    finally:
        proxy.close()
    assert got is not None and torch.equal(got.value, VALUE) and got.source == missed.members[1][1]
    assert (stopped.asked, slow.asked) == (0, 2)


@pytest.mark.timeout(40)
def test_a_paused_holder_alone_is_not_asked_again(holders):
    stopped = Holder()
    client, missed = holders(stopped)
    proxy = paused(client, missed.members[0][1])
    try:
        assert fetch(client, dataclasses.replace(missed, members=(("m0", proxy.address),))) is None
    finally:
        proxy.close()
    assert stopped.asked == 0


@pytest.mark.timeout(90)
def test_a_stalled_holder_is_left_for_the_next_one_on_the_first_pass(holders):
    slow, good = Holder(answer_s=ANSWER_S), Holder()
    client, missed = holders(slow, good)
    got = fetch(client, missed)
    assert got is not None and torch.equal(got.value, VALUE) and got.source == missed.members[1][1]
    assert (slow.asked, good.asked) == (1, 1)
