"""Fetching state: one round's manifest from a donor, then its blocks in stripes from every donor, each verified.

A joiner asks the first donor that answers for the manifest of the current
state (or of the round it expects), which pins that round there. It then
splits the state's blocks among all the donors it was given: each donor streams
one stripe (a run of consecutive blocks) of exactly that round at a time, asked
with the round and its digest so a donor holding anything else refuses, and
gets the next stripe when it finishes. Every block is checked against its
SHA-256 from the manifest as it completes, whichever donor sent it. A donor that
fails, stalls, refuses (it moved on to another round and did not pin this one)
or sends a bad block is dropped, and its unverified blocks go back to the queue
for the others; verified bytes are never fetched again. The fetch fails only
when no donor is left for the remaining blocks, naming each donor and why
(``StateSyncStalled`` when every one of them stalled, which a caller may try
again with a longer stall timeout: on a slow, busy link all stall at once). The
whole digest is checked at the end too. Donors must agree on the bytes, not on
the metadata (step counters are per peer): it comes from the manifest's donor.

A recent round's result (``result_of_round``) is fetched in one stream from the
first source that has it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from collectives.errors import UsageError
from collectives.net.rpc import identity
from collectives.net.transport import Transport
from collectives.statesync.format import (
    DEFAULT_CONFIG,
    FETCH_METHOD,
    ExpectedState,
    FetchReport,
    StateMismatch,
    StateSnapshot,
    StateSyncConfig,
    StateSyncError,
    StateSyncStalled,
    _check_manifest,
    _Layout,
    _parse_chunk,
    _Receiver,
    manifest_digest,
)
from protos import state_pb2 as pb

log = logging.getLogger(__name__)


class _SourceFailed(Exception):
    """One source cannot serve (more of) this fetch; ``why`` says what it did."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _Mismatch(_SourceFailed):
    """The source holds another state than the one expected."""


class _Stalled(_SourceFailed):
    """The source sent nothing within the stall timeout."""


def _rpc_hint(code: grpc.StatusCode) -> str:
    if code == grpc.StatusCode.UNAVAILABLE:
        return "; is that peer running and reachable? try another peer"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "; raise StateSyncConfig.timeout_s or fetch from a faster peer"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "; the peer is busy or a message exceeded the size limit: retry later or ask another peer"
    return ""


@dataclass
class _Stripe:
    """Blocks [first, end) asked of one source; blocks before ``next`` are verified."""

    source: str
    first: int
    end: int
    next: int


_TODO, _CLAIMED, _DONE = 0, 1, 2


class _Blocks:
    """Which blocks are verified, which are being fetched and which wait (touched on the loop only)."""

    def __init__(self, count: int) -> None:
        self.state = bytearray(count)
        self.todo = count
        self.done = 0
        self.retried = 0
        self._scan = 0  # no block before it waits

    @property
    def complete(self) -> bool:
        return self.done == len(self.state)

    def claim(self, most: int) -> tuple[int, int]:
        """Claim up to ``most`` consecutive waiting blocks (the first ones waiting); call only while todo > 0."""
        n = len(self.state)
        i = self._scan
        while self.state[i] != _TODO:
            i += 1
        self._scan = i
        j = i
        while j < n and j - i < most and self.state[j] == _TODO:
            self.state[j] = _CLAIMED
            j += 1
        self.todo -= j - i
        return i, j

    def verified(self, block: int) -> None:
        self.state[block] = _DONE
        self.done += 1

    def release(self, first: int, end: int) -> int:
        """Put the claimed, unverified blocks of [first, end) back in the queue; return how many."""
        back = 0
        for b in range(first, end):
            if self.state[b] == _CLAIMED:
                self.state[b] = _TODO
                back += 1
        if back:
            self.todo += back
            self.retried += back
            self._scan = min(self._scan, first)
        return back


class _BlockHasher:
    """Hashes one stream's contiguous bytes block by block (on a codec thread) and checks each block."""

    def __init__(self, layout: _Layout, first_block: int) -> None:
        self.layout = layout
        self.block = first_block
        self.hash = hashlib.sha256()

    def feed(self, offset: int, data: memoryview) -> list[tuple[int, bool]]:
        """Hash data (the stream's next bytes, from offset); (block, matches its hash) of each block it completes."""
        done = []
        pos = 0
        while pos < len(data):
            end = self.layout.block_end(self.block)
            take = min(end - (offset + pos), len(data) - pos)
            self.hash.update(data[pos : pos + take])
            pos += take
            if offset + pos == end:
                ok = hmac.compare_digest(self.hash.digest(), self.layout.block_sha256[self.block])
                done.append((self.block, ok))
                self.block += 1
                self.hash = hashlib.sha256()
        return done


