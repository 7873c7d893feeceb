"""The membership protocol's decisions, as pure functions.

Who is in a round, whether a round commits, who is dropped, who serves a
joiner: each is decided here from plain data, with no I/O and no clock
reads, so that every rule has a table of cases in ``tests/test_quorum.py``.
The coordinator (``peer/coordinator/service.py``, with ``joins.py``,
``quorumcall.py``, ``resync.py`` and ``quorum.py``) gathers the inputs and
carries the decisions out. Who takes part in a round is the run's quorum
policy (``peer/coordinator/policies/``, one module each); the default one,
``all``, is the quorum rule below.

Rules
-----
Quorum (``quorum_ready``): a pending quorum closes when at least
``min_peers`` up-to-date peers asked and either every eligible live peer
asked or ``join_timeout_s`` passed since the first request. Right after the
coordinator starts, no quorum closes for ``startup_grace_s``: a restarted
coordinator does not know how many peers exist until they re-register, and a
round formed by some of them could diverge from what the others applied.
Members are ordered by peer id, so every member sees the same list.

Too few (``quorum_hopeless``): once the run has committed a round, a
pending quorum that still has fewer than ``min_peers`` live peers to draw on
when ``join_timeout_s`` has passed is refused at once rather than after the
coordinator's quorum timeout (not sooner, even when every live peer asked: a
restarted peer comes back within it): the survivors train on
alone and ask again at their next sync (a peer that joins meanwhile syncs
from them). Before the first commit the quorum keeps waiting, so a run
starts only with ``min_peers`` peers. The peers' aggregator may need more
members than ``min_peers`` (Krum's 2f+3, or differential privacy's minimum,
``QuorumRequest.min_members``): the
pending quorum then counts with the larger of the two (``QuorumRules.least``),
and before the first commit it waits only for ``min_peers``: a quorum short of
the aggregator's need alone is refused at the join timeout.

Claims (``claim_verdict``, ``majority_round``): a joiner's claimed round
and epoch are refused beyond ``MAX_CLAIM``, and beyond what the coordinator
has given out when it knows the run's history (its state file, or it saw the
run founded). A coordinator that lost the history adopts the furthest round a
majority of the returning holders reach; a holder claiming more fetches the
run's state like a fresh peer.

Join (``join_action``): a peer that holds state keeps it (and resyncs if it
is behind); one without state syncs from a live up-to-date holder. If there
is none:

- before the run's first commit, the joiner founds the run (its initial
  state becomes the run's), except when the coordinator has heard from peers
  of an earlier coordinator (ids it never gave out) within
  ``startup_grace_s`` of its start: the run is under way and its holders are
  about to re-register, so the joiner is told to wait rather than start a
  second, diverging state;
- once the run has committed a round (known live, from a peer, or from the
  coordinator's state file) it is never founded again: the joiner is told to
  wait, with a reason saying how to bring the state back (restart a peer
  that holds it, or one resuming from its checkpoint). Only a new run
  (``loconet coordinator --new-run``, or a fresh run id) starts over.

Before the run's first commit, a fresh joiner that reports the digest of its
own initial state keeps that state when the founder reported the same one
(``initial_digest``): peers that build their model from the same seed hold
the run's state from the start, and fetching it would only copy the same
bytes over the founder's uplink, once per joiner.

A state at round 0 is no committed state once the run has committed a round
(any fresh peer "holds" its random initial state): such a joiner counts as
one without state. A joiner whose state is at a round the coordinator holds a
digest of (``Digest`` below) must report the same digest, or it is refused
(the checkpoint is from another run, or diverged); an empty digest is unknown
and never checked. A state at a round beyond the last committed one is
adopted: the run goes on from it (that is how a coordinator without a state
file learns where the run is; with a state file the peers cannot be ahead
of it, since it is written at every commit before anyone learns of it).

Digest (``valid_digest``): peers report the SHA-256 of their state as of
their last round (at join and with every quorum request). The coordinator
keeps the first digest reported for each of its recent committed rounds; a
later report that differs names a diverged peer (an event, an error in the
log), and the first one is kept.

Resync (``needs_resync``): a peer whose last applied round is older than
the run's last committed round missed a round; it must fetch the state from
an up-to-date peer before it may take part.

Catch-up (``rounds_to_catch_up``): instead of the whole state, such a peer
may fetch the committed result of each round it missed from a holder of that
round and apply them in order, if the coordinator still remembers every one
of those rounds and each has a live holder: a member, or a peer asked to keep
the result of a round of only some of the peers (``result_holders``;
peer/coordinator/resultholders.py).

Epoch (``next_epoch``): a round's epoch is bumped when its members differ
from the previous round's, after an abort, and for the first round of a
restarted coordinator (which cannot know which (round, epoch) pairs its
predecessor gave out). Round ids are the last committed round + 1, so a retry
keeps its round id and (round id, epoch) names an attempt.

Commit (``commit_decision``): the round commits only if every member
reported success. The decision is taken as soon as it is known and every
member that can still report has reported: when all members reported; when
a failure was reported and every member nobody named as failed has reported
(the named ones are presumed dead); when the lease of a silent member
lapsed; or at the commit deadline. On abort, the dropped members are the
ones whose lease lapsed, or else the ones that never reported; if every member reported
(a partition, or a member others found too slow), the members named by the
most reports are dropped so that the retry can succeed.

Sitting out (``sit_out``, ``sitting_out``): a member dropped because other
members named it as failed (``Decision.blamed``: they could not reach it, or
found it too slow) sits out the next rounds: the quorum neither waits for it
nor takes it, and its requests are held. It rejoined at once before, and was
a member of the retry again: one peer whose ``--advertise`` the others could
not reach aborted every attempt of a run, which never committed. The k-th such
drop in a row sits out 2^(k-1) committed rounds (at most ``MAX_SIT_OUT``), or
as many times twice its lease in seconds, whichever ends first (two members
that blame each other after a blip would otherwise sit out for good). A round
it commits as a member ends its strikes.

Over (``attempt_over``): a member exchanging data for an attempt names it
in its heartbeats. The answer says when that attempt will not commit: the
coordinator aborted it (a lapsed lease, the deadline, a failure reported by
another member), or does not know it (a restarted coordinator, or one that
formed a newer attempt since; its Commit would be refused as unknown). The
member then stops waiting for data that may never come (a paused member's)
and reports at once, rather than at the round's deadline.

Head (``head_round``): when every peer holding the last committed state is
gone, the run waits for one to come back (a peer restarted with its
checkpoint, or one given ``--resume-from``); a peer holding an older round
waits too. Only when the operator allows it (``allow_rollback``) does the
run continue from the newest committed state a live peer holds (an older
checkpoint of this run: the later rounds are lost, and the coordinator
records a rollback). Never from round 0 once a round committed: a round-0
state is a fresh peer's random initial state, not one the run agreed on. And
not within ``startup_grace_s`` of a coordinator's start, while the holders of
the newer rounds may still be re-registering.

Round format (``format_refusal``): a quorum request names what its peer's
contribution is (codec, aggregator, length: ``round_format``). A request
whose format differs from the pending round's is refused for now (the peer
trains on and asks again); once a round of a tag committed, a request of
that tag with another format is refused for good (the peer stops, saying
what differs) while a member of that round is live. So a peer started with
another ``--codec`` cannot break the run's rounds, and a run whose every
peer restarted with a new one goes on with it. The first round of a tag
decides, as the founder's state decides the model.

Sync sources (``choose_sync_sources``): alive, up-to-date peers that hold
state, least busy serving other joiners first, then lowest peer id; at most
``MAX_SYNC_SOURCES``, so that a joiner can fetch stripes from several. The
first is ``sync_from``, the one a joiner that does not stripe fetches from.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Collection, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from collectives.errors import ConfigError
from collectives.membership.roundformat import FORMAT_DIFFERS, format_difference

# Most sync sources a joiner is given (it may fetch stripes of the state from each).
MAX_SYNC_SOURCES = 4
# Round ids and epochs a joiner may claim at most (whatever the coordinator knows): far beyond any real run,
# and far from 2**64, where round ids would wrap.
MAX_CLAIM = 1 << 48
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class PeerView:
    """What the coordinator knows of a peer, as the decisions need it."""

    peer_id: str
    address: str
    last_round: int
    alive: bool = True
    has_state: bool = True


@dataclass(frozen=True, kw_only=True)
class QuorumRules:
    """Settings of the quorum rule, given by keyword."""

    min_peers: int = 1
    # No default here: the coordinator's config gives it (``CoordinatorConfig.join_timeout_s``, --join-timeout).
    join_timeout_s: float
    startup_grace_s: float = 0.0
    # When every holder of the last committed round is gone, go on from the newest older round a live peer
    # holds (losing the later rounds) instead of waiting for a holder: an operator's choice, never the default.
    allow_rollback: bool = False
    # The fewest members the waiting peers' rounds run with (QuorumRequest.min_members: Krum's 2f+3, or
    # differential privacy's --dp-min-members).
    min_members: int = 1

    @property
    def least(self) -> int:
        """The fewest members a round may have: min_peers, or more when the peers' aggregator needs more."""
        return max(self.min_peers, self.min_members)

    def __post_init__(self) -> None:
        if self.min_peers < 1:
            raise ConfigError(f"min_peers must be at least 1, got {self.min_peers}")
        if self.join_timeout_s < 0 or self.startup_grace_s < 0:
            raise ConfigError("join timeout and startup grace must be >= 0")


