"""Hierarchical rounds: members that share a host reduce through shared memory, one leader per host crosses gRPC.

Real worker processes (peer/harness/procgroup.py) run real rounds; each test kills what it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from collectives.hosts.identity import SHM_DIR
from collectives.hosts.local import (
    ATTACHED,
    DONE,
    PREFIX,
    REDUCED,
    WRITTEN,
    HostPlan,
    HostSegment,
    Layout,
    _create_or_open,
    pre_reducible,
    round_hosts,
    round_tag,
    segment_name,
    sweep_stale,
)
from collectives.hosts.round import reduce_rows
from collectives.membership.roundplan import RoundPlan
from collectives.net.rpc import blocking_channel
from collectives.reduce.aggregation import Aggregator, checked_reduce, finite_weights, weighted_sum
from collectives.reduce.aggregators import AGGREGATORS, AggregatorConfig, make_aggregator, register_aggregator
from peer.coordinator.server import CoordinatorServer
from peer.coordinator.service import CoordinatorConfig
from peer.harness.procgroup import AllReduceJob, ProcessGroup, WorkerConfig
from protos import membership_pb2 as pb
from protos import membership_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(180)

ONE_HOST = ("h",) * 4
TWO_HOSTS = ("a", "a", "b", "b")


@pytest.fixture(scope="module")
def group():
    """Four worker processes, shared by this module's round tests (each job uses its own round ids)."""
    with ProcessGroup(4, WorkerConfig(run_id="hostlocal", codec_threads=0)) as g:
        yield g


def ok(replies: list) -> list[dict]:
    assert [kind for kind, _ in replies] == ["ok"] * len(replies), replies
    return [info for _, info in replies]


def digests(replies: list[dict]) -> set[str]:
    return {r["sha256"] for r in replies}


def segment_path(run_id: str, addresses, numel: int, host: str = "h") -> str:
    return os.path.join(SHM_DIR, segment_name(run_id, host, tuple(addresses), numel))


def inode(path: str) -> int:
    return os.stat(path).st_ino


# -- pure decisions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hosts,rank,local,leaders,leader,shares",
    [
        (("a", "a", "b", "b"), 0, (0, 1), (0, 2), True, True),
        (("a", "a", "b", "b"), 3, (2, 3), (0, 2), False, True),
        (("b", "a", "b", "a"), 2, (0, 2), (0, 1), False, True),
        (("a", "b", "c"), 1, (1,), (0, 1, 2), True, False),
        (("h",) * 4, 2, (0, 1, 2, 3), (0,), False, True),
    ],
)
def test_a_host_plan_groups_members_by_host_with_the_lowest_rank_leading(hosts, rank, local, leaders, leader, shares):
    plan = HostPlan(hosts, rank)
    assert (plan.local, plan.leaders, plan.is_leader, plan.shares_a_host) == (local, leaders, leader, shares)


def test_round_hosts_follow_the_plan_and_a_member_without_a_host_id_is_a_host_of_its_own():
    plan = RoundPlan("round", members=(("p1", "x:1"), ("p2", "x:2"), ("p3", "x:3")), hosts=("h", "", "h"))
    assert round_hosts(plan, ["p1", "p2", "p3"]) == ("h", "peer:p2", "h")
    assert round_hosts(plan, ["p3", "p1"]) == ("h", "h")
    assert round_hosts(RoundPlan("round", members=(("p1", "x:1"),)), ["p1"]) is None


def test_the_in_place_host_reduction_is_the_flat_rounds_weighted_sum_bit_for_bit():
    rows = torch.randn(3, 300_001, generator=torch.Generator().manual_seed(5))
    coef, weight = make_aggregator("mean").host_coefficients([1.0, 2.0, 0.5], alone=True)
    expected = weighted_sum(rows.clone(), coef)
    assert reduce_rows(rows, coef, 0, rows.shape[1]) == [] and torch.equal(rows[0], expected) and weight == 3.5


