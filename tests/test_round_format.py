"""Peers of a run agree on what a round carries (codec, aggregator, length) and what they do with its result (the
outer optimizer's settings, differential privacy's): a peer started with another ``--codec`` or ``--outer-lr`` is
refused at its quorum request, for good once the run committed a round of that tag, and stops with one line
instead of breaking every round it joins or leaving the replicas different (docs/membership.md).

The rule is a pure function with a table; the live cases run a real coordinator in this process
(``support.coordinator.Live``) with made-up peers, and the last test real ``loconet peer`` processes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from collectives.membership.roundformat import FORMAT_DIFFERS, MAX_FORMAT_CHARS, format_difference, round_format
from optimizers.coded import CodedSGDConfig
from optimizers.diloco import DiLoCoConfig
from optimizers.federated import FedConfig
from optimizers.outer_optim import OuterConfig
from optimizers.privacy import DPConfig
from optimizers.seqcoded import SeqSGCConfig
from optimizers.streaming import StreamingConfig
from peer.coordinator.rules import format_refusal
from protos import membership_pb2 as pb

sys.path.insert(0, str(Path(__file__).parent))
from support.coordinator import BY_HAND, RUN, Live, live_coordinators
from support.procs import DaemonRun

pytestmark = pytest.mark.timeout(120)

INT8 = round_format("int8", "mean", 1000)
INT4 = round_format("int4", "mean", 1000)


def test_a_round_format_names_the_codec_the_aggregator_the_length_then_the_settings():
    assert (
        round_format("int8", "trimmed_mean:trim=0.1", 1234)
        == "codec int8, aggregator trimmed_mean:trim=0.1, 1234 values"
    )
    assert round_format("int8", "mean", 5, ("outer sgd", "outer lr 0.7")) == (
        "codec int8, aggregator mean, 5 values, outer sgd, outer lr 0.7"
    )


@pytest.mark.parametrize(
    ("config", "settings"),
    [
        (
            OuterConfig(),
            ("outer sgd", "outer lr 0.7", "outer momentum 0.7", "outer nesterov on", "outer weight decay 0.0"),
        ),
        # The optimizer's own lr named or left out: the same settings.
        (OuterConfig(lr=0.7), OuterConfig().settings()),
        # Nesterov without momentum is plain SGD.
        (
            OuterConfig(momentum=0.0),
            ("outer sgd", "outer lr 0.7", "outer momentum 0.0", "outer nesterov off", "outer weight decay 0.0"),
        ),
        (OuterConfig(momentum=0.0, nesterov=False), OuterConfig(momentum=0.0).settings()),
        # Only the fields the optimizer reads: Adam's betas and eps, not SGD's momentum.
        (
            OuterConfig(name="adam"),
            ("outer adam", "outer lr 0.01", "outer betas 0.9/0.99", "outer eps 1e-08", "outer weight decay 0.0"),
        ),
        (OuterConfig(name="adam", momentum=0.5), OuterConfig(name="adam").settings()),
        (OuterConfig(name="fedavgm"), ("outer fedavgm", "outer lr 1.0", "outer momentum 0.7")),
    ],
)
def test_an_outer_optimizer_names_the_settings_it_applies_a_round_with(config, settings):
    assert config.settings() == settings


@pytest.mark.parametrize(
    ("config", "settings"),
    [
        (DPConfig(), ("dp off",)),
        (DPConfig(clip=1, noise=1.1), ("dp clip 1.0", "dp noise 1.1", "dp min members 2")),  # 1 and 1.0 agree
        (DPConfig(clip=1.0, noise=1.1, delta=1e-3, amplify=True, seed=3, min_members=3),
         ("dp clip 1.0", "dp noise 1.1", "dp min members 3")),
        (DPConfig(clip=1.0, adaptive=0.5), ("dp clip 1.0", "dp noise 1.0", "dp min members 2", "dp adaptive 0.5",
                                            "dp clip lr 0.2", "dp count noise auto")),
    ],
)
def test_differential_privacy_names_what_every_member_clips_and_noises_alike(config, settings):
    assert config.settings() == settings


@pytest.mark.parametrize(
    ("config", "own"),
    [
        (DiLoCoConfig(), ()),
        (FedConfig(), ("dp off",)),
        (FedConfig(dp=DPConfig(clip=0.5, noise=2.0)), ("dp clip 0.5", "dp noise 2.0", "dp min members 2")),
        (CodedSGDConfig(stragglers=2, code="cyclic"), ("stragglers 2", "code cyclic")),
        (SeqSGCConfig(), ("scheme m-sgc", "burst 1", "window 2", "lambda 1", "code auto")),
        (StreamingConfig(fragments=2), ("fragments 2", "fragment split strided")),
    ],
)
def test_an_algorithm_adds_its_own_settings_after_the_outer_optimizers(config, own):
    assert config.round_settings() == (*config.outer.settings(), *own)


@pytest.mark.parametrize(
    ("asked", "other", "difference"),
    [
        (INT4, INT8, "codec int4, the run's: codec int8"),
        (round_format("int4", "median", 1000), INT8, "codec int4, the run's: codec int8; aggregator median, the run's: "
                                                     "aggregator mean"),
        (round_format("int8", "mean", 1000, ("outer sgd", "outer lr 0.3")),
         round_format("int8", "mean", 1000, ("outer sgd", "outer lr 0.7")), "outer lr 0.3, the run's: outer lr 0.7"),
        # Another number of parts (a peer of an older version): both whole.
        (round_format("int8", "mean", 1000, ("dp off",)), INT8, f"{INT8}, dp off; the run's: {INT8}"),
    ],
)
def test_a_refusal_names_the_parts_of_the_format_that_differ(asked, other, difference):
    assert format_difference(asked, other) == difference


@pytest.mark.parametrize(
    ("asked", "pending", "run", "refused", "for_good"),
    [
        (INT8, "", "", False, False),  # the first to say
        (INT8, INT8, INT8, False, False),
        ("", INT8, INT8, False, False),  # a peer that does not say is not checked
        (INT4, INT8, "", True, False),  # the pending round's is another: for now (nothing committed yet)
        (INT4, "", INT8, True, True),  # the run's committed rounds of the tag carry another: for good
        (INT4, INT4, INT8, True, True),
        (INT8, INT4, INT8, True, False),
    ],
)
def test_a_request_whose_round_format_is_not_the_runs_or_the_pending_rounds_is_refused(
    asked, pending, run, refused, for_good
):
    why, final = format_refusal(asked, pending, run)
    assert (bool(why), final) == (refused, for_good)
    assert (FORMAT_DIFFERS in why) == for_good  # what the peer reads as "stop"


@pytest.fixture
def coordinator() -> Iterator[Callable[..., Live]]:
    with live_coordinators(BY_HAND) as start:
        yield start


def ask(c: Live, peer_id: str, last_round: int, fmt: str) -> grpc.Future:
    request = pb.QuorumRequest(run_id=RUN, peer_id=peer_id, last_round=last_round, round_format=fmt)
    return c.stub.Quorum.future(request, timeout=10)


def commit(c: Live, peers: list[str], fmt: str, last_round: int) -> int:
    """Every peer asks with fmt and reports success: the round commits. Its id."""
    plans = [f.result() for f in [ask(c, p, last_round, fmt) for p in peers]]
    reports = [
        c.stub.Commit.future(pb.CommitRequest(run_id=RUN, peer_id=p, round_id=plan.round_id, epoch=plan.epoch, ok=True),
                             timeout=10)
        for p, plan in zip(peers, plans)
    ]
    assert all(f.result().commit for f in reports)
    return plans[0].round_id


def refusal(call: grpc.Future) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call.result()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    return info.value.details()


def test_once_a_round_committed_another_format_is_refused_for_good_naming_both(coordinator):
    c = coordinator()
    a, b = (c.join(f"127.0.0.1:{port}", has_state=True).peer_id for port in (1, 2))
    assert commit(c, [a, b], INT8, 0) == 1
    odd = c.join("127.0.0.1:3", has_state=True, last_round=1).peer_id
    details = refusal(ask(c, odd, 1, INT4))
    assert FORMAT_DIFFERS in details and "(codec int4, the run's: codec int8)" in details
    assert [e["detail"] for e in c.events("format-refused") if e["peer_id"] == odd] == [details]
    assert commit(c, [a, b], INT8, 1) == 2  # the run goes on as it was


def test_while_a_round_is_pending_another_format_is_refused_for_now(coordinator):
    c = coordinator(min_peers=2)
    a, b = (c.join(f"127.0.0.1:{port}", has_state=True).peer_id for port in (1, 2))
    first = ask(c, a, 0, INT8)  # pending: int8 (the round waits for a second peer)
    details = refusal(ask(c, b, 0, INT4))
    assert "peers disagree" in details and FORMAT_DIFFERS not in details
    assert "(codec int4, the pending round's: codec int8)" in details
    plan = ask(c, b, 0, INT8).result()
    assert plan.round_id == first.result().round_id == 1


def test_a_run_whose_every_member_left_takes_the_next_format(coordinator):
    c = coordinator()
    a, b = (c.join(f"127.0.0.1:{port}", has_state=True).peer_id for port in (1, 2))
    commit(c, [a, b], INT8, 0)
    new = c.join("127.0.0.1:3", has_state=True, last_round=1).peer_id
    refusal(ask(c, new, 1, INT4))
    c.leave(a, last_round=1)
    refusal(ask(c, new, 1, INT4))  # b, a member of the int8 round, is still in the run
    c.leave(b, last_round=1)
    assert commit(c, [new], INT4, 1) == 2  # everyone restarted with int4: the run goes on with it


def test_a_round_format_beyond_its_limit_is_refused_at_the_edge(coordinator):
    c = coordinator()
    a = c.join("127.0.0.1:1", has_state=True).peer_id
    with pytest.raises(grpc.RpcError) as info:
        ask(c, a, 0, "x" * (MAX_FORMAT_CHARS + 1)).result()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("option", "difference"),
    [
        (("--codec", "int4"), "codec int4, the run's: codec int8"),
        # Not caught before 2026-12-06: the replicas differed after every round (each peer applied the round with
        # its own lr) and only the coordinator's log said their digests diverged.
        (("--outer-lr", "0.3"), "outer lr 0.3, the run's: outer lr 0.7"),
    ],
)
def test_a_peer_started_with_another_codec_or_outer_lr_stops_in_one_line_and_the_run_goes_on(tmp_path, option,
                                                                                                 difference):
    run = DaemonRun(tmp_path, "fmt")
    try:
        # Each its own host, so their rounds cross the data plane with their codec (one host shares memory).
        a, b = (run.add(n, "--steps", "400", "--host-id", n) for n in ("a", "b"))
        a.wait_event(lambda e: e["event"] == "committed", 120)
        odd = run.add("odd", *option, "--host-id", "odd", "--steps", "400")
        assert odd.proc.wait(timeout=120) != 0
        errors = [line for line in (tmp_path / "odd.log").read_text().splitlines() if line.startswith("loconet:")]
        # Since 2026-12-06 its join is refused (tests/test_joiner_settings.py); the round format, refused at the
        # quorum (above), still stops a peer that does not say its settings at join.
        assert len(errors) == 1 and "settings are not the run's" in errors[0] and difference in errors[0], errors
        for peer in (a, b):
            peer.wait_event(lambda e: e["event"] == "finished", 240)
        coordinator_log = (tmp_path / "coordinator.log").read_text()
        assert "aborted" not in coordinator_log  # the odd peer broke no round
        assert "refused: this peer's settings are not the run's" in coordinator_log
    finally:
        run.close()