def format_refusal(asked: str, pending: str, run: str) -> tuple[str, bool]:
    """Why a quorum request whose round format is ``asked`` is refused ("": it is not), and whether for good.

    ``pending``: the pending round's format ("": none, or unchecked); ``run``: the format of the last committed
    round of the request's tag while a member of it is live (""). An empty ``asked`` (a peer that does not say)
    is not checked."""
    if not asked:
        return "", False
    if run and asked != run:
        return (f"this peer's {FORMAT_DIFFERS} ({format_difference(asked, run)}): start it with the run's --codec, "
                "--aggregator, model and outer optimizer settings"), True
    if pending and asked != pending:
        differ = format_difference(asked, pending, "the pending round's")
        return f"this peer's round format is not the pending round's ({differ}): peers disagree", False
    return "", False


def algorithm_refusal(asked: str, live: Iterable[str]) -> str:
    """Why a joiner running algorithm ``asked`` is refused by a run whose live peers run ``live`` ("": it is not).

    An empty name (a peer that does not say) is neither checked nor checked against."""
    theirs = sorted({a for a in live if a} - {asked})
    if not asked or not theirs:
        return ""
    return (f"this peer runs {asked!r} and the run's live peers run {' and '.join(map(repr, theirs))}: start it "
            f"with --algorithm {theirs[0]}, or give it a run of its own (--run)")


