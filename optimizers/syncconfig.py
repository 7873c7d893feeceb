"""The config every algorithm that syncs pseudo-gradients extends: its sync interval, codec, aggregator and outer step.

An algorithm's config (``DiLoCoConfig``, ``StreamingConfig``, a plugin's) is a
frozen dataclass subclassing ``SyncConfig``; its fields become ``loconet peer``
options (``optimizers/registry.py``), and its class is built from it
(``optimizers/outer.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from collectives.codecs import CodecConfig
from collectives.errors import ConfigError
from collectives.reduce.aggregators import AggregatorConfig, make_aggregator
from optimizers.outer_optim import OuterConfig


@dataclass(frozen=True)
class SyncConfig:
    """When a peer syncs, how its pseudo-gradient travels and is combined, and its outer step: every algorithm's
    config extends it."""

    sync_every: int = field(default=100, metadata={"help": "inner steps between syncs (H)"})
    codec: str = field(
        default="int8",
        metadata={"help": "codec of the pseudo-gradient rounds: none, fp16, bf16, int8, int4, each +zstd "
                  "(e.g. int4/128+zstd), or topk[/N] (sparse: 1 in N kept, error feedback)"},
    )
    aggregator: str = field(
        default="mean",
        metadata={"help": "how a round combines contributions: mean, sum, median, trimmed_mean:trim=0.1, krum:f=1, "
                  "multi_krum:f=1,m=3, bulyan:f=1, norm_clip:clip=1, centered_clip:tau=1 (every peer must agree)"},
    )
    outer: OuterConfig = field(default_factory=OuterConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.sync_every, int) or self.sync_every < 1:
            raise ConfigError(f"sync_every must be an integer >= 1, got {self.sync_every!r}")
        CodecConfig.parse(self.codec)
        AggregatorConfig.parse(self.aggregator)

    def expected_quorum(self) -> str | None:
        """The coordinator's quorum policy (its --quorum) these rounds are built for; None: any serves."""
        return None

    def quorum_problem(self, policy: str) -> str:
        """Why the coordinator's quorum policy (its --quorum text) cannot serve these rounds; "" when it can."""
        return ""

    def least_members(self) -> int:
        """The fewest members these rounds run with: the aggregator's minimum (Krum's 2f+3)."""
        return make_aggregator(self.aggregator_config).min_group()

    def round_settings(self) -> tuple[str, ...]:
        """What every member does with a round's result, in parts the coordinator compares like the codec (a peer
        started with another --outer-lr would otherwise leave the run's replicas different after every round)."""
        return self.outer.settings()

    @property
    def codec_config(self) -> CodecConfig:
        """The parsed codec."""
        return CodecConfig.parse(self.codec)

    @property
    def aggregator_config(self) -> AggregatorConfig:
        """The parsed aggregator."""
        return AggregatorConfig.parse(self.aggregator)


def least_members(options: Any) -> int:
    """The fewest members an algorithm's rounds need (SyncConfig.least_members); 1 for a plugin's config that
    does not say."""
    say = getattr(options, "least_members", None)
    return say() if say is not None else 1
