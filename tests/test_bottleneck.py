"""Which member a round waited for (peer/coordinator/bottleneck.py): one judgement per row."""

from __future__ import annotations

import pytest

from peer.coordinator.bottleneck import NOTE_EVERY_ROUNDS, Bottlenecks, bottleneck

MEMBERS = ("a", "b", "c", "d")


@pytest.mark.parametrize(
    ("waits", "duration_s", "expected"),
    [
        # Three of the other three waited ~3.5 s of a 4 s round for c: c sets the pace.
        ({"a": ("c", 3.4), "b": ("c", 3.6), "d": ("c", 3.5), "c": ("a", 0.1)}, 4.0, ("c", 3.5)),
        # Two of three is a majority of the others.
        ({"a": ("c", 3.0), "b": ("c", 3.0), "d": ("b", 3.0)}, 4.0, ("c", 3.0)),
        # One of three is not.
        ({"a": ("c", 3.0), "b": ("d", 3.0), "d": ("b", 3.0)}, 4.0, None),
        # A short wait, or a small share of the round, is nobody's fault.
        ({"a": ("c", 0.5), "b": ("c", 0.5), "d": ("c", 0.5)}, 0.6, None),
        ({"a": ("c", 2.0), "b": ("c", 2.0), "d": ("c", 2.0)}, 10.0, None),
        # A member naming itself, or a peer outside the round, does not count.
        ({"c": ("c", 9.0), "a": ("x", 9.0)}, 10.0, None),
        ({}, 4.0, None),
    ],
    ids=["all-name-c", "majority", "minority", "short", "small-share", "self-or-stranger", "no-reports"],
)
def test_a_round_names_the_member_most_others_waited_for(waits, duration_s, expected):
    assert bottleneck(waits, MEMBERS, duration_s) == expected


@pytest.mark.parametrize(
    ("slowest", "named_at"),
    [
        ("ccc", [3]),  # three rounds in a row
        ("cc-c", []),  # a round that waited for nobody breaks the streak
        ("abcabc", []),  # equally slow links: whoever came last each time
        ("cccccc", [3]),  # and not again until NOTE_EVERY_ROUNDS later
    ],
)
def test_a_peer_is_named_after_it_slowed_three_rounds_in_a_row(slowest, named_at):
    noted = Bottlenecks()
    assert [r for r, who in enumerate(slowest, 1) if noted.due(who.strip("-"), r)] == named_at


def test_a_peer_is_named_again_only_every_few_rounds():
    noted = Bottlenecks()
    assert [r for r in range(1, 2 * NOTE_EVERY_ROUNDS + 3) if noted.due("c", r)] == [3, 3 + NOTE_EVERY_ROUNDS]
    noted.forget(keep={"a"})
    assert noted.noted_at == {}
