"""Tests of collectives.codecs.kernels: the C codec kernels give the torch path's bytes, and a missing compiler is not
fatal.

The parity tests need the kernels; they are skipped, with the reason, where this machine cannot build them.
(tests/test_devicecodec.py also compares the device encoder, plain torch, against the CPU codec, which uses
the kernels where they are available.)
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectives.codecs import CodecConfig, make_codec
from collectives.codecs.dense import Int4Codec, Int8Codec
from collectives.codecs.kernels import (
    DISABLE_ENV,
    FLAG_SETS,
    SOURCE,
    KernelsUnavailable,
    _cpu_fingerprint,
    _library_name,
    build_kernels,
    kernels_status,
    native_kernels,
)
from collectives.errors import CodecError

needs_kernels = pytest.mark.skipif(native_kernels() is None, reason=f"no native kernels: {kernels_status().detail}")
CLASSES = {"int8": Int8Codec, "int4": Int4Codec}
TINY = 2.0**-101  # a block absmax below 2**-100 takes the torch divide-and-clamp path, kernels or not


def both(name: str, block: int) -> tuple:
    """The codec with the native kernels and the same codec on its torch path."""
    spec = str(CodecConfig(name, block))
    cls = CLASSES[name]
    return cls(spec), cls(spec, native=False)


def outcome(codec, x: torch.Tensor) -> bytes | tuple[type, str]:
    try:
        return bytes(codec.encode(x))
    except CodecError as exc:
        return type(exc), str(exc)


def special_blocks(n: int) -> torch.Tensor:
    """Random values with an all-zero block, an all -0.0 block, a tiny block and a huge one."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3
    x[:64] = 0.0
    x[64:128] = -0.0
    x[128:192] *= TINY
    x[192:256] *= 1e36
    return x[:n]


@needs_kernels
@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("block", [1, 3, 64, 128])
@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 1001, (1 << 19) + 77])
def test_native_encode_and_decode_equal_the_torch_path(name, block, n):
    native, plain = both(name, block)
    x = special_blocks(n)
    payload = bytes(native.encode(x))
    assert payload == bytes(plain.encode(x))
    assert torch.equal(native.decode(payload, n).view(torch.int32), plain.decode(payload, n).view(torch.int32))


