"""Markers of host members that could not join their host's shared-memory segment.

A member that cannot take or open the segment (permissions, ENOSPC, EMFILE)
has no slot in it to record a failure, and its process and data-plane port
stay alive, so the others would name it only at the round's deadline. It
leaves a small JSON file next to the segment instead (``leave_marker``): its
local index and rank, the round's tag, the round's deadline and the reason.
The others look for it while that member has not attached (``JoinWatch``)
and fail the round at once. Another process wrote the file: it is read as
untrusted input (``read_marker``). The segment's remover clears its markers
(``clear_markers``); ``sweep_stale`` removes those a crash left
(``marker_stale``). ``discard``, which removes a file only where this process
may, lives here for both kinds of file: ``hosts.local`` imports it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

# A member that cannot take or open its host's segment (permissions, ENOSPC, EMFILE) leaves a marker file named
# <segment name>.failed-<local index> next to it. At most this many bytes (a larger file is not a marker), the
# reason at most this many characters.
MARKER_INFIX = ".failed-"
MARKER_BYTES = 1024
REASON_CHARS = 200


def marker_name(segment: str, index: int) -> str:
    """The marker local member index leaves when it cannot join the segment named (or at the path) ``segment``.

    Not a segment: ``sweep_stale`` tells the two apart by ``MARKER_INFIX``. No round in the name either, as for the
    segment: the marker holds the round's tag."""
    return f"{segment}{MARKER_INFIX}{index}"


def discard(path: str) -> bool:
    """Remove path if it is there and this process may (another user's file in a sticky /dev/shm stays)."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as err:
        log.debug("cannot remove %s (%s)", path, err)
        return False


def printable(text: str) -> str:
    """text as printable ASCII (escapes for the rest), at most REASON_CHARS: it goes into failure records."""
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if c.isprintable() else " " for c in text)[:REASON_CHARS]


@dataclass(frozen=True)
class JoinFailure:
    """What a marker says: local member ``index`` (group rank ``rank``) could not join the round tagged ``tag``."""

    tag: int
    index: int
    rank: int
    # The writer's round deadline (wall clock): sweep_stale removes the marker STALE_AFTER_S after it.
    deadline: float
    reason: str

    def concerns(self, tag: int, index: int, rank: int | None = None) -> bool:
        """Whether this marker is local member index's (of group rank ``rank``, when given) in the round tagged tag."""
        return (self.tag, self.index) == (tag, index) and (rank is None or self.rank == rank)


def leave_marker(segment_path: str, index: int, rank: int, tag: int, deadline_unix: float, exc: BaseException) -> bool:
    """Record next to the segment that local member index (group rank) could not join the round tagged tag, and
    why; written whole (under a temporary name, then renamed into place). Never raises: False if it could not be
    written (the others then name this member at the round's deadline)."""
    path = marker_name(segment_path, index)
    reason = printable(f"{type(exc).__name__}: {exc}")
    body = json.dumps({"tag": tag, "index": index, "rank": rank, "deadline": deadline_unix, "reason": reason})
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        # Readable by all: the members whose segment this member could not open may be another Unix user's.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(body.encode())
        os.replace(tmp, path)
        return True
    except OSError as err:
        log.debug("could not leave the marker %s (%s)", path, err)
        discard(tmp)
        return False


class BadMarker(ValueError):
    """A file at a marker's name that is no well-formed marker (another process wrote it; it is ignored)."""


def read_marker(path: str) -> JoinFailure | None:
    """The marker at path, read as untrusted input (another process wrote it): None if there is none, BadMarker
    if what is there is no well-formed marker (not a regular file, too large, not JSON, fields missing or mistyped)."""
    try:
        # No symlink followed, no FIFO waited on.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise BadMarker(f"cannot open it ({err})") from err
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadMarker("not a regular file")
        raw = os.read(fd, MARKER_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MARKER_BYTES:
        raise BadMarker(f"larger than {MARKER_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise BadMarker(f"not JSON ({err})") from None
    if not isinstance(data, dict):
        raise BadMarker("not a JSON object")
    for key, kind in (("tag", int), ("index", int), ("rank", int), ("deadline", (int, float)), ("reason", str)):
        if isinstance(data.get(key), bool) or not isinstance(data.get(key), kind):
            raise BadMarker(f"{key!r} missing or of the wrong type")
    try:
        deadline = float(data["deadline"])
    except OverflowError:
        deadline = math.inf
    if not math.isfinite(deadline):
        raise BadMarker("'deadline' is not finite")
    return JoinFailure(data["tag"], data["index"], data["rank"], deadline, printable(data["reason"]))


class JoinWatch:
    """A waiting member's reading of the markers of its host's members (``leave_marker``) in one round.

    A file already judged not to concern the round (another round's, malformed) is not read again while it stays the
    same file (inode, mtime, size): a malformed one is logged once, and a check costs one lstat."""

    def __init__(self) -> None:
        self._ignored: dict[str, tuple[int, int, int]] = {}

    def reason(self, segment_path: str, index: int, rank: int, tag: int) -> str | None:
        """Why local member index (group rank) could not join the round tagged tag, if its marker says so."""
        path = marker_name(segment_path, index)
        try:
            st = os.lstat(path)
        except OSError:
            return None
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._ignored.get(path) == seen:
            return None
        try:
            marker = read_marker(path)
        except BadMarker as err:
            log.debug("ignoring the malformed marker %s: %s", path, err)
        else:
            if marker is None:  # removed meanwhile
                return None
            if marker.concerns(tag, index, rank):
                return marker.reason
        self._ignored[path] = seen  # malformed, or another round's (or member's)
        return None


def left_marker(path: str, index: int, tag: int) -> bool:
    """Whether the marker at path says local member index could not join the round tagged tag."""
    try:
        marker = read_marker(path)
    except BadMarker:
        return False
    return marker is not None and marker.concerns(tag, index)


def clear_markers(segment_path: str, n: int, tag: int) -> None:
    """Remove the markers of a segment being removed in the round tagged ``tag`` (or of an earlier round, or not
    markers at all), keeping a later round's: its members may be waiting in a newer segment at the same path."""
    for k in range(n):
        path = marker_name(segment_path, k)
        try:
            marker = read_marker(path)
        except BadMarker:  # not a marker: nobody needs it
            marker = None
        else:
            if marker is None or marker.tag > tag:
                continue
        discard(path)


def marker_stale(path: str, now: float, after_s: float) -> bool:
    """Whether sweep_stale may remove the marker at path: after_s past its round's deadline (a malformed one: past
    its modification)."""
    try:
        marker = read_marker(path)
        if marker is None:
            return False
        until = marker.deadline
    except BadMarker:
        try:
            until = os.lstat(path).st_mtime
        except OSError:
            return False
    return now >= until + after_s
