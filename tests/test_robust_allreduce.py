"""Whole-vector aggregators on the butterfly all-reduce: the owners' shares assembled into Krum, Bulyan, clipping.

Each member owns one part; the whole-vector statistic (pairwise distances, norms) is the sum of the owners'
per-part shares, exchanged between the scatter and the reduce. With the lossless codec the result must equal a
brute-force whole-vector computation exactly.
"""

from __future__ import annotations

import pytest
import torch

from collectives.allreduce import AllReduceConfig
from collectives.codecs import CodecConfig
from collectives.errors import MemberFailure
from collectives.reduce.aggregators import AggregatorConfig
from collectives.reduce.round import GroupUnfit
from peer.harness.procgroup import AllReduceJob, ProcessGroup, worker_tensor
from tests.support.robust_reference import brute_bulyan, brute_krum_ranking, clustered, mean_loop

pytestmark = pytest.mark.timeout(120)


def reduce_all(endpoints, x: torch.Tensor, aggregator: str, weights=None, codec: str = "none"):
    """Every member contributes its row of x; returns each member's result."""
    n = x.shape[0]
    e = endpoints(n)
    cfg = AllReduceConfig(codec=CodecConfig.parse(codec), aggregator=AggregatorConfig.parse(aggregator), timeout_s=30)
    weights = weights or [1.0] * n
    futures = [
        c.allreduce_async(g, x[r].clone(), weight=weights[r], config=cfg)
        for r, (c, g) in enumerate(zip(e.collectives, e.groups()))
    ]
    return [f.result(60) for f in futures]


def test_krum_of_seven_selects_what_whole_vector_krum_selects_and_returns_it_exactly(endpoints):
    x = clustered(honest=5, outlier_ranks=[1, 4], length=1001)
    results = reduce_all(endpoints, x, "krum:f=2")
    want = brute_krum_ranking(x, 2, range(7))[0]
    for done in results:
        assert done.decisions[0]["selected"] == [want]
        assert torch.equal(done.value, x[want])


def test_multi_krum_of_seven_averages_the_same_selection_as_brute_force_exactly(endpoints):
    x = clustered(honest=5, outlier_ranks=[0, 6], length=1001)
    weights = [1.0, 2.0, 1.0, 3.0, 1.0, 2.0, 1.0]
    results = reduce_all(endpoints, x, "multi_krum:f=2,m=3", weights)
    chosen = sorted(brute_krum_ranking(x, 2, range(7))[:3])
    want = mean_loop(x[chosen], [weights[i] for i in chosen])
    for done in results:
        assert done.decisions[0]["selected"] == chosen
        assert torch.equal(done.value, want)


def test_bulyan_of_seven_equals_the_papers_definition_exactly(endpoints):
    x = clustered(honest=6, outlier_ranks=[3], length=1001)
    selected, want = brute_bulyan(x, 1)
    for done in reduce_all(endpoints, x, "bulyan:f=1"):
        assert done.decisions[0]["selected"] == selected
        assert torch.equal(done.value, want)


def test_every_member_ends_with_the_same_bits_under_a_lossy_codec(endpoints):
    x = clustered(honest=5, outlier_ranks=[2], length=5003)
    results = reduce_all(endpoints, x, "centered_clip:tau=5,iterations=2", codec="int8")
    assert len({d.value.numpy().tobytes() for d in results}) == 1
    assert len({str(d.decisions) for d in results}) == 1


def test_bulyan_below_4f_plus_3_members_fails_the_round_everywhere_with_the_reason(endpoints):
    with pytest.raises(GroupUnfit, match=r"4f\+3"):
        reduce_all(endpoints, clustered(honest=5, outlier_ranks=[], length=64), "bulyan:f=1")


def test_a_member_with_another_aggregator_is_refused(endpoints):
    e = endpoints(2)
    groups = e.groups()
    futures = [
        e.collectives[r].allreduce_async(
            groups[r], torch.ones(100), config=AllReduceConfig(aggregator=AggregatorConfig.parse(agg), timeout_s=10)
        )
        for r, agg in enumerate(["mean", "median"])
    ]
    for f in futures:
        with pytest.raises(MemberFailure, match="aggregat"):
            f.result(30)


def test_krum_across_five_real_processes_matches_brute_force():
    scales = (1.0, 1.0, 40.0, 1.0, 1.0)
    job = AllReduceJob(numel=10_007, aggregator="krum:f=1", scales=scales, return_value=True)
    with ProcessGroup(5) as group:
        replies = group.allreduce(job)
    rows = torch.stack([worker_tensor(job, r) for r in range(5)])
    want = brute_krum_ranking(rows, 1, range(5))[0]
    assert want != 2, "the scaled-up contribution is never Krum's choice"
    for kind, reply in replies:
        assert kind == "ok", reply
        assert reply["decisions"][0]["selected"] == [want]
        assert torch.equal(torch.tensor(reply["value"]), rows[want])
