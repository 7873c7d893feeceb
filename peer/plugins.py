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
import logging
import os
import re
import sys
from types import ModuleType

from collectives.errors import ConfigError

log = logging.getLogger(__name__)

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def load_plugins(modules: list[str]) -> None:
    """Import user modules that register algorithms, aggregators, outer optimizers or tasks."""
    for name in modules:
        if not _MODULE.match(name):
            raise ConfigError(f"--plugin {name!r}: give a module's dotted name (e.g. mypkg.myplugin), not a file; "
                              "its folder must be on PYTHONPATH or the working directory")
        import_user_module(name, f"plugin {name!r}")


def import_user_module(name: str, what: str) -> ModuleType:
    """Import a user's module ``name`` (the working directory searched too, last); ConfigError naming ``what`` and
    the cause when it is missing, a dependency of it is, or its code fails at import."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        # Under the console script the working directory is not on sys.path; appended last, a module next to where
        # loconet was started is found but never shadows an installed one of the same name.
        sys.path.append(cwd)
        log.debug("appended the working directory %s to sys.path", cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        # e.name tells a missing module apart from a missing dependency of it
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError(
                f"{what}: no module named {e.name!r} on sys.path (the working directory {cwd} is searched too; "
                "set PYTHONPATH to import it from elsewhere)"
            ) from e
        raise ConfigError(f"{what}: importing {name!r} failed: {e}") from e
    except Exception as e:  # any error inside the user's module (a registration refused included) is the user's
        raise ConfigError(f"{what}: importing {name!r} raised {said(e)}") from e


def said(e: BaseException) -> str:
    """'TypeName: message' of an exception of a user's code, on one line."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


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
