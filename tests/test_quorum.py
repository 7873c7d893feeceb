"""The membership protocol's decisions, case by case (pure functions, no I/O)."""

import pytest

from collectives.errors import ConfigError
from peer.coordinator.rules import (
    MAX_SIT_OUT,
    CommitInputs,
    CommittedRound,
    Decision,
    PeerView,
    QuorumRules,
    Report,
    SitOut,
    answer_lost,
    attempt_over,
    choose_sync_source,
    choose_sync_sources,
    commit_decision,
    head_round,
    holds_committed_state,
    join_action,
    needs_resync,
    next_epoch,
    order_members,
    peers_to_probe,
    quorum_hopeless,
    quorum_ready,
    rounds_to_catch_up,
    sit_out,
    sitting_out,
    valid_digest,
)

OK = Report(ok=True)


def fail(*named: str, reason: str = "x") -> Report:
    return Report(ok=False, failed=named, reason=reason)


# requesting, eligible, first request age, coordinator age, rules -> ready
QUORUM_CASES = [
    ("all eligible asked", {"a", "b"}, {"a", "b"}, 0.0, 100.0, QuorumRules(min_peers=2, join_timeout_s=5.0), True),
    ("one missing, timeout not passed", {"a"}, {"a", "b"}, 1.0, 100.0, QuorumRules(min_peers=1, join_timeout_s=5),
     False),
    ("one missing, timeout passed", {"a"}, {"a", "b"}, 5.0, 100.0, QuorumRules(min_peers=1, join_timeout_s=5), True),
    ("timeout passed but under min_peers", {"a"}, {"a", "b"}, 50.0, 100.0, QuorumRules(min_peers=2, join_timeout_s=5.0),
     False),
    ("everyone asked but under min_peers", {"a"}, {"a"}, 0.0, 100.0, QuorumRules(min_peers=2, join_timeout_s=5.0),
     False),
    ("startup grace holds a timed-out quorum", {"a"}, {"a", "b"}, 9.0, 2.0,
     QuorumRules(min_peers=1, join_timeout_s=5.0, startup_grace_s=10.0), False),
    ("startup grace holds even a complete one", {"a", "b"}, {"a", "b"}, 0.0, 2.0,
     QuorumRules(min_peers=2, join_timeout_s=5.0, startup_grace_s=10.0), False),
    ("after the grace the timeout applies", {"a"}, {"a", "b"}, 9.0, 11.0,
     QuorumRules(min_peers=1, join_timeout_s=5.0, startup_grace_s=10.0), True),
    ("nobody asked", set(), {"a"}, 50.0, 100.0, QuorumRules(min_peers=1, join_timeout_s=5.0), False),
    ("everyone asked, short of the aggregator's need", {"a", "b"}, {"a", "b"}, 0.0, 100.0,
     QuorumRules(join_timeout_s=5.0, min_members=3), False),
]


@pytest.mark.parametrize(
    "name,requesting,eligible,age,coord_age,rules,ready", QUORUM_CASES, ids=[c[0] for c in QUORUM_CASES]
)
def test_quorum_ready(name, requesting, eligible, age, coord_age, rules, ready):
    assert quorum_ready(requesting, eligible, age, coord_age, rules) is ready


