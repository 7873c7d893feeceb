"""What an outer optimizer needs from the network: a peer that reduces tensors in committed rounds.

``collectives.elastic.ElasticCollective`` is the real one. ``LocalPeer`` is
a run of one (no network: the round's aggregate of one contribution), for
training alone and for tests of the optimizer math.

A peer may have a ``status`` (``collectives.membership.client.PeerStatus``, what
its heartbeats report); the optimizer fills its step, loss, samples and
speed after every step. A peer without one (None, or no such attribute) is
simply not reported on.

A sync's optional arguments (``prepare``, ``residual``, ``min_members``,
``settings``) are passed only to a sync that takes them (``takes_keyword``),
so a user's own SyncPeer needs only those its algorithm uses.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from collectives.codecs import CodecConfig, check_finite, make_codec
from collectives.errors import Incompatible, NonFiniteError
from collectives.membership.client import PeerStatus
from collectives.membership.roundplan import RoundPlan
from collectives.reduce.aggregators import AggregatorConfig, aggregate_rows, make_aggregator
from collectives.reduce.parts import flatten, unflatten_like
from collectives.syncphases import Prepare, Weight, check_prepared


class SyncPeer(Protocol):
    """A member of a run (see collectives.elastic.ElasticCollective)."""

    @property
    def status(self) -> PeerStatus | None:
        """What the peer reports about its training (ElasticCollective: in its heartbeats); None: nobody watches."""

    def sync(
        self,
        tensors: Sequence[torch.Tensor],
        weight: Weight = 1.0,
        tag: str = "",
        codec: CodecConfig | None = None,
        aggregator: AggregatorConfig | None = None,
        prepare: Prepare | None = None,
    ) -> Any:
        """Reduce tensors in a committed round; the result has ``.value`` and ``.round_id``.

        ``weight`` (if a function) and ``prepare`` are called with each attempt's plan; what an
        attempt sends is ``prepare(plan, flat)``, made anew from the flat contribution. Algorithms
        that need them also pass ``within`` and ``own_state`` (NoLoCo: ``ElasticCollective.sync``); a sync that
        takes ``settings`` is given what this peer does with the result, for its coordinator to compare, and one
        that takes ``min_members`` the fewest members a round may have, when above one (differential privacy's).
        """

    def sync_async(
        self,
        tensors: Sequence[torch.Tensor],
        weight: Weight = 1.0,
        tag: str = "",
        codec: CodecConfig | None = None,
        aggregator: AggregatorConfig | None = None,
        prepare: Prepare | None = None,
    ) -> concurrent.futures.Future:
        """Start a sync and return a future of its result; NonFiniteError at once for a NaN/Inf input."""


def takes_keyword(sync: Callable[..., Any], name: str) -> bool:
    """Whether a peer's sync (or sync_async) accepts the keyword argument ``name`` (True when its signature is
    unknown)."""
    try:
        params = inspect.signature(sync).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@dataclass
class LocalResult:
    """The result of a LocalPeer round."""

    value: list[torch.Tensor]
    round_id: int


class LocalPeer:
    """A run of one peer: each round's result is the aggregate of its one contribution, after the codec round trip."""

    def __init__(self, status: PeerStatus | None = None) -> None:
        """``status``: where the optimizer reports its training (None: not reported, as nobody watches a run of one)."""
        self._rounds = itertools.count(1)
        self.bytes_sent = 0
        self.status = status

    def sync(
        self,
        tensors: Sequence[torch.Tensor],
        weight: Weight = 1.0,
        tag: str = "",
        codec: CodecConfig | None = None,
        aggregator: AggregatorConfig | None = None,
        prepare: Prepare | None = None,
        within: Any = None,
        own_state: bool = False,
        residual: torch.Tensor | None = None,
        settings: Sequence[str] = (),
        min_members: int = 1,
    ) -> LocalResult:
        """Return the round's result for a group of one (the codec applied, as a real round's gather does); a run
        of one is its own group, so ``within``, ``own_state`` and ``settings`` (nobody to compare them with)
        change nothing; its own part is exact (an
        error-feedback ``residual`` ends at zero) unless the codec is sparse, which codes it as a real round does.
        Incompatible when ``min_members`` asks for rounds of more than one."""
        if min_members > 1:
            raise Incompatible(f"a run of one peer makes rounds of one, and this algorithm needs {min_members} "
                               "members a round (--dp-min-members): run more peers, or give --dp-min-members 1")
        round_id = next(self._rounds)
        tensors = list(tensors)
        # On the host, where a real round's owners reduce (a GPU's contribution is copied here).
        flat = flatten(tensors)
        plan = RoundPlan(action="round", round_id=round_id, members=(("local", ""),))
        if callable(weight):
            weight = weight(plan)
        if prepare is not None:
            # A NaN input is refused as such (the optimizer restarts from the global state), as without prepare.
            check_finite(flat, "the values to sync (nothing was sent)")
            flat = check_prepared(prepare(plan, flat), flat, round_id)
        c = make_codec(codec or CodecConfig())
        if c.NEEDS_FEEDBACK:  # a sparse codec codes a real owner's own part too (collectives/reduce/round.py)
            work = None if residual is None else residual.cpu()
            flat = c.decode(c.encode_with_feedback(flat, work), flat.numel())
            if work is not None:
                residual.copy_(work)
        elif residual is not None:
            residual.zero_()  # the round carried the whole contribution, as a real owner's own part
        reduced = aggregate_rows(make_aggregator(aggregator or AggregatorConfig()), flat.view(1, -1), [float(weight)])
        out = c.decode(c.encode_reduced(reduced), reduced.numel())
        # On the host, as a real round's result is (collectives/elasticsync.py).
        return LocalResult(value=unflatten_like(out, tensors, device="cpu"), round_id=round_id)

    def sync_async(
        self,
        tensors: Sequence[torch.Tensor],
        weight: Weight = 1.0,
        tag: str = "",
        codec: CodecConfig | None = None,
        aggregator: AggregatorConfig | None = None,
        prepare: Prepare | None = None,
        within: Any = None,
        own_state: bool = False,
        residual: torch.Tensor | None = None,
        settings: Sequence[str] = (),
        min_members: int = 1,
    ) -> concurrent.futures.Future:
        """A future that is already done (a NaN/Inf input raises at once, as a real peer's does)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(self.sync(tensors, weight, tag, codec, aggregator, prepare, residual=residual,
                                        min_members=min_members))
        except NonFiniteError:  # the encode refused the input: raised at once, as a real peer's refusal is
            raise
        except Exception as exc:  # noqa: BLE001 - surfaced through the future, like a real round's failure
            future.set_exception(exc)
        return future
