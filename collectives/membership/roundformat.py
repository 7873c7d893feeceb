"""The round format: what a contribution to a round is, written the way the coordinator compares it.

A quorum request carries its peer's round format (``round_format``): codec,
aggregator and length, then the settings of what the peer does with the
round's result ("codec int8, aggregator mean, 1234 values, outer sgd, outer
lr 0.7"). A join's settings are written with the same separator. The
coordinator compares formats part by part (``peer/coordinator/rules.py``),
and a peer or a checkpoint that differs is told which parts do
(``format_difference``). The rules themselves are in docs/membership.md
("Round format").
"""

from __future__ import annotations

from collections.abc import Sequence

# What the coordinator's refusal, for good, of a quorum request whose round format differs from the run's says
# (the client raises FormatMismatch).
FORMAT_DIFFERS = "round format differs from the run's"
# A round format longer than this is refused by the coordinator as malformed (a format with an outer optimizer's
# and differential privacy's settings is about 250).
MAX_FORMAT_CHARS = 600
# Between the parts of a round format (rules.format_refusal names the parts that differ).
FORMAT_SEPARATOR = ", "


def reduction_parts(codec: object, aggregator: object) -> tuple[str, str]:
    """How a round's contributions are sent and combined, as a round format and a join's settings name it."""
    return f"codec {codec}", f"aggregator {aggregator}"


def round_format(codec: object, aggregator: object, numel: int, settings: Sequence[str] = ()) -> str:
    """What a contribution to a round is and what its members do with the result, as the coordinator compares it
    (QuorumRequest.round_format): e.g. "codec int8, aggregator mean, 1234 values, outer sgd, outer lr 0.7"."""
    return FORMAT_SEPARATOR.join((*reduction_parts(codec, aggregator), f"{numel} values", *settings))


def format_difference(asked: str, other: str, whose: str = "the run's") -> str:
    """The parts of round format (or join settings) ``asked`` that differ from ``other``, each with its counterpart
    ("codec int4, the run's: codec int8"); both whole when they have different parts."""
    mine, theirs = asked.split(FORMAT_SEPARATOR), other.split(FORMAT_SEPARATOR)
    if len(mine) != len(theirs):
        return f"{asked}; {whose}: {other}"
    return "; ".join(f"{a}, {whose}: {b}" for a, b in zip(mine, theirs) if a != b)
