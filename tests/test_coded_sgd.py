"""Gradient-coded and plain synchronous SGD on real rounds: exact gradients, identical workers, stragglers left out.

Workers are threads of this process, each an ``ElasticCollective`` with its own gRPC server on 127.0.0.1,
around an in-process coordinator (``peer/bench/coding.py`` runs them; these tests read what it measured).
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from collectives.elastic import CaughtUp, CommittedResult
from collectives.errors import ConfigError, ProtocolError, QuorumMismatch
from collectives.membership.roundplan import RoundPlan
from optimizers.coded import CodedSGD, CodedSGDConfig, SyncSGDConfig, plan_roster
from optimizers.peers import LocalPeer
from peer.bench import coding
from peer.bench.coding import CodingBenchConfig, full_gradient, method, run_method
from peer.runtime.training import TaskPartitions
from peer.tasks.base import TaskConfig, batch_stream
from peer.tasks.registry import make_task

pytestmark = pytest.mark.timeout(180)

TINY = TaskConfig(d_model=16, n_layers=1, n_heads=2, batch_size=4, seq_len=16)


def bench(**fields) -> CodingBenchConfig:
    """A short, unslowed benchmark configuration on a tiny model."""
    defaults = {"peers": 4, "stragglers": 1, "pattern": "none", "steps": 3, "unit_s": 0.0, "eval_every": 1,
                "check_every": 1, "overrun": 1.0, "task_config": TINY}
    return CodingBenchConfig(**{**defaults, **fields})


@pytest.fixture(scope="module")
def task():
    return make_task("synthetic-lm", TINY)


@pytest.fixture(scope="module")
def coded(task):
    """Four workers, s=1 (fractional repetition), four steps."""
    config = bench(steps=4)
    return run_method(method("coded", config), config, task)


@pytest.fixture(scope="module")
def wait(task):
    """The same four steps, waiting for all four workers."""
    config = bench(steps=4)
    return run_method(method("wait", config), config, task)


def test_the_coded_gradient_is_the_full_gradient(coded):
    assert coded["steps_committed"] == 4
    assert coded["identical"]
    assert coded["decode_rel_error_max"] < 1e-5


def test_a_cyclic_code_decodes_the_full_gradient(task):
    config = bench(peers=5)  # s+1 = 2 does not divide 5: the cyclic MDS code
    result = run_method(method("coded", config), config, task)
    assert result["identical"]
    assert result["decode_rel_error_max"] < 1e-5


def test_workers_slow_to_start_do_not_make_the_first_rounds_smaller(task, monkeypatch):
    # Three of four threads start after the coordinator's startup grace (one lease, 5 s), as on a loaded machine:
    # the first rounds used to form over the one registered worker, the gradient of one partition of one.
    worker = coding._worker

    def late(rank, *args):
        if rank > 0:
            time.sleep(5.5)
        worker(rank, *args)

    monkeypatch.setattr(coding, "_worker", late)
    config = bench(steps=2)
    result = run_method(method("coded", config), config, task)
    assert result["identical"]
    assert result["decode_rel_error_max"] < 1e-5


def test_waiting_for_all_applies_the_full_gradient_too(wait):
    assert wait["identical"]
    assert wait["decode_rel_error_max"] < 1e-5
    assert wait["members_per_round"] == [4, 4]


def test_coded_and_wait_for_all_follow_the_same_loss_curve(coded, wait):
    for (step_a, loss_a), (step_b, loss_b) in zip(coded["eval_losses"], wait["eval_losses"], strict=True):
        assert step_a == step_b
        assert loss_a == pytest.approx(loss_b, rel=1e-5)


def test_a_persistent_straggler_is_left_out_and_stays_identical(task):
    config = bench(pattern="persistent,worker=3,x=40", unit_s=0.02, steps=4)
    result = run_method(method("coded", config), config, task)
    assert result["identical"]
    assert result["steps_committed"] == 4
    # Rounds went on without the straggler (all but the first, whose roster nobody knew before it formed).
    assert result["members_per_round"][0] <= 3
    assert result["decode_rel_error_max"] < 1e-5


def test_ignoring_a_straggler_applies_a_biased_gradient(task):
    config = bench(pattern="persistent,worker=3,x=40", unit_s=0.02, steps=3)
    result = run_method(method("ignore", config), config, task)
    assert result["identical"]
    assert result["decode_rel_error_max"] > 1e-3  # worker 3's partition is missing from every step


def test_dynamic_backup_workers_run_and_stay_identical(task):
    config = bench(steps=4)
    result = run_method(method("backup", config), config, task)
    assert result["identical"]
    assert result["steps_committed"] == 4
    assert 1 <= result["k_chosen"][0] <= result["k_chosen"][2] <= 4


def test_a_single_worker_applies_its_own_gradient_with_sgd(task):
    model = task.build_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = CodedSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), LocalPeer(), SyncSGDConfig())
    _, samples = opt.train_step(TaskPartitions(task))
    assert samples == TINY.batch_size
    expected = full_gradient(task, task.build_model(), torch.cat([b.flatten() for b in before]), 1, 0)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    lr = SyncSGDConfig().outer.lr
    assert torch.allclose(after.double(), torch.cat([b.flatten() for b in before]).double() - lr * expected,
                          atol=1e-6)
    assert opt.global_step == 1


class LateByTwoRounds(LocalPeer):
    """A peer the run went on without: its sync raises CaughtUp with the two rounds it missed."""

    def sync(self, tensors, **kwargs):
        numel = sum(t.numel() for t in tensors)
        raise CaughtUp([CommittedResult(r, "sync-sgd", torch.zeros(numel)) for r in (1, 2)])


def test_a_step_that_caught_up_counts_as_the_runs_step_as_the_training_loop_counts(task):
    model = task.build_model()
    opt = CodedSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), LateByTwoRounds(), SyncSGDConfig())
    opt.train_step(TaskPartitions(task))
    assert (opt.global_step, opt.inner_steps) == (2, 2)


def test_step_is_refused_with_what_to_call_instead(task):
    model = task.build_model()
    opt = CodedSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), LocalPeer(), CodedSGDConfig())
    with pytest.raises(ConfigError, match="train_step"):
        opt.step()


def plan(policy: str, members: str, candidates: str = "abcd") -> RoundPlan:
    return RoundPlan(action="round", round_id=7, members=tuple((m, "") for m in members), policy=policy,
                     candidates=tuple(candidates))


class Named(LocalPeer):
    peer_id = "a"


@pytest.mark.parametrize("policy,members,error,why", [
    ("all", "abcd", QuorumMismatch, "needs the coordinator's --quorum coded:1"),
    ("coded:2", "abcd", QuorumMismatch, "needs the coordinator's --quorum coded:1"),
    ("coded:1", "ab", ProtocolError, "undecodable"),
    ("coded:1", "abx", ProtocolError, "not all in its roster"),
])
def test_a_coded_worker_refuses_a_round_it_cannot_take_part_in(task, policy, members, error, why):
    model = task.build_model()
    opt = CodedSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), Named(), CodedSGDConfig(stragglers=1))
    with pytest.raises(error, match=why):
        opt._weight(plan(policy, members))


@pytest.mark.parametrize(("config", "policy", "problem"), [
    (CodedSGDConfig(stragglers=1), "coded:1", ""),
    (CodedSGDConfig(stragglers=1, code="frc"), "coded:1,code=frc", ""),
    (CodedSGDConfig(stragglers=1, code="frc"), "coded:1", "coded-sgd --code frc needs the coordinator's --quorum "
                                                          "coded:1,code=frc (the coordinator checks rounds with the "
                                                          "workers' code), and the run's is 'coded:1'"),
    (CodedSGDConfig(stragglers=1, code="cyclic"), "coded:1,code=frc", "coded-sgd --code cyclic needs the "
                                                                      "coordinator's --quorum coded:1,code=cyclic (the "
                                                                      "coordinator checks rounds with the workers' "
                                                                      "code), and the run's is 'coded:1,code=frc'"),
    (CodedSGDConfig(stragglers=1), "coded:2", "coded-sgd --stragglers 1 needs the coordinator's --quorum coded:1, "
                                              "and the run's is 'coded:2'"),
    (CodedSGDConfig(stragglers=2), "backup", "coded-sgd --stragglers 2 needs the coordinator's --quorum coded:2, "
                                             "and the run's is 'backup'"),
    (CodedSGDConfig(stragglers=0), "all", "coded-sgd --stragglers 0 needs the coordinator's --quorum coded:0, "
                                          "and the run's is 'all'"),
    (SyncSGDConfig(dynamic_k=True), "backup", ""),
    (SyncSGDConfig(dynamic_k=True), "first-k:3", "sync-sgd --dynamic-k needs the coordinator's --quorum backup, "
                                                 "and the run's is 'first-k:3'"),
    (SyncSGDConfig(), "all", ""),
    (SyncSGDConfig(), "allbut:1", ""),
    (SyncSGDConfig(), "backup", ""),
])
def test_which_quorum_policies_serve_a_step_round_algorithm(config, policy, problem):
    assert config.quorum_problem(policy) == problem


def test_a_coded_workers_weight_is_its_decoding_coefficient_over_n(task):
    model = task.build_model()
    opt = CodedSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), Named(), CodedSGDConfig(stragglers=1))
    # Fractional repetition over abcd: groups {a, b} and {c, d}; a is its group's lowest survivor.
    assert opt._weight(plan("coded:1", "acd")) == 0.25
    assert opt._weight(plan("coded:1", "abd")) == 0.25


def test_the_roster_is_the_candidates_or_the_members():
    assert plan_roster(plan("coded:1", "ab")) == tuple("abcd")
    assert plan_roster(plan("all", "ba", candidates="")) == ("a", "b")


def test_partition_batches_are_the_task_streams_by_step(task):
    data = TaskPartitions(task)
    for j, t in [(1, 0), (1, 1), (2, 5), (1, 2), (1, 0)]:
        expected = next(batch_stream(task, j, 3, t))
        got = data.batch(j, 3, t)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_worker_leaving_rebuilds_the_code_for_the_rest(task):
    """Four workers, one leaves after two steps: the rounds after its Leave decode over three partitions, exactly."""
    from collectives.elastic import ElasticCollective, ElasticConfig
    from peer.coordinator.config import CoordinatorConfig
    from peer.runtime.training import TrainConfig, make_optimizer
    from tests.support.coordinator import run_workers

    train = TrainConfig.of("coded-sgd", steps=5, stragglers=1)
    # Every worker records the gradients it applies: under load any of them can be the straggler a round went
    # on without, which then takes the run's state instead of applying that step (a resync calls no hook).
    applied: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    digests: dict[int, str] = {}
    errors: list[str] = []
    gate = threading.Barrier(3)
    # Set once the fourth worker's Leave was answered. Until then the coordinator counts it in the roster (a round
    # of the other three goes on without it as a straggler, decoding over four partitions): step 2's round may
    # form either way, and under load so could step 3's, so the others start step 3 only once it left.
    left = threading.Event()

    def worker(rank: int, address: str) -> None:
        model = task.build_model()
        peer = ElasticCollective(ElasticConfig(coordinator=address, run_id="leave", name=f"w{rank}"))
        try:
            opt = make_optimizer(model, peer, train)
            opt.on_gradient = lambda step, g: applied.setdefault(
                step, (torch.cat([x.flatten() for x in opt.state.globals]), g.clone()))
            peer.start(has_state=True)
            data = TaskPartitions(task)
            last = 2 if rank == 3 else 5
            while opt.global_step < last:
                if opt.global_step == 3 and rank != 3:
                    left.wait(timeout=60)
                opt.train_step(data)
            digests[rank] = opt.state.digest()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(f"w{rank}: {exc!r}")
        finally:
            if rank != 3:
                gate.wait(timeout=60)
            peer.close(leave=True, reason="done")
            if rank == 3:
                left.set()

    config = CoordinatorConfig(run_id="leave", port=0, dashboard_port=None, min_peers=1, quorum="coded:1",
                               heartbeat_s=0.1, lease_s=5.0)
    run_workers(config, worker, 4, timeout_s=120)
    assert not errors
    assert len({digests[r] for r in range(3)}) == 1
    model = task.build_model()
    for step in (0, 1, 3, 4):
        params, gradient = applied[step]
        n = 4 if step < 2 else 3
        full = full_gradient(task, model, params, n, step)
        assert float((gradient.double() - full).norm() / full.norm()) < 1e-5, step


def test_config_rejects_a_negative_tolerance():
    with pytest.raises(ConfigError, match="stragglers"):
        dataclasses.replace(CodedSGDConfig(), stragglers=-1)


def test_the_harness_gives_an_algorithm_the_quorum_its_rounds_need():
    from peer.coordinator.config import CoordinatorConfig
    from peer.harness.harness import HarnessConfig
    from peer.runtime.training import TrainConfig

    assert HarnessConfig(train=TrainConfig.of("coded-sgd", stragglers=2)).coordinator.quorum == "coded:2"
    assert HarnessConfig(train=TrainConfig.of("sync-sgd", dynamic_k=True)).coordinator.quorum == "backup"
    assert HarnessConfig(train=TrainConfig.of("sync-sgd")).coordinator.quorum == "all"
    chosen = HarnessConfig(train=TrainConfig.of("sync-sgd"), coordinator=CoordinatorConfig(quorum="allbut:1"))
    assert chosen.coordinator.quorum == "allbut:1"


def test_the_harness_refuses_a_chosen_quorum_that_cannot_serve_the_algorithm():
    from peer.coordinator.config import CoordinatorConfig
    from peer.harness.harness import HarnessConfig
    from peer.runtime.training import TrainConfig

    with pytest.raises(ConfigError, match=r"--quorum coded:1, and the run's is 'backup': leave --quorum out and the "
                                          r"harness sets coded:1"):
        HarnessConfig(train=TrainConfig.of("coded-sgd"), coordinator=CoordinatorConfig(quorum="backup"))


def test_the_harness_reads_a_chosen_quorum_as_the_peers_get_it():
    # coded:1,code=auto reaches the peers as coded:1, the auto code's quorum: the harness takes it as they do.
    from peer.coordinator.config import CoordinatorConfig
    from peer.harness.harness import HarnessConfig
    from peer.runtime.training import TrainConfig

    chosen = HarnessConfig(train=TrainConfig.of("coded-sgd"), coordinator=CoordinatorConfig(quorum="coded:1,code=auto"))
    assert chosen.coordinator.policy.spec == "coded:1"
