"""Gradient codes: any n-s of n workers give the exact sum of the n partition gradients; fewer never give a
wrong one. Fractional repetition when s+1 divides n, real cyclic MDS codes for any s < n, one B per (n, s)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from collectives.errors import ConfigError, LoconetError
from collectives.gradcoding import gradcodes
from collectives.gradcoding.gradcodes import (
    CYCLIC,
    DEFAULT_MAX_CONDITION,
    FRC,
    RESIDUAL_TOLERANCE,
    Undecodable,
    build_code,
    burst_condition,
    code_for,
    combine,
    decodable,
    decode,
)

DIM = 64  # gradient length in the recovery tests
REL_TOL = 1e-5  # decoded fp32 sum against the exact (float64) sum, relative in the 2-norm


def kinds(n: int, s: int) -> list[str]:
    """The kinds that exist for (n, s): frc when s+1 divides n, cyclic always."""
    return [FRC, CYCLIC] if n % (s + 1) == 0 else [CYCLIC]


SMALL = [(n, s, kind) for n in range(1, 13) for s in range(n) for kind in kinds(n, s)]


def gradients(n: int, seed: int, integers: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if integers:
        return torch.randint(-1000, 1001, (n, DIM), generator=gen).to(torch.float32)
    return torch.randn(n, DIM, generator=gen)


def contributions(code: gradcodes.GradientCode, g: torch.Tensor) -> torch.Tensor:
    """What the n workers send: each one's fp32 coded combination, as the training code computes it."""
    return torch.stack([combine(code, i, {j: g[j] for j in code.support(i)}) for i in range(code.n)])


