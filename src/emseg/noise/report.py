"""The report of a noisy label volume against its clean labels, whole or accumulated by block.

:func:`noise_report` summarises a clean / noisy pair (kept and labelled fractions per class,
agreement, the transition matrix and its rank, :mod:`emseg.noise.transition`);
:func:`report_from_counts` gives the same from joint voxel counts, which
:class:`TransitionCounter` accumulates block by block for volumes that do not fit in memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from emseg.noise.checks import as_labels, check_int
from emseg.noise.transition import (
    TransitionMatrix,
    check_counts,
    joint_counts,
    label_pair,
    rank_statistics,
    row_normalise,
    transition_from_counts,
)

__all__ = ["TransitionCounter", "noise_report", "report_from_counts"]


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def noise_report(
    clean: ArrayLike,
    noisy: ArrayLike,
    n_classes: int | None = None,
    *,
    tol: float | None = None,
) -> dict[str, Any]:
    """Summary of how ``noisy`` relates to ``clean``, as a JSON-able dict.

    Parameters
    ----------
    clean, noisy : array_like of int, same shape
        Clean and noisy labels (-1 = ignore).
    n_classes : int >= 2, optional
        Number of classes (default: largest label + 1, at least 2).
    tol : float, optional
        Absolute rank tolerance (default: from the counts, :func:`rank_statistics`).

    Returns
    -------
    dict
        ``n_classes``; ``clean_counts[k]`` (labelled clean voxels of class k);
        ``kept_fraction[k]``: fraction of clean class-``k`` voxels still labelled
        ``k`` in ``noisy`` (voxels made ignore count as not kept);
        ``labelled_fraction[k]``: fraction of clean class-``k`` voxels labelled
        (not -1) in ``noisy``; ``agreement``: fraction of voxels labelled in
        both that agree; ``matrix``, ``counts``, ``rank``, ``singular_values``, ``rank_tol``,
        ``rank_sampling_error``, ``rank_classes`` as in :meth:`TransitionMatrix.to_dict`.
        Classes absent from ``clean`` give ``None``.

    Examples
    --------
    >>> import numpy as np
    >>> clean = np.array([[0, 0, 1, 1]]); noisy = np.array([[0, 1, 1, -1]])
    >>> r = noise_report(clean, noisy)
    >>> r["kept_fraction"], r["labelled_fraction"], r["rank"]   # 3 voxels: rank 1 within the noise
    ([0.5, 0.5], [1.0, 0.5], 1)
    """
    c, n, k = label_pair(clean, noisy, n_classes)
    counts = joint_counts(c, n, k)
    clean_counts = np.bincount(c[c >= 0].astype(np.int64), minlength=k)
    return report_from_counts(counts, clean_counts, tol=tol)


def report_from_counts(counts: ArrayLike, clean_counts: ArrayLike, *, tol: float | None = None) -> dict[str, Any]:
    """:func:`noise_report` from accumulated counts.

    Parameters
    ----------
    counts : array_like of int, shape (K, K)
        Joint counts ``counts[clean, noisy]`` over voxels labelled in both.
    clean_counts : array_like of int, shape (K,)
        Labelled voxels of each clean class, including those the noisy labels
        ignore (so ``clean_counts >= counts.sum(axis=1)``).
    tol : float, optional
        Absolute rank tolerance (default: from the counts, :func:`rank_statistics`).

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
    counts = check_counts(counts)
    k = counts.shape[0]
    clean_counts = np.asarray(clean_counts)
    if clean_counts.shape != (k,) or clean_counts.dtype.kind not in "iu":
        raise ValueError(f"clean_counts must be {k} integer counts, got shape {clean_counts.shape}")
    clean_counts = clean_counts.astype(np.int64)
    labelled = counts.sum(axis=1)
    if np.any(labelled > clean_counts):
        raise ValueError("clean_counts must be >= the row sums of counts")
    matrix = row_normalise(counts)
    kept = np.diag(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        kept_fraction = kept / clean_counts
        labelled_fraction = labelled / clean_counts
    compared = int(counts.sum())
    stats = rank_statistics(counts, tol=tol)
    return {
        "n_classes": k,
        "clean_counts": clean_counts.tolist(),
        "kept_fraction": _nan_to_none(kept_fraction),
        "labelled_fraction": _nan_to_none(labelled_fraction),
        "agreement": float(kept.sum() / compared) if compared else None,
        "matrix": matrix.tolist(),
        "counts": counts.tolist(),
        "rank": stats["rank"],
        "singular_values": [float(v) for v in stats["singular_values"]],
        "rank_tol": float(stats["tol"]),
        "rank_sampling_error": float(stats["sampling_error"]),
        "rank_classes": list(stats["classes"]),
    }


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
        k = 2 if n_classes is None else check_int(n_classes, "n_classes", minimum=2)
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
        c = as_labels(clean, "clean", spatial=False)
        n = as_labels(noisy, "noisy", spatial=False)
        if c.shape != n.shape:
            raise ValueError(f"clean and noisy shapes differ: {c.shape} vs {n.shape}")
        c, n = c.reshape(-1), n.reshape(-1)
        top = max(int(c.max()) if c.size else 0, int(n.max()) if n.size else 0)
        self._grow(top + 1)
        k = self.n_classes
        self.counts += joint_counts(c, n, k)
        self.clean_counts += np.bincount(c[c >= 0].astype(np.int64), minlength=k)

    def transition(self, *, tol: float | None = None) -> TransitionMatrix:
        """The :class:`TransitionMatrix` of the voxels seen so far."""
        return transition_from_counts(self.counts, tol=tol)

    def report(self, *, tol: float | None = None) -> dict[str, Any]:
        """The :func:`noise_report` dict of the voxels seen so far."""
        return report_from_counts(self.counts, self.clean_counts, tol=tol)
