"""Noise transition matrices of noisy segmentation labels.

The transition matrix ``Q`` has ``Q[i, j] = P(noisy = j | clean = i)``: rows are
clean classes, columns noisy classes. Following Luo et al. (Lemma 2), the number
of semantic classes that survive in noisy labels equals ``rank(Q)``: randomised
clean labels (RCL) keep a full-rank ``Q``, while random labels (RL) have identical
rows and rank 1.

:func:`transition_matrix` estimates ``Q`` from a clean / noisy pair;
:func:`transition_from_counts` and :func:`report_from_counts` build the same results from
joint voxel counts, which :class:`TransitionCounter` accumulates block by block for
volumes that do not fit in memory; :func:`flip_matrix` and :func:`random_label_matrix` give the population matrices
of the synthesis processes in :mod:`emseg.noise.synthesis`.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from emseg.noise.synthesis import _as_labels, _check_fraction, _check_int

__all__ = [
    "TransitionCounter",
    "TransitionMatrix",
    "flip_matrix",
    "noise_report",
    "random_label_matrix",
    "report_from_counts",
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
        ``numpy.linalg.matrix_rank(matrix, tol)``.
    """

    matrix: np.ndarray
    counts: np.ndarray
    rank: int

    @property
    def n_classes(self) -> int:
        """Number of classes ``K``."""
        return int(self.matrix.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"n_classes", "matrix", "counts", "rank"}``."""
        return {
            "n_classes": self.n_classes,
            "matrix": self.matrix.tolist(),
            "counts": self.counts.tolist(),
            "rank": int(self.rank),
        }


def _pair(clean: ArrayLike, noisy: ArrayLike, n_classes: Any) -> tuple[np.ndarray, np.ndarray, int]:
    c = _as_labels(clean, "clean", spatial=False)
    n = _as_labels(noisy, "noisy", spatial=False)
    if c.shape != n.shape:
        raise ValueError(f"clean and noisy shapes differ: {c.shape} vs {n.shape}")
    top = max(int(c.max()) if c.size else 0, int(n.max()) if n.size else 0)
    if n_classes is None:
        k = max(top + 1, 2)
    else:
        k = _check_int(n_classes, "n_classes", minimum=2)
        if top >= k:
            raise ValueError(f"labels contain class {top} but n_classes={k}")
    return c.reshape(-1), n.reshape(-1), k


def _joint_counts(c: np.ndarray, n: np.ndarray, k: int) -> np.ndarray:
    valid = (c >= 0) & (n >= 0)
    code = c[valid].astype(np.int64) * k + n[valid].astype(np.int64)
    return np.bincount(code, minlength=k * k).reshape(k, k)


def _row_normalise(counts: np.ndarray) -> np.ndarray:
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
        Singular-value threshold for the rank, passed to
        :func:`numpy.linalg.matrix_rank`. The default (numerical precision) gives
        the exact rank of the empirical matrix, which sampling noise makes full
        for almost any labels; pass a statistical tolerance (e.g. a few times
        ``1 / sqrt(min class count)``) to test whether rows are equal up to noise.

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
    c, n, k = _pair(clean, noisy, n_classes)
    _check_tol(tol)
    return transition_from_counts(_joint_counts(c, n, k), tol=tol)


def _check_tol(tol: Any) -> None:
    if tol is not None and (
        isinstance(tol, (bool, np.bool_)) or not isinstance(tol, Real) or not 0 <= tol < np.inf
    ):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")


def _check_counts(counts: ArrayLike, name: str = "counts") -> np.ndarray:
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
    joint = _check_counts(counts)
    _check_tol(tol)
    matrix = _row_normalise(joint)
    rank = int(np.linalg.matrix_rank(matrix, tol=tol))
    joint.setflags(write=False)
    matrix.setflags(write=False)
    return TransitionMatrix(matrix=matrix, counts=joint, rank=rank)


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def noise_report(
    clean: ArrayLike,
    noisy: ArrayLike,
    n_classes: int | None = None,
) -> dict[str, Any]:
    """Summary of how ``noisy`` relates to ``clean``, as a JSON-able dict.

    Parameters
    ----------
    clean, noisy : array_like of int, same shape
        Clean and noisy labels (-1 = ignore).
    n_classes : int >= 2, optional
        Number of classes (default: largest label + 1, at least 2).

    Returns
    -------
    dict
        ``n_classes``; ``clean_counts[k]`` (labelled clean voxels of class k);
        ``kept_fraction[k]``: fraction of clean class-``k`` voxels still labelled
        ``k`` in ``noisy`` (voxels made ignore count as not kept);
        ``labelled_fraction[k]``: fraction of clean class-``k`` voxels labelled
        (not -1) in ``noisy``; ``agreement``: fraction of voxels labelled in
        both that agree; ``matrix``, ``counts``, ``rank`` as in
        :func:`transition_matrix`. Classes absent from ``clean`` give ``None``.

    Examples
    --------
    >>> import numpy as np
    >>> clean = np.array([[0, 0, 1, 1]]); noisy = np.array([[0, 1, 1, -1]])
    >>> r = noise_report(clean, noisy)
    >>> r["kept_fraction"], r["labelled_fraction"], r["rank"]
    ([0.5, 0.5], [1.0, 0.5], 2)
    """
    c, n, k = _pair(clean, noisy, n_classes)
    counts = _joint_counts(c, n, k)
    clean_counts = np.bincount(c[c >= 0].astype(np.int64), minlength=k)
    return report_from_counts(counts, clean_counts)


def report_from_counts(counts: ArrayLike, clean_counts: ArrayLike) -> dict[str, Any]:
    """:func:`noise_report` from accumulated counts.

    Parameters
    ----------
    counts : array_like of int, shape (K, K)
        Joint counts ``counts[clean, noisy]`` over voxels labelled in both.
    clean_counts : array_like of int, shape (K,)
        Labelled voxels of each clean class, including those the noisy labels
        ignore (so ``clean_counts >= counts.sum(axis=1)``).

    Returns
    -------
    dict
        The same keys and values as :func:`noise_report` on the voxels counted.

    Examples
    --------
    >>> r = report_from_counts([[1, 1], [0, 1]], [2, 2])
    >>> r["kept_fraction"], r["labelled_fraction"], r["agreement"]
    ([0.5, 0.5], [1.0, 0.5], 0.6666666666666666)
    """
    counts = _check_counts(counts)
    k = counts.shape[0]
    clean_counts = np.asarray(clean_counts)
    if clean_counts.shape != (k,) or clean_counts.dtype.kind not in "iu":
        raise ValueError(f"clean_counts must be {k} integer counts, got shape {clean_counts.shape}")
    clean_counts = clean_counts.astype(np.int64)
    labelled = counts.sum(axis=1)
    if np.any(labelled > clean_counts):
        raise ValueError("clean_counts must be >= the row sums of counts")
    matrix = _row_normalise(counts)
    kept = np.diag(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        kept_fraction = kept / clean_counts
        labelled_fraction = labelled / clean_counts
    compared = int(counts.sum())
    return {
        "n_classes": k,
        "clean_counts": clean_counts.tolist(),
        "kept_fraction": _nan_to_none(kept_fraction),
        "labelled_fraction": _nan_to_none(labelled_fraction),
        "agreement": float(kept.sum() / compared) if compared else None,
        "matrix": matrix.tolist(),
        "counts": counts.tolist(),
        "rank": int(np.linalg.matrix_rank(matrix)),
    }


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

    Examples
    --------
    >>> flip_matrix(0.2).tolist()
    [[0.8, 0.2], [0.2, 0.8]]
    """
    k = _check_int(n_classes, "n_classes", minimum=2)
    if p is None and p_fg is None and p_bg is None:
        raise ValueError("flip_matrix needs p, or p_fg/p_bg for binary labels")
    rates = np.full(k, 0.0 if p is None else _check_fraction(p, "p"))
    if p_fg is not None or p_bg is not None:
        if k != 2:
            raise ValueError(
                f"p_fg/p_bg apply to binary labels only (n_classes=2), got n_classes={k}"
            )
        if p_bg is not None:
            rates[0] = _check_fraction(p_bg, "p_bg")
        if p_fg is not None:
            rates[1] = _check_fraction(p_fg, "p_fg")
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

    Examples
    --------
    >>> random_label_matrix(0.1).tolist()
    [[0.9, 0.1], [0.9, 0.1]]
    """
    k = _check_int(n_classes, "n_classes", minimum=2)
    frac = _check_fraction(p, "p")
    row = np.full(k, frac / (k - 1))
    row[0] = 1.0 - frac
    return np.repeat(row[None, :], k, axis=0)


class TransitionCounter:
    """Accumulates clean / noisy voxel counts block by block.

    ``update`` may be called with blocks of any shape; the number of classes grows
    to the largest label seen (at least ``n_classes``). ``transition()`` and
    ``report()`` then equal :func:`transition_matrix` and :func:`noise_report` on
    all voxels passed, with memory independent of the volume size.

    Parameters
    ----------
    n_classes : int >= 2, optional
        Minimum number of classes (default 2).

    Examples
    --------
    >>> import numpy as np
    >>> counter = TransitionCounter()
    >>> counter.update(np.array([0, 0]), np.array([0, 1]))
    >>> counter.update(np.array([1, 1]), np.array([1, -1]))
    >>> counter.report()["kept_fraction"]
    [0.5, 0.5]
    """

    def __init__(self, n_classes: int | None = None) -> None:
        k = 2 if n_classes is None else _check_int(n_classes, "n_classes", minimum=2)
        self.counts = np.zeros((k, k), dtype=np.int64)
        self.clean_counts = np.zeros(k, dtype=np.int64)

    @property
    def n_classes(self) -> int:
        """Current number of classes ``K``."""
        return int(self.counts.shape[0])

    def _grow(self, k: int) -> None:
        if k <= self.n_classes:
            return
        counts = np.zeros((k, k), dtype=np.int64)
        counts[: self.n_classes, : self.n_classes] = self.counts
        clean_counts = np.zeros(k, dtype=np.int64)
        clean_counts[: self.n_classes] = self.clean_counts
        self.counts, self.clean_counts = counts, clean_counts

    def update(self, clean: ArrayLike, noisy: ArrayLike) -> None:
        """Add the voxels of one block (same shape; -1 = ignore)."""
        c = _as_labels(clean, "clean", spatial=False)
        n = _as_labels(noisy, "noisy", spatial=False)
        if c.shape != n.shape:
            raise ValueError(f"clean and noisy shapes differ: {c.shape} vs {n.shape}")
        c, n = c.reshape(-1), n.reshape(-1)
        top = max(int(c.max()) if c.size else 0, int(n.max()) if n.size else 0)
        self._grow(top + 1)
        k = self.n_classes
        self.counts += _joint_counts(c, n, k)
        self.clean_counts += np.bincount(c[c >= 0].astype(np.int64), minlength=k)

    def transition(self, *, tol: float | None = None) -> TransitionMatrix:
        """The :class:`TransitionMatrix` of the voxels seen so far."""
        return transition_from_counts(self.counts, tol=tol)

    def report(self) -> dict[str, Any]:
        """The :func:`noise_report` dict of the voxels seen so far."""
        return report_from_counts(self.counts, self.clean_counts)
