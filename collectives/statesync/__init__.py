"""State sync: a joining peer fetches the training state of a round from live peers, in verified stripes.

Protocol (``protos/state.proto``, service ``loconet.state.v1.StateSync``)::

    joiner --FetchState(StateRequest{run_id, peer_id, round_id?, expect_sha256, offset, length})--> donor
    joiner <-- StateChunk{manifest, offset=start, data?} --   first chunk of every response: the manifest
    joiner <-- StateChunk{offset, data} ...               --   data chunks of [start, end), offsets contiguous

A state is named tensors plus JSON metadata taken at a round boundary; the
manifest carries its SHA-256 and the SHA-256 of each fixed-size block of its
bytes. A donor pins the snapshot of a round while fetches of it run (one copy
shared by all of them), so a joiner on a slow link still gets a consistent
state of round r after the run moved on, and can ask several donors for
byte ranges (stripes) of that round at once: every block is verified as it
completes, so a donor that dies, stalls, moved on or lies costs only its
unverified blocks. The same stream serves the committed result of a recent
round (``result_of_round``) to a peer a round went on without.

This module is the public face; the parts live in ``collectives.statesync.format``
(snapshots, manifest, framing, parsing, limits), ``collectives.statesync.server``
(serving, pins, bounds on callers) and ``collectives.statesync.fetch`` (striped,
resumable fetching).
"""

from __future__ import annotations

from collectives.statesync.fetch import fetch_state, fetch_state_async
from collectives.statesync.format import (
    ALLOWED_DTYPES,
    FETCH_METHOD,
    MAX_BLOCK_BYTES,
    MIN_BLOCK_BYTES,
    SERVICE,
    ExpectedState,
    FetchReport,
    ResultNotYet,
    StateMismatch,
    StateSnapshot,
    StateSyncConfig,
    StateSyncError,
    StateSyncStalled,
    manifest_digest,
    state_digest,
)
from collectives.statesync.server import SERVES_NO_STATE, StateServer

__all__ = [
    "ALLOWED_DTYPES",
    "FETCH_METHOD",
    "MAX_BLOCK_BYTES",
    "MIN_BLOCK_BYTES",
    "SERVICE",
    "ExpectedState",
    "FetchReport",
    "ResultNotYet",
    "StateMismatch",
    "SERVES_NO_STATE",
    "StateServer",
    "StateSnapshot",
    "StateSyncConfig",
    "StateSyncError",
    "StateSyncStalled",
    "fetch_state",
    "fetch_state_async",
    "manifest_digest",
    "state_digest",
]
