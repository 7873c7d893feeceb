"""Aggregators: what the owner of a part computes, and how whole-vector statistics travel as additive shares.

The robust aggregators are checked through a simulated butterfly (parts of uneven length, shares summed in part
order, decisions, then each part reduced in chunks) against brute-force references written here from the papers'
definitions on whole vectors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from collectives.errors import ConfigError
from collectives.reduce.aggregators import (
    AGGREGATORS,
    Aggregator,
    AggregatorConfig,
    BadShares,
    BadWeights,
    aggregate_rows,
    combine_shares,
    make_aggregator,
    register_aggregator,
)
from collectives.reduce.parts import chunk_bounds, part_bounds
from collectives.reduce.robust import closest_to_median
from tests.support.robust_reference import (
    brute_bulyan,
    brute_centered_clip,
    brute_krum_ranking,
    brute_krum_scores,
    brute_norm_clip,
    clustered,
    mean_loop,
    weighted_sum_loop,
)

ALL_CONFIGS = [
    "mean",
    "sum",
    "median",
    "trimmed_mean:trim=0.2",
    "norm_clip:clip=20",
    "krum:f=1",
    "multi_krum:f=1",
    "multi_krum:f=1,m=2",
    "bulyan:f=1",
    "centered_clip:iterations=2,tau=20",
]
WHOLE_VECTOR_CONFIGS = [c for c in ALL_CONFIGS if make_aggregator(c).stat_rounds(7) > 0]


def rows(n: int, length: int = 1000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, length), generator=g, dtype=torch.float32) * 3


def butterfly(agg: Aggregator, x: torch.Tensor, weights: Sequence[float], parts: int | None = None):
    """Simulate the all-reduce: P parts of uneven length, shares summed in part order, decisions, then each part
    reduced in three column chunks and the results concatenated. Returns (result, decisions)."""
    n, numel = x.shape
    bounds = part_bounds(numel, parts or n)
    decisions: list[dict] = []
    for r in range(agg.stat_rounds(n)):
        total = torch.zeros(agg.share_numel(n, r), dtype=torch.float64)
        for a, b in bounds:
            share = agg.share(r, x[:, a:b].contiguous(), weights, decisions)
            assert share.dtype == torch.float64 and share.shape == (agg.share_numel(n, r),)
            total += share
        decision = agg.decide(r, total, weights, decisions)
        decisions.append(decision)
    reduce = agg.prepare(weights, decisions)
    out = []
    for a, b in bounds:
        owned = x[:, a:b].contiguous()  # the owner's rows, as its inbox holds them
        for c0, c1 in chunk_bounds(0, b - a, max(1, math.ceil((b - a) / 3))):
            out.append(reduce(owned[:, c0:c1]))
    return torch.cat(out), decisions


def local_decisions(agg: Aggregator, x: torch.Tensor, weights: Sequence[float]) -> list[dict]:
    """The decisions of every statistic round from the whole rows (a single part)."""
    decisions: list[dict] = []
    for r in range(agg.stat_rounds(x.shape[0])):
        decisions.append(agg.decide(r, agg.share(r, x, weights, decisions), weights, decisions))
    return decisions


# -- per-coordinate aggregators --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_weighted_mean_matches_numpy_average(n):
    x = rows(n)
    w = [float(i + 1) for i in range(n)]
    got = aggregate_rows(make_aggregator("mean"), x, w)
    want = np.average(x.numpy().astype(np.float64), axis=0, weights=w)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", [[1.0, 2.0, 3.0, 4.0, 5.0], [0.1, 0.0, 7.0, 1e-3, 2.5]])
def test_mean_is_bit_identical_to_the_rank_order_loop(weights):
    x = rows(5)
    assert torch.equal(aggregate_rows(make_aggregator("mean"), x, weights), mean_loop(x, weights))


def test_sum_is_bit_identical_to_the_rank_order_loop():
    x = rows(4)
    w = [1.5, -0.5, 2.0, 0.25]
    want = weighted_sum_loop(x, torch.tensor(w, dtype=torch.float64).to(torch.float32))
    assert torch.equal(aggregate_rows(make_aggregator("sum"), x, w), want)


def test_mean_ignores_a_zero_weight_contribution():
    x = rows(3)
    got = aggregate_rows(make_aggregator("mean"), x, [1.0, 0.0, 1.0])
    np.testing.assert_allclose(got.numpy(), ((x[0].double() + x[2].double()) / 2).numpy(), rtol=1e-5, atol=1e-6)


def test_one_contribution_mean_is_exactly_that_contribution():
    x = rows(1)
    assert torch.equal(aggregate_rows(make_aggregator("mean"), x, [3.0]), x[0])


def test_sum_of_small_integers_is_exact():
    x = torch.arange(12, dtype=torch.float32).view(3, 4)
    assert aggregate_rows(make_aggregator("sum"), x, [1.0, 1.0, 1.0]).tolist() == [12.0, 15.0, 18.0, 21.0]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_median_equals_numpy_median_exactly(n):
    x = rows(n)
    got = aggregate_rows(make_aggregator("median"), x, [1.0] * n)
    assert np.array_equal(got.numpy(), np.median(x.numpy(), axis=0).astype(np.float32))


def test_median_ignores_one_absurd_contribution():
    x = torch.tensor([[1.0, 2.0], [1.5, 2.5], [1e30, -1e30]])
    assert aggregate_rows(make_aggregator("median"), x, [1.0] * 3).tolist() == [1.5, 2.0]


@pytest.mark.parametrize("n,trim", [(5, 0.2), (10, 0.1), (4, 0.25), (3, 0.0), (7, 0.3)])
def test_trimmed_mean_drops_int_trim_n_from_each_side(n, trim):
    x = rows(n)
    k = int(trim * n)
    kept = x if k == 0 else torch.sort(x, dim=0).values[k : n - k]  # nothing to drop: rank order, as before
    want = weighted_sum_loop(kept, torch.full((n - 2 * k,), 1.0 / (n - 2 * k)))
    got = aggregate_rows(make_aggregator(f"trimmed_mean:trim={trim}"), x, [1.0] * n)
    assert torch.equal(got, want)
    np.testing.assert_allclose(got.numpy(), np.sort(x.numpy().astype(np.float64), axis=0)[k : n - k].mean(axis=0),
                               rtol=1e-5, atol=1e-6)


# -- properties every aggregator has ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_reducing_a_column_slice_gives_the_same_bits_as_the_whole_part(config):
    agg = make_aggregator(config)
    x, w = rows(7, length=1000, seed=1), [1.0, 2.0, 0.5, 3.0, 1.0, 1.0, 4.0]
    reduce = agg.prepare(w, local_decisions(agg, x, w))
    whole = reduce(x)
    for a, b in [(0, 1), (1, 17), (17, 500), (500, 999), (999, 1000), (3, 3)]:
        assert torch.equal(reduce(x[:, a:b]), whole[a:b]), (a, b)


@pytest.mark.parametrize("config", ["mean", "trimmed_mean:trim=0.2", "bulyan:f=1", "centered_clip:tau=20"])
def test_large_parts_reduce_the_same_in_odd_slices_and_with_one_thread(config):
    # Large enough for torch's vectorised and multi-threaded kernels, cut at offsets that break their alignment.
    agg = make_aggregator(config)
    x, w = rows(7, length=100_003, seed=8), [1.0, 2.0, 0.5, 3.0, 1.0, 1.0, 4.0]
    reduce = agg.prepare(w, local_decisions(agg, x, w))
    whole = reduce(x)
    for a, b in [(1, 40_000), (40_000, 100_002), (7, 8)]:
        assert torch.equal(reduce(x[:, a:b]), whole[a:b]), (a, b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(reduce(x), whole)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("config", WHOLE_VECTOR_CONFIGS)
def test_shares_are_additive_over_column_splits(config):
    agg = make_aggregator(config)
    x, w = rows(7, length=1001, seed=2), [1.0] * 7
    decisions = []
    for r in range(agg.stat_rounds(7)):
        whole = agg.share(r, x, w, decisions)
        pieces = combine_shares([agg.share(r, x[:, a:b], w, decisions) for a, b in part_bounds(1001, 4)])
        np.testing.assert_allclose(pieces.numpy(), whole.numpy(), rtol=1e-12)
        decisions.append(agg.decide(r, whole, w, decisions))


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_the_butterfly_matches_the_local_run_on_whole_rows(config):
    # Per-coordinate and selection aggregators agree exactly; the clip factors may differ in the last float64 bit
    # (the norms are summed in another order), hence the tolerance for those.
    agg = make_aggregator(config)
    x, w = clustered(6, [2], seed=3), [1.0, 2.0, 1.0, 3.0, 1.0, 2.0, 1.0]
    got, _ = butterfly(agg, x, w)
    want = aggregate_rows(agg, x, w)
    if config.startswith(("norm_clip", "centered_clip")):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("config", WHOLE_VECTOR_CONFIGS)
def test_decisions_are_json_and_reproducible(config):
    agg = make_aggregator(config)
    x, w = clustered(6, [5], seed=4), [1.0] * 7
    _, first = butterfly(agg, x, w)
    _, again = butterfly(agg, x.clone(), w)
    assert first == again
    assert json.loads(json.dumps(first)) == first


def test_an_empty_part_still_sends_a_share_and_reduces_to_nothing():
    agg = make_aggregator("krum:f=1")
    x = clustered(4, [0], length=3)
    got, decisions = butterfly(agg, x, [1.0] * 5, parts=5)  # 3 columns over 5 parts: two parts are empty
    assert decisions[0]["selected"] == [brute_krum_ranking(x, 1, range(5))[0]]
    assert torch.equal(got, x[decisions[0]["selected"][0]])


def test_combine_shares_sums_in_rank_order_in_float64():
    shares = [torch.tensor([1e16, 1.0]), torch.tensor([1.0, 1e16]), torch.tensor([-1e16, -1e16])]
    # (1e16 + 1) rounds back to 1e16 in float64, so the order of the additions shows.
    assert combine_shares(shares).tolist() == [0.0, 0.0]
    assert combine_shares(shares).dtype == torch.float64


# -- robust aggregators against brute force ----------------------------------------------------------------------


def test_krum_picks_what_textbook_krum_picks_and_returns_it_exactly():
    x = clustered(5, [1, 4])  # 7 contributions, two far outliers
    agg = make_aggregator("krum:f=2")
    got, decisions = butterfly(agg, x, [1.0, 5.0, 1.0, 1.0, 5.0, 1.0, 1.0])
    chosen = brute_krum_ranking(x, 2, range(7))[0]
    assert decisions[0]["selected"] == [chosen]
    assert chosen not in (1, 4)
    np.testing.assert_allclose(decisions[0]["scores"], [brute_krum_scores(x, 2, range(7))[i] for i in range(7)],
                               rtol=1e-9)
    assert torch.equal(got, x[chosen])


@pytest.mark.parametrize("m", [0, 3])
def test_multi_krum_averages_the_m_lowest_scores_with_their_weights(m):
    x = clustered(5, [0, 6])
    w = [1.0, 2.0, 3.0, 0.5, 1.5, 2.5, 1.0]
    got, decisions = butterfly(make_aggregator(f"multi_krum:f=2,m={m}"), x, w)
    chosen = sorted(brute_krum_ranking(x, 2, range(7))[: m or 7 - 2])
    assert decisions[0]["selected"] == chosen
    assert not {0, 6} & set(chosen)
    assert torch.equal(got, mean_loop(x[chosen], [w[i] for i in chosen]))


@pytest.mark.parametrize("f,outliers", [(1, [3]), (2, [0, 5, 9])])
def test_bulyan_matches_the_papers_definition_exactly(f, outliers):
    n = 4 * f + 3
    x = clustered(n - len(outliers), outliers, length=201, seed=f)
    want_selected, want = brute_bulyan(x, f)
    got, decisions = butterfly(make_aggregator(f"bulyan:f={f}"), x, [1.0] * n)
    assert decisions[0]["selected"] == want_selected
    assert torch.equal(got, want)
    # The last Krum passes run on so few contributions that an outlier may be selected; the coordinate step
    # still keeps the result with the honest ones.
    honest = x[[i for i in range(n) if i not in outliers]].double().mean(dim=0)
    assert torch.dist(got.double(), honest) < 0.1 * torch.dist(x.double().mean(dim=0), honest)


def test_norm_clip_matches_whole_vector_clipping():
    # allclose: the norms are float64 sums in another order, and the result is accumulated in fp32.
    x = clustered(5, [2], seed=5)
    w = [1.0, 2.0, 1.0, 1.0, 3.0, 1.0]
    norms = sorted(x.double().norm(dim=1).tolist())
    clip = (norms[2] + norms[3]) / 2  # three contributions are clipped, three are not
    got, decisions = butterfly(make_aggregator(AggregatorConfig("norm_clip", {"clip": clip})), x, w)
    scales = sorted(decisions[0]["scales"])
    assert scales[2] < 1 and scales[3:] == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(got.numpy(), brute_norm_clip(x, w, clip), rtol=1e-5, atol=1e-5)


def test_norm_clip_leaves_short_vectors_alone():
    x = rows(3, length=10) * 0.01
    got = aggregate_rows(make_aggregator("norm_clip:clip=100"), x, [1.0, 1.0, 2.0])
    assert torch.equal(got, mean_loop(x, [1.0, 1.0, 2.0]))


@pytest.mark.parametrize("iterations", [1, 3])
def test_centered_clip_matches_whole_vector_iterations_from_the_median(iterations):
    # allclose: the distances are float64 sums in another order, and the updates are fp32.
    x = clustered(6, [0, 3], seed=6)
    w = [1.0, 2.0, 1.0, 1.0, 3.0, 1.0, 1.0, 2.0]
    got, decisions = butterfly(make_aggregator(f"centered_clip:tau=1,iterations={iterations}"), x, w)
    assert len(decisions) == iterations and all(min(d["scales"]) < 1 for d in decisions)
    np.testing.assert_allclose(got.numpy(), brute_centered_clip(x, w, 1.0, iterations), rtol=1e-4, atol=1e-5)


def test_centered_clip_resists_outliers_that_move_the_mean():
    x = clustered(6, [0, 3], seed=7)
    honest = x[[1, 2, 4, 5, 6, 7]].double().mean(dim=0)
    got = aggregate_rows(make_aggregator("centered_clip:tau=1,iterations=3"), x, [1.0] * 8)
    mean = x.double().mean(dim=0)
    assert torch.dist(got.double(), honest) < 0.1 * torch.dist(mean, honest)


# -- ties ---------------------------------------------------------------------------------------------------


def test_krum_breaks_equal_scores_by_lowest_rank():
    # Ranks 1 and 3 (values 1 and -1) have the same score, exactly: integer distances.
    x = torch.tensor([[-50.0], [1.0], [50.0], [-1.0]])
    agg = make_aggregator("krum:f=0")
    decision = agg.decide(0, agg.share(0, x, [1.0] * 4, []), [1.0] * 4, [])
    assert decision["scores"][1] == decision["scores"][3] < min(decision["scores"][0], decision["scores"][2])
    assert decision["selected"] == [1]


def test_multi_krum_breaks_equal_scores_by_lowest_rank():
    # Scores: 21 for ranks 1 and 3, 27 for rank 2, 77 for ranks 0 and 4 (tied for the last of the m = 4 places).
    x = torch.tensor([[5.0], [-1.0], [0.0], [1.0], [-5.0]])
    got, decisions = butterfly(make_aggregator("multi_krum:f=0,m=4"), x, [1.0] * 5)
    assert decisions[0]["scores"] == [77.0, 21.0, 27.0, 21.0, 77.0]
    assert decisions[0]["selected"] == [0, 1, 2, 3]
    assert got.tolist() == [1.25]


def test_bulyan_keeps_the_lower_of_two_values_equally_far_from_the_median():
    values = torch.tensor([[6.0], [2.0], [100.0], [-1.0], [3.0], [2.0]])  # median 2.5; -1 and 6 both 3.5 away
    assert closest_to_median(values, 4).flatten().tolist() == [-1.0, 2.0, 2.0, 3.0]


# -- group sizes, weights, corrupt shares ----------------------------------------------------------------------


def test_bulyan_refuses_fewer_than_4f_plus_3_contributions():
    agg = make_aggregator("bulyan:f=1")
    agg.check_group(7)
    with pytest.raises(ConfigError, match=r"bulyan needs at least 4f\+3 = 7 contributions \(f=1\), got 6; lower f"):
        agg.check_group(6)


def test_krum_refuses_fewer_than_2f_plus_3_contributions():
    make_aggregator("krum:f=2").check_group(7)
    with pytest.raises(ConfigError, match=r"krum needs at least 2f\+3 = 7 contributions \(f=2\), got 6; lower f"):
        make_aggregator("krum:f=2").check_group(6)
    with pytest.raises(ConfigError, match="2f"):
        aggregate_rows(make_aggregator("krum:f=2"), rows(6), [1.0] * 6)


def test_multi_krum_refuses_m_above_n():
    with pytest.raises(ConfigError, match="m=8 exceeds the 7 contributions"):
        make_aggregator("multi_krum:f=1,m=8").check_group(7)


MIN_GROUPS = [
    # (aggregator, the fewest contributions it runs with: what the coordinator forms rounds from)
    ("mean", 1),
    ("trimmed_mean", 1),
    ("krum:f=1", 5),
    ("krum:f=2", 7),
    ("multi_krum:f=1", 5),
    ("multi_krum:f=1,m=8", 8),
    ("bulyan:f=1", 7),
]


@pytest.mark.parametrize("config,least", MIN_GROUPS, ids=[c for c, _ in MIN_GROUPS])
def test_min_group_is_the_fewest_contributions_check_group_accepts(config, least):
    agg = make_aggregator(config)
    assert agg.min_group() == least
    agg.check_group(least)
    with pytest.raises(ConfigError):
        agg.check_group(least - 1)


@pytest.mark.parametrize("config", ["mean", "norm_clip", "multi_krum:f=0", "centered_clip"])
@pytest.mark.parametrize("weights", [[0.0, 0.0, 0.0], [1.0, -1.0, 1.0], [float("nan"), 1.0, 1.0]])
def test_mean_like_aggregators_reject_unusable_weights(config, weights):
    with pytest.raises(BadWeights):
        aggregate_rows(make_aggregator(config), rows(3), weights)


@pytest.mark.parametrize("config", ["sum", "median", "trimmed_mean", "krum:f=0", "bulyan:f=0"])
def test_every_aggregator_rejects_a_non_finite_weight(config):
    with pytest.raises(BadWeights, match="finite"):
        aggregate_rows(make_aggregator(config), rows(3), [1.0, float("inf"), 1.0])


def test_multi_krum_rejects_a_selection_whose_weights_are_all_zero():
    x = torch.tensor([[0.0], [0.1], [50.0], [60.0]])
    with pytest.raises(BadWeights, match="all zero"):
        aggregate_rows(make_aggregator("multi_krum:f=0,m=2"), x, [0.0, 0.0, 1.0, 1.0])


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf")])
def test_a_corrupt_summed_share_is_refused(bad):
    agg = make_aggregator("krum:f=0")
    total = torch.zeros(9, dtype=torch.float64)
    total[4] = bad
    with pytest.raises(BadShares, match="corrupt share"):
        agg.decide(0, total, [1.0] * 3, [])


def test_a_share_of_the_wrong_size_is_a_programming_error():
    with pytest.raises(ValueError, match="9 elements"):
        make_aggregator("krum:f=0").decide(0, torch.zeros(8, dtype=torch.float64), [1.0] * 3, [])


def test_rounds_and_share_sizes_are_declared():
    assert make_aggregator("mean").stat_rounds(5) == 0
    assert make_aggregator("krum").share_numel(5, 0) == 25
    assert make_aggregator("norm_clip").share_numel(5, 0) == 5
    cc = make_aggregator("centered_clip:iterations=4")
    assert cc.stat_rounds(5) == 4 and cc.share_numel(5, 3) == 5
    with pytest.raises(ValueError, match="no round 1"):
        make_aggregator("krum").share(1, rows(5), [1.0] * 5, [])


# -- configuration -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["mean", "trimmed_mean:trim=0.2", "multi_krum:f=1,m=3", "centered_clip:iterations=2,tau=0.3"]
)
def test_config_text_round_trips(text):
    config = AggregatorConfig.parse(text)
    assert str(config) == text
    assert AggregatorConfig.parse(str(config)) == config


def test_config_params_are_canonical():
    a = AggregatorConfig.parse(" multi_krum : m = 3 , f = 1 ")
    assert a == AggregatorConfig("multi_krum", {"f": 1, "m": 3})
    assert a == AggregatorConfig("multi_krum", (("m", 3.0), ("f", 1)))
    assert a.params == (("f", 1.0), ("m", 3.0)) and str(a) == "multi_krum:f=1,m=3"
    assert AggregatorConfig() == AggregatorConfig.parse("mean")


def test_make_aggregator_passes_params_with_their_annotated_types():
    agg = make_aggregator(AggregatorConfig.parse("centered_clip:tau=0.5,iterations=2"))
    assert (agg.tau, agg.iterations) == (0.5, 2) and type(agg.iterations) is int
    assert make_aggregator("krum").f == 1  # the constructor's default


def test_unknown_aggregator_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown aggregator 'mode'; choose one of .*bulyan.*trimmed_mean"):
        AggregatorConfig.parse("mode")


def test_unknown_param_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match="krum has no parameter 'g'; its parameters are: f"):
        AggregatorConfig.parse("krum:g=1")
    with pytest.raises(ConfigError, match="mean has no parameter 'trim'; its parameters are: none"):
        make_aggregator("mean:trim=0.1")


@pytest.mark.parametrize("text,match", [
    ("krum:f=1.5", "f must be an integer"),
    ("krum:f=-1", "f must be an integer >= 0"),
    ("trimmed_mean:trim=0.5", r"trim must be in \[0, 0.5\)"),
    ("norm_clip:clip=0", "clip must be a finite number > 0"),
    ("centered_clip:tau=-1", "tau must be a finite number > 0"),
    ("centered_clip:iterations=0", "iterations must be an integer >= 1"),
    ("krum:f=abc", "f must be a number"),
    ("krum:f", "must read key=value"),
    ("krum:f=1,f=2", "given twice"),
    ("krum:f=nan", "finite number"),
    # Counts beyond any round: they were accepted, and every peer died at its first quorum request (a uint32).
    ("krum:f=1e300", r"krum parameter f is beyond any round's size \(65536\), got 1e\+300"),
    ("multi_krum:m=5e9", r"multi_krum parameter m is beyond any round's size \(65536\), got 5e\+09"),
    ("krum:f=32767", r"krum needs 65537 contributions a round with these parameters, more than any round has"),
])
def test_bad_param_values_are_config_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        AggregatorConfig.parse(text)


# -- registry ------------------------------------------------------------------------------------------------


class FirstRow(Aggregator):
    """A toy plugin: the first contribution, times a factor."""

    name = "first_row"

    def __init__(self, *, scale: float = 1.0) -> None:
        self.scale = scale

    def prepare(self, weights, decisions):
        return lambda rows: rows[0] * self.scale


@pytest.fixture
def first_row():
    register_aggregator(FirstRow)
    yield FirstRow
    AGGREGATORS.pop(FirstRow.name)


def test_a_plugin_registered_from_outside_is_made_from_its_config(first_row):
    x = rows(3, length=5)
    agg = make_aggregator("first_row:scale=2")
    assert isinstance(agg, first_row) and agg.scale == 2.0
    assert torch.equal(aggregate_rows(agg, x, [1.0] * 3), x[0] * 2)
    assert register_aggregator(first_row) is first_row  # registering the same class again is harmless


def test_a_name_cannot_be_taken_by_another_class(first_row):
    class Impostor(FirstRow):
        pass

    with pytest.raises(ConfigError, match="'first_row' is already registered"):
        register_aggregator(Impostor)
    with pytest.raises(ConfigError, match="'mean' is already registered"):
        register_aggregator(type("Mean2", (FirstRow,), {"name": "mean"}))


def test_a_plugin_whose_params_are_not_keyword_only_is_refused():
    class Positional(Aggregator):
        name = "positional"

        def __init__(self, k: int = 1) -> None:
            self.k = k

        def prepare(self, weights, decisions):
            return lambda rows: rows[0]

    with pytest.raises(TypeError, match="keyword-only"):
        register_aggregator(Positional)
    assert "positional" not in AGGREGATORS
