"""``topk``: a sparse codec for pseudo-gradients (SparseLoCo / DeMo style), with error feedback.

A contribution (what a member sends an owner in the aggregate-scatter) keeps
the ``ceil(L / N)`` largest-magnitude entries of every block of ``L <= 4096``
elements (spec ``topk/N``, default ``N = 64``: 1.56 %), each as 2 bits: its
sign and one of two magnitude levels of its block (two-level Lloyd-Max on the
kept magnitudes, stored as bfloat16). What it drops is meant to be carried by
the sender's error-feedback residual (``Codec.encode_with_feedback``; the
codec says so with ``NEEDS_FEEDBACK``), so nothing is lost for good.

A reduced part (what an owner all-gathers: the sum of up to n contributions,
so up to n times denser) is coded by :meth:`TopKCodec.encode_reduced` with
int8 values on a bfloat16 absmax scale per block, either sparse (its nonzero
entries and their indices) or dense (every element), whichever is smaller;
the owner keeps the decoded value, so every member holds the same bits.

Indices (sorted, distinct) are Rice-coded gaps or a bitmap, whichever is
smaller for the chunk: Rice stores every gap ``g`` as ``g >> r`` in unary
(zeros ended by a one, all in one bit stream) and its low ``r`` bits (in
another), so both streams decode with vectorised numpy, never a loop per
element.

Payload (little-endian; ``n`` elements, ``nb = ceil(n / 4096)`` blocks, ``m``
kept entries; ``n == 0`` is the empty payload)::

    byte 0       kind: 0 contribution, 1 reduced sparse, 2 reduced dense; | 4 if the indices are a bitmap
    kinds 0, 1:  m (uint32), r (uint8), the scales, the values, the indices to the end:
                 kind 0: 2 nb bf16 scales (lo, hi per block), ceil(m / 4) bytes of 2-bit codes
                         (bit 0: negative, bit 1: the high level; 4 per byte, first in the low bits)
                 kind 1: nb bf16 scales, m int8 values
                 indices: bitmap of ceil(n / 8) bytes (np.packbits order), or ceil(m r / 8) bytes of
                          remainders then the unary stream, padded with zero bits to a byte
    kind 2:      nb bf16 scales, n int8 values

Decoding treats the payload as hostile: any size, count, scale, code,
padding bit or index out of place raises CodecError, after checking sizes
before allocating anything beyond a few times the payload's size.
"""

from __future__ import annotations

import numpy as np
import torch

from collectives.codecs.base import Codec, ThreadState, nonfinite_error
from collectives.codecs.device import FLT_MAX, SCALE_LIMIT
from collectives.errors import CodecError

__all__ = ["BLOCK", "TopKCodec", "analytic_contribution_bytes", "decode_indices", "encode_indices", "rice_bits"]

# Elements per top-k block (SparseLoCo's chunk size): every block keeps its share of entries, so a layer of
# small pseudo-gradients is never starved by a neighbour of large ones; its two scales cost 0.008 bit/element.
BLOCK = 4096
KIND_CONTRIBUTION, KIND_SPARSE, KIND_DENSE = 0, 1, 2
BITMAP_FLAG = 4
_HEADER = 6  # kind, m (uint32), r
_MAX_RICE = 31
_INT_SCALE_LIMIT = SCALE_LIMIT["int8"]  # every int8 times its scale stays finite
_BF16_EXP = 0x7F80
_SHIFTS2 = np.array([0, 2, 4, 6], dtype=np.uint8)


# -- indices ---------------------------------------------------------------------------------------------------


def rice_bits(gaps: np.ndarray, r: int) -> int:
    """Bits of the Rice code of gaps with parameter r (unary quotients plus r-bit remainders)."""
    return int(gaps.size * (r + 1) + int((gaps >> r).sum()))


