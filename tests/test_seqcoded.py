"""Sequential gradient coding on rounds (optimizers/seqcoded.py): every applied job is its step's exact gradient.

Two drivers. ``Lockstep`` runs the workers' real ``train_step``s (threads) and sums their prepared messages the
way a ``sum`` all-reduce does, leaving out the stragglers a pattern names (they catch up from the result): the
pattern, not timing, decides who straggles, so every scheme and pattern gives exact counts. The last tests run
real rounds: an in-process coordinator with ``--quorum grace:1`` and one ``ElasticCollective`` per worker.
"""

from __future__ import annotations

import copy
import threading
import time
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch

from collectives.elastic import CaughtUp, CommittedResult, ElasticCollective, ElasticConfig
from collectives.errors import ConfigError, QuorumMismatch
from collectives.gradcoding.seqcoding import make_scheme, simulate
from collectives.gradcoding.stragglermodel import BurstyModel, bursty_pattern, conforms
from collectives.membership.roundplan import RoundPlan
from collectives.reduce.parts import flatten
from optimizers.coded import StepSuperseded
from optimizers.peers import LocalPeer
from optimizers.registry import get_algorithm
from optimizers.seqcoded import HEADER, SeqSGCConfig, SequentialCodedSGD
from peer.coordinator.config import CoordinatorConfig
from tests.support.coordinator import run_workers

pytestmark = pytest.mark.timeout(120)

IDS = ("w0", "w1", "w2", "w3")
WAIT_S = 30.0


class Regression:
    """Batch ``step`` of partition p of P: 3 seeded samples of a noisy linear target (the same on every worker)."""

    def loss(self, model: torch.nn.Module, partition: int, partitions: int, step: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed((step * 1009 + partitions) * 1013 + partition)
        x = torch.randn(3, 4, generator=g)
        y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(3, generator=g)
        return ((model(x).squeeze(-1) - y) ** 2).mean(), 3


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))


MODEL = make_model()


def optimizer(peer, model=None, **config) -> SequentialCodedSGD:
    model = copy.deepcopy(MODEL) if model is None else model
    return SequentialCodedSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), peer, SeqSGCConfig(**config))


def full_gradient(params: torch.Tensor, partitions: int, step: int) -> torch.Tensor:
    """The mean over all partitions' batches of step of the loss gradient at params (float64)."""
    model = copy.deepcopy(MODEL)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(params, model.parameters())
    total = torch.zeros(params.numel(), dtype=torch.float64)
    for p in range(partitions):
        model.zero_grad()
        loss, _ = Regression().loss(model, p, partitions, step)
        loss.backward()
        total += flatten([q.grad for q in model.parameters()]).double()
    return total / partitions


def record(opt: SequentialCodedSGD) -> dict[int, tuple[torch.Tensor, torch.Tensor, int]]:
    """step -> (w_j, the applied gradient, the partitions of its job), for every job opt applies."""
    applied: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
    opt.on_job = lambda step, w, g: applied.__setitem__(step, (w.clone(), g.clone(), opt.scheme.partitions))
    return applied


def max_rel_error(applied) -> float:
    errors = [float((g.double() - full_gradient(w, p, step)).norm() / full_gradient(w, p, step).norm())
              for step, (w, g, p) in applied.items()]
    return max(errors, default=0.0)


# -- a lock-step run ------------------------------------------------------------------------------