@needs_kernels
@settings(max_examples=300, deadline=None, database=None)
@given(
    name=st.sampled_from(["int8", "int4"]),
    block=st.sampled_from([1, 2, 5, 64]),
    values=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), max_size=300),
    scale=st.sampled_from([1.0, 2.0**-110, 1e30]),
    bad=st.sampled_from([None, math.nan, -math.nan, math.inf, -math.inf]),
)
def test_any_input_gives_the_torch_paths_bytes_or_error(name, block, values, scale, bad):
    x = torch.tensor(values, dtype=torch.float32) * scale
    if bad is not None and values:
        x[len(values) // 2] = bad
    native, plain = both(name, block)
    assert outcome(native, x) == outcome(plain, x)


@needs_kernels
@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("offset", [0, 1, 3, 8])  # 0 and 8 (32 bytes) take the streaming stores, 1 and 3 not
def test_native_decode_into_an_unaligned_slice_equals_the_torch_decode(name, offset):
    native, plain = both(name, 64)
    n = 64 * 40 + 5
    payload = bytes(native.encode(special_blocks(n)))
    a, b = torch.full((n + offset,), math.nan), torch.full((n + offset,), math.nan)
    native.decode(payload, n, out=a[offset:])
    plain.decode(payload, n, out=b[offset:])
    assert torch.equal(a[offset:], b[offset:]) and bool(a[:offset].isnan().all())


@needs_kernels
def test_native_decode_of_any_payload_bytes_equals_the_torch_decode():
    rng = np.random.default_rng(3)
    native, plain = both("int8", 64)
    n = 1000
    raw = rng.integers(0, 256, size=native.raw_size(n), dtype=np.uint8)
    raw[:4 * 16] = np.frombuffer(np.abs(rng.standard_normal(16)).astype(np.float32).tobytes(), np.uint8)
    assert torch.equal(native.decode(raw.tobytes(), n), plain.decode(raw.tobytes(), n))


@needs_kernels
@pytest.mark.parametrize(("n", "block"), [(1, 64), (2, 64), (999, 64), (1000, 3), (1001, 5), (4097, 1)])
def test_native_int4_decode_of_any_payload_bytes_equals_the_torch_decode(n, block):
    rng = np.random.default_rng(n)
    native, plain = both("int4", block)
    nb = -(-n // block)
    raw = rng.integers(0, 256, size=native.raw_size(n), dtype=np.uint8)  # every nibble value, odd tails too
    raw[:4 * nb] = np.frombuffer(np.abs(rng.standard_normal(nb)).astype(np.float32).tobytes(), np.uint8)
    got, want = native.decode(raw.tobytes(), n), plain.decode(raw.tobytes(), n)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@needs_kernels
def test_error_feedback_residual_is_the_same_with_and_without_kernels():
    native, plain = both("int8", 64)
    x = special_blocks(5000)
    r1 = torch.randn(5000) * 0.1
    r2 = r1.clone()
    assert bytes(native.encode_with_feedback(x, r1)) == bytes(plain.encode_with_feedback(x, r2))
    assert torch.equal(r1, r2)


@needs_kernels
@pytest.mark.parametrize(
    "call",
    [
        lambda k: k.quantize_blocks(torch.zeros(10), 127, 1e-30, torch.zeros(3), torch.zeros(10, dtype=torch.int8)),
        lambda k: k.quantize_blocks(torch.zeros(8), 127, 1e-30, torch.zeros(2), torch.zeros(7, dtype=torch.int8)),
        lambda k: k.quantize_blocks(torch.zeros(16)[::2], 127, 1e-30, torch.zeros(2), torch.zeros(8, dtype=torch.int8)),
        lambda k: k.dequantize(np.zeros(7, np.int8), torch.zeros(2), 4, torch.zeros(8)),
        lambda k: k.dequantize(np.zeros(8, np.uint8), torch.zeros(2), 4, torch.zeros(8)),
        lambda k: k.pack_nibbles(torch.zeros(7, dtype=torch.int8), torch.zeros(3, dtype=torch.uint8)),
        lambda k: k.pack_nibbles(torch.zeros(8, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)),
        lambda k: k.dequantize_nibbles(np.zeros(3, np.uint8), torch.zeros(2), 4, torch.zeros(7)),
        lambda k: k.dequantize_nibbles(np.zeros(4, np.int8), torch.zeros(2), 4, torch.zeros(7)),
        lambda k: k.dequantize_nibbles(np.zeros(4, np.uint8), torch.zeros(1), 4, torch.zeros(7)),
    ],
    ids=["partial block", "short q", "strided x", "short payload", "uint8 payload", "short packed output",
         "uint8 nibbles", "short nibble payload", "int8 nibble payload", "too few nibble scales"],
)
def test_kernels_refuse_buffers_of_the_wrong_size_or_layout(call):
    with pytest.raises(ValueError, match="must be"):
        call(native_kernels())


@needs_kernels
@pytest.mark.parametrize("offset", [0, 1, 8])  # 0 and 8 stream their stores, 1 does not
@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 17, 1000])  # in the vector loop, in the vector loop, in the tail
def test_copy_finite_copies_and_says_whether_every_value_is_finite(offset, bad, where):
    src = torch.randn(1005)
    if bad is not None:
        src[where] = bad
    dst = torch.zeros(1005 + offset)
    assert native_kernels().copy_finite(src, dst[offset:]) is (bad is None)
    assert torch.equal(dst[offset:].view(torch.int32), src.view(torch.int32))


def test_a_missing_compiler_is_reported_not_fatal(tmp_path):
    with pytest.raises(KernelsUnavailable, match="no C compiler"):
        build_kernels(compiler="no-such-cc", cache_dir=tmp_path)


