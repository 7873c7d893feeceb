"""Fuzzing the sparse ``topk`` codec's decoder (collectives/codecs/sparse.py): any payload for any element count is
decoded into finite values or refused with CodecError, and a payload within the bound never allocates beyond
a few times its size (the decoder checks sizes first)."""

from __future__ import annotations

import math

import torch
from fuzzgen import mutated
from hypothesis import strategies as st

from collectives.codecs import make_codec
from collectives.errors import CodecError

CODECS = [make_codec("topk"), make_codec("topk/4")]
SIZES = st.sampled_from([0, 1, 7, 100, 4096, 4097, 9000])


def _valid(seed: int, numel: int, kind: int, density: float) -> bytes:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * (torch.rand(numel, generator=g) < density)
    codec = CODECS[kind % 2]
    return bytes(codec.encode(x) if kind < 2 else codec.encode_reduced(x))


def payloads(numel: int) -> st.SearchStrategy[bytes]:
    """Valid contributions and reduced parts of numel elements, mutated ones, and random bytes."""
    valid = st.builds(_valid, st.integers(0, 1000), st.just(numel), st.integers(0, 3),
                      st.sampled_from([0.0, 0.01, 0.2, 1.0]))
    return st.one_of(valid, mutated(valid), st.binary(max_size=64))


def test_topk_decode_gives_finite_values_or_codec_error(fuzz):
    def check(data: st.DataObject) -> None:
        numel = data.draw(SIZES)
        payload = data.draw(payloads(numel))
        codec = CODECS[data.draw(st.integers(0, 1))]
        try:
            out = codec.decode(payload, numel)
        except CodecError:
            return
        assert out.shape == (numel,) and out.dtype == torch.float32
        assert numel == 0 or math.isfinite(float(out.abs().max()))

    fuzz.run(check, st.data())
