"""Checkpoints of a peer: written atomically, the last K kept, loaded without unpickling code.

A checkpoint is one ``torch.save`` file of plain containers and tensors
(model and optimizer state dicts, counters, and what wrote it: the task and
the model's settings). A peer resumes only a checkpoint of its own task and
model, and one that its optimizer can take; any other is refused in one line
that names the checkpoint and what differs (``restore``). It is written to a temporary
file in the same folder, flushed to disk, then renamed over its final name,
so a crash mid-write never leaves a torn checkpoint. Loading uses
``torch.load(weights_only=True)``: only tensors and plain Python values.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from collectives.errors import ConfigError
from collectives.membership.roundformat import FORMAT_SEPARATOR, format_difference
from peer.filelock import ExclusiveHold

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{10})\.pt$")
# What a refusal to resume a checkpoint tells the user to do.
_INSTEAD = "start this peer with the options it was written with, or move it away to start afresh"


class CheckpointError(ConfigError):
    """A folder holds checkpoints but none can be read; the message names them and says what to do."""


def checkpoint_path(folder: Path, step: int) -> Path:
    """Where the checkpoint of a step lives."""
    return Path(folder) / f"ckpt-{step:010d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def check_checkpoint_dir(folder: str | os.PathLike) -> ExclusiveHold:
    """Make the --checkpoint-dir folder if missing, try a file in it and hold it for this peer; CheckpointError
    naming it when it is a file or takes none, ConfigError when another peer holds it. Checked before a peer joins: a
    peer found out at its first commit died holding that round, and two peers on one folder overwrote each other's
    checkpoints."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"--checkpoint-dir {folder} is a file, not a folder; name a folder (it is made if "
                              "missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ckpt-", suffix=".check", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CheckpointError(f"--checkpoint-dir {folder}: cannot write in it ({exc.strerror}); choose a writable "
                              "folder") from None
    hold = ExclusiveHold(folder / ".lock", f"--checkpoint-dir {folder}", "another peer",
                         "give each peer a folder of its own (--resume-from reads another's)")
    # Half-written checkpoints of a process killed mid-write: each as large as a checkpoint, and nothing else
    # would ever remove them (one peer per folder, so none is being written now).
    for stale in folder.glob(".ckpt-*.tmp"):
        log.info("removing %s, a checkpoint its writer did not finish", stale)
        stale.unlink(missing_ok=True)
    return hold


def save_checkpoint(folder: Path, step: int, state: dict, keep: int = 3) -> Path:
    """Write state atomically as the checkpoint of step; delete all but the newest keep (OSError if it cannot)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(folder, step)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    log.info("checkpoint %s written", final)
    return final


def _check_crcs(path: Path) -> None:
    """Raise CheckpointError when a stored entry of the checkpoint (a zip file) fails its CRC: torch.load reads
    flipped bytes as they are, and the peer would resume them."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"not a checkpoint file ({exc})") from None
    if bad is not None:
        raise CheckpointError(f"{bad} fails its CRC: the file is damaged")


def load_latest(folder: Path) -> tuple[Path, dict] | None:
    """The newest readable checkpoint in folder (path, state); None when it has none; CheckpointError if none reads."""
    found = list_checkpoints(folder)
    problems = []
    for path in reversed(found):
        try:
            _check_crcs(path)
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file: fall back to the one before
            log.warning("skipping unreadable checkpoint %s: %s", path, exc)
            problems.append(f"{path.name}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}")
    if found:
        # Starting from scratch here would silently throw the run's progress away.
        raise CheckpointError(
            f"none of the {len(found)} checkpoint(s) in {folder} can be read ({'; '.join(problems)}); "
            "move them away to start afresh, or point --checkpoint-dir elsewhere"
        )
    return None


def restore(path: Path, state: dict, task: str, model_settings: Sequence[str], model: Any, opt: Any) -> None:
    """Load a checkpoint's model and optimizer state into ``model`` and ``opt``; CheckpointError, naming the
    checkpoint and what differs, when it was written for another task or model or ``opt`` refuses its state."""
    written = state.get("task")
    if isinstance(written, str) and written and written != task:
        raise CheckpointError(f"{path} is a checkpoint of task {written!r} and this peer runs {task!r}: {_INSTEAD}")
    recorded = state.get("model_settings")  # absent from checkpoints written before it was recorded
    if isinstance(recorded, list) and all(isinstance(p, str) for p in recorded) and recorded and model_settings:
        if tuple(recorded) != tuple(model_settings):
            mine, theirs = FORMAT_SEPARATOR.join(model_settings), FORMAT_SEPARATOR.join(recorded)
            raise CheckpointError(f"{path} holds another model than this peer's "
                                  f"({format_difference(mine, theirs, 'the checkpoint')}): {_INSTEAD}")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except (ConfigError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        # torch's shape mismatch lists every parameter: its first line and first mismatch say enough.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        said = " ".join(lines[:2]) if lines else type(exc).__name__
        raise CheckpointError(f"cannot resume from {path} ({said[:400]}): {_INSTEAD}") from exc