# eligible, first request age, coordinator age, run started, rules -> refuse now
HOPELESS_CASES = [
    ("a lone survivor after the join timeout", 1, 5.0, 100.0, True, QuorumRules(min_peers=2, join_timeout_s=5), True),
    # Even when it is the only live peer and has asked: a peer restarted by its supervisor comes back within it.
    ("a lone survivor before the join timeout", 1, 4.9, 100.0, True, QuorumRules(min_peers=2, join_timeout_s=5), False),
    ("enough live peers, some yet to ask", 2, 50.0, 100.0, True, QuorumRules(min_peers=2, join_timeout_s=5.0), False),
    ("before the first commit the run waits", 1, 50.0, 100.0, False, QuorumRules(min_peers=2, join_timeout_s=5.0),
     False),
    ("startup grace after a coordinator restart", 1, 50.0, 2.0, True,
     QuorumRules(min_peers=2, join_timeout_s=5.0, startup_grace_s=10.0), False),
    ("min_peers 1 is always reachable", 1, 50.0, 100.0, True, QuorumRules(min_peers=1, join_timeout_s=5.0), False),
    ("the aggregator's need counts too", 4, 5.0, 100.0, True, QuorumRules(join_timeout_s=5, min_members=5), True),
    ("before the first commit, short of the aggregator's need: refused at the join timeout", 4, 5.0, 100.0, False,
     QuorumRules(min_peers=2, join_timeout_s=5, min_members=5), True),
    ("... and not before it", 4, 4.9, 100.0, False, QuorumRules(min_peers=2, join_timeout_s=5, min_members=5), False),
    ("before the first commit, short of min_peers too: the run waits", 4, 50.0, 100.0, False,
     QuorumRules(min_peers=6, join_timeout_s=5, min_members=5), False),
]


@pytest.mark.parametrize(
    "name,eligible,age,coord_age,started,rules,hopeless", HOPELESS_CASES, ids=[c[0] for c in HOPELESS_CASES]
)
def test_quorum_hopeless(name, eligible, age, coord_age, started, rules, hopeless):
    assert quorum_hopeless(eligible, age, coord_age, started, rules) is hopeless


# The same, when the live peers are those of the last quorum refused for too few (waited_out): nobody came back in
# its join timeout, so it is not waited out again.
WAITED_OUT_CASES = [
    ("a lone survivor asking again: refused at once", 1, 0.0, 100.0, True, QuorumRules(min_peers=2, join_timeout_s=5),
     True),
    ("... but not in a restarted coordinator's startup grace", 1, 0.0, 2.0, True,
     QuorumRules(min_peers=2, join_timeout_s=5.0, startup_grace_s=10.0), False),
    ("... nor when enough peers are live", 2, 0.0, 100.0, True, QuorumRules(min_peers=2, join_timeout_s=5.0), False),
    ("... nor before the first commit, short of min_peers", 1, 0.0, 100.0, False,
     QuorumRules(min_peers=2, join_timeout_s=5.0), False),
]


@pytest.mark.parametrize(
    "name,eligible,age,coord_age,started,rules,hopeless", WAITED_OUT_CASES, ids=[c[0] for c in WAITED_OUT_CASES]
)
def test_quorum_hopeless_once_its_join_timeout_was_waited_out(name, eligible, age, coord_age, started, rules, hopeless):
    assert quorum_hopeless(eligible, age, coord_age, started, rules, waited_out=True) is hopeless


# has state, a holder is alive, run under way, coordinator age, rules -> action (before the run's first commit)
JOIN_CASES = [
    ("a peer with state keeps it", True, False, True, 0.0, QuorumRules(join_timeout_s=5.0, startup_grace_s=5), "keep"),
    ("a fresh peer syncs from a live holder", False, True, True, 0.0,
     QuorumRules(join_timeout_s=5.0, startup_grace_s=5), "sync"),
    ("the first peer of a new run founds it at once", False, False, False, 0.0,
     QuorumRules(join_timeout_s=5.0, startup_grace_s=5), "found"),
    ("a restarted coordinator's holders are coming back", False, False, True, 1.0,
     QuorumRules(join_timeout_s=5.0, startup_grace_s=5), "wait"),
    ("after the grace nobody is coming back", False, False, True, 5.0,
     QuorumRules(join_timeout_s=5.0, startup_grace_s=5), "found"),
]


@pytest.mark.parametrize("name,has_state,holder,under_way,age,rules,action", JOIN_CASES, ids=[c[0] for c in JOIN_CASES])
def test_join_action(name, has_state, holder, under_way, age, rules, action):
    assert join_action(has_state, holder, under_way, age, rules) == action


