"""NoLoCo's gossip groups: who averages with whom at an outer step, derived so that every peer agrees.

NoLoCo (Kolehmainen et al. 2025, "NoLoCo: No-all-reduce Low Communication
Training Method for Large Models") replaces DiLoCo's all-reduce with a
partial average: at each outer step every replica averages with one partner
chosen at random, a new pairing every step. Here the pairing is a function of
the run's seed, the round id and the members only, so every peer of the round
computes the same groups without talking (``optimizers/noloco.py`` uses it).

The rule: the members are deduplicated and sorted (the order they are given in
does not matter), then ordered by SHA-256 of ``f"pair:{seed}:{round_id}:{peer}"``
(peer id breaking ties), which is a uniformly random permutation that changes
with the round id. Consecutive members of that permutation form the pairs.
With an odd count one member is left over:

- ``odd="trio"`` (the default): the last three form one group of 3, so
  everyone averages with someone;
- ``odd="idle"``: the last one is a group of 1 for this step (it applies its
  outer step alone, with no partner's weights).

A single member is a group of 1 in either mode; no members, no groups. Groups
are returned in a canonical order: each group sorted by peer id, the groups
sorted by their first member.

The authors' reference code draws a NumPy permutation seeded by the step
alone and needs a replica count divisible by the group size; this module adds
the run seed to the hash (so two runs differ) and the two odd-count rules.
The ``pair:`` prefix keeps the permutation independent of the ``sample``
policy's draw (``collectives/membership/sampling.py``) for the same seed and round.

Pure functions, no I/O; NoLoCo's peers import them (``optimizers/noloco.py``): each derives every group itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from collectives.errors import ConfigError

__all__ = ["ODD_MODES", "group_of", "pair_groups"]

# What happens to the member an odd count leaves over: joins the last pair, or sits this step out.
ODD_MODES = ("trio", "idle")


def _rank(seed: int, round_id: int, peer_id: str) -> bytes:
    return hashlib.sha256(f"pair:{seed}:{round_id}:{peer_id}".encode()).digest()


def pair_groups(seed: int, round_id: int, members: Sequence[str], odd: str = "trio") -> tuple[tuple[str, ...], ...]:
    """The gossip groups of one outer step: pairs, plus one trio (``odd="trio"``) or one idle member
    (``odd="idle"``) when the count is odd; every member in exactly one group, canonical order."""
    if odd not in ODD_MODES:
        raise ConfigError(f"odd must be 'trio' (the leftover member joins the last pair) or 'idle' (it sits the "
                          f"step out), got {odd!r}")
    # Sorting first makes the result independent of the input order even where two hashes tie.
    unique = sorted(set(members))
    order = sorted(unique, key=lambda p: (_rank(seed, round_id, p), p))
    n = len(order)
    if n <= 1:
        return (tuple(order),) if order else ()
    groups = [order[i : i + 2] for i in range(0, n - n % 2, 2)]
    if n % 2:
        if odd == "trio":
            groups[-1] = groups[-1] + [order[-1]]
        else:
            groups.append([order[-1]])
    return tuple(sorted(tuple(sorted(g)) for g in groups))


def group_of(peer: str, groups: Iterable[Sequence[str]]) -> tuple[str, ...]:
    """The group (as a tuple) that holds peer; ValueError if none does."""
    for group in groups:
        if peer in group:
            return tuple(group)
    raise ValueError(f"peer {peer!r} is in no group of this pairing; was it a member of the round the pairing "
                     "was derived for?")
