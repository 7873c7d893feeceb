"""Tests of collectives.codecs.device: encoding where the tensor lives writes the CPU encoder's bytes, bit for bit.

Every parity test runs the device encoder on the CPU, and again on CUDA under the ``cuda`` marker
(skipped, with the reason, where there is no CUDA device). Codec.encode only sends non-CPU tensors
down the device path, so on the CPU the tests call its private device halves directly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectives.codecs import CODEC_NAMES, Codec, CodecConfig, error_bound, make_codec, register_codec
from collectives.codecs import device as devicecodec
from collectives.codecs.device import _seg_blocks, decode_raw_on_device, encode_raw_on_device, encode_throughput
from collectives.errors import CodecError, ConfigError, NonFiniteError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
BLOCKS = [1, 3, 64, 128]
CONFIGS = [CodecConfig(name) for name in ("none", "fp16", "bf16")] + [
    CodecConfig(name, block) for name in ("int8", "int4") for block in BLOCKS
]
SPECS = [name + z for name in CODEC_NAMES for z in ("", "+zstd")] + ["int4/3+zstd", "int8/1"]
LENGTHS = [0, 1, 2, 7, 63, 64, 65, 127, 129, 1001]
SEGMENT_ELEMS = 1 << 19
TINY = 2.0**-101  # below the 2**-100 absmax under which the CPU divides instead of multiplying
FLT_MAX = float(np.finfo(np.float32).max)
# (absmax, x) of a block where round(x / scale) and round(x * (1 / scale)) differ: (divide q, multiply q).
TIE_BLOCK = {"int8": (4.130692481994629, 2.5532233715057373, 78, 79),
             "int4": (4.130692481994629, -3.245543956756592, -6, -5)}


def randn(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def cpu_outcome(config: CodecConfig, x: torch.Tensor) -> bytes | tuple[type, str]:
    """The CPU encoder's raw payload, or its error's type and message."""
    codec = make_codec(config)
    try:
        return codec._encode_raw(x.contiguous(), codec._state()).numpy().tobytes()
    except CodecError as exc:
        return type(exc), str(exc)


def device_outcome(config: CodecConfig, x: torch.Tensor, device: str) -> bytes | tuple[type, str]:
    """encode_raw_on_device's payload (on the host) for x moved to device, or its error's type and message."""
    try:
        raw = encode_raw_on_device(config, x.to(device))
    except CodecError as exc:
        return type(exc), str(exc)
    assert raw.device.type == device and raw.dtype == torch.uint8
    return raw.cpu().numpy().tobytes()


def assert_parity(config: CodecConfig, x: torch.Tensor, device: str) -> None:
    assert device_outcome(config, x, device) == cpu_outcome(config, x)


def values_of(config: CodecConfig, raw: bytes, n: int) -> torch.Tensor:
    """Decoded q values (int8 or int4) of a raw block-codec payload, one per element."""
    nb = -(-n // config.block_size)
    body = np.frombuffer(raw, dtype=np.uint8)[4 * nb:]
    if config.name == "int8":
        return torch.from_numpy(body.view(np.int8).astype(np.int64))
    nibbles = np.stack([body & 15, body >> 4], 1).reshape(-1)[:n]
    return torch.from_numpy(nibbles.astype(np.int64) - 8)


# -- parity of the raw payload ----------------------------------------------------------------------


@pytest.mark.parametrize("block", [1, 3, 4, 64, 100, 128, 1 << 19, 1 << 20])
def test_segment_blocks_are_the_cpu_codecs(block):
    assert _seg_blocks(block) == make_codec(CodecConfig("int8", block))._seg_blocks


def test_format_constants_are_the_cpu_codecs():
    for name in ("none", "fp16", "bf16"):
        assert devicecodec._OVERFLOW[name] == make_codec(name)._overflow
    for name in ("int8", "int4"):
        codec = make_codec(name)
        assert (devicecodec._QMAX[name], devicecodec.SCALE_LIMIT[name]) == (codec.qmax, codec.scale_limit)


def test_a_spec_string_is_not_a_config():
    with pytest.raises(ConfigError, match="CodecConfig"):
        encode_raw_on_device("int8", torch.zeros(3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("n", LENGTHS)
def test_raw_payload_equals_the_cpu_encoders(device, config, n):
    x = randn(n, seed=n) * torch.exp(randn(n, seed=n + 1))  # blocks of different magnitudes
    assert_parity(config, x, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_raw_payload_of_several_cpu_segments_equals_the_cpu_encoders(device, config):
    n = 3 * SEGMENT_ELEMS + 77
    x = randn(n, seed=3)
    x[SEGMENT_ELEMS:SEGMENT_ELEMS + 3000] *= TINY  # tiny blocks in the second segment only
    x[2 * SEGMENT_ELEMS:2 * SEGMENT_ELEMS + 500] = 0.0
    assert_parity(config, x, device)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_divide_and_multiply_round_a_tie_block_differently(name):
    absmax, v, q_divide, q_multiply = TIE_BLOCK[name]
    x, scale = torch.tensor([v]), torch.tensor([absmax]) / torch.tensor([float(make_codec(name).qmax)])
    assert (int(torch.round(x / scale)), int(torch.round(x * torch.reciprocal(scale)))) == (q_divide, q_multiply)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("block", [3, 64])
def test_a_tiny_block_sends_its_whole_cpu_segment_down_the_divide_path(device, name, block):
    config = CodecConfig(name, block)
    seg = _seg_blocks(block) * block
    absmax, v, q_divide, q_multiply = TIE_BLOCK[name]
    x = randn(2 * seg + 1, seed=1)
    for start in (0, seg):  # the same non-tiny block in both segments
        x[start + 5 * block:start + 6 * block] = 0.5
        x[start + 5 * block], x[start + 5 * block + 1] = absmax, v
    x[seg + 7 * block:seg + 8 * block] = TINY  # a tiny block in the second segment only
    x[-1] = TINY  # the partial last block is quantised alone: it does not change the second segment's path
    raw = cpu_outcome(config, x)
    q = values_of(config, raw, x.numel())
    assert (int(q[5 * block + 1]), int(q[seg + 5 * block + 1])) == (q_multiply, q_divide)
    assert_parity(config, x, device)


def special_tensors() -> dict[str, torch.Tensor]:
    """Named inputs at the edges of the formats (each 1000+ elements, so blocks of 64 and 128 see them too)."""
    base = randn(1000, seed=9)
    made: dict[str, torch.Tensor] = {}

    def put(name: str, index: slice | int, value: float) -> None:
        x = made.setdefault(name, base.clone())
        x[index] = value

    put("all_zero_blocks", slice(0, 400), 0.0)
    put("negative_zero_blocks", slice(0, 400), -0.0)
    x = made.setdefault("mixed_signed_zero_blocks", base.clone())
    x[:400] = torch.where(torch.arange(400) % 3 == 0, torch.tensor(-0.0), torch.tensor(0.0))
    put("negative_zero_among_values", slice(1, 1000, 7), -0.0)
    made["subnormal_blocks"] = base.clone()
    made["subnormal_blocks"][:500] = randn(500, seed=10) * 2.0**-140
    made["smallest_subnormal"] = torch.where(base > 0, 2.0**-149, -(2.0**-149))
    made["tiny_blocks_then_normal_blocks"] = base.clone()
    made["tiny_blocks_then_normal_blocks"][:300] *= TINY
    made["absmax_at_the_tiny_threshold"] = base.clone()
    made["absmax_at_the_tiny_threshold"][:128] = torch.tensor([2.0**-100, -(2.0**-100)] * 64)
    below = float(np.nextafter(np.float32(2.0**-100), np.float32(0)))
    made["absmax_just_below_the_tiny_threshold"] = base.clone()
    made["absmax_just_below_the_tiny_threshold"][:128] = torch.tensor([below, -below] * 64)
    made["all_tiny"] = base * TINY
    made["huge"] = base * 1e37
    for qmax, limit in ((127, FLT_MAX / 128), (7, FLT_MAX / 8)):
        edge = np.float32(limit * qmax)
        for step, name in ((-np.inf, "below"), (np.inf, "above")):
            made[f"absmax_just_{name}_the_q{qmax}_scale_limit"] = base.clone()
            made[f"absmax_just_{name}_the_q{qmax}_scale_limit"][200] = -float(np.nextafter(edge, np.float32(step)))
    made["float_max"] = base.clone()
    made["float_max"][3] = FLT_MAX
    made["fp16_edge"] = base.clone()
    made["fp16_edge"][:2] = torch.tensor([65504.0, -65519.0])
    made["fp16_overflow"] = base.clone()
    made["fp16_overflow"][5] = 70000.0
    made["bf16_overflow"] = base.clone()
    made["bf16_overflow"][5] = -3.4e38
    for name, value in (("nan", math.nan), ("inf", math.inf), ("minus_inf", -math.inf)):
        made[name] = base.clone()
        made[name][123] = value
    made["nan_and_huge"] = base.clone()
    made["nan_and_huge"][[5, 900]] = torch.tensor([3.4e38, math.nan])
    return made


SPECIAL = special_tensors()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("case", sorted(SPECIAL))
def test_special_values_give_the_cpu_encoders_bytes_or_error(device, config, case):
    assert_parity(config, SPECIAL[case], device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_raises_non_finite_error(device, config, bad):
    x = randn(300)
    x[[7, 250]] = bad
    with pytest.raises(NonFiniteError, match=r"2 non-finite value\(s\).*nothing was encoded"):
        encode_raw_on_device(config, x.to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec,value", [("fp16", 70000.0), ("bf16", 3.4e38), ("int8", 3.4e38), ("int4", 3.4e38)])
def test_values_beyond_the_format_raise_codec_error(device, spec, value):
    with pytest.raises(CodecError, match="too large|overflows") as caught:
        encode_raw_on_device(CodecConfig(spec), torch.tensor([1.0, value], device=device))
    assert not isinstance(caught.value, NonFiniteError)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_error_is_the_first_failing_cpu_segments(device):
    x = randn(2 * SEGMENT_ELEMS)
    x[10], x[SEGMENT_ELEMS + 10] = 70000.0, math.nan  # overflow in segment 0, NaN in segment 1
    with pytest.raises(CodecError, match="overflows fp16") as caught:
        encode_raw_on_device(CodecConfig("fp16"), x.to(device))
    assert not isinstance(caught.value, NonFiniteError)


@pytest.mark.parametrize("device", DEVICES)
def test_odd_int4_payload_leaves_the_unused_high_nibble_zero(device):
    raw = encode_raw_on_device(CodecConfig("int4"), torch.tensor([7.0, -7.0, 7.0], device=device)).cpu()
    assert raw[4:].tolist() == [0x1F, 0x0F]


def finite_float32() -> st.SearchStrategy[float]:
    """Any finite float32 (subnormals included), with zeros, tiny and threshold values made likely."""
    return st.one_of(
        st.floats(width=32, allow_nan=False, allow_infinity=False),
        st.floats(width=32, min_value=-(2.0**-90), max_value=2.0**-90),
        st.floats(width=32, min_value=-1024.0, max_value=1024.0),
        st.sampled_from([0.0, -0.0, 2.0**-149, -(2.0**-149), 2.0**-100, TINY, 65504.0, 65520.0]),
    )


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=300, deadline=None, database=None)
@given(
    name=st.sampled_from(CODEC_NAMES),
    block=st.sampled_from([1, 2, 3, 5, 8, 64, 128]),
    values=st.lists(finite_float32(), max_size=300),
    scale=st.sampled_from([1.0, 2.0**-110, 2.0**-60, 1e30]),
    bad=st.sampled_from([None, math.nan, math.inf]),
)
def test_any_input_gives_the_cpu_encoders_bytes_or_error(device, name, block, values, scale, bad):
    x = torch.tensor(values, dtype=torch.float32) * scale
    if bad is not None and values:
        x[len(values) // 2] = bad
    assert_parity(CodecConfig(name, block), x, device)


# -- decoding on the device ----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("n", [1, 2, 65, 1001])
def test_device_decode_equals_the_cpu_decode_bitwise(device, config, n):
    x = randn(n, seed=4) * torch.exp(randn(n, seed=5))
    x[:n // 3] = -0.0
    codec = make_codec(config)
    expected = codec.decode(codec.encode(x), n)
    out = torch.full((n,), math.nan, device=device)
    decode_raw_on_device(config, encode_raw_on_device(config, x.to(device)), n, out)
    assert out.device.type == device
    assert torch.equal(out.cpu().view(torch.int32), expected.view(torch.int32))


def test_device_decode_rejects_an_out_of_the_wrong_size():
    raw = encode_raw_on_device(CodecConfig("int8"), randn(10))
    with pytest.raises(CodecError, match="out must be"):
        decode_raw_on_device(CodecConfig("int8"), raw, 10, torch.empty(11))


# -- Codec.encode and encode_with_feedback through the device path -------------------------------------


def device_encode(codec: Codec, x: torch.Tensor, device: str) -> bytes:
    """Codec.encode through the device path (its private half on the CPU, where encode takes the CPU path)."""
    if device == "cpu":
        return bytes(codec._encode_on_device(codec._check_input(x), True))
    return codec.encode(x.to(device))


def device_feedback(codec: Codec, x: torch.Tensor, residual: torch.Tensor, device: str) -> bytes:
    """encode_with_feedback through the device path; ``residual`` must already be on ``device``."""
    if device == "cpu":
        return bytes(codec._encode_with_feedback_on_device(x, residual, True))
    return codec.encode_with_feedback(x.to(device), residual)


class PlainCodec(Codec):
    """A user's codec as docs/architecture.md describes one: raw fp32 bytes, no device encoder of its own."""

    def raw_size(self, numel: int) -> int:
        return 4 * numel

    def _encode_raw(self, x, st):
        return x.contiguous().view(torch.uint8)

    def _decode_raw(self, raw, numel, out, st):
        out.copy_(torch.frombuffer(bytearray(raw[: 4 * numel]), dtype=torch.float32))


