"""Every file of the repository that the docs, the code's comments and the tests name by its path exists.

Modules move (a flat package becomes sub-packages, a long module is split): a path left behind in a doc or a
docstring sends a reader to nothing. This reads every text file git tracks for paths under the project's folders
and checks each one.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A path under one of the project's folders, ending in a file's extension, not inside a longer path or word.
NAMED_PATH = re.compile(
    r"(?<![\w/.-])((?:collectives|optimizers|peer|protos|tests|deploy|docs)/[\w/.-]*\w\.(?:py|md|proto|c|ya?ml|html|sh|toml|json))"
)
READ = (".py", ".md", ".toml", ".sh", ".yaml", ".yml", ".proto", ".c", ".html")
# Examples of a test file's name, in a README sentence and in the suite-order tests: placeholders, not files.
PLACEHOLDERS = {"tests/test_X.py", "tests/test_a.py", "tests/test_b.py", "tests/test_c.py", "tests/test_new.py",
                "tests/test_x.py"}


def tracked_text_files() -> list[str]:
    """The text files git tracks that may name a path (sources, docs, configuration, CI)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git work tree")
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [name for name in listed.split() if name.endswith(READ) or name == ".ci/run"]


def named_paths(text: str) -> set[str]:
    """The repository paths a text names."""
    return {m.group(1) for m in NAMED_PATH.finditer(text)}


def test_the_pattern_finds_paths_and_only_paths():
    text = "see `collectives/net/transport.py`, docs/membership.md#state and my_docs/x.md, peer/ (a folder)"
    assert named_paths(text) == {"collectives/net/transport.py", "docs/membership.md"}


def test_every_named_path_exists():
    missing = {}
    for name in tracked_text_files():
        for path in named_paths((ROOT / name).read_text(errors="replace")) - PLACEHOLDERS:
            if not (ROOT / path).exists():
                missing.setdefault(path, []).append(name)
    assert not missing, f"paths named but not in the repository (moved? update the text): {missing}"
