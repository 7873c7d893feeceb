"""Extending loconet from outside: a toy algorithm and a toy aggregator, registered here, run by a 3-peer harness.

Nothing in the project is edited: this module registers both when imported, and the harness's peers import it
too (``--plugin tests.test_plugins``), so every process knows them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

from collectives.reduce.aggregators import Aggregator, register_aggregator
from optimizers.diloco import DiLoCoConfig
from optimizers.outer import OuterOptimizer
from optimizers.outer_optim import OuterConfig
from optimizers.peers import LocalPeer
from optimizers.registry import get_algorithm, register_algorithm
from optimizers.syncconfig import SyncConfig
from peer.coordinator.config import CoordinatorConfig
from peer.harness.harness import Harness, HarnessConfig
from peer.runtime.training import TrainConfig
from peer.tasks.base import TaskConfig

TAG = "toy"


@register_aggregator
class SmallestNorm(Aggregator):
    """Keep the contribution with the smallest whole-vector norm (ties: lowest rank): a one-statistic toy."""

    name = "toy_smallest"

    def stat_rounds(self, n: int) -> int:
        return 1

    def share_numel(self, n: int, r: int) -> int:
        return n

    def share(self, r: int, rows: torch.Tensor, weights: Sequence[float], decisions: Sequence[dict]) -> torch.Tensor:
        return (rows.double() ** 2).sum(dim=1)

    def decide(self, r: int, total: torch.Tensor, weights: Sequence[float], decisions: Sequence[dict]) -> dict:
        norms = total.tolist()
        return {"selected": [min(range(len(norms)), key=lambda i: (norms[i], i))]}

    def prepare(self, weights: Sequence[float], decisions: Sequence[dict]) -> Callable[[torch.Tensor], torch.Tensor]:
        chosen = decisions[0]["selected"][0]
        return lambda rows: rows[chosen].clone()


@dataclass(frozen=True)
class ToyConfig(SyncConfig):
    """Local SGD with a twist: every few steps the peers keep the smallest update of the group."""

    sync_every: int = field(default=10, metadata={"help": "inner steps between syncs"})
    codec: str = field(default="none", metadata={"help": "codec of the rounds"})
    aggregator: str = field(default="toy_smallest", metadata={"help": "how a round combines contributions"})
    outer: OuterConfig = field(default_factory=lambda: OuterConfig(lr=1.0, momentum=0.0))
    toy_warmup: int = field(default=0, metadata={"help": "inner steps before the first sync"})


class ToyLocalSGD(OuterOptimizer):
    """An algorithm written against the public seam only: a schedule, a tag, and the base class's rounds."""

    config: ToyConfig

    def __init__(self, model, inner, peer, config: ToyConfig | None = None) -> None:
        super().__init__(model, inner, peer, config or ToyConfig())

    def _stepped(self, samples: int) -> None:
        # The base class's step ran the inner step and counted it; say when a round is due.
        if self.inner_steps > self.config.toy_warmup and self.inner_steps % self.config.sync_every == 0:
            self._sync_starts()
            self._conclude(lambda: self._send(TAG, 1.0, wait=True), TAG, started=time.monotonic(), label="toy sync")

    def round_indices(self, tag: str) -> Sequence[int]:
        return range(len(self.state.params))


register_algorithm("toy-local-sgd", ToyConfig, ToyLocalSGD, "a test's toy algorithm")


@dataclass(frozen=True)
class MineConfig(DiLoCoConfig):
    """A DiLoCo variant's config, as a plugin would write it: its own TAG, the name it registers under."""

    TAG: ClassVar[str] = "mine-diloco"


def test_the_registry_builds_the_toy_algorithm_from_its_config():
    model = torch.nn.Linear(3, 2)
    opt = get_algorithm("toy-local-sgd").make(model, torch.optim.SGD(model.parameters(), lr=0.1), LocalPeer())
    assert isinstance(opt, ToyLocalSGD) and opt.config == ToyConfig()