def test_a_codec_without_a_device_encoder_encodes_a_gpu_tensor_on_the_host():
    # The device path checked the codec's name against the built-ins: every round of a plugin codec failed on a GPU.
    register_codec("plaintest", PlainCodec)  # as a plugin registers it (again: the same class is accepted)
    codec = make_codec("plaintest")
    x, residual = randn(1001, seed=7), torch.zeros(1001)
    assert device_encode(codec, x, "cpu") == codec.encode(x)
    assert device_feedback(codec, x, residual, "cpu") == codec.encode(x)
    assert torch.equal(residual, torch.zeros(1001))  # fp32 is exact: nothing to carry


def test_a_dense_plugin_codec_is_not_said_to_drop_entries_for_want_of_an_error_bound():
    register_codec("plaintest", PlainCodec)
    with pytest.raises(ConfigError, match=r"codec 'plaintest' has no per-element error bound \(not a built-in\)"):
        error_bound(CodecConfig.parse("plaintest"), torch.ones(3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", [0, 1, 1001])
def test_device_encode_gives_the_cpu_payload(device, spec, n):
    codec = make_codec(spec)
    x = randn(n, seed=2)
    assert device_encode(codec, x, device) == codec.encode(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS)
def test_device_error_feedback_gives_the_cpu_payload_and_residual(device, spec):
    codec = make_codec(spec)
    x = randn(1001, seed=5)
    x[:200] = 0.0
    cpu_residual = randn(1001, seed=6, scale=0.01)
    residual = cpu_residual.to(device, copy=True)
    for _ in range(3):
        expected = codec.encode_with_feedback(x, cpu_residual)
        assert device_feedback(codec, x, residual, device) == expected
        assert residual.device.type == device
        assert torch.equal(residual.cpu().view(torch.int32), cpu_residual.view(torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_device_error_feedback_updates_a_non_contiguous_residual(device):
    codec = make_codec("int4/3")
    x = randn(100, seed=1)
    cpu_residual = randn(200, seed=2, scale=0.01)[::2]
    residual = randn(200, seed=2, scale=0.01).to(device)[::2]
    assert device_feedback(codec, x, residual, device) == codec.encode_with_feedback(x, cpu_residual)
    assert torch.equal(residual.cpu(), cpu_residual)


@pytest.mark.parametrize("device", DEVICES)
def test_device_error_feedback_leaves_the_residual_untouched_on_non_finite_input(device):
    codec = make_codec("int8")
    x = randn(100)
    x[3] = math.nan
    residual = randn(100, seed=2).to(device)
    before = residual.clone()
    with pytest.raises(NonFiniteError):
        device_feedback(codec, x, residual, device)
    assert torch.equal(residual, before)


def test_error_feedback_wants_the_residual_on_xs_device():
    with pytest.raises(CodecError, match=r"residual must be .* on cpu \(x's device\)"):
        make_codec("int8").encode_with_feedback(randn(10), torch.zeros(10, device="meta"))


@pytest.mark.parametrize("spec", ["none", "int8", "int4+zstd"])
def test_a_meta_tensor_cannot_be_encoded(spec):
    codec = make_codec(spec)
    x = torch.zeros(10, device="meta")
    with pytest.raises(CodecError, match="meta device, which holds no data"):
        codec.encode(x)
    with pytest.raises(CodecError, match="meta device, which holds no data"):
        codec.encode_with_feedback(x, torch.zeros(10, device="meta"))
    with pytest.raises(CodecError, match="meta device, which holds no data"):
        encode_raw_on_device(codec.config, x)


@pytest.mark.parametrize("bad", [torch.zeros(4, dtype=torch.float64), torch.zeros(2, 3), [1.0, 2.0]])
def test_device_encoder_rejects_wrong_dtype_shape_or_type(bad):
    with pytest.raises(CodecError, match="1-D float32 tensor"):
        encode_raw_on_device(CodecConfig("int8"), bad)


# -- throughput ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", ["int8", "int4+zstd", "bf16"])
def test_encode_throughput_is_a_positive_finite_rate(device, spec):
    rate = encode_throughput(CodecConfig.parse(spec), randn(10_000).to(device), repeats=2)
    assert math.isfinite(rate) and rate > 0


@pytest.mark.parametrize("repeats", [0, -1, 1.5, True])
def test_encode_throughput_rejects_a_bad_repeat_count(repeats):
    with pytest.raises(ConfigError, match="repeats"):
        encode_throughput(CodecConfig("int8"), randn(10), repeats=repeats)


def test_encode_throughput_rejects_an_empty_tensor():
    with pytest.raises(ConfigError, match="empty"):
        encode_throughput(CodecConfig("int8"), torch.empty(0))