D1, D2 = "a" * 64, "b" * 64
# Once round 3 committed (digest D1 recorded for it): has state, its round, its digest, the digest recorded for
# that round, a live holder of round 3 -> action. Long after any grace, with a coordinator that knows nothing else.
COMMITTED_JOIN_CASES = [
    ("a fresh peer with no live holder waits, it never founds", False, 0, "", "", False, "wait"),
    ("a fresh peer syncs from a live holder", False, 0, "", "", True, "sync"),
    ("a round-0 state is a fresh peer's: it waits", True, 0, D2, "", False, "wait"),
    ("a round-0 state is a fresh peer's: it syncs", True, 0, D2, "", True, "sync"),
    ("a checkpoint of round 3 with the recorded digest is kept", True, 3, D1, D1, False, "keep"),
    ("a checkpoint of round 3 while the digest is unknown is kept", True, 3, D1, "", False, "keep"),
    ("a checkpoint of round 3 with no digest reported is kept", True, 3, "", D1, False, "keep"),
    ("a checkpoint of round 3 with another digest is refused", True, 3, D2, D1, False, "refuse"),
    ("... even while holders live", True, 3, D2, D1, True, "refuse"),
    ("an older checkpoint with no live holder waits for the last round", True, 2, D2, "", False, "wait"),
    ("an older checkpoint with a live holder is kept (it catches up)", True, 2, D2, "", True, "keep"),
    ("an older checkpoint that differs from its round's digest is refused", True, 2, D2, D1, False, "refuse"),
    ("a state beyond the last committed round is adopted", True, 5, D2, "", False, "keep"),
]


@pytest.mark.parametrize(
    "name,has_state,last_round,digest,recorded,holder,action",
    COMMITTED_JOIN_CASES,
    ids=[c[0] for c in COMMITTED_JOIN_CASES],
)
def test_join_action_once_the_run_has_committed_a_round(name, has_state, last_round, digest, recorded, holder, action):
    rules = QuorumRules(join_timeout_s=5.0, startup_grace_s=5)
    got = join_action(
        has_state, holder, False, 1000.0, rules, committed_round=3, last_round=last_round, digest=digest,
        recorded_digest=recorded,
    )
    assert got == action


# A replica whose state is its own (NoLoCo), once round 3 committed: has state, its round, a live holder of round 3
# -> action. Long after any grace.
OWN_STATE_JOIN_CASES = [
    ("an older own state with nobody to catch up from goes on from it", True, 2, False, "keep"),
    ("an older own state with a live holder is kept as well", True, 2, True, "keep"),
    ("a fresh replica with no live holder still waits: it has nothing to go on from", False, 0, False, "wait"),
    ("a fresh replica syncs from a live holder", False, 0, True, "sync"),
]


@pytest.mark.parametrize("name,has_state,last_round,holder,action", OWN_STATE_JOIN_CASES,
                         ids=[c[0] for c in OWN_STATE_JOIN_CASES])
def test_join_action_of_a_replica_whose_state_is_its_own(name, has_state, last_round, holder, action):
    got = join_action(
        has_state,
        holder,
        False,
        1000.0,
        QuorumRules(join_timeout_s=5.0, startup_grace_s=5),
        committed_round=3,
        last_round=last_round,
        own_state=True,
    )
    assert got == action


# A fresh joiner (no state) reporting the digest of its own initial state: the run's last committed round, the
# joiner's digest, the founder's initial digest, a live holder -> action.
INITIAL_STATE_CASES = [
    ("before the first commit, the founder's initial state is kept", 0, D1, D1, True, "keep"),
    ("... even with nobody else left to fetch from", 0, D1, D1, False, "keep"),
    ("another initial state (another seed) is fetched", 0, D2, D1, True, "sync"),
    ("no digest reported: fetched", 0, "", D1, True, "sync"),
    ("the founder reported none: fetched", 0, D1, "", True, "sync"),
    ("neither reported one: fetched, not kept", 0, "", "", True, "sync"),
    ("once a round committed, the initial state is no longer the run's", 1, D1, D1, True, "sync"),
    ("... and with no holder the joiner waits", 1, D1, D1, False, "wait"),
]


