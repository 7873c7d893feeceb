"""Peers that share a host: their grouping in a round, and the shared-memory segment they reduce through.

A round's members are grouped by host id (``HostPlan``). Members of one host
reduce their contributions through one segment in ``/dev/shm``
(``HostSegment``) instead of gRPC: each writes its contribution into its own
slot, member j reduces slice j of every slot, and one leader per host (the
lowest rank) takes the host's sum into the all-reduce between hosts. The
round itself is ``collectives/hosts/round.py``; the design is in
``docs/collectives.md`` ("Hierarchical rounds").

A host id names the processes that can share ``/dev/shm`` and see each
other's pids; how it is found, and how a member's process is told alive or
gone by its pid and start time, is ``collectives/hosts/identity.py``.

The segment is one file: a header (one int64 word row per slot, written only
by that slot's member, plus a failure record per slot), then one fp32 slot per
local member. The host's result is reduced in place into slot 0 (member j
alone touches slice j of every slot once all are written), so the segment
holds no page more than the contributions. The segment outlives a round: its
members keep it mapped (``collectives/hosts/cache.py``) while the host's members
and the tensor size stay the same, since fresh tmpfs pages (allocation,
zeroing, faults) are what a round through shared memory paid most for. Each
state word carries the round's tag, so a state of the previous round is never
read as one of this round. Every field has one writer (the write barrier's
word is written under the file's lock); readers poll. Every state word is
written and read under the file's lock (``synced``), so the data a member
wrote before publishing a state is what the others read after seeing it, on
CPUs that reorder memory accesses (ARM, POWER) as on x86. The file is named after
the run, the host, the local members and the tensor size; what crashed
processes leave is recognised and removed (``sweep_stale``). A member that
cannot take or open the segment has no slot to say so in: it leaves a small
marker file next to it instead (``leave_marker``), which the others watch for.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from collectives.errors import RoundFailed
from collectives.hosts.identity import SHM_DIR, alive, process_start
from collectives.hosts.markers import MARKER_INFIX, clear_markers, discard, left_marker, marker_name, marker_stale
from collectives.reduce.aggregators import AggregatorConfig, make_aggregator

if TYPE_CHECKING:  # for round_hosts's hint only: a sync (elasticsync.py) plans its hosts from the round's plan
    from collectives.membership.roundplan import RoundPlan

log = logging.getLogger(__name__)

PREFIX = "loconet-hl-"
MAGIC = 0x4C4F434F484C3031  # "LOCOHL01"

# Slot states, in the order a member goes through them; the last four are final. MOVED: the member left this
# file for a newer one at the same path before the round's write barrier was passed here.
EMPTY, ATTACHED, WRITTEN, REDUCED, DONE, ABORTED, LEFT, MOVED = range(8)
FINAL = (DONE, ABORTED, LEFT, MOVED)

# Header layout, in int64 words: fixed fields, then SLOT_WORDS per local member.
_H_MAGIC, _H_N, _H_NUMEL, _H_RESULT_READY, _H_DEADLINE_MS, _H_PASSED = range(6)
_FIXED_WORDS = 16
SLOT_WORDS = 8
_S_PID, _S_START, _S_STATE, _S_WEIGHT, _S_BLOB_LEN = range(5)
# Bytes of each member's failure record (JSON), after the slot words.
BLOB_BYTES = 2048
_PAGE = 4096
_ALIGN = 64
# A leftover segment is removed only this long after its round's deadline.
STALE_AFTER_S = 5.0


def round_hosts(plan: RoundPlan, ids: list[str]) -> tuple[str, ...] | None:
    """Host ids of the members ``ids`` (peer ids, rank order) of a round plan; a member that announced none is a
    host of its own. None when the coordinator sent no host ids (every member then runs the flat round)."""
    if len(plan.hosts) != len(plan.members):
        return None
    by_peer = {pid: host for (pid, _), host in zip(plan.members, plan.hosts, strict=True)}
    return tuple(by_peer[pid] or f"peer:{pid}" for pid in ids)


def pre_reducible(aggregator: AggregatorConfig) -> bool:
    """Whether a host may reduce its members' contributions before the round between hosts: what the registered
    aggregator's class says (``Aggregator.pre_reducible``: mean and sum, and any plugin that declares it)."""
    return make_aggregator(aggregator).pre_reducible


