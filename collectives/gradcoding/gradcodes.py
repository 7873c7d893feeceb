"""Gradient codes: the exact sum of n partition gradients from any n-s of n workers.

The data is cut into n partitions and worker i computes the gradients of the partitions in the support
of row i of an n x n encoding matrix B (s+1 of them), and sends ``c_i = sum_j B[i, j] g_j``. From any
set F of at least n-s workers there is a vector a with ``sum_{i in F} a_i B[i] = 1`` (the all-ones row),
so ``sum_{i in F} a_i c_i`` is the sum of every partition's gradient (Tandon et al., "Gradient coding",
ICML 2017). Coefficients may be negative. Two codes, both derived from (n, s) alone, so that every peer
builds the same B with no shared randomness:

``frc`` (fractional repetition, when s+1 divides n)
    n/(s+1) groups of s+1 consecutive workers; every worker of a group holds the group's s+1 partitions
    with coefficient 1. A group survives while one of its workers does; the decoder takes the lowest
    surviving rank of each group with coefficient 1, so the sum is bitwise exact on integer-valued
    gradients.

``cyclic`` (any s < n; Raviv, Tamo, Tandon, Dimakis, "Gradient coding from cyclic MDS codes and expander
graphs", ICML 2018)
    Worker i holds the cyclic window {i, ..., i+s} mod n, and its row is the generator polynomial of a
    real MDS code shifted by i. Any n-s rows span the code, and the code contains the all-ones row, so any
    n-s workers decode. The generator's zeros are the s points ``exp(i*pi*(n-s+1+2m)/n)``, m < s: spaced
    2*pi/n apart and centred on -1, so they come in conjugate pairs (the polynomial is real) and are
    consecutive (the BCH bound makes the code MDS). When n-s is odd they are n-th roots of unity: a cyclic
    code, the paper's real BCH construction, which contains the all-ones row since 1 is not a zero.
    When n-s is even no real cyclic code works (none exists for odd n, whose zeros would have to include
    1; none was found for even n <= 10; for n=4, s=2 the windows force an imaginary coefficient), so the
    zeros are roots of x^n + 1 instead: a negacyclic code (a shift past the end flips the sign), still real
    and MDS, whose column j is then divided by v_j, v being the projection of the all-ones row onto the
    code (every v_j lies in [(n-s)/n, 4/3]); the scaled code contains the all-ones row and keeps the
    windows. Among all real (nega)cyclic codes with these windows, these zeros were the best conditioned,
    or within 1.4x of the best, for every n <= 10 (and the others are not MDS in general).

    The worst straggler pattern is a contiguous burst of s workers (checked exhaustively for n <= 12).
    Its condition number grows like n^s: 7.6 at n=12, s=1; 294 at n=12, s=6; 645 at n=24, s=3; 1.2e4 at
    n=64, s=3 (``burst_condition``).

s = 0 gives B = I and s = n-1 gives every worker every partition, in both kinds; ``auto`` picks frc
whenever s+1 divides n (so s = 0 and s = n-1 are always frc), cyclic otherwise.

Decoding works in float64: the minimum-norm solution of ``B_F^T a = 1`` over the survivors' rows (all of
them when there are more than n-s), accepted only when the residual ``||B_F^T a - 1||_inf`` is at most
``RESIDUAL_TOLERANCE`` and the condition number of B_F (over its non-zero singular values) at most the
code's ``max_condition``; otherwise ``Undecodable`` says which failed and the round waits for more
workers (more never hurt: the minimum-norm decoding only shrinks, and wherever checked, n <= 12, a
superset's condition number was below the worst set of n-s). A sum decoded from fp32 payloads is off by
at most about condition x 2^-24 relative (measured: 2.5e-6 at condition 294); ``DEFAULT_MAX_CONDITION``
= 1e4 keeps that below ~6e-4.

Pure functions over immutable data, cached per (n, s, kind, max_condition); no I/O.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from collectives.errors import ConfigError, LoconetError

AUTO = "auto"
FRC = "frc"
CYCLIC = "cyclic"
CODE_KINDS = (AUTO, FRC, CYCLIC)

# Decodes that would amplify the payloads' rounding errors more than this are refused (fp32: ~6e-4 relative).
DEFAULT_MAX_CONDITION = 1e4
# ||B_F^T a - 1||_inf above this: the survivors' rows do not span the all-ones row.
RESIDUAL_TOLERANCE = 1e-9
# Singular values below this fraction of the largest are numerically zero (duplicate or surplus rows);
# legitimate ones are >= 1 / DEFAULT_MAX_CONDITION, rounding noise is ~1e-16, so the gap is wide.
_RANK_RTOL = 1e-10
# Build and decode cost O(n^3); a gradient-coded run of more workers than this is not what this is for.
MAX_WORKERS = 256


class Undecodable(LoconetError):
    """These survivors cannot decode the sum (too many stragglers, or badly conditioned): wait for more.

    ``residual`` and ``condition`` are what the check saw (NaN when it did not get that far).
    """

    def __init__(self, message: str, survivors: Sequence[int], residual: float = math.nan,
                 condition: float = math.nan) -> None:
        super().__init__(message)
        self.survivors = tuple(survivors)
        self.residual = residual
        self.condition = condition


@dataclass(frozen=True)
class GradientCode:
    """An encoding matrix B for n workers tolerating s stragglers (``kind`` frc or cyclic).

    ``rows`` holds B row by row (immutable, compared and hashed); ``B`` is the same as a read-only float64
    array. ``max_condition`` is the largest condition number ``decode`` accepts.
    """

    n: int
    s: int
    kind: str
    rows: tuple[tuple[float, ...], ...] = field(repr=False)
    max_condition: float = DEFAULT_MAX_CONDITION
    _B: np.ndarray = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        matrix = np.array(self.rows, dtype=np.float64).reshape(self.n, self.n)
        matrix.setflags(write=False)
        object.__setattr__(self, "_B", matrix)

    @property
    def B(self) -> np.ndarray:  # the papers' name for the encoding matrix
        """The n x n encoding matrix (float64, read-only): row i is worker i's combination of partitions."""
        return self._B

    @property
    def load(self) -> float:
        """The fraction of the data each worker computes on: (s+1)/n."""
        return (self.s + 1) / self.n

    @property
    def min_survivors(self) -> int:
        """How many workers always suffice to decode: n - s."""
        return self.n - self.s

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """frc: the groups of s+1 workers holding the same partitions; cyclic: () (no groups)."""
        if self.kind != FRC:
            return ()
        size = self.s + 1
        return tuple(tuple(range(g, g + size)) for g in range(0, self.n, size))

    def support(self, i: int) -> tuple[int, ...]:
        """The partitions worker i holds, sorted (s+1 of them)."""
        self._check_index(i, "worker")
        if self.kind == FRC:
            first = i - i % (self.s + 1)
            return tuple(range(first, first + self.s + 1))
        return tuple(sorted((i + k) % self.n for k in range(self.s + 1)))

    def coefficients(self, i: int) -> tuple[float, ...]:
        """Worker i's coefficients, aligned with ``support(i)``."""
        return tuple(self.rows[i][j] for j in self.support(i))

    def row(self, i: int) -> tuple[float, ...]:
        """Row i of B: worker i's coefficient of every partition (0 outside its support)."""
        self._check_index(i, "worker")
        return self.rows[i]

    def holders(self, j: int) -> tuple[int, ...]:
        """The workers that hold partition j, sorted (s+1 of them)."""
        self._check_index(j, "partition")
        if self.kind == FRC:
            first = j - j % (self.s + 1)
            return tuple(range(first, first + self.s + 1))
        return tuple(sorted((j - k) % self.n for k in range(self.s + 1)))

    def _check_index(self, i: int, what: str) -> None:
        if not _is_int(i) or not 0 <= i < self.n:
            raise ConfigError(f"{what} index must be an integer in [0, {self.n}) for this code of n={self.n}, "
                              f"got {i!r}")


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def build_code(n: int, s: int, kind: str = AUTO, max_condition: float = DEFAULT_MAX_CONDITION) -> GradientCode:
    """The code for n workers tolerating s stragglers: ``auto`` (frc when s+1 divides n, else cyclic),
    ``frc`` or ``cyclic``; the same (n, s, kind) gives the same B, bit for bit, on every call."""
    if not _is_int(n) or not 1 <= n <= MAX_WORKERS:
        raise ConfigError(f"a gradient code needs n workers in [1, {MAX_WORKERS}], got {n!r}")
    if not _is_int(s) or not 0 <= s < n:
        raise ConfigError(f"a gradient code over n={n} workers tolerates s stragglers with 0 <= s < n, got {s!r} "
                          "(at least one worker must be left to decode)")
    if kind not in CODE_KINDS:
        raise ConfigError(f"the code kind must be one of {', '.join(CODE_KINDS)}, got {kind!r}")
    if not isinstance(max_condition, numbers.Real) or not 1 <= max_condition <= 1 / _RANK_RTOL:
        raise ConfigError(f"max_condition must be a number in [1, {1 / _RANK_RTOL:g}], got {max_condition!r}")
    n, s = int(n), int(s)
    divides = n % (s + 1) == 0
    if kind == FRC and not divides:
        raise ConfigError(f"fractional repetition needs s+1 to divide n, and {s + 1} does not divide {n}: use "
                          f"code {CYCLIC!r} or {AUTO!r}, or a number of workers that is a multiple of {s + 1}")
    chosen = FRC if kind == FRC or (kind == AUTO and divides) else CYCLIC
    return _build(n, s, chosen, float(max_condition))


