"""``--plugin MODULE``: a user's module imported before anything else, to register its own extensions.

A plugin registers algorithms, aggregators, outer optimizers, quorum policies
or tasks when imported (see docs/architecture.md); every ``loconet`` command
takes ``--plugin`` (repeatable) and the harness passes its plugins on to the
processes it starts. This module imports nothing heavy, so that a
coordinator's command line stays free of torch.
"""

from __future__ import annotations

import argparse
import importlib

from collectives.errors import ConfigError


def load_plugins(modules: list[str]) -> None:
    """Import user modules that register algorithms, aggregators, outer optimizers or tasks."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"cannot import plugin {name!r}: {exc}; is it on PYTHONPATH?") from None


def plugins_from(argv: list[str]) -> list[str]:
    """The --plugin modules named in argv (read before the parser is built, since they add options)."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--plugin", action="append", default=[])
    ns, _ = early.parse_known_args(argv)
    return ns.plugin


def add_plugin_argument(parser: argparse.ArgumentParser) -> None:
    """--plugin MODULE (repeatable)."""
    parser.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE",
        help="import this module first: it may register algorithms, aggregators, outer optimizers (repeatable)",
    )
