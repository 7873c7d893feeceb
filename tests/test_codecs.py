"""Tests of collectives.codecs: exactness, error bounds, wire layout and hostile payloads."""

from __future__ import annotations

import math
import struct
import threading
import tracemalloc

import numpy as np
import pytest
import torch
import zstandard

from collectives.codecs import CODEC_NAMES, Codec, CodecConfig, error_bound, make_codec
from collectives.errors import CodecError, ConfigError, NonFiniteError

LOSSY = ["fp16", "bf16", "int8", "int4"]
ALL_SPECS = [name + z for name in CODEC_NAMES for z in ("", "+zstd")]


def randn(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def roundtrip(spec: str, x: torch.Tensor) -> torch.Tensor:
    codec = make_codec(spec)
    return codec.decode(codec.encode(x), x.numel())


# -- exactness and error bounds ---------------------------------------------------------


@pytest.mark.parametrize("zstd", ["", "+zstd"])
def test_none_round_trip_is_bit_exact(zstd):
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.1754944e-38, 3.4028235e38, -3.4028235e38, 1.0, -7.5])
    x = torch.cat([special, randn(1000, scale=1e-20), randn(1000, scale=1e20)])
    y = roundtrip("none" + zstd, x)
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))


@pytest.mark.parametrize("zstd", ["", "+zstd"])
@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("n", [1, 64, 1000, 100_003])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 300.0])
def test_lossy_codec_error_stays_within_error_bound(name, zstd, n, scale):
    x = randn(n, seed=n, scale=scale)
    y = roundtrip(name + zstd, x)
    assert torch.all((y - x).abs() <= error_bound(CodecConfig.parse(name), x))


@pytest.mark.parametrize("spec", ["int8", "int4", "int8/17", "int4/256"])
def test_int_error_bound_is_tight_on_random_data(spec):
    x = randn(200_000, seed=3)
    err = (roundtrip(spec, x) - x).abs()
    ratio = err / error_bound(CodecConfig.parse(spec), x)
    assert float(ratio.max()) > 0.9  # the bound test above is not vacuous
    assert float(ratio.max()) <= 1.0


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_half_error_bound_is_tight_on_random_data(name):
    x = randn(100_000, seed=4)
    ratio = (roundtrip(name, x) - x).abs() / error_bound(CodecConfig(name), x)
    assert 0.9 < float(ratio.max()) <= 1.0


@pytest.mark.parametrize("spec", ["int8", "int4", "int8+zstd", "int4/7"])
def test_tiny_and_subnormal_blocks_stay_within_error_bound(spec):
    block = CodecConfig.parse(spec).block_size
    x = torch.cat([randn(block, seed=1, scale=1e-40), randn(block, seed=2, scale=1e-33),
                   randn(block, seed=3), torch.zeros(block), torch.tensor([1e-45, -3e-44])])
    y = roundtrip(spec, x)
    assert torch.all((y - x).abs() <= error_bound(CodecConfig.parse(spec), x))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("spec", ["int8", "int4", "int8+zstd", "int4+zstd", "int4/5"])
def test_all_zero_block_decodes_to_exact_zeros(spec):
    block = CodecConfig.parse(spec).block_size
    x = randn(4 * block + 3)
    x[block:2 * block] = 0.0
    y = roundtrip(spec, x)
    assert torch.equal(y[block:2 * block], torch.zeros(block))
    assert torch.equal(roundtrip(spec, torch.zeros(100)), torch.zeros(100))


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("value", [3.7, -0.001, 1e30, -2.5e-20, 1.0, 123456.79])
def test_single_nonzero_value_in_block_is_kept(name, value):
    x = torch.zeros(64)
    x[17] = value
    y = roundtrip(name, x)
    ulp = float(np.spacing(np.float32(abs(value))))
    assert abs(float(y[17]) - float(x[17])) <= ulp
    assert torch.equal(torch.cat([y[:17], y[18:]]), torch.zeros(63))


# -- non-finite and out-of-range input ------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_raises_non_finite_error(spec, bad):
    x = randn(1000)
    x[123] = bad
    with pytest.raises(NonFiniteError, match=r"1 non-finite value.*nothing was encoded"):
        make_codec(spec).encode(x)


@pytest.mark.parametrize("spec", ["int8", "int4", "fp16", "none"])
def test_non_finite_error_counts_values(spec):
    x = randn(500)
    x[[3, 70, 400]] = torch.tensor([math.nan, math.inf, math.nan])
    with pytest.raises(NonFiniteError, match="3 non-finite"):
        make_codec(spec).encode(x)


