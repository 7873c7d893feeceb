"""The state digests peers report for recent committed rounds, and which peers hold a state that lost.

Every peer reports the SHA-256 of its state as of its last round (Join, Heartbeat, Quorum, Leave). The
run's peers apply the same rounds to the same state, so for one round they must all report one digest.
The book keeps, per recent round, the digest the run holds: the one more of the round's members report
than any other, on a tie the one its most senior reporter (the earliest to join) holds, and the first
report until a second arrives. A peer outside the round (a joiner, a sybil) reports but does not vote.

A peer whose report differs from the kept digest *lost*: its state is not the run's (an API user's joiner
that never loaded the state it fetched, a nondeterministic device, a corrupted write). It is noted to
``realign``: the coordinator answers its next Quorum with RESYNC, so that it fetches the run's state
instead of training on its own for good (resync.py bounds how often one peer is realigned).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

# How many recent committed rounds keep their state digest (a checkpoint of one of them is checked against it).
DIGEST_ROUNDS = 64
# The seniority of a reporter the run does not know (the state file's, a forgotten peer): the most junior.
UNKNOWN_SENIORITY = float("inf")


@dataclass
class DigestBook:
    """The kept digest of each recent committed round, who reported what, and the peers whose state lost."""

    # Round id -> (SHA-256 hex kept, the peer that reported it first; "" for the state file).
    kept: dict[int, tuple[str, str]] = field(default_factory=dict)
    # Round id -> its members, for the rounds this coordinator committed (only they vote on its digest).
    members: dict[int, frozenset[str]] = field(default_factory=dict)
    # Round id -> digest -> the voters that reported it.
    votes: dict[int, dict[str, set[str]]] = field(default_factory=dict)
    # Round id -> peer id -> the digest it reported (every reporter: the losers are read from it).
    reports: dict[int, dict[str, str]] = field(default_factory=dict)
    # The (round, peer) pairs already told of as diverging (each is logged once).
    diverged: set[tuple[int, str]] = field(default_factory=set)
    # Peers whose state lost to the kept digest and have not fetched the run's state since.
    realign: set[str] = field(default_factory=set)

    def digest_of(self, round_id: int) -> str:
        """The digest kept for a recent committed round; "" when unknown or forgotten."""
        kept = self.kept.get(round_id)
        return kept[0] if kept is not None else ""

    def record(self, round_id: int, digest: str) -> None:
        """Keep the state file's digest of its last committed round (no peer reported it yet)."""
        self.kept[round_id] = (digest, "")

    def round_committed(self, round_id: int, members: Collection[str]) -> None:
        """Round round_id committed with these members: they alone vote on its digest (rounds DIGEST_ROUNDS
        before it are forgotten, reported or not)."""
        self.members[round_id] = frozenset(members)
        self._keep_only(lambda r: r > round_id - DIGEST_ROUNDS)

    def forget_after(self, round_id: int) -> None:
        """A rollback to round_id: the later rounds' digests and reports are gone."""
        self._keep_only(lambda r: r <= round_id)

    def note(
        self, round_id: int, digest: str, peer_id: str, oldest: int, seniority: Callable[[str], float]
    ) -> tuple[str, str] | None:
        """Note peer_id's digest of its state at round_id (rounds up to ``oldest`` are forgotten). Returns
        (reporter, digest) of the kept digest this report differs from, the first time it does for that round;
        None otherwise. ``seniority``: a peer's join time.

        Only the round's members vote (everyone, for a round this coordinator did not commit): a report from
        outside the round is never kept, and one that differs from the kept digest lost."""
        members = self.members.get(round_id)
        voter = members is None or peer_id in members
        self.reports.setdefault(round_id, {})[peer_id] = digest
        votes = self.votes.setdefault(round_id, {})
        if voter:
            for others in votes.values():  # one vote per peer: its latest report (it may have fetched the state)
                others.discard(peer_id)
            votes.setdefault(digest, set()).add(peer_id)
        kept = self.kept.get(round_id)
        if kept is None:
            # A non-member's word waits for a member's; so does a peer's whose state lost and that has not fetched
            # the run's since (it would set the digest a realigning fetch expects to its own: test_realign in CI).
            if voter and peer_id not in self.realign:
                self._keep(round_id, digest, peer_id)
                self._keep_only(lambda r: r > oldest)
            return None
        if kept[0] == digest:
            if kept[1] != peer_id:  # it agrees with another member: its state is the run's
                self.realign.discard(peer_id)
            return None
        if voter and _standing(votes[digest], seniority) > _standing(votes.get(kept[0], ()), seniority):
            self._keep(round_id, digest, peer_id)
        else:
            self._lost(peer_id)
        if (round_id, peer_id) in self.diverged:
            return None
        self.diverged.add((round_id, peer_id))
        return kept[1], kept[0]

    def must_realign(self, peer_id: str) -> bool:
        """Whether peer_id's state lost to the run's and it has not fetched the run's state since."""
        return peer_id in self.realign

    def realigned(self, peer_id: str) -> None:
        """peer_id was told to fetch the run's state (or is gone): it no longer needs to."""
        self.realign.discard(peer_id)

    def _keep(self, round_id: int, digest: str, peer_id: str) -> None:
        """Keep digest for round_id: every reporter of another digest for it lost, and every other reporter of this
        one agrees with peer_id. peer_id's own standing stays as it was: the first report of a round is kept until a
        more senior one differs, and a peer whose state lost a round before (it never loaded the run's) that asks
        first every time would otherwise clear itself each round and never be told to fetch the run's state (CI, at
        feea8dd: test_realign)."""
        self.kept[round_id] = (digest, peer_id)
        for reporter, reported in list(self.reports[round_id].items()):
            if reported != digest:
                self._lost(reporter)
            elif reporter != peer_id:
                self.realign.discard(reporter)

    def _lost(self, peer_id: str) -> None:
        """peer_id's state lost: it must realign, and a later round's digest kept on its word alone is forgotten
        until another member reports (a fetch told to expect it would refuse the run's state: test_realign in CI)."""
        self.realign.add(peer_id)
        for round_id, (digest, reporter) in list(self.kept.items()):
            if reporter == peer_id and self.votes.get(round_id, {}).get(digest, set()) <= {peer_id}:
                del self.kept[round_id]

    def _keep_only(self, wanted: Callable[[int], bool]) -> None:
        self.kept = {r: d for r, d in self.kept.items() if wanted(r)}
        self.members = {r: m for r, m in self.members.items() if wanted(r)}
        self.votes = {r: v for r, v in self.votes.items() if wanted(r)}
        self.reports = {r: v for r, v in self.reports.items() if wanted(r)}
        self.diverged = {(r, p) for r, p in self.diverged if wanted(r)}


def _standing(voters: Collection[str], seniority: Callable[[str], float]) -> tuple[int, float]:
    """How strongly a digest is held: its voters, then (on a tie) its most senior voter's earliness."""
    return len(voters), -min((seniority(p) for p in voters), default=UNKNOWN_SENIORITY)
