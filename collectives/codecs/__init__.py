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
line; the built-ins below, with their classes). ``topk`` is the sparse codec
of :mod:`collectives.codecs.sparse` (``topk/N`` keeps 1 entry in N per block, its
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
:mod:`collectives.codecs.device`, so only the encoded bytes cross PCIe; its raw
payload is byte-identical to the CPU encoder's, and the zstd stage runs on the
host as for CPU tensors. Error feedback keeps the residual on the tensor's
device. Decoding is CPU-only: payloads arrive from the network on the host.

This module is the codecs' public face: import codecs from here. What every
codec shares (the ``Codec`` base class, ``CodecConfig``, the registry, the zstd
stage and the input checks) is in :mod:`collectives.codecs.base`; the dense
codecs' classes are in :mod:`collectives.codecs.dense`, ``topk``'s in
:mod:`collectives.codecs.sparse`. This module imports the three, registers the
built-ins with their classes (``CODEC_NAMES`` and ``topk``), re-exports the
base's names, and holds what needs the built-ins registered: building a codec
from a spec (:func:`make_codec`), asking whether it wants error feedback
(:func:`needs_feedback`) and the built-ins' error bounds (:func:`error_bound`).
Those are here and not in the base so that no caller can reach them without
the built-ins: a module that imported only the base would find the registry
empty of them. The codec modules import the base, never this module, so
there is no import cycle (not even through a ``"module:Class"`` string, which
only a plugin may still use).
"""

from __future__ import annotations

import torch

# Re-exported: every name of the base that modules, tests and plugins import from here (the constants by an alias
# to themselves, which marks a re-export outside __all__; one a line, as sorted imports keep an aliased name).
from collectives.codecs.base import DEFAULT_BLOCK_SIZE as DEFAULT_BLOCK_SIZE
from collectives.codecs.base import MAX_BLOCK_SIZE as MAX_BLOCK_SIZE
from collectives.codecs.base import MAX_ZSTD_LEVEL as MAX_ZSTD_LEVEL
from collectives.codecs.base import READ_ONLY_WARNING as READ_ONLY_WARNING
from collectives.codecs.base import (
    Codec,
    CodecConfig,
    CodecKind,
    QuantizedChunk,
    ThreadState,
    as_config,
    check_finite,
    check_numel,
    codec_kind,
    codec_names,
    count_nonfinite,
    nonfinite_error,
    register_codec,
)
from collectives.codecs.dense import FloatCodec, Int4Codec, Int8Codec
from collectives.codecs.sparse import TopKCodec
from collectives.errors import ConfigError

__all__ = [
    "CODEC_NAMES",
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
    "error_bound",
    "make_codec",
    "needs_feedback",
    "nonfinite_error",
    "register_codec",
]

# The built-in dense codecs: element-wise or block quantisers with a device encoder and an error bound.
# Every codec a spec may name, these and the registered ones (the sparse ``topk``), is in codec_names().
CODEC_NAMES = ("none", "fp16", "bf16", "int8", "int4")

# The built-ins, registered with their classes, in this order (codec_names() and the messages list them so).
for _name in ("none", "fp16", "bf16"):
    register_codec(_name, FloatCodec)
register_codec("int8", Int8Codec, param="block size")
register_codec("int4", Int4Codec, param="block size")
register_codec("topk", TopKCodec, param="keep 1 in N", zstd=False)

# Worst-case fp32 rounding in scale, 1/scale, x/scale and q*scale adds ~4.6e-5
# (relative) to the half-step error; see error_bound().
_INT_BOUND_SLACK = 1e-4
_SUBNORMAL_SLACK = 2.0**-140


def make_codec(config: CodecConfig | str) -> Codec:
    """Build the codec for a CodecConfig or a spec string such as ``"int8+zstd"``."""
    return Codec(as_config(config))


def needs_feedback(config: CodecConfig | str) -> bool:
    """Whether a codec drops so much that its senders should keep an error-feedback residual (sparse codecs)."""
    return codec_kind(as_config(config).name).load().NEEDS_FEEDBACK


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
    config = as_config(config)
    if config.name not in CODEC_NAMES:
        why = "it drops entries; error feedback carries them" if needs_feedback(config) else "not a built-in"
        raise ConfigError(f"codec {config.name!r} has no per-element error bound ({why}): bounds exist for "
                          f"{', '.join(CODEC_NAMES)}")
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
