"""The base of every codec: the ``Codec`` class, ``CodecConfig`` specs, the registry, the zstd stage and the checks.

Codec modules import this one: the dense codecs (:mod:`collectives.codecs.dense`), the sparse one
(:mod:`collectives.codecs.sparse`), a plugin's, and :mod:`collectives.codecs.kernels` for :class:`QuantizedChunk`.
Everyone else imports the facade :mod:`collectives.codecs`, which imports this module and the built-in codecs' modules
and registers the built-ins with their classes; the wire layouts, limits and error bounds are documented there.

Why the registry is here but :func:`make_codec` is not: :class:`CodecConfig` checks a spec against the registry and
``Codec(config)`` picks the registered class, so the registry must live below the codec classes. It holds the
built-ins only once the facade has run, though, so the functions that build or ask a codec by name
(``make_codec``, ``needs_feedback``, ``error_bound``) are the facade's alone: whoever can call them has imported the
facade, and with it every built-in. Nothing here builds a ``CodecConfig`` at import time (a default config is the
spec ``"none"``, parsed on use), and this module imports no codec module, so there is no import cycle, lazy or not.

A codec is a :class:`Codec` subclass: ``raw_size``, ``_encode_raw`` and ``_decode_raw`` (see the class); the base
checks input, runs the zstd stage and error feedback, and encodes a GPU tensor on the host unless the subclass
overrides the device path, as the dense codecs do.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from collectives.errors import CodecError, ConfigError, NonFiniteError
from collectives.zstdframes import BadFrame, read_frame

__all__ = [
    "Codec",
    "CodecConfig",
    "CodecKind",
    "QuantizedChunk",
    "ThreadState",
    "as_config",
    "check_finite",
    "check_numel",
    "codec_kind",
    "codec_names",
    "count_nonfinite",
    "nonfinite_error",
    "register_codec",
]

DEFAULT_BLOCK_SIZE = 64
MAX_BLOCK_SIZE = 1 << 20
MAX_ZSTD_LEVEL = 22

# zstd frame header (at most 18 bytes) plus the 4-byte checksum.
_ZSTD_FRAME_OVERHEAD = 22

# Decoding reads payloads (read-only bytes from gRPC) through torch views that it never
# writes; torch warns about such views. Ignored for this module's calls only.
READ_ONLY_WARNING = "The given NumPy array is not writable"
warnings.filterwarnings("ignore", message=READ_ONLY_WARNING, category=UserWarning, module=__name__)

_SPEC_RE = re.compile(r"(?P<name>[a-z0-9]+)(?:/(?P<block>[0-9]+))?(?P<zstd>\+zstd(?P<level>[0-9]+)?)?")


@dataclass(frozen=True)
class CodecKind:
    """A registered codec: its name, its class (or a plugin's ``"module:Class"``, imported on first use), what
    ``/N`` means for it (None: it takes none), and whether ``+zstd`` applies."""

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


# Filled at import time only (the built-ins by collectives.codecs, a plugin in its own module); read-only after.
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


def codec_names() -> tuple[str, ...]:
    """Every codec a spec may name, in registration order."""
    return tuple(_KINDS)


def codec_kind(name: str) -> CodecKind:
    """The registered codec called name; ConfigError naming the registered ones otherwise."""
    kind = _KINDS.get(name)
    if kind is None:
        raise ConfigError(f"unknown codec {name!r}: use one of {', '.join(_KINDS)}")
    return kind


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
        # Named as the codec names its /N (topk's is "keep 1 in N", not a block size).
        _check_int(f"{self.name}/N ({kind.param or 'block size'})", self.block_size, 1, MAX_BLOCK_SIZE)
        _check_int("zstd_level", self.zstd_level, 0, MAX_ZSTD_LEVEL)
        if self.zstd_level and not kind.zstd:
            raise ConfigError(f"codec {self.name!r} does not take +zstd (its payload is already compact): drop it")

    @classmethod
    def parse(cls, text: str) -> CodecConfig:
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


def as_config(config: CodecConfig | str) -> CodecConfig:
    """The CodecConfig itself, or a spec string parsed; ConfigError for anything else."""
    if isinstance(config, CodecConfig):
        return config
    if isinstance(config, str):
        return CodecConfig.parse(config)
    raise ConfigError(f"codec config must be a CodecConfig or a string, got {type(config).__name__}")


def _zstd_bound(size: int) -> int:
    """ZSTD_COMPRESSBOUND from zstd.h (worst case for incompressible input)."""
    small = ((128 << 10) - size) >> 11 if size < (128 << 10) else 0
    return size + (size >> 8) + small


class ThreadState:
    """Per-thread zstd contexts and grow-only scratch buffers of one codec."""

    def __init__(self, level: int) -> None:
        self.cctx = zstandard.ZstdCompressor(level=level, write_checksum=True) if level else None
        self.dctx = zstandard.ZstdDecompressor() if level else None
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, key: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A scratch tensor of n elements for key, reused (and grown) from call to call."""
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 1), dtype=dtype)
            self._buffers[key] = buf
        return buf[:n]


