"""Codecs on the tensor's own device: the raw payload of a GPU tensor computed where it lives.

A pseudo-gradient on a GPU is quantised there so that only the encoded bytes cross PCIe (4-8x fewer
than fp32). The functions here are plain vectorised torch, so they run on any device (and are tested
on the CPU), and they produce the same raw (pre-zstd) bytes as the CPU encoder of
:mod:`collectives.codecs.dense`, bit for bit.

Parity comes from doing the same fp32 operations in the same order as the CPU path:

* absmax per block is ``maximum(amax, -amin) + 0.0`` (the + 0.0 makes the scale of an all-zero block
  +0.0 on every device, as the CPU encoder does); the partial last block is reduced on its own, as on
  the CPU, so no padding enters a reduction.
* ``scale = absmax / qmax`` divides by a device tensor: CUDA turns a division by a Python scalar into
  a multiplication by its reciprocal, which can differ in the last bit.
* The CPU quantises each segment of ``_seg_blocks`` whole blocks (and the partial last block) in one
  go and takes the divide-and-clamp path for the whole segment if any block in it is tiny
  (0 < absmax < 2**-100), else multiplies by ``reciprocal(scale)``. ``round(x / s)`` and
  ``round(x * (1 / s))`` differ near ties, so the choice is made per CPU segment here too.

Errors (NaN/Inf, values too large for the format) are the CPU encoder's, with the same messages.
:mod:`collectives.codecs.dense` dispatches GPU tensors here, so this module imports no codec module: it
repeats the few format constants it needs (a test checks they are the CPU codec's).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Protocol

import torch

from collectives.errors import CodecError, ConfigError, NonFiniteError

__all__ = ["CodecConfigLike", "decode_raw_on_device", "encode_raw_on_device", "encode_throughput", "synchronize"]

# Constants of the wire formats, shared by every encoder (the CPU codecs of collectives/codecs/dense.py and
# collectives/codecs/sparse.py import them from here, the lowest of the codec modules).
# ~2 MB of fp32 per segment: large enough that per-op overhead is amortised, small enough that the temporaries
# of one segment stay in L2/L3.
SEGMENT_ELEMS = 1 << 19
# Below this absmax, 1/scale may overflow or the scale be subnormal: such blocks take a (rare) slower path that
# divides by the scale and clamps.
TINY_ABSMAX = 2.0**-100
FLT_MAX = float(torch.finfo(torch.float32).max)
_FLOAT_DTYPES = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_OVERFLOW = {"none": math.inf, "fp16": 65520.0, "bf16": (2.0 - 2.0**-8) * 2.0**127}
_QMAX = {"int8": 127, "int4": 7}
# The largest block scale for which every storable q times the scale is finite (int8 may hold -128, int4 -8).
SCALE_LIMIT = {"int8": FLT_MAX / 128, "int4": FLT_MAX / 8}


class CodecConfigLike(Protocol):
    """What is read of a :class:`collectives.codecs.base.CodecConfig` (this module imports no codec module)."""

    @property
    def name(self) -> str:
        """The codec's name: one of the dense built-ins."""
        ...

    @property
    def block_size(self) -> int:
        """Elements per int8/int4 block (unused by none, fp16, bf16)."""
        ...


