"""The sparse ``topk`` codec (collectives/codecs/sparse.py): what it keeps, how it codes indices, error feedback, sizes,
refusal of malformed payloads, and bit-identical results across the members of a real all-reduce."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

from collectives.codecs import CodecConfig, codec_names, error_bound, make_codec, needs_feedback
from collectives.codecs.sparse import BLOCK, analytic_contribution_bytes, decode_indices, encode_indices
from collectives.errors import CodecError, ConfigError, NonFiniteError
from peer.harness.procgroup import AllReduceJob, ProcessGroup, worker_tensor

TOPK = make_codec("topk")
_rounds = itertools.count(1)


def seeded(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


# -- the spec -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,keep_one_in,canonical", [("topk", 64, "topk"), ("topk/32", 32, "topk/32"),
                                                         ("TOPK/64", 64, "topk")])
def test_spec_names_the_density(spec, keep_one_in, canonical):
    config = CodecConfig.parse(spec)
    assert (config.name, config.block_size, str(config)) == ("topk", keep_one_in, canonical)


@pytest.mark.parametrize("spec,says", [("topk+zstd", "does not take +zstd"), ("topk/0.01", "topk/N (keep 1 in N)"),
                                       ("topk/0", "topk/N (keep 1 in N) 0 is invalid"), ("bf16/4", "applies only to")])
def test_bad_specs_say_what_to_write(spec, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        CodecConfig.parse(spec)


def test_topk_is_registered_and_asks_for_error_feedback():
    assert "topk" in codec_names()
    assert needs_feedback("topk") and not needs_feedback("int8")


def test_topk_has_no_per_element_error_bound():
    with pytest.raises(ConfigError, match=r"no per-element error bound \(it drops entries"):
        error_bound(CodecConfig.parse("topk"), torch.ones(3))


# -- contributions --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 63, BLOCK, BLOCK + 1, 3 * BLOCK + 17])
def test_a_contribution_keeps_the_largest_entries_of_each_block_with_their_signs(n):
    x = seeded(n)
    decoded = TOPK.decode(TOPK.encode(x), n)
    for b0 in range(0, n, BLOCK):
        block, got = x[b0:b0 + BLOCK], decoded[b0:b0 + BLOCK]
        k = -(-block.numel() // 64)
        kept = got != 0
        assert int(kept.sum()) == k
        assert set(torch.topk(block.abs(), k).indices.tolist()) == set(torch.nonzero(kept).view(-1).tolist())
        assert torch.equal(torch.sign(got[kept]), torch.sign(block[kept]))
        assert len(set(got[kept].abs().tolist())) <= 2  # two magnitude levels per block


def test_a_block_with_two_magnitudes_round_trips_exactly():
    x = torch.zeros(2 * BLOCK)
    x[[3, 70, 4000]] = torch.tensor([0.5, -0.5, 2.0])  # bfloat16-exact levels
    x[BLOCK + 9] = -1.0
    assert torch.equal(TOPK.decode(TOPK.encode(x), x.numel()), x)


def test_zeros_are_never_sent():
    x = torch.zeros(BLOCK)
    x[17] = 3.0
    payload = TOPK.encode(x)
    assert torch.equal(TOPK.decode(payload, BLOCK), x)
    assert len(payload) < 20


def test_an_empty_tensor_is_an_empty_payload():
    assert TOPK.encode(torch.zeros(0)) == b""
    assert TOPK.decode(b"", 0).numel() == 0


def test_a_contribution_is_smaller_than_the_analytic_size():
    n = 28_096
    payload = TOPK.encode(seeded(n))
    kept = TOPK.keep(n)
    for r in range(12):
        assert len(payload) <= analytic_contribution_bytes(n, kept, r)
    # About 10 bits per kept entry: 2 for the value, ~7.5 for its gap, the block scales.
    assert len(payload) * 8 / kept < 11


def test_non_finite_values_are_refused():
    x = seeded(100)
    x[7] = float("nan")
    with pytest.raises(NonFiniteError):
        TOPK.encode(x)
    with pytest.raises(NonFiniteError):
        TOPK.encode_reduced(x)


# -- error feedback -----------------------------------------------------------------------------------------------


def test_error_feedback_keeps_what_was_not_sent():
    x, old = seeded(3 * BLOCK + 5, 1), seeded(3 * BLOCK + 5, 2) * 0.1
    residual = old.clone()
    decoded = TOPK.decode(TOPK.encode_with_feedback(x, residual), x.numel())
    target = x + old
    assert torch.equal(residual[decoded == 0], target[decoded == 0])  # dropped entries: exactly
    assert torch.allclose(decoded + residual, target, rtol=0, atol=1e-6)  # kept ones: within fp32 rounding


def test_error_feedback_sends_every_entry_eventually():
    x = seeded(BLOCK, 3)
    residual = torch.zeros(BLOCK)
    sent = torch.zeros(BLOCK)
    for _ in range(64):
        sent += TOPK.decode(TOPK.encode_with_feedback(torch.zeros(BLOCK) if sent.any() else x, residual), BLOCK)
    assert torch.allclose(sent + residual, x, atol=1e-5)
    assert float(residual.abs().max()) < float(x.abs().max()) / 4


# -- reduced parts (the all-gather) -----------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.0, 0.01, 0.06, 0.5, 1.0])
def test_a_reduced_part_keeps_every_nonzero_entry(density):
    n = 2 * BLOCK + 100
    x = seeded(n, 4) * (torch.rand(n, generator=torch.Generator().manual_seed(5)) < density)
    decoded = TOPK.decode(TOPK.encode_reduced(x), n)
    assert torch.equal(decoded != 0, (x != 0) & (decoded != 0))
    scale = x.abs().max() / 127 if density else 0.0
    assert float((decoded - x).abs().max()) <= float(scale) * 0.51 + 1e-30


def test_a_sparse_reduced_part_is_coded_sparse_and_a_dense_one_dense():
    n = 4 * BLOCK
    sparse = torch.zeros(n)
    sparse[::40] = 1.0
    assert len(TOPK.encode_reduced(sparse)) < n * 0.06
    dense = seeded(n)
    assert len(TOPK.encode_reduced(dense)) <= 1 + 2 * 4 + n  # int8 values and the scales


def test_decode_gives_the_same_bits_the_encoder_kept():
    x = seeded(5_000, 6) * (torch.rand(5_000, generator=torch.Generator().manual_seed(7)) < 0.05)
    payload = bytes(TOPK.encode_reduced(x))
    assert torch.equal(TOPK.decode(payload, 5_000), TOPK.decode(bytearray(payload), 5_000))


# -- index coding ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "indices,n",
    [([], 0), ([], 100), ([0], 1), ([0], 1000), ([999], 1000), (list(range(1000)), 1000), ([0, 999], 1000),
     (list(range(0, 100_000, 97)), 100_000), ([5, 6, 7, 5000, 5001], 70_000)],
)
def test_indices_round_trip(indices, n):
    idx = np.array(indices, dtype=np.int64)
    bitmap, r, data = encode_indices(idx, n)
    got = decode_indices(np.frombuffer(data, dtype=np.uint8), bitmap, r, idx.size, n)
    assert got.tolist() == indices


@pytest.mark.parametrize("indices,n,bitmap", [(list(range(1000)), 1000, True), ([0, 500], 1000, False)])
def test_the_smaller_index_coding_is_chosen(indices, n, bitmap):
    assert encode_indices(np.array(indices, dtype=np.int64), n)[0] is bitmap


@pytest.mark.parametrize(
    "data,bitmap,r,m,n,says",
    [
        (b"\x80", False, 0, 2, 10, "codes 1 gaps"),
        (b"\x01", False, 0, 1, 5, "runs past"),
        (b"\x80\x00", False, 0, 1, 10, "trailing bytes"),
        (b"\xff\x80", False, 40, 1, 10, "out of range"),
        (b"\x80", True, 0, 1, 10, "bitmap has 1 bytes"),
        (b"\x00\x20", True, 0, 1, 10, "past the last"),
        (b"\x80\x00", True, 0, 2, 10, "marks 1 entries"),
        (b"", False, 3, 4, 100, "need 2 bytes"),
    ],
)
def test_malformed_indices_are_refused(data, bitmap, r, m, n, says):
    with pytest.raises(CodecError, match=says):
        decode_indices(np.frombuffer(data, dtype=np.uint8), bitmap, r, m, n)


# -- malformed payloads ---------------------------------------------------------------------------------------------


def _corrupt(payload: bytes, pos: int, value: int) -> bytes:
    out = bytearray(payload)
    out[pos] = value
    return bytes(out)


def test_malformed_payloads_raise_codec_error():
    n = 3 * BLOCK
    good = bytes(TOPK.encode(seeded(n)))
    dense = bytes(TOPK.encode_reduced(seeded(n)))
    bad = [
        good[:-1], good + b"\0", b"\x09" + good[1:], _corrupt(good, 1, 0xFF),  # length, kind, count
        _corrupt(good, 7, 0xFF), _corrupt(good, 9, 0xC0),  # a NaN and a negative scale (high bytes)
        b"\x00", b"\x02", dense[:-1], _corrupt(dense, 2, 0xFF), dense[:-1] + b"\x80",  # short, scale, -128
        b"\xff" * (TOPK.max_payload_size(n) + 1),  # above the bound
    ]
    for payload in bad:
        with pytest.raises(CodecError):
            TOPK.decode(payload, n)


def test_a_payload_above_the_bound_is_refused_before_anything_is_decoded():
    with pytest.raises(CodecError, match="does not fit"):
        TOPK.decode(bytes(TOPK.max_payload_size(10) + 1), 10)


# -- a real all-reduce --------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_members_of_a_real_round_end_with_identical_bits_and_the_sparse_mean():
    with ProcessGroup(3) as group:
        j = AllReduceJob(numel=6_000, codec="topk/16", first_round=next(_rounds), return_value=True,
                         error_feedback=True)
        replies = group.allreduce(j)
    assert [r[0] for r in replies] == ["ok"] * 3, replies
    values = [torch.tensor(r[1]["value"]) for r in replies]
    assert len({r[1]["sha256"] for r in replies}) == 1
    # Every member's contribution, its own part included, was sparsified (1 in 16 per block) before the mean;
    # the gather's int8 then rounds each value by at most half a step of its block's scale.
    want = torch.stack([_sparsified(j, r) for r in range(3)]).mean(0)
    assert torch.allclose(values[0], want, rtol=0, atol=float(want.abs().max()) / 250)


def _sparsified(j: AllReduceJob, rank: int) -> torch.Tensor:
    """A rank's tensor sparsified part by part, as the round cuts it (3 parts of one chunk each)."""
    from collectives.reduce.parts import part_bounds

    codec, x = make_codec("topk/16"), worker_tensor(j, rank)
    return torch.cat([codec.decode(codec.encode(x[a:b]), b - a) for a, b in part_bounds(j.numel, 3)])