def decoded_sums(code: gradcodes.GradientCode, decoded: list[tuple[list[int], np.ndarray]],
                 sent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoded sum per (survivors, a), as the real system forms it (fp32 contributions times fp32
    weights, summed in fp32), and the same in float64; also checks each a solves B_F^T a = 1."""
    weights = np.zeros((len(decoded), code.n))
    for r, (survivors, a) in enumerate(decoded):
        assert a.shape == (len(survivors),) and a.dtype == np.float64
        assert np.abs(code.B[survivors].T @ a - 1).max() <= RESIDUAL_TOLERANCE, (code, survivors)
        weights[r, survivors] = a
    return torch.from_numpy(weights.astype(np.float32)) @ sent, torch.from_numpy(weights) @ sent.double()


def assert_exact(code: gradcodes.GradientCode, survivor_sets: list[list[int]], g: torch.Tensor) -> None:
    """Every one of these survivor sets decodes the sum of g's rows within REL_TOL, in fp32 and in fp64."""
    if not survivor_sets:
        return
    decoded = [(survivors, decode(code, survivors)) for survivors in survivor_sets]
    exact = g.double().sum(0)
    for got in decoded_sums(code, decoded, contributions(code, g)):
        errors = torch.linalg.vector_norm(got.double() - exact, dim=1) / torch.linalg.vector_norm(exact)
        assert float(errors.max()) < REL_TOL, (code, survivor_sets[int(errors.argmax())], float(errors.max()))


def all_but(n: int, stragglers) -> list[int]:
    return [i for i in range(n) if i not in stragglers]


# -- the structure of the codes ---------------------------------------------------------------------------


@pytest.mark.parametrize("n,s,kind", SMALL)
def test_every_partition_is_held_by_exactly_s_plus_1_workers(n, s, kind):
    code = build_code(n, s, kind)
    nonzero = code.B != 0
    assert [len(code.support(i)) for i in range(n)] == [s + 1] * n
    assert [len(code.holders(j)) for j in range(n)] == [s + 1] * n
    for i in range(n):
        # The support is exactly the non-zero coefficients (an MDS codeword of weight s+1 has no zero inside).
        assert tuple(np.flatnonzero(nonzero[i])) == code.support(i)
        assert code.coefficients(i) == tuple(code.B[i, j] for j in code.support(i))
        assert code.row(i) == tuple(code.B[i])
    for j in range(n):
        assert tuple(np.flatnonzero(nonzero[:, j])) == code.holders(j)
    assert code.load == (s + 1) / n
    assert code.min_survivors == n - s


@pytest.mark.parametrize("n,s", [(n, s) for n in range(1, 13) for s in range(n)])
def test_cyclic_supports_are_the_cyclic_windows(n, s):
    code = build_code(n, s, CYCLIC)
    assert code.groups == ()
    for i in range(n):
        assert code.support(i) == tuple(sorted({(i + k) % n for k in range(s + 1)}))


@pytest.mark.parametrize("n,s", [(6, 1), (6, 2), (8, 3), (12, 2), (9, 0), (4, 3)])
def test_frc_supports_are_the_groups(n, s):
    code = build_code(n, s, FRC)
    assert code.groups == tuple(tuple(range(g, g + s + 1)) for g in range(0, n, s + 1))
    for group in code.groups:
        for i in group:
            assert code.support(i) == group
            assert code.coefficients(i) == (1.0,) * (s + 1)


@pytest.mark.parametrize(
    "n,s,kind",
    [(6, 1, FRC), (6, 2, FRC), (6, 3, CYCLIC), (7, 1, CYCLIC), (7, 6, FRC), (7, 0, FRC), (12, 3, FRC),
     (12, 4, CYCLIC), (1, 0, FRC), (24, 3, FRC), (16, 2, CYCLIC)],
)
def test_auto_is_frc_when_s_plus_1_divides_n_else_cyclic(n, s, kind):
    assert build_code(n, s).kind == kind


@pytest.mark.parametrize("n", range(1, 13))
@pytest.mark.parametrize("kind", [FRC, CYCLIC])
def test_no_straggler_tolerance_is_the_identity(n, kind):
    code = build_code(n, 0, kind)
    assert np.array_equal(code.B, np.eye(n))
    assert list(decode(code, list(range(n)))) == [1.0] * n


@pytest.mark.parametrize("n", range(1, 13))
@pytest.mark.parametrize("kind", [FRC, CYCLIC])
def test_n_minus_1_stragglers_give_every_worker_everything_and_any_one_decodes(n, kind):
    code = build_code(n, n - 1, kind)
    assert all(code.support(i) == tuple(range(n)) for i in range(n))
    ones = torch.ones(n, DIM)
    for i in range(n):
        a = decode(code, [i])
        assert np.allclose(a[0] * code.B[i], 1.0, rtol=1e-14, atol=0)
    if kind == FRC:
        assert np.array_equal(code.B, np.ones((n, n)))
        in_fp32, _ = decoded_sums(code, [([n - 1], decode(code, [n - 1]))], contributions(code, ones))
        assert in_fp32.eq(n).all()


def test_the_cyclic_rows_are_the_real_bch_generator_normalised():
    # n=7, s=2 (n-s odd): zeros exp(+-i*6pi/7), so row 0 is (1, 2cos(pi/7), 1) / (2 + 2cos(pi/7)).
    c = math.cos(math.pi / 7)
    assert build_code(7, 2).coefficients(0) == pytest.approx((1 / (2 + 2 * c), 2 * c / (2 + 2 * c), 1 / (2 + 2 * c)),
                                                             rel=1e-15)
    # Every shift of that row: a circulant whose columns sum to 1, so all 7 workers decode with a = 1.
    b = build_code(7, 2).B
    assert all(np.array_equal(np.roll(b[0], i), b[i]) for i in range(7))
    assert np.allclose(decode(build_code(7, 2), list(range(7))), 1.0, rtol=1e-12)


@pytest.mark.parametrize("n,s", [(6, 2), (4, 2), (9, 3), (12, 10), (11, 1)])
def test_when_n_minus_s_is_even_the_rows_are_negacyclic_shifts_with_scaled_columns(n, s):
    # No real cyclic code exists then; a shift past the end flips the sign, and column j is divided by v_j,
    # which makes the all-ones row a codeword. For n=6, s=2 the zeros are exp(+-5i*pi/6): h = (1, sqrt 3, 1).
    code = build_code(n, s, CYCLIC)
    w = 1 / np.diag(code.B)  # B[j, j] = h_0 / v_j (no wrap on the diagonal), so w is v / h_0
    h = code.B[0, : s + 1] * w[: s + 1]
    h = h / h.sum()  # the generator is normalised to sum 1
    v = w * h[0]
    unscaled = code.B * v
    for i in range(n):
        for k in range(s + 1):
            assert unscaled[i, (i + k) % n] == pytest.approx(-h[k] if i + k >= n else h[k], rel=1e-12)
    assert v[0] == pytest.approx((n - s) / n, rel=1e-12)
    assert np.all((v >= (n - s) / n - 1e-12) & (v <= 4 / 3 + 1e-12))
    if (n, s) == (6, 2):
        assert h == pytest.approx(np.array([1, math.sqrt(3), 1]) / (2 + math.sqrt(3)), rel=1e-14)


# -- exact recovery ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(1, 13))
def test_any_n_minus_s_workers_recover_the_exact_sum_exhaustively(n):
    """Every straggler set of size <= s, every s < n, both kinds: fp32 payloads decode within 1e-5."""
    g = gradients(n, seed=n)
    for s in range(n):
        for kind in kinds(n, s):
            sets = [all_but(n, lost) for k in range(s + 1) for lost in itertools.combinations(range(n), k)]
            assert_exact(build_code(n, s, kind), sets, g)


@pytest.mark.parametrize("n", [16, 24])
@pytest.mark.parametrize("s", [1, 2, 3])
@pytest.mark.parametrize("kind", ["auto", CYCLIC])
def test_larger_codes_recover_the_exact_sum_on_sampled_straggler_sets(n, s, kind):
    rng = np.random.default_rng(1000 * n + s)
    sampled = [rng.choice(n, size=int(rng.integers(0, s + 1)), replace=False).tolist() for _ in range(200)]
    bursts = [[(start + k) % n for k in range(s)] for start in range(n)]  # the worst patterns
    assert_exact(build_code(n, s, kind), [all_but(n, lost) for lost in sampled + bursts], gradients(n, seed=n + s))


@pytest.mark.parametrize("n,s", [(n, s) for n in range(1, 13) for s in range(n) if n % (s + 1) == 0])
def test_fractional_repetition_is_bitwise_exact_on_integer_gradients(n, s):
    code = build_code(n, s, FRC)
    g = gradients(n, seed=7 * n + s, integers=True)
    sets = [all_but(n, lost) for k in range(s + 1) for lost in itertools.combinations(range(n), k)]
    decoded = [(survivors, decode(code, survivors)) for survivors in sets]
    assert all(set(a) <= {0.0, 1.0} for _, a in decoded)
    in_fp32, _ = decoded_sums(code, decoded, contributions(code, g))
    assert torch.equal(in_fp32, g.sum(0).expand_as(in_fp32))


def test_frc_decodes_with_the_lowest_surviving_rank_of_each_group():
    code = build_code(6, 2, FRC)
    assert list(decode(code, [5, 4, 2, 1])) == [0.0, 1.0, 0.0, 1.0]
    assert list(decode(code, [0, 1, 2, 3, 4, 5])) == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_the_coefficients_follow_the_order_the_survivors_are_given_in():
    code = build_code(7, 2)
    a = decode(code, [0, 2, 3, 5, 6])
    b = decode(code, [6, 5, 3, 2, 0])
    assert np.allclose(a, b[::-1], rtol=1e-12)


def test_more_survivors_than_needed_use_all_of_them_with_the_least_norm():
    code = build_code(8, 3, CYCLIC)
    everyone = decode(code, list(range(8)))
    assert np.all(everyone != 0)
    for five in itertools.combinations(range(8), 5):
        assert np.linalg.norm(everyone) <= np.linalg.norm(decode(code, list(five))) + 1e-12


# -- never a wrong sum ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(2, 10))
def test_more_than_s_stragglers_never_give_a_wrong_sum(n):
    """Beyond s stragglers a set is refused, or its rows still span the all-ones row and the sum is exact
    (frc: while every group has a survivor; cyclic with composite n: e.g. n=4, s=1 with workers 1 and 3)."""
    g = gradients(n, seed=n)
    for s in range(n - 1):
        for kind in kinds(n, s):
            code = build_code(n, s, kind)
            accepted = []
            for lost in range(s + 1, n + 1):
                for stragglers in itertools.combinations(range(n), lost):
                    survivors = all_but(n, stragglers)
                    ok = decodable(code, survivors)
                    if kind == FRC:
                        assert ok == all(set(group) - set(stragglers) for group in code.groups)
                    if ok:
                        accepted.append(survivors)
                    else:
                        with pytest.raises(Undecodable, match="^undecodable"):
                            decode(code, survivors)
            assert_exact(code, accepted, g)


@pytest.mark.parametrize("n", [2, 3, 5, 7])
def test_with_a_prime_number_of_workers_more_than_s_stragglers_are_always_refused(n):
    for s in range(n - 1):
        code = build_code(n, s, CYCLIC)
        for lost in range(s + 1, n + 1):
            for stragglers in itertools.combinations(range(n), lost):
                assert not decodable(code, all_but(n, stragglers))


def test_the_undecodable_error_says_why():
    with pytest.raises(Undecodable, match=r"3 stragglers.*tolerates 2.*residual of [0-9.e+-]+ \(> 1e-09\)") as info:
        decode(build_code(7, 2), [0, 1, 2, 3])
    assert info.value.residual > RESIDUAL_TOLERANCE and info.value.survivors == (0, 1, 2, 3)
    assert isinstance(info.value, LoconetError)
    with pytest.raises(Undecodable, match=r"group 1 \(workers \[2, 3\]\) has no survivor"):
        decode(build_code(6, 1), [0, 1, 4, 5])


def test_no_survivors_is_undecodable():
    with pytest.raises(Undecodable, match="no survivors"):
        decode(build_code(5, 1), [])


def test_a_badly_conditioned_set_is_undecodable_until_more_workers_arrive():
    code = build_code(12, 6, CYCLIC, max_condition=100.0)  # its worst set, six consecutive stragglers: 294
    burst = list(range(6, 12))
    with pytest.raises(Undecodable, match=r"badly conditioned.*condition number of 29[0-9] \(> 100\)") as info:
        decode(code, burst)
    assert info.value.residual <= RESIDUAL_TOLERANCE
    assert not decodable(code, burst)
    assert decodable(code, list(range(12)))  # waiting for everyone helps
    assert decodable(build_code(12, 6, CYCLIC), burst)  # and the default bound accepts it


def test_decodable_agrees_with_decode():
    code = build_code(9, 2, CYCLIC)
    for k in (6, 7, 8):
        for survivors in itertools.combinations(range(9), k):
            assert decodable(code, list(survivors)) == (k >= 7)


@pytest.mark.parametrize(
    "survivors,match",
    [([0, 0, 1, 2], "distinct"), ([0, 1, 5], r"in \[0, 5\)"), ([-1, 1, 2], r"in \[0, 5\)"),
     ([0.0, 1, 2], r"in \[0, 5\)"), ([True, 2, 3], r"in \[0, 5\)"), (3, "sequence")],
)
def test_survivors_must_be_distinct_worker_indices(survivors, match):
    code = build_code(5, 1)
    with pytest.raises(ConfigError, match=match):
        decode(code, survivors)
    with pytest.raises(ValueError, match=match):
        decodable(code, survivors)


# -- building ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,match",
    [((0, 0), r"n workers in \[1, 256\]"), ((257, 1), r"n workers in \[1, 256\]"), ((4.0, 1), "n workers"),
     ((True, 0), "n workers"), ((4, 4), "0 <= s < n"), ((4, -1), "0 <= s < n"), ((4, 1.0), "0 <= s < n"),
     ((4, 1, "random"), "one of auto, frc, cyclic"), ((7, 2, "frc"), "3 does not divide 7"),
     ((4, 1, "auto", 0.5), "max_condition")],
)
def test_build_code_rejects_bad_arguments(args, match):
    with pytest.raises(ConfigError, match=match):
        build_code(*args)


