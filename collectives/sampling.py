"""The members of a ``sample:K`` round, derived so that anyone can check them.

With the ``sample:K`` quorum policy the coordinator does not pick a round's
members at will: they are the K candidates ranked first by SHA-256 of
``f"{seed}:{round_id}:{peer_id}"``, where the seed is the run's and the
candidates are the eligible peers the coordinator names in its answer. The
ranking depends only on those strings, so it is the same on every machine, does
not depend on the order the candidates are listed in, and changes little when
one candidate comes or goes (the others keep their ranks). A member checks its
round with ``check_sample`` and refuses a coordinator that picked otherwise.

Pure functions, no I/O; the coordinator (``peer/coordinator/policies.py``)
and the peers both import them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from collectives.errors import ConfigError, ProtocolError

SAMPLE_POLICY = "sample"


class SampleMismatch(ProtocolError):
    """A round's members are not the sample its seed, round id and candidates give: the coordinator broke the rule."""


def _rank(seed: int, round_id: int, peer_id: str) -> bytes:
    return hashlib.sha256(f"{seed}:{round_id}:{peer_id}".encode()).digest()


def sample_members(seed: int, round_id: int, candidates: Sequence[str], k: int) -> tuple[str, ...]:
    """The k candidates a sample round draws (all of them if there are fewer), sorted by peer id."""
    if k < 1:
        raise ConfigError(f"a sample needs k >= 1, got {k}")
    unique = set(candidates)
    # Ties in SHA-256 do not happen in practice; the peer id breaks them anyway, so the order is total.
    ranked = sorted(unique, key=lambda p: (_rank(seed, round_id, p), p))
    return tuple(sorted(ranked[:k]))


def check_sample(seed: int, round_id: int, candidates: Sequence[str], k: int, members: Sequence[str]) -> None:
    """Raise SampleMismatch unless every member is in the sample of (seed, round_id, candidates, k)."""
    sample = set(sample_members(seed, round_id, candidates, k))
    outside = sorted(set(members) - sample)
    if outside:
        raise SampleMismatch(
            f"round {round_id}: {', '.join(outside[:10])} not in the sample of {k} drawn with seed {seed} from "
            f"{len(set(candidates))} candidate(s) ({', '.join(sorted(sample)[:10])}); the coordinator and this peer "
            "disagree on the quorum rule: check that both run the same loconet version and the run's --quorum-seed"
        )


def whole_count(text: str) -> int | None:
    """The K of a policy spec ``NAME:K``, a whole number >= 1; None if text is not one."""
    try:
        k = int(text)
    except ValueError:
        return None
    return k if k >= 1 else None


def sample_size(policy: str) -> int | None:
    """K of a ``sample:K`` policy spec; None for any other policy (nothing to check)."""
    name, _, arg = policy.partition(":")
    if name != SAMPLE_POLICY:
        return None
    k = whole_count(arg)
    if k is None:
        raise ProtocolError(f"the coordinator's quorum policy {policy!r} is not sample:K with a whole K >= 1")
    return k