@lru_cache(maxsize=128)
def _build(n: int, s: int, kind: str, max_condition: float) -> GradientCode:
    """The code of validated, normalised arguments (cached: rebuilt only when membership brings a new n)."""
    rows = _frc_rows(n, s) if kind == FRC else _cyclic_rows(n, s)
    return GradientCode(n, s, kind, rows, max_condition)


def code_for(n: int, s: int, kind: str = AUTO, max_condition: float = DEFAULT_MAX_CONDITION) -> GradientCode:
    """The code a run tolerating s stragglers uses over n workers: s is capped at n-1 when fewer are left."""
    if _is_int(n) and _is_int(s) and n >= 1 and s >= n:
        s = n - 1
    return build_code(n, s, kind, max_condition)


def _frc_rows(n: int, s: int) -> tuple[tuple[float, ...], ...]:
    size = s + 1
    return tuple(tuple(1.0 if j // size == i // size else 0.0 for j in range(n)) for i in range(n))


def _generator(n: int, s: int) -> list[float]:
    """Coefficients (ascending powers) of prod_m (x - exp(i*pi*(n-s+1+2m)/n)), m < s: real, monic, degree s."""
    poly = [1.0]

    def times(factor: list[float]) -> list[float]:
        out = [0.0] * (len(poly) + len(factor) - 1)
        for a, pa in enumerate(poly):
            for b, fb in enumerate(factor):
                out[a + b] += pa * fb
        return out

    # Zero m's angle is pi + pi*(2m-s+1)/n; zeros m and s-1-m are conjugates, paired into one real quadratic.
    for m in range(s // 2):
        c = -math.cos(math.pi * (2 * m - s + 1) / n)  # cos(pi + phi) = -cos(phi)
        poly = times([1.0, -2.0 * c, 1.0])
    if s % 2:
        poly = times([1.0, 1.0])  # the middle zero is -1 itself
    return poly


def _column_scale(n: int, s: int) -> list[float]:
    """v: the projection of the all-ones row onto the negacyclic code (real, every entry in [(n-s)/n, 4/3]).

    v_j = 1 - (1/n) sum_m sin((2j+1) t_m / 2) / sin(t_m / 2) for the zeros' angles t_m = pi*(n-s+1+2m)/n;
    the angles are reduced as integers first, so every machine evaluates the same small arguments.
    """
    v = []
    for j in range(n):
        total = 0.0
        for m in range(s):
            k = n - s + 1 + 2 * m  # t_m = pi * k / n
            total += math.sin(math.pi * ((2 * j + 1) * k % (4 * n)) / (2 * n)) / math.sin(math.pi * k / (2 * n))
        v.append(1.0 - total / n)
    return v


def _cyclic_rows(n: int, s: int) -> tuple[tuple[float, ...], ...]:
    g = _generator(n, s)
    scale = math.fsum(g)  # g(1) > 0: every zero is away from 1
    g = [x / scale for x in g]  # each row's coefficients sum to 1 (before the negacyclic column scaling)
    negacyclic = (n - s) % 2 == 0
    v = _column_scale(n, s) if negacyclic else [1.0] * n
    rows = []
    for i in range(n):
        row = [0.0] * n
        for k, coefficient in enumerate(g):
            j = i + k
            wrapped = j >= n
            row[j % n] = (-coefficient if wrapped and negacyclic else coefficient) / v[j % n]
        rows.append(tuple(row))
    return tuple(rows)


def _survivor_indices(code: GradientCode, survivors: Sequence[int]) -> list[int]:
    try:
        items = list(survivors)
    except TypeError:
        raise ConfigError(f"survivors must be a sequence of worker indices, got {survivors!r}") from None
    # type() first: the Integral check is slow, and decode runs once per candidate quorum.
    bad = [x for x in items if not (type(x) is int or _is_int(x)) or not 0 <= x < code.n]
    if bad:
        raise ConfigError(f"survivors must be worker indices in [0, {code.n}), got {bad[:10]} among them")
    idx = [int(x) for x in items]
    if len(set(idx)) != len(idx):
        duplicates = sorted({x for x in idx if idx.count(x) > 1})
        raise ConfigError(f"survivors must be distinct, and {duplicates} appear more than once")
    return idx


def _describe(code: GradientCode, idx: Sequence[int]) -> str:
    missing = sorted(set(range(code.n)) - set(idx))
    return (f"{len(idx)} of {code.n} workers survived ({len(missing)} stragglers: {missing[:12]}"
            f"{'...' if len(missing) > 12 else ''}; the {code.kind} code tolerates {code.s})")


def decode(code: GradientCode, survivors: Sequence[int]) -> np.ndarray:
    """Decoding coefficients a (float64, aligned with survivors in the order given) with sum a_i B[i] = 1.

    Raises Undecodable (with the residual and condition number) when these survivors cannot give the exact
    sum or would amplify rounding beyond the code's max_condition, ConfigError for invalid survivors.
    """
    idx = _survivor_indices(code, survivors)
    if not idx:
        raise Undecodable(f"undecodable: no survivors, nothing to decode ({_describe(code, idx)})", idx)
    if code.kind == FRC:
        return _decode_frc(code, idx)
    rows = code.B[idx]
    u, sigma, vt = np.linalg.svd(rows, full_matrices=False)
    keep = sigma > sigma[0] * _RANK_RTOL
    # rows^T a = 1 with rows = u diag(sigma) vt: the minimum-norm a is u diag(1/sigma) vt 1 over kept sigma.
    a = u[:, keep] @ (vt[keep].sum(axis=1) / sigma[keep])
    residual = float(np.abs(rows.T @ a - 1.0).max())
    condition = float(sigma[0] / sigma[keep][-1])
    if not residual <= RESIDUAL_TOLERANCE:
        raise Undecodable(
            f"undecodable: {_describe(code, idx)}; the survivors' rows miss the all-ones row by a residual of "
            f"{residual:.3g} (> {RESIDUAL_TOLERANCE:g}): wait for more workers", idx, residual, condition)
    if not condition <= code.max_condition:
        raise Undecodable(
            f"badly conditioned: {_describe(code, idx)}; decoding would amplify rounding errors by a condition "
            f"number of {condition:.3g} (> {code.max_condition:g}): wait for more workers", idx, residual, condition)
    return a


def _decode_frc(code: GradientCode, idx: list[int]) -> np.ndarray:
    """One survivor per group, the lowest rank, with coefficient 1; the rest 0 (exact: no arithmetic)."""
    a = np.zeros(len(idx))
    present = set(idx)
    for group in code.groups:
        chosen = next((w for w in group if w in present), None)
        if chosen is None:
            raise Undecodable(
                f"undecodable: {_describe(code, idx)}; group {group[0] // (code.s + 1)} (workers {list(group)}) "
                f"has no survivor, so partitions {list(group)} are lost: wait for one of them", idx, 1.0)
        a[idx.index(chosen)] = 1.0
    return a


def decodable(code: GradientCode, survivors: Sequence[int]) -> bool:
    """Whether ``decode`` accepts these survivors (False where it raises Undecodable; ConfigError as it does)."""
    try:
        decode(code, survivors)
    except Undecodable:
        return False
    return True


@lru_cache(maxsize=128)
def burst_condition(code: GradientCode) -> float:
    """The largest condition number of B_F over the n patterns of s consecutive stragglers (1.0 for frc,
    whose decoder picks 0/1 coefficients): the worst of all straggler patterns wherever it was checked
    exhaustively (n <= 12, and n = 16, 24 with s <= 3), so the worst a decode of this code meets."""
    if code.kind == FRC or code.s == 0:
        return 1.0
    worst = 1.0
    # A cyclic code's bursts are column permutations of one another; the negacyclic one's columns are scaled.
    for start in range(1 if (code.n - code.s) % 2 else code.n):
        alive = [(start + code.s + k) % code.n for k in range(code.min_survivors)]
        sigma = np.linalg.svd(code.B[alive], compute_uv=False)
        worst = max(worst, float(sigma[0] / sigma[-1]))
    return worst


def combine(code: GradientCode, i: int, partition_grads: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Worker i's coded contribution sum_j B[i, j] g_j, in the gradients' dtype.

    ``partition_grads`` maps each partition of ``support(i)`` (no more, no less) to its gradient, all of one
    shape, floating dtype and device. The sum is accumulated in float64 in ascending partition order and
    rounded once to the gradients' dtype: deterministic, and exact where float64 is (integer-valued frc).
    """
    support = code.support(i)
    given = set(partition_grads)
    if given != set(support):
        raise ConfigError(f"worker {i} holds partitions {list(support)}; combine got gradients of "
                          f"{sorted(given, key=str)} (missing {sorted(set(support) - given)}, "
                          f"extra {sorted(given - set(support), key=str)})")
    first = partition_grads[support[0]]
    for j in support:
        g = partition_grads[j]
        if not isinstance(g, torch.Tensor) or not g.is_floating_point():
            raise ConfigError(f"the gradient of partition {j} must be a floating-point tensor, got "
                              f"{type(g).__name__}{'' if not isinstance(g, torch.Tensor) else ' ' + str(g.dtype)}")
        if g.shape != first.shape or g.dtype != first.dtype or g.device != first.device:
            raise ConfigError(f"partition gradients must share shape, dtype and device: partition {j} has "
                              f"{tuple(g.shape)} {g.dtype} on {g.device}, partition {support[0]} "
                              f"{tuple(first.shape)} {first.dtype} on {first.device}")
    total = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
    row = code.rows[i]
    for j in support:  # ascending: the same order, so the same bits, on every worker
        total.add_(partition_grads[j].to(torch.float64), alpha=row[j])
    return total.to(first.dtype)
