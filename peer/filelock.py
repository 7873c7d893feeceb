"""An exclusive hold on a file or folder for one process's life: an flock on a lock file that names the holder's pid.

A coordinator holds its --state-file (two would overwrite each other's round and epoch) and a peer its
--checkpoint-dir (two would overwrite each other's checkpoints). The kernel drops an flock with its process, so a
killed holder leaves none behind. (A lock on a network file system is only as good as its flock.)
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from collectives.errors import ConfigError


class ExclusiveHold:
    """Hold ``lock_path`` exclusively, or raise ConfigError: "``what`` is in use by ``holder`` (pid N): ``advice``"."""

    def __init__(self, lock_path: str | os.PathLike, what: str, holder: str, advice: str) -> None:
        self.path = Path(lock_path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"{what}: cannot open its lock {self.path} ({exc.strerror}); choose a writable "
                              "folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f" (pid {pid})" if pid.isdigit() else ""
            raise ConfigError(f"{what} is in use by {holder}{who}: {advice}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Let another process take it (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
