"""Native kernels: ``kernels.c`` compiled with the system C compiler on first use, called through ctypes.

The blockwise codecs (int8, int4) spend most of a peer's CPU in a round on quantising and dequantising, and
the owners of parts on weighted sums. torch does each in several passes; the C loops do it in one (int8
encoding 2.6x faster on one core, decoding 1.8x, 2.6x into memory that is not in cache), with the same bits
(tests/test_kernels.py). ctypes releases the GIL for the call, so codec threads run them in parallel.

Without a C compiler (or with ``LOCONET_NATIVE_KERNELS=0``) :func:`native_kernels` returns None and the
codecs use their torch path, which gives the same bytes more slowly; ``loconet bench codecs --json`` says
which is in use (``native_kernels``) and why not.

The shared library is cached per user (``$XDG_CACHE_HOME/loconet/kernels``, mode 0700) under a name
derived from the source, the flags and this CPU, so it is compiled once per machine, not per process.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from collectives.codecs.base import QuantizedChunk

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
# Environment switch: "0" keeps the torch path (to compare the two, or where compiling is unwanted).
DISABLE_ENV = "LOCONET_NATIVE_KERNELS"
# -march=native is tried first (the library is cached per CPU), then a portable build.
FLAG_SETS = (
    ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC"),
    ("-O3", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC"),
)
COMPILE_TIMEOUT_S = 60.0

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p


class KernelsUnavailable(RuntimeError):
    """The native kernels could not be built or loaded; the message says why (the codecs then use torch)."""


@dataclass(frozen=True)
class KernelsStatus:
    """Whether the native kernels are in use in this process, and if not, why."""

    available: bool
    detail: str  # the library's path, or the reason it is not used


class Kernels:
    """The loaded library. Each method checks the tensors' sizes and layout, then runs one C loop."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._quantize = library.loconet_quantize_blocks
        self._quantize.restype = _i64
        self._quantize.argtypes = (_ptr, _i64, _i64, ctypes.c_float, ctypes.c_float, _ptr, _ptr)
        self._dequantize = library.loconet_dequantize
        self._dequantize.restype = None
        self._dequantize.argtypes = (_ptr, _ptr, _i64, _i64, _ptr)
        self._pack_nibbles = library.loconet_pack_nibbles
        self._pack_nibbles.restype = None
        self._pack_nibbles.argtypes = (_ptr, _i64, _ptr)
        self._dequantize_nibbles = library.loconet_dequantize_nibbles
        self._dequantize_nibbles.restype = None
        self._dequantize_nibbles.argtypes = (_ptr, _ptr, _i64, _i64, _ptr)
        self._copy_finite = library.loconet_copy_finite
        self._copy_finite.restype = _i64
        self._copy_finite.argtypes = (_ptr, _i64, _ptr)
        # Only built where the compiler targets FMA (see kernels.c): None elsewhere.
        self._weighted_sum = getattr(library, "loconet_weighted_sum", None)
        if self._weighted_sum is not None:
            self._weighted_sum.restype = None
            self._weighted_sum.argtypes = (_ptr, _i64, _ptr, _ptr, _i64, _i64, _ptr)

        self._reduce_quantized = getattr(library, "loconet_reduce_quantized", None)
        if self._reduce_quantized is not None:
            self._reduce_quantized.restype = _i64
            self._reduce_quantized.argtypes = (_i64, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _ptr)

    @property
    def has_weighted_sum(self) -> bool:
        """Whether :meth:`weighted_sum` is available (the library was built for a CPU with FMA)."""
        return self._weighted_sum is not None

    def quantize_blocks(self, x: torch.Tensor, qmax: int, tiny: float, scales: torch.Tensor, q: torch.Tensor) -> bool:
        """Quantise scales.numel() blocks of x (absmax, scale, int8 q); True if a block's absmax is in (0, tiny).

        Then nothing written may be used: the caller quantises that segment on its torch divide path.
        """
        nblocks = scales.numel()
        if nblocks == 0 or x.numel() % nblocks:
            raise ValueError(f"x must be whole blocks for {nblocks} scales, got {x.numel()} elements")
        block = x.numel() // nblocks
        _require(x, torch.float32, nblocks * block, "x")
        _require(scales, torch.float32, nblocks, "scales")
        _require(q, torch.int8, nblocks * block, "q")
        return bool(self._quantize(x.data_ptr(), nblocks, block, float(qmax), tiny, scales.data_ptr(), q.data_ptr()))

    def dequantize(self, q: np.ndarray, scales: torch.Tensor, block: int, out: torch.Tensor) -> None:
        """out = q * scales[block] in fp32, for scales.numel() blocks of ``block`` int8 values in ``q``."""
        nblocks = scales.numel()
        _require_array(q, np.int8, nblocks * block, "q")
        _require(scales, torch.float32, nblocks, "scales")
        _require(out, torch.float32, nblocks * block, "out")
        self._dequantize(q.ctypes.data, scales.data_ptr(), nblocks, block, out.data_ptr())

    def pack_nibbles(self, q: torch.Tensor, out: torch.Tensor) -> None:
        """out = q's int8 values (each in [-8, 7]) packed two to a byte, as int4 payloads store them."""
        n = q.numel()
        _require(q, torch.int8, n, "q")
        _require(out, torch.uint8, (n + 1) // 2, "out")
        self._pack_nibbles(q.data_ptr(), n, out.data_ptr())

    def dequantize_nibbles(self, packed: np.ndarray, scales: torch.Tensor, block: int, out: torch.Tensor) -> None:
        """out = (nibble - 8) * scales[block] in fp32, for out.numel() values packed two to a byte in ``packed``."""
        n = out.numel()
        if block < 1:
            raise ValueError(f"block must be positive, got {block}")
        _require_array(packed, np.uint8, (n + 1) // 2, "packed")
        _require(scales, torch.float32, -(-n // block), "scales")
        _require(out, torch.float32, n, "out")
        self._dequantize_nibbles(packed.ctypes.data, scales.data_ptr(), n, block, out.data_ptr())

    def copy_finite(self, src: torch.Tensor, dst: torch.Tensor) -> bool:
        """dst = src (contiguous fp32 of one size); whether every value is finite."""
        _require(src, torch.float32, dst.numel(), "src")
        _require(dst, torch.float32, src.numel(), "dst")
        return bool(self._copy_finite(src.data_ptr(), src.numel(), dst.data_ptr()))

    def weighted_sum(self, rows: torch.Tensor, coef: torch.Tensor, order: Sequence[int], out: torch.Tensor) -> None:
        """out = sum_t coef[t] * rows[order[t]] in fp32, in that order (torch's mul, then add_ with alpha, on FMA).

        ``rows`` is [n, l] with unit column stride (a column slice of a buffer is fine); ``out`` may be a row.
        """
        if self._weighted_sum is None:
            raise ValueError("this kernel library has no weighted_sum (built without FMA): check has_weighted_sum")
        n, length = rows.shape
        if rows.dtype != torch.float32 or rows.device.type != "cpu" or (length > 1 and rows.stride(1) != 1):
            raise ValueError(f"rows must be a CPU float32 [n, l] tensor with unit column stride, got {rows.dtype} "
                             f"strides {rows.stride()}")
        if not order or any(not 0 <= r < n for r in order):
            raise ValueError(f"order must list rows in 0..{n - 1}, got {list(order)}")
        _require(coef, torch.float32, len(order), "coef")
        _require(out, torch.float32, length, "out")
        idx = torch.tensor(list(order), dtype=torch.int64)
        self._weighted_sum(rows.data_ptr(), rows.stride(0), idx.data_ptr(), coef.data_ptr(), len(order), length,
                           out.data_ptr())


    @property
    def has_reduce_quantized(self) -> bool:
        """Whether :meth:`reduce_quantized` is available (built, as the weighted sum, only with FMA)."""
        return self._reduce_quantized is not None

    def reduce_quantized(self, sources: Sequence[torch.Tensor | QuantizedChunk], coef: torch.Tensor,
                         out: torch.Tensor) -> bool:
        """out = sum_t coef[t] * sources[t] in fp32, in that order, a source being fp32 values or an int8 or int4
        chunk dequantised on the fly: the bits of decoding into rows, then :meth:`weighted_sum`.

        Returns whether every fp32 source value is finite (if not, out is undefined). The chunks share one block.
        """
        if self._reduce_quantized is None:
            raise ValueError("this kernel library has no reduce_quantized (built without FMA): check "
                             "has_reduce_quantized")
        n = out.numel()
        k = len(sources)
        if k == 0:
            raise ValueError("need at least one source, got none")
        if n == 0:
            return True  # an empty part (a round of fewer elements than members): a sum of nothing, finite
        _require(coef, torch.float32, k, "coef")
        _require(out, torch.float32, n, "out")
        floats, values, scales = (_ptr * k)(), (_ptr * k)(), (_ptr * k)()
        nibbles = (ctypes.c_uint8 * k)()
        blocks = set()
        for t, src in enumerate(sources):
            if isinstance(src, torch.Tensor):
                _require(src, torch.float32, n, f"source {t}")
                floats[t] = src.data_ptr()
                continue
            q = src.values
            if src.numel != n:
                raise ValueError(f"source {t} must hold {n} values, got {src.numel}")
            dtype, size = (np.uint8, (n + 1) // 2) if src.nibbles else (np.int8, n)
            _require_array(q, dtype, size, f"source {t}'s values")
            _require(src.scales, torch.float32, -(-n // src.block), f"source {t}'s scales")
            values[t], scales[t], nibbles[t] = q.ctypes.data, src.scales.data_ptr(), src.nibbles
            blocks.add(src.block)
        if len(blocks) > 1:
            raise ValueError(f"the quantised sources must share one block size, got {sorted(blocks)}")
        block = blocks.pop() if blocks else 1
        if block < 1:
            raise ValueError(f"block must be positive, got {block}")
        return bool(self._reduce_quantized(k, floats, values, nibbles, scales, coef.data_ptr(), block, n,
                                           out.data_ptr()))


def _require(t: torch.Tensor, dtype: torch.dtype, numel: int, name: str) -> None:
    # A wrong size here would be a write past a buffer in C: refuse it rather than trust the caller.
    if t.dtype != dtype or t.numel() != numel or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor of {numel} elements, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")


def _require_array(a: np.ndarray, dtype: type, size: int, name: str) -> None:
    # As _require, for the payload views the codecs hand over as numpy arrays.
    if a.dtype != dtype or a.ndim != 1 or not a.flags.c_contiguous or a.size != size:
        raise ValueError(f"{name} must be {size} contiguous {np.dtype(dtype)} values, got {a.size} {a.dtype}")


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the machine and the CPU's model and feature flags."""
    parts = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    parts.append(line.strip())
                if line.strip() == "":
                    break  # the first processor's block is enough
    except OSError:
        pass
    return "\n".join(parts)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "loconet" / "kernels"


def _library_name(source: bytes, flags: tuple[str, ...], fingerprint: bytes) -> str:
    """The cached library's file name: a hash of what its machine code depends on."""
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), fingerprint]))
    return f"codec-{key.hexdigest()[:24]}.so"


def _check_private(path: Path) -> None:
    """KernelsUnavailable unless path is this user's and no one else may write it: we load code from there."""
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise KernelsUnavailable(
            f"{path} is not private to this user (owner uid {info.st_uid}, mode {oct(info.st_mode & 0o777)}): "
            "remove it or make it yours with mode 0700, or set XDG_CACHE_HOME to a directory of your own"
        )


def _check_cache(cache: Path) -> None:
    """KernelsUnavailable unless cache is private and no other user may rename it or a directory above it.

    As ssh's StrictModes: each directory up to / must be this user's or root's, and one that others may write
    (as /tmp) must have its sticky bit, so they cannot move our directory aside and put theirs in its place."""
    _check_private(cache)
    # Both the path as given and where its links lead: a link in a directory others may change is theirs to redirect.
    given, real = Path(os.path.abspath(cache)), Path(os.path.realpath(cache))
    for parent in dict.fromkeys([*given.parents, *real.parents]):
        info = parent.stat()
        shared = info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX
        if info.st_uid not in (os.getuid(), 0) or shared:
            raise KernelsUnavailable(
                f"{parent}, above the kernel cache {cache}, may be changed by other users (owner uid "
                f"{info.st_uid}, mode {oct(info.st_mode & 0o7777)}): set XDG_CACHE_HOME to a directory of your own"
            )


def build_kernels(compiler: str | None = None, cache_dir: Path | None = None) -> Path:
    """The path of the compiled library, compiling it into ``cache_dir`` first if it is not there yet.

    Raises KernelsUnavailable (no compiler, a failed build, an unwritable cache).
    """
    cc = compiler or os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise KernelsUnavailable(f"no C compiler ({cc!r} is not on PATH): install gcc or set CC")
    source = SOURCE.read_bytes()
    cache = cache_dir or _cache_dir()
    fingerprint = _cpu_fingerprint().encode()
    builds = [(flags, cache / _library_name(source, flags, fingerprint)) for flags in FLAG_SETS]
    # Any build already cached first: where -march=native fails, the portable one is not preceded by a
    # failing compile in every process.
    for _, path in builds:
        if path.exists():
            _check_cache(cache)
            _check_private(path)
            return path
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_cache(cache)
    except OSError as exc:
        raise KernelsUnavailable(f"cannot write the kernel cache {cache}: {exc}") from None
    errors = []
    for flags, path in builds:
        try:
            # Several peers may start at once: each builds its own file and renames it into place.
            fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
            os.close(fd)
        except OSError as exc:
            raise KernelsUnavailable(f"cannot write the kernel cache {cache}: {exc}") from None
        try:
            done = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                  timeout=COMPILE_TIMEOUT_S, check=False)
            if done.returncode == 0:
                os.replace(tmp, path)
                log.info("compiled the codec kernels into %s", path)
                return path
            errors.append(f"{cc} {' '.join(flags)}: {done.stderr.strip()[-300:]}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{cc} {' '.join(flags)}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise KernelsUnavailable("could not compile the codec kernels: " + " | ".join(errors))


def load_kernels(compiler: str | None = None, cache_dir: Path | None = None) -> Kernels:
    """Build (if needed) and load the kernels; KernelsUnavailable if that fails."""
    path = build_kernels(compiler, cache_dir)
    try:
        return Kernels(ctypes.CDLL(str(path)), path)
    except (OSError, AttributeError) as exc:
        raise KernelsUnavailable(f"cannot load {path}: {exc}") from None


@functools.cache
def _process_kernels() -> tuple[Kernels | None, KernelsStatus]:
    # Once per process: every codec instance shares the loaded library.
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return None, KernelsStatus(False, f"disabled by {DISABLE_ENV}")
    try:
        kernels = load_kernels()
    except KernelsUnavailable as exc:
        log.info("codecs use their torch path (slower, same bytes): %s", exc)
        return None, KernelsStatus(False, str(exc))
    return kernels, KernelsStatus(True, str(kernels.path))


def native_kernels() -> Kernels | None:
    """This process's kernels, built and loaded on first call; None where they are unavailable."""
    return _process_kernels()[0]


def kernels_status() -> KernelsStatus:
    """Whether :func:`native_kernels` gives kernels, and the library's path or the reason it does not."""
    return _process_kernels()[1]
