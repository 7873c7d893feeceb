"""Ports on this machine for tests: one nothing listens on."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on (bound once by the OS, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_address() -> str:
    """``127.0.0.1:PORT`` where nothing listens: a connection there is refused."""
    return f"127.0.0.1:{free_port()}"