def test_a_host_whose_weights_are_all_zero_contributes_zeros_with_weight_zero():
    coef, weight = make_aggregator("mean").host_coefficients([0.0, 0.0], alone=False)
    assert coef.tolist() == [0.0, 0.0] and weight == 0.0


def test_a_host_of_a_sum_round_contributes_its_weighted_sum_with_weight_one():
    coef, weight = make_aggregator("sum").host_coefficients([2.0, -1.0, 0.5], alone=False)
    assert coef.tolist() == [2.0, -1.0, 0.5] and weight == 1.0


class DoubleSum(Aggregator):
    """A plugin's linear aggregator that declares it may be reduced within a host: twice the weighted sum."""

    name = "double_sum"
    linear = True
    pre_reducible = True

    def coefficients(self, weights, decisions):
        return 2 * finite_weights(weights).to(torch.float32)

    def host_coefficients(self, weights, alone):
        return finite_weights(weights).to(torch.float32), 1.0

    def prepare(self, weights, decisions):
        coef = self.coefficients(weights, decisions)
        return checked_reduce(len(weights), lambda rows: weighted_sum(rows, coef))


class LinearOnly(DoubleSum):
    """A plugin's linear aggregator that does not declare it (the default)."""

    name = "linear_only"
    pre_reducible = False


@pytest.fixture
def plugins():
    for cls in (DoubleSum, LinearOnly):
        register_aggregator(cls)
    yield
    for cls in (DoubleSum, LinearOnly):
        AGGREGATORS.pop(cls.name)


@pytest.mark.parametrize("aggregator,expected", [
    ("mean", True),
    ("sum", True),
    ("median", False),
    ("trimmed_mean:trim=0.2", False),
    ("krum:f=1", False),
    ("double_sum", True),
    ("linear_only", False),
])
def test_a_host_pre_reduces_when_the_aggregators_class_says_it_may(plugins, aggregator, expected):
    assert pre_reducible(AggregatorConfig.parse(aggregator)) is expected


def test_a_nan_in_a_contribution_names_its_row():
    rows = torch.ones(3, 1000)
    rows[2, 10] = float("nan")
    coef, _ = make_aggregator("mean").host_coefficients([1.0, 1.0, 1.0], alone=True)
    assert reduce_rows(rows, coef, 0, 1000) == [2]


def test_a_leftover_segment_of_a_dead_process_is_swept_past_its_deadline(tmp_path):
    path = str(tmp_path / (PREFIX + "leftover-r1-e0"))
    os.close(_create_or_open(path, Layout(2, 100), deadline_unix=time.time() - 60))
    young = str(tmp_path / (PREFIX + "young-r1-e0"))
    os.close(_create_or_open(young, Layout(2, 100), deadline_unix=time.time() + 60))
    half_made = tmp_path / (PREFIX + "x-r1-e0.tmp-999999999")
    half_made.write_bytes(b"")
    assert sorted(sweep_stale(str(tmp_path))) == sorted([os.path.basename(path), half_made.name])
    assert os.listdir(tmp_path) == [os.path.basename(young)]


# -- rounds between real processes ------------------------------------------------------------------------------


def test_one_host_gives_every_peer_the_flat_rounds_exact_bits(group):
    flat = ok(group.allreduce(AllReduceJob(numel=100_003, seed=3, first_round=1, weights=(1, 2, 3, 0.5))))
    for first, codec in ((2, "none"), (8, "int8")):  # inside a host the sum is exact fp32: no codec
        hier = ok(group.allreduce(
            AllReduceJob(numel=100_003, seed=3, first_round=first, weights=(1, 2, 3, 0.5), codec=codec, hosts=ONE_HOST)
        ))
        assert len(digests(hier)) == 1 and digests(hier) == digests(flat)
        assert all(r["stats"]["bytes_sent"] == 0 for r in hier)


