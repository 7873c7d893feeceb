"""Random fault scenarios (``loconet harness --chaos N[,seed=S]``): N events drawn from a seed, pure and reproducible.

What a user of a fault-tolerant run wants to know is that no mix of faults breaks it, not only the mixes someone
thought of. The events are drawn in the order of the rounds they fire at, among:

- ``kill`` of a peer, between rounds or inside its next sync;
- ``stop`` of a peer, started again with its checkpoint 1-2 s later;
- ``pause`` of a peer for 1-12 s (past its lease or not);
- ``join`` of one more peer;
- ``restart-coordinator``;
- ``cut`` of a peer's link for 1-8 s, with ``--netns`` only;
- with ``with=straggle+stall`` (``N,seed=S,with=...``), also ``straggle`` (a peer trains 2-4 times slower for
  3-12 s) and ``stall`` (the harness holds idle data-plane streams and unread state fetches against a peer
  for 3-12 s, ``peer/harness/stall.py``). They are asked for by name so that a seed drawn without them draws
  the same events as before they existed: a seed recorded in BENCHMARKS.md stays a reproducible report.

Three rules keep every drawn event one that can happen: kills leave at least ``MIN_SURVIVORS`` of the
starting peers, and as many as the rounds need (``least``: Krum's 2f+3, ``--dp-min-members``; a kill that would
not is a pause instead), a killed peer is the target of no later event, and a
peer stopped and started again is killed between rounds, not at its N-th sync (its new process counts from 1).
Events fire within the first two thirds of the run's rounds, so that the run goes on after the last one. What
rounds cannot say is time: where rounds take milliseconds, the others may finish while a stopped peer is down,
and it comes back to a run nobody holds. The harness ends that scenario with ``ScenarioStuck`` and says why, as
it would for the same events given with ``--event``: give the run more steps.

The same (count, seed, peers, rounds, netns) always give the same events; the harness's report lists them as it
does events given with ``--event``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from collectives.errors import ConfigError
from peer.harness.scenario import Event, parse_event
from peer.runtime.training import TrainConfig

# Kills never leave fewer of the starting peers than this: a run of one has nobody to fail over to.
MIN_SURVIVORS = 2
# The kinds drawn, each as likely as the others (cut only with network namespaces).
KINDS = ("kill", "kill-in-sync", "stop", "pause", "join", "restart-coordinator")
NETNS_KINDS = ("cut",)
# Kinds drawn only when the spec names them (``with=``), after the others.
EXTRA_KINDS = ("straggle", "stall")
PAUSES_S = (1, 3, 6, 12)
# Short: the shorter a stopped peer is down, the less likely the others finish meanwhile (see above); 2-5 s
# ended 3 of 30 drawn runs of 300 steps that way.
STOP_RESTARTS_S = (1, 2)
CUTS_S = (1, 4, 8)
SLOWDOWNS = (2, 3, 4)
STRAGGLES_S = (3, 6, 12)
STALLS_S = (3, 6, 12)
# The most events a spec may draw: each drawn join is one more peer process (the harness starts joiners' processes
# at the start), so a count of thousands would fork hundreds of them; five times the largest of BENCHMARKS.md.
MAX_EVENTS = 100
_SPEC = re.compile(r"^(?P<count>\d+)(?:,seed=(?P<seed>\d+))?(?:,with=(?P<extra>[a-z+]+))?$")


@dataclass(frozen=True)
class ChaosSpec:
    """How many random events, the seed they are drawn from, and the kinds drawn beyond the usual (EXTRA_KINDS)."""

    count: int
    seed: int = 0
    extra: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> ChaosSpec:
        """Read ``N``, ``N,seed=S`` or ``N,seed=S,with=K1+K2``."""
        m = _SPEC.match(text.strip())
        if not m:
            raise ConfigError(
                f"cannot read --chaos {text!r}; write N, N,seed=S or N,seed=S,with=straggle+stall (seed, then with=), "
                "e.g. --chaos 5,seed=3"
            )
        extra = tuple(m.group("extra").split("+")) if m.group("extra") else ()
        unknown = [k for k in extra if k not in EXTRA_KINDS]
        if unknown or len(set(extra)) != len(extra):
            raise ConfigError(
                f"--chaos with= takes each of {', '.join(EXTRA_KINDS)} at most once, joined by '+'; "
                f"got {m.group('extra')!r}"
            )
        spec = cls(int(m.group("count")), int(m.group("seed") or 0), tuple(k for k in EXTRA_KINDS if k in extra))
        if spec.count < 1:
            raise ConfigError("--chaos needs at least one event")
        if spec.count > MAX_EVENTS:
            raise ConfigError(f"--chaos draws at most {MAX_EVENTS} events, got {spec.count}; give a smaller N")
        return spec


def chaos_events(spec: ChaosSpec, peers: int, rounds: int, netns: bool = False, least: int = 1) -> tuple[Event, ...]:
    """spec.count events for a run of ``peers`` starting peers expected to commit ``rounds`` rounds, whose rounds
    need ``least`` members (a robust aggregator's or a private round's minimum): kills never leave fewer."""
    if peers < 1:
        raise ConfigError("the harness needs at least one peer")
    rng = random.Random(spec.seed)
    last = max(1, (2 * rounds) // 3)
    at = sorted(rng.randint(1, last) for _ in range(spec.count))
    alive = [f"peer{i}" for i in range(peers)]
    restarted: set[str] = set()  # a restarted peer counts its syncs from 1 again: no sync-timed kill for it
    kinds = KINDS + (NETNS_KINDS if netns else ()) + spec.extra
    texts = []
    for r in at:
        kind = rng.choice(kinds)
        if kind.startswith("kill") and len(alive) <= max(MIN_SURVIVORS, least):
            kind = "pause"  # the kill would leave too few: the peer is paused instead
        if kind == "join":
            texts.append(f"join@round{r}")
        elif kind == "restart-coordinator":
            texts.append(f"restart-coordinator@round{r}")
        else:
            target = rng.choice(alive)
            if kind.startswith("kill"):
                alive.remove(target)
                in_sync = kind == "kill-in-sync" and target not in restarted
                texts.append(f"kill:{target}@{f'sync{r + 1}' if in_sync else f'round{r}'}")
            elif kind == "stop":
                restarted.add(target)
                texts.append(f"stop:{target}@round{r},for={rng.choice(STOP_RESTARTS_S)}s")
            elif kind == "pause":
                texts.append(f"pause:{target}@round{r},for={rng.choice(PAUSES_S)}s")
            elif kind == "cut":
                texts.append(f"cut:{target}@round{r},for={rng.choice(CUTS_S)}s")
            elif kind == "straggle":
                texts.append(f"straggle:{target}@round{r},x={rng.choice(SLOWDOWNS)},for={rng.choice(STRAGGLES_S)}s")
            else:
                texts.append(f"stall:{target}@round{r},for={rng.choice(STALLS_S)}s")
    return tuple(parse_event(text) for text in texts)


def expected_rounds(train: TrainConfig) -> int:
    """The rounds a run of ``train`` commits if nothing goes wrong: its steps over its sync interval."""
    if train.duration_s is not None:
        raise ConfigError("--chaos places its events by round: give the run --steps, not --duration")
    return max(1, train.steps // max(1, getattr(train.options, "sync_every", 1)))
