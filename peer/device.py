"""Which device a peer trains on: ``--device`` checked, resolved to a ``torch.device``, and batches moved there.

``--device`` takes ``auto`` (CUDA when ``torch.cuda.is_available()``, else the
CPU), ``cpu``, ``cuda`` (the current CUDA device) or ``cuda:N``. Checking a
spec (``check_device_spec``) is a pure function of the string, so a config's
``__post_init__`` can refuse a typo without touching CUDA, and a config can be
written on a machine without the GPU it names. Resolving it
(``resolve_device``) asks torch what this machine has, and refuses a CUDA
device it lacks with a message saying what to use instead: that happens where
a model is built, or in a parent process before it starts its children.

Batches come from the tasks on the CPU; ``move_batch`` moves their tensors to
the model's device (asynchronously from pinned memory to CUDA, where the copy
can overlap the work queued before it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from collectives.errors import ConfigError

DEVICE_FORMS = ("auto", "cpu", "cuda", "cuda:N")
"""The forms ``--device`` accepts (N: a CUDA device index, 0 or more)."""

_SPEC = re.compile(r"^(?:auto|cpu|cuda|cuda:(?:0|[1-9][0-9]*))$")


class DeviceUnavailable(ConfigError):
    """The device asked for is a well-formed spec, but this machine does not have it."""


def check_device_spec(spec: str) -> str:
    """The spec itself when it is one of DEVICE_FORMS; ConfigError listing them otherwise. Touches no CUDA."""
    if not isinstance(spec, str) or _SPEC.match(spec) is None:
        raise ConfigError(
            f"device {spec!r} is not one of {', '.join(DEVICE_FORMS)} (N: a CUDA device number, e.g. cuda:0); "
            "auto picks CUDA when it is available, else the CPU"
        )
    return spec


def resolve_device(spec: str) -> torch.device:
    """The torch device the spec names on this machine; DeviceUnavailable when CUDA (or that CUDA device) is missing."""
    check_device_spec(spec)
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if not torch.cuda.is_available():
        # A CPU-only build of torch never sees a GPU, whatever the machine has: say which case this is.
        build = "; this torch is a CPU-only build" if torch.version.cuda is None else ""
        raise DeviceUnavailable(
            f"--device {spec}: CUDA is not available on this machine (torch.cuda.is_available() is False{build}): "
            "use --device cpu or --device auto"
        )
    if spec == "cuda":
        return torch.device("cuda")
    index = int(spec.partition(":")[2])
    count = torch.cuda.device_count()
    if index >= count:
        have = "1 CUDA device (cuda:0)" if count == 1 else f"{count} CUDA devices (cuda:0 to cuda:{count - 1})"
        raise DeviceUnavailable(
            f"--device {spec}: this machine has {have}: choose one of them, or --device cuda or --device auto"
        )
    return torch.device("cuda", index)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (then buffer); the CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model (a freshly built one), its parameters and buffers moved to device."""
    return model.to(device)


def move_batch(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor in it (through tuples, lists and dicts) on device; other values as they are.

    A copy from pinned CPU memory to CUDA is ``non_blocking``: CUDA orders it before the kernels that read it.
    """
    if isinstance(batch, torch.Tensor):
        return _move(batch, device)
    if isinstance(batch, tuple):
        moved = [move_batch(item, device) for item in batch]
        # A named tuple is rebuilt from its fields, a plain tuple from the sequence.
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if isinstance(batch, list):
        return [move_batch(item, device) for item in batch]
    if isinstance(batch, Mapping):
        moved_map = {key: move_batch(value, device) for key, value in batch.items()}
        if type(batch) is dict:
            return moved_map
        try:  # an OrderedDict and the like keep their type
            return type(batch)(moved_map)
        except TypeError:  # a mapping whose constructor takes something else (defaultdict): a plain dict
            return moved_map
    return batch


def _move(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.device == device:
        return tensor
    # is_pinned is asked only on the way to CUDA: only there does a non-blocking copy overlap anything.
    pinned = device.type == "cuda" and tensor.device.type == "cpu" and tensor.is_pinned()
    return tensor.to(device, non_blocking=pinned)