def test_two_hosts_of_two_peers_reach_the_exact_mean_and_identical_bits(group):
    replies = ok(group.allreduce(
        AllReduceJob(numel=50_001, seed=4, first_round=3, hosts=TWO_HOSTS, check_error=True, codec="none")
    ))
    assert len(digests(replies)) == 1
    assert max(r["max_abs_error"] for r in replies) <= 1e-6
    # Only the leaders (ranks 0 and 2) cross gRPC.
    assert [r["stats"]["bytes_sent"] > 0 for r in replies] == [True, False, True, False]


def test_two_hosts_with_int8_agree_on_every_bit(group):
    replies = ok(group.allreduce(
        AllReduceJob(numel=50_001, seed=4, first_round=4, hosts=TWO_HOSTS, check_error=True, codec="int8")
    ))
    assert len(digests(replies)) == 1 and max(r["max_abs_error"] for r in replies) < 0.05


def test_a_non_linear_aggregator_falls_back_to_the_flat_round(group):
    job = AllReduceJob(numel=10_007, seed=6, first_round=5, aggregator="trimmed_mean:trim=0.25")
    flat = ok(group.allreduce(job))
    hier = ok(group.allreduce(AllReduceJob(**{**job.__dict__, "first_round": 6, "hosts": ONE_HOST})))
    assert digests(hier) == digests(flat) and all(r["stats"]["bytes_sent"] > 0 for r in hier)


def test_a_local_member_killed_mid_round_fails_the_round_on_the_others_and_leaves_no_segment():
    with ProcessGroup(4, WorkerConfig(run_id="hostlocal-kill", codec_threads=0)) as g:
        job = AllReduceJob(numel=200_000, first_round=7, hosts=ONE_HOST, hold_rank=2, hold_phase="scatter",
                           timeout_s=60)
        for r in range(4):
            g.send(r, "allreduce", job)
        assert g.reply(2, 60) == ("held", "scatter")
        g.signal(2, signal.SIGKILL)
        started = time.monotonic()
        failures = [g.reply(r, 60) for r in (0, 1, 3)]
        took = time.monotonic() - started
        assert [kind for kind, _ in failures] == ["failed"] * 3, failures
        assert all(info["type"] == "MemberFailure" and tuple(info["failed_ranks"]) == (2,) for _, info in failures)
        assert took < job.timeout_s / 2  # named by its pid, not by the deadline
        assert not os.path.exists(segment_path("hostlocal-kill", g.addresses, 200_000))


@pytest.mark.timeout(120)
def test_a_local_member_stopped_mid_round_is_named_as_stopped_before_the_deadline():
    with ProcessGroup(3, WorkerConfig(run_id="hostlocal-stop", codec_threads=0)) as g:
        job = AllReduceJob(numel=200_000, first_round=7, hosts=ONE_HOST[:3], hold_rank=2, hold_phase="scatter",
                           timeout_s=600)
        path = segment_path("hostlocal-stop", g.addresses, 200_000)
        for r in range(3):
            g.send(r, "allreduce", job)
        assert g.reply(2, 60) == ("held", "scatter")
        g.signal(2, signal.SIGSTOP)
        try:
            failures = [g.reply(r, 90) for r in (0, 1)]  # the deadline is 600 s away
        finally:
            g.signal(2, signal.SIGKILL)
            # The survivors leave the segment to the stopped member; a later round's sweep removes it once the
            # round's deadline has passed (sweep_stale). No round comes after this test: it removes what it made.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        assert [kind for kind, _ in failures] == ["failed"] * 2, failures
        for _, info in failures:
            assert info["type"] == "MemberFailure" and tuple(info["failed_ranks"]) == (2,)
            assert "has been stopped for 10 s" in info["message"]


# -- reusing a host's segment from round to round ----------------------------------------------------------------


