"""Tensor codecs: 1-D float32 tensors to bytes and back, for the data plane.

A codec is named ``<name>[/<block>][+zstd[<level>]]``, for example ``int8``,
``int4/128+zstd3`` or ``bf16+zstd`` (see :class:`CodecConfig`). Every payload
is little-endian and carries no header: dtype, element count and codec travel
in the protobuf fields around it, so the receiver always knows ``numel`` and
checks the payload against it before using a byte of it.

Wire layouts (``n`` elements, ``B`` = block size, ``nb = ceil(n / B)``):

``none``
    ``4n`` bytes: the raw fp32 values. The round trip is bit-exact (-0.0 too).
``fp16`` / ``bf16``
    ``2n`` bytes: IEEE half / bfloat16 values, rounded to nearest even.
``int8``
    ``4 * nb`` bytes of fp32 scales (one per block of ``B`` elements, the last
    block may be partial), then ``n`` int8 values ``q`` in [-127, 127];
    ``x ~= q * scale`` with ``scale = absmax(block) / 127``. An all-zero block
    has scale +0.0 and decodes to exact zeros.
``int4``
    ``4 * nb`` bytes of fp32 scales, then ``ceil(n / 2)`` bytes holding two
    4-bit values each: element ``2k`` in the low nibble, ``2k + 1`` in the
    high nibble, each stored as ``q + 8`` with ``q`` in [-7, 7] and
    ``scale = absmax(block) / 7``. The unused high nibble of an odd-length
    payload is written as 0 and ignored on decode.
``+zstd``
    The payload above compressed as one zstd frame that declares its content
    size and carries a checksum.

``n == 0`` encodes to an empty payload (a frame of zero bytes with zstd).

Codecs are registered by name (:func:`register_codec`: one module plus one
line; the built-ins at the top of this module). ``topk`` is the sparse codec
of :mod:`collectives.sparse` (``topk/N`` keeps 1 entry in N per block, its
payloads are self-describing and variable in size; it asks its senders for
error feedback with ``NEEDS_FEEDBACK`` and codes the all-gather's reduced
parts with :meth:`Codec.encode_reduced`). What follows is about the dense
codecs of ``CODEC_NAMES``.

Encoding refuses NaN/Inf (:class:`NonFiniteError`) and values the format cannot
hold (fp16 beyond 65504, bf16 beyond 3.39e38, int8/int4 blocks whose scale would
exceed ``FLT_MAX / 128`` or ``FLT_MAX / 8``). Decoding treats the payload as
hostile: wrong sizes, corrupt or oversized zstd frames, negative, non-finite or
out-of-range scales and non-finite values raise :class:`CodecError` without
allocating more than ``raw_size(numel)``. Scales are capped so that every
representable ``q`` times its scale is finite, so an accepted int payload never
decodes to Inf.

Devices: a tensor on a GPU (any non-CPU device) is encoded where it lives by
:mod:`collectives.devicecodec`, so only the encoded bytes cross PCIe; its raw
payload is byte-identical to the CPU encoder's, and the zstd stage runs on the
host as for CPU tensors. Error feedback keeps the residual on the tensor's
device. Decoding is CPU-only: payloads arrive from the network on the host.

Speed: each codec walks the tensor in cache-sized segments of whole blocks
(one Python iteration per ~2 MB, never per block or element) so the several
vectorised passes per segment hit cache instead of memory, and it reuses
per-thread scratch buffers instead of allocating per call.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import zstandard

from collectives.devicecodec import decode_raw_on_device, encode_raw_on_device
from collectives.errors import CodecError, ConfigError, NonFiniteError

__all__ = [
    "CODEC_NAMES",
    "Codec",
    "CodecConfig",
    "CodecKind",
    "check_finite",
    "codec_kind",
    "codec_names",
    "error_bound",
    "make_codec",
    "needs_feedback",
    "register_codec",
]

# The built-in dense codecs: element-wise or block quantisers with a device encoder and an error bound.
# Every codec a spec may name, these and the registered ones (the sparse ``topk``), is in codec_names().
CODEC_NAMES = ("none", "fp16", "bf16", "int8", "int4")
DEFAULT_BLOCK_SIZE = 64
MAX_BLOCK_SIZE = 1 << 20
MAX_ZSTD_LEVEL = 22

# ~2 MB of fp32 per segment: large enough that per-op overhead is amortised,
# small enough that the temporaries of one segment stay in L2/L3.
_SEGMENT_ELEMS = 1 << 19
_FLT_MAX = float(np.finfo(np.float32).max)
# Below this absmax, 1/scale may overflow or the scale be subnormal: such blocks take
# a (rare) slower path that divides by the scale and clamps.
_TINY_ABSMAX = 2.0**-100
# Worst-case fp32 rounding in scale, 1/scale, x/scale and q*scale adds ~4.6e-5
# (relative) to the half-step error; see error_bound().
_INT_BOUND_SLACK = 1e-4
_SUBNORMAL_SLACK = 2.0**-140
# Smallest magnitudes that round to Inf in the 16-bit formats.
_FP16_OVERFLOW = 65520.0
_BF16_OVERFLOW = (2.0 - 2.0**-8) * 2.0**127
# zstd frame header (at most 18 bytes) plus the 4-byte checksum.
_ZSTD_FRAME_OVERHEAD = 22

# Decoding reads payloads (read-only bytes from gRPC) through torch views that it never
# writes; torch warns about such views. Ignored for this module's calls only.
_READ_ONLY_WARNING = "The given NumPy array is not writable"
warnings.filterwarnings("ignore", message=_READ_ONLY_WARNING, category=UserWarning, module=__name__)

_SPEC_RE = re.compile(r"(?P<name>[a-z0-9]+)(?:/(?P<block>[0-9]+))?(?P<zstd>\+zstd(?P<level>[0-9]+)?)?")


@dataclass(frozen=True)
class CodecKind:
    """A registered codec: its name, its class (or ``"module:Class"``, imported on first use, so a codec module
    may import this one), what ``/N`` means for it (None: it takes none), and whether ``+zstd`` applies."""

    name: str
    factory: type[Codec] | str
    param: str | None = None
    zstd: bool = True

    def load(self) -> type[Codec]:
        """The codec class (imports its module the first time)."""
        if isinstance(self.factory, str):
            module, _, attr = self.factory.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.factory


# Filled at import time only (the built-ins at the end of this module, a plugin in its own module); read-only after.
_KINDS: dict[str, CodecKind] = {}


def register_codec(name: str, factory: type[Codec] | str, *, param: str | None = None, zstd: bool = True) -> None:
    """Register a codec under ``name`` for specs and ``--codec``: one module plus this one line.

    ``factory`` is a Codec subclass or ``"package.module:Class"``; ``param`` says what ``NAME/N`` means
    (stored in ``CodecConfig.block_size``; None: the codec takes no ``/N``); ``zstd``: whether ``+zstd`` applies.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9]*", name):
        raise ConfigError(f"codec name {name!r} is invalid: use lowercase letters and digits, starting with a letter")
    existing = _KINDS.get(name)
    if existing is not None and existing.factory != factory:
        raise ConfigError(f"codec name {name!r} is already registered ({existing.factory!r}); choose another name")
    _KINDS[name] = CodecKind(name, factory, param, zstd)