@pytest.mark.parametrize(
    "name,committed,digest,initial,holder,action", INITIAL_STATE_CASES, ids=[c[0] for c in INITIAL_STATE_CASES]
)
def test_join_action_of_a_fresh_peer_naming_its_initial_state(name, committed, digest, initial, holder, action):
    got = join_action(
        False,
        holder,
        False,
        1000.0,
        QuorumRules(join_timeout_s=5.0, startup_grace_s=5),
        committed_round=committed,
        digest=digest,
        initial_digest=initial,
    )
    assert got == action


def test_with_allow_rollback_an_older_checkpoint_with_no_live_holder_is_kept_for_the_run_to_roll_back_to():
    rules = QuorumRules(join_timeout_s=5.0, startup_grace_s=5, allow_rollback=True)
    assert join_action(True, False, False, 1000.0, rules, committed_round=3, last_round=2) == "keep"


@pytest.mark.parametrize(
    "has_state,last_round,committed,holds",
    [(True, 0, 0, True), (True, 0, 3, False), (True, 2, 3, True), (True, 3, 3, True), (False, 3, 3, False)],
)
def test_a_round_0_state_counts_only_before_the_first_commit(has_state, last_round, committed, holds):
    assert holds_committed_state(has_state, last_round, committed) is holds


@pytest.mark.parametrize(
    "digest,valid",
    [("", True), ("0123456789abcdef" * 4, True), ("A" * 64, False), ("a" * 63, False), ("a" * 65, False),
     ("g" * 64, False), (" " + "a" * 63, False)],
)
def test_a_state_digest_is_empty_or_64_lowercase_hex_characters(digest, valid):
    assert valid_digest(digest) is valid


def test_min_peers_below_one_is_a_config_error():
    with pytest.raises(ConfigError):
        QuorumRules(min_peers=0, join_timeout_s=5.0)


@pytest.mark.parametrize(
    "missing,waited,ages,probe",
    [
        ({"b"}, 0.05, {}, []),
        ({"b"}, 0.2, {}, ["b"]),
        ({"b", "c"}, 0.6, {}, ["b", "c"]),
        ({"b", "c"}, 0.6, {"b": 0.3}, ["c"]),
        ({"b"}, 3.0, {"b": 1.5}, ["b"]),
        (set(), 9.0, {}, []),
    ],
)
def test_a_waiting_quorum_probes_missing_peers_after_a_while_and_not_too_often(missing, waited, ages, probe):
    assert peers_to_probe(missing, waited, ages) == probe


def test_probes_leave_a_few_dozen_at_a_time():
    missing = {f"p{i:04d}" for i in range(1000)}
    first = peers_to_probe(missing, 0.2, {})
    assert first == sorted(missing)[:64]
    assert peers_to_probe(missing, 0.3, {p: 0.1 for p in first}) == sorted(missing)[64:128]


def test_members_are_ordered_by_peer_id():
    assert order_members({"p10", "p2", "p1"}) == ["p1", "p10", "p2"]


@pytest.mark.parametrize(
    "peer_round,committed,resync", [(5, 5, False), (4, 5, True), (6, 5, False), (0, 0, False), (0, 1, True)]
)
def test_needs_resync(peer_round, committed, resync):
    assert needs_resync(peer_round, committed) is resync


# previous members (None: no round formed by this coordinator yet), members, must bump, restarted -> epoch (from 3)
EPOCH_CASES = [
    ("the first round of a new run", None, ["a", "b"], False, False, 3),
    ("the same group in another order", ["a", "b"], ["b", "a"], False, False, 3),
    ("a peer more", ["a", "b"], ["a", "b", "c"], False, False, 4),
    ("a peer less", ["a", "b", "c"], ["a", "b"], False, False, 4),
    ("the retry of an aborted attempt", ["a", "b"], ["a", "b"], True, False, 4),
    ("the first round of a restarted coordinator", None, ["a", "b"], False, True, 4),
    ("a restarted coordinator's later rounds", ["a", "b"], ["a", "b"], False, True, 3),
]


