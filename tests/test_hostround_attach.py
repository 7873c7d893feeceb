"""A local member that cannot join its host's shared-memory segment: the others learn it at once, from its marker.

In-process host rounds (one event loop, one SegmentCache per member as in separate processes), with the fault
injected at the seam: a member's cache refuses to take the segment. Every member's data-plane address is a
listening socket, as a live member's is, so only the marker (not a refused port) can name it before the deadline.
The rounds' deadline is 60 s and each test's timeout 30 s: a round that waited for its deadline fails the test.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import time

import pytest
import torch

from collectives.errors import MemberFailure, SharedMemoryUnusable
from collectives.hosts.cache import SegmentCache
from collectives.hosts.local import HostSegment, round_tag, segment_name, sweep_stale
from collectives.hosts.markers import MARKER_BYTES, leave_marker, marker_name
from collectives.hosts.round import HostRound
from collectives.reduce.inbox import Group
from collectives.reduce.round import AllReduceConfig

pytestmark = pytest.mark.timeout(30)

RUN = "attach"
NUMEL = 1_000
DEADLINE_S = 60.0


class OnTheLoop:
    """The one Transport method a host round of a single host uses: run a copy or a reduction (here, inline)."""

    async def run_off_loop(self, fn, *args):
        return fn(*args)


async def no_other_host(*_):
    raise AssertionError("a round of one host has no round between hosts")


@pytest.fixture
def addresses():
    """Three listening data-plane ports: a member's port accepts, whatever happens to its shared memory."""
    servers = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    yield tuple(f"127.0.0.1:{s.getsockname()[1]}" for s in servers)
    for s in servers:
        s.close()


def segment_path(shm: str, addresses) -> str:
    return os.path.join(shm, segment_name(RUN, "h", tuple(addresses), NUMEL))


def cannot_open(cache: SegmentCache, monkeypatch) -> None:
    """This member's cache fails to take the host's segment, as when another Unix user's peers made the file."""

    async def take(key, name, *args):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(cache.shm_dir, name))

    monkeypatch.setattr(cache, "take", take)


def host_round(shm: str, addresses, round_id: int, epoch: int = 0, caches=None, late=(), shm_dirs=None) -> list:
    """Every member's outcome of one round of one host (its result tensor, or what it raised). Members in ``late``
    start 50 ms after the others (ten liveness checks), so the others look for their markers meanwhile."""
    caches = caches or [SegmentCache(shm) for _ in addresses]
    config = AllReduceConfig(timeout_s=DEADLINE_S)

    async def member(rank: int):
        if rank in late:
            await asyncio.sleep(0.05)
        group = Group(RUN, epoch, round_id, tuple(addresses), rank)
        result = torch.empty(NUMEL)
        hr = HostRound(OnTheLoop(), group, ("h",) * len(addresses), config, shm_dir=(shm_dirs or {}).get(rank, shm))
        await hr.run(torch.full((NUMEL,), float(rank + 1)), 1.0, None, result, no_other_host, caches[rank])
        return result

    async def everyone():
        return await asyncio.gather(*(member(r) for r in range(len(addresses))), return_exceptions=True)

    try:
        return asyncio.run(everyone())
    finally:
        for cache in caches:
            cache.close()


def mean_of_ranks(n: int) -> float:
    return sum(range(1, n + 1)) / n


def write(path: str, content: bytes) -> None:
    with open(path, "wb") as f:
        f.write(content)


# -- a member that cannot join ------------------------------------------------------------------------------------


def test_a_member_that_cannot_open_the_segment_fails_the_round_at_once_for_every_member_naming_it(
    tmp_path, addresses, monkeypatch
):
    caches = [SegmentCache(str(tmp_path)) for _ in addresses]
    cannot_open(caches[1], monkeypatch)
    outcomes = host_round(str(tmp_path), addresses, round_id=7, caches=caches)
    # It stops with an error that says what to do (a retry would fail the same way), its cause kept.
    assert isinstance(outcomes[1], SharedMemoryUnusable) and "--host-id" in str(outcomes[1])
    assert isinstance(outcomes[1].__cause__, PermissionError)
    for rank in (0, 2):
        failure = outcomes[rank]
        assert isinstance(failure, MemberFailure), failure
        assert failure.failed_ranks == (1,) and failure.failed == (addresses[1],)
        reason = failure.reasons[1]
        assert reason.startswith("it could not join the host's shared memory: PermissionError")
        assert "Permission denied" in reason


def test_a_round_a_member_could_not_join_leaves_neither_segment_nor_marker(tmp_path, addresses, monkeypatch):
    caches = [SegmentCache(str(tmp_path)) for _ in addresses]
    cannot_open(caches[2], monkeypatch)
    outcomes = host_round(str(tmp_path), addresses, round_id=7, caches=caches)
    assert [type(o).__name__ for o in outcomes] == ["MemberFailure", "MemberFailure", "SharedMemoryUnusable"]
    assert os.listdir(tmp_path) == []


def test_the_leader_that_cannot_open_the_segment_is_named_as_any_member(tmp_path, addresses, monkeypatch):
    caches = [SegmentCache(str(tmp_path)) for _ in addresses]
    cannot_open(caches[0], monkeypatch)
    outcomes = host_round(str(tmp_path), addresses, round_id=3, epoch=2, caches=caches)
    assert all(isinstance(o, MemberFailure) and o.failed_ranks == (0,) for o in outcomes[1:]), outcomes