def settings_refusal(asked: str, live: Iterable[str]) -> str:
    """Why a joiner whose settings (JoinRequest.settings) are ``asked`` is refused by a run whose live peers' are
    ``live`` ("": it is not), naming the parts that differ from the most common. Empty ones are not compared."""
    theirs = Counter(s for s in live if s)
    if not asked or not theirs or asked in theirs:
        return ""
    run = theirs.most_common(1)[0][0]
    return (f"this peer's settings are not the run's ({format_difference(asked, run)}): start it with the options "
            "the run's peers were started with, or give it a run of its own (--run)")


def valid_digest(digest: str) -> bool:
    """Whether a reported state digest is well formed: empty (unknown), or SHA-256 as 64 lowercase hex characters."""
    return digest == "" or (len(digest) == 64 and set(digest) <= _HEX)


def holds_committed_state(has_state: bool, last_round: int, committed_round: int) -> bool:
    """Whether a peer's state counts as one of the run's: any before the first commit, then only from round 1 on."""
    return has_state and (last_round > 0 or committed_round == 0)


def join_action(
    has_state: bool,
    holder_alive: bool,
    run_under_way: bool,
    coordinator_age_s: float,
    rules: QuorumRules,
    committed_round: int = 0,
    last_round: int = 0,
    digest: str = "",
    recorded_digest: str = "",
    initial_digest: str = "",
    own_state: bool = False,
) -> str:
    """What a joining peer does: "keep" its state, "sync" from a holder, "found" the run, "wait", or is "refuse"d.

    ``holder_alive``: another live peer holds the state of ``committed_round`` (the run's last committed
    round); ``run_under_way``: the coordinator has heard from peers an earlier coordinator registered;
    ``last_round``/``digest``: the round and SHA-256 of the joiner's state (of a fresh joiner: of its initial
    state); ``recorded_digest``: the digest the coordinator holds for that round ("" when unknown);
    ``initial_digest``: the founder's initial state's ("" when unknown); ``own_state``: the joiner's state is its
    own (NoLoCo's replicas differ), so an older one goes on as it is.
    """
    if holds_committed_state(has_state, last_round, committed_round):
        if digest and recorded_digest and digest != recorded_digest:
            return "refuse"
        if last_round < committed_round and not holder_alive and not rules.allow_rollback and not own_state:
            return "wait"  # an older state with nobody to catch up from: the run waits for its last round
        return "keep"
    if committed_round == 0 and digest and digest == initial_digest:
        return "keep"  # a fresh peer built the founder's initial state (the same seed): nothing to fetch
    if holder_alive:
        return "sync"
    if committed_round > 0:
        return "wait"
    if run_under_way and coordinator_age_s < rules.startup_grace_s:
        return "wait"
    return "found"