def encode_indices(idx: np.ndarray, n: int) -> tuple[bool, int, bytes]:
    """(bitmap?, Rice parameter, bytes) of sorted distinct int64 indices in [0, n): the smaller coding."""
    m = idx.size
    if m == 0:
        return False, 0, b""
    gaps = np.diff(idx, prepend=-1) - 1
    # The cost falls until r is about log2 of the mean gap, then rises: stop at the first rise.
    best_r, best = 0, rice_bits(gaps, 0)
    for r in range(1, _MAX_RICE + 1):
        bits = rice_bits(gaps, r)
        if bits >= best:
            break
        best_r, best = r, bits
    rice_bytes = -(-(m * best_r) // 8) + -(-(best - m * best_r) // 8)
    if -(-n // 8) <= rice_bytes:
        bits = np.zeros(n, dtype=np.uint8)
        bits[idx] = 1
        return True, 0, np.packbits(bits).tobytes()
    r = best_r
    rem = gaps & ((1 << r) - 1)
    rem_bits = ((rem[:, None] >> np.arange(r - 1, -1, -1, dtype=np.int64)) & 1).astype(np.uint8)
    quot = gaps >> r
    unary = np.zeros(int(m + quot.sum()), dtype=np.uint8)
    unary[np.cumsum(quot + 1) - 1] = 1  # q zeros, then the one that ends the gap
    return False, r, np.packbits(rem_bits.reshape(-1)).tobytes() + np.packbits(unary).tobytes()


def decode_indices(data: np.ndarray, bitmap: bool, r: int, m: int, n: int) -> np.ndarray:
    """The m sorted int64 indices in [0, n) coded in data (all of it); CodecError if it is not such a coding."""
    if bitmap:
        if data.size != -(-n // 8):
            raise CodecError(f"index bitmap has {data.size} bytes, expected {-(-n // 8)} for {n} elements")
        bits = np.unpackbits(data)
        if bits[n:].any():
            raise CodecError("index bitmap has bits set past the last element")
        idx = np.flatnonzero(bits[:n])
        if idx.size != m:
            raise CodecError(f"index bitmap marks {idx.size} entries, the header says {m}")
        return idx.astype(np.int64, copy=False)
    if not 0 <= r <= _MAX_RICE:
        raise CodecError(f"Rice parameter {r} is out of range 0..{_MAX_RICE}")
    rem_bytes = -(-(m * r) // 8)
    if rem_bytes > data.size:
        raise CodecError(f"{m} Rice remainders of {r} bits need {rem_bytes} bytes, the payload has {data.size}")
    rem_bits = np.unpackbits(data[:rem_bytes])
    if rem_bits[m * r:].any():
        raise CodecError("Rice remainders have padding bits set")
    unary = np.unpackbits(data[rem_bytes:])
    ends = np.flatnonzero(unary)
    if ends.size != m:
        raise CodecError(f"Rice stream codes {ends.size} gaps, the header says {m}")
    if m == 0:
        if unary.size:
            raise CodecError("Rice stream has bytes but no gaps")
        return np.zeros(0, dtype=np.int64)
    if ends[-1] < unary.size - 8:
        raise CodecError("Rice stream has trailing bytes after its last gap")
    quot = np.diff(ends, prepend=-1) - 1
    if int(quot.max()) > (n >> r):  # before shifting: an index that large cannot be below n anyway
        raise CodecError(f"a Rice-coded gap runs past the {n} elements")
    gaps = quot << r
    if r:
        weights = np.int64(1) << np.arange(r - 1, -1, -1, dtype=np.int64)
        gaps |= rem_bits[:m * r].reshape(m, r).astype(np.int64) @ weights
    idx = np.cumsum(gaps + 1) - 1
    if int(idx[-1]) >= n:
        raise CodecError(f"a Rice-coded index ({int(idx[-1])}) is not below the {n} elements")
    return idx


# -- scales and values --------------------------------------------------------------------------------------------


def _bf16_bytes(values: torch.Tensor) -> bytes:
    """bfloat16 (round to nearest even) of fp32 values, as little-endian bytes."""
    return values.to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def _read_scales(raw: np.ndarray, pos: int, count: int, limit: float) -> torch.Tensor:
    """count bf16 scales at raw[pos:] as fp32; CodecError if one is negative, NaN, Inf or above limit."""
    if pos + 2 * count > raw.size:
        raise CodecError(f"payload of {raw.size} bytes ends inside its {count} scales")
    bits = raw[pos:pos + 2 * count].copy().view("<u2")  # the payload may be unaligned
    if ((bits & 0x8000) != 0).any() or ((bits & _BF16_EXP) == _BF16_EXP).any():
        raise CodecError("payload has a negative, NaN or Inf scale; the sender is broken or the data was corrupted")
    scales = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float()
    if scales.numel() and float(scales.max()) > limit:
        raise CodecError(f"payload has a scale above {limit:.6g}; the sender is broken or the data was corrupted")
    return scales


def _levels(mag: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the two magnitude levels (lo, hi) that best fit the kept magnitudes (two Lloyd-Max steps)."""
    keptf = kept.float()
    count = keptf.sum(1)
    t = (mag * keptf).sum(1) / count.clamp(min=1)
    lo = hi = t
    for _ in range(2):
        up = keptf * (mag >= t[:, None])
        down = keptf - up
        n_up, n_down = up.sum(1), down.sum(1)
        hi = torch.where(n_up > 0, (mag * up).sum(1) / n_up.clamp(min=1), t)
        lo = torch.where(n_down > 0, (mag * down).sum(1) / n_down.clamp(min=1), hi)
        t = (lo + hi) / 2
    return lo, hi


def _select(x: torch.Tensor, rows: int, width: int, k: int, first_block: int):
    """Top-k of each of ``rows`` blocks of ``width`` elements of x: (global indices, values, kept mask, levels)."""
    blocks = x.view(rows, width)
    k = min(k, width)
    mag, pos = torch.topk(blocks.abs(), k, dim=1, sorted=False)
    pos, order = torch.sort(pos, dim=1)
    mag = mag.gather(1, order)
    vals = blocks.gather(1, pos)
    kept = mag > 0  # never send zeros: a block with fewer nonzeros than k sends fewer entries
    lo, hi = _levels(mag, kept)
    lo, hi = lo.to(torch.bfloat16).float(), hi.to(torch.bfloat16).float()
    high = mag >= ((lo + hi) / 2)[:, None]  # the nearer of the two stored (rounded) levels
    codes = (vals < 0).to(torch.uint8) | (high.to(torch.uint8) << 1)
    glob = pos + (torch.arange(rows, dtype=torch.int64)[:, None] + first_block) * BLOCK
    return glob[kept], codes[kept], torch.stack([lo, hi], 1).reshape(-1)


def _pack2(codes: np.ndarray) -> bytes:
    """2-bit codes, four per byte, the first in the low bits; the last byte's unused codes are 0."""
    padded = np.zeros(-(-codes.size // 4) * 4, dtype=np.uint8)
    padded[:codes.size] = codes
    return (padded.reshape(-1, 4) << _SHIFTS2).sum(1, dtype=np.uint8).tobytes()


def _unpack2(data: np.ndarray, m: int) -> np.ndarray:
    codes = ((data[:, None] >> _SHIFTS2) & 3).reshape(-1)
    if codes[m:].any():
        raise CodecError("2-bit value codes have padding bits set")
    return codes[:m]


def _as_tensor(parts: list[bytes]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


# -- the codec ------------------------------------------------------------------------------------------------------


class TopKCodec(Codec):
    """``topk/N``: top ``ceil(L/N)`` of every block of L <= 4096 elements, 2-bit values; reduced parts in int8."""

    NEEDS_FEEDBACK = True

    def raw_size(self, numel: int) -> int:
        """Largest payload for ``numel`` elements: a reduced part coded dense, or (tiny parts) a contribution, whose
        codes and indices take at most ceil(n / 4) + ceil(n / 8) <= n + 2 bytes."""
        return 0 if numel == 0 else _HEADER + 4 * (-(-numel // BLOCK)) + numel + 2

    def chunk_numel(self, chunk_bytes: int) -> int:
        """Elements per chunk: as many as chunk_bytes of fp32 (whole blocks), so a chunk's input is ~chunk_bytes."""
        n = max(1, chunk_bytes // 4)
        return n if n < BLOCK else n // BLOCK * BLOCK

    def keep(self, numel: int) -> int:
        """The most entries a contribution of numel elements keeps: ceil(L / N) per block of L elements."""
        n = self.config.block_size
        full, tail = divmod(numel, BLOCK)
        return full * -(-BLOCK // n) + -(-tail // n)

    # -- encode -------------------------------------------------------------------------------------------------

    def _encode_raw(self, x: torch.Tensor, st: ThreadState) -> torch.Tensor:
        """A contribution's payload: per block, the top entries as 2-bit codes on two bf16 levels."""
        n = x.numel()
        if n == 0:
            return torch.zeros(0, dtype=torch.uint8)
        if not bool(torch.isfinite(x).all()):
            raise nonfinite_error(x)
        full, tail = divmod(n, BLOCK)
        per = -(-BLOCK // self.config.block_size)
        picked = []
        if full:
            picked.append(_select(x[:full * BLOCK], full, BLOCK, per, 0))
        if tail:
            picked.append(_select(x[full * BLOCK:], 1, tail, -(-tail // self.config.block_size), full))
        idx = torch.cat([p[0] for p in picked]).numpy()
        codes = torch.cat([p[1] for p in picked]).numpy()
        scales = torch.cat([p[2] for p in picked])
        if not bool(torch.isfinite(scales).all()):
            raise CodecError(f"a value of magnitude {float(x.abs().max()):.6g} overflows topk's bfloat16 scales; "
                             "scale the tensor down")
        bitmap, r, index = encode_indices(idx, n)
        head = bytes([KIND_CONTRIBUTION | (BITMAP_FLAG if bitmap else 0)]) + idx.size.to_bytes(4, "little") + bytes([r])
        return _as_tensor([head, _bf16_bytes(scales), _pack2(codes), index])

    def encode_reduced(self, x: torch.Tensor, *, copy: bool = True) -> bytes | memoryview:
        """A reduced part's payload: int8 values on a bf16 absmax scale per block, sparse or dense (the smaller)."""
        x = self._check_input(x).cpu()
        n = x.numel()
        if n == 0:
            return b"" if copy else memoryview(b"")
        if not bool(torch.isfinite(x).all()):
            raise nonfinite_error(x)
        nb = -(-n // BLOCK)
        padded = torch.zeros(nb * BLOCK, dtype=torch.float32)
        padded[:n] = x
        blocks = padded.view(nb, BLOCK)
        scales = (blocks.abs().amax(1) / 127).to(torch.bfloat16).float()
        if not float(scales.max()) <= _INT_SCALE_LIMIT:
            raise CodecError(f"a value of magnitude {float(x.abs().max()):.6g} is too large for topk's reduced "
                             "parts; scale the tensor down")
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = (blocks / safe[:, None]).round_().clamp_(-127, 127).to(torch.int8).view(-1)[:n].numpy()
        head_scales = _bf16_bytes(scales)
        idx = np.flatnonzero(q)
        dense_size = 1 + len(head_scales) + n
        bitmap, r, index = encode_indices(idx, n)
        if _HEADER + len(head_scales) + idx.size + len(index) < dense_size:
            head = bytes([KIND_SPARSE | (BITMAP_FLAG if bitmap else 0)]) + idx.size.to_bytes(4, "little") + bytes([r])
            raw = _as_tensor([head, head_scales, q[idx].tobytes(), index])
        else:
            raw = _as_tensor([bytes([KIND_DENSE]), head_scales, q.tobytes()])
        return self._finish(raw, copy)

    # The device paths are the base class's, on the host: a sparse payload is tiny, and top-k plus index coding is
    # CPU work.

    # -- decode -------------------------------------------------------------------------------------------------

    def _unwrap(self, payload: bytes | bytearray | memoryview, numel: int) -> np.ndarray:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise CodecError(f"payload must be bytes, bytearray or memoryview, got {type(payload).__name__}")
        try:
            data = memoryview(payload).cast("B")
        except (TypeError, ValueError) as exc:
            raise CodecError(f"payload is not a contiguous byte buffer: {exc}") from None
        limit = self.raw_size(numel)
        if data.nbytes > limit or (numel > 0 and data.nbytes == 0):
            raise CodecError(f"{self.config} payload of {data.nbytes} bytes does not fit {numel} elements "
                             f"(at most {limit})")
        return np.frombuffer(data, dtype=np.uint8)

    def _decode_raw(self, raw: np.ndarray, numel: int, out: torch.Tensor, st: ThreadState) -> None:
        kind, bitmap = int(raw[0]) & ~BITMAP_FLAG, bool(raw[0] & BITMAP_FLAG)
        nb = -(-numel // BLOCK)
        if kind == KIND_DENSE and not bitmap:
            if raw.size != 1 + 2 * nb + numel:
                raise CodecError(f"dense topk payload has {raw.size} bytes, expected {1 + 2 * nb + numel}")
            scales = _read_scales(raw, 1, nb, _INT_SCALE_LIMIT)
            q = torch.from_numpy(raw[1 + 2 * nb:].view(np.int8).copy())
            if bool((q == -128).any()):
                raise CodecError("dense topk payload holds -128, which the encoder never writes")
            out.copy_(q)
            full = numel // BLOCK
            if full:
                out[:full * BLOCK].view(full, BLOCK).mul_(scales[:full, None])
            if numel % BLOCK:
                out[full * BLOCK:].mul_(scales[full])
            return
        if kind not in (KIND_CONTRIBUTION, KIND_SPARSE) or raw.size < _HEADER:
            raise CodecError(f"topk payload of kind {int(raw[0])} and {raw.size} bytes is not a known format")
        m = int.from_bytes(raw[1:5].tobytes(), "little")
        r = int(raw[5])
        if m > numel or m > 8 * raw.size:  # every kept entry costs at least a bit
            raise CodecError(f"topk payload claims {m} entries for {numel} elements in {raw.size} bytes")
        pos = _HEADER
        if kind == KIND_CONTRIBUTION:
            if m > self.keep(numel):
                raise CodecError(f"topk contribution keeps {m} entries, at most {self.keep(numel)} for {numel}")
            scales = _read_scales(raw, pos, 2 * nb, FLT_MAX)
            pos += 4 * nb
            nvals = -(-m // 4)
        else:
            scales = _read_scales(raw, pos, nb, _INT_SCALE_LIMIT)
            pos += 2 * nb
            nvals = m
        if pos + nvals > raw.size:
            raise CodecError(f"topk payload of {raw.size} bytes ends inside its {m} values")
        values = raw[pos:pos + nvals]
        idx = decode_indices(raw[pos + nvals:], bitmap, r, m, numel)
        index = torch.from_numpy(idx)
        block = index // BLOCK
        if kind == KIND_CONTRIBUTION:
            codes = torch.from_numpy(_unpack2(values, m))
            level = scales.view(-1, 2)[block, (codes >> 1).long()]
            decoded = torch.where((codes & 1).bool(), -level, level)
        else:
            q = torch.from_numpy(values.view(np.int8).copy())
            if bool((q == -128).any()):
                raise CodecError("sparse topk payload holds -128, which the encoder never writes")
            decoded = q.float() * scales[block]
        out.zero_()
        out[index] = decoded


def analytic_contribution_bytes(numel: int, kept: int, r: int) -> int:
    """Upper bound on a contribution's payload with ``kept`` entries, for any Rice parameter r: header, scales,
    codes, remainders, unary stream (the gaps sum below numel, so their quotients to at most numel >> r), plus
    2 bytes for the encoder's best r padding its two streams differently."""
    nb = -(-numel // BLOCK)
    return _HEADER + 4 * nb + -(-kept // 4) + -(-(kept * r) // 8) + -(-(kept + (numel >> r)) // 8) + 2