class Lockstep:
    """Rounds that wait for every worker of the roster, sum the members' prepared messages and leave out the
    pattern's stragglers (roster indices), who get the committed result as ``CaughtUp``."""

    def __init__(self, pattern, lam: int = 1, rosters=None) -> None:
        self.pattern = list(pattern)
        self.policy = f"grace:{lam},f=0.5"
        self.rosters = rosters or (lambda r: IDS)
        self.cond = threading.Condition()
        self.committed = 0
        self.waiting: dict[str, tuple] = {}
        self.results: dict[int, torch.Tensor] = {}

    def peer(self, pid: str) -> SimpleNamespace:
        def sync(tensors, weight=1.0, tag="", codec=None, aggregator=None, prepare=None):
            return self.sync(pid, flatten(list(tensors)), weight, tag, prepare)

        return SimpleNamespace(peer_id=pid, run_round=lambda: self.committed, sync=sync)

    def sync(self, pid, flat, weight, tag, prepare):
        with self.cond:
            r = self.committed
            roster = tuple(self.rosters(r))
            self.waiting[pid] = (flat, weight, prepare)
            if set(self.waiting) >= set(roster):
                self._commit(r, roster)
            elif not self.cond.wait_for(lambda: self.committed > r, timeout=WAIT_S):
                raise TimeoutError(f"round {r}: {sorted(self.waiting)} of {roster} asked")
            value = self.results[r]
            stragglers = self.pattern[r] if r < len(self.pattern) else set()
            if roster.index(pid) in stragglers:
                raise CaughtUp([CommittedResult(r + 1, tag, value.clone())])
            return SimpleNamespace(value=[value.clone()], round_id=r + 1, stats=None, epoch=0, decisions=[])

    def _commit(self, r, roster) -> None:
        stragglers = self.pattern[r] if r < len(self.pattern) else set()
        members = [pid for i, pid in enumerate(roster) if i not in stragglers]
        total = None
        for rank, pid in enumerate(members):
            flat, weight, prepare = self.waiting[pid]
            plan = RoundPlan(action="round", round_id=r + 1, members=tuple((m, "") for m in members), rank=rank,
                             policy=self.policy, candidates=roster)
            w = weight(plan) if callable(weight) else weight
            sent = w * prepare(plan, flat)
            total = sent if total is None else total + sent
        self.results[r] = total
        self.waiting = {}
        self.committed += 1
        self.cond.notify_all()


def run(optimizers: dict[str, SequentialCodedSGD], rounds: dict[str, int] | int) -> None:
    """Each optimizer's train_step on its own thread until its round count; raise what any of them raised."""
    errors: list[BaseException] = []

    def work(opt, until):
        try:
            while opt.global_step < until:
                opt.train_step(Regression())
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    until = rounds if isinstance(rounds, dict) else dict.fromkeys(optimizers, rounds)
    threads = [threading.Thread(target=work, args=(opt, until[pid]), daemon=True) for pid, opt in optimizers.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT_S)
    assert not any(t.is_alive() for t in threads), "a worker is stuck"
    if errors:
        raise errors[0]


def lockstep(pattern, rounds: int, **config) -> tuple[dict[str, SequentialCodedSGD], dict]:
    step = Lockstep(pattern, lam=config.get("lam", 1))
    opts = {pid: optimizer(step.peer(pid), **config) for pid in IDS}
    applied = record(opts["w0"])
    run(opts, rounds)
    return opts, applied


def identical(opts) -> bool:
    return len({opt.state.digest() for opt in opts.values()}) == 1


@pytest.mark.parametrize("scheme", ["gc", "sr-sgc", "m-sgc"])
@pytest.mark.parametrize("burst,window", [(1, 2), (2, 3)])
def test_under_a_conforming_pattern_every_job_is_exact_and_none_is_lost(scheme, burst, window):
    rounds = 10
    pattern = bursty_pattern(4, burst, window, 1, rounds, seed=3, mode="rotating")
    opts, applied = lockstep(pattern, rounds, scheme=scheme, burst=burst, window=window, lam=1)
    reference = simulate(make_scheme(scheme, BurstyModel(4, burst, window, 1)), pattern)
    assert identical(opts)
    for opt in opts.values():
        assert (opt.jobs_applied, opt.jobs_lost) == (len(reference.completed_at), 0)
        assert opt.jobs_applied + len(opt.jobs) == rounds
    assert opts["w0"].jobs_applied >= rounds - opts["w0"].T
    assert any(pattern)  # the pattern did leave workers out
    assert max_rel_error(applied) < 1e-5


