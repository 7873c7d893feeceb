"""A repeated warning: said at once, again when its cause changes or every so often, the repeats in between at debug."""

from __future__ import annotations

import logging

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


def test_a_new_cause_is_a_warning_at_once(caplog):
    caplog.set_level(logging.DEBUG, logger=log.name)
    note = RepeatNote(log, every_s=3600)
    note.note("a", "%s", "a")
    note.note("b", "%s", "b")
    assert [level for level, _ in levels(caplog)] == [logging.WARNING, logging.WARNING]


def test_with_no_interval_every_repeat_is_a_warning(caplog):
    caplog.set_level(logging.DEBUG, logger=log.name)
    note = RepeatNote(log, every_s=0)
    note.note("a", "%s", "a")
    note.note("a", "%s", "a")
    assert [level for level, _ in levels(caplog)] == [logging.WARNING, logging.WARNING]