def test_a_failing_compiler_is_reported_with_what_it_said(tmp_path):
    with pytest.raises(KernelsUnavailable, match="could not compile"):
        build_kernels(compiler="false", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


@needs_kernels
def test_a_built_library_is_reused_without_compiling_again(tmp_path):
    cache = tmp_path / "kernels"
    path = build_kernels(cache_dir=cache)
    assert build_kernels(compiler="false", cache_dir=cache) == path  # "false" would fail to compile
    assert cache.stat().st_mode & 0o777 == 0o700  # only its user can put a library there


@needs_kernels
def test_a_cached_portable_build_is_used_without_trying_the_native_one_again(tmp_path):
    # Where -march=native fails, the portable library is what the cache holds: no process compiles again.
    cache = tmp_path / "kernels"
    native = build_kernels(cache_dir=cache)
    portable = cache / _library_name(SOURCE.read_bytes(), FLAG_SETS[-1], _cpu_fingerprint().encode())
    native.rename(portable)
    assert build_kernels(compiler="false", cache_dir=cache) == portable  # "false" would fail to compile


@needs_kernels
def test_a_cache_others_may_write_is_refused(tmp_path):
    cache = tmp_path / "kernels"
    build_kernels(cache_dir=cache)
    cache.chmod(0o777)  # anyone could swap the library for their own code
    with pytest.raises(KernelsUnavailable, match="not private"):
        build_kernels(cache_dir=cache)


@needs_kernels
def test_a_cache_under_a_directory_others_may_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could move our cache aside and put theirs in its place
    with pytest.raises(KernelsUnavailable, match="may be changed by other users"):
        build_kernels(cache_dir=shared / "kernels")


@needs_kernels
def test_a_cache_reached_through_a_link_in_a_directory_others_may_write_is_refused(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could point the link elsewhere
    (shared / "cache").symlink_to(mine)
    with pytest.raises(KernelsUnavailable, match="may be changed by other users"):
        build_kernels(cache_dir=shared / "cache" / "kernels")


@needs_kernels
def test_a_cache_under_a_sticky_shared_directory_is_used(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp: others may add entries but not move ours
    assert build_kernels(cache_dir=shared / "kernels").exists()


def test_the_environment_switch_keeps_the_torch_path():
    code = (
        "from collectives.codecs.kernels import kernels_status, native_kernels; "
        "print(native_kernels(), kernels_status().detail)"
    )
    env = {**os.environ, DISABLE_ENV: "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=True)
    assert done.stdout.strip() == f"None disabled by {DISABLE_ENV}"


def test_codecs_without_kernels_still_encode_and_decode():
    codec = Int8Codec("int8", native=False)
    x = special_blocks(300)
    assert torch.allclose(codec.decode(codec.encode(x), 300), x, rtol=0, atol=float(x.abs().max()) / 127)
    assert make_codec("int8").config == codec.config


needs_weighted_sum = pytest.mark.skipif(
    native_kernels() is None or not native_kernels().has_weighted_sum,
    reason="no native weighted sum (no kernels, or a CPU without FMA)",
)


def torch_weighted_sum(rows: torch.Tensor, coef: torch.Tensor, order) -> torch.Tensor:
    """aggregation.weighted_sum's torch path: multiply the first row, then add_ each further one with alpha."""
    out = torch.mul(rows[order[0]], coef[0])
    for t in range(1, len(order)):
        out.add_(rows[order[t]], alpha=float(coef[t]))
    return out


@needs_weighted_sum
@pytest.mark.parametrize("n_rows", [1, 2, 4, 7])
@pytest.mark.parametrize(("c0", "c1"), [(0, 1), (0, 4099), (5, 3000), (17, 17 + 2048 * 3 + 1)])
def test_native_weighted_sum_equals_torchs_loop_bit_for_bit(n_rows, c0, c1):
    g = torch.Generator().manual_seed(n_rows * 1000 + c0)
    rows = torch.randn(n_rows, 8200, generator=g) * torch.exp(torch.randn(n_rows, 1, generator=g) * 10)
    coef = (torch.rand(n_rows, generator=g, dtype=torch.float64) / n_rows).to(torch.float32)
    order = list(reversed(range(n_rows)))
    out = torch.full((c1 - c0,), math.nan)
    native_kernels().weighted_sum(rows[:, c0:c1], coef, order, out)
    assert torch.equal(out.view(torch.int32), torch_weighted_sum(rows[:, c0:c1], coef, order).view(torch.int32))


@needs_weighted_sum
def test_native_weighted_sum_may_write_into_its_first_row():
    rows = torch.randn(3, 5000)
    coef = torch.tensor([0.2, 0.3, 0.5])
    expected = torch_weighted_sum(rows, coef, [0, 1, 2])
    native_kernels().weighted_sum(rows, coef, [0, 1, 2], rows[0])
    assert torch.equal(rows[0], expected)


@needs_weighted_sum
@pytest.mark.parametrize(
    ("order", "coef", "out"),
    [([0, 3], torch.ones(2), torch.empty(10)), ([], torch.ones(0), torch.empty(10)),
     ([0, 1], torch.ones(1), torch.empty(10)), ([0, 1], torch.ones(2), torch.empty(9))],
    ids=["row out of range", "no rows", "short coef", "short out"],
)
def test_native_weighted_sum_refuses_what_does_not_fit(order, coef, out):
    with pytest.raises(ValueError, match="must"):
        native_kernels().weighted_sum(torch.zeros(3, 10), coef, order, out)


needs_reduce_quantized = pytest.mark.skipif(
    native_kernels() is None or not native_kernels().has_reduce_quantized,
    reason="no native fused reduction (no kernels, or a CPU without FMA)",
)


def kept_and_decoded(n: int, block: int, seed: int, name: str = "int8"):
    """A payload of n elements (int8 or int4) kept quantised, and the same payload decoded."""
    codec = CLASSES[name](str(CodecConfig(name, block)))
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * (seed + 1)
    payload = codec.encode(x)
    return codec.keep_quantized(payload, n), codec.decode(payload, n)


@needs_reduce_quantized
@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("own_rank", [0, 1, 3])
@pytest.mark.parametrize(("n", "block"), [(1, 64), (63, 64), (64, 64), (5000, 64), (4099, 3), (2048 * 3 + 5, 128)])
def test_reducing_kept_payloads_equals_decoding_into_rows_then_the_weighted_sum(name, own_rank, n, block):
    own = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1e3
    sources, rows = [], []
    for t in range(4):
        if t == own_rank:
            sources.append(own)
            rows.append(own)
        else:
            kept, decoded = kept_and_decoded(n, block, seed=t, name=name)
            sources.append(kept)
            rows.append(decoded)
    coef = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out = torch.full((n,), math.nan)
    assert native_kernels().reduce_quantized(sources, coef, out)
    expected = torch_weighted_sum(torch.stack(rows), coef, range(4))
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))


@needs_reduce_quantized
@settings(max_examples=150, deadline=None, database=None)
@given(
    name=st.sampled_from(["int8", "int4"]),
    n=st.integers(1, 5000),
    block=st.sampled_from([1, 3, 64, 128]),
    rows=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_any_payload_bytes_reduce_to_the_bits_of_decoding_them_then_summing(name, n, block, rows, seed):
    rng = np.random.default_rng(seed)
    codec = CLASSES[name](str(CodecConfig(name, block)))
    nb = -(-n // block)
    kept, decoded = [], []
    for _ in range(rows):
        raw = rng.integers(0, 256, size=codec.raw_size(n), dtype=np.uint8)  # any values, scales made valid
        raw[:4 * nb] = np.frombuffer(np.abs(rng.standard_normal(nb)).astype(np.float32).tobytes(), np.uint8)
        kept.append(codec.keep_quantized(raw.tobytes(), n))
        decoded.append(codec.decode(raw.tobytes(), n))
    coef = torch.from_numpy(rng.standard_normal(rows).astype(np.float32))
    out = torch.full((n,), math.nan)
    assert native_kernels().reduce_quantized(kept, coef, out)
    expected = torch_weighted_sum(torch.stack(decoded), coef, range(rows))
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))


@needs_reduce_quantized
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_the_fused_reduction_says_when_an_own_value_is_not_finite(bad):
    own = torch.ones(3000)
    own[2999] = bad
    kept, _ = kept_and_decoded(3000, 64, seed=1)
    assert not native_kernels().reduce_quantized([kept, own], torch.tensor([0.5, 0.5]), torch.empty(3000))


@needs_reduce_quantized
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_one_kept_payload_with_coefficient_one_is_its_decoded_values(name):
    kept, decoded = kept_and_decoded(1001, 64, seed=2, name=name)
    out = torch.empty(1001)
    assert native_kernels().reduce_quantized([kept], torch.ones(1), out)
    assert torch.equal(out, decoded)


@needs_reduce_quantized
@pytest.mark.parametrize(
    ("sources", "coef", "out"),
    [([torch.ones(10)], torch.ones(2), torch.empty(10)), ([torch.ones(9)], torch.ones(1), torch.empty(10)),
     ([], torch.ones(0), torch.empty(10)), ([kept_and_decoded(9, 64, 0)[0]], torch.ones(1), torch.empty(10)),
     ([kept_and_decoded(9, 64, 0, "int4")[0]], torch.ones(1), torch.empty(10)),
     ([dataclasses.replace(kept_and_decoded(10, 64, 0)[0], nibbles=True)], torch.ones(1), torch.empty(10))],
    ids=["long coef", "short source", "no sources", "short payload", "short int4 payload", "int8 bytes as nibbles"],
)
def test_the_fused_reduction_refuses_what_does_not_fit(sources, coef, out):
    with pytest.raises(ValueError, match="must|need"):
        native_kernels().reduce_quantized(sources, coef, out)


@needs_reduce_quantized
def test_keep_quantized_refuses_a_payload_with_a_bad_scale():
    codec = Int8Codec("int8")
    payload = bytearray(codec.encode(torch.ones(64)))
    payload[:4] = np.float32(-1.0).tobytes()
    with pytest.raises(CodecError, match="invalid block scale"):
        codec.keep_quantized(bytes(payload), 64)