@dataclass(frozen=True)
class HostPlan:
    """How one round's members group by host, as every member computes it from the same host ids."""

    # One host id per member, in rank order.
    hosts: tuple[str, ...]
    rank: int

    @property
    def local(self) -> tuple[int, ...]:
        """Ranks on this member's host, in rank order (its local index is its position here)."""
        mine = self.hosts[self.rank]
        return tuple(r for r, h in enumerate(self.hosts) if h == mine)

    @property
    def leaders(self) -> tuple[int, ...]:
        """The lowest rank of each host, in rank order: the members of the round between hosts."""
        seen: dict[str, int] = {}
        for r, h in enumerate(self.hosts):
            seen.setdefault(h, r)
        return tuple(sorted(seen.values()))

    @property
    def local_index(self) -> int:
        """This member's index among its host's members."""
        return self.local.index(self.rank)

    @property
    def is_leader(self) -> bool:
        """Whether this member takes its host into the round between hosts."""
        return self.local[0] == self.rank

    @property
    def shares_a_host(self) -> bool:
        """Whether any two members share a host (otherwise the hierarchy would only add work)."""
        return len(set(self.hosts)) < len(self.hosts)


def segment_name(run_id: str, host: str, addresses: tuple[str, ...], numel: int) -> str:
    """The file name of a host's segment: the run, the host and its members (hashed), and the tensor size.

    No round in it: the members reuse one segment from round to round while these stay the same."""
    digest = hashlib.sha256("\0".join((run_id, host, *addresses)).encode()).hexdigest()[:20]
    return f"{PREFIX}{digest}-n{numel}"


def round_tag(round_id: int, epoch: int) -> int:
    """A round's tag in the segment: epoch and round id in 55 bits (the state words keep 8 bits for the state)."""
    return ((epoch & 0x7FFF) << 40) | (round_id & 0xFF_FFFF_FFFF)


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Layout:
    """Byte offsets of a segment's parts, from the number of local members and the tensor size."""

    n: int
    numel: int

    @property
    def header_bytes(self) -> int:
        """The header: fixed words, slot words, failure records."""
        return _round_up(8 * (_FIXED_WORDS + SLOT_WORDS * self.n) + BLOB_BYTES * self.n, _PAGE)

    @property
    def slot_stride(self) -> int:
        """Elements between the starts of two slots (cache-line aligned)."""
        return _round_up(self.numel * 4, _ALIGN) // 4

    @property
    def size(self) -> int:
        """Bytes of the whole segment."""
        return _round_up(self.header_bytes + 4 * self.slot_stride * self.n, _PAGE)

    def blob_offset(self, k: int) -> int:
        """Byte offset of member k's failure record."""
        return 8 * (_FIXED_WORDS + SLOT_WORDS * self.n) + BLOB_BYTES * k


class SegmentStale(RoundFailed):
    """The segment a member joined is no longer the host's (replaced, or abandoned by an earlier round): move on."""


