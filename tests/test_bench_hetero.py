"""``loconet bench hetero``: the methods it runs, how it reads their events, and one small run end to end.

The end-to-end run (3 peers, one slowed, a few seconds per method, a tiny model) checks the report's
fields and invariants, never its timings or losses against a threshold (shared, noisy machines).
"""

from __future__ import annotations

import pytest

from collectives.errors import ConfigError
from peer.bench.fields import undocumented
from peer.bench.hetero import (
    FIELDS,
    TARGET,
    HeteroConfig,
    SlowPeer,
    committed_field,
    eval_curve,
    parse_slow,
    plan,
    run,
    time_to_target,
    train_config,
    training_interval_s,
)
from peer.tasks.base import TaskConfig

pytestmark = pytest.mark.timeout(600)

TINY = TaskConfig(d_model=16, n_layers=1, n_heads=2, batch_size=4, seq_len=16, eval_batches=1)
ISSUE_FIELDS = {"method", "final_eval_loss", "time_to_target_s", "bytes_sent_per_peer", "rounds", "median_staleness"}
RUN = ("diloco", "diloco-time", "async", "noloco")


@pytest.fixture(scope="module")
def report():
    config = HeteroConfig(peers=3, slow=(SlowPeer("peer2", 2.0),), duration_s=2.0, sync_every=4, task_config=TINY,
                          methods=RUN)
    return run(config)


def test_the_report_has_the_fields_the_issue_names(report):
    assert {"entropy_floor", "target_eval_loss", "methods"} <= set(report)
    for entry in report["methods"]:
        assert ISSUE_FIELDS <= set(entry)


def test_every_field_of_the_report_is_documented(report):
    assert undocumented(report, FIELDS) == []


def test_target_runs_first_and_its_final_loss_is_the_target(report):
    assert [e["method"] for e in report["methods"]] == [TARGET, *RUN]
    target = report["methods"][0]
    assert report["target_eval_loss"] == target["final_eval_loss"] == target["eval_curve"][-1][1]
    # Its own curve ends at the target, so it reaches it within its run.
    assert target["time_to_target_s"] is not None
    assert target["time_to_target_s"] <= target["eval_curve"][-1][0]


def test_time_to_target_is_the_first_point_of_the_curve_at_or_below_the_target(report):
    for entry in report["methods"]:
        assert entry["time_to_target_s"] == time_to_target(entry["eval_curve"], report["target_eval_loss"])


def test_every_method_commits_rounds_and_only_async_reports_staleness(report):
    for entry in report["methods"]:
        assert entry["rounds"] > 0, entry["method"]
        assert entry["bytes_sent_per_peer"] > 0, entry["method"]
        assert set(entry["contributions_per_peer"]) == {"peer0", "peer1", "peer2"}
        if entry["method"] == "async":
            assert entry["median_staleness"] >= 0
        else:
            assert entry["median_staleness"] is None, entry["method"]


def test_only_noloco_reports_groups_and_the_replicas_spread(report):
    for entry in report["methods"]:
        if entry["method"] == "noloco":
            assert entry["largest_group"] in (2, 3)  # three peers: a pair and one idle, or one trio
            assert entry["spread_max"] >= entry["spread_final"] >= 0
        else:
            assert (entry["largest_group"], entry["spread_max"], entry["spread_final"]) == (None, None, None)


def test_diloco_time_syncs_every_target_round_time_and_async_rounds_take_the_fast_peers(report):
    m = {e["method"]: e for e in report["methods"]}
    assert report["config"]["sync_seconds_measured"] is True
    assert m["diloco-time"]["options"] == {"sync_seconds": report["config"]["sync_seconds"]}
    assert m["async"]["options"] == {"sync_every": 4, "buffer": 2, "staleness": "inverse-sqrt"}


def test_the_async_ratio_divides_asyncs_time_by_dilocos(report):
    m = {e["method"]: e for e in report["methods"]}
    a, d = m["async"]["time_to_target_s"], m["diloco"]["time_to_target_s"]
    assert report["time_to_target_async_over_diloco"] == (a / d if a is not None and d else None)


# -- the methods ------------------------------------------------------------------------------


@pytest.mark.parametrize("method,algorithm,options", [
    ("diloco", "diloco", {"sync_every": 50, "sync_seconds": None}),
    ("diloco-time", "diloco", {"sync_seconds": 2.5}),
    ("async", "async-diloco", {"buffer": 3, "staleness": "inverse-sqrt"}),
    ("async-unweighted", "async-diloco", {"buffer": 3, "staleness": "constant"}),
])
def test_each_method_runs_its_algorithm_with_its_options(method, algorithm, options):
    train = train_config(method, HeteroConfig(peers=4, duration_s=30.0, sync_every=50), sync_seconds=2.5)
    assert (train.algorithm, train.duration_s, train.eval_every) == (algorithm, 30.0, 50)
    for name, value in options.items():
        assert getattr(train.options, name) == value