def _seg_blocks(block: int) -> int:
    """Blocks per CPU segment: the formula of ``dense.BlockCodec.__init__`` (a test guards against drift)."""
    return max(4, (SEGMENT_ELEMS // block) & ~3)


def _check_tensor(x: object, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() != 1:
        got = (f"dtype={x.dtype}, shape={tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__)
        raise CodecError(f"{what} must be a 1-D float32 tensor, got {got}: flatten it and convert with .float()")
    if x.device.type == "meta":
        raise CodecError(f"{what} is on the meta device, which holds no data: move it to a real device first")
    return x.detach().contiguous()


def _check_name(config: CodecConfigLike) -> str:
    name = getattr(config, "name", None)
    if name not in _FLOAT_DTYPES and name not in _QMAX:
        raise ConfigError(f"unknown codec {name!r}: pass a collectives.codecs.CodecConfig")
    return name


def _nonfinite_error(x: torch.Tensor) -> NonFiniteError:
    count = int(x.numel() - torch.isfinite(x).sum().item())
    return NonFiniteError(
        f"tensor to encode holds {count} non-finite value(s) (NaN or Inf) out of {x.numel()}; "
        "nothing was encoded: find where the NaN/Inf comes from (loss scale, learning rate, data)"
    )


def _float_range_error(name: str, x: torch.Tensor) -> CodecError:
    """The CPU encoder's error: that of the first ~2 MB segment holding NaN/Inf or a value out of range."""
    for e0 in range(0, x.numel(), SEGMENT_ELEMS):
        lo, hi = (float(v) for v in torch.aminmax(x[e0:e0 + SEGMENT_ELEMS]))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return _nonfinite_error(x)
        if max(-lo, hi) >= _OVERFLOW[name]:
            return CodecError(
                f"value of magnitude {max(-lo, hi):.6g} overflows {name} (max {_OVERFLOW[name]:.6g}); "
                "use the bf16 or int8 codec, or scale the tensor down"
            )
    raise AssertionError("no segment is out of range")  # the caller saw one


def _quantize_rows(xs: torch.Tensor, qmax: float, seg_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and rounded q (float) of the (k, w) blocks ``xs``, deciding divide-vs-multiply per seg_rows rows."""
    k = xs.shape[0]
    absmax = torch.maximum(torch.amax(xs, 1), torch.amin(xs, 1).neg_()).add_(0.0)  # -0.0 -> +0.0, as on the CPU
    scales = torch.div(absmax, torch.full((1,), qmax, dtype=torch.float32, device=xs.device))
    mult = torch.reciprocal(scales).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # all-zero blocks: 0, not inf
    t = torch.mul(xs, mult[:, None]).round_()  # |q| <= qmax up to rounding here, so no clamp (as on the CPU)
    tiny = (absmax > 0) & (absmax < TINY_ABSMAX)
    if bool(tiny.any()):  # one sync per call; tiny blocks are rare
        pad = -k % seg_rows
        seg_tiny = torch.nn.functional.pad(tiny, (0, pad)).view(-1, seg_rows).any(1)
        divide = seg_tiny.repeat_interleave(seg_rows)[:k]
        divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
        td = torch.div(xs, divisor[:, None]).round_().clamp_(-qmax, qmax)
        t = torch.where(divide[:, None], td, t)
    return scales, t


def encode_raw_on_device(config: CodecConfigLike, x: torch.Tensor) -> torch.Tensor:
    """Raw (pre-zstd) payload of 1-D float32 ``x`` as a uint8 tensor on x's device (for ``none`` a view of x).

    Bit-identical to the CPU encoder; raises the same NonFiniteError / CodecError on the same inputs.
    """
    name = _check_name(config)
    x = _check_tensor(x, "tensor to encode")
    n, dev = x.numel(), x.device
    if name in _FLOAT_DTYPES:
        if n:
            lo, hi = (float(v) for v in torch.aminmax(x))
            if not (math.isfinite(lo) and math.isfinite(hi) and max(-lo, hi) < _OVERFLOW[name]):
                raise _float_range_error(name, x)
        return x.to(_FLOAT_DTYPES[name]).view(torch.uint8)  # for none, a view of x

    b = config.block_size
    nfull, tail = divmod(n, b)
    nb = nfull + (tail > 0)
    values_size = n if name == "int8" else (n + 1) // 2
    raw = torch.empty(4 * nb + values_size, dtype=torch.uint8, device=dev)
    if n == 0:
        return raw
    scales = raw[:4 * nb].view(torch.float32)
    # int8 q go straight into the payload; int4 q into a buffer (plus a pad element) that is packed below.
    if name == "int8":
        q = raw[4 * nb:].view(torch.int8)
    else:
        q = torch.empty(n + n % 2, dtype=torch.int8, device=dev)
    qmax, limit = float(_QMAX[name]), SCALE_LIMIT[name]
    if nfull:
        s, t = _quantize_rows(x[:nfull * b].view(nfull, b), qmax, _seg_blocks(b))
        scales[:nfull] = s
        q[:nfull * b].view(nfull, b).copy_(t)
    if tail:  # the CPU quantises the partial block on its own, so it decides its path alone
        s, t = _quantize_rows(x[nfull * b:].view(1, tail), qmax, 1)
        scales[nfull:] = s
        q[nfull * b:n].view(1, tail).copy_(t)
    top = float(scales.max())
    if not top <= limit:  # also true for NaN: NaN/Inf make their block's scale NaN/Inf
        if not math.isfinite(top) or not bool(torch.isfinite(x).all()):
            raise _nonfinite_error(x)
        raise CodecError(
            f"value of magnitude {top * qmax:.6g} is too large for {name} (max {limit * qmax:.6g}); "
            "scale the tensor down"
        )
    if name == "int8":
        return raw
    if n % 2:
        q[n] = -8  # the unused high nibble is stored as 0
    # Nibble = (q & 15) ^ 8 == q + 8 (mod 16), as the CPU packs it; element 2k goes in the low nibble.
    nib = q.view(torch.uint8).bitwise_and_(15).bitwise_xor_(8)
    torch.bitwise_or(nib[0::2], nib[1::2].bitwise_left_shift(4), out=raw[4 * nb:])
    return raw


def decode_raw_on_device(config: CodecConfigLike, raw: torch.Tensor, numel: int, out: torch.Tensor) -> None:
    """Decode a trusted raw payload (from encode_raw_on_device) of ``numel`` elements into ``out`` on its device.

    Bitwise equal to the CPU decode. No validation of the payload's content: use Codec.decode for received data.
    """
    name = _check_name(config)
    if (not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.numel() != numel
            or not out.is_contiguous() or out.device.type == "meta"):
        raise CodecError(f"out must be a contiguous float32 tensor of {numel} elements on a real device")
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or raw.dim() != 1:
        raise CodecError("raw must be a 1-D uint8 tensor, as encode_raw_on_device returns")
    if numel == 0:
        return
    raw = raw.to(out.device)
    if name in _FLOAT_DTYPES:
        out.copy_(raw.view(_FLOAT_DTYPES[name]))
        return
    b = config.block_size
    nfull, tail = divmod(numel, b)
    nb = nfull + (tail > 0)
    scales = raw[:4 * nb].view(torch.float32)
    values = raw[4 * nb:]
    if name == "int8":
        out.copy_(values.view(torch.int8))
    else:
        q = torch.stack([values.bitwise_and(15), values.bitwise_right_shift(4)], 1).view(-1)[:numel]
        out.copy_(q).sub_(8)  # nibble - 8 is exact in fp32
    if nfull:
        out[:nfull * b].view(nfull, b).mul_(scales[:nfull, None])
    if tail:
        out[nfull * b:].mul_(scales[nfull])


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device (nothing to wait for elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode_throughput(config: CodecConfigLike, x: torch.Tensor, repeats: int = 5) -> float:
    """Median input bytes per second of encoding x where it lives (encode_raw_on_device), with the copy to the host.

    The zstd stage, host work common to every path, is not included. On a CPU tensor this times the device
    path run on the CPU; the CPU encoder's own throughput is that of ``Codec.encode``.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats {repeats!r} is invalid: use an integer of at least 1")
    x = _check_tensor(x, "tensor to time")
    if x.numel() == 0:
        raise ConfigError("cannot time the encoding of an empty tensor: give it at least one element")
    encode_raw_on_device(config, x).cpu()  # warm-up (kernels, allocator); raises on bad input
    rates = []
    for _ in range(repeats):
        synchronize(x.device)  # work queued before (producing x) is not ours to time
        start = time.perf_counter()
        encode_raw_on_device(config, x).cpu()  # the copy to the host waits for the encoding
        elapsed = time.perf_counter() - start
        rates.append(4 * x.numel() / max(elapsed, 1e-9))
    return float(statistics.median(rates))