def test_the_same_n_and_s_give_bitwise_the_same_code_on_every_call():
    first = build_code(11, 3)
    assert build_code(11, 3) is first  # cached
    fresh = gradcodes._build.__wrapped__(11, 3, CYCLIC, DEFAULT_MAX_CONDITION)  # built again, not cached
    assert fresh is not first and fresh == first and fresh.B.tobytes() == first.B.tobytes()
    assert build_code(11, 3, CYCLIC) == first and hash(build_code(11, 3, CYCLIC)) == hash(first)


def test_a_code_cannot_be_changed():
    code = build_code(5, 2)
    with pytest.raises(ValueError, match="read-only"):
        code.B[0, 0] = 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        code.s = 1  # type: ignore[misc]


def test_rebuilding_after_a_join_and_after_a_leave_gives_valid_codes_and_the_same_one_back():
    before = build_code(6, 1)  # frc
    before_bits = before.B.tobytes()
    joined, left = build_code(7, 1), build_code(5, 1)  # cyclic: 2 does not divide 7 or 5
    assert (before.kind, joined.kind, left.kind) == (FRC, CYCLIC, CYCLIC)
    for code in (joined, left):
        assert_exact(code, [all_but(code.n, [straggler]) for straggler in [None, *range(code.n)]],
                     gradients(code.n, seed=code.n))
    gradcodes._build.cache_clear()
    assert build_code(6, 1).B.tobytes() == before_bits