@pytest.mark.parametrize(
    "name,previous,members,bump,restarted,epoch", EPOCH_CASES, ids=[c[0] for c in EPOCH_CASES]
)
def test_epoch_bumps_when_the_group_changes_after_an_abort_or_a_restart(
    name, previous, members, bump, restarted, epoch
):
    assert next_epoch(3, previous, members, bump, restarted) == epoch


R3 = CommittedRound(3, 1, "t", ("a", "b"))
R4 = CommittedRound(4, 2, "t", ("b", "c"))
R5 = CommittedRound(5, 2, "t", ("c",))
# remembered rounds, the asker's last round, last committed, live peers, asker -> rounds to apply (() : whole state)
CATCH_UP_CASES = [
    ("up to date: nothing", [R3, R4, R5], 5, 5, "abc", "d", ()),
    ("one round behind", [R3, R4, R5], 4, 5, "abc", "d", (R5,)),
    ("three behind, all remembered, in order", [R3, R4, R5], 2, 5, "abc", "d", (R3, R4, R5)),
    ("behind a forgotten round", [R4, R5], 2, 5, "abc", "d", ()),
    ("further behind than remembered", [R3, R4, R5], 0, 5, "abc", "d", ()),
    ("dead members are left out", [R3, R4, R5], 3, 5, "bc", "d", (CommittedRound(4, 2, "t", ("b", "c")), R5)),
    ("the asker is left out", [R3, R4, R5], 2, 5, "abc", "a", (CommittedRound(3, 1, "t", ("b",)), R4, R5)),
    ("a round with no live member", [R3, R4, R5], 3, 5, "ab", "d", ()),
    ("nothing remembered", [], 4, 5, "abc", "d", ()),
]


@pytest.mark.parametrize(
    "name,committed,last_round,head,alive,asker,rounds", CATCH_UP_CASES, ids=[c[0] for c in CATCH_UP_CASES]
)
def test_rounds_to_catch_up(name, committed, last_round, head, alive, asker, rounds):
    assert rounds_to_catch_up(committed, last_round, head, set(alive), asker) == rounds


M = ("a", "b", "c")
# name, inputs, expected decision (None: keep waiting)
COMMIT_CASES = [
    ("all ok commits", CommitInputs(M, {"a": OK, "b": OK, "c": OK}), Decision(True)),
    ("waiting for the last report", CommitInputs(M, {"a": OK, "b": OK}), None),
    ("a failure waits for unnamed members", CommitInputs(M, {"a": fail("c")}), None),
    ("killed member: the others named it, it is dropped", CommitInputs(M, {"a": fail("c"), "b": fail("c")}),
     Decision(False, ("c",), blamed=("c",))),
    ("failure reported by all, nobody silent: most-named dropped",
     CommitInputs(M, {"a": fail("c"), "b": fail("c"), "c": fail("a")}), Decision(False, ("c",), blamed=("c",))),
    ("partition: two name each other, both dropped", CommitInputs(("a", "b"), {"a": fail("b"), "b": fail("a")}),
     Decision(False, ("a", "b"), blamed=("a", "b"))),
    ("lapsed lease of a silent member aborts", CommitInputs(M, {"a": OK, "b": OK}, frozenset({"c"})),
     Decision(False, ("c",))),
    ("a lapsed lease drops only the lapsed: a live silent member stays", CommitInputs(M, {"a": OK}, frozenset({"c"})),
     Decision(False, ("c",))),
    ("a lapsed lease of a reporter changes nothing", CommitInputs(M, {"a": OK, "b": OK}, frozenset({"a"})), None),
    ("deadline drops the silent", CommitInputs(M, {"a": OK}, deadline_passed=True), Decision(False, ("b", "c"))),
    ("failure naming nobody aborts without drops", CommitInputs(M, {"a": OK, "b": fail(), "c": OK}),
     Decision(False, ())),
    ("within the failure grace a failure still waits", CommitInputs(M, {"a": fail("c"), "c": OK}), None),
    ("after the failure grace: abort, drop the named, not the silent",
     CommitInputs(M, {"a": fail("c"), "c": OK}, failure_grace_passed=True), Decision(False, ("c",), blamed=("c",))),
    ("after the failure grace with nobody named: abort, drop nobody",
     CommitInputs(M, {"a": fail()}, failure_grace_passed=True), Decision(False, ())),
    ("the failure grace without a failure changes nothing", CommitInputs(M, {"a": OK}, failure_grace_passed=True),
     None),
    ("reports from non-members are ignored", CommitInputs(("a",), {"a": OK, "z": fail("a")}), Decision(True)),
    ("names outside the group are ignored", CommitInputs(("a", "b"), {"a": fail("z"), "b": OK}), Decision(False, ())),
]