# The built-ins, by "module:Class" so they are known before their classes (and a default CodecConfig) exist.
for _name in ("none", "fp16", "bf16"):
    register_codec(_name, "collectives.codecs:_FloatCodec")
register_codec("int8", "collectives.codecs:_Int8Codec", param="block size")
register_codec("int4", "collectives.codecs:_Int4Codec", param="block size")
register_codec("topk", "collectives.sparse:TopKCodec", param="keep 1 in N", zstd=False)


def codec_names() -> tuple[str, ...]:
    """Every codec a spec may name, in registration order."""
    return tuple(_KINDS)


def codec_kind(name: str) -> CodecKind:
    """The registered codec called name; ConfigError naming the registered ones otherwise."""
    kind = _KINDS.get(name)
    if kind is None:
        raise ConfigError(f"unknown codec {name!r}: use one of {', '.join(_KINDS)}")
    return kind


def needs_feedback(config: CodecConfig | str) -> bool:
    """Whether a codec drops so much that its senders should keep an error-feedback residual (sparse codecs)."""
    return codec_kind(_as_config(config).name).load().NEEDS_FEEDBACK


def _spec_help() -> str:
    with_param = [f"{k.name}/N ({k.param})" for k in _KINDS.values() if k.param]
    return (f"use NAME[/N][+zstd[LEVEL]] with NAME one of {', '.join(_KINDS)}; /N applies to "
            f"{', '.join(with_param)}; e.g. 'int8', 'int4/128+zstd', 'bf16+zstd3', 'topk/32'")


def _check_int(what: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"codec {what} {value!r} is invalid: use an integer from {lo} to {hi}")


