"""The dense codecs: element-wise casts (``none``, ``fp16``, ``bf16``) and blockwise absmax quantisation
(``int8``, ``int4``).

Their wire layouts, limits and error bounds are in :mod:`collectives.codecs`, which registers them;
:mod:`collectives.codecs.base` runs what every codec shares (checking input, the zstd stage, error feedback), and
this module imports it, never the facade. A class here only turns a contiguous fp32 tensor into its raw payload
and back (``_encode_raw`` / ``_decode_raw``), and quantises a GPU tensor where it lives (``DeviceEncoded``,
through :mod:`collectives.codecs.device`).

Speed: each codec walks the tensor in cache-sized segments of whole blocks (one Python iteration per ~2 MB,
never per block or element) so the several vectorised passes per segment hit cache instead of memory, and it
reuses per-thread scratch buffers instead of allocating per call. Where a C compiler is available, the
blockwise codecs quantise block by block in one C loop and int8 dequantises in another
(:mod:`collectives.codecs.kernels`), with the same bytes; the rare tiny-block path and int4's nibble packing stay
in torch.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from collectives.codecs.base import (
    READ_ONLY_WARNING,
    Codec,
    CodecConfig,
    QuantizedChunk,
    ThreadState,
    check_numel,
    count_nonfinite,
    nonfinite_error,
)
from collectives.codecs.device import (
    SCALE_LIMIT,
    SEGMENT_ELEMS,
    TINY_ABSMAX,
    decode_raw_on_device,
    encode_raw_on_device,
)
from collectives.codecs.kernels import native_kernels
from collectives.errors import CodecError

# Smallest magnitudes that round to Inf in the 16-bit formats.
_FP16_OVERFLOW = 65520.0
_BF16_OVERFLOW = (2.0 - 2.0**-8) * 2.0**127

# Decoding reads payloads (read-only bytes from gRPC) through torch views that it never writes.
warnings.filterwarnings("ignore", message=READ_ONLY_WARNING, category=UserWarning, module=__name__)


class DeviceEncoded(Codec):
    """A codec that quantises a GPU tensor where it lives (collectives/codecs/device.py): only the raw payload is
    copied to the host, the same bytes as the CPU path's."""

    def _encode_on_device(self, x: torch.Tensor, copy: bool) -> bytes | memoryview:
        return self._finish(encode_raw_on_device(self.config, x).cpu(), copy)

    def _encode_with_feedback_on_device(self, x: torch.Tensor, res: torch.Tensor, copy: bool) -> bytes | memoryview:
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


class FloatCodec(DeviceEncoded):
    """none / fp16 / bf16: element-wise casts."""

    def __init__(self, config: CodecConfig | str = "none") -> None:
        super().__init__(config)
        self._dtype = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.config.name]
        self._width = 4 if self._dtype == torch.float32 else 2
        self._overflow = {"none": math.inf, "fp16": _FP16_OVERFLOW, "bf16": _BF16_OVERFLOW}[self.config.name]

    def raw_size(self, numel: int) -> int:
        """Exact payload size in bytes before the zstd stage for ``numel`` elements."""
        return self._width * numel

    def _check_range(self, lo: float, hi: float, whole: torch.Tensor) -> None:
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise nonfinite_error(whole)
        if max(-lo, hi) >= self._overflow:
            raise CodecError(
                f"value of magnitude {max(-lo, hi):.6g} overflows {self.config.name} (max {self._overflow:.6g}); "
                "use the bf16 or int8 codec, or scale the tensor down"
            )

    def _encode_raw(self, x: torch.Tensor, st: ThreadState) -> torch.Tensor:
        n = x.numel()
        if self._dtype == torch.float32:
            if n:
                lo, hi = torch.aminmax(x)
                self._check_range(float(lo), float(hi), x)
            return x.view(torch.uint8)
        raw = st.buffer("raw", 2 * n, torch.uint8)
        half = raw.view(self._dtype)
        for e0 in range(0, n, SEGMENT_ELEMS):
            xs = x[e0:e0 + SEGMENT_ELEMS]
            lo, hi = torch.aminmax(xs)
            self._check_range(float(lo), float(hi), x)
            half[e0:e0 + SEGMENT_ELEMS].copy_(xs)
        return raw

    def _decode_raw(self, raw: np.ndarray, numel: int, out: torch.Tensor, st: ThreadState) -> None:
        w = self._width
        out_bytes = out.view(torch.uint8).numpy()
        seg = min(numel, SEGMENT_ELEMS)
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
                    f"{self.config} payload holds {count_nonfinite(o)} non-finite value(s) in elements "
                    f"{e0}..{e1 - 1}; the sender is broken or the data was corrupted"
                )