def test_a_member_whose_marker_cannot_be_written_still_stops_saying_why(tmp_path, addresses, monkeypatch):
    cache = SegmentCache(str(tmp_path / "missing"))  # no directory to write the marker in
    cannot_open(cache, monkeypatch)
    group = Group(RUN, 0, 1, tuple(addresses), 1)
    hr = HostRound(OnTheLoop(), group, ("h",) * 3, AllReduceConfig(timeout_s=DEADLINE_S), shm_dir=cache.shm_dir)
    with pytest.raises(SharedMemoryUnusable, match="Permission denied"):
        asyncio.run(hr.run(torch.ones(NUMEL), 1.0, None, torch.empty(NUMEL), no_other_host, cache))
    assert not os.path.exists(cache.shm_dir)


# -- markers that do not concern the round ---------------------------------------------------------------------------


@pytest.mark.parametrize("earlier", [(6, 0), (7, 0)], ids=["an earlier round", "an earlier epoch"])
def test_a_marker_from_another_round_does_not_fail_the_next_round(tmp_path, addresses, earlier):
    round_id, epoch = 7, 1
    path = segment_path(str(tmp_path), addresses)
    assert leave_marker(path, 1, 1, round_tag(*earlier), time.time() + DEADLINE_S, PermissionError("denied"))
    outcomes = host_round(str(tmp_path), addresses, round_id, epoch, late=(1,))
    assert all(isinstance(o, torch.Tensor) for o in outcomes), outcomes
    assert all(torch.all(o == mean_of_ranks(3)) for o in outcomes)


def _marker(**fields) -> bytes:
    good = {"tag": round_tag(7, 0), "index": 1, "rank": 1, "deadline": time.time() + 60, "reason": "EMFILE"}
    return json.dumps({**good, **fields}).encode()


MALFORMED = {
    "not JSON": b"\x00\xffPermissionError",
    "a JSON list": b"[1, 2, 3]",
    "deeply nested": b"[" * MARKER_BYTES,
    "too large": _marker(reason="x" * MARKER_BYTES),
    "a string tag": _marker(tag=str(round_tag(7, 0))),
    "a boolean rank": _marker(rank=True),
    "no reason": json.dumps({"tag": round_tag(7, 0), "index": 1, "rank": 1, "deadline": 0}).encode(),
    "an infinite deadline": _marker().replace(b'"deadline": ', b'"deadline": 1e999, "x": '),
    "another member's rank": _marker(rank=2),
}


@pytest.mark.parametrize("content", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_marker_is_ignored(tmp_path, addresses, content):
    write(marker_name(segment_path(str(tmp_path), addresses), 1), content)
    outcomes = host_round(str(tmp_path), addresses, round_id=7, late=(1,))
    assert all(isinstance(o, torch.Tensor) and torch.all(o == mean_of_ranks(3)) for o in outcomes), outcomes


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_a_marker_that_is_no_regular_file_is_ignored_without_following_or_waiting_on_it(tmp_path, addresses, kind):
    marker = marker_name(segment_path(str(tmp_path), addresses), 1)
    if kind == "symlink":
        write(str(tmp_path / "elsewhere"), _marker())
        os.symlink(tmp_path / "elsewhere", marker)
    elif kind == "fifo":
        os.mkfifo(marker)
    else:
        os.mkdir(marker)
    outcomes = host_round(str(tmp_path), addresses, round_id=7, late=(1,))
    assert all(isinstance(o, torch.Tensor) for o in outcomes), outcomes


# -- a marker does not outlive its round --------------------------------------------------------------------------


def test_removing_a_segment_removes_its_markers_but_not_a_later_rounds(tmp_path):
    path = str(tmp_path / "loconet-hl-clear-n10")
    seg = HostSegment(path, 3, 10, 0, deadline_unix=time.time() + 60)
    seg.join(round_tag(5, 0))
    deadline = time.time() + 60
    assert leave_marker(path, 1, 1, round_tag(5, 0), deadline, OSError("this round"))
    assert leave_marker(path, 2, 2, round_tag(6, 0), deadline, OSError("the next round"))
    seg.drop()
    assert os.listdir(tmp_path) == [os.path.basename(marker_name(path, 2))]


def test_sweep_removes_markers_past_their_rounds_deadline_and_never_takes_one_for_a_segment(tmp_path):
    path = str(tmp_path / "loconet-hl-sweep-n10")
    now = time.time()
    assert leave_marker(path, 0, 0, round_tag(1, 0), now - 60, OSError("long ago"))
    assert leave_marker(path, 1, 1, round_tag(1, 0), now + 60, OSError("this round"))
    malformed = marker_name(path, 2)
    write(malformed, b"junk")
    os.utime(malformed, (now - 60, now - 60))
    removed = sweep_stale(str(tmp_path), now=now)
    assert sorted(removed) == sorted(os.path.basename(marker_name(path, k)) for k in (0, 2))
    assert os.listdir(tmp_path) == [os.path.basename(marker_name(path, 1))]