def claim_verdict(round_claim: int, epoch_claim: int, committed: int, epoch: int, history_known: bool) -> str:
    """Whether a joiner's claimed last round and epoch can be taken: "ok", "absurd" (beyond MAX_CLAIM), or "ahead"
    (beyond the round or epoch a coordinator that knows the run's history has given out)."""
    if round_claim > MAX_CLAIM or epoch_claim > MAX_CLAIM:
        return "absurd"
    if history_known and (round_claim > committed or epoch_claim > epoch):
        return "ahead"
    return "ok"


def majority_round(claims: Iterable[int]) -> int:
    """The furthest round that more than half of the claims reach (0 for none): what a coordinator that lost the
    run's history adopts from its returning holders, so no minority can push the run ahead."""
    ordered = sorted(claims, reverse=True)
    return ordered[len(ordered) // 2] if ordered else 0


def needs_resync(peer_last_round: int, last_committed_round: int) -> bool:
    """Whether a peer missed committed rounds and must fetch the state first."""
    return peer_last_round < last_committed_round


def head_round(peers: list[PeerView], last_committed_round: int, *, settled: bool, allow_rollback: bool) -> int:
    """The newest committed round whose state a live peer still holds (the run's head).

    Normally the last committed round. If every peer holding it has left or
    died, the newest committed state a live peer holds, when ``allow_rollback``
    (the later rounds are lost); otherwise the last committed round, which the
    run waits for. Never round 0 once a round committed (a fresh peer's initial
    state), and not before the coordinator has ``settled`` (its startup grace
    passed: holders of the newer rounds may still be re-registering).
    """
    if not settled or not allow_rollback:
        return last_committed_round
    held = [p.last_round for p in peers if p.alive and p.has_state and p.last_round > 0]
    if not held or max(held) >= last_committed_round:
        return last_committed_round
    return max(held)


def quorum_ready(
    requesting: set[str],
    eligible: set[str],
    first_request_age_s: float,
    coordinator_age_s: float,
    rules: QuorumRules,
) -> bool:
    """Whether a pending quorum may close now.

    ``requesting``: peers waiting in this quorum; ``eligible``: live,
    up-to-date peers that could take part (requesting ones included).
    """
    if len(requesting) < rules.least or coordinator_age_s < rules.startup_grace_s:
        return False
    return eligible <= requesting or first_request_age_s >= rules.join_timeout_s


def quorum_hopeless(
    eligible: int, first_request_age_s: float, coordinator_age_s: float, run_started: bool, rules: QuorumRules,
    waited_out: bool = False,
) -> bool:
    """Whether a pending quorum should be refused now: too few live peers are left to reach min_peers (or the
    peers' aggregator's minimum).

    ``eligible``: live peers that could take part (requesting ones and syncing joiners
    included); ``run_started``: the run has committed a round; ``waited_out``: the live peers are those of the
    last quorum refused for too few, whose join timeout passed with nobody back.
    """
    if eligible >= rules.least or coordinator_age_s < rules.startup_grace_s:
        return False
    # Never before the join timeout, even when every live peer has asked: a peer killed and restarted by its
    # supervisor comes back within it, and the survivors' next round should be with it, not ahead of it. Once
    # is enough: when nobody came back in the last refused quorum's timeout, waiting it out again at every sync
    # cost each survivor a join timeout per sync (5 s a sync, 175 s of a 4 s run in the harness).
    if first_request_age_s < rules.join_timeout_s and not waited_out:
        return False
    # Before the first commit the run waits for min_peers (the operator's word), but not for the peers its
    # aggregator needs beyond them: nothing says they will come. The peers train on and ask again.
    return run_started or eligible >= rules.min_peers


def peers_to_probe(
    missing: set[str], waited_s: float, last_probe_age_s: dict[str, float], after_s: float = 0.1, every_s: float = 1.0,
    at_most: int = 64,
) -> list[str]:
    """Live peers a pending quorum waits for that the coordinator should check are still listening.

    A peer that has not asked for ``after_s`` is probed, at most once per
    ``every_s``; one whose port refuses connections is dead (a SIGKILLed
    process), so the quorum need not wait for its lease to lapse. A paused
    peer still accepts connections and is left to its lease. The wait before
    probing is what a kill between rounds costs the survivors (``lost_s``):
    0.1 s, well above the spread of a round's requests on a quiet run; at most
    ``at_most`` probes leave per call, so a run of thousands probes its
    stragglers over a few ticks instead of all at once.
    """
    if waited_s < after_s:
        return []
    return sorted(p for p in missing if last_probe_age_s.get(p, float("inf")) >= every_s)[:at_most]


def order_members(requesting: set[str]) -> list[str]:
    """The round's members in rank order (the same for every member)."""
    return sorted(requesting)


def next_epoch(
    epoch: int, previous_members: list[str] | None, members: list[str], must_bump: bool, restarted: bool = False
) -> int:
    """The epoch of a new attempt: bumped when the group changed or ``must_bump`` (the last attempt aborted).

    ``previous_members`` None: no round formed yet under this coordinator. In a new run that is
    no change; after a restart (``restarted``: the run had rounds before) it is one, since the
    previous coordinator may have given out this round id at this epoch already.
    """
    if previous_members is None:
        return epoch + 1 if restarted else epoch
    if must_bump or sorted(previous_members) != sorted(members):
        return epoch + 1
    return epoch


@dataclass(frozen=True)
class CommittedRound:
    """A committed round as the coordinator remembers it for catch-up."""

    round_id: int
    epoch: int
    tag: str
    members: tuple[str, ...]


def result_holders(c: CommittedRound, held: Mapping[int, Collection[str]], alive: Container[str]) -> tuple[str, ...]:
    """The live peers holding round c's result: its members, then the peers that said they keep it, sorted
    (``held``: round id -> such peers; peer/coordinator/resultholders.py)."""
    members = [m for m in c.members if m in alive]
    extra = sorted(p for p in held.get(c.round_id, ()) if p in alive and p not in c.members)
    return (*members, *extra)


def rounds_to_catch_up(
    committed: Sequence[CommittedRound],
    peer_last_round: int,
    last_committed_round: int,
    alive: Container[str],
    asker: str,
    held: Mapping[int, Collection[str]] | None = None,
) -> tuple[CommittedRound, ...]:
    """The rounds after ``peer_last_round`` a peer can apply in order, each with its live holders: the members
    but the asker, then the peers that keep its result (``held``; the asker among them catches up from its copy).

    Empty when the peer lacks nothing, or when one of the rounds it lacks is
    forgotten or has no live holder left: then it fetches the whole state.
    """
    wanted = last_committed_round - peer_last_round
    if wanted <= 0 or wanted > len(committed):
        return ()
    by_id = {c.round_id: c for c in committed}
    out = []
    for round_id in range(peer_last_round + 1, last_committed_round + 1):
        c = by_id.get(round_id)
        if c is None:
            return ()
        holders = tuple(p for p in result_holders(c, held or {}, alive) if p != asker or p not in c.members)
        if not holders:
            return ()
        out.append(replace(c, members=holders))
    return tuple(out)


@dataclass(frozen=True)
class Report:
    """One member's report of a round."""

    ok: bool
    failed: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True)
