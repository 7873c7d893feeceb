"""A benchmark's child that dies is reported at once, by name, with its exit code, its log's last lines and path.

(Not a bare ``AssertionError`` from the parent, and not a wait for a reply that never comes.)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

import pytest

from peer.bench import diloco
from peer.bench.kit import serving_child, spawned_entry
from peer.harness.processes import ChildFailed

pytestmark = pytest.mark.timeout(120)


def _crash(conn, why: str) -> None:
    """A serving child that fails before it is ready."""
    raise ValueError(why)


def _ready_then_exit(conn, code: int) -> None:
    """A serving child that gets ready, then dies while the parent uses it."""
    conn.send("127.0.0.1:1")
    os._exit(code)


def _exit_with(code: int) -> None:
    """A worker that says why on stderr, then exits without a result."""
    sys.stderr.write("worker: out of memory, say\n")
    sys.stderr.flush()
    os._exit(code)


def test_a_serving_child_that_dies_before_it_is_ready_is_named_with_its_log(tmp_path):
    started = time.monotonic()
    with (
        pytest.raises(ChildFailed) as err,
        serving_child(_crash, "no state to serve", name="state-server", log_dir=tmp_path),
    ):
        pass
    message = str(err.value)
    assert time.monotonic() - started < 60  # not the 120 s start timeout
    assert message.startswith("state-server exited (1) before it was ready; last lines of its log:\n")
    assert "ValueError: no state to serve" in message
    assert message.endswith(f"(log: {tmp_path / 'state-server.log'})")


def test_a_data_parallel_worker_that_exits_without_a_result_is_named_with_its_log(tmp_path):
    ctx = mp.get_context("spawn")
    log = tmp_path / "worker0.log"
    proc = ctx.Process(target=spawned_entry, args=(str(log), _exit_with, 3))
    proc.start()
    try:
        with pytest.raises(ChildFailed) as err:
            diloco._gather_results([proc], [log], ctx.Queue(), timeout_s=60)
    finally:
        proc.join(timeout=10)
    assert str(err.value) == (
        "data_parallel worker 0 exited (3) without a result; last lines of its log:\n"
        f"worker: out of memory, say\n(log: {log})"
    )


def test_a_child_that_dies_later_is_named_in_place_of_the_error_it_caused(tmp_path):
    with (
        pytest.raises(ChildFailed) as err,
        serving_child(_ready_then_exit, 4, name="sink", log_dir=tmp_path) as (address, _),
    ):
        assert address == "127.0.0.1:1"
        time.sleep(2)  # the child exits meanwhile; the benchmark sees only a broken connection
        raise ConnectionResetError("the sink hung up")
    assert str(err.value).startswith("sink exited (4) during the benchmark; ")
    assert isinstance(err.value.__cause__, ConnectionResetError)
