"""Noise transition matrices of noisy segmentation labels.

The transition matrix ``Q`` has ``Q[i, j] = P(noisy = j | clean = i)``: rows are
clean classes, columns noisy classes. Following Luo et al. (Lemma 2), the number
of semantic classes that survive in noisy labels equals ``rank(Q)``: randomised
clean labels (RCL) keep a full-rank ``Q``, while random labels (RL) have identical
rows and rank 1.

An empirical ``Q`` is almost never exactly rank-deficient, so the rank is taken with a
statistical tolerance (:func:`rank_statistics`): a singular value below a few times its
sampling error counts as zero.

:func:`transition_matrix` estimates ``Q`` from a clean / noisy pair and
:func:`transition_from_counts` from joint voxel counts; :func:`flip_matrix` and
:func:`random_label_matrix` give the population matrices of the synthesis processes in
:mod:`emseg.noise.synthesis`. The report of a noisy volume (:func:`~emseg.noise.report.noise_report`,
and :class:`~emseg.noise.report.TransitionCounter`, which accumulates the counts block by block
for volumes that do not fit in memory) is in :mod:`emseg.noise.report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from emseg.noise.checks import as_labels, check_fraction, check_int, class_fractions

__all__ = [
    "TransitionMatrix",
    "flip_matrix",
    "random_label_matrix",
    "rank_statistics",
    "transition_from_counts",
    "transition_matrix",
]


@dataclass(frozen=True, eq=False)
class TransitionMatrix:
    """Empirical noise transition matrix.

    Attributes
    ----------
    matrix : numpy.ndarray, shape (K, K), float64
        ``matrix[i, j]`` = fraction of voxels of clean class ``i`` whose noisy label
        is ``j``. Rows of classes present in ``clean`` sum to 1; rows of absent
        classes are 0.
    counts : numpy.ndarray, shape (K, K), int64
        Voxel counts behind ``matrix`` (voxels ignored in either array excluded).
    rank : int
        Singular values of the rows of present classes above ``tol`` (:func:`rank_statistics`).
    singular_values : numpy.ndarray
        Singular values of ``matrix`` restricted to the rows of classes present in ``clean``,
        descending.
    tol : float
        The tolerance used: the one given, or ``RANK_SIGMAS * sampling_error``.
    sampling_error : float
        Standard error of the singular values (see :func:`rank_statistics`).
    classes : tuple of int
        The clean classes whose rows enter the rank.
    """

    matrix: np.ndarray
    counts: np.ndarray
    rank: int
    singular_values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tol: float = 0.0
    sampling_error: float = 0.0
    classes: tuple[int, ...] = ()

    @property
    def n_classes(self) -> int:
        """Number of classes ``K``."""
        return int(self.matrix.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``n_classes``, ``matrix``, ``counts``, ``rank``, ``singular_values``,
        ``rank_tol``, ``rank_sampling_error``, ``rank_classes``."""
        return {
            "n_classes": self.n_classes,
            "matrix": self.matrix.tolist(),
            "counts": self.counts.tolist(),
            "rank": int(self.rank),
            "singular_values": [float(v) for v in self.singular_values],
            "rank_tol": float(self.tol),
            "rank_sampling_error": float(self.sampling_error),
            "rank_classes": [int(c) for c in self.classes],
        }


#: Default rank tolerance in sampling errors (see :func:`rank_statistics`).
RANK_SIGMAS = 3.0