class Decision:
    """The outcome of a round: commit, or abort and drop some members."""

    commit: bool
    dropped: tuple[str, ...] = ()
    reason: str = ""
    # The dropped members other members named as failed (not only silent or lapsed): they sit out (sit_out).
    blamed: tuple[str, ...] = ()


MAX_SIT_OUT = 32
"""The most committed rounds a member the others keep failing to reach sits out at a time."""


@dataclass(frozen=True)
class SitOut:
    """A member's strikes (drops in a row for which others named it) and when its sitting out ends."""

    strikes: int
    until_round: int
    until_s: float


def sit_out(strikes: int, last_committed_round: int, now: float, lease_s: float) -> SitOut:
    """The sitting out of a member dropped, blamed by the others, for the ``strikes``-th time in a row: 2^(strikes-1)
    committed rounds (at most MAX_SIT_OUT), or that many times twice its lease in seconds, whichever ends first."""
    rounds = min(2 ** (max(strikes, 1) - 1), MAX_SIT_OUT)
    return SitOut(strikes, last_committed_round + rounds, now + rounds * 2 * lease_s)


def sitting_out(entry: SitOut | None, last_committed_round: int, now: float) -> bool:
    """Whether a member with this record sits out the quorum now."""
    return entry is not None and last_committed_round < entry.until_round and now < entry.until_s