def test_without_stragglers_m_sgc_applies_every_job_t_rounds_late():
    opts, applied = lockstep([], 6, scheme="m-sgc", burst=1, window=3, lam=1)
    w0 = opts["w0"]
    assert (w0.T, w0.jobs_applied, sorted(applied)) == (2, 4, [0, 1, 2, 3])
    assert sorted(w0.jobs) == [4, 5]
    assert max_rel_error(applied) < 1e-5


def test_m_sgc_computes_less_than_plain_gradient_coding():
    opts, _ = lockstep([], 4, scheme="m-sgc", burst=1, window=2, lam=1)
    gc, _ = lockstep([], 4, scheme="gc", burst=1, window=2, lam=1)
    # n=4, B=1, W=2, λ=1: M-SGC computes (λ+1)(W-1+B) = 4 of n((W-1)(λ+1)+B) = 12 partitions a round once
    # T=1 jobs are in flight (round 0 has job 0's chunk only), GC 2 of 4.
    assert list(opts["w0"].assigned_loads) == [Fraction(1, 6)] + [Fraction(1, 3)] * 3
    assert list(gc["w0"].assigned_loads) == [Fraction(1, 2)] * 4
    assert [opt.partitions_computed for opt in opts.values()] == [2 + 3 * 4] * 4


def test_jobs_a_pattern_beyond_the_model_breaks_are_lost_never_applied():
    pattern = [set(), {1, 2}, set(), {3}, {3}, set(), set(), set()]  # two at once, then a burst too long
    model = BurstyModel(4, 1, 2, 1)
    assert not conforms(pattern, model)
    opts, applied = lockstep(pattern, len(pattern), scheme="m-sgc", burst=1, window=2, lam=1)
    reference = simulate(make_scheme("m-sgc", model), pattern)
    assert identical(opts)
    assert opts["w0"].jobs_lost == len(reference.lost) > 0
    assert not set(applied) & set(reference.lost)
    assert opts["w0"].jobs_applied == len(reference.completed_at)
    assert max_rel_error(applied) < 1e-5


def test_a_leave_rebuilds_the_scheme_and_drops_the_jobs_in_flight():
    step = Lockstep([set(), {2}, set(), set(), set(), {0}, set(), set()], rosters=lambda r: IDS if r < 3 else IDS[:3])
    opts = {pid: optimizer(step.peer(pid), scheme="m-sgc") for pid in IDS}
    applied = record(opts["w0"])
    run(opts, {"w0": 8, "w1": 8, "w2": 8, "w3": 3})
    rest = {pid: opts[pid] for pid in IDS[:3]}
    assert identical(rest)
    w0 = rest["w0"]
    # Rounds 0-2 over 4 workers (T = 1: jobs 0, 1 applied, job 2 dropped), rounds 3-7 over 3 (jobs 3-6).
    assert (w0.scheme.n, w0.base, w0.jobs_dropped, w0.jobs_applied) == (3, 3, 1, 6)
    assert sorted(applied) == [0, 1, 3, 4, 5, 6]
    assert max_rel_error(applied) < 1e-5


def test_a_joiner_from_a_snapshot_continues_as_the_worker_it_replaces():
    pattern = bursty_pattern(4, 1, 3, 1, 10, seed=5, mode="random", start=0.5)
    reference, _ = lockstep(pattern, 10, scheme="sr-sgc", burst=1, window=3)
    step = Lockstep(pattern)
    opts = {pid: optimizer(step.peer(pid), scheme="sr-sgc", burst=1, window=3) for pid in IDS}
    run(opts, 5)
    joiner = optimizer(step.peer("w3"), model=make_model(seed=7), scheme="sr-sgc", burst=1, window=3)
    joiner.load_snapshot(opts["w0"].snapshot())
    assert joiner.state.digest() == opts["w0"].state.digest()
    opts["w3"] = joiner
    run(opts, 10)
    assert {opt.state.digest() for opt in opts.values()} == {reference["w0"].state.digest()}
    assert (joiner.jobs_applied, joiner.jobs_lost) == (reference["w0"].jobs_applied, reference["w0"].jobs_lost)


