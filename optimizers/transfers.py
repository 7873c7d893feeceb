"""Copies between the model's device and the host, where the run's fp32 global state lives.

Every algorithm keeps the global parameters and the outer optimizer's state
in fp32 on the host (``optimizers/globalstate.py``): they change only when a
round commits, they are what a joiner fetches and a checkpoint holds, and the
data plane reads and writes host memory. The model itself may be anywhere:
the CPU, a CUDA device, in fp32, bf16 or fp16. ``DeviceTransfers`` moves the
two sides past each other:

- **pseudo-gradients** (global - local) are computed on the model's device,
  in fp32: the host's global copy goes up, the subtraction runs there, and the
  result either comes back to the host or stays on the device for a codec to
  encode there (``collectives/codecs/device.py``), so only encoded bytes cross
  the bus;
- **new global parameters** go back to the device after an outer step and
  are cast there to the model's dtype.

On CUDA the host copies sit in pinned memory, and the copies run as
``non_blocking`` copies on a side stream that first waits for the work queued
on the model's stream (the inner steps), so a sync never reads a parameter an
inner step is still writing. The host waits for the side stream before it
uses or changes what was copied; the model's stream waits for it before the
next inner step reads the new parameters.

Casts (mixed precision): the local side is read as ``p.float()``, so a bf16
or fp16 model's pseudo-gradient is exact in fp32 given its parameters; new
global parameters are rounded once, to the model's dtype, when loaded. The
globals themselves are never rounded to the model's dtype.

A model on the CPU takes none of these paths: its tensors are read and
written as before, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch


def _is_host(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


class DeviceTransfers:
    """The host<->device copies of one model's parameters (one side stream per CUDA device they use)."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.devices = sorted({p.device for p in params if not _is_host(p)}, key=str)
        self.uses_cuda = any(d.type == "cuda" for d in self.devices)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def host_copy(self, t: torch.Tensor) -> torch.Tensor:
        """A new fp32 copy of t on the host: pinned when the model uses CUDA (so copies to it can be non-blocking)."""
        host = t.detach().to(device="cpu", dtype=torch.float32).clone()
        return host.pin_memory() if self.uses_cuda else host

    def pseudo_gradients(
        self, globals_: Sequence[torch.Tensor], params: Sequence[torch.Tensor], indices: Sequence[int],
        on_device: bool = False,
    ) -> list[torch.Tensor]:
        """global - local in fp32 for the given parameters: on the host, or (on_device) where each parameter lives."""
        out: list[torch.Tensor] = []
        used: set[torch.device] = set()
        with torch.no_grad():
            for i in indices:
                p, g = params[i].detach(), globals_[i]
                if _is_host(p):
                    out.append(g - p.to(dtype=torch.float32))
                    continue
                used.add(p.device)
                with self._on_side_stream(p.device):
                    d = g.to(device=p.device, non_blocking=True)
                    d.sub_(p.to(dtype=torch.float32))
                    if not on_device:
                        host = torch.empty(d.shape, dtype=torch.float32, pin_memory=self.uses_cuda)
                        d = host.copy_(d, non_blocking=True)
                out.append(d)
            self._finish(used)
        return out

    def load(
        self, globals_: Sequence[torch.Tensor], params: Sequence[torch.Tensor], indices: Sequence[int],
        alpha: float = 0.0,
    ) -> None:
        """local = alpha * local + (1 - alpha) * global for the given parameters, cast to each parameter's dtype."""
        used: set[torch.device] = set()
        with torch.no_grad():
            for i in indices:
                p, g = params[i], globals_[i]
                if not _is_host(p):
                    used.add(p.device)
                with self._on_side_stream(p.device):
                    value = g.to(device=p.device, dtype=p.dtype, non_blocking=not _is_host(p))
                    if alpha == 0.0:
                        p.copy_(value)
                    else:
                        p.mul_(alpha).add_(value, alpha=1.0 - alpha)
            self._finish(used)

    # -- streams ----------------------------------------------------------------------

    def _on_side_stream(self, device: torch.device) -> AbstractContextManager:
        """A context running on this device's side stream, after the work already queued on its current stream."""
        if device.type != "cuda":  # the CPU and ``meta`` have no streams
            return nullcontext()
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        return torch.cuda.stream(stream)

    def _finish(self, used: set[torch.device]) -> None:
        """Wait for the side streams: the host may then read or change what was copied, the model's stream goes on."""
        for device in used:
            stream = self._streams.get(device)
            if stream is not None:
                torch.cuda.current_stream(device).wait_stream(stream)
                stream.synchronize()