@pytest.mark.parametrize("name,inputs,expected", COMMIT_CASES, ids=[c[0] for c in COMMIT_CASES])
def test_commit_decision(name, inputs, expected):
    got = commit_decision(inputs)
    if expected is None:
        assert got is None
    else:
        # Only the dropped members someone named are blamed (they sit out): not the lapsed or silent ones.
        assert got is not None and (got.commit, got.dropped, got.blamed) == (
            expected.commit, expected.dropped, expected.blamed
        )


@pytest.mark.parametrize(
    ("strikes", "committed", "now", "lease_s", "expected"),
    [
        (1, 10, 100.0, 3.0, SitOut(1, 11, 106.0)),  # the retry and one round, or two leases
        (2, 10, 100.0, 3.0, SitOut(2, 12, 112.0)),
        (3, 10, 100.0, 3.0, SitOut(3, 14, 124.0)),
        (6, 10, 100.0, 3.0, SitOut(6, 10 + MAX_SIT_OUT, 100.0 + MAX_SIT_OUT * 6.0)),
        (40, 0, 0.0, 1.0, SitOut(40, MAX_SIT_OUT, MAX_SIT_OUT * 2.0)),  # capped: 2^39 rounds would be for good
    ],
)
def test_a_blamed_member_sits_out_twice_as_long_at_each_strike_in_a_row(strikes, committed, now, lease_s, expected):
    assert sit_out(strikes, committed, now, lease_s) == expected


@pytest.mark.parametrize(
    ("entry", "committed", "now", "sitting"),
    [
        (None, 0, 0.0, False),
        (SitOut(1, 11, 106.0), 10, 100.0, True),
        (SitOut(1, 11, 106.0), 11, 100.0, False),  # a round committed without it
        (SitOut(1, 11, 106.0), 10, 106.0, False),  # its time is over: two that blame each other come back
    ],
)
def test_a_member_sits_out_until_its_rounds_commit_or_its_time_is_over(entry, committed, now, sitting):
    assert sitting_out(entry, committed, now) is sitting


def test_abort_reason_carries_the_members_reasons():
    got = commit_decision(CommitInputs(("a", "b"), {"a": fail("b", reason="b unreachable")}, deadline_passed=True))
    assert got is not None and "b unreachable" in got.reason


ABORTED = Decision(False, ("c",), "lease lapsed: c")
OVER_CASES = [
    # (case, attempt named, attempts pending, decided attempts, the answer)
    ("no attempt named", (0, 0), set(), {}, ""),
    ("pending: it may still commit", (4, 2), {(4, 2)}, {}, ""),
    ("committed", (4, 2), set(), {(4, 2): Decision(True)}, ""),
    ("aborted: the decision's reason", (4, 2), {(4, 3)}, {(4, 2): ABORTED},
     "the coordinator aborted round 4 at epoch 2: lease lapsed: c"),
    ("unknown (a restarted coordinator)", (4, 2), set(), {},
     "round 4 at epoch 2 is unknown to the coordinator (it restarted, or the round moved on)"),
    ("another epoch of the round pending", (4, 1), {(4, 2)}, {},
     "round 4 at epoch 1 is unknown to the coordinator (it restarted, or the round moved on)"),
]


