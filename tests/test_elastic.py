"""The elastic all-reduce's checks that need no run: what it refuses before asking for a quorum."""

from __future__ import annotations

import pytest
import torch

from collectives.elastic import ElasticCollective, ElasticConfig
from collectives.errors import NonFiniteError


def test_sync_refuses_a_nan_input_before_asking_for_a_quorum():
    # Never started: a sync that got as far as the coordinator would fail with TransportClosed.
    peer = ElasticCollective(ElasticConfig(coordinator="127.0.0.1:1", run_id="r"))
    x = torch.ones(10)
    x[4] = float("inf")
    with pytest.raises(NonFiniteError, match=r"hold 1 NaN or Inf value\(s\) out of 10"):
        peer.sync_async(x)
    assert peer.transport.counters.bytes_sent == 0
