"""What the harness reports about peers that joined and about the run's state surviving its holders.

Pure functions of the peers' JSON events (``loconet peer --events``) and the
coordinator's status, so each figure has a table-like test:

- per peer that joined the run mid-way (``joiners``): how long its state
  fetch took and how many bytes it moved (and from how many donors), how many
  rounds it then applied late by their results and what those cost, and the
  time from its start to its first round of its own;
- ``restarts_from_round_0``: peers that, after the run had committed rounds,
  started training from round 0 (a re-founded run: what must never happen);
- ``rollbacks``: the coordinator's "rollback" events (every holder of the
  newest state gone; the run went on from an older one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def joiner_figures(events: list[dict]) -> dict | None:
    """Fetch, catch-up and first-commit figures of one peer from its events; None if it never joined."""
    start = next((e["t"] for e in events if e["event"] == "connecting"), None)
    joined = next((e for e in events if e["event"] == "joined"), None)
    if start is None or joined is None:
        return None
    fetch = joined.get("fetch") or {}
    late = [e for e in events if e["event"] == "committed" and not e.get("contributed", True)]
    own = [e for e in events if e["event"] == "committed" and e.get("contributed", True)]
    return {
        "joined_at_round": joined.get("round"),
        "fetch_s": fetch.get("seconds", joined.get("sync_s")),
        "fetch_bytes": fetch.get("total_bytes"),
        "fetch_sources": len(fetch.get("bytes_by_source") or {}),
        "rounds_caught_up": len(late),
        "catch_up_bytes": sum(e.get("fetched_bytes") or 0 for e in late),
        "first_commit_s": (own[0]["t"] - start) if own else None,
        "rounds_committed": len(own),
    }


def joiners(events_by_peer: Mapping[str, list[dict]], late_peers: Iterable[str]) -> dict[str, dict]:
    """joiner_figures of each peer that joined the run mid-way (named in late_peers)."""
    out = {}
    for name in late_peers:
        figures = joiner_figures(events_by_peer.get(name, []))
        if figures is not None:
            out[name] = figures
    return out


def restarts_from_round_0(events_by_peer: Mapping[str, list[dict]]) -> list[str]:
    """Peers that started the run anew from round 0 (fetching nothing) after the run had committed rounds.

    A peer that fetched the run's state joins at the round it fetched (round 0 too, when its fetch of the
    initial state outlasted the first rounds), one that resumed a checkpoint at that checkpoint's round, and one
    that kept its initial state (the founder's, before the first commit) at round 0 without a fetch, saying so;
    one that founded the run again joins at round 0 without a fetch.
    """
    first_commit = min(
        (e["t"] for evs in events_by_peer.values() for e in evs if e["event"] == "committed"), default=None
    )
    found = []
    for name, evs in events_by_peer.items():
        joined = next((e for e in evs if e["event"] == "joined"), None)
        refounded = (
            joined is not None and joined.get("round") == 0 and not joined.get("fetch")
            and not joined.get("kept_initial")
        )
        if refounded and first_commit is not None and joined["t"] > first_commit:
            found.append(name)
    return sorted(found)


def rollbacks(status: Mapping) -> list[str]:
    """The coordinator's rollback events, as their text (empty when the run never went back)."""
    return [e.get("detail", "") for e in status.get("events", []) if e.get("kind") == "rollback"]
