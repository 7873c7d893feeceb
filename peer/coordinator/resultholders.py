"""Who keeps a committed round's result besides its members, and whom the coordinator asks to keep one.

A round that took only some of the live peers (an asynchronous buffer, a
sample, first-k) is held by its members alone until the others catch up at
their own next sync, which may be seconds later. Lose those members together
(one host, one power cut) and the run's last round is gone: the other peers
wait for a holder that never comes back. So the coordinator asks other live
peers, in their heartbeat answers, to fetch such a round's result from its
holders and keep it, until each remembered round is held by ``target`` live
peers (``--result-holders``, members counted):

- only a peer that offers (``HeartbeatRequest.holds_results``: its rounds'
  results are the run's, so not NoLoCo's pairs) is asked, and only for
  rounds after its own state (a peer that applied a round holds its state,
  which joiners fetch anyway);
- at most ``HOLD_PER_ANSWER`` rounds per answer, newest first, and a peer
  asked counts as a holder for ``ask_s`` seconds before it confirms, so that
  a round's next heartbeats do not all ask for it;
- a peer says in every heartbeat which results it keeps (``held_results``,
  by round and epoch: only the attempt that committed a remembered round
  counts): from then on late peers catching up are sent to it too
  (``rules.rounds_to_catch_up``), and it catches up from its own copy.

A heartbeat comes up to an interval after the commit, and a round's members
may all be gone by then (chaos seed 1149 killed both members of a round of
two a few tenths of a second after its commit). So as such a round commits, the
coordinator asks as many peers as it lacks at once, on their Session streams
(``holders_to_push``: offering peers on other hosts than the members first,
since one host's peers die together); the heartbeats ask for the rest.

The bytes: an extra holder fetches once, early, a result it would otherwise
fetch at its own catch-up; a round of all the live peers asks nobody.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from peer.coordinator.rules import CommittedRound, result_holders

# Rounds named in one heartbeat answer at most (the newest first).
HOLD_PER_ANSWER = 2
# A heartbeat's held_results beyond this many are not read (a peer keeps a few recent results).
MAX_HELD_REPORTED = 64


@dataclass
class ResultHolders:
    """Which peers keep which remembered round's result besides its members: those that said so, and those asked."""

    # round id -> peers whose heartbeats say they keep its result now.
    held: dict[int, set[str]] = field(default_factory=dict)
    # round id -> peer -> when it was asked to keep it (time.monotonic()), until it says it does.
    asked: dict[int, dict[str, float]] = field(default_factory=dict)
    # round id -> peer -> the digest it reported of the round's result (only members' count: result_digest).
    digests: dict[int, dict[str, str]] = field(default_factory=dict)

    def note_held(self, peer_id: str, attempts: Iterable[tuple[int, int, str]], remembered: Mapping[int, int]) -> None:
        """A heartbeat's ``held_results``, (round id, epoch, digest): what peer_id keeps now, replacing what it said
        before. Only the attempts that committed a remembered round (``remembered``: round id -> its epoch) count:
        a result of a round rolled back and committed again is another round's."""
        now_held = {r: d for r, e, d in attempts if remembered.get(r) == e}
        for round_id, peers in self.held.items():
            if round_id not in now_held:
                peers.discard(peer_id)
        for round_id, digest in now_held.items():
            self.held.setdefault(round_id, set()).add(peer_id)
            self.asked.get(round_id, {}).pop(peer_id, None)
            if digest:
                self.digests.setdefault(round_id, {})[peer_id] = digest

    def digest_of(self, c: CommittedRound) -> str:
        """The digest of round c's result that most of its members reported ("" when none did, or on a tie)."""
        return result_digest(self.digests.get(c.round_id, {}), c.members)

    def note_asked(self, peer_id: str, rounds: Iterable[int], now: float) -> None:
        """peer_id was asked (at now) to fetch and keep these rounds' results."""
        for round_id in rounds:
            self.asked.setdefault(round_id, {})[peer_id] = now

    def by_peer(self, committed: Iterable[CommittedRound]) -> dict[str, list[int]]:
        """Peer id -> the remembered rounds whose result it keeps though it was no member, oldest first."""
        out: dict[str, list[int]] = {}
        for c in committed:
            for peer_id in sorted(self.held.get(c.round_id, set()) - set(c.members)):
                out.setdefault(peer_id, []).append(c.round_id)
        return out

    def forget(self, remembered: Collection[int]) -> None:
        """Drop what is known of rounds no longer remembered (older than the catch-up window, or rolled back)."""
        for book in (self.held, self.asked, self.digests):
            for round_id in [r for r in book if r not in remembered]:
                del book[round_id]


