"""The task and training options shared by ``loconet peer``, ``harness``, ``demo`` and ``bench diloco``.

Generated from ``TaskConfig``, ``TrainConfig`` and every registered
algorithm's config (``optimizers/registry.py``): an algorithm's options are
offered once each (``--sync-every`` serves every algorithm that has it), with
no value of their own on the command line, so that the chosen algorithm's
config supplies its defaults (the codec is int8 for DiLoCo and int4 for
Streaming DiLoCo, each defined once, in its dataclass). An option the chosen
algorithm does not have is an error. ``train_args`` / ``task_args`` are the
reverse: the arguments that make a child process build the same configs.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING
from typing import Any

from collectives.errors import ConfigError
from optimizers.registry import algorithm_names, algorithms, get_algorithm
from peer.options import add_option, add_options, option_args, options_of, read_options
from peer.runtime.training import TrainConfig
from peer.tasks.base import TaskConfig


def add_task_arguments(parser: argparse.ArgumentParser, defaults: TaskConfig | None = None) -> None:
    """Options that choose and size a training task."""
    add_options(parser.add_argument_group("task"), TaskConfig, defaults=defaults)


def read_task_config(ns: argparse.Namespace) -> TaskConfig:
    """The TaskConfig the task options describe."""
    return read_options(TaskConfig, ns)


def task_args(config: TaskConfig) -> list[str]:
    """The task options that read_task_config turns back into config."""
    return option_args(config)


def _algorithm_options() -> dict[str, tuple[Any, dict[str, Any]]]:
    """Flag -> (option, {algorithm: default}) over every registered algorithm's config."""
    merged: dict[str, tuple[Any, dict[str, Any]]] = {}
    for algo in algorithms():
        for option in options_of(algo.config, defaults=algo.config()):
            if option.flag in merged:
                merged[option.flag][1][algo.name] = option.default
            else:
                merged[option.flag] = (option, {algo.name: option.default})
    return merged


def _default_text(option: Any, per_algorithm: dict[str, Any]) -> str:
    shown = {}
    for name, value in per_algorithm.items():
        text = "none" if value is None or value is MISSING else (option.format(value) if option.format else value)
        shown.setdefault(" ".join(map(str, text)) if isinstance(text, tuple) else str(text), []).append(name)
    if len(shown) == 1 and len(per_algorithm) == len(algorithm_names()):
        return next(iter(shown))
    return "; ".join(f"{value} for {', '.join(names)}" for value, names in shown.items())


def add_train_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig | None = None) -> None:
    """Options of the training loop and of every registered algorithm."""
    g = parser.add_argument_group("training")
    for option in options_of(TrainConfig, defaults=defaults):
        if option.flag == "algorithm":
            option = dataclasses.replace(option, choices=tuple(algorithm_names()))
        add_option(g, option)
    a = parser.add_argument_group("algorithm (each applies to the algorithms its default names)")
    chosen = defaults.options if defaults is not None else None
    for flag, (option, per_algorithm) in _algorithm_options().items():
        if chosen is not None and dataclasses.is_dataclass(chosen):
            # A caller's own defaults (the harness's, the demo's) show for its algorithm.
            for own in options_of(type(chosen), defaults=chosen):
                if own.flag == flag:
                    per_algorithm = {**per_algorithm, defaults.algorithm: own.default}
        add_option(a, option, default_text=_default_text(option, per_algorithm), unset=True)


def read_train_config(
    ns: argparse.Namespace, base: TrainConfig | None = None, algorithm: str | None = None, strict: bool = True
) -> TrainConfig:
    """The TrainConfig the training options describe, for ns.algorithm (or ``algorithm``).

    Algorithm options left out keep base's values (when base runs the same algorithm) or the
    algorithm's defaults. ``strict``: an option the algorithm does not have is a ConfigError
    (not strict: it is ignored, for commands that run several algorithms with one set of options).
    """
    chosen = get_algorithm(algorithm or ns.algorithm)
    wanted = {o.flag for o in options_of(chosen.config)}
    given = [flag for flag in _algorithm_options() if getattr(ns, flag.replace("-", "_"), None) is not None]
    stray = [flag for flag in given if flag not in wanted]
    if stray and strict:
        raise ConfigError(
            f"--{stray[0]} does not apply to algorithm {chosen.name!r}; its options are: "
            + ", ".join(f"--{f}" for f in sorted(wanted))
        )
    own_base = base.options if base is not None and base.algorithm == chosen.name else None
    options = read_options(chosen.config, ns, base=own_base or chosen.config(), only_set=True)
    # The loop's own options all have values (their defaults are the parser's, base's when given).
    ns = argparse.Namespace(**{**vars(ns), "algorithm": chosen.name})
    loop = read_options(TrainConfig, ns, base=TrainConfig(algorithm=chosen.name), only_set=True)
    return dataclasses.replace(loop, options=options)


def train_args(config: TrainConfig) -> list[str]:
    """The training options that read_train_config turns back into config."""
    return option_args(config) + option_args(config.options)