@dataclass(frozen=True)
class CommitInputs:
    """Everything commit_decision looks at."""

    members: tuple[str, ...]
    reports: dict[str, Report] = field(default_factory=dict)
    # Members whose lease lapsed (dead or paused).
    expired: frozenset[str] = frozenset()
    deadline_passed: bool = False
    # failure_grace_s has passed since the first failure report: the round cannot commit any more.
    failure_grace_passed: bool = False


def commit_decision(inputs: CommitInputs) -> Decision | None:
    """The round's decision, or None while it is not yet known."""
    members = set(inputs.members)
    reports = {m: r for m, r in inputs.reports.items() if m in members}
    silent = members - set(reports)
    named = Counter(f for r in reports.values() if not r.ok for f in r.failed if f in members)
    any_failure = any(not r.ok for r in reports.values())

    if not silent:
        if not any_failure:
            return Decision(commit=True, reason="every member holds the result")
        return _abort(reports, silent, named, "")
    lapsed = silent & inputs.expired
    if lapsed:
        # Only the lapsed are dropped: the other silent members are alive, most likely waiting for the lapsed
        # one's data. Their heartbeats tell them the attempt is over (attempt_over); they report, and are
        # members of the retry without joining again.
        return _abort(reports, lapsed, named, f"lease lapsed: {', '.join(sorted(lapsed))}")
    if any_failure and silent <= set(named):
        return _abort(reports, silent, named, "")
    if any_failure and inputs.failure_grace_passed:
        # A failure already decided the round; the silent members nobody named are alive (their lease holds),
        # most likely waiting for data the failed member will not send. They are not dropped: their heartbeats
        # tell them the attempt is over, and they take part in the retry. Waiting for them until the deadline
        # would only delay that retry.
        unnamed = ", ".join(sorted(silent - set(named)))
        return _abort(reports, set(), named, f"no report within the failure grace from {unnamed}")
    if inputs.deadline_passed:
        return _abort(reports, silent, named, f"no report before the deadline from {', '.join(sorted(silent))}")
    return None