def result_digest(reported: Mapping[str, str], members: Collection[str]) -> str:
    """The digest most of the round's members reported of its result ("" when none did, or on a tie): a member
    computed the result, a peer that fetched it only says what it got, so it does not vote."""
    # By member, not by report: a round's members are a tuple (1,000 of them), and this runs for every answer.
    votes = Counter(reported[m] for m in members if reported.get(m))
    ranked = votes.most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return ""
    return ranked[0][0]


def recently_asked(
    asked: Mapping[int, Mapping[str, float]], round_id: int, alive: Container[str], now: float, ask_s: float
) -> set[str]:
    """The live peers asked within ask_s of now to keep round_id's result: they count as its holders meanwhile."""
    return {p for p, at in asked.get(round_id, {}).items() if p in alive and now - at < ask_s}


def holders_to_push(
    c: CommittedRound,
    candidates: Iterable[str],
    hosts: Mapping[str, str],
    held: Mapping[int, Collection[str]],
    asked: Mapping[int, Mapping[str, float]],
    alive: Container[str],
    target: int,
    now: float,
    ask_s: float,
) -> tuple[str, ...]:
    """The peers to ask at once, as round c commits, to fetch and keep its result: as many ``candidates`` (live
    peers that offer and can be reached, none of them ahead of c) as c lacks of ``target`` live holders, members
    and peers asked within ask_s counted. Those on another host than c's members come first (``hosts``: peer id
    -> the host it said it runs on, "" its own), then by id. Empty when no live holder is left to fetch from."""
    sources = result_holders(c, held, alive)
    recent = recently_asked(asked, c.round_id, alive, now, ask_s)
    lacking = target - len(set(sources) | recent)
    if not sources or lacking <= 0:
        return ()
    taken = set(sources) | recent | set(c.members)
    member_hosts = {hosts.get(m, "") for m in c.members} - {""}
    free = sorted((p for p in candidates if p not in taken), key=lambda p: (hosts.get(p, "") in member_hosts, p))
    return tuple(free[:lacking])


def rounds_to_hold(
    committed: Sequence[CommittedRound],
    held: Mapping[int, Collection[str]],
    asked: Mapping[int, Mapping[str, float]],
    alive: Container[str],
    peer_id: str,
    peer_last_round: int,
    target: int,
    now: float,
    ask_s: float,
    most: int = HOLD_PER_ANSWER,
) -> tuple[CommittedRound, ...]:
    """The remembered rounds peer_id should fetch and keep the result of, newest first, each with its live holders
    to fetch it from: rounds after peer_last_round that fewer than target live peers hold or were asked to
    (within ask_s of now), that peer_id neither holds nor was asked for, and that a live peer still holds."""
    out: list[CommittedRound] = []
    for c in reversed(committed):
        if len(out) >= most:
            break
        if c.round_id <= peer_last_round or peer_id in c.members or peer_id in held.get(c.round_id, ()):
            continue
        recent = recently_asked(asked, c.round_id, alive, now, ask_s)
        if peer_id in recent:
            continue
        sources = result_holders(c, held, alive)
        if sources and len(set(sources) | recent) < target:
            out.append(replace(c, members=sources))
    return tuple(out)