def check_numel(numel: object, least: int = 0) -> None:
    """Refuse an element count that is not an int of at least ``least`` (a bool is refused too) with CodecError."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < least:
        what = "non-negative" if least == 0 else "positive" if least == 1 else f">= {least}"
        raise CodecError(f"numel must be a {what} integer, got {numel!r}")


def count_nonfinite(x: torch.Tensor) -> int:
    """How many elements of x are NaN or Inf."""
    return int(x.numel() - torch.isfinite(x).sum().item())


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError if the fp32 tensor x holds NaN or Inf; ``what`` names it in the message."""
    # A sum is one cheap pass; it is finite whenever every element is, so the exact
    # (slower) count runs only when something may be wrong (or the sum overflowed).
    if math.isfinite(float(x.sum())):
        return
    bad = count_nonfinite(x)
    if bad:
        raise NonFiniteError(
            f"{what} hold {bad} NaN or Inf value(s) out of {x.numel()}: "
            "find where they come from (loss scale, learning rate, data)"
        )


def nonfinite_error(x: torch.Tensor) -> NonFiniteError:
    """The error an encoder raises for x, which holds NaN or Inf (the message counts them)."""
    count = count_nonfinite(x)
    return NonFiniteError(
        f"tensor to encode holds {count} non-finite value(s) (NaN or Inf) out of {x.numel()}; "
        "nothing was encoded: find where the NaN/Inf comes from (loss scale, learning rate, data)"
    )


@dataclass(frozen=True)
class QuantizedChunk:
    """A blockwise-quantised payload kept as received (checked, not decoded): value i is
    ``q[i] * scales[i // block]`` in fp32, q[i] being ``values[i]`` (int8) or, with ``nibbles``,
    nibble i of ``values`` minus 8 (int4: element 2k in byte k's low nibble, 2k + 1 in its high one)."""

    numel: int
    block: int
    scales: torch.Tensor  # fp32, one per block (the last block may be partial); a copy, aligned
    values: np.ndarray  # int8, numel of them (uint8, (numel + 1) // 2, with nibbles); a view of the payload
    nibbles: bool = False


class Codec:
    """Encodes 1-D float32 tensors (on any device) to bytes and decodes them to CPU; build one with make_codec().

    Instances are thread-safe: zstd contexts and scratch buffers are per thread (each thread keeps
    scratch about the size of the largest payload it encoded, reused by the next call).
    """

    config: CodecConfig
    # A codec that drops most of its input (sparse) sets this: its senders should keep an error-feedback residual.
    NEEDS_FEEDBACK = False

    def __new__(cls, config: CodecConfig | str = "none", **options: object) -> Codec:
        if cls is Codec:
            cls = codec_kind(as_config(config).name).load()
        return super().__new__(cls)

    def __init__(self, config: CodecConfig | str = "none") -> None:
        if sys.byteorder != "little":
            raise CodecError("loconet codecs need a little-endian host (the wire format is little-endian)")
        self.config = as_config(config)
        self._tls = threading.local()

    @property
    def reduces_quantized(self) -> bool:
        """Whether an owner may keep this codec's payloads as received (:meth:`keep_quantized`) and reduce
        straight from them (``Kernels.reduce_quantized``) instead of decoding each into a row first."""
        return False

    def keep_quantized(self, payload: bytes | bytearray | memoryview, numel: int) -> QuantizedChunk:
        """Check an untrusted payload of ``numel`` elements and return it undecoded (only where
        :attr:`reduces_quantized`); raises CodecError as :meth:`decode` would."""
        raise NotImplementedError(f"{self.config} payloads are decoded, not kept quantised")

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
        check_numel(numel)
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
    # By default a tensor on a GPU is copied to the host and encoded there, so any codec works wherever the model
    # is; one that quantises on the GPU (the dense codecs, dense.DeviceEncoded) overrides both.

    def _encode_on_device(self, x: torch.Tensor, copy: bool) -> bytes | memoryview:
        """encode() of a checked tensor that is not on the CPU."""
        return self._finish(self._encode_raw(x.cpu(), self._state()), copy)

    def _encode_with_feedback_on_device(self, x: torch.Tensor, res: torch.Tensor, copy: bool) -> bytes | memoryview:
        """encode_with_feedback() of checked tensors that are not on the CPU; ``res`` is updated on its device."""
        target = torch.add(x, res).cpu()
        st = self._state()
        raw = self._encode_raw(target, st)  # raises before residual is touched
        payload = self._finish(raw, copy)
        decoded = torch.empty_like(target)
        if target.numel():
            self._decode_raw(raw.numpy(), target.numel(), decoded, st)
        res.copy_(target.sub_(decoded))
        return payload

    # -- shared plumbing ---------------------------------------------------------

    def _state(self) -> ThreadState:
        st = getattr(self._tls, "state", None)
        if st is None:
            st = self._tls.state = ThreadState(self.config.zstd_level)
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
        try:
            return read_frame(payload, range(expected, expected + 1), self._state().dctx)
        except BadFrame as exc:
            raise CodecError(str(exc)) from None

    # -- per-codec work (subclasses) ---------------------------------------------

    def _encode_raw(self, x: torch.Tensor, st: ThreadState) -> torch.Tensor:
        """Validate contiguous ``x`` and return its raw payload as a uint8 tensor (may be scratch)."""
        raise NotImplementedError

    def _decode_raw(self, raw: np.ndarray, numel: int, out: torch.Tensor, st: ThreadState) -> None:
        """Decode a raw payload of the right length into contiguous ``out`` (numel > 0)."""
        raise NotImplementedError