def test_fp16_overflow_raises_codec_error_suggesting_bf16_or_int8():
    x = randn(100)
    x[5] = 70000.0
    with pytest.raises(CodecError, match="bf16 or int8") as info:
        make_codec("fp16").encode(x)
    assert not isinstance(info.value, NonFiniteError)
    assert float(roundtrip("fp16", torch.tensor([65504.0, -65519.0]))[0]) == 65504.0  # rounds, no overflow


@pytest.mark.parametrize("spec", ["bf16", "int8", "int4"])
def test_values_beyond_format_range_raise_codec_error(spec):
    with pytest.raises(CodecError, match="too large|overflows"):
        make_codec(spec).encode(torch.tensor([1.0, 3.4e38]))


@pytest.mark.parametrize("spec", ["none", "int8", "int4"])
def test_encode_rejects_wrong_dtype_shape_or_type(spec):
    codec = make_codec(spec)
    for bad in (torch.zeros(4, dtype=torch.float64), torch.zeros(2, 3), torch.zeros((), dtype=torch.float32),
                [1.0, 2.0], np.zeros(3, dtype=np.float32)):
        with pytest.raises(CodecError):
            codec.encode(bad)


def test_encode_accepts_non_contiguous_input():
    x = randn(2000)[::2]
    assert torch.equal(roundtrip("none", x), x)
    assert torch.all((roundtrip("int8", x) - x).abs() <= error_bound(CodecConfig("int8"), x))


# -- sizes and lengths -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_empty_tensor_round_trips(spec):
    codec = make_codec(spec)
    payload = codec.encode(torch.empty(0))
    if not codec.config.zstd_level:
        assert payload == b""
    assert len(payload) <= codec.max_payload_size(0)
    assert codec.decode(payload, 0).numel() == 0


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("n", [1, 63, 65, 127, 1001])
def test_odd_lengths_round_trip(spec, n):
    codec = make_codec(spec)
    x = randn(n, seed=n)
    payload = codec.encode(x)
    if not codec.config.zstd_level:
        assert len(payload) == codec.raw_size(n)
    y = codec.decode(payload, n)
    assert torch.all((y - x).abs() <= error_bound(codec.config, x))


