"""Committed results a member keeps for peers that were late for them, and how they travel.

Every member of a committed round holds its result: the flat fp32 tensor the
all-reduce produced. A peer the round went on without (a short pause, a
``first-k`` quorum, or a joiner whose state fetch took longer than a round)
fetches the results of the rounds it missed and applies them in order,
instead of fetching the whole state again (the catch-up of ``collectives/reduce/catchup.py``).

Two things make that work on slow links:

- **What is kept.** The results of the last ``keep`` rounds, and, while a
  joiner fetches a snapshot of round r (the state server pins it), every
  result after r, up to ``max_bytes``: the joiner needs exactly those to
  catch up from r to the run's head.
- **How it travels.** A result is the decoding of the round's encoded chunks,
  so re-encoding it with the round's codec gives the same values back. When
  that round trip is exact (checked on the bytes before anything is served)
  the result is served encoded: an int8 round's result is a quarter of its
  fp32 bytes. Otherwise it is served as fp32. The late peer decodes it
  (a payload checked against the codec's bounds before anything is buffered)
  and checks it is finite.

Results travel on the state-sync stream (``StateRequest.result_of_round``),
as a one-tensor ``StateSnapshot`` whose meta names the tag and the codec.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from collectives.codecs import Codec, CodecConfig, check_finite, make_codec
from collectives.errors import CodecError, ConfigError, NonFiniteError
from collectives.membership.roundplan import MissedRound
from collectives.net.transport import Transport
from collectives.reduce.parts import part_bounds
from collectives.statesync import (
    ResultNotYet,
    StateSnapshot,
    StateSyncConfig,
    StateSyncError,
    StateSyncStalled,
    fetch_state_async,
)

log = logging.getLogger(__name__)

# Results kept for a pinned snapshot's joiner never take more than this (the oldest go first).
DEFAULT_MAX_RESULT_BYTES = 512 << 20
# The codec name of a result served as raw fp32.
RAW = "none"
# How far past this member's last commit a requested round may be and still be waited for (it may be committing it,
# after rounds it catches up on); a request further ahead is answered "not kept" at once.
NEAR_ROUNDS = 16


@dataclass(frozen=True)
class CommittedResult:
    """A committed round's result as its members hold it: the flat fp32 tensor, and what the round carried."""

    round_id: int
    tag: str
    value: torch.Tensor
    source: str = ""
    epoch: int = 0
    # Bytes it took on the wire when fetched (0 for one this member computed).
    wire_bytes: int = 0
    # How many parts the round cut it into (its members): the blocks of an int8/int4 codec start at each part.
    parts: int = 1
    # The codec the round sent it in, as its source said (None: fp32), to serve it encoded again.
    codec: CodecConfig | None = None
    # result_digest(value) when already known ("": not computed): the members' digest a fetch was checked against.
    digest: str = ""


@dataclass
class _Kept:
    tag: str
    value: torch.Tensor
    codec: CodecConfig | None
    parts: int
    epoch: int
    # The encoded parts once a late peer asked for the result (None: not yet; []: the round trip was not exact).
    encoded: list[bytes] | None = None
    # result_digest(value), once computed ("": not yet; off the round's path, see ResultStore.digest).
    digest: str = ""