@dataclass(frozen=True)
class CodecConfig:
    """Which codec to use: name, int8/int4 block size and zstd level (0 = no zstd)."""

    name: str = "none"
    block_size: int = DEFAULT_BLOCK_SIZE
    zstd_level: int = 0

    def __post_init__(self) -> None:
        """Validate every field; ConfigError names the bad value and what is allowed."""
        kind = codec_kind(self.name)
        _check_int("block_size", self.block_size, 1, MAX_BLOCK_SIZE)
        _check_int("zstd_level", self.zstd_level, 0, MAX_ZSTD_LEVEL)
        if self.zstd_level and not kind.zstd:
            raise ConfigError(f"codec {self.name!r} does not take +zstd (its payload is already compact): drop it")

    @classmethod
    def parse(cls, text: str) -> "CodecConfig":
        """Parse ``name[/N][+zstd[level]]`` (e.g. ``int4/128+zstd3``, ``topk/32``); ConfigError on anything else."""
        if not isinstance(text, str):
            raise ConfigError(f"codec spec must be a string, got {type(text).__name__}")
        m = _SPEC_RE.fullmatch(text.strip().lower())
        if m is None or m["name"] not in _KINDS:
            raise ConfigError(f"codec spec {text!r} is invalid: {_spec_help()}")
        name = m["name"]
        if m["block"] is not None and not _KINDS[name].param:
            with_param = ", ".join(k.name for k in _KINDS.values() if k.param)
            raise ConfigError(f"codec spec {text!r} is invalid: a /N applies only to {with_param}")
        if m["zstd"] and not _KINDS[name].zstd:
            raise ConfigError(f"codec spec {text!r} is invalid: {name} does not take +zstd (its payload is already "
                              "compact); drop it")
        block = int(m["block"]) if m["block"] is not None else DEFAULT_BLOCK_SIZE
        if m["level"] is not None:
            level = int(m["level"])
            if level < 1:
                raise ConfigError(f"codec spec {text!r} is invalid: zstd level must be 1..{MAX_ZSTD_LEVEL}")
        else:
            level = 1 if m["zstd"] else 0
        return cls(name=name, block_size=block, zstd_level=level)

    def __str__(self) -> str:
        """Canonical spec, the inverse of parse(): e.g. ``int4/128+zstd3`` (the default /64 not shown)."""
        text = self.name
        if _KINDS[self.name].param and self.block_size != DEFAULT_BLOCK_SIZE:
            text += f"/{self.block_size}"
        if self.zstd_level == 1:
            text += "+zstd"
        elif self.zstd_level > 1:
            text += f"+zstd{self.zstd_level}"
        return text


def _as_config(config: CodecConfig | str) -> CodecConfig:
    if isinstance(config, CodecConfig):
        return config
    if isinstance(config, str):
        return CodecConfig.parse(config)
    raise ConfigError(f"codec config must be a CodecConfig or a string, got {type(config).__name__}")


def _zstd_bound(size: int) -> int:
    """ZSTD_COMPRESSBOUND from zstd.h (worst case for incompressible input)."""
    small = ((128 << 10) - size) >> 11 if size < (128 << 10) else 0
    return size + (size >> 8) + small


class _ThreadState:
    """Per-thread zstd contexts and grow-only scratch buffers of one codec."""

    def __init__(self, level: int) -> None:
        self.cctx = zstandard.ZstdCompressor(level=level, write_checksum=True) if level else None
        self.dctx = zstandard.ZstdDecompressor() if level else None
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, key: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 1), dtype=dtype)
            self._buffers[key] = buf
        return buf[:n]