def test_a_snapshot_of_another_model_is_refused_before_anything_changes():
    source = optimizer(LocalPeer(), scheme="m-sgc", window=3)
    source.train_step(Regression())
    target = optimizer(LocalPeer(), model=make_model(seed=1), scheme="m-sgc", window=4)
    before = target.state.digest()
    with pytest.raises(ConfigError, match="--window"):
        target.load_snapshot(source.snapshot())
    assert target.state.digest() == before


def test_a_checkpoint_restores_the_jobs_in_flight():
    source = optimizer(LocalPeer(), scheme="m-sgc", lam=0, window=3)
    for _ in range(3):
        source.train_step(Regression())
    restored = optimizer(LocalPeer(), model=make_model(seed=1), scheme="m-sgc", lam=0, window=3)
    restored.load_state_dict(source.state_dict())
    assert sorted(restored.jobs) == sorted(source.jobs)
    for _ in range(2):
        source.train_step(Regression())
        restored.train_step(Regression())
    assert restored.state.digest() == source.state.digest()



def test_a_checkpoint_written_with_the_whole_straggler_history_still_restores():
    # Before 2026-12-05 the state carried the scheme's whole history instead of its state; such a checkpoint loads.
    source = optimizer(LocalPeer(), scheme="sr-sgc", window=3)
    for _ in range(4):
        source.train_step(Regression())
    old = source.state_dict()
    seq = old["meta"]["seq"]
    seq["history"] = [sorted(s) for s in source.scheme.history]  # all 4 rounds: nothing was forgotten yet
    del seq["scheme"]
    restored = optimizer(LocalPeer(), model=make_model(seed=1), scheme="sr-sgc", window=3)
    restored.load_state_dict(old)
    assert restored.scheme.state_dict() == source.scheme.state_dict()
    source.train_step(Regression())
    restored.train_step(Regression())
    assert restored.state.digest() == source.state.digest()


# -- configuration and rounds ---------------------------------------------------------------------


@pytest.mark.parametrize("fields,why", [
    ({"scheme": "lt"}, "scheme must be one of"),
    ({"burst": 2, "window": 2}, "1 <= burst < window"),
    ({"burst": 0}, "1 <= burst < window"),
    ({"lam": -1}, "lam must be a whole number"),
    ({"code": "random"}, "code must be auto or cyclic"),
    ({"code": "frc"}, "use --code auto"),
    ({"codec": "int8"}, "must be lossless"),
])
def test_a_bad_configuration_says_what_to_change(fields, why):
    with pytest.raises(ConfigError, match=why):
        SeqSGCConfig(**fields)


@pytest.mark.parametrize("scheme,burst,window,delay", [("gc", 2, 5, 0), ("sr-sgc", 2, 5, 2), ("m-sgc", 2, 5, 5)])
def test_the_delay_is_the_schemes(scheme, burst, window, delay):
    assert SeqSGCConfig(scheme=scheme, burst=burst, window=window).delay == delay


def test_it_is_registered_with_a_sum_of_lossless_rounds():
    algorithm = get_algorithm("seq-sgc")
    assert algorithm.config is SeqSGCConfig
    config = algorithm.config()
    assert (config.aggregator, config.codec, config.sync_every, config.expected_quorum()) == ("sum", "none", 1,
                                                                                               "grace:1")


def test_a_round_carries_t_plus_1_job_segments_and_the_header():
    opt = optimizer(LocalPeer(), scheme="m-sgc", burst=1, window=3)
    numel = sum(p.numel() for p in MODEL.parameters())
    assert opt.round_numel("seq-sgc") == 3 * numel + HEADER
    with pytest.raises(ConfigError, match="every peer must run the same algorithm"):
        opt.round_numel("coded-sgd")