class ResultStore:
    """The committed results this member keeps: the last ``keep`` rounds, and those after a pinned snapshot.

    ``keep`` and ``snapshot`` run on threads off the transport's loop (a copy of the result, the state
    server's encoding), so the entries are guarded by a lock.
    """

    def __init__(self, keep: int, max_bytes: int = DEFAULT_MAX_RESULT_BYTES) -> None:
        if keep < 0 or max_bytes < 0:
            raise ConfigError(f"keep ({keep}) and max_bytes ({max_bytes}) must be >= 0")
        self.keep_last = keep
        self.max_bytes = max_bytes
        self._kept: OrderedDict[int, _Kept] = OrderedDict()
        # The newest round this member committed (kept or not): a result asked of a later one is not here yet.
        self._newest = 0
        self._lock = threading.Lock()

    def rounds(self) -> list[int]:
        """The round ids whose results are kept, oldest first."""
        with self._lock:
            return list(self._kept)

    def attempts(self) -> list[tuple[int, int, str]]:
        """(round id, epoch, digest: "" until computed) of the committed results kept, oldest first."""
        with self._lock:
            return [(r, k.epoch, k.digest) for r, k in self._kept.items()]

    def digest(self, round_id: int) -> str:
        """The digest of a kept result, computed once (~60 ms for 25M values: call it off the event loop); ""
        when not kept."""
        with self._lock:
            entry = self._kept.get(round_id)
        if entry is None:
            return ""
        if not entry.digest:
            entry.digest = result_digest(entry.value)  # the value is never changed once kept
        return entry.digest

    def keep(self, round_id: int, tag: str, value: torch.Tensor, codec: CodecConfig | None = None,
             hold_after: int | None = None, parts: int = 1, epoch: int = 0, digest: str = "") -> None:
        """Keep a copy of a committed round's flat result (the caller keeps using its own).

        ``codec``, ``parts``: what the round sent it in, and into how many parts (its members) it was cut;
        ``epoch``: the epoch of the attempt that committed it; ``digest``: its result_digest when already known.
        ``hold_after``: the oldest round a joiner's pinned snapshot is at; the results after it are kept
        beyond the last ``keep`` rounds (within ``max_bytes``), so that joiner can catch up.
        """
        if self.keep_last <= 0 and hold_after is None:
            with self._lock:
                self._newest = max(self._newest, round_id)
            return
        with self._lock:
            kept = self._kept.get(round_id)
        if kept is not None and (kept.tag, kept.epoch, kept.value.numel()) == (tag, epoch, value.numel()):
            # The same committed attempt again (a peer catching up from the copy it kept for the run): it becomes
            # the newest kept, without a second copy (~40 ms at 25M values).
            kept.digest = kept.digest or digest
            entry = kept
        else:
            # Copied before the round counts as committed here: a late peer asking meanwhile is told to wait
            # (ResultNotYet), not that the result is not kept.
            entry = _Kept(tag, value.detach().to("cpu", torch.float32).clone(), codec, max(int(parts), 1), epoch,
                          digest=digest)
        with self._lock:
            self._newest = max(self._newest, round_id)
            self._kept[round_id] = entry
            self._kept.move_to_end(round_id)
            self._trim(hold_after)

    def _trim(self, hold_after: int | None) -> None:
        ids = list(self._kept)
        recent = set(ids[-self.keep_last:]) if self.keep_last > 0 else set()
        held = {r for r in ids if hold_after is not None and r > hold_after}
        for r in ids:
            if r not in recent and r not in held:
                del self._kept[r]
        # The byte bound drops the oldest held results first; the last keep rounds always stay.
        total = sum(k.value.numel() * 4 for k in self._kept.values())
        for r in list(self._kept):
            if total <= self.max_bytes or r in recent:
                break
            total -= self._kept.pop(r).value.numel() * 4
            log.info("dropped the kept result of round %d: kept results exceed %d bytes", r, self.max_bytes)

    def get(self, round_id: int, tag: str, epoch: int) -> CommittedResult | None:
        """The kept result of round_id if that attempt (epoch) committed it with tag (a copy: the caller may apply
        it in place), else None."""
        with self._lock:
            entry = self._kept.get(round_id)
        if entry is None or entry.tag != tag or entry.epoch != epoch:
            return None
        return CommittedResult(round_id, tag, entry.value.clone(), epoch=epoch, parts=entry.parts, codec=entry.codec,
                               digest=entry.digest)

    def snapshot(self, round_id: int) -> StateSnapshot | None:
        """The result of round_id as served to a late peer (encoded when that is exact), or None if not kept.

        Raises ResultNotYet for a round newer than this member's last commit: the state server waits for it.
        """
        with self._lock:
            entry = self._kept.get(round_id)
            newest = self._newest
        if entry is None:
            # A round just past this member's last commit may be committing now: the server waits for it. One far
            # past it cannot come within the wait (a request for round 2^64-1 held a fetch slot for result_wait_s).
            if newest < round_id <= newest + NEAR_ROUNDS or (newest == 0 and round_id > 0):
                raise ResultNotYet(f"round {round_id} is newer than this member's last commit (round {newest})")
            return None
        if entry.encoded is None:
            entry.encoded = _exact_encoding(entry.value, entry.codec, entry.parts)
        if entry.encoded:
            payload = torch.frombuffer(bytearray(b"".join(entry.encoded)), dtype=torch.uint8)
            meta = {"tag": entry.tag, "codec": str(entry.codec), "numel": entry.value.numel(),
                    "sizes": [len(p) for p in entry.encoded]}
            return StateSnapshot(round_id=round_id, tensors={"result": payload}, meta=meta)
        return StateSnapshot(round_id=round_id, tensors={"result": entry.value}, meta={"tag": entry.tag, "codec": RAW})