def test_consecutive_rounds_reuse_one_segment_and_each_gives_the_flat_rounds_exact_bits(group):
    path = segment_path("hostlocal", group.addresses, 30_011)
    inodes = []
    for k, seed in enumerate((21, 22, 23)):
        job = AllReduceJob(numel=30_011, seed=seed, first_round=40 + 2 * k, weights=(1, 2, 3, 0.5))
        flat = ok(group.allreduce(job))
        hier = ok(group.allreduce(AllReduceJob(**{**job.__dict__, "first_round": 41 + 2 * k, "hosts": ONE_HOST})))
        assert len(digests(hier)) == 1 and digests(hier) == digests(flat)
        inodes.append(inode(path))
    assert len(set(inodes)) == 1


def test_a_round_after_a_failed_round_works_in_a_fresh_segment(group):
    path = segment_path("hostlocal", group.addresses, 20_003)
    ok(group.allreduce(AllReduceJob(numel=20_003, seed=7, first_round=50, hosts=ONE_HOST)))
    before = inode(path)
    failed = group.allreduce(
        AllReduceJob(numel=20_003, seed=7, first_round=51, hosts=ONE_HOST, scales=(1.0, float("nan"), 1.0, 1.0))
    )
    assert [kind for kind, _ in failed] == ["failed"] * 4, failed
    assert not os.path.exists(path) or inode(path) != before
    job = AllReduceJob(numel=20_003, seed=8, first_round=52)
    flat = ok(group.allreduce(job))
    hier = ok(group.allreduce(AllReduceJob(**{**job.__dict__, "first_round": 53, "hosts": ONE_HOST})))
    assert digests(hier) == digests(flat) and inode(path) != before


def test_a_member_gone_means_a_new_segment_and_the_old_one_is_dropped(group):
    everyone = segment_path("hostlocal", group.addresses, 10_007)
    ok(group.allreduce(AllReduceJob(numel=10_007, seed=9, first_round=60, hosts=ONE_HOST)))
    assert os.path.exists(everyone)
    job = AllReduceJob(numel=10_007, seed=9, first_round=61, members=(0, 1, 3))
    flat = ok([r for r in group.allreduce(job) if not r[1].get("skipped")])
    hier = ok([r for r in group.allreduce(AllReduceJob(**{**job.__dict__, "first_round": 62, "hosts": ONE_HOST}))
               if not r[1].get("skipped")])
    assert digests(hier) == digests(flat)
    assert os.path.exists(segment_path("hostlocal", [group.addresses[r] for r in (0, 1, 3)], 10_007))
    assert not os.path.exists(everyone)


def test_closing_the_collectives_leaves_no_shared_memory():
    with ProcessGroup(2, WorkerConfig(run_id="hostlocal-close", codec_threads=0)) as g:
        ok(g.allreduce(AllReduceJob(numel=5_003, seed=1, first_round=1, hosts=("h", "h"))))
        path = segment_path("hostlocal-close", g.addresses, 5_003)
        assert os.path.exists(path)
    assert not os.path.exists(path)


def test_a_segment_is_swept_only_when_every_recorded_process_is_gone(tmp_path):
    path = str(tmp_path / (PREFIX + "kept-n100"))
    seg = HostSegment(path, 2, 100, 0, deadline_unix=time.time() - 60)
    seg.join(round_tag(1, 0))
    seg.finish(DONE)
    assert sweep_stale(str(tmp_path)) == [] and os.path.exists(path)  # this process is alive and may reuse it
    seg.drop()
    assert not os.path.exists(path)


def _two_members_written(tmp_path) -> tuple[HostSegment, HostSegment]:
    path = str(tmp_path / (PREFIX + "barrier-n10"))
    a, b = (HostSegment(path, 2, 10, k, deadline_unix=time.time() + 60) for k in (0, 1))
    for seg in (a, b):
        seg.join(round_tag(5, 1))
    a.set_state(WRITTEN)
    return a, b


def test_a_member_cannot_move_out_of_a_segment_whose_write_barrier_was_passed(tmp_path):
    a, b = _two_members_written(tmp_path)
    b.set_state(WRITTEN)
    assert a.pass_barrier((WRITTEN,)) and not b.try_move() and os.path.exists(a.path)
    a.drop()
    b.close()


