"""The members of a ``sample`` round, derived so that anyone can check them.

With the ``sample`` quorum policy the coordinator does not pick a round's
members at will: they are the k candidates ranked first by SHA-256 of
``f"{seed}:{round_id}:{peer_id}"``, where the seed is the run's and the
candidates are the eligible peers the coordinator names in its answer. The
ranking depends only on those strings, so it is the same on every machine, does
not depend on the order the candidates are listed in, and changes little when
one candidate comes or goes (the others keep their ranks). A member checks its
round with ``check_sample`` and refuses a coordinator that picked otherwise.

How many are drawn is the policy's argument (``SampleSize``): a count
(``sample:K``), or a fraction of the candidates rounded up, with an optional
minimum (``sample:0.5``, ``sample:0.5,min=3``), and never fewer than the
members the run's rounds need (Krum's 2f+3, a private round's minimum), which
the coordinator learns from the quorum requests and every member knows of its
own; k never exceeds the number of candidates. The fraction is read as an exact decimal (``fractions.Fraction``),
so the coordinator and every peer compute the same k from the same candidates.

Pure functions, no I/O; the coordinator (``peer/coordinator/policies/sample.py``)
and the peers both import them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from collectives.errors import ConfigError, ProtocolError

SAMPLE_POLICY = "sample"

# A fraction is written as a decimal with a point ("0.5", ".25", "1.0"); a whole number is a count.
_FRACTION = re.compile(r"(\d{0,3})\.(\d{1,12})")
_WHOLE = re.compile(r"\d{1,9}")
_MIN = "min="


class SampleMismatch(ProtocolError):
    """A round's members are not the sample its seed, round id and candidates give: the coordinator broke the rule."""


@dataclass(frozen=True)
class SampleSize:
    """How many candidates a sample round draws: ``count`` K, or ``fraction`` F of them rounded up, at least
    ``minimum``.

    Exactly one of count and fraction is set. ``minimum`` goes with a fraction only; None means
    it was not given (the coordinator then makes it its --min-peers, see ``with_minimum``).
    """

    count: int | None = None
    fraction: Fraction | None = None
    minimum: int | None = None

    def __post_init__(self) -> None:
        if (self.count is None) == (self.fraction is None):
            raise ConfigError("a sample size is a count K or a fraction F, exactly one of them")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"a sample needs K >= 1 peers, got {self.count}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ConfigError(f"a sample fraction must be in (0, 1], got {float(self.fraction):g}")
        if self.minimum is not None and (self.count is not None or self.minimum < 1):
            raise ConfigError(f"a sample minimum goes with a fraction and must be >= 1, got {self.minimum}")

    def of(self, n_candidates: int, least: int = 1) -> int:
        """k for this many candidates: K, or max(minimum, ceil(F * n)), and at least ``least`` (the members the
        run's rounds need: its aggregator's, a private round's; QuorumRequest.min_members); never more than n."""
        if self.count is not None:
            return min(max(self.count, least), n_candidates)
        assert self.fraction is not None
        # Exact integer ceiling: a float product (0.1 * 30 = 3.0000000000000004) would round up wrongly.
        share = -(-self.fraction.numerator * n_candidates // self.fraction.denominator)
        return min(max(self.minimum or 1, share, least), n_candidates)

    def with_minimum(self, minimum: int) -> SampleSize:
        """This size with ``minimum`` where none was given (a count is returned as it is)."""
        if self.fraction is None or self.minimum is not None:
            return self
        return SampleSize(fraction=self.fraction, minimum=minimum)

    @property
    def arg(self) -> str:
        """The policy argument that reads back into this size ("3", "0.5", "0.5,min=3"); a minimum of 1 is left out."""
        if self.count is not None:
            return str(self.count)
        assert self.fraction is not None
        text = _decimal(self.fraction)
        return f"{text},{_MIN}{self.minimum}" if self.minimum is not None and self.minimum > 1 else text


def _decimal(f: Fraction) -> str:
    """A fraction read from a decimal, written as one again, always with a point ("1.0", "0.25")."""
    if f.denominator == 1:
        return f"{f.numerator}.0"
    places = 1
    while (f * 10**places).denominator != 1:  # ends: a decimal's denominator divides a power of 10
        places += 1
    digits = str(int(f * 10**places)).rjust(places + 1, "0")
    return f"{digits[:-places]}.{digits[-places:]}"


def parse_sample_arg(arg: str) -> SampleSize:
    """The size a ``sample`` policy's argument gives ("K", "F" or "F,min=M"); ConfigError saying what is wrong."""
    spec = f"quorum policy {SAMPLE_POLICY}:{arg}"
    forms = (
        "K (a whole number of peers >= 1) or F (a fraction in (0, 1] of the candidates, like 0.5), "
        "F optionally with ,min=M"
    )
    size_text, comma, rest = (part.strip() for part in arg.partition(","))
    minimum = None
    if comma:
        if not rest.startswith(_MIN) or not _WHOLE.fullmatch(rest[len(_MIN) :].strip()):
            raise ConfigError(f"{spec}: after the comma comes min=M with a whole number M >= 1, got {rest!r}")
        minimum = int(rest[len(_MIN) :])
        if minimum < 1:
            raise ConfigError(f"{spec}: min must be at least 1, got {minimum}")
    if _WHOLE.fullmatch(size_text):
        if int(size_text) < 1:
            raise ConfigError(f"{spec} needs a whole number of peers K >= 1 or a fraction F in (0, 1]")
        if minimum is not None:
            raise ConfigError(
                f"{spec}: min=M goes with a fraction (sample:F,min=M); a count K is the round's size already"
            )
        return SampleSize(count=int(size_text))
    if _FRACTION.fullmatch(size_text):
        fraction = Fraction(size_text)
        if not 0 < fraction <= 1:
            raise ConfigError(f"{spec}: the fraction must be in (0, 1], got {size_text}; for a number of peers write K")
        return SampleSize(fraction=fraction, minimum=minimum)
    raise ConfigError(f"{spec} needs {forms}")


def sample_count(spec_arg: str, n_candidates: int) -> int:
    """How many of n_candidates a ``sample:<spec_arg>`` round draws (ConfigError if spec_arg is not a sample size)."""
    return parse_sample_arg(spec_arg).of(n_candidates)


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
    # k is 0 only with no candidates: then no member can have been drawn.
    sample = set(sample_members(seed, round_id, candidates, k)) if k >= 1 else set()
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


def sample_size(policy: str) -> SampleSize | None:
    """How many a ``sample`` policy spec draws (``SampleSize.of`` gives k for a round's candidates); None for
    any other policy (nothing to check)."""
    name, _, arg = policy.partition(":")
    if name != SAMPLE_POLICY:
        return None
    try:
        return parse_sample_arg(arg)
    except ConfigError as exc:
        raise ProtocolError(
            f"the coordinator's quorum policy {policy!r} is not sample:K or sample:F[,min=M] ({exc})"
        ) from None