def test_code_for_caps_the_tolerance_at_n_minus_1():
    assert code_for(3, 5) == build_code(3, 2)
    assert code_for(6, 1, CYCLIC) == build_code(6, 1, CYCLIC)


# -- conditioning -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(2, 11))
def test_a_burst_of_s_consecutive_stragglers_is_the_worst_pattern(n):
    for s in range(1, n):
        code = build_code(n, s, CYCLIC)
        worst = max(_condition(code.B[list(alive)]) for alive in itertools.combinations(range(n), n - s))
        assert burst_condition(code) == pytest.approx(worst, rel=1e-9)


@pytest.mark.parametrize("n,s,condition", [(12, 1, 7.6), (12, 3, 75.6), (12, 6, 294), (16, 3, 186), (24, 3, 645)])
def test_the_worst_condition_numbers_stay_small_for_the_sizes_we_run(n, s, condition):
    assert burst_condition(build_code(n, s, CYCLIC)) == pytest.approx(condition, rel=0.01)


def test_fractional_repetition_has_condition_1():
    assert burst_condition(build_code(12, 2)) == 1.0


def _condition(rows: np.ndarray) -> float:
    sigma = np.linalg.svd(rows, compute_uv=False)
    return float(sigma[0] / sigma[-1])


# -- combining a worker's partition gradients -------------------------------------------------------------


