"""The installed package's version, as `loconet --version` and the coordinator's status document give it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """loconet's version from its installed metadata (pyproject.toml), or why there is none."""
    try:
        return version("loconet")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"