def rank_statistics(counts: ArrayLike, *, tol: float | None = None, sigmas: float = RANK_SIGMAS) -> dict[str, Any]:
    r"""Rank of the transition matrix with a tolerance derived from the counts.

    Rows of clean classes with no voxel labelled in both arrays carry no estimate and are
    skipped (an absent class would otherwise lower the rank for reasons unrelated to noise).
    For the remaining rows, ``Q̂[i] = C[i] / n_i`` is the mean of ``n_i`` one-hot vectors, a
    multinomial proportion with :math:`\operatorname{Var} \hat Q_{ij} = Q_{ij}(1 - Q_{ij}) / n_i`.
    The perturbation :math:`E = \hat Q - Q` therefore has

    .. math:: \mathbb E \|E\|_F^2 = \sum_i \frac{1 - \sum_j Q_{ij}^2}{n_i} =: s^2,

    and by Weyl's inequality every singular value moves by at most
    :math:`\|E\|_2 \le \|E\|_F`: a singular value of :math:`\hat Q` below a few times ``s``
    is compatible with a zero singular value of ``Q``. ``s`` is evaluated with ``Q̂`` for
    ``Q`` (``sampling_error``), and singular values at or below ``tol = sigmas * s`` count as
    zero (the first is never: rows summing to 1 give :math:`\sigma_1 \ge 1/\sqrt K`, so
    the rank is at least 1 when any row is present). With the default 3 sigmas a rank-deficient ``Q`` is reported full with probability
    well below 1 % (``||E||_F^2`` is a weighted sum of chi-squares with mean ``s^2``), while a
    singular value of ``Q`` above ``3 s`` plus the noise, i.e. of order ``1/sqrt(n)``, is kept.
    The exact-count selections of :func:`~emseg.noise.flip` vary less than multinomial
    draws, so ``s`` is conservative there.

    Parameters
    ----------
    counts : array_like of int, shape (K, K)
        Joint counts ``counts[clean, noisy]``.
    tol : float, optional
        Absolute singular-value threshold instead of ``sigmas * s``.
    sigmas : float
        Multiple of the sampling error used when ``tol`` is not given.

    Returns
    -------
    dict
        ``rank``, ``singular_values`` (descending, present rows only), ``tol``,
        ``sampling_error`` and ``classes`` (the rows used).

    Examples
    --------
    >>> r = rank_statistics([[900, 100], [905, 95]])   # rows equal up to noise: random labels
    >>> r["rank"], round(r["sampling_error"], 4)
    (1, 0.0188)
    >>> rank_statistics([[900, 100], [100, 900]])["rank"]
    2
    >>> rank_statistics([[900, 100], [0, 0]])["rank"]     # class 1 absent: one row, rank 1
    1
    """
    joint = check_counts(counts)
    _check_tol(tol)
    rows = joint.sum(axis=1)
    present = np.flatnonzero(rows > 0)
    q = joint[present] / rows[present, None]
    if present.size:
        svals = np.linalg.svd(q, compute_uv=False)
        error = float(np.sqrt(np.sum((1.0 - (q * q).sum(axis=1)) / rows[present])))
    else:
        svals, error = np.zeros(0), 0.0
    threshold = float(sigmas) * error if tol is None else float(tol)
    # a singular value at float round-off of zero is zero even when the counts carry no noise
    floor = (svals[0] if svals.size else 0.0) * max(q.shape, default=1) * np.finfo(np.float64).eps
    rank = int(np.sum(svals > max(threshold, floor)))
    if present.size:  # rows sum to 1, so sigma_1 >= 1/sqrt(K) > 0: never noise
        rank = max(rank, 1)
    return {"rank": rank, "singular_values": svals, "tol": threshold, "sampling_error": error,
            "classes": tuple(int(c) for c in present)}