def _exact_encoding(value: torch.Tensor, codec: CodecConfig | None, parts: int) -> list[bytes]:
    """value's parts (as the round cut it) encoded with codec if decoding gives back exactly value, else []
    (serve it raw). Each part is encoded on its own, as the round did: a codec's blocks start at each part."""
    if codec is None or codec.name == RAW:
        return []
    try:
        c = make_codec(codec)
        encoded = []
        for a, b in part_bounds(value.numel(), parts):
            payload = bytes(c.encode(value[a:b]))
            if not torch.equal(c.decode(payload, b - a), value[a:b]):
                log.info("serving a result as fp32: the round's codec does not reproduce it exactly")
                return []
            encoded.append(payload)
    except (CodecError, NonFiniteError) as exc:
        log.info("serving a result as fp32: the round's codec cannot re-encode it (%s)", exc)
        return []
    return encoded if sum(len(p) for p in encoded) < value.numel() * 4 else []


def result_digest(value: torch.Tensor) -> str:
    """SHA-256 (hex) of a result's fp32 bytes, as its holders and late peers compute it."""
    flat = value.detach().to("cpu", torch.float32).contiguous().reshape(-1)
    return hashlib.sha256(memoryview(flat.numpy()).cast("B")).hexdigest()


def expected_wire_bytes(numel: int, codec: CodecConfig | None) -> int:
    """About how many bytes a result of numel elements takes to fetch (the codec's bound; fp32 without one)."""
    if codec is None or codec.name == RAW:
        return 4 * numel
    return min(4 * numel, make_codec(codec).max_payload_size(numel))


def decode_result(snapshot: StateSnapshot, numel: int, tag: str, where: str, digest: str = "") -> torch.Tensor:
    """The fp32 result a fetched result snapshot carries, checked (size, codec bounds, tag, finite values, and
    ``digest``, the members' SHA-256 of it, when known).

    Raises StateSyncError naming ``where`` (the source) when anything is off: the caller tries another member.
    """
    value = snapshot.tensors.get("result")
    meta = snapshot.meta
    if meta.get("tag") != tag:
        raise StateSyncError(f"{where} served round {snapshot.round_id} as {meta.get('tag')!r}, not {tag!r}")
    codec_name = meta.get("codec", RAW)
    if value is None:
        raise StateSyncError(f"{where} served round {snapshot.round_id} without a result tensor")
    if codec_name == RAW:
        if value.dtype != torch.float32 or value.shape != (numel,):
            raise StateSyncError(f"{where} served a result that is not {numel} fp32 values")
    else:
        sizes = meta.get("sizes")
        if meta.get("numel") != numel or value.dtype != torch.uint8 or value.dim() != 1:
            raise StateSyncError(f"{where} served an encoded result that is not of {numel} values")
        if (not isinstance(sizes, list) or not 1 <= len(sizes) <= max(numel, 1)
                or not all(isinstance(n, int) and n >= 0 for n in sizes) or sum(sizes) != value.numel()):
            raise StateSyncError(f"{where} served an encoded result whose part sizes do not add up to its bytes")
        try:
            value = _decode_parts(make_codec(codec_name), value.numpy(), sizes, numel)
        except (CodecError, ConfigError, TypeError, ValueError) as exc:
            raise StateSyncError(f"{where} served a result that does not decode ({codec_name!r:.40}): {exc}") from None
    try:
        check_finite(value, f"round {snapshot.round_id}'s result from {where}")
    except NonFiniteError as exc:
        raise StateSyncError(str(exc)) from None
    if digest and result_digest(value) != digest:
        raise StateSyncError(f"{where} served round {snapshot.round_id}'s result with another digest than its members'")
    return value