@pytest.mark.parametrize("name,attempt,pending,decided,over", OVER_CASES, ids=[c[0] for c in OVER_CASES])
def test_attempt_over(name, attempt, pending, decided, over):
    assert attempt_over(attempt, pending, decided) == over


PEERS = [
    PeerView("p1", "h:1", last_round=7),
    PeerView("p2", "h:2", last_round=7),
    PeerView("p3", "h:3", last_round=6),
    PeerView("p4", "h:4", last_round=7, alive=False),
    PeerView("p5", "h:5", last_round=7, has_state=False),
]


@pytest.mark.parametrize(
    "joiner,serving,expected",
    [
        ("p9", {}, "p1"),
        ("p1", {}, "p2"),
        ("p9", {"p1": 1}, "p2"),
        ("p9", {"p1": 2, "p2": 1}, "p2"),
    ],
)
def test_sync_source_is_an_alive_up_to_date_peer_least_busy_first(joiner, serving, expected):
    assert choose_sync_source(PEERS, joiner, 7, serving).peer_id == expected


@pytest.mark.parametrize(
    "peers,committed,head",
    [
        ([PeerView("a", "", 7), PeerView("b", "", 6)], 7, 7),
        ([PeerView("a", "", 7, alive=False), PeerView("b", "", 6)], 7, 6),
        ([PeerView("a", "", 7, alive=False), PeerView("b", "", 6, has_state=False)], 7, 7),
        ([], 7, 7),
        # A round-0 state is a fresh peer's initial state, never a head once a round committed.
        ([PeerView("a", "", 7, alive=False), PeerView("b", "", 0)], 7, 7),
        ([PeerView("a", "", 0)], 0, 0),
    ],
)
def test_with_rollback_allowed_head_round_falls_back_to_the_newest_state_a_live_peer_holds(peers, committed, head):
    assert head_round(peers, committed, settled=True, allow_rollback=True) == head


def test_without_rollback_allowed_the_head_stays_the_last_committed_round():
    peers = [PeerView("a", "", 7, alive=False), PeerView("b", "", 6)]
    assert head_round(peers, 7, settled=True, allow_rollback=False) == 7


def test_no_rollback_before_the_coordinator_settled():
    peers = [PeerView("a", "", 7, alive=False), PeerView("b", "", 6)]
    assert head_round(peers, 7, settled=False, allow_rollback=True) == 7


def test_sync_sources_are_the_up_to_date_holders_least_busy_first_at_most_four():
    many = [PeerView(f"p{i}", f"h:{i}", last_round=7) for i in range(1, 7)]
    serving = {"p1": 2, "p2": 1}
    assert [p.peer_id for p in choose_sync_sources(many, "p3", 7, serving)] == ["p4", "p5", "p6", "p2"]
    assert [p.peer_id for p in choose_sync_sources(PEERS, "p9", 7)] == ["p1", "p2"]
    assert choose_sync_sources(PEERS, "p9", 8) == ()


def test_no_sync_source_when_nobody_is_up_to_date():
    assert choose_sync_source(PEERS, "p9", 8) is None


@pytest.mark.parametrize(
    ("name", "members", "reported", "asker", "lost"),
    [
        ("a member that has not reported asks again", ("a", "b"), (), "a", True),
        ("one of several, the other reported", ("a", "b"), ("b",), "a", True),
        ("a member that reported asks for the retry", ("a", "b"), ("a",), "a", False),
        ("a peer outside the attempt waits for it", ("a", "b"), (), "c", False),
    ],
)
def test_answer_lost(name, members, reported, asker, lost):
    assert answer_lost(members, reported, asker) == lost
