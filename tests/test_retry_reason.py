"""Which failed calls the sender may try again (``admission.retry_reason``): a table, with real gRPC errors."""

from __future__ import annotations

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from collectives.net.admission import RETRY_KEY, retry_reason


def error(code: grpc.StatusCode, trailing: tuple[tuple[str, str], ...] = ()) -> AioRpcError:
    return AioRpcError(code, Metadata(), Metadata(*trailing), details="x")


CASES = [
    ("the receiver marks its refusal retryable", grpc.StatusCode.UNAVAILABLE, ((RETRY_KEY, "busy"),), False, "busy"),
    ("... whatever the stream's replay", grpc.StatusCode.RESOURCE_EXHAUSTED, ((RETRY_KEY, "cap"),), True, "cap"),
    ("an unmarked refusal is final", grpc.StatusCode.UNAVAILABLE, (), True, None),
    ("INTERNAL on a stream nobody took on: a refusal raced a write", grpc.StatusCode.INTERNAL, (), True,
     "a refusal raced a write"),
    ("INTERNAL once the stream was taken on is final (a retry would duplicate it)", grpc.StatusCode.INTERNAL, (),
     False, None),
    ("a deadline is final", grpc.StatusCode.DEADLINE_EXCEEDED, (), True, None),
]


@pytest.mark.parametrize("name,code,trailing,replayable,why", CASES, ids=[c[0] for c in CASES])
def test_retry_reason(name, code, trailing, replayable, why):
    assert retry_reason(error(code, trailing), replayable=replayable) == why
