"""Where a peer behind the run gets what it lacks: the state's holders, and the missed rounds' results.

The coordinator's answers to a joiner and to a peer told to resync name
either live, up-to-date holders of the run's state (least busy first: each
counts the fetches it was named first for) or, when every round the peer
missed is remembered and held, those rounds with their live holders, so
that it fetches their results instead (``rules.rounds_to_catch_up``). A
round's holders are its members and the peers asked to keep its result
(``peer/coordinator/resultholders.py``), which heartbeats report and ask for
here (``to_hold``), and whom the coordinator asks at once as a round of too
few holders commits (``to_push``). Everything runs on the coordinator's loop.
"""

from __future__ import annotations

from collections.abc import Collection, Container
from dataclasses import replace

from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.durable import checked_digest
from peer.coordinator.resultholders import MAX_HELD_REPORTED, holders_to_push, rounds_to_hold
from peer.coordinator.rules import CommittedRound, PeerView, choose_sync_sources, result_holders, rounds_to_catch_up
from peer.coordinator.runstate import RunState
from protos import membership_pb2 as pb


class Sources:
    """The holders of the run's state and of recent rounds' results, as named to the peers that lack them."""

    def __init__(self, config: CoordinatorConfig, state: RunState) -> None:
        self.config = config
        self.state = state
        # Peer id -> fetches it was named the first source for, until it takes part in a round again.
        self._serving: dict[str, int] = {}

    def state_sources(
        self, peer_id: str, count: bool = True, exclude: Collection[str] = ()
    ) -> tuple[PeerView, ...]:
        """Live up-to-date holders (but those in ``exclude``) for a peer to fetch the state from, least busy first;
        counts it against the first.

        Only the first (sync_from) is counted: it carries the whole fetch of a joiner that does not
        stripe, and counting it alone makes consecutive joiners start at different donors.
        """
        s = self.state
        committed = s.last_committed_round
        # Only up-to-date holders can be sources (choose_sync_sources checks it again): views of them alone, as
        # building a view of every live peer for each of 1,000 joiners took a second of the loop.
        holders = [
            p.view() for p in s.alive_peers() if p.has_state and p.last_round >= committed and p.peer_id not in exclude
        ]
        sources = choose_sync_sources(holders, peer_id, committed, self._serving)
        if sources and count:
            self._serving[sources[0].peer_id] = self._serving.get(sources[0].peer_id, 0) + 1
        return sources

    def done_serving(self, peer_id: str) -> None:
        """peer_id takes part in rounds again, or is gone: the fetches it was named for no longer count."""
        self._serving.pop(peer_id, None)

    def missed(self, peer_id: str, last_round: int) -> list[pb.CommittedRound]:
        """The committed rounds after last_round with their live holders' addresses; [] unless each is remembered
        and held."""
        s = self.state
        rounds = rounds_to_catch_up(
            s.committed, last_round, s.last_committed_round, s.live, peer_id, held=s.result_holders.held
        )
        return [self._message(c) for c in rounds]

    def to_hold(self, peer_id: str, req: pb.HeartbeatRequest, now: float) -> list[pb.CommittedRound]:
        """Note the results a heartbeat says its peer keeps; the rounds it should fetch and keep too, if it offers."""
        s = self.state
        book = s.result_holders
        if not req.holds_results:
            return []
        # A peer that offers lists every result it keeps in each heartbeat (none: an empty list).
        # A malformed digest refuses the heartbeat (INVALID_ARGUMENT), as a malformed state digest does.
        held = [(h.round_id, h.epoch, checked_digest(h.digest)) for h in req.held_results[:MAX_HELD_REPORTED]]
        book.note_held(peer_id, held, {c.round_id: c.epoch for c in s.committed})
        if self.config.result_holders == 0:
            return []
        rounds = rounds_to_hold(
            s.committed, book.held, book.asked, s.live, peer_id, req.last_round, self.config.result_holders, now,
            ask_s=self.config.lease_s,
        )
        book.note_asked(peer_id, [c.round_id for c in rounds], now)
        return [self._message(c) for c in rounds]

    def to_push(
        self, round_id: int, reachable: Container[str], now: float, heard_s: float
    ) -> tuple[tuple[str, ...], pb.CommittedRound | None]:
        """As round_id commits: the peers (among ``reachable``, and heard from within ``heard_s``) to ask at once
        to keep its result, and the round as they are sent it, with its live holders; ((), None) when it has enough
        holders or nobody to ask."""
        s = self.state
        target = self.config.result_holders
        c = s.committed[-1] if s.committed else None
        # A round of target members or more asks nobody: checked first, as a round may have 1,000 members.
        if c is None or c.round_id != round_id or target == 0 or len(c.members) >= target:
            return (), None
        book = s.result_holders
        alive = s.alive_peers()
        # A peer silent for a while (paused, cut off) would fetch nothing soon: its next heartbeat asks it instead.
        candidates = [
            p.peer_id for p in alive
            if p.offers_results and p.last_round < round_id and p.peer_id in reachable and now - p.last_seen <= heard_s
        ]
        hosts = {p.peer_id: p.host_id for p in alive}
        chosen = holders_to_push(c, candidates, hosts, book.held, book.asked, s.live, target, now,
                                 ask_s=self.config.lease_s)
        if not chosen:
            return (), None
        for peer_id in chosen:
            book.note_asked(peer_id, [round_id], now)
        return chosen, self._message(replace(c, members=result_holders(c, book.held, s.live)))

    def _message(self, c: CommittedRound) -> pb.CommittedRound:
        """A remembered round as sent to peers, its ``members`` (live holders here) with their addresses."""
        members = [pb.Member(peer_id=m, address=self.state.peers[m].address) for m in c.members]
        # The digest is of the round as remembered (its members), not of the holders this message names.
        remembered = next((r for r in self.state.committed if r.round_id == c.round_id), c)
        digest = self.state.result_holders.digest_of(remembered)
        return pb.CommittedRound(round_id=c.round_id, epoch=c.epoch, tag=c.tag, members=members, result_digest=digest)
