"""The docs' table of defaults says what the code does: each row's value is its dataclass field's default."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
from dataclasses import MISSING
from pathlib import Path

import pytest

from peer.cli import add_peer_arguments
from peer.trainoptions import read_train_config

ROW = re.compile(r"^\| `(--[\w-]+)`(?: \((\w+)\))? \| ([^|]+) \| `([\w.]+)` \|$")
TABLE = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def rows() -> list[tuple[str, str | None, str, str]]:
    found = [m.groups() for line in TABLE.read_text().splitlines() if (m := ROW.match(line.strip()))]
    assert len(found) >= 20, "the table of defaults is where docs/architecture.md says"
    return found


def field_default(path: str):
    module_name, class_name, field_name = path.rsplit(".", 2)
    cls = getattr(importlib.import_module(module_name), class_name)
    (f,) = [f for f in dataclasses.fields(cls) if f.name == field_name]
    return f.default if f.default is not MISSING else f.default_factory()


@pytest.mark.parametrize("flag,algorithm,value,path", rows(), ids=lambda x: str(x))
def test_the_documented_default_is_the_fields_default(flag, algorithm, value, path):
    default = field_default(path)
    assert str(default) == value.strip() or default == type(default)(value.strip())


@pytest.mark.parametrize("flag,algorithm,value,path", [r for r in rows() if r[0] in ("--sync-every", "--codec")])
def test_the_command_line_gives_the_documented_default(flag, algorithm, value, path):
    parser = argparse.ArgumentParser()
    add_peer_arguments(parser)
    train = read_train_config(parser.parse_args(["--algorithm", algorithm or "diloco"]))
    assert str(getattr(train.options, path.rsplit(".", 1)[1])) == value.strip()