def label_pair(clean: ArrayLike, noisy: ArrayLike, n_classes: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Checked clean and noisy labels, flattened, and the number of classes ``K`` that holds both."""
    c = as_labels(clean, "clean", spatial=False)
    n = as_labels(noisy, "noisy", spatial=False)
    if c.shape != n.shape:
        raise ValueError(f"clean and noisy shapes differ: {c.shape} vs {n.shape}")
    top = max(int(c.max()) if c.size else 0, int(n.max()) if n.size else 0)
    if n_classes is None:
        k = max(top + 1, 2)
    else:
        k = check_int(n_classes, "n_classes", minimum=2)
        if top >= k:
            raise ValueError(f"labels contain class {top} but n_classes={k}")
    return c.reshape(-1), n.reshape(-1), k


def joint_counts(c: np.ndarray, n: np.ndarray, k: int) -> np.ndarray:
    """(K, K) counts ``[clean, noisy]`` of the voxels labelled (not -1) in both flat arrays."""
    valid = (c >= 0) & (n >= 0)
    code = c[valid].astype(np.int64) * k + n[valid].astype(np.int64)
    return np.bincount(code, minlength=k * k).reshape(k, k)


def row_normalise(counts: np.ndarray) -> np.ndarray:
    """Rows of ``counts`` divided by their sums (float64); empty rows stay 0."""
    rows = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros(counts.shape, np.float64), where=rows > 0)


def transition_matrix(
    clean: ArrayLike,
    noisy: ArrayLike,
    n_classes: int | None = None,
    *,
    tol: float | None = None,
) -> TransitionMatrix:
    """Estimate the noise transition matrix of ``noisy`` against ``clean``.

    Parameters
    ----------
    clean, noisy : array_like of int, same shape
        Clean and noisy labels; voxels that are -1 (ignore) in either are excluded.
    n_classes : int >= 2, optional
        Number of classes ``K``; defaults to the largest label in either array + 1
        (at least 2).
    tol : float, optional
        Absolute singular-value threshold for the rank. By default it is derived from the
        counts: three sampling errors of the singular values (:func:`rank_statistics`), so
        rows equal up to sampling noise count once.

    Returns
    -------
    TransitionMatrix

    Examples
    --------
    >>> import numpy as np
    >>> clean = np.array([[0, 0, 1, 1]]); noisy = np.array([[0, 1, 1, -1]])
    >>> transition_matrix(clean, noisy).matrix.tolist()
    [[0.5, 0.5], [0.0, 1.0]]
    """
    c, n, k = label_pair(clean, noisy, n_classes)
    _check_tol(tol)
    return transition_from_counts(joint_counts(c, n, k), tol=tol)


def _check_tol(tol: Any) -> None:
    if tol is not None and (
        isinstance(tol, (bool, np.bool_)) or not isinstance(tol, Real) or not 0 <= tol < np.inf
    ):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")


def check_counts(counts: ArrayLike, name: str = "counts") -> np.ndarray:
    """``counts`` as a square (K, K) int64 array of non-negative counts, K >= 2; ValueError otherwise."""
    arr = np.asarray(counts)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] < 2:
        raise ValueError(f"{name} must be a square (K, K) array with K >= 2, got shape {arr.shape}")
    if arr.dtype.kind not in "iu" or (arr.size and int(arr.min()) < 0):
        raise ValueError(f"{name} must hold non-negative integer voxel counts")
    return arr.astype(np.int64)


def transition_from_counts(counts: ArrayLike, *, tol: float | None = None) -> TransitionMatrix:
    """Transition matrix from joint voxel counts ``counts[clean, noisy]``.

    The result equals :func:`transition_matrix` on the voxels behind ``counts``,
    which lets a volume be scanned block by block (see :class:`TransitionCounter`).

    Parameters
    ----------
    counts : array_like of int, shape (K, K)
        ``counts[i, j]`` = voxels with clean label ``i`` and noisy label ``j``.
    tol : float, optional
        Singular-value threshold for the rank, as in :func:`transition_matrix`.

    Returns
    -------
    TransitionMatrix

    Examples
    --------
    >>> transition_from_counts([[3, 1], [0, 2]]).matrix.tolist()
    [[0.75, 0.25], [0.0, 1.0]]
    """
    joint = check_counts(counts)
    stats = rank_statistics(joint, tol=tol)
    matrix = row_normalise(joint)
    joint.setflags(write=False)
    matrix.setflags(write=False)
    svals = stats["singular_values"]
    svals.setflags(write=False)
    return TransitionMatrix(matrix=matrix, counts=joint, rank=stats["rank"], singular_values=svals,
                            tol=stats["tol"], sampling_error=stats["sampling_error"], classes=stats["classes"])


def flip_matrix(
    p: float | None = None,
    n_classes: int = 2,
    *,
    p_fg: float | None = None,
    p_bg: float | None = None,
) -> np.ndarray:
    """Population transition matrix of :func:`~emseg.noise.flip`.

    ``Q[i, i] = 1 - p_i`` and ``Q[i, j] = p_i / (K - 1)`` for ``j != i``. It has
    full rank unless all rows coincide, i.e. ``p = (K-1)/K`` for every class
    (binary: ``p_fg + p_bg = 1``), where the labels carry no information.

    Parameters
    ----------
    p : float in [0, 1], optional
        Flip fraction of every class.
    n_classes : int >= 2
        Number of classes ``K``.
    p_fg, p_bg : float in [0, 1], optional
        Binary only: flip fractions of class 1 and class 0 (default ``p`` or 0).

    Returns
    -------
    numpy.ndarray, shape (K, K)
        Row ``i``: the label distribution of clean class ``i`` after flipping.

    Examples
    --------
    >>> flip_matrix(0.2).tolist()
    [[0.8, 0.2], [0.2, 0.8]]
    """
    k = check_int(n_classes, "n_classes", minimum=2)
    if p is None and p_fg is None and p_bg is None:
        raise ValueError("flip_matrix needs p, or p_fg/p_bg for binary labels")
    rates = np.asarray(class_fractions(p, k, p_fg, p_bg), dtype=np.float64)
    q = np.repeat((rates / (k - 1))[:, None], k, axis=1)
    np.fill_diagonal(q, 1.0 - rates)
    return q


def random_label_matrix(p: float, n_classes: int = 2) -> np.ndarray:
    """Population transition matrix of :func:`~emseg.noise.random_labels`.

    Random labels do not depend on the clean class, so every row is the label
    distribution ``(1 - p, p/(K-1), ..., p/(K-1))`` and the rank is 1.

    Parameters
    ----------
    p : float in [0, 1]
        Foreground probability.
    n_classes : int >= 2
        Number of classes ``K``.

    Returns
    -------
    numpy.ndarray, shape (K, K)
        ``K`` equal rows.

    Examples
    --------
    >>> random_label_matrix(0.1).tolist()
    [[0.9, 0.1], [0.9, 0.1]]
    """
    k = check_int(n_classes, "n_classes", minimum=2)
    frac = check_fraction(p, "p")
    row = np.full(k, frac / (k - 1))
    row[0] = 1.0 - frac
    return np.repeat(row[None, :], k, axis=0)
