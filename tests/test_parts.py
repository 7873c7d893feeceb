"""Cutting a round's tensor into parts and chunks, flattening and restoring tensors."""

import pytest
import torch

from collectives.reduce.parts import chunk_bounds, flatten, part_bounds, unflatten_like


@pytest.mark.parametrize("numel,n", [(10, 3), (0, 4), (2, 5), (1_000_003, 7), (5, 5)])
def test_parts_cover_the_tensor_contiguously_with_balanced_sizes(numel, n):
    bounds = part_bounds(numel, n)
    assert len(bounds) == n
    assert bounds[0][0] == 0 and bounds[-1][1] == numel
    assert all(bounds[j][1] == bounds[j + 1][0] for j in range(n - 1))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_tensor_shorter_than_group_leaves_empty_parts():
    assert part_bounds(2, 4) == [(0, 0), (0, 1), (1, 1), (1, 2)]


def test_chunks_cover_range_in_order():
    assert chunk_bounds(10, 35, 10) == [(10, 20), (20, 30), (30, 35)]


def test_empty_range_is_one_empty_chunk():
    assert chunk_bounds(7, 7, 100) == [(7, 7)]


def test_flatten_and_restore_a_list_keeps_shapes_dtypes_and_values():
    ts = [torch.arange(6.0).view(2, 3), torch.tensor([7.0], dtype=torch.float64), torch.zeros(0), torch.ones(2, 1, 2)]
    flat = flatten(ts)
    assert flat.dtype == torch.float32 and flat.numel() == 11
    back = unflatten_like(flat, ts)
    for a, b in zip(ts, back):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def test_flatten_copies_so_later_changes_do_not_leak():
    t = torch.ones(4)
    flat = flatten(t)
    t.add_(1)
    assert flat.tolist() == [1.0] * 4


def test_restore_rejects_a_flat_tensor_of_the_wrong_size():
    with pytest.raises(ValueError):
        unflatten_like(torch.zeros(5), [torch.zeros(2), torch.zeros(2)])