@pytest.mark.parametrize("policy", ["coded:1", "grace:2,f=0.5", "all"])
def test_a_round_of_another_quorum_policy_is_refused_naming_the_right_one(policy):
    opt = optimizer(SimpleNamespace(peer_id="w0"), lam=1)
    plan = RoundPlan(action="round", round_id=1, members=(("w0", ""),), policy=policy, candidates=IDS)
    with pytest.raises(QuorumMismatch, match="--quorum grace:1"):
        opt._weight(plan)


@pytest.mark.parametrize(("lam", "policy", "problem"), [
    (1, "grace:1", ""),
    (1, "grace:1,f=0.5", ""),
    (2, "grace:2", ""),
    (1, "grace:2", "seq-sgc --lam 1 needs the coordinator's --quorum grace:1, and the run's is 'grace:2'"),
    (2, "all", "seq-sgc --lam 2 needs the coordinator's --quorum grace:2, and the run's is 'all'"),
    (1, "coded:1", "seq-sgc --lam 1 needs the coordinator's --quorum grace:1, and the run's is 'coded:1'"),
])
def test_only_grace_with_its_lambda_serves_seq_sgc(lam, policy, problem):
    assert SeqSGCConfig(lam=lam).quorum_problem(policy) == problem


def test_a_single_worker_trains_with_every_scheme():
    for scheme in ("gc", "sr-sgc", "m-sgc"):
        opt = optimizer(LocalPeer(), scheme=scheme)
        applied = record(opt)
        for _ in range(4):
            opt.train_step(Regression())
        assert opt.global_step == 4 and opt.jobs_applied >= 4 - opt.T
        assert max_rel_error(applied) < 1e-5


# -- real rounds ----------------------------------------------------------------------------------


# How long a slowed worker waits at most for the run to go on without it (it asks for the round afterwards).


class Slowed:
    """Regression batches; in the chosen rounds, the worker's first batch waits until the run went on without it."""

    def __init__(self, slow_rounds: set[int]) -> None:
        self.slow_rounds = slow_rounds
        self.opt: SequentialCodedSGD | None = None

    def loss(self, model, partition, partitions, step):
        opt = self.opt
        if opt is not None and opt.global_step in self.slow_rounds:
            # Until the run goes on without it, however long its grace lasts on a loaded machine; WAIT_S only
            # bounds a run that never does (the test's assertion then says so).
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                if opt.superseded():
                    raise StepSuperseded(f"round {opt.global_step} went on without this worker")
                time.sleep(0.005)
        return Regression().loss(model, partition, partitions, step)


def real_run(rounds: int, quorum: str, slow: dict[int, set[int]], **config):
    """Four workers on real rounds; (their optimizers, worker 0's applied jobs, errors)."""
    opts: dict[int, SequentialCodedSGD] = {}
    applied: dict = {}
    errors: list[str] = []
    joined, done = threading.Barrier(4), threading.Barrier(4)

    def worker(rank: int, address: str) -> None:
        peer = ElasticCollective(ElasticConfig(coordinator=address, run_id="seq", name=f"w{rank}", keep_results=8))
        data = Slowed(slow.get(rank, set()))
        try:
            opt = opts[rank] = optimizer(peer, **config)
            data.opt = opt
            if rank == 0:
                opt.on_job = lambda step, w, g: applied.__setitem__(step, (w.clone(), g.clone(),
                                                                           opt.scheme.partitions))
            peer.start(has_state=True)
            joined.wait(timeout=WAIT_S)  # every worker is in the roster of the first round
            while opt.global_step < rounds:
                opt.train_step(data)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(f"w{rank}: {exc!r}")
        finally:
            try:
                done.wait(timeout=WAIT_S)  # a worker leaving early would change the others' roster
            except threading.BrokenBarrierError:
                pass
            peer.close(leave=True, reason="done")

    config_ = CoordinatorConfig(run_id="seq", port=0, dashboard_port=None, min_peers=1, quorum=quorum,
                                heartbeat_s=0.05, lease_s=5.0, startup_grace_s=0.0)
    run_workers(config_, worker, 4, timeout_s=90)
    return opts, applied, errors