def answer_lost(members: Collection[str], reported: Container[str], asker: str) -> bool:
    """Whether a quorum request from ``asker`` shows that it never learned it is a member of the attempt in flight
    (``members``, of whom ``reported`` reported): a peer asks for a round only once its last one is decided, so a
    member that asks before reporting lost the answer that named it (a Session stream reset as it rejoined)."""
    return asker in members and asker not in reported


def attempt_over(
    attempt: tuple[int, int], pending: Container[tuple[int, int]], decided: dict[tuple[int, int], Decision]
) -> str:
    """Why the attempt (round id, epoch) a member is in will not commit, or "" while it may (pending or committed)."""
    round_id, epoch = attempt
    if round_id == 0 or attempt in pending:
        return ""
    decision = decided.get(attempt)
    if decision is None:
        return f"round {round_id} at epoch {epoch} is unknown to the coordinator (it restarted, or the round moved on)"
    if decision.commit:
        return ""
    return f"the coordinator aborted round {round_id} at epoch {epoch}: {decision.reason}"[:2000]


def _abort(reports: dict[str, Report], silent: set[str], named: Counter, why: str) -> Decision:
    if silent:
        dropped = set(silent)
    elif named:
        top = max(named.values())
        dropped = {m for m, n in named.items() if n == top}
    else:
        dropped = set()
    reasons = [f"{m}: {r.reason}" for m, r in sorted(reports.items()) if not r.ok and r.reason]
    text = "; ".join(filter(None, [why, *reasons])) or "a member failed"
    blamed = tuple(sorted(m for m in dropped if named[m] > 0))
    return Decision(commit=False, dropped=tuple(sorted(dropped)), reason=text[:2000], blamed=blamed)


def choose_sync_sources(
    peers: list[PeerView],
    joiner_id: str,
    last_committed_round: int,
    serving: dict[str, int] | None = None,
    most: int = MAX_SYNC_SOURCES,
) -> tuple[PeerView, ...]:
    """The peers a joiner may fetch the state from, least busy first (at most ``most``); empty if nobody is up to
    date."""
    serving = serving or {}
    candidates = (
        p
        for p in peers
        if p.peer_id != joiner_id and p.alive and p.has_state and p.last_round >= last_committed_round
    )
    # nsmallest: O(n log most), as this runs per join and per resync over every live peer.
    return tuple(heapq.nsmallest(most, candidates, key=lambda p: (serving.get(p.peer_id, 0), p.peer_id)))


def choose_sync_source(
    peers: list[PeerView], joiner_id: str, last_committed_round: int, serving: dict[str, int] | None = None
) -> PeerView | None:
    """The peer a joiner should fetch the state from, or None if nobody holds an up-to-date state."""
    sources = choose_sync_sources(peers, joiner_id, last_committed_round, serving, most=1)
    return sources[0] if sources else None