def test_a_member_that_moved_out_is_never_counted_at_the_barrier(tmp_path):
    a, b = _two_members_written(tmp_path)
    assert b.try_move() and not os.path.exists(a.path)
    b.set_state(WRITTEN)  # too late: MOVED was decided under the lock, WRITTEN alone does not pass
    assert a.abandoned()
    a.close()
    b.close()


def _lock_held_by_another(seg: HostSegment) -> bool:
    """Whether the segment's file lock is held, seen from another open file of it (flock locks are per open file)."""
    fd = os.open(seg.path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock this probe took
    return False


def test_a_state_is_published_inside_the_files_lock(tmp_path, monkeypatch):
    """So that its readers, under the lock too, see what was written before it on any CPU (ARM reorders stores)."""
    a, b = _two_members_written(tmp_path)
    seen = []
    flock = fcntl.flock

    def recording(fd, op):
        if op == fcntl.LOCK_UN:
            seen.append(("unlock", b.state(1)))
        flock(fd, op)
        if op == fcntl.LOCK_EX:
            seen.append(("lock", b.state(1)))

    monkeypatch.setattr(fcntl, "flock", recording)
    b.set_state(WRITTEN)
    assert seen == [("lock", ATTACHED), ("unlock", WRITTEN)]
    a.close()
    b.close()


def test_publishing_inside_a_synced_block_keeps_the_lock_until_the_block_ends(tmp_path):
    """Nested blocks of one mapping hold the one lock once: an inner release must not drop the outer block's."""
    a, b = _two_members_written(tmp_path)
    with a.synced():
        a.set_state(REDUCED)
        assert a.pass_barrier((WRITTEN, REDUCED)) is False  # b has not written: no barrier, and still locked
        assert _lock_held_by_another(a)
    assert not _lock_held_by_another(a)
    a.close()
    b.close()


# -- the host id through the coordinator -----------------------------------------------------------------------


def test_the_coordinator_hands_every_member_the_host_ids_they_joined_with():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = CoordinatorServer(CoordinatorConfig(
        run_id="hosts", port=0, dashboard_port=None, probe_peers=False, startup_grace_s=0.0, lease_s=30.0,
        join_timeout_s=0.5,
    ))
    try:
        address = asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        with blocking_channel(address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            ids = [
                stub.Join(pb.JoinRequest(run_id="hosts", address=f"127.0.0.1:{9000 + i}", has_state=True,
                                         host_id=host), timeout=5).peer_id
                for i, host in enumerate(("box-a", "box-a", ""))
            ]
            asks = [stub.Quorum.future(pb.QuorumRequest(run_id="hosts", peer_id=p), timeout=20) for p in ids]
            plans = [a.result() for a in asks]
        by_peer = {m.peer_id: m.host_id for m in plans[0].members}
        assert by_peer == dict(zip(ids, ("box-a", "box-a", ""), strict=True))
        assert all(list(p.members) == list(plans[0].members) for p in plans)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# -- which processes share a host ------------------------------------------------------------------


def announced_host_id(configured: str, *wrapper: str) -> str:
    """The host id a fresh process announces for ``configured``, started through ``wrapper`` (e.g. unshare)."""
    code = f"from collectives.hosts.identity import resolve_host_id; print(resolve_host_id({configured!r}))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([*wrapper, sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    if done.returncode != 0:
        pytest.skip(f"cannot start a process through {' '.join(wrapper)}: {done.stderr.strip()[-200:]}")
    return done.stdout.strip()


def test_processes_given_one_host_id_in_one_namespace_announce_one_host():
    assert announced_host_id("rack7") == announced_host_id("rack7") != announced_host_id("rack8")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_processes_given_one_host_id_that_cannot_see_each_others_pids_are_two_hosts():
    # Two containers given one --host-id: each read the other's pid as dead and aborted every round, for good.
    assert announced_host_id("rack7", "unshare", "--pid", "--fork") != announced_host_id("rack7")
