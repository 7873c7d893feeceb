"""Every ``loconet`` command the docs quote parses with the command's own parser: its options exist and its values
(events, chaos specs, codecs, algorithms) are ones the command takes. A renamed option fails here, not in a reader's
shell. Commands with placeholders (``--peers N``, ``$M``, ``<name>``) are skipped."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from peer.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
# A command starts at `loconet`, after an optional sudo and environment settings, and ends at a shell operator.
COMMAND = re.compile(r"(?:^|[\s;&(])(?:sudo\s+)?(?:[A-Z_]+=\S+\s+)*loconet\s+(.*)$")
SHELL_END = re.compile(r"\s(?:&&|\|\||\||;|>|2>|&)\s?")
PLACEHOLDER = re.compile(r"^(?:[A-Z]|\$.*|<.*|NAME|[A-Z]+)$|\.\.\.|\[")


def quoted_commands(path: Path) -> list[str]:
    """The arguments after ``loconet`` of each command in path's code blocks and inline code, placeholders skipped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())  # a command continued over lines is one line
    lines = [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S) for line in block.splitlines()]
    lines += re.findall(r"`([^`\n]*loconet [^`\n]*)`", text)
    out = []
    for line in lines:
        m = COMMAND.search(line)
        if not m:
            continue
        try:
            args = shlex.split(SHELL_END.split(m.group(1))[0], comments=True)
        except ValueError:  # an inline span cut inside quotes
            continue
        # `loconet bench` alone names the family of benchmarks in prose, not a command.
        if args and args != ["bench"] and not any(PLACEHOLDER.search(a) for a in args):
            out.append(shlex.join(args))
    return out


COMMANDS = sorted({(p.name, c) for p in DOCS for c in quoted_commands(p)})


def test_the_docs_quote_many_commands():
    assert len(COMMANDS) >= 100  # the extraction still finds them (it would otherwise check nothing)


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d}: {c}"[:120] for d, c in COMMANDS])
def test_a_quoted_command_parses(doc, command):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(shlex.split(command))
        except SystemExit as exc:
            assert not exc.code, f"{doc}: loconet {command}: {err.getvalue().strip().splitlines()[-1]}"