class HostSegment:
    """A host's shared-memory segment as one local member maps it, reused from round to round (``SegmentCache``).

    Each round the member ``join``s with the round's tag; its state word packs that tag with its state, so the
    others never mistake a state of an earlier round for one of this round. ``finish`` ends a round: kept mapped
    after ``DONE``, dropped otherwise."""

    def __init__(self, path: str, n: int, numel: int, index: int, deadline_unix: float) -> None:
        self.path = path
        self.layout = Layout(n, numel)
        self.index = index
        self.tag = -1
        self._mm = None
        self._lock_depth = 0  # how deep this mapping's holder is in nested _locked() blocks
        self._fd = _create_or_open(path, self.layout, deadline_unix)
        try:
            self._mm = mmap.mmap(self._fd, self.layout.size, mmap.MAP_SHARED)
        except BaseException:
            os.close(self._fd)
            raise
        st = os.fstat(self._fd)
        self._inode = (st.st_dev, st.st_ino)
        lay = self.layout
        self._words = np.frombuffer(self._mm, dtype=np.int64, count=_FIXED_WORDS + SLOT_WORDS * n)
        self._floats = self._words.view(np.float64)
        data = np.frombuffer(self._mm, dtype=np.float32, count=lay.slot_stride * n, offset=lay.header_bytes)
        self.rows = torch.from_numpy(data).view(n, lay.slot_stride)[:, :numel]
        # Slot 0 once every member has reduced its slice into it.
        self.result = self.rows[0]
        if self._words[_H_MAGIC] != MAGIC or self._words[_H_N] != n or self._words[_H_NUMEL] != numel:
            self.close()
            raise RoundFailed(f"shared-memory segment {path} is for another layout "
                              f"(members {int(self._words[_H_N])}, numel {int(self._words[_H_NUMEL])}); remove it")

    # -- one slot's words (each written only by its member) ---------------------------------------------

    def _slot(self, k: int, word: int) -> int:
        return _FIXED_WORDS + SLOT_WORDS * k + word

    def linked(self) -> bool:
        """Whether this mapping's file is still the one at the segment's path (not removed or replaced)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._inode

    def join(self, tag: int) -> None:
        """Enter the round tagged tag: record this process and ATTACHED in its slot (raises SegmentStale if the
        file is no longer the host's). Under the file's lock, so ``sweep_stale`` never removes a file being joined."""
        with self._locked():
            if not self.linked():
                raise SegmentStale(f"shared-memory segment {self.path} was replaced")
            pid = os.getpid()
            self._words[self._slot(self.index, _S_START)] = process_start(pid) or 0
            self._words[self._slot(self.index, _S_PID)] = pid
            self.tag = tag
            self.set_state(ATTACHED)

    def pid(self, k: int) -> tuple[int, int]:
        """(pid, start time) member k recorded, (0, 0) before it ever joined."""
        return int(self._words[self._slot(k, _S_PID)]), int(self._words[self._slot(k, _S_START)])

    def status(self, k: int) -> tuple[int, int]:
        """(tag, state) of member k, read in one load (a tag and its state are always written together)."""
        word = int(self._words[self._slot(k, _S_STATE)])
        return word >> 8, word & 0xFF

    def state(self, k: int) -> int:
        """Member k's state in this member's round; EMPTY while k is in another (earlier) round."""
        tag, state = self.status(k)
        return state if tag == self.tag else EMPTY

    def set_state(self, state: int) -> None:
        """Publish this member's state in its round (after the data it vouches for is written), under the file's
        lock: whoever reads it under the lock (``synced``) then sees that data too, on any CPU."""
        with self._locked():
            self._words[self._slot(self.index, _S_STATE)] = (self.tag << 8) | state

    def weight(self, k: int) -> float:
        """Member k's contribution weight (valid from WRITTEN)."""
        return float(self._floats[self._slot(k, _S_WEIGHT)])

    def set_weight(self, weight: float) -> None:
        """Record this member's contribution weight (before WRITTEN)."""
        self._floats[self._slot(self.index, _S_WEIGHT)] = weight

    def result_ready(self) -> bool:
        """Whether the leader has written this round's final result."""
        return int(self._words[_H_RESULT_READY]) == (self.tag << 8) | 1

    def set_result_ready(self) -> None:
        """Leader: this round's final result is in place (published under the file's lock, as ``set_state``)."""
        with self._locked():
            self._words[_H_RESULT_READY] = (self.tag << 8) | 1

    def previous_use_over(self, k: int) -> bool:
        """Whether member k is done with the segment's previous round (or already in this one): only then may this
        member write, since a slow member may still be copying the previous result out of slot 0."""
        tag, state = self.status(k)
        return tag == self.tag or state in (EMPTY, DONE)

    def abandoned(self) -> bool:
        """Whether an earlier round left this file for good (a member aborted or left it), or it was replaced."""
        for k in range(self.layout.n):
            tag, state = self.status(k)
            if k != self.index and tag != self.tag and state in (ABORTED, LEFT, MOVED):
                return True
        return not self.linked()

    def pass_barrier(self, ready: tuple[int, ...]) -> bool:
        """Whether every member's state in this round is in ``ready``, decided under the file's lock and then final
        (``try_move`` will not retract a contribution after it)."""
        with self._locked():
            if int(self._words[_H_PASSED]) == self.tag << 8 | 1:
                return True
            if all(self.state(k) in ready for k in range(self.layout.n)):
                self._words[_H_PASSED] = self.tag << 8 | 1
                return True
        return False

    def try_move(self) -> bool:
        """Leave this file for this round (MOVED) and remove it if it is still the host's, unless the round's write
        barrier was already passed here (then everyone is in this file: False)."""
        with self._locked():
            if int(self._words[_H_PASSED]) == self.tag << 8 | 1:
                return False
            self.set_state(MOVED)
            if self.linked():
                discard(self.path)
        return True

    def synced(self) -> contextlib.AbstractContextManager[None]:
        """Read the others' words inside this block: the file's lock orders what they wrote before publishing a state
        (``set_state``) before what this member reads after seeing it, whatever the CPU's memory ordering (x86
        keeps stores and loads in order; ARM and POWER may not). Hold it for no await."""
        return self._locked()

    @contextlib.contextmanager
    def _locked(self):
        # flock's acquire and release are the kernel's, with its memory barriers: a state published under the lock
        # and read under it brings the data written before it along. Nested blocks of this mapping hold it once
        # (flock would convert or drop the one lock of this open file instead); all of them run on the loop thread.
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._lock_depth = 1
        try:
            yield
        finally:
            self._lock_depth = 0
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def write_failure(self, record: dict) -> None:
        """Record why this member aborts the round, then mark it ABORTED (the others raise the same)."""
        raw = json.dumps(record).encode()[:BLOB_BYTES]
        start = self.layout.blob_offset(self.index)
        self._mm[start:start + len(raw)] = raw
        self._words[self._slot(self.index, _S_BLOB_LEN)] = len(raw)
        self.set_state(ABORTED)

    def failure(self, k: int) -> dict | None:
        """Member k's failure record, if it aborted this round."""
        if self.state(k) != ABORTED:
            return None
        start = self.layout.blob_offset(k)
        length = int(self._words[self._slot(k, _S_BLOB_LEN)])
        try:
            return json.loads(bytes(self._mm[start:start + length]))
        except ValueError:
            return {"kind": "round", "message": f"local member {k} aborted (unreadable failure record)"}

    # -- leaving --------------------------------------------------------------------------------------

    def finish(self, state: int, gone: frozenset[int] = frozenset()) -> bool:
        """End this member's round with a final state. DONE keeps the mapping for the next round (returns False).
        Otherwise the mapping is dropped, and the file removed if every other member is final in this round, dead
        or in ``gone`` (members arriving late still find the failure). True if the file was removed."""
        if self.closed:
            return False
        if self.state(self.index) not in FINAL:
            self.set_state(state)
        if state == DONE:
            return False
        try:
            return self._unlink_if(
                lambda: all(self._finished(k, gone) for k in range(self.layout.n) if k != self.index)
            )
        finally:
            self.close()

    def drop(self) -> bool:
        """Unmap, and remove the file if it is still the host's (no other member reuses it after this)."""
        try:
            return self._unlink_if(lambda: True)
        finally:
            self.close()

    def _unlink_if(self, condition) -> bool:
        # Under an exclusive lock, so of two members leaving at once one sees the other's state, and the file
        # at the path is only removed while it is this one (never a newer segment created meanwhile). The
        # markers of members that could not join go with it.
        if self._fd < 0:
            return False
        with self._locked():
            removed = self.linked() and condition() and discard(self.path)
        if removed:
            clear_markers(self.path, self.layout.n, self.tag)
        return removed

    def _finished(self, k: int, gone: frozenset[int]) -> bool:
        if k in gone or self.state(k) in FINAL:
            return True
        pid, start = self.pid(k)
        if pid > 0 and not alive(pid, start):
            return True
        # Not in this round, and it left a marker for this round: it could not join and has given up on the round.
        return self.state(k) == EMPTY and left_marker(marker_name(self.path, k), k, self.tag)

    def close(self) -> None:
        """Drop this process's mapping (the file stays); safe to call twice."""
        self.rows = self.result = None  # type: ignore[assignment]
        self._words = self._floats = None  # type: ignore[assignment]
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still referenced somewhere: the mapping goes with it
                log.debug("segment %s still has views; its mapping is freed with them", self.path)
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def closed(self) -> bool:
        """Whether this mapping was closed."""
        return self._fd < 0


def _create_or_open(path: str, layout: Layout, deadline_unix: float) -> int:
    """A descriptor of the segment at path; the first member creates it whole (written under a temporary name,
    then linked), so the others never see a half-made header."""
    try:
        return os.open(path, os.O_RDWR)
    except FileNotFoundError:
        pass
    # The pid names the creator for sweep_stale; the thread makes it unique when members share a process (tests).
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, layout.size)
        head = np.zeros(_FIXED_WORDS, dtype=np.int64)
        head[_H_MAGIC], head[_H_N], head[_H_NUMEL] = MAGIC, layout.n, layout.numel
        head[_H_DEADLINE_MS] = int(deadline_unix * 1000)
        os.pwrite(fd, head.tobytes(), 0)
        try:
            os.link(tmp, path)
            return fd
        except FileExistsError:  # another member was first: use its segment
            os.close(fd)
            fd = -1
            return os.open(path, os.O_RDWR)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    finally:
        discard(tmp)