def _count_nonfinite(x: torch.Tensor) -> int:
    return int(x.numel() - torch.isfinite(x).sum().item())


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError if the fp32 tensor x holds NaN or Inf; ``what`` names it in the message."""
    # A sum is one cheap pass; it is finite whenever every element is, so the exact
    # (slower) count runs only when something may be wrong (or the sum overflowed).
    if math.isfinite(float(x.sum())):
        return
    bad = _count_nonfinite(x)
    if bad:
        raise NonFiniteError(
            f"{what} hold {bad} NaN or Inf value(s) out of {x.numel()}: "
            "find where they come from (loss scale, learning rate, data)"
        )


def _nonfinite_error(x: torch.Tensor) -> NonFiniteError:
    count = _count_nonfinite(x)
    return NonFiniteError(
        f"tensor to encode holds {count} non-finite value(s) (NaN or Inf) out of {x.numel()}; "
        "nothing was encoded: find where the NaN/Inf comes from (loss scale, learning rate, data)"
    )


class Codec:
    """Encodes 1-D float32 tensors (on any device) to bytes and decodes them to CPU; build one with make_codec().

    Instances are thread-safe: zstd contexts and scratch buffers are per thread (each thread keeps
    scratch about the size of the largest payload it encoded, reused by the next call).
    """

    config: CodecConfig
    # A codec that drops most of its input (sparse) sets this: its senders should keep an error-feedback residual.
    NEEDS_FEEDBACK = False

    def __new__(cls, config: CodecConfig | str = CodecConfig()) -> "Codec":
        if cls is Codec:
            cls = codec_kind(_as_config(config).name).load()
        return super().__new__(cls)

    def __init__(self, config: CodecConfig | str = CodecConfig()) -> None:
        if sys.byteorder != "little":
            raise CodecError("loconet codecs need a little-endian host (the wire format is little-endian)")
        self.config = _as_config(config)
        self._tls = threading.local()

    def __repr__(self) -> str:
        """Class and canonical spec, e.g. ``_Int8Codec('int8+zstd')``."""
        return f"{type(self).__name__}({str(self.config)!r})"

    # -- sizes ---------------------------------------------------------------

    def raw_size(self, numel: int) -> int:
        """Exact payload size in bytes before the zstd stage for ``numel`` elements."""
        raise NotImplementedError

    def max_payload_size(self, numel: int) -> int:
        """Upper bound on ``len(encode(x))`` for ``numel`` elements (what a receiver may buffer)."""
        raw = self.raw_size(numel)
        return _zstd_bound(raw) + _ZSTD_FRAME_OVERHEAD if self.config.zstd_level else raw

    def chunk_numel(self, chunk_bytes: int) -> int:
        """Elements per network chunk so that a chunk's raw payload fits chunk_bytes."""
        return max(1, chunk_bytes // max(1, self.raw_size(1)))

    # -- public encode / decode ------------------------------------------------

    def encode(self, x: torch.Tensor, *, copy: bool = True) -> bytes | memoryview:
        """Encode a 1-D float32 tensor; NonFiniteError on NaN/Inf, CodecError if it does not fit.

        A tensor on a GPU is quantised there (same bytes as on the CPU). With ``copy=False`` the result
        may be a view of scratch memory (or of ``x``) that the next encode on this thread overwrites:
        for callers that copy it right away (message framing).
        """
        x = self._check_input(x)
        if x.device.type != "cpu":
            return self._encode_on_device(x, copy)
        return self._finish(self._encode_raw(x, self._state()), copy)

    def decode(self, payload: bytes | bytearray | memoryview, numel: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode an untrusted payload of ``numel`` elements into ``out`` (or a new tensor) and return it.

        Raises CodecError if the payload does not fit; ``out`` may then hold partial data.
        """
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise CodecError(f"numel must be a non-negative integer, got {numel!r}")
        self._check_out(out, numel)
        raw = self._unwrap(payload, numel)  # before allocating anything for the result
        target = torch.empty(numel, dtype=torch.float32) if out is None else out.detach()
        dst = target if target.is_contiguous() else torch.empty(numel, dtype=torch.float32)
        if numel:
            self._decode_raw(raw, numel, dst, self._state())
        if dst is not target:
            target.copy_(dst)
        return out if out is not None else target

    def encode_reduced(self, x: torch.Tensor, *, copy: bool = True) -> bytes | memoryview:
        """Encode a reduced part for the all-gather (decoded by :meth:`decode` like any payload).

        Dense codecs encode it as any tensor; a sparse codec must not drop what the scatter delivered.
        """
        return self.encode(x, copy=copy)

    def encode_with_feedback(
        self, x: torch.Tensor, residual: torch.Tensor | None, *, copy: bool = True
    ) -> bytes | memoryview:
        """Encode ``x + residual`` and set ``residual`` in place to ``(x + residual) - decoded`` (error feedback).

        ``residual`` lives on x's device and is updated there; None encodes ``x`` as :meth:`encode` does.
        ``copy`` as for :meth:`encode`.
        """
        if residual is None:
            return self.encode(x, copy=copy)
        x = self._check_input(x)
        if (not isinstance(residual, torch.Tensor) or residual.dtype != torch.float32
                or residual.shape != x.shape or residual.device != x.device):
            raise CodecError(f"residual must be a float32 tensor of shape {tuple(x.shape)} on {x.device} (x's device)")
        res = residual.detach()
        if x.device.type != "cpu":
            return self._encode_with_feedback_on_device(x, res, copy)
        target = torch.add(x, res)
        st = self._state()
        raw = self._encode_raw(target, st)  # raises before residual is touched
        payload = self._finish(raw, copy)
        # Decode the pre-zstd bytes we still hold: same values as decode(payload), no decompression.
        dst = res if res.is_contiguous() else torch.empty_like(target)
        if x.numel():
            self._decode_raw(raw.numpy(), x.numel(), dst, st)
        torch.sub(target, dst, out=dst)
        if dst is not res:
            res.copy_(dst)
        return payload

    # -- device path (tests call these with CPU tensors to check them against the CPU path) -----

    def _encode_on_device(self, x: torch.Tensor, copy: bool) -> bytes | memoryview:
        """encode() of a checked tensor via the device encoder: only the raw payload is copied to the host."""
        return self._finish(encode_raw_on_device(self.config, x).cpu(), copy)

    def _encode_with_feedback_on_device(self, x: torch.Tensor, res: torch.Tensor, copy: bool) -> bytes | memoryview:
        """encode_with_feedback() of checked tensors via the device encoder; ``res`` is updated on its device."""
        target = torch.add(x, res)
        raw = encode_raw_on_device(self.config, target)  # raises before residual is touched
        payload = self._finish(raw.cpu(), copy)
        dst = res if res.is_contiguous() else torch.empty_like(target)
        if x.numel():
            decode_raw_on_device(self.config, raw, x.numel(), dst)
        torch.sub(target, dst, out=dst)
        if dst is not res:
            res.copy_(dst)
        return payload

    # -- shared plumbing ---------------------------------------------------------

    def _state(self) -> _ThreadState:
        st = getattr(self._tls, "state", None)
        if st is None:
            st = self._tls.state = _ThreadState(self.config.zstd_level)
        return st

    @staticmethod
    def _check_input(x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise CodecError(f"can only encode a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.float32 or x.dim() != 1:
            raise CodecError(
                f"can only encode a 1-D float32 tensor, got dtype={x.dtype}, shape={tuple(x.shape)}, "
                f"device={x.device}: flatten it and convert with .float()"
            )
        if x.device.type == "meta":
            raise CodecError("cannot encode a tensor on the meta device, which holds no data: "
                             "move it to a real device (CPU or GPU) first")
        return x.detach().contiguous()

    @staticmethod
    def _check_out(out: torch.Tensor | None, numel: int) -> None:
        if out is not None and (not isinstance(out, torch.Tensor) or out.dtype != torch.float32
                                or out.dim() != 1 or out.numel() != numel or out.device.type != "cpu"):
            raise CodecError(f"out must be a 1-D float32 CPU tensor of {numel} elements")

    def _finish(self, raw: torch.Tensor, copy: bool) -> bytes | memoryview:
        """Turn the raw payload (a uint8 tensor) into the bytes that go on the wire."""
        arr = raw.numpy()
        cctx = self._state().cctx
        if cctx is not None:
            return cctx.compress(arr)
        return arr.tobytes() if copy else memoryview(arr)

    def _unwrap(self, payload: bytes | bytearray | memoryview, numel: int) -> np.ndarray:
        """Check an untrusted payload and return its raw (decompressed) bytes as a uint8 array."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise CodecError(f"payload must be bytes, bytearray or memoryview, got {type(payload).__name__}")
        expected = self.raw_size(numel)
        try:
            data = memoryview(payload).cast("B")
        except (TypeError, ValueError) as exc:
            raise CodecError(f"payload is not a contiguous byte buffer: {exc}") from None
        if self.config.zstd_level:
            limit = self.max_payload_size(numel)
            if data.nbytes > limit:
                raise CodecError(f"{self.config} payload of {data.nbytes} bytes exceeds the "
                                 f"{limit}-byte maximum for {numel} elements")
            data = memoryview(self._decompress(data, expected))
        if data.nbytes != expected:
            raise CodecError(f"{self.config} payload has {data.nbytes} bytes, expected {expected} for {numel} elements")
        # numpy reads the (often read-only) buffer without a copy and without torch's non-writable warning.
        return np.frombuffer(data, dtype=np.uint8)

    def _decompress(self, payload: memoryview, expected: int) -> bytes:
        # The frame header is checked first: decompress() trusts a declared content size when allocating.
        try:
            params = zstandard.get_frame_parameters(payload)
        except zstandard.ZstdError as exc:
            raise CodecError(f"payload is not a zstd frame: {exc}") from None
        if params.content_size != expected:
            size = params.content_size
            declared = "no content size" if size >= zstandard.CONTENTSIZE_ERROR else f"{size} bytes"
            raise CodecError(f"zstd frame declares {declared}, expected {expected} bytes")
        if not params.has_checksum:
            raise CodecError("zstd frame has no checksum; loconet frames always carry one")
        try:
            data = self._state().dctx.decompress(payload, max_output_size=max(expected, 1), allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise CodecError(f"corrupt zstd frame: {exc}") from None
        if len(data) != expected:
            raise CodecError(f"zstd frame decompressed to {len(data)} bytes, expected {expected}")
        return data

    # -- per-codec work (subclasses) ---------------------------------------------

    def _encode_raw(self, x: torch.Tensor, st: _ThreadState) -> torch.Tensor:
        """Validate contiguous ``x`` and return its raw payload as a uint8 tensor (may be scratch)."""
        raise NotImplementedError

    def _decode_raw(self, raw: np.ndarray, numel: int, out: torch.Tensor, st: _ThreadState) -> None:
        """Decode a raw payload of the right length into contiguous ``out`` (numel > 0)."""
        raise NotImplementedError


class _FloatCodec(Codec):
    """none / fp16 / bf16: element-wise casts."""

    def __init__(self, config: CodecConfig | str = CodecConfig()) -> None:
        super().__init__(config)
        self._dtype = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.config.name]
        self._width = 4 if self._dtype == torch.float32 else 2
        self._overflow = {"none": math.inf, "fp16": _FP16_OVERFLOW, "bf16": _BF16_OVERFLOW}[self.config.name]

    def raw_size(self, numel: int) -> int:
        """Exact payload size in bytes before the zstd stage for ``numel`` elements."""
        return self._width * numel

    def _check_range(self, lo: float, hi: float, whole: torch.Tensor) -> None:
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise _nonfinite_error(whole)
        if max(-lo, hi) >= self._overflow:
            raise CodecError(
                f"value of magnitude {max(-lo, hi):.6g} overflows {self.config.name} (max {self._overflow:.6g}); "
                "use the bf16 or int8 codec, or scale the tensor down"
            )

    def _encode_raw(self, x: torch.Tensor, st: _ThreadState) -> torch.Tensor:
        n = x.numel()
        if self._dtype == torch.float32:
            if n:
                lo, hi = torch.aminmax(x)
                self._check_range(float(lo), float(hi), x)
            return x.view(torch.uint8)
        raw = st.buffer("raw", 2 * n, torch.uint8)
        half = raw.view(self._dtype)
        for e0 in range(0, n, _SEGMENT_ELEMS):
            xs = x[e0:e0 + _SEGMENT_ELEMS]
            lo, hi = torch.aminmax(xs)
            self._check_range(float(lo), float(hi), x)
            half[e0:e0 + _SEGMENT_ELEMS].copy_(xs)
        return raw

    def _decode_raw(self, raw: np.ndarray, numel: int, out: torch.Tensor, st: _ThreadState) -> None:
        w = self._width
        out_bytes = out.view(torch.uint8).numpy()
        seg = min(numel, _SEGMENT_ELEMS)
        scratch = None if w == 4 else st.buffer("half", w * seg, torch.uint8)
        for e0 in range(0, numel, seg):
            e1 = min(e0 + seg, numel)
            o = out[e0:e1]
            if scratch is None:
                np.copyto(out_bytes[w * e0:w * e1], raw[w * e0:w * e1])
            else:
                # memcpy into torch-owned (aligned, writable) memory, then torch's fast cast.
                s = scratch[:w * (e1 - e0)]
                np.copyto(s.numpy(), raw[w * e0:w * e1])
                o.copy_(s.view(self._dtype))
            lo, hi = torch.aminmax(o)
            if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
                raise CodecError(
                    f"{self.config} payload holds {_count_nonfinite(o)} non-finite value(s) in elements "
                    f"{e0}..{e1 - 1}; the sender is broken or the data was corrupted"
                )


class _BlockCodec(Codec):
    """Blockwise symmetric absmax quantisation (int8, int4): fp32 scales, then the quantised values."""

    qmax: int  # largest |q| the encoder produces
    scale_limit: float  # largest scale for which every storable q times the scale is finite

    def __init__(self, config: CodecConfig | str = CodecConfig()) -> None:
        super().__init__(config)
        b = self.config.block_size
        self._block = b
        # A block count per segment that is a multiple of 4 starts every segment on a multiple of
        # 4 elements, so int4 segments begin on whole (pairs of) bytes.
        self._seg_blocks = max(4, (_SEGMENT_ELEMS // b) & ~3)

    def _values_size(self, numel: int) -> int:
        raise NotImplementedError

    def chunk_numel(self, chunk_bytes: int) -> int:
        """Elements per network chunk: whole quantization blocks whose raw payload fits chunk_bytes."""
        return max(1, chunk_bytes // max(1, self.raw_size(self._block))) * self._block

    def raw_size(self, numel: int) -> int:
        """Exact payload size in bytes before the zstd stage for ``numel`` elements."""
        return 4 * (-(-numel // self._block)) + self._values_size(numel)

    def _segments(self, numel: int) -> Iterator[tuple[int, int, int]]:
        """Yield (first block, end block, tail length) per segment; the last one owns the partial block."""
        nfull, tail = divmod(numel, self._block)
        b0 = 0
        while True:
            b1 = min(b0 + self._seg_blocks, nfull)
            if b1 == nfull:
                yield b0, b1, tail
                return
            yield b0, b1, 0
            b0 = b1

    def _quantize(self, xs: torch.Tensor, scales: torch.Tensor, q: torch.Tensor, st: _ThreadState) -> None:
        """Quantise the (k, w) view ``xs`` (one block per row): write its k scales and int8 q into ``q``."""
        k, w = xs.shape
        qmax = float(self.qmax)
        # Two plain reductions beat abs()+amax and aminmax(dim) here; the second one reads from cache.
        absmax = torch.amax(xs, 1, out=st.buffer("amax", k, torch.float32))
        neg_min = torch.amin(xs, 1, out=st.buffer("amin", k, torch.float32)).neg_()
        # + 0.0 turns -0.0 into +0.0: maximum's pick between -0.0 and +0.0 varies with SIMD width and device,
        # so an all-zero block always gets the scale +0.0 (and the device encoder the same bytes).
        torch.maximum(absmax, neg_min, out=absmax).add_(0.0)
        torch.div(absmax, qmax, out=scales)
        t = st.buffer("tmp", k * w, torch.float32).view(k, w)
        mult = st.buffer("mult", k, torch.float32)
        smallest = float(absmax.min())  # NaN (checked by the caller) takes the multiply path
        if smallest < _TINY_ABSMAX and bool(((absmax > 0) & (absmax < _TINY_ABSMAX)).any()):
            # Rare: 1/scale may overflow or the scale be subnormal; divide by the scale (1 for
            # all-zero blocks) and clamp, so what is sent matches what the receiver computes.
            torch.where(scales > 0, scales, torch.ones_like(scales), out=mult)
            torch.div(xs, mult[:, None], out=t)
            t.round_().clamp_(-qmax, qmax)
        else:
            torch.reciprocal(scales, out=mult)
            if smallest < _TINY_ABSMAX:
                mult.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # all-zero blocks: 0 * 0, not 0 * inf = NaN
            torch.mul(xs, mult[:, None], out=t)
            t.round_()  # |x / scale| <= 127 (7) up to rounding, so no clamp is needed
        q.copy_(t)

    def _quantize_segment(self, x: torch.Tensor, scales: torch.Tensor, q: torch.Tensor,
                          b0: int, b1: int, tail: int, st: _ThreadState) -> None:
        """Quantise blocks b0..b1 (plus the partial tail) into ``q``, which is indexed from block b0."""
        b = self._block
        full = (b1 - b0) * b
        e0 = b0 * b
        if full:
            self._quantize(x[e0:e0 + full].view(b1 - b0, b), scales[b0:b1], q[:full].view(b1 - b0, b), st)
        if tail:
            self._quantize(x[e0 + full:e0 + full + tail].view(1, tail), scales[b1:b1 + 1],
                           q[full:full + tail].view(1, tail), st)

    def _encode_raw(self, x: torch.Tensor, st: _ThreadState) -> torch.Tensor:
        n = x.numel()
        nb = -(-n // self._block)
        raw = st.buffer("raw", self.raw_size(n), torch.uint8)
        if n == 0:
            return raw
        scales = raw[:4 * nb].view(torch.float32)
        for b0, b1, tail in self._segments(n):
            self._encode_values(x, scales, raw[4 * nb:], b0, b1, tail, st)
        # Checked once at the end: NaN/Inf make their block's scale NaN/Inf, and the garbage
        # quantised meanwhile is never returned.
        top = float(scales.max())
        if not top <= self.scale_limit:  # also true for NaN
            if not math.isfinite(top) or _count_nonfinite(x):
                raise _nonfinite_error(x)
            raise CodecError(
                f"value of magnitude {top * self.qmax:.6g} is too large for {self.config.name} "
                f"(max {self.scale_limit * self.qmax:.6g}); scale the tensor down"
            )
        return raw

    def _encode_values(self, x: torch.Tensor, scales: torch.Tensor, values: torch.Tensor,
                       b0: int, b1: int, tail: int, st: _ThreadState) -> None:
        """Quantise one segment and store its values in the payload's value area."""
        raise NotImplementedError

    def _check_scales(self, raw: np.ndarray, nb: int, st: _ThreadState) -> torch.Tensor:
        scales = st.buffer("scales", nb, torch.float32)
        np.copyto(scales.view(torch.uint8).numpy(), raw[:4 * nb])  # payload may be unaligned
        lo, hi = (float(v) for v in torch.aminmax(scales))
        if not (lo >= 0.0 and hi <= self.scale_limit):  # NaN fails both
            bad = int((~((scales >= 0) & (scales <= self.scale_limit))).sum())
            raise CodecError(
                f"{self.config} payload has {bad} invalid block scale(s) (negative, NaN, Inf or above "
                f"{self.scale_limit:.6g}); the sender is broken or the data was corrupted"
            )
        return scales

    def _scale_segment(self, o: torch.Tensor, scales: torch.Tensor, b0: int, b1: int, tail: int) -> None:
        """Multiply decoded q values of one segment (in ``o``) by their block scales."""
        full = (b1 - b0) * self._block
        o[:full].view(b1 - b0, self._block).mul_(scales[b0:b1, None])
        if tail:
            o[full:].mul_(scales[b1])


class _Int8Codec(_BlockCodec):
    qmax = 127
    scale_limit = _FLT_MAX / 128  # a payload may hold q = -128

    def _values_size(self, numel: int) -> int:
        return numel

    def _encode_values(self, x, scales, values, b0, b1, tail, st) -> None:
        self._quantize_segment(x, scales, values[b0 * self._block:].view(torch.int8), b0, b1, tail, st)

    def _decode_raw(self, raw: np.ndarray, numel: int, out: torch.Tensor, st: _ThreadState) -> None:
        nb = -(-numel // self._block)
        scales = self._check_scales(raw, nb, st)
        # A read-only view of the payload (torch would warn once; see _READ_ONLY_WARNING).
        # torch's vectorised int8 -> fp32 copy is twice as fast as numpy's cast.
        q = torch.from_numpy(raw[4 * nb:].view(np.int8))
        for b0, b1, tail in self._segments(numel):
            e0, e1 = b0 * self._block, b1 * self._block + tail
            out[e0:e1].copy_(q[e0:e1])
            self._scale_segment(out[e0:e1], scales, b0, b1, tail)


class _Int4Codec(_BlockCodec):
    qmax = 7
    scale_limit = _FLT_MAX / 8  # stored nibbles decode to q in [-8, 7]

    def __init__(self, config: CodecConfig | str = CodecConfig()) -> None:
        super().__init__(config)
        # Two payload bytes (as a little-endian uint16) -> the int32 whose four bytes are their four
        # nibbles minus 8, as int8: one 256 KB gather unpacks four values (faster than shifts and masks).
        nibbles = (np.arange(1 << 16, dtype=np.uint32)[:, None] >> np.arange(0, 16, 4, dtype=np.uint32)) & 15
        table = (nibbles.astype(np.int8) - 8).view(np.int32).reshape(-1)  # row j: 4 int8 -> 1 int32
        self._unpack_table = torch.from_numpy(table.copy())

    def _values_size(self, numel: int) -> int:
        return (numel + 1) // 2

    def _encode_values(self, x, scales, values, b0, b1, tail, st) -> None:
        e0 = b0 * self._block
        m = (b1 - b0) * self._block + tail
        nib = st.buffer("nibbles", m + 1, torch.int8)
        self._quantize_segment(x, scales, nib, b0, b1, tail, st)
        if m % 2:
            nib[m] = -8  # the unused high nibble of the last byte is stored as 0
        pairs = nib[:m + m % 2].view(torch.int16)  # little-endian: element 2k is the low byte
        # Two's-complement nibble XOR 8 == q + 8 (mod 16): packs without a float "+8" pass.
        packed = torch.bitwise_and(pairs, 0x0F, out=st.buffer("packed", pairs.numel(), torch.int16))
        high = torch.bitwise_right_shift(pairs, 4, out=st.buffer("high", pairs.numel(), torch.int16))
        packed.bitwise_or_(high.bitwise_and_(0xF0)).bitwise_xor_(0x88)
        values[e0 // 2:e0 // 2 + pairs.numel()].copy_(packed)

    def _decode_raw(self, raw: np.ndarray, numel: int, out: torch.Tensor, st: _ThreadState) -> None:
        nb = -(-numel // self._block)
        scales = self._check_scales(raw, nb, st)
        packed = raw[4 * nb:]
        for b0, b1, tail in self._segments(numel):
            e0, e1 = b0 * self._block, b1 * self._block + tail
            first, nbytes = e0 // 2, (e1 - e0 + 1) // 2  # segments start on a multiple of 4 elements
            words, odd = divmod(nbytes, 2)
            idx = st.buffer("index", words + odd, torch.int32)
            idx_np = idx.numpy()
            np.copyto(idx_np[:words], packed[first:first + 2 * words].view(np.uint16), casting="unsafe")
            if odd:
                idx_np[words] = packed[first + 2 * words]  # the missing high byte reads as 0
            nib = st.buffer("nibbles", 4 * (words + odd), torch.int8)
            torch.index_select(self._unpack_table, 0, idx, out=nib.view(torch.int32))
            o = out[e0:e1]
            o.copy_(nib[:e1 - e0])
            self._scale_segment(o, scales, b0, b1, tail)


def make_codec(config: CodecConfig | str) -> Codec:
    """Build the codec for a CodecConfig or a spec string such as ``"int8+zstd"``."""
    return Codec(_as_config(config))


def _block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-element absmax of the element's block (last block may be partial)."""
    n = x.numel()
    nb = -(-n // block)
    padded = torch.zeros(nb * block, dtype=torch.float32)
    padded[:n] = x.abs()
    return padded.view(nb, block).amax(1).repeat_interleave(block)[:n]


def error_bound(config: CodecConfig, x: torch.Tensor) -> torch.Tensor:
    """Per-element bound on ``|decode(encode(x)) - x|`` for finite ``x`` (same shape as ``x``).

    int8/int4: absmax/254 and absmax/14 times (1 + 1e-4), plus 2**-140 for subnormal scales.
    """
    config = _as_config(config)
    if config.name not in CODEC_NAMES:
        raise ConfigError(f"codec {config.name!r} has no per-element error bound (it drops entries; error feedback "
                          f"carries them): bounds exist for {', '.join(CODEC_NAMES)}")
    shape = x.shape
    x = x.detach().float().reshape(-1)
    if config.name == "none":
        bound = torch.zeros_like(x)
    elif config.name == "fp16":
        bound = x.abs() * 2.0**-11 + 2.0**-25
    elif config.name == "bf16":
        bound = x.abs() * 2.0**-8 + 2.0**-134
    else:
        steps = 254.0 if config.name == "int8" else 14.0
        bound = _block_absmax(x, config.block_size) / steps * (1 + _INT_BOUND_SLACK) + _SUBNORMAL_SLACK
    return bound.reshape(shape)
