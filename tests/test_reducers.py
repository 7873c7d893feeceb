"""Reducers against numpy: what the owner of a part computes from the members' rows."""

import numpy as np
import pytest
import torch

from collectives.errors import ConfigError
from collectives.reducers import BadWeights, ReducerConfig, reduce_rows


def rows(n: int, length: int = 1000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, length), generator=g, dtype=torch.float32) * 3


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_weighted_mean_matches_numpy_average(n):
    x = rows(n)
    w = [float(i + 1) for i in range(n)]
    got = reduce_rows(ReducerConfig("mean"), x, w)
    want = np.average(x.numpy().astype(np.float64), axis=0, weights=w)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_mean_with_equal_weights_is_the_plain_mean():
    x = rows(4)
    got = reduce_rows(ReducerConfig("mean"), x, [7.0] * 4)
    np.testing.assert_allclose(got.numpy(), x.numpy().astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-6)


def test_mean_ignores_a_zero_weight_contribution():
    x = rows(3)
    got = reduce_rows(ReducerConfig("mean"), x, [1.0, 0.0, 1.0])
    want = (x[0].double() + x[2].double()) / 2
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_one_contribution_mean_is_exactly_that_contribution():
    x = rows(1)
    assert torch.equal(reduce_rows(ReducerConfig("mean"), x, [3.0]), x[0])


def test_weighted_sum_allows_negative_coefficients():
    x = rows(3)
    w = [1.5, -0.5, 2.0]
    got = reduce_rows(ReducerConfig("sum"), x, w)
    want = sum(wi * x[i].double() for i, wi in enumerate(w))
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_sum_of_small_integers_is_exact():
    x = torch.arange(12, dtype=torch.float32).view(3, 4)
    got = reduce_rows(ReducerConfig("sum"), x, [1.0, 1.0, 1.0])
    assert got.tolist() == [12.0, 15.0, 18.0, 21.0]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_median_equals_numpy_median_exactly(n):
    x = rows(n)
    got = reduce_rows(ReducerConfig("median"), x, [1.0] * n)
    assert np.array_equal(got.numpy(), np.median(x.numpy(), axis=0).astype(np.float32))


def test_median_ignores_one_absurd_contribution():
    x = torch.tensor([[1.0, 2.0], [1.5, 2.5], [1e30, -1e30]])
    assert reduce_rows(ReducerConfig("median"), x, [1.0] * 3).tolist() == [1.5, 2.0]


@pytest.mark.parametrize("n,trim", [(5, 0.2), (10, 0.1), (4, 0.25), (3, 0.0), (7, 0.3)])
def test_trimmed_mean_matches_numpy(n, trim):
    x = rows(n)
    k = int(trim * n)
    srt = np.sort(x.numpy().astype(np.float64), axis=0)
    want = srt[k : n - k].mean(axis=0)
    got = reduce_rows(ReducerConfig("trimmed_mean", trim=trim), x, [1.0] * n)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_reducers_are_deterministic():
    x = rows(5)
    for name in ("mean", "sum", "median", "trimmed_mean"):
        cfg = ReducerConfig(name, trim=0.2)
        assert torch.equal(reduce_rows(cfg, x, [1.0, 2, 3, 4, 5]), reduce_rows(cfg, x.clone(), [1.0, 2, 3, 4, 5]))


@pytest.mark.parametrize("weights", [[0.0, 0.0], [1.0, -1.0], [float("nan"), 1.0], [float("inf"), 1.0]])
def test_mean_rejects_unusable_weights(weights):
    with pytest.raises(BadWeights):
        reduce_rows(ReducerConfig("mean"), rows(2), weights)


def test_unknown_reducer_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown reducer"):
        ReducerConfig("mode")


def test_trim_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="trim"):
        ReducerConfig("trimmed_mean", trim=0.5)