@pytest.mark.parametrize("spec", ["int8/100", "int4/100", "int4/7", "int8/1", "int4/1", "int4/3+zstd", "int8/1048576"])
@pytest.mark.parametrize("n", [5, 99, 101, 1234, 1_000_003])
def test_length_not_multiple_of_block_size_round_trips(spec, n):
    codec = make_codec(spec)
    x = randn(n, seed=7)
    y = codec.decode(codec.encode(x), n)
    assert torch.all((y - x).abs() <= error_bound(codec.config, x))


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
@pytest.mark.parametrize("n", [0, 1, 64, 65, 10_000])
def test_raw_size_of_int_codecs(block, n):
    nb = -(-n // block)
    assert make_codec(f"int8/{block}").raw_size(n) == n + 4 * nb
    assert make_codec(f"int4/{block}").raw_size(n) == (n + 1) // 2 + 4 * nb
    assert make_codec(f"int8/{block}").raw_size(n) == len(make_codec(f"int8/{block}").encode(randn(n)))


def test_int8_payload_is_about_a_quarter_of_fp32():
    x = randn(1_000_000)
    ratio = len(make_codec("int8").encode(x)) / len(make_codec("none").encode(x))
    assert ratio <= 0.27
    assert len(make_codec("int4").encode(x)) / (4 * x.numel()) <= 0.145


@pytest.mark.parametrize("spec", ALL_SPECS + ["int4/1+zstd", "int8/3+zstd22"])
@pytest.mark.parametrize("n", [0, 1, 2, 100, 4097, 300_001])
def test_payload_never_exceeds_max_payload_size(spec, n):
    codec = make_codec(spec)
    # Uniform random bits are the incompressible worst case for zstd.
    bits = torch.randint(0, 2**23, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.int32)
    x = (bits | 0x3F800000).view(torch.float32) * torch.where(bits % 2 == 0, 1.0, -1.0)
    assert len(codec.encode(x)) <= codec.max_payload_size(n)
    assert codec.max_payload_size(n) >= codec.raw_size(n)


# -- wire layout -----------------------------------------------------------------------------------


def test_int8_wire_layout():
    x = torch.tensor([1.0, -0.25, 0.0, 0.5])
    payload = make_codec("int8").encode(x)
    scale = struct.unpack("<f", payload[:4])[0]
    assert scale == pytest.approx(1 / 127, rel=1e-7)
    assert list(np.frombuffer(payload[4:], dtype=np.int8)) == [127, -32, 0, 64]


def test_int4_wire_layout():
    x = torch.tensor([1.0, -1.0, 0.0, 0.3, -0.6])  # block 4 + a partial block of one
    payload = make_codec("int4/4").encode(x)
    scales = struct.unpack("<2f", payload[:8])
    assert scales[0] == pytest.approx(1 / 7, rel=1e-7) and scales[1] == pytest.approx(0.6 / 7, rel=1e-7)
    # q = [7, -7, 0, 2 | -7] stored as q + 8, element 2k in the low nibble, unused nibble 0.
    assert list(payload[8:]) == [15 | 1 << 4, 8 | 10 << 4, 1]


def test_half_wire_layouts_are_little_endian_ieee():
    x = torch.tensor([1.0, -2.5, 65504.0])
    assert make_codec("fp16").encode(x) == np.array([1.0, -2.5, 65504.0], dtype="<f2").tobytes()
    assert make_codec("bf16").encode(x)[:4] == bytes([0x80, 0x3F, 0x20, 0xC0])
    assert make_codec("none").encode(x) == np.array([1.0, -2.5, 65504.0], dtype="<f4").tobytes()


# -- hostile payloads --------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", CODEC_NAMES)
def test_decode_rejects_payload_of_wrong_length(spec):
    codec = make_codec(spec)
    payload = codec.encode(randn(100))
    for bad in (payload[:-1], payload + b"\x00", b"", payload * 2):
        with pytest.raises(CodecError, match="bytes, expected"):
            codec.decode(bad, 100)


@pytest.mark.parametrize("spec", [s for s in ALL_SPECS if "zstd" in s])
def test_decode_rejects_corrupted_zstd_frame(spec):
    codec = make_codec(spec)
    x = randn(5000)
    payload = bytearray(codec.encode(x))
    for pos in (len(payload) // 2, len(payload) - 2, 0, 5):
        bad = bytearray(payload)
        bad[pos] ^= 0x5A
        with pytest.raises(CodecError):
            codec.decode(bytes(bad), 5000)
    for bad in (bytes(payload[:-3]), bytes(payload) + b"x", b"not a zstd frame at all", b"\x28\xb5"):
        with pytest.raises(CodecError):
            codec.decode(bad, 5000)


def test_decode_rejects_zstd_frame_of_wrong_content_size():
    codec = make_codec("int8+zstd")
    other = make_codec("int8+zstd").encode(randn(99))
    with pytest.raises(CodecError, match="declares"):
        codec.decode(other, 100)
    no_size = zstandard.ZstdCompressor(write_content_size=False, write_checksum=True)
    raw = make_codec("int8").encode(randn(100))
    with pytest.raises(CodecError, match="no content size"):
        codec.decode(no_size.compressobj().compress(raw) + no_size.compressobj().flush(), 100)


def test_decode_rejects_zstd_bomb_without_allocating_it():
    codec = make_codec("int8+zstd")
    bomb = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(bytes(64 << 20))
    assert len(bomb) < codec.max_payload_size(100_000)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="declares"):
            codec.decode(bomb, 100_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < codec.raw_size(100_000) + (1 << 20)


def test_decode_rejects_oversized_zstd_payload_before_decompressing():
    codec = make_codec("none+zstd")
    with pytest.raises(CodecError, match="exceeds"):
        codec.decode(bytes(codec.max_payload_size(10) + 1), 10)


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("bad_scale", [math.nan, math.inf, -1.0, -math.inf, 3e38])
def test_decode_rejects_invalid_scale(name, bad_scale):
    codec = make_codec(name)
    payload = bytearray(codec.encode(randn(200)))
    payload[4:8] = struct.pack("<f", bad_scale)  # second block's scale
    with pytest.raises(CodecError, match="invalid block scale"):
        codec.decode(bytes(payload), 200)


def test_decode_rejects_nan_scale_inside_zstd_frame():
    raw = bytearray(make_codec("int8").encode(randn(200)))
    raw[0:4] = struct.pack("<f", math.nan)
    payload = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(raw))
    with pytest.raises(CodecError, match="invalid block scale"):
        make_codec("int8+zstd").decode(payload, 200)


@pytest.mark.parametrize("name,dtype", [("none", "<f4"), ("fp16", "<f2")])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_decode_rejects_non_finite_float_values(name, dtype, bad):
    values = np.ones(100, dtype=dtype)
    values[42] = bad
    with pytest.raises(CodecError, match="non-finite"):
        make_codec(name).decode(values.tobytes(), 100)


def test_decode_rejects_non_finite_bf16_values():
    payload = bytearray(make_codec("bf16").encode(randn(10)))
    payload[6:8] = bytes([0xC0, 0x7F])  # bf16 NaN
    with pytest.raises(CodecError, match="non-finite"):
        make_codec("bf16").decode(bytes(payload), 10)


def test_int_decode_of_extreme_legal_payload_stays_finite():
    # The largest accepted scale with the most negative stored value must not overflow to -inf.
    scale = float(np.float32(np.finfo(np.float32).max / 128))
    payload = struct.pack("<f", scale) + bytes([0x80, 0x7F])  # q = -128, 127
    y = make_codec("int8").decode(payload, 2)
    assert torch.isfinite(y).all()
    scale4 = float(np.float32(np.finfo(np.float32).max / 8))
    y4 = make_codec("int4").decode(struct.pack("<f", scale4) + bytes([0xF0]), 2)  # nibbles 0 and 15
    assert torch.isfinite(y4).all()


@pytest.mark.parametrize("spec", ["int8", "int8+zstd"])
@pytest.mark.parametrize("payload", ["text", 12, None, [1, 2], memoryview(np.zeros(10, dtype=np.uint8)[::2])])
def test_decode_rejects_non_buffer_payload(spec, payload):
    with pytest.raises(CodecError):
        make_codec(spec).decode(payload, 1)


@pytest.mark.parametrize("spec", ["none", "int8", "int4+zstd"])
def test_decode_accepts_bytearray_and_memoryview(spec):
    codec = make_codec(spec)
    x = randn(777)
    payload = codec.encode(x)
    framed = b"header" + payload + b"trailer"
    view = memoryview(framed)[6:6 + len(payload)]  # unaligned slice, as the wire layer hands it over
    expected = codec.decode(payload, 777)
    assert torch.equal(codec.decode(bytearray(payload), 777), expected)
    assert torch.equal(codec.decode(view, 777), expected)


# -- decode into out -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_decode_into_out_writes_only_the_given_view(spec):
    codec = make_codec(spec)
    x = randn(131)
    payload = codec.encode(x)
    big = torch.full((300,), 7.0)
    view = big[77:208]
    result = codec.decode(payload, 131, out=view)
    assert result is view
    assert torch.equal(big[77:208], codec.decode(payload, 131))
    assert torch.equal(big[:77], torch.full((77,), 7.0))
    assert torch.equal(big[208:], torch.full((92,), 7.0))


def test_decode_into_non_contiguous_out():
    codec = make_codec("int8")
    x = randn(50)
    big = torch.zeros(100)
    codec.decode(codec.encode(x), 50, out=big[::2])
    assert torch.equal(big[::2], codec.decode(codec.encode(x), 50))
    assert torch.equal(big[1::2], torch.zeros(50))


def test_decode_rejects_out_of_wrong_size_or_dtype():
    codec = make_codec("int8")
    payload = codec.encode(randn(10))
    for out in (torch.empty(11), torch.empty(10, dtype=torch.float64), torch.empty(2, 5)):
        with pytest.raises(CodecError, match="out must be"):
            codec.decode(payload, 10, out=out)


# -- error feedback --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["int4", "int8", "bf16", "int4/128+zstd"])
def test_error_feedback_average_converges_to_input(spec):
    codec = make_codec(spec)
    x = randn(4096, seed=11)
    one_shot = float((codec.decode(codec.encode(x), x.numel()) - x).abs().max())
    residual = torch.zeros_like(x)
    total = torch.zeros_like(x)
    rounds = 200
    for _ in range(rounds):
        total += codec.decode(codec.encode_with_feedback(x, residual), x.numel())
    averaged = float((total / rounds - x).abs().max())
    assert averaged < one_shot / 20


@pytest.mark.parametrize("spec", ALL_SPECS + ["int4/7"])
def test_error_feedback_residual_is_exact(spec):
    codec = make_codec(spec)
    x = randn(1001, seed=5)
    residual = randn(1001, seed=6, scale=0.01)
    for _ in range(3):
        old = residual.clone()
        payload = codec.encode_with_feedback(x, residual)
        assert torch.equal(residual, (x + old) - codec.decode(payload, x.numel()))


def test_error_feedback_leaves_residual_untouched_on_non_finite_input():
    codec = make_codec("int8")
    x = randn(100)
    x[3] = math.nan
    residual = randn(100, seed=2)
    before = residual.clone()
    with pytest.raises(NonFiniteError):
        codec.encode_with_feedback(x, residual)
    assert torch.equal(residual, before)


def test_error_feedback_rejects_mismatched_residual():
    with pytest.raises(CodecError, match="residual"):
        make_codec("int8").encode_with_feedback(randn(10), torch.zeros(11))


# -- configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("int8", CodecConfig("int8")),
    ("int8+zstd", CodecConfig("int8", zstd_level=1)),
    ("int8+zstd3", CodecConfig("int8", zstd_level=3)),
    ("int4/128", CodecConfig("int4", block_size=128)),
    ("int4/128+zstd", CodecConfig("int4", block_size=128, zstd_level=1)),
    ("none", CodecConfig()),
    ("bf16+zstd22", CodecConfig("bf16", zstd_level=22)),
    (" INT8/64 ", CodecConfig("int8")),
])
def test_config_parse(text, expected):
    assert CodecConfig.parse(text) == expected