class _Fetch:
    """One fetch of a state (or a round's result) from a list of sources, on the transport's loop."""

    def __init__(
        self,
        transport: Transport,
        sources: list[str],
        run_id: str,
        peer_id: str,
        config: StateSyncConfig,
        result_of_round: int = 0,
        expect: ExpectedState | None = None,
    ) -> None:
        self.transport = transport
        self.sources = sources
        self.run_id = run_id
        self.peer_id = peer_id
        self.config = config
        self.result_of_round = result_of_round
        self.expect = expect
        self.started = time.monotonic()
        self.deadline = self.started + config.timeout_s
        self.failures: dict[str, str] = {}
        self.mismatched: list[str] = []
        self.stalled: list[str] = []
        self.manifest: pb.StateManifest | None = None
        self.manifest_source = ""
        self.layout: _Layout | None = None
        self.receiver: _Receiver | None = None
        self.blocks = _Blocks(0)
        self.by_source: Counter[str] = Counter()
        self.received = 0  # tensor bytes received, kept or not
        self.live = 0  # sources still fetching stripes
        self.changed = asyncio.Condition()

    # -- the whole fetch ------------------------------------------------------------------------

    async def state(self) -> StateSnapshot:
        """The manifest from the first source that serves one, then the blocks from all sources."""
        for tried, source in enumerate(self.sources, 1):
            try:
                await self._manifest(source)
                break
            except _SourceFailed as exc:
                self._failed(source, exc)
        else:
            raise self._error()
        donors = [source, *self.sources[tried:]]
        self.live = len(donors)
        try:
            async with asyncio.TaskGroup() as group:  # one donor's unexpected error cancels the others
                for donor in donors:
                    group.create_task(self._donor(donor))
        except BaseExceptionGroup as group_error:
            # not a donor's failure (those are handled): a bug or a closed transport
            raise group_error.exceptions[0] from None
        if not self.blocks.complete:
            raise self._error()
        return await self._finish()

    async def result(self) -> StateSnapshot:
        """Round result_of_round's result, in one stream from the first source that keeps it."""
        for source in self.sources:
            request = pb.StateRequest(run_id=self.run_id, peer_id=self.peer_id, result_of_round=self.result_of_round,
                                      max_chunk_bytes=self.transport.fetch_chunk_bytes)
            try:
                await self._stream(source, request, None)
                return await self._finish()
            except _SourceFailed as exc:
                self._failed(source, exc)
                self.manifest, self.layout, self.receiver = None, None, None
                self.blocks, self.by_source, self.received = _Blocks(0), Counter(), 0
        raise self._error()

    async def _finish(self) -> StateSnapshot:
        layout, receiver, manifest = self.layout, self.receiver, self.manifest
        # With one block its hash is the whole digest (checked with the manifest); otherwise hash it all once.
        if layout.blocks != 1 and not hmac.compare_digest(
            await self.transport.run_cpu(receiver.digest), manifest.sha256
        ):
            self.failures[self.manifest_source] = (
                "the state's SHA-256 does not match its manifest, whose block hashes all did"
            )
            raise StateSyncError(
                f"state fetch failed: the manifest {self.manifest_source} sent is inconsistent (every block "
                "matches its hash, the whole state does not match its SHA-256); fetch from another peer"
            )
        try:
            tensors = receiver.tensors(layout.entries)
        except (RuntimeError, TypeError, ValueError) as exc:  # the manifest checks should make this unreachable
            raise StateSyncError(
                f"state fetch from {self.manifest_source} failed: cannot build its tensors: {exc}"
            ) from None
        seconds = time.monotonic() - self.started
        self._grow_messages(layout.total_bytes, seconds)
        report = FetchReport(
            round_id=manifest.round_id,
            total_bytes=layout.total_bytes,
            seconds=seconds,
            bytes_by_source=dict(self.by_source),
            retried_blocks=self.blocks.retried,
            discarded_bytes=self.received - layout.total_bytes,
        )
        log.info(
            "fetched round %d %s: %d tensors, %d bytes in %.2f s from %s (%d block(s) retried)",
            manifest.round_id, "result" if self.result_of_round else "state", len(layout.entries), layout.total_bytes,
            seconds, ", ".join(f"{s} {n} B" for s, n in self.by_source.items()) or "-", self.blocks.retried,
        )
        return StateSnapshot(round_id=manifest.round_id, tensors=tensors, meta=layout.meta, report=report)

    def _grow_messages(self, total_bytes: int, seconds: float) -> None:
        """After a stall made this peer's fetches ask for small messages, a fetch that went through measured its
        link: later ones ask for what that link carries in time, back to the sources' own size on a fast link (a
        stall of one source on a fast link no longer costs every later fetch small messages). Never smaller than
        now: a small state's fetch is mostly latency, and a stall shrinks them (_read)."""
        asked = self.transport.fetch_chunk_bytes
        if not asked or seconds <= 0:
            return
        fits = self.config.asked_chunk_bytes(streams=max(1, len(self.by_source)), link_bps=8 * total_bytes / seconds)
        if fits > asked:
            self.transport.fetch_chunk_bytes = 0 if fits >= self.config.chunk_bytes else fits
            log.info("a fetch crossed its link at %.0f kbit/s: asking for %s from now on", 8e-3 * total_bytes / seconds,
                     "the sources' own message size" if fits >= self.config.chunk_bytes else f"{fits}-byte messages")

    def _failed(self, source: str, exc: _SourceFailed) -> None:
        self.failures[source] = exc.why
        if isinstance(exc, _Mismatch):
            self.mismatched.append(source)
        elif isinstance(exc, _Stalled):
            self.stalled.append(source)
        log.info("state fetch: dropped source %s: %s", source, exc.why)

    def _error(self) -> StateSyncError:
        """The error of a fetch no source can finish, naming each source and why."""
        if len(self.failures) == 1:
            source, why = next(iter(self.failures.items()))
            message = f"state fetch from {source} failed: {why}"
        else:
            left = (
                f"the remaining {self.blocks.todo} of {len(self.blocks.state)} blocks" if self.layout else "a manifest"
            )
            message = f"state fetch failed: no source can serve {left}: " + "; ".join(
                f"{source}: {why}" for source, why in self.failures.items()
            )
        if self.mismatched and len(self.mismatched) == len(self.failures):
            return StateMismatch(message, self.mismatched[0])
        if self.stalled and len(self.stalled) == len(self.failures):
            return StateSyncStalled(message)
        return StateSyncError(message)

    # -- one source -------------------------------------------------------------------------------

    async def _manifest(self, source: str) -> None:
        """Adopt the manifest source serves (of the expected round, if any), which pins that round there."""
        request = pb.StateRequest(run_id=self.run_id, peer_id=self.peer_id, manifest_only=True)
        if self.expect is not None and self.expect.round_id:
            request.round_id = self.expect.round_id
        call = self._call(source, request)
        try:
            await self._first(call, source)
        except grpc.aio.AioRpcError as exc:
            raise self._rpc_failure(exc, asked_round=request.HasField("round_id")) from None
        finally:
            if not call.done():  # a server of another implementation may stream the data anyway
                call.cancel()

    async def _donor(self, source: str) -> None:
        """Fetch stripes from source until every block is verified or source fails."""
        try:
            while True:
                async with self.changed:
                    await self.changed.wait_for(lambda: self.blocks.todo or self.blocks.complete)
                    if self.blocks.complete:
                        return
                    share = self.live if self.live == 1 else 2 * self.live
                    most = max(1, min(self.config.max_stripe_blocks, -(-self.blocks.todo // share)))
                    first, end = self.blocks.claim(most)
                stripe = _Stripe(source, first, end, first)
                try:
                    layout = self.layout
                    start, stop = first * layout.block_bytes, layout.block_end(end - 1)
                    request = pb.StateRequest(
                        run_id=self.run_id, peer_id=self.peer_id, round_id=self.manifest.round_id,
                        expect_sha256=self.manifest.sha256, offset=start, length=stop - start,
                        max_chunk_bytes=self.transport.fetch_chunk_bytes,
                    )
                    await self._stream(source, request, stripe)
                finally:
                    if self.blocks.release(stripe.next, stripe.end) or self.blocks.complete:
                        async with self.changed:
                            self.changed.notify_all()
        except _SourceFailed as exc:
            self._failed(source, exc)
        finally:
            self.live -= 1

    def _call(self, source: str, request: pb.StateRequest) -> grpc.aio.UnaryStreamCall:
        raw = request.SerializeToString()
        call = self.transport.channel(source).unary_stream(
            FETCH_METHOD, request_serializer=identity, response_deserializer=identity
        )(raw, timeout=max(self.deadline - time.monotonic(), 0.001))
        self.transport.counters.count_sent(source, len(raw))
        return call

    def _rpc_failure(self, exc: grpc.aio.AioRpcError, asked_round: bool = False) -> _SourceFailed:
        code = exc.code()
        why = f"{code.name}: {exc.details()}{_rpc_hint(code)}"
        # Asked for the expected round, a source at another round holds another state.
        return _Mismatch(why) if asked_round and code == grpc.StatusCode.NOT_FOUND else _SourceFailed(why)

    async def _read(self, call: grpc.aio.UnaryStreamCall, source: str) -> bytes | None:
        """The next message of a response (None at its end), within the stall timeout."""
        try:
            async with asyncio.timeout(self.config.stall_timeout_s):
                raw = await call.read()
        except TimeoutError:
            # A slow link, more likely than a stalled source where several stall: this fetch's later requests and
            # every later fetch of this peer ask for messages that cross such a link in time.
            small = self.config.asked_chunk_bytes(streams=len(self.sources))
            if not self.transport.fetch_chunk_bytes or small < self.transport.fetch_chunk_bytes:
                log.info("a fetch stalled: asking for %d-byte messages from now on (a slow link?)", small)
                self.transport.fetch_chunk_bytes = small
            raise _Stalled(f"no data for {self.config.stall_timeout_s:g} s (the source stalled)") from None
        if raw is grpc.aio.EOF:
            return None
        await self.transport.note_received(source, len(raw))
        return raw

    async def _first(self, call: grpc.aio.UnaryStreamCall, source: str) -> tuple[int, memoryview]:
        """Read a response's first chunk, whose manifest must be this fetch's (adopted if it is the first)."""
        raw = await self._read(call, source)
        if raw is None:
            raise _SourceFailed("the stream ended without a manifest")
        try:
            manifest_bytes, offset, data = _parse_chunk(raw)
        except ValueError as exc:
            raise _SourceFailed(f"malformed StateChunk: {exc}") from None
        if manifest_bytes is None:
            raise _SourceFailed("the first chunk carries no manifest")
        try:
            manifest = pb.StateManifest.FromString(bytes(manifest_bytes))
        except Exception as exc:  # protobuf's DecodeError and friends
            raise _SourceFailed(f"invalid manifest: {exc}") from None
        if self.manifest is None:
            self._adopt(manifest, source)
        elif not _same_state(manifest, self.manifest):
            raise _SourceFailed(
                f"its manifest differs from the one {self.manifest_source} sent for round {self.manifest.round_id} "
                "(it holds another state of that round)"
            )
        return offset, data

    def _adopt(self, manifest: pb.StateManifest, source: str) -> None:
        """Check a manifest and allocate the buffer it describes: the state this fetch gets."""
        try:
            layout = _check_manifest(manifest, self.run_id, self.config)
        except ValueError as exc:
            raise _SourceFailed(f"invalid manifest: {exc}") from None
        if self.result_of_round and manifest.round_id != self.result_of_round:
            raise _SourceFailed(
                f"asked for the result of round {self.result_of_round}, got round {manifest.round_id}'s"
            )
        expect = self.expect
        if expect is not None and expect.round_id and manifest.round_id != expect.round_id:
            raise _Mismatch(f"it serves round {manifest.round_id}, not the expected round {expect.round_id}")
        if expect is not None and expect.sha256_hex and (served := manifest_digest(manifest)) != expect.sha256_hex:
            raise _Mismatch(
                f"its state of round {manifest.round_id} has digest {served[:16]}..., not the expected "
                f"{expect.sha256_hex[:16]}..."
            )
        self.manifest, self.manifest_source, self.layout = manifest, source, layout
        self.receiver = _Receiver(layout)
        self.blocks = _Blocks(layout.blocks)

    async def _stream(self, source: str, request: pb.StateRequest, stripe: _Stripe | None) -> None:
        """Receive a stripe's bytes (stripe None: the whole state, after adopting its manifest) and verify them."""
        call = self._call(source, request)
        try:
            offset, data = await self._first(call, source)
            if stripe is None:
                stripe = _Stripe(source, 0, self.layout.blocks, 0)
                if self.blocks.todo:
                    self.blocks.claim(self.layout.blocks)
            await self._receive(call, source, stripe, offset, data)
        except grpc.aio.AioRpcError as exc:
            raise self._rpc_failure(exc) from None
        finally:
            if not call.done():
                call.cancel()

    async def _receive(
        self, call: grpc.aio.UnaryStreamCall, source: str, stripe: _Stripe, offset: int, data: memoryview
    ) -> None:
        layout = self.layout
        start = stripe.first * layout.block_bytes
        stop = layout.block_end(stripe.end - 1) if stripe.end > stripe.first else start
        hasher = _BlockHasher(layout, stripe.first)
        expected = start
        first = True
        while True:
            if len(data):
                if offset != expected:
                    raise _SourceFailed(f"a chunk at offset {offset}, expected {expected}")
                if expected + len(data) > stop:
                    where = f"the announced {layout.total_bytes} bytes" if stop == layout.total_bytes else (
                        f"the requested bytes [{start}, {stop})"
                    )
                    raise _SourceFailed(f"data runs past {where}")
                self.received += len(data)
                checked = await self.transport.run_cpu(self._absorb, hasher, offset, data)
                for block, ok in checked:
                    if not ok:
                        raise _SourceFailed(
                            f"block {block} (bytes {block * layout.block_bytes}-{layout.block_end(block)}) does not "
                            "match its SHA-256 in the manifest"
                        )
                    self.blocks.verified(block)
                    self.by_source[source] += layout.block_end(block) - block * layout.block_bytes
                    stripe.next = block + 1
                expected += len(data)
            elif not first:
                raise _SourceFailed(f"an empty data chunk at offset {offset}")
            first = False
            raw = await self._read(call, source)
            if raw is None:
                break
            try:
                manifest_bytes, offset, data = _parse_chunk(raw)
            except ValueError as exc:
                raise _SourceFailed(f"malformed StateChunk: {exc}") from None
            if manifest_bytes is not None:
                raise _SourceFailed("a manifest repeated after the first chunk")
        if expected != stop:
            raise _SourceFailed(f"the stream ended after {expected - start} of {stop - start} bytes")

    def _absorb(self, hasher: _BlockHasher, offset: int, data: memoryview) -> list[tuple[int, bool]]:
        # On a codec thread: streams write disjoint ranges of the buffer.
        self.receiver.write(offset, data)
        return hasher.feed(offset, data)


def _same_state(a: pb.StateManifest, b: pb.StateManifest) -> bool:
    """Whether two manifests describe the same bytes of the same round (meta may differ: it is per peer)."""
    return (
        a.run_id == b.run_id
        and a.round_id == b.round_id
        and a.total_bytes == b.total_bytes
        and a.sha256 == b.sha256
        and a.block_bytes == b.block_bytes
        and list(a.block_sha256) == list(b.block_sha256)
        and a.tensors == b.tensors
    )


def _source_list(sources: str | Sequence[str]) -> list[str]:
    listed = [sources] if isinstance(sources, str) else list(sources)
    unique = list(dict.fromkeys(listed))
    if not unique or not all(isinstance(s, str) and s for s in unique):
        raise ValueError(f"sources must be one address or a non-empty list of addresses, got {sources!r:.200}")
    return unique


async def fetch_state_async(
    transport: Transport,
    sources: str | Sequence[str],
    run_id: str,
    peer_id: str = "",
    config: StateSyncConfig = DEFAULT_CONFIG,
    result_of_round: int = 0,
    expect: ExpectedState | None = None,
) -> StateSnapshot:
    """Fetch, verify and return the state (or round result_of_round's result) from sources; run on the loop.

    Several sources serve one fetch in stripes of one round; ``expect`` names the round and/or
    digest to accept (a source holding another is refused: StateMismatch when none holds it).
    The snapshot's ``report`` says how the fetch went.
    """
    if sys.byteorder != "little":
        raise StateSyncError("state sync needs a little-endian host")
    fetch = _Fetch(transport, _source_list(sources), run_id, peer_id, config, result_of_round, expect)
    return await (fetch.result() if result_of_round else fetch.state())


def fetch_state(
    transport: Transport,
    sources: str | Sequence[str],
    run_id: str,
    peer_id: str = "",
    config: StateSyncConfig = DEFAULT_CONFIG,
    expect: ExpectedState | None = None,
) -> StateSnapshot:
    """Fetch, verify and return the state served at sources (blocking; never call it on the transport's loop).

    The returned tensors are writable views into one buffer; clone one to keep it without the rest.
    """
    try:
        on_loop = asyncio.get_running_loop() is transport.loop
    except RuntimeError:
        on_loop = False
    if on_loop:
        raise UsageError("fetch_state would block the transport's loop; await fetch_state_async there instead")
    future = transport.submit(fetch_state_async(transport, sources, run_id, peer_id, config, expect=expect))
    return future.result()
