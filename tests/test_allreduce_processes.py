"""All-reduce among real worker processes on 127.0.0.1: every codec, every aggregator, members killed or paused."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from collectives.allreduce import mean_error_bound
from collectives.codecs import CodecConfig
from collectives.reduce.aggregators import aggregate_rows, make_aggregator
from peer.harness.procgroup import AllReduceJob, ProcessGroup, worker_tensor

pytestmark = pytest.mark.timeout(180)

CODECS = ["none", "fp16", "bf16", "int8", "int4", "int8+zstd"]
_rounds = itertools.count(1)


@pytest.fixture(scope="module")
def five():
    """Five worker processes shared by the tests that break nothing."""
    with ProcessGroup(5) as group:
        yield group


def job(**kw) -> AllReduceJob:
    return AllReduceJob(first_round=next(_rounds), **kw)


def ok_replies(replies, members=None):
    members = range(len(replies)) if members is None else members
    kinds = [replies[r][0] for r in members]
    assert kinds == ["ok"] * len(kinds), replies
    return [replies[r][1] for r in members]


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_gives_bit_identical_results_within_its_bound(five, n, codec):
    members = tuple(range(n))
    j = job(numel=20_011, codec=codec, members=members, check_error=True)
    replies = ok_replies(five.allreduce(j), members)
    assert len({r["sha256"] for r in replies}) == 1
    bound = mean_error_bound(CodecConfig.parse(codec), [worker_tensor(j, r) for r in members])
    assert replies[0]["max_abs_error"] <= bound


@pytest.mark.parametrize(
    "aggregator,weights",
    [
        ("mean", (1.0, 2.0, 0.5, 4.0, 1.0)),
        ("sum", (1.0, -2.0, 0.5, 1.0, 3.0)),
        ("median", None),
        ("trimmed_mean:trim=0.2", None),
    ],
)
def test_aggregators_give_exactly_the_local_reduction_of_the_contributions(five, aggregator, weights):
    j = job(numel=1_003, aggregator=aggregator, weights=weights, return_value=True)
    replies = ok_replies(five.allreduce(j))
    rows = torch.stack([worker_tensor(j, r) for r in range(5)])
    want = aggregate_rows(make_aggregator(aggregator), rows, list(weights or (1.0,) * 5))
    for r in replies:
        assert torch.equal(torch.tensor(r["value"]), want)


def test_tensor_shorter_than_the_group(five):
    j = job(numel=3, return_value=True)
    replies = ok_replies(five.allreduce(j))
    want = torch.stack([worker_tensor(j, r) for r in range(5)]).mean(0)
    assert torch.allclose(torch.tensor(replies[0]["value"]), want)
    assert len({r["sha256"] for r in replies}) == 1


def test_empty_tensor(five):
    replies = ok_replies(five.allreduce(job(numel=0, return_value=True)))
    assert all(r["value"] == [] for r in replies)


def test_bytes_sent_follow_the_butterfly(five):
    # Each member sends (n-1)/n of the tensor in each of the two phases.
    replies = ok_replies(five.allreduce(job(numel=100_000)))
    for r in replies:
        payload = 2 * 4 * 100_000 * 4 // 5
        assert payload <= r["stats"]["bytes_sent"] <= payload * 1.01


@pytest.mark.parametrize("phase", ["scatter", "gather"])
def test_member_killed_in_a_phase_makes_every_survivor_raise_naming_it(phase):
    with ProcessGroup(4) as group:
        j = job(numel=200_000, codec="int8", timeout_s=30, hold_rank=2, hold_phase=phase)
        for r in range(4):
            group.send(r, "allreduce", j)
        assert group.reply(2, 60) == ("held", phase)
        group.signal(2, signal.SIGKILL)
        for r in (0, 1, 3):
            kind, info = group.reply(r, 60)
            assert kind == "failed" and info["type"] == "MemberFailure"
            assert info["failed_ranks"] == (2,) and info["failed"] == (group.addresses[2],)
            assert info["elapsed_s"] < j.timeout_s
        # The survivors go on without the dead member.
        after = job(numel=200_000, codec="int8", members=(0, 1, 3), check_error=True)
        for r in (0, 1, 3):
            group.send(r, "allreduce", after)
        replies = [group.reply(r, 60) for r in (0, 1, 3)]
        assert [k for k, _ in replies] == ["ok"] * 3
        assert len({info["sha256"] for _, info in replies}) == 1
    assert all(_gone(pid) for pid in group.pids)  # close() stopped and reaped every worker


def test_paused_member_makes_the_others_raise_by_the_deadline_naming_it():
    with ProcessGroup(3) as group:
        group.signal(1, signal.SIGSTOP)
        j = job(numel=50_000, timeout_s=2.0)
        for r in (0, 2):
            group.send(r, "allreduce", j)
        for r in (0, 2):
            kind, info = group.reply(r, 60)
            assert kind == "failed" and info["failed_ranks"] == (1,)
            assert info["elapsed_s"] < j.timeout_s + 5
    assert all(_gone(pid) for pid in group.pids)  # close() stopped and reaped every worker


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0) until its (new) parent reaps it.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_workers_die_with_the_process_that_started_them():
    # Both workers busy in a round (rank 0 frozen in it), so neither is reading its pipe.
    script = (
        "import time\nfrom peer.harness.procgroup import AllReduceJob, ProcessGroup\n"
        "g = ProcessGroup(2)\ng.start()\n"
        "j = AllReduceJob(numel=1000, timeout_s=600, hold_rank=0, hold_phase='scatter')\n"
        "g.send(0, 'allreduce', j)\ng.send(1, 'allreduce', j)\nassert g.reply(0, 60)[0] == 'held'\n"
        "print(*g.pids, flush=True)\ntime.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 2
        owner.kill()  # SIGKILL: no cleanup code of the owner runs
        owner.wait(30)
        deadline = time.monotonic() + 30
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(p) for p in pids), "workers outlived the process that started them"
    finally:
        owner.kill()
        owner.wait(30)
        for p in pids:
            if not _gone(p):
                os.kill(p, signal.SIGKILL)