@pytest.mark.parametrize("text", ["int8", "int8+zstd", "int8+zstd3", "int4/128", "int4/128+zstd3", "none",
                                  "fp16+zstd", "bf16", "int4/1", "int8/1048576+zstd22"])
def test_config_str_is_canonical_and_parse_inverts_it(text):
    config = CodecConfig.parse(text)
    assert str(config) == text
    assert CodecConfig.parse(str(config)) == config


def test_config_str_hides_default_block_and_ignores_block_of_float_codecs():
    assert str(CodecConfig("int4", block_size=64, zstd_level=2)) == "int4+zstd2"
    assert str(CodecConfig("fp16", block_size=128)) == "fp16"


@pytest.mark.parametrize("text", ["int3", "int8+zstd99", "int8/0", "", "int8+zstd0", "fp16/128", "int8/", "int8+zstdx",
                                  "int8 int4", "int8+lz4", "int8/2000000", "zstd", "int8/-4", "+zstd"])
def test_config_parse_rejects_junk(text):
    with pytest.raises(ConfigError):
        CodecConfig.parse(text)


def test_config_error_names_the_bad_value_and_what_is_allowed():
    with pytest.raises(ConfigError, match=r"'int3'.*none, fp16, bf16, int8, int4"):
        CodecConfig("int3")
    with pytest.raises(ConfigError, match=r"int8/N \(block size\) 0 .*1 to 1048576"):
        CodecConfig("int8", block_size=0)
    with pytest.raises(ConfigError, match=r"zstd_level 23 .*0 to 22"):
        CodecConfig("int8", zstd_level=23)
    for kwargs in ({"block_size": True}, {"block_size": 1.5}, {"zstd_level": -1}, {"block_size": (1 << 20) + 1}):
        with pytest.raises(ConfigError):
            CodecConfig("int8", **kwargs)


