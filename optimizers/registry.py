"""The algorithms a peer can run, by name: each is a config dataclass and a class built from it.

The peer daemon, the harness, ``loconet bench diloco``, the CLI options and
the Python API all look algorithms up here. Adding one is one module plus one
``register_algorithm`` line (at the end of this file for a built-in one, in
the user's own module for a plugin)::

    @dataclass(frozen=True)
    class MyConfig(SyncConfig):
        my_knob: float = field(default=0.5, metadata={"help": "what it does"})

    class MyAlgorithm(OuterOptimizer):
        def __init__(self, model, inner, peer, config=None, **overrides): ...

    register_algorithm("mine", MyConfig, MyAlgorithm, "one line for --help")

The config's fields become ``loconet peer`` options (``--my-knob``); the
class is built as ``MyAlgorithm(model, inner, peer, config)``. A user's own
module registers at import: ``loconet peer --plugin mypackage.mymodule``.
Registration happens at import time only; the table is read-only afterwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from collectives.errors import ConfigError
from optimizers.asyncdiloco import AsyncDiLoCo, AsyncDiLoCoConfig
from optimizers.coded import CodedSGD, CodedSGDConfig, SyncSGDConfig
from optimizers.diloco import DiLoCo, DiLoCoConfig
from optimizers.federated import FEDERATED, FedAvg
from optimizers.noloco import NoLoCo, NoLoCoConfig
from optimizers.seqcoded import SeqSGCConfig, SequentialCodedSGD
from optimizers.streaming import StreamingConfig, StreamingDiLoCo


@dataclass(frozen=True)
class Algorithm:
    """A registered algorithm: its name, config dataclass, the class built from it, and a one-line summary."""

    name: str
    config: type
    build: Callable[..., Any]
    summary: str = ""

    def make(self, model: torch.nn.Module, inner: torch.optim.Optimizer, peer: Any, config: Any = None) -> Any:
        """The algorithm's optimizer around model and inner, syncing through peer (config None: the defaults)."""
        config = self.config() if config is None else config
        if not isinstance(config, self.config):
            raise ConfigError(f"algorithm {self.name!r} takes a {self.config.__name__}, got {type(config).__name__}")
        return self.build(model, inner, peer, config)


_ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(name: str, config: type, build: Callable[..., Any], summary: str = "") -> Algorithm:
    """Make an algorithm available by name; registering the same one again is a no-op."""
    if not name or name != name.strip().lower() or " " in name:
        raise ConfigError(f"algorithm names are lower-case words, got {name!r}")
    if not dataclasses.is_dataclass(config):
        raise ConfigError(f"algorithm {name!r}: its config must be a dataclass, got {config!r}")
    if not callable(build):
        raise ConfigError(f"algorithm {name!r}: build must be callable (model, inner, peer, config), got "
                          f"{type(build).__name__}")
    tag = getattr(config, "TAG", None)
    if tag is not None and tag != name:
        # The tag is what the peers' joins, rounds and states carry: a subclass of a built-in's config inherits its
        # TAG, and its peers would pass for peers of the built-in.
        raise ConfigError(f"algorithm {name!r}: its config {config.__name__} has TAG {tag!r}; set TAG: ClassVar[str] = "
                          f"{name!r} in it, the name its peers' rounds and states carry")
    entry = Algorithm(name, config, build, summary)
    known = _ALGORITHMS.get(name)
    if known is not None and (known.config, known.build) != (config, build):
        raise ConfigError(f"algorithm {name!r} is already registered by {known.build!r}; pick another name")
    _ALGORITHMS[name] = entry
    return entry


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered under name; ConfigError listing the names otherwise."""
    try:
        return _ALGORITHMS[name]
    except KeyError:
        raise ConfigError(
            f"unknown algorithm {name!r}: use one of {', '.join(algorithm_names())} "
            "(a plugin registers its own: loconet peer --plugin MODULE)"
        ) from None


def algorithm_names() -> list[str]:
    """Registered algorithm names, built-in ones first."""
    return list(_ALGORITHMS)


def algorithms() -> list[Algorithm]:
    """Every registered algorithm, built-in ones first."""
    return list(_ALGORITHMS.values())


register_algorithm("diloco", DiLoCoConfig, DiLoCo, "DiLoCo: H local steps, then one averaged outer step")
register_algorithm(
    "streaming", StreamingConfig, StreamingDiLoCo,
    "Streaming DiLoCo: fragments synced on a staggered, overlapped schedule",
)
for _config, _summary in FEDERATED:
    register_algorithm(_config.TAG, _config, FedAvg, _summary)
register_algorithm(
    CodedSGDConfig.TAG, CodedSGDConfig, CodedSGD,
    "gradient-coded synchronous SGD: the exact gradient from any n-s workers (--quorum coded:s)",
)
register_algorithm(
    SyncSGDConfig.TAG, SyncSGDConfig, CodedSGD,
    "synchronous SGD, one round per step (--quorum all waits for all; allbut:s ignores s stragglers)",
)
register_algorithm(
    SeqSGCConfig.TAG, SeqSGCConfig, SequentialCodedSGD,
    "sequential gradient coding for bursty (B, W, lambda) stragglers: m-sgc, sr-sgc or gc (--quorum grace:lambda)",
)
register_algorithm(
    AsyncDiLoCoConfig.TAG, AsyncDiLoCoConfig, AsyncDiLoCo,
    "asynchronous DiLoCo: rounds of the ready peers (--quorum buffer:K), stale contributions weighted by s(tau)",
)
register_algorithm(
    NoLoCoConfig.TAG, NoLoCoConfig, NoLoCo,
    "NoLoCo: each outer step averages within seeded pairs (no all-reduce), pulling the replicas together",
)