class BlockCodec(DeviceEncoded):
    """Blockwise symmetric absmax quantisation (int8, int4): fp32 scales, then the quantised values."""

    qmax: int  # largest |q| the encoder produces
    nibbles = False  # values packed two to a byte (int4), else one int8 each
    scale_limit: float  # largest scale for which every storable q times the scale is finite

    def __init__(self, config: CodecConfig | str = "none", *, native: bool = True) -> None:
        """``native=False`` keeps the torch path even where the C kernels are available (same bytes)."""
        super().__init__(config)
        b = self.config.block_size
        self._block = b
        self._kernels = native_kernels() if native else None
        # A block count per segment that is a multiple of 4 starts every segment on a multiple of
        # 4 elements, so int4 segments begin on whole (pairs of) bytes.
        self._seg_blocks = max(4, (SEGMENT_ELEMS // b) & ~3)

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

    def _quantize(self, xs: torch.Tensor, scales: torch.Tensor, q: torch.Tensor, st: ThreadState) -> None:
        """Quantise the (k, w) view ``xs`` (one block per row): write its k scales and int8 q into ``q``."""
        k, w = xs.shape
        qmax = float(self.qmax)
        # The C loop does all of the multiply path below, block by block; a tiny block sends the segment here.
        if self._kernels is not None and not self._kernels.quantize_blocks(xs, self.qmax, TINY_ABSMAX, scales, q):
            return
        # Two plain reductions beat abs()+amax and aminmax(dim) here; the second one reads from cache.
        absmax = torch.amax(xs, 1, out=st.buffer("amax", k, torch.float32))
        neg_min = torch.amin(xs, 1, out=st.buffer("amin", k, torch.float32)).neg_()
        # + 0.0 turns -0.0 into +0.0: maximum's pick between -0.0 and +0.0 varies with SIMD width and device,
        # so an all-zero block always gets the scale +0.0 (and the device encoder the same bytes).
        torch.maximum(absmax, neg_min, out=absmax).add_(0.0)
        torch.div(absmax, qmax, out=scales)
        mult = st.buffer("mult", k, torch.float32)
        smallest = float(absmax.min())  # NaN (checked by the caller) takes the multiply path
        if smallest < TINY_ABSMAX and bool(((absmax > 0) & (absmax < TINY_ABSMAX)).any()):
            # Rare: 1/scale may overflow or the scale be subnormal; divide by the scale (1 for
            # all-zero blocks) and clamp, so what is sent matches what the receiver computes.
            torch.where(scales > 0, scales, torch.ones_like(scales), out=mult)
            t = torch.div(xs, mult[:, None], out=st.buffer("tmp", k * w, torch.float32).view(k, w))
            t.round_().clamp_(-qmax, qmax)
        else:
            torch.reciprocal(scales, out=mult)
            if smallest < TINY_ABSMAX:
                mult.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # all-zero blocks: 0 * 0, not 0 * inf = NaN
            t = torch.mul(xs, mult[:, None], out=st.buffer("tmp", k * w, torch.float32).view(k, w))
            t.round_()  # |x / scale| <= 127 (7) up to rounding, so no clamp is needed
        q.copy_(t)

    def _quantize_segment(self, x: torch.Tensor, scales: torch.Tensor, q: torch.Tensor,
                          b0: int, b1: int, tail: int, st: ThreadState) -> None:
        """Quantise blocks b0..b1 (plus the partial tail) into ``q``, which is indexed from block b0."""
        b = self._block
        full = (b1 - b0) * b
        e0 = b0 * b
        if full:
            self._quantize(x[e0:e0 + full].view(b1 - b0, b), scales[b0:b1], q[:full].view(b1 - b0, b), st)
        if tail:
            self._quantize(x[e0 + full:e0 + full + tail].view(1, tail), scales[b1:b1 + 1],
                           q[full:full + tail].view(1, tail), st)

    def _encode_raw(self, x: torch.Tensor, st: ThreadState) -> torch.Tensor:
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
            if not math.isfinite(top) or count_nonfinite(x):
                raise nonfinite_error(x)
            raise CodecError(
                f"value of magnitude {top * self.qmax:.6g} is too large for {self.config.name} "
                f"(max {self.scale_limit * self.qmax:.6g}); scale the tensor down"
            )
        return raw

    def _encode_values(self, x: torch.Tensor, scales: torch.Tensor, values: torch.Tensor,
                       b0: int, b1: int, tail: int, st: ThreadState) -> None:
        """Quantise one segment and store its values in the payload's value area."""
        raise NotImplementedError

    @property
    def reduces_quantized(self) -> bool:
        """True where the C kernels are loaded with their fused reduction (kernels.c needs FMA)."""
        return self._kernels is not None and self._kernels.has_reduce_quantized

    def keep_quantized(self, payload: bytes | bytearray | memoryview, numel: int) -> QuantizedChunk:
        """The payload's checked scales (copied: the payload may be unaligned) and its values (a view: int8, or
        int4's packed bytes)."""
        check_numel(numel, least=1)
        raw = self._unwrap(payload, numel)
        nb = -(-numel // self._block)
        scales = self._check_scales(raw, nb, self._state()).clone()
        values = raw[4 * nb:] if self.nibbles else raw[4 * nb:].view(np.int8)
        return QuantizedChunk(numel, self._block, scales, values, nibbles=self.nibbles)

    def _check_scales(self, raw: np.ndarray, nb: int, st: ThreadState) -> torch.Tensor:
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


class Int8Codec(BlockCodec):
    """int8: the blocks' fp32 scales (absmax / 127), then one int8 q in [-127, 127] per element."""

    qmax = 127
    scale_limit = SCALE_LIMIT["int8"]  # a payload may hold q = -128

    def _values_size(self, numel: int) -> int:
        return numel

    def _encode_values(self, x, scales, values, b0, b1, tail, st) -> None:
        self._quantize_segment(x, scales, values[b0 * self._block:].view(torch.int8), b0, b1, tail, st)

    def _decode_raw(self, raw: np.ndarray, numel: int, out: torch.Tensor, st: ThreadState) -> None:
        nb = -(-numel // self._block)
        scales = self._check_scales(raw, nb, st)
        if self._kernels is not None:  # the full blocks in one call, then the partial last one
            values, b = raw[4 * nb:].view(np.int8), self._block
            full = numel - numel % b
            self._kernels.dequantize(values[:full], scales[:full // b], b, out[:full])
            if full < numel:
                self._kernels.dequantize(values[full:], scales[full // b:], numel - full, out[full:])
            return
        # A read-only view of the payload (torch would warn once; see READ_ONLY_WARNING).
        # torch's vectorised int8 -> fp32 copy is twice as fast as numpy's cast.
        q = torch.from_numpy(raw[4 * nb:].view(np.int8))
        for b0, b1, tail in self._segments(numel):
            e0, e1 = b0 * self._block, b1 * self._block + tail
            out[e0:e1].copy_(q[e0:e1])
            self._scale_segment(out[e0:e1], scales, b0, b1, tail)


class Int4Codec(BlockCodec):
    """int4: the blocks' fp32 scales (absmax / 7), then two q + 8 per byte (q in [-7, 7], low nibble first)."""

    qmax = 7
    nibbles = True
    scale_limit = SCALE_LIMIT["int4"]  # stored nibbles decode to q in [-8, 7]

    @functools.cached_property
    def _unpack_table(self) -> torch.Tensor:
        """The torch path's unpacking table, built on its first use (the C kernels need none): two payload bytes
        (as a little-endian uint16) -> the int32 whose four bytes are their four nibbles minus 8, as int8; one
        256 KB gather unpacks four values (faster than shifts and masks)."""
        nibbles = (np.arange(1 << 16, dtype=np.uint32)[:, None] >> np.arange(0, 16, 4, dtype=np.uint32)) & 15
        table = (nibbles.astype(np.int8) - 8).view(np.int32).reshape(-1)  # row j: 4 int8 -> 1 int32
        return torch.from_numpy(table.copy())

    def _values_size(self, numel: int) -> int:
        return (numel + 1) // 2

    def _encode_values(self, x, scales, values, b0, b1, tail, st) -> None:
        e0 = b0 * self._block
        m = (b1 - b0) * self._block + tail
        nib = st.buffer("nibbles", m + 1, torch.int8)
        self._quantize_segment(x, scales, nib, b0, b1, tail, st)
        if self._kernels is not None:
            self._kernels.pack_nibbles(nib[:m], values[e0 // 2:e0 // 2 + (m + 1) // 2])
            return
        if m % 2:
            nib[m] = -8  # the unused high nibble of the last byte is stored as 0
        pairs = nib[:m + m % 2].view(torch.int16)  # little-endian: element 2k is the low byte
        # Two's-complement nibble XOR 8 == q + 8 (mod 16): packs without a float "+8" pass.
        packed = torch.bitwise_and(pairs, 0x0F, out=st.buffer("packed", pairs.numel(), torch.int16))
        high = torch.bitwise_right_shift(pairs, 4, out=st.buffer("high", pairs.numel(), torch.int16))
        packed.bitwise_or_(high.bitwise_and_(0xF0)).bitwise_xor_(0x88)
        values[e0 // 2:e0 // 2 + pairs.numel()].copy_(packed)

    def _decode_raw(self, raw: np.ndarray, numel: int, out: torch.Tensor, st: ThreadState) -> None:
        nb = -(-numel // self._block)
        scales = self._check_scales(raw, nb, st)
        packed = raw[4 * nb:]
        for b0, b1, tail in self._segments(numel):
            e0, e1 = b0 * self._block, b1 * self._block + tail
            first, nbytes = e0 // 2, (e1 - e0 + 1) // 2  # segments start on a multiple of 4 elements
            if self._kernels is not None:
                self._kernels.dequantize_nibbles(
                    packed[first:first + nbytes], scales[b0:b1 + (1 if tail else 0)], self._block, out[e0:e1]
                )
                continue
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
