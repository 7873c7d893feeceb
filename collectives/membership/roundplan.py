"""The coordinator's answers as a peer holds them, and what a peer knows of the run from them.

A join's answer is ``Joined``; a Quorum call's is a ``RoundPlan`` (take part in a round, or resync first, maybe
by the ``MissedRound`` results it lacks); a Commit call's is a ``CommitOutcome``. ``KnownMembers`` keeps the
member list of the last ROUND answer, which a later answer may leave out or give as a change. What heartbeat
answers say is read with ``heartbeat_interval`` and ``commit_time``. Plain data and pure functions: the client
that makes the calls is collectives/membership/client.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NoReturn

from collectives.errors import RoundFailed
from collectives.membership.memberlists import (
    BadMemberChange,
    BadPackedList,
    Entry,
    changed_list,
    entries_of,
    unpack_list,
)
from collectives.membership.sampling import check_sample, sample_size
from protos import membership_pb2 as pb

# A coordinator's "seconds since the last commit" above a day is not believed: no sync interval is that long.
MAX_SINCE_COMMIT_S = 86400.0
# The reason a member that ran to its end gives as it leaves (the coordinator then does not expect it back).
FINISHED = "finished"
# How a dynamic-k worker's round tag names the k it chose ("sync-sgd:k=3"), which the coordinator's backup policy reads.
BACKUP_TAG_KEY = ":k="
# The run id a coordinator serves and its peers ask for when none is given (the same everywhere,
# so a peer started without --run reaches a coordinator started without it).
DEFAULT_RUN_ID = "loconet"


@dataclass(frozen=True)
class MissedRound:
    """A committed round this peer lacks: fetch its result from one of ``members`` and apply it."""

    round_id: int
    epoch: int
    tag: str = ""
    members: tuple[tuple[str, str], ...] = ()  # (peer id, address) of live peers holding the result: members first
    # SHA-256 (hex) of the result's fp32 bytes as its members reported it ("" unknown): a fetched one must match.
    digest: str = ""


def missed_rounds(rounds: Iterable[pb.CommittedRound]) -> tuple[MissedRound, ...]:
    """MissedRounds from the coordinator's CommittedRound messages, in order."""
    return tuple(
        MissedRound(r.round_id, r.epoch, r.tag, tuple((m.peer_id, m.address) for m in r.members), r.result_digest[:64])
        for r in rounds
    )


@dataclass(frozen=True)
class Joined:
    """The coordinator's answer to a join."""

    peer_id: str
    lease_s: float
    heartbeat_s: float
    epoch: int
    last_committed_round: int
    sync_from: str
    # With sync_from, for a peer that holds a state: the rounds it lacks, if all can be fetched (else empty).
    missed: tuple[MissedRound, ...] = ()
    # SHA-256 (hex) recorded for the state of last_committed_round; "" when unknown.
    state_digest: str = ""
    # Live up-to-date holders to fetch the state from, least busy first (sync_from is the first).
    sync_sources: tuple[str, ...] = ()
    # True: nobody live holds the run's committed state; this peer is not registered and must not start
    # from its own state: say wait_reason, and join again every heartbeat_s (lease_s: when it is forgotten).
    wait: bool = False
    wait_reason: str = ""
    # With wait: every known holder of the run's last round left saying it finished (none is expected back).
    holders_finished: bool = False