def sweep_stale(directory: str = SHM_DIR, now: float | None = None) -> list[str]:
    """Remove segments crashed processes left: past their creation deadline, with no recorded member alive.

    Also removes half-made ones (``.tmp-PID``) whose creator is gone, and markers (``marker_name``) past their
    round's deadline. Returns the names removed.
    """
    now = time.time() if now is None else now
    removed = []
    try:
        names = [n for n in os.listdir(directory) if n.startswith(PREFIX)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        if ".tmp-" in name:
            pid = name.rsplit(".tmp-", 1)[1].split("-")[0]
            if pid.isdigit() and process_start(int(pid)) is None and discard(path):
                removed.append(name)
            continue
        if MARKER_INFIX in name:
            if marker_stale(path, now, STALE_AFTER_S) and discard(path):
                removed.append(name)
            continue
        if _remove_if_stale(path, now):
            removed.append(name)
    if removed:
        log.info("removed %d leftover shared-memory segment(s): %s", len(removed), ", ".join(removed[:5]))
    return removed


def _remove_if_stale(path: str, now: float) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        # Exclusive, without waiting: a member joining holds the shared lock, and then is alive and recorded.
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fixed = np.frombuffer(os.pread(fd, 8 * _FIXED_WORDS, 0), dtype=np.int64)
        if len(fixed) < _FIXED_WORDS or fixed[_H_MAGIC] != MAGIC:
            return False
        if now < fixed[_H_DEADLINE_MS] / 1000 + STALE_AFTER_S:
            return False
        n = int(fixed[_H_N])
        slots = np.frombuffer(os.pread(fd, 8 * SLOT_WORDS * n, 8 * _FIXED_WORDS), dtype=np.int64)
        for k in range(min(n, len(slots) // SLOT_WORDS)):
            pid, start = int(slots[k * SLOT_WORDS + _S_PID]), int(slots[k * SLOT_WORDS + _S_START])
            if pid > 0 and alive(pid, start):
                return False  # a live member may still reuse it (it removes it when it is done with it)
        st, linked = os.fstat(fd), os.stat(path)
        return (st.st_dev, st.st_ino) == (linked.st_dev, linked.st_ino) and discard(path)
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)