@pytest.mark.parametrize("registered,runs,skipped", [
    (("diloco", "async-diloco", "noloco"), [TARGET, "diloco", "async", "noloco"], []),
    (("diloco", "async-diloco"), [TARGET, "diloco", "async"], ["noloco"]),
])
def test_noloco_runs_once_registered_and_is_skipped_with_a_reason_before(registered, runs, skipped):
    ran, left = plan(("diloco", "async", "noloco"), registered)
    assert ran == runs
    assert [s["method"] for s in left] == skipped
    assert all("'noloco' is not registered" in s["reason"] for s in left)


def test_by_default_the_last_peer_is_three_times_slower_and_async_waits_for_the_others():
    config = HeteroConfig(peers=4)
    assert config.slow == (SlowPeer("peer3", 3.0),)
    assert (config.fast_peers, config.k, config.evals_every) == (["peer0", "peer1", "peer2"], 3, 50)


@pytest.mark.parametrize("text,peer", [("peer3:x=3", SlowPeer("peer3", 3.0)), ("peer0:x=1.5", SlowPeer("peer0", 1.5))])
def test_a_slow_peer_is_written_peer_x_factor(text, peer):
    assert parse_slow(text) == peer


@pytest.mark.parametrize("text", ["peer3x3", "peer3:x=1", "node1:x=3", "peer3:x=", "peer3"])
def test_a_slow_peer_written_otherwise_is_refused_with_the_form(text):
    with pytest.raises(ConfigError, match=r"write PEER:x=X with X above 1, e\.g\. peer3:x=3"):
        parse_slow(text)


@pytest.mark.parametrize("fields,message", [
    ({"slow": (SlowPeer("peer4", 3.0),)}, "--slow peer4 names no peer of this run: its peers are peer0..peer3"),
    ({"slow": (SlowPeer("peer1", 2.0), SlowPeer("peer1", 3.0))}, "--slow names a peer twice"),
    ({"peers": 2, "slow": (SlowPeer("peer0", 2.0), SlowPeer("peer1", 2.0))}, "leave at least one at full speed"),
    ({"methods": ("diloco", "sync")}, "unknown method 'sync' in --methods"),
    ({"methods": ("async", "async")}, "--methods names a method twice"),
    ({"duration_s": 0.0}, "--duration must be positive"),
    ({"peers": 1}, "--peers must be at least 2"),
])
def test_bad_settings_are_refused_before_any_run(fields, message):
    with pytest.raises(ConfigError, match=message):
        HeteroConfig(**fields)


# -- reading the events ------------------------------------------------------------------------


def test_the_runs_eval_loss_is_the_mean_of_each_peers_latest_from_when_all_have_evaluated():
    evals = {"peer0": [(101.0, 4.0), (103.0, 2.0)], "peer1": [(102.0, 3.0), (104.0, 1.0)], "peer2": []}
    # peer2 never evaluated (it is not waited for); the curve starts when peer1 first evaluates.
    assert eval_curve(evals, t0=100.0) == [(2.0, 3.5), (3.0, 2.5), (4.0, 1.5)]


def test_a_non_finite_eval_makes_the_curve_unknown_until_that_peer_evaluates_again():
    evals = {"peer0": [(1.0, None), (3.0, 2.0)], "peer1": [(2.0, 4.0)]}
    assert eval_curve(evals, t0=0.0) == [(2.0, None), (3.0, 3.0)]


@pytest.mark.parametrize("target,expected", [(3.0, 1.0), (2.5, 2.0), (2.0, 2.0), (1.0, None)])
def test_time_to_target_is_the_first_time_at_or_below_it(target, expected):
    curve = [(0.5, None), (1.0, 3.0), (2.0, 2.0), (3.0, 2.5)]
    assert time_to_target(curve, target) == expected


def _committed(round_id, t=0.0, contributed=True, staleness=None, wall_s=0.0):
    return {"event": "committed", "round": round_id, "t": t, "contributed": contributed, "staleness": staleness,
            "wall_s": wall_s}


def test_staleness_and_group_size_are_read_from_the_rounds_the_peer_contributed_to():
    events = [{"event": "joined", "round": 0, "t": 0.0}, _committed(1, staleness=0), _committed(2, contributed=False),
              _committed(3, staleness=2), {**_committed(4), "group": 2}]
    assert committed_field(events, "staleness") == [0, 2]
    assert committed_field(events, "group") == [2]


def test_a_peers_training_time_per_round_leaves_out_the_rounds_own_time():
    events = [{"event": "joined", "round": 0, "t": 10.0}, _committed(1, t=13.0, wall_s=0.5),
              _committed(2, t=15.0, contributed=False), _committed(3, t=17.0, wall_s=1.0)]
    assert training_interval_s(events) == [2.5, 3.0]