def test_combine_is_the_coded_combination_rounded_once():
    code = build_code(7, 3)
    g = gradients(7, seed=3)
    for i in range(7):
        reference = sum(code.B[i, j] * g[j].double().numpy() for j in code.support(i))
        assert np.array_equal(combine(code, i, {j: g[j] for j in code.support(i)}).numpy(),
                              reference.astype(np.float32))


def test_combine_is_deterministic_whatever_the_order_of_the_mapping():
    code = build_code(10, 3)
    g = gradients(10, seed=4)
    forward = {j: g[j] for j in code.support(2)}
    backward = dict(reversed(list(forward.items())))
    assert torch.equal(combine(code, 2, forward), combine(code, 2, backward))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_combine_keeps_the_gradients_shape_and_dtype(dtype):
    code = build_code(5, 1)
    grads = {j: torch.ones(3, 4, dtype=dtype) for j in code.support(4)}
    out = combine(code, 4, grads)
    assert out.shape == (3, 4) and out.dtype == dtype


@pytest.mark.parametrize(
    "grads,match",
    [({0: torch.ones(3)}, r"missing \[1\]"),
     ({0: torch.ones(3), 1: torch.ones(3), 2: torch.ones(3)}, r"extra \[2\]"),
     ({0: torch.ones(3), 1: torch.ones(4)}, "share shape"),
     ({0: torch.ones(3), 1: torch.ones(3, dtype=torch.float64)}, "share shape, dtype"),
     ({0: torch.ones(3, dtype=torch.int64), 1: torch.ones(3, dtype=torch.int64)}, "floating-point"),
     ({0: np.ones(3), 1: np.ones(3)}, "floating-point tensor")],
)
def test_combine_rejects_gradients_that_are_not_the_workers_partitions(grads, match):
    with pytest.raises(ConfigError, match=match):
        combine(build_code(6, 1), 0, grads)
