"""How a round's tensors are laid out: flattening, restoring, and cutting into parts."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def part_bounds(numel: int, n: int) -> list[tuple[int, int]]:
    """Cut [0, numel) into n contiguous parts whose sizes differ by at most one.

    Part j is owned by member j. When numel < n some parts are empty.
    """
    if n < 1:
        raise ValueError(f"a group needs at least one member, got {n}")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    cuts = [j * numel // n for j in range(n + 1)]
    return [(cuts[j], cuts[j + 1]) for j in range(n)]


def chunk_bounds(start: int, end: int, chunk_numel: int) -> list[tuple[int, int]]:
    """Cut [start, end) into consecutive ranges of at most chunk_numel elements.

    An empty range gives one empty chunk, so that an empty part still travels
    (its arrival proves the sender is alive and agrees on the round).
    """
    if chunk_numel < 1:
        raise ValueError(f"chunk_numel must be >= 1, got {chunk_numel}")
    if end <= start:
        return [(start, start)]
    return [(a, min(a + chunk_numel, end)) for a in range(start, end, chunk_numel)]


def total_numel(tensors: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """Number of elements of a tensor or of a list of tensors."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel()
    return sum(t.numel() for t in tensors)


def flatten(
    tensors: torch.Tensor | Sequence[torch.Tensor], out: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Copy tensors into one contiguous 1-D fp32 tensor: ``out`` if given, else a new one on ``device``."""
    items = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    n = sum(t.numel() for t in items)
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=device)
    elif out.numel() != n or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 tensor of {n} elements")
    offset = 0
    for t in items:
        k = t.numel()
        out[offset : offset + k].copy_(t.detach().reshape(-1))
        offset += k
    return out


def shared_device(tensors: torch.Tensor | Sequence[torch.Tensor]) -> torch.device:
    """The device every tensor is on, or the CPU when they are on several (or there are none)."""
    devices = {t.device for t in ([tensors] if isinstance(tensors, torch.Tensor) else tensors)}
    return devices.pop() if len(devices) == 1 else torch.device("cpu")


def unflatten_like(
    flat: torch.Tensor, like: torch.Tensor | Sequence[torch.Tensor], device: torch.device | str | None = None
) -> torch.Tensor | list[torch.Tensor]:
    """Cut a flat tensor back into tensors shaped and typed like ``like``, placed like it or on ``device``."""
    if isinstance(like, torch.Tensor):
        return flat.view(like.shape).to(device=device or like.device, dtype=like.dtype)
    out: list[torch.Tensor] = []
    offset = 0
    for t in like:
        n = t.numel()
        out.append(flat[offset : offset + n].view(t.shape).to(device=device or t.device, dtype=t.dtype))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat tensor has {flat.numel()} elements, the tensors need {offset}")
    return out
