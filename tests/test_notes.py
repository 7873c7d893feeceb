"""A repeated warning: said at once, again when its cause changes or every so often, the repeats in between at debug."""

from __future__ import annotations

import logging

import pytest

from collectives.notes import RepeatNote

log = logging.getLogger("test-notes")


def levels(caplog) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == log.name]


def test_a_repeated_note_is_a_warning_once_then_debug(caplog):
    caplog.set_level(logging.DEBUG, logger=log.name)
    note = RepeatNote(log, every_s=3600)
    for _ in range(3):
        note.note("no holder", "waiting: %s", "no holder")
    assert levels(caplog) == [(logging.WARNING, "waiting: no holder"), (logging.DEBUG, "waiting: no holder"),
                              (logging.DEBUG, "waiting: no holder")]
    assert note.key == "no holder"


@pytest.mark.parametrize("every_s,keys,expected", [
    (3600, ["a", "b"], [logging.WARNING, logging.WARNING]),  # a new cause is said at once
    (0, ["a", "a"], [logging.WARNING, logging.WARNING]),  # with no interval every repeat is a warning
])
def test_which_notes_are_warnings(caplog, every_s, keys, expected):
    caplog.set_level(logging.DEBUG, logger=log.name)
    note = RepeatNote(log, every_s=every_s)
    for key in keys:
        note.note(key, "%s", key)
    assert [level for level, _ in levels(caplog)] == expected