@dataclass(frozen=True)
class RoundPlan:
    """What the coordinator says to do next: take part in a round, or resync first."""

    action: str  # "round" or "resync"
    round_id: int = 0
    epoch: int = 0
    members: tuple[tuple[str, str], ...] = ()  # (peer id, address) in rank order
    rank: int = 0
    sync_from: str = ""
    last_committed_round: int = 0
    # resync: the committed rounds after this peer's last round, in order, when every one of them can be
    # fetched from a live member; empty: fetch the whole state from sync_from.
    missed: tuple[MissedRound, ...] = ()
    # round: the quorum policy that chose the members ("all", "first-k:K", "sample:K", "sample:F,min=M"),
    # the run's seed and, for sample, the peer ids the sample was drawn from (see check_sample).
    policy: str = ""
    seed: int = 0
    candidates: tuple[str, ...] = ()
    # resync: the SHA-256 recorded for last_committed_round ("" unknown), and live up-to-date holders
    # to fetch the state from, least busy first (sync_from is the first).
    state_digest: str = ""
    sync_sources: tuple[str, ...] = ()
    # round: each member's host id, in rank order ("": a host of its own), from which the round's hierarchy is built.
    hosts: tuple[str, ...] = ()
    # resync: the tag of the quorum the run's peers wait in now ("": none).
    pending_tag: str = ""
    # round: the furthest inner step a member asked for it at (0: unknown; QuorumResponse.members_step).
    members_step: int = 0

    def share(self) -> float:
        """Members / the candidates the plan names: the round's share of its policy's pool (a sample's, or the live
        roster); 1 when it names none."""
        return min(1.0, len(self.members) / len(self.candidates)) if self.candidates else 1.0

    def check_sample(self, least: int = 1) -> None:
        """Raise SampleMismatch if this is a sample round whose members are not the seeded sample.

        k is recomputed here from the policy and the candidates (for a fraction: of them, rounded up, at
        least its min), and ``least``, the members this peer's rounds need (as the run's peers all need), so a
        member outside the policy's sample is caught whatever k the coordinator used.
        """
        size = sample_size(self.policy)
        if self.action == "round" and size is not None:
            k = size.of(len(set(self.candidates)), least)
            check_sample(self.seed, self.round_id, self.candidates, k, [pid for pid, _ in self.members])


@dataclass(frozen=True)
class CommitOutcome:
    """The coordinator's decision on a round."""

    commit: bool
    reason: str
    epoch: int
    dropped: tuple[str, ...] = ()


@dataclass
class KnownMembers:
    """The member list of a peer's last ROUND answer and its digest (QuorumResponse.members_digest)."""

    digest: bytes = b""
    entries: tuple[Entry, ...] = ()
    members: tuple[tuple[str, str], ...] = ()
    hosts: tuple[str, ...] = ()

    def of(self, reply: pb.QuorumResponse) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
        """A ROUND answer's (peer id, address) members and host ids: its own list, the kept one changed as the
        answer says, or the kept one when the answer left it out (the result is kept); RoundFailed when the answer
        needs a list this peer does not hold, or its change does not give the round's list."""
        if reply.members:
            self._keep(reply.members_digest, entries_of(reply.members))
        elif reply.members_packed:
            try:
                self._keep(reply.members_digest, unpack_list(reply.members_packed, reply.members_digest))
            except BadPackedList as exc:
                self._fail(reply, f"carries a packed member list that is not sound: {exc}")
        elif reply.members_base:
            self._keep(reply.members_digest, self._changed(reply))
        elif not self.digest or reply.members_digest != self.digest:
            self._fail(reply, "left out a member list this peer does not hold")
        return self.members, self.hosts

    def _changed(self, reply: pb.QuorumResponse) -> tuple[Entry, ...]:
        if not self.digest or reply.members_base != self.digest:
            self._fail(reply, "carries a change to a member list this peer does not hold")
        try:
            return changed_list(self.entries, reply)
        except BadMemberChange as exc:
            self._fail(reply, f"carries a member-list change that does not apply: {exc}")

    def _keep(self, digest: bytes, entries: tuple[Entry, ...]) -> None:
        self.digest, self.entries = digest, entries
        self.members = tuple((e.peer_id, e.address) for e in entries)
        self.hosts = tuple(e.host_id for e in entries)

    def _fail(self, reply: pb.QuorumResponse, why: str) -> NoReturn:
        self.digest = b""  # the next request asks for the whole list
        raise RoundFailed(
            f"the coordinator's answer for round {reply.round_id} {why}; it asks again for the whole list"
        )


# The heartbeat intervals a coordinator's answer may set (anything else is ignored: the peer keeps its own).
HEARTBEAT_RANGE_S = (0.05, 600.0)


def heartbeat_interval(current_s: float, told_s: float) -> float:
    """The interval to heartbeat at after an answer that said told_s: it when in range, else current_s
    (0 from an older coordinator; a NaN or absurd value is not obeyed)."""
    low, high = HEARTBEAT_RANGE_S
    return told_s if low <= told_s <= high else current_s


def commit_time(since_commit_s: float, now: float) -> float | None:
    """The local time (now's clock) of the run's last commit, from a coordinator's seconds since it; None when it
    says none (0) or gives no sane duration (negative, not finite, or more than a day)."""
    if not (0.0 < since_commit_s <= MAX_SINCE_COMMIT_S):  # also refuses NaN
        return None
    return now - since_commit_s