def _decode_parts(codec: Codec, payload, sizes: list[int], numel: int) -> torch.Tensor:
    """The parts' payloads (sizes bytes each, in order) decoded into one tensor of numel values; CodecError if
    a payload exceeds its part's bound or does not decode."""
    out = torch.empty(numel, dtype=torch.float32)
    pos = 0
    for (a, b), size in zip(part_bounds(numel, len(sizes)), sizes):
        if size > codec.max_payload_size(b - a):
            raise CodecError(f"a part of {size} bytes exceeds the codec's bound for {b - a} values")
        codec.decode(memoryview(payload[pos : pos + size]), b - a, out=out[a:b])
        pos += size
    return out


async def fetch_result(
    transport: Transport,
    run_id: str,
    peer_id: str,
    config: StateSyncConfig,
    missed: MissedRound,
    numel: int,
    patient: StateSyncConfig | None = None,
) -> CommittedResult | None:
    """One missed round's result from the first of its holders that still keeps it (checked), or None.

    ``config``'s stall timeout is short, so that a stalled holder is left for the next one quickly. When every
    holder failed by stalling (none refused, was gone or sent a bad result) and ``patient`` has a longer one, those
    whose server answers a health check are asked once more with it: on a slow link busy with the run's rounds
    every holder stalls at once, while a paused holder answers nothing and would cost the whole window.
    """
    holders = [address for member_id, address in missed.members if member_id != peer_id]
    got, stalled = await _first_holder(transport, run_id, peer_id, config, missed, numel, holders)
    if got is None and stalled and stalled == holders and patient is not None and (
        patient.stall_timeout_s > config.stall_timeout_s
    ):
        # Only the holders whose server answers: a paused or dead one would cost the whole patient window.
        reasons = await asyncio.gather(*(transport.unresponsive(address) for address in stalled))
        answering = [address for address, why in zip(stalled, reasons) if why is None]
        if answering:
            log.info("every holder of round %d's result stalled for %g s (a slow link?): asking the %d that answer "
                     "again, waiting up to %g s for data", missed.round_id, config.stall_timeout_s, len(answering),
                     patient.stall_timeout_s)
            got, _ = await _first_holder(transport, run_id, peer_id, patient, missed, numel, answering)
    if got is None:
        log.info("no holder gave round %d's result (each one's reason is logged above)", missed.round_id)
    return got


async def _first_holder(
    transport: Transport, run_id: str, peer_id: str, config: StateSyncConfig, missed: MissedRound, numel: int,
    holders: list[str],
) -> tuple[CommittedResult | None, list[str]]:
    """The result from the first of holders that serves it (checked), and the holders tried before that stalled."""
    stalled = []
    for address in holders:
        try:
            snap = await fetch_state_async(transport, address, run_id, peer_id, config, missed.round_id)
            value = await transport.run_cpu(decode_result, snap, numel, missed.tag, address, missed.digest)
        except StateSyncError as exc:
            log.info("result of round %d not taken from %s: %s", missed.round_id, address, exc)
            if isinstance(exc, StateSyncStalled):
                stalled.append(address)
            continue
        wire = sum(t.numel() * t.element_size() for t in snap.tensors.values())
        parts = len(snap.meta.get("sizes") or [None])
        # decode_result decoded it with this codec, so the name parses.
        codec_name = snap.meta.get("codec", RAW)
        codec = None if codec_name == RAW else CodecConfig.parse(codec_name)
        # decode_result checked it against missed.digest when the coordinator named one: no need to hash it again.
        return CommittedResult(missed.round_id, missed.tag, value, source=address, epoch=missed.epoch, wire_bytes=wire,
                               parts=parts, codec=codec, digest=missed.digest), stalled
    return None, stalled
