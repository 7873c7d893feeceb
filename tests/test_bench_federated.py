"""``loconet bench federated``: its report's shape and fields, on a run small enough for a test."""

from __future__ import annotations

import pytest

from collectives.errors import ConfigError
from peer.bench.federated import (
    FIELDS,
    FederatedBenchConfig,
    _stuck_state,
    aggregator_for,
    round_size,
    run,
    table,
    train_config,
)
from peer.bench.fields import undocumented
from peer.tasks.base import TaskConfig

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def report() -> dict:
    config = FederatedBenchConfig(
        peers=3, rounds=2, local_steps=2, byzantine=1, strategies=("fedavg", "median", "bulyan"),
        task_config=TaskConfig(batch_size=16, dirichlet=100.0),
    )
    return run(config)


def test_the_report_has_the_fields_the_issue_names(report):
    assert list(report)[:6] == ["task", "peers", "rounds", "dirichlet", "byzantine", "attack"]
    assert (report["task"], report["peers"], report["rounds"], report["byzantine"]) == ("digits", 3, 2, 1)
    assert [e["strategy"] for e in report["strategies"]] == ["fedavg", "median", "bulyan"]
    for entry in report["strategies"][:2]:
        for run_ in (entry["clean"], entry["attacked"]):
            assert {"final_accuracy", "final_eval_loss", "bytes_sent_per_peer"} <= set(run_)


def test_every_peer_of_every_run_ends_with_the_same_global_model(report):
    for entry in report["strategies"][:2]:
        assert entry["clean"]["identical"] is True and entry["attacked"]["identical"] is True
        assert entry["clean"]["rounds_committed"] == 2


def test_every_client_sends_its_rounds_over_the_network_as_on_a_machine_of_its_own(report):
    # The clients are threads of one process: with one host id fedavg's rounds went through shared memory (0 bytes,
    # no codec) while the robust aggregators' went over the network with int8.
    for entry in report["strategies"][:2]:
        assert entry["clean"]["bytes_sent_per_peer"] > 0 and entry["attacked"]["bytes_sent_per_peer"] > 0


def test_a_strategy_that_cannot_run_with_so_few_peers_says_why_instead(report):
    bulyan = report["strategies"][2]
    assert bulyan["clean"] == bulyan["attacked"] == {
        "error": "bulyan needs at least 4f+3 = 7 contributions (f=1), got 3; lower f or add peers"
    }
    assert "bulyan: bulyan needs at least 4f+3" in table(report)


def test_every_field_of_the_report_is_documented(report):
    assert undocumented(report, FIELDS) == []


def test_fedavg_is_the_baseline_of_the_loss_ratios(report):
    fedavg = report["strategies"][0]
    assert fedavg["loss_over_fedavg"] == 1.0
    assert fedavg["loss_attacked_over_clean"] == pytest.approx(
        fedavg["attacked"]["final_eval_loss"] / fedavg["clean"]["final_eval_loss"]
    )


@pytest.mark.parametrize(
    ("strategy", "aggregator"),
    [("fedavg", "mean"), ("fedadam", "mean"), ("median", "median"), ("trimmed_mean", "trimmed_mean:trim=0.2500"),
     ("krum", "krum:f=2"), ("multi_krum", "multi_krum:f=2,m=6"), ("bulyan", "bulyan:f=2"),
     ("centered_clip", "centered_clip:tau=0.3"), ("norm_clip", "norm_clip:clip=1.0")],
)
def test_robust_aggregators_are_set_for_the_number_of_attackers(strategy, aggregator):
    assert aggregator_for(strategy, FederatedBenchConfig(peers=8, byzantine=2)) == aggregator


def test_a_sampled_run_waits_for_the_samples_size_not_every_peer():
    assert round_size(FederatedBenchConfig(peers=8)) == 8
    assert round_size(FederatedBenchConfig(peers=8, quorum="sample:0.5")) == 4
    assert round_size(FederatedBenchConfig(peers=8, quorum="sample:3")) == 3


def test_a_sample_raised_to_the_aggregators_minimum_is_verified_as_the_peers_drew_it():
    # Krum needs 2f+3 = 5: the coordinator draws 5 of 5 at sample:0.5, and the check (drawing 3) said false.
    from collectives.membership.sampling import sample_members
    from peer.bench.federated import samples_verified

    config = FederatedBenchConfig(peers=5, quorum="sample:0.5")
    candidates = [f"p{i}" for i in range(5)]
    rounds = [{"round_id": r, "candidates": candidates, "members": list(sample_members(config.seed, r, candidates, 5))}
              for r in (1, 2)]
    assert samples_verified(config, rounds, least=5)
    assert not samples_verified(config, rounds, least=1)


def test_set_gives_an_algorithm_option_to_every_strategy_that_has_it():
    config = FederatedBenchConfig(strategies=("fedavg", "fedprox", "fedadam"), overrides=(("proximal_mu", 0.5),))
    assert train_config("fedprox", config).options.proximal_mu == 0.5
    assert train_config("fedavg", config).options.proximal_mu == 0.5  # FedAvg has the field (off by default)
    assert train_config("fedadam", FederatedBenchConfig(overrides=(("eta", 0.01),))).options.eta == 0.01


def test_set_of_an_option_no_strategy_has_is_refused():
    with pytest.raises(ConfigError, match="--set eta: none of the strategies' algorithms .*fedavg.* has it"):
        FederatedBenchConfig(strategies=("fedavg", "median"), overrides=(("eta", 0.01),))


def test_a_private_run_reports_epsilon_after_every_round():
    config = FederatedBenchConfig(peers=2, rounds=3, local_steps=2, strategies=("fedavg",), dp_clip=1.0, dp_noise=1.0,
                                  task_config=TaskConfig(batch_size=16))
    clean = run(config)["strategies"][0]["clean"]
    eps = clean["epsilon_per_round"]
    assert len(eps) == 3 and eps[0] < eps[1] < eps[2] == clean["epsilon"]
    assert clean["identical"] is True


def test_a_stuck_run_says_where_its_peers_and_rounds_were():
    # A run of the suite hung for the bench's 600 s with every peer in a sync, and said only "the run is stuck".
    status = {
        "peers": [{"peer_id": "p1-a", "state": "active", "activity": "awaiting-round", "last_round": 1}],
        "rounds": [{"round_id": 2, "epoch": 0, "status": "running", "members": ["p1-a"]}],
        "events": [{"kind": "commit", "peer_id": "", "detail": "round 1 (3 members)"}],
    }
    assert _stuck_state(status) == ("peers: p1-a active/awaiting-round at round 1; last rounds: 2.0 running ['p1-a']; "
                                    "last events: commit  round 1 (3 members)")