def test_real_rounds_without_stragglers_apply_every_job_exactly():
    # f huge: the grace never runs out, every round waits for all four.
    opts, applied, errors = real_run(5, "grace:1,f=1000000", {}, scheme="m-sgc", burst=1, window=2, lam=1)
    assert not errors
    assert len({opt.state.digest() for opt in opts.values()}) == 1
    assert [opt.jobs_applied for opt in opts.values()] == [5 - 1] * 4
    assert sorted(applied) == [0, 1, 2, 3]
    assert max_rel_error(applied) < 1e-5


def test_real_rounds_go_on_without_a_bursty_straggler_and_stay_exact():
    # Worker 3 is slow in rounds 1 and 5. A worker left out of a round is often late for the next one too (it
    # fetches the result first), so the model allows bursts of B=2 rounds, one per window of W=3, λ=1.
    rounds, model = 8, BurstyModel(4, 2, 3, 1)
    opts, applied, errors = real_run(rounds, "grace:1,f=1", {3: {1, 5}}, scheme="m-sgc", burst=2, window=3, lam=1)
    assert not errors
    assert len({opt.state.digest() for opt in opts.values()}) == 1
    w0 = opts[0]
    history, slow = list(w0.scheme.history), w0.roster.index(opts[3].me)  # all 8 rounds are kept
    assert slow in history[1] and slow in history[5]  # the rounds went on without it
    if conforms(history, model):  # no other worker happened to be late beyond the model
        assert (w0.jobs_applied, w0.jobs_lost) == (rounds - w0.T, 0)
    assert w0.jobs_applied + w0.jobs_lost + len(w0.jobs) == rounds
    assert max_rel_error(applied) < 1e-5


def test_a_peer_joining_real_rounds_fetches_the_jobs_in_flight_and_the_scheme_grows():
    rounds = 8
    opts: dict[int, SequentialCodedSGD] = {}
    applied: dict = {}
    errors: list[str] = []
    started, done = threading.Event(), threading.Barrier(4)

    def worker(rank: int, address: str) -> None:
        peer = ElasticCollective(ElasticConfig(coordinator=address, run_id="grow", name=f"w{rank}", keep_results=8))
        try:
            # The joiner starts from other parameters: it must take the run's.
            model = make_model(seed=7) if rank == 3 else None
            opt = opts[rank] = optimizer(peer, model=model, scheme="m-sgc", burst=1, window=3)
            if rank == 0:
                opt.on_job = lambda step, w, g: applied.__setitem__(step, (w.clone(), g.clone(),
                                                                           opt.scheme.partitions))
            if rank == 3:
                started.wait(timeout=WAIT_S)
            snapshot = peer.start(has_state=rank != 3)  # the joiner fetches the run's state
            if snapshot is not None:
                opt.load_snapshot(snapshot)
            while opt.global_step < rounds:
                opt.train_step(Regression())
                if rank == 0 and opt.global_step == 3:
                    started.set()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(f"w{rank}: {exc!r}")
        finally:
            started.set()
            try:
                done.wait(timeout=WAIT_S)
            except threading.BrokenBarrierError:
                pass
            peer.close(leave=True, reason="done")

    config = CoordinatorConfig(run_id="grow", port=0, dashboard_port=None, min_peers=3, quorum="grace:1,f=1",
                               heartbeat_s=0.05, lease_s=5.0, startup_grace_s=0.0)
    run_workers(config, worker, 4, timeout_s=90)
    assert not errors
    assert len({opt.state.digest() for opt in opts.values()}) == 1
    assert {opt.scheme.n for opt in opts.values()} == {4}
    assert len({(opt.jobs_applied, opt.jobs_lost, opt.jobs_dropped) for opt in opts.values()}) == 1
    assert opts[0].jobs_dropped > 0  # the jobs in flight when the roster grew
    assert max_rel_error(applied) < 1e-5