def test_config_errors_are_value_errors():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        make_codec("int9")


def test_make_codec_accepts_config_or_string_and_codec_dispatches():
    assert make_codec("int4/32+zstd").config == CodecConfig("int4", 32, 1)
    assert make_codec(CodecConfig("bf16")).config.name == "bf16"
    codec = Codec("int8")
    assert isinstance(codec, Codec) and codec.config == CodecConfig("int8")
    x = randn(100)
    assert codec.encode(x) == make_codec("int8").encode(x)


# -- concurrency ----------------------------------------------------------------------------------------------


def test_one_codec_is_safe_to_share_between_threads():
    codec = make_codec("int4/32+zstd")
    inputs = [randn(20_000 + i, seed=i) for i in range(4)]
    expected = [codec.decode(codec.encode(x), x.numel()) for x in inputs]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                y = codec.decode(codec.encode(inputs[i]), inputs[i].numel())
                assert torch.equal(y, expected[i])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# -- benchmark command ----------------------------------------------------------------------------------------


def test_bench_codecs_prints_one_json_object(capsys):
    import json

    from peer.cli import main

    before = torch.get_num_threads()
    assert main(["bench", "codecs", "--numel", "3000", "--repeat", "1", "--codecs", "int8,int4+zstd", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert torch.get_num_threads() == before
    assert result["threads"] == 1 and result["numel"] == 3000 and result["baseline"]["memcpy_gbps"] > 0
    assert set(result["codecs"]) == {"int8", "int4+zstd"}
    for stats in result["codecs"].values():
        assert {"encode_gbps", "decode_gbps", "roundtrip_gbps", "bytes_over_fp32", "max_abs_error",
                "roundtrip_time_over_memcpy"} <= set(stats)