@pytest.mark.timeout(300)
def test_a_toy_algorithm_and_aggregator_run_through_a_three_peer_harness(tmp_path):
    config = HarnessConfig(
        peers=3,
        task_config=TaskConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32, batch_size=8),
        train=TrainConfig(algorithm="toy-local-sgd", steps=120, options=ToyConfig(toy_warmup=20)),
        coordinator=CoordinatorConfig(lease_s=3.0, heartbeat_s=0.5, dashboard_port=None),
        plugins=("tests.test_plugins",),
        workdir=str(tmp_path),
    )
    harness = Harness(config)
    report = harness.run()
    assert harness.orphans() == []
    assert report["survivors_identical"] is True and report["peers_alive"] == 3
    assert report["rounds_committed"] >= 5, "rounds every 10 steps after a 20-step warm-up"
    for name, proc in harness.peers.items():
        rounds = [e for e in proc.events if e["event"] == "committed" and e["contributed"]]
        assert rounds, f"{name} took part"
        assert all(e["step"] > 20 and e["step"] % 10 == 0 for e in rounds), "the toy's schedule ran"
        assert all(len(e["decisions"][0]["selected"]) == 1 for e in rounds), "the toy aggregator decided"
    by_round = {}
    for proc in harness.peers.values():
        for e in proc.events:
            if e["event"] == "committed":
                by_round.setdefault(e["round"], set()).add(str(e["decisions"]))
    assert all(len(decisions) == 1 for decisions in by_round.values()), "every member derived the same decision"


BAD_PLUGINS = {
    "raises_at_import": "raise RuntimeError('no licence key')\n",
    "syntax_error": "def broken(:\n",
    "needs_a_dependency": "import no_such_dependency_xyz\n",
    "registers_badly": (
        "from collectives.reduce.aggregators import register_aggregator\n"
        "register_aggregator(5)\n"
    ),
}


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        ("", r"--plugin '': give a module's dotted name"),
        ("./myplugin.py", r"--plugin './myplugin.py': give a module's dotted name \(e.g. mypkg.myplugin\), not a file"),
        ("no_such_plugin_xyz", r"plugin 'no_such_plugin_xyz': no module named 'no_such_plugin_xyz' on sys.path"),
        ("{p}raises_at_import", r"importing '{p}raises_at_import' raised RuntimeError: no licence key$"),
        ("{p}syntax_error", r"importing '{p}syntax_error' raised SyntaxError"),
        (
            "{p}needs_a_dependency",
            r"importing '{p}needs_a_dependency' failed: No module named 'no_such_dependency_xyz'",
        ),
        ("{p}registers_badly", r"importing '{p}registers_badly' raised "),
    ],
)
def test_a_plugin_that_cannot_be_loaded_is_one_config_error_naming_it(tmp_path, monkeypatch, plugin, message):
    from collectives.errors import ConfigError
    from peer.plugins import load_plugins

    prefix = f"loconet_plugin_{tmp_path.name.replace('-', '_')}_"
    for name, source in BAD_PLUGINS.items():
        (tmp_path / f"{prefix}{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=message.format(p=prefix)):
        load_plugins([plugin.format(p=prefix)])


def test_a_config_registered_under_another_name_than_its_tag_is_refused_saying_what_to_set():
    # A DiLoCo subclass registered as 'my-diloco' inherited TAG 'diloco': its peers joined plain DiLoCo runs.
    from collectives.errors import ConfigError
    from optimizers.diloco import DiLoCo

    @dataclass(frozen=True)
    class MyDiLoCoConfig(DiLoCoConfig):
        my_knob: float = 0.5

    with pytest.raises(ConfigError, match=r"'my-diloco': its config MyDiLoCoConfig has TAG 'diloco'; set TAG: "
                                          r"ClassVar\[str\] = 'my-diloco'"):
        register_algorithm("my-diloco", MyDiLoCoConfig, DiLoCo)


def test_an_algorithm_whose_build_is_not_callable_is_refused():
    from collectives.errors import ConfigError

    with pytest.raises(ConfigError, match="algorithm 'toy-broken': build must be callable"):
        register_algorithm("toy-broken", ToyConfig, "optimizers.diloco:DiLoCo")
    with pytest.raises(ConfigError, match="unknown algorithm 'toy-broken'"):
        get_algorithm("toy-broken")


def test_a_diloco_subclass_with_its_own_tag_carries_it_in_its_rounds_and_states():
    # Built directly, not registered: a registration would add its options to every command built after it here.
    from optimizers.diloco import DiLoCo

    model = torch.nn.Linear(2, 1)
    opt = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), LocalPeer(), MineConfig())
    assert opt.tag == "mine-diloco"
    assert opt.algorithm_name() == "mine-diloco"
    assert opt.snapshot().meta["algorithm"] == "mine-diloco"
