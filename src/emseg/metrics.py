"""Segmentation metrics from (streaming) confusion matrices.

* :func:`confusion_matrix` -- ``(K, K)`` counts, rows = true class, columns =
  predicted class, ignore label excluded.
* :class:`ConfusionAccumulator` -- accumulate the matrix block by block, so that
  volumes larger than memory can be scored.
* :func:`scores_from_confusion` -- per-class Jaccard, Dice, precision, recall and
  their means, plus accuracy, as a :class:`SegmentationScores`.
* :func:`binary_scores` and :func:`roc_auc` -- conveniences for a binary
  foreground map.

Undefined ratios (zero denominator) are reported as NaN, never as 0 or 1, so
that a class absent from both target and prediction does not bias the means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BinaryScores",
    "ConfusionAccumulator",
    "SegmentationScores",
    "binary_scores",
    "confusion_matrix",
    "roc_auc",
    "scores_from_confusion",
]

#: The most classes any count read from a file or the command line may state: a confusion matrix,
#: a transition matrix or a per-class array is sized by it.
MAX_CLASSES = 1 << 12


# --------------------------------------------------------------------------- helpers


def _check_labels(name: str, a: np.ndarray) -> None:
    if a.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer labels, got dtype {a.dtype}")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` elementwise with NaN where ``den == 0``."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    finite = x[~np.isnan(x)]
    return float(finite.mean()) if finite.size else float("nan")


def _json_float(x: float) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


# --------------------------------------------------------------------------- confusion matrix


def confusion_matrix(
    pred: np.ndarray,
    target: np.ndarray,
    n_classes: int,
    ignore_label: int | None = -1,
) -> np.ndarray:
    """Confusion matrix of an integer prediction against an integer target.

    Parameters
    ----------
    pred : array_like of int
        Predicted labels, any shape.
    target : array_like of int
        True labels, same shape as ``pred``.
    n_classes : int
        Number of classes ``K``; labels must lie in ``0 .. K-1``.
    ignore_label : int or None
        Voxels whose *target* equals this value are skipped (their prediction is
        not checked).  ``None`` disables ignoring.

    Returns
    -------
    numpy.ndarray
        ``(K, K)`` int64 counts; ``cm[i, j]`` = number of voxels of true class
        ``i`` predicted as class ``j``.

    Raises
    ------
    ValueError
        On shape mismatch, non-integer labels or labels outside ``0 .. K-1``.

    Examples
    --------
    >>> confusion_matrix([0, 1, 1, 2], [0, 1, 2, -1], 3).tolist()
    [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)):
        raise ValueError(f"n_classes must be an int, got {n_classes!r}")
    k = int(n_classes)
    if k < 1:
        raise ValueError(f"n_classes must be >= 1, got {k}")
    p = np.asarray(pred)
    t = np.asarray(target)
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} does not match target shape {t.shape}")
    _check_labels("pred", p)
    _check_labels("target", t)
    p = p.reshape(-1)
    t = t.reshape(-1)
    if ignore_label is not None:
        keep = t != ignore_label
        if not keep.all():
            p = p[keep]
            t = t[keep]
    if t.size:
        for name, a in (("target", t), ("pred", p)):
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= k:
                raise ValueError(
                    f"{name} labels must lie in 0..{k - 1} (ignore_label={ignore_label}), "
                    f"found range {lo}..{hi}"
                )
    flat = t.astype(np.int64) * k + p.astype(np.int64)
    return np.bincount(flat, minlength=k * k).astype(np.int64).reshape(k, k)


# --------------------------------------------------------------------------- scores


@dataclass(frozen=True, eq=False)
class SegmentationScores:
    """Scores derived from a ``(K, K)`` confusion matrix.

    Per-class arrays (length ``K``, read-only float64, NaN where undefined):

    * ``jaccard`` = TP / (TP + FP + FN), ``dice`` = 2 TP / (2 TP + FP + FN):
      NaN when the class occurs in neither target nor prediction;
    * ``precision`` = TP / (TP + FP): NaN when the class is never predicted;
    * ``recall`` = TP / (TP + FN): NaN when the class is absent from the target;
    * ``support`` (int64) = number of target voxels of the class.

    The ``mean_*`` fields average the per-class values over classes occurring in
    the target or the prediction, skipping NaN entries (NaN if none is left).
    ``accuracy`` is trace / total (NaN for an empty matrix).
    """

    confusion: np.ndarray
    jaccard: np.ndarray
    dice: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    support: np.ndarray
    mean_jaccard: float
    mean_dice: float
    mean_precision: float
    mean_recall: float
    accuracy: float

    @property
    def n_classes(self) -> int:
        """Number of classes ``K``."""
        return int(self.confusion.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dictionary (plain floats/ints/lists, NaN -> None).

        Examples
        --------
        >>> import json
        >>> s = scores_from_confusion([[3, 1], [0, 2]])
        >>> json.dumps(s.to_dict())[:20]
        '{"n_classes": 2, "ac'
        """
        return {
            "n_classes": self.n_classes,
            "accuracy": _json_float(self.accuracy),
            "mean_jaccard": _json_float(self.mean_jaccard),
            "mean_dice": _json_float(self.mean_dice),
            "mean_precision": _json_float(self.mean_precision),
            "mean_recall": _json_float(self.mean_recall),
            "jaccard": [_json_float(v) for v in self.jaccard],
            "dice": [_json_float(v) for v in self.dice],
            "precision": [_json_float(v) for v in self.precision],
            "recall": [_json_float(v) for v in self.recall],
            "support": [int(v) for v in self.support],
            "confusion": [[int(v) for v in row] for row in self.confusion],
        }


def scores_from_confusion(cm: np.ndarray) -> SegmentationScores:
    """Per-class and mean segmentation scores from a confusion matrix.

    Parameters
    ----------
    cm : array_like
        ``(K, K)`` non-negative integer counts, rows = true class, columns =
        predicted class (as returned by :func:`confusion_matrix`).

    Returns
    -------
    SegmentationScores
        See the class documentation for the NaN conventions.

    Examples
    --------
    >>> s = scores_from_confusion([[3, 1], [0, 2]])
    >>> s.jaccard.round(3).tolist(), round(s.accuracy, 3)
    ([0.75, 0.667], 0.833)
    """
    c = np.asarray(cm)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 1:
        raise ValueError(f"confusion matrix must be square (K, K) with K >= 1, got shape {c.shape}")
    if c.dtype.kind == "f":
        if not np.all(np.isfinite(c)) or not np.all(c == np.round(c)):
            raise ValueError("confusion matrix must hold whole-number counts")
    elif c.dtype.kind not in "iu":
        raise ValueError(f"confusion matrix must be numeric counts, got dtype {c.dtype}")
    if np.any(c < 0):
        raise ValueError("confusion matrix counts must be non-negative")
    c = c.astype(np.int64)

    tp = np.diag(c).astype(np.float64)
    true_count = c.sum(axis=1).astype(np.float64)
    pred_count = c.sum(axis=0).astype(np.float64)
    fn = true_count - tp
    fp = pred_count - tp

    jaccard = _ratio(tp, tp + fp + fn)
    dice = _ratio(2.0 * tp, 2.0 * tp + fp + fn)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    occurs = (true_count + pred_count) > 0
    total = float(c.sum())

    return SegmentationScores(
        confusion=_readonly(c),
        jaccard=_readonly(jaccard),
        dice=_readonly(dice),
        precision=_readonly(precision),
        recall=_readonly(recall),
        support=_readonly(c.sum(axis=1)),
        mean_jaccard=_nanmean(jaccard[occurs]),
        mean_dice=_nanmean(dice[occurs]),
        mean_precision=_nanmean(precision[occurs]),
        mean_recall=_nanmean(recall[occurs]),
        accuracy=float(tp.sum() / total) if total > 0 else float("nan"),
    )


class ConfusionAccumulator:
    """Accumulate a confusion matrix over blocks of a volume.

    Parameters
    ----------
    n_classes : int
        Number of classes ``K``.
    ignore_label : int or None
        Target label to skip (default ``-1``); ``None`` disables ignoring.

    Examples
    --------
    >>> import numpy as np
    >>> acc = ConfusionAccumulator(2)
    >>> _ = acc.update(np.array([0, 1]), np.array([0, 1]))
    >>> _ = acc.update(np.array([1, 1]), np.array([0, -1]))
    >>> acc.matrix.tolist()
    [[1, 1], [0, 1]]
    >>> round(acc.scores().accuracy, 3)
    0.667
    """

    def __init__(self, n_classes: int, ignore_label: int | None = -1) -> None:
        if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)):
            raise ValueError(f"n_classes must be an int, got {n_classes!r}")
        if int(n_classes) < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.n_classes = int(n_classes)
        self.ignore_label = ignore_label
        self._cm = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> ConfusionAccumulator:
        """Add the counts of one block; returns ``self``."""
        self._cm += confusion_matrix(pred, target, self.n_classes, self.ignore_label)
        return self

    def merge(self, other: ConfusionAccumulator | np.ndarray) -> ConfusionAccumulator:
        """Add the counts of another accumulator (or a ``(K, K)`` matrix)."""
        m = other.matrix if isinstance(other, ConfusionAccumulator) else np.asarray(other)
        if m.shape != self._cm.shape:
            raise ValueError(f"cannot merge matrix of shape {m.shape} into {self._cm.shape}")
        if m.dtype.kind not in "iu" or np.any(m < 0):
            raise ValueError("merged confusion matrix must hold non-negative integer counts")
        self._cm += m.astype(np.int64)
        return self

    def reset(self) -> None:
        """Zero the accumulated counts."""
        self._cm[...] = 0

    @property
    def matrix(self) -> np.ndarray:
        """Copy of the accumulated ``(K, K)`` int64 matrix."""
        return self._cm.copy()

    @property
    def n_voxels(self) -> int:
        """Number of (non-ignored) voxels counted so far."""
        return int(self._cm.sum())

    def scores(self) -> SegmentationScores:
        """:func:`scores_from_confusion` of the accumulated matrix."""
        return scores_from_confusion(self._cm)

    def __repr__(self) -> str:
        return (
            f"ConfusionAccumulator(n_classes={self.n_classes}, "
            f"ignore_label={self.ignore_label}, n_voxels={self.n_voxels})"
        )


# --------------------------------------------------------------------------- binary


@dataclass(frozen=True)
class BinaryScores:
    """Foreground scores of a binary segmentation (NaN where undefined).

    ``dice``, ``jaccard``, ``precision`` and ``recall`` refer to the foreground
    class (label 1); ``tp``, ``fp``, ``fn``, ``tn`` are voxel counts.
    """

    dice: float
    jaccard: float
    precision: float
    recall: float
    accuracy: float
    tp: int
    fp: int
    fn: int
    tn: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dictionary (NaN -> None)."""
        return {
            "dice": _json_float(self.dice),
            "jaccard": _json_float(self.jaccard),
            "precision": _json_float(self.precision),
            "recall": _json_float(self.recall),
            "accuracy": _json_float(self.accuracy),
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
        }


def binary_scores(
    prob_or_pred: np.ndarray,
    target: np.ndarray,
    *,
    threshold: float = 0.5,
    ignore_label: int | None = -1,
) -> BinaryScores:
    """Dice, Jaccard, precision, recall and accuracy of a binary prediction.

    Parameters
    ----------
    prob_or_pred : array_like
        Floating foreground probabilities (predicted foreground where
        ``value >= threshold``) or a bool/integer 0/1 prediction (used as is).
    target : array_like of int
        0/1 target of the same shape; ``ignore_label`` voxels are skipped.
    threshold : float
        Probability threshold, only used for floating input.
    ignore_label : int or None
        Target label to skip (default ``-1``).

    Returns
    -------
    BinaryScores

    Examples
    --------
    >>> import numpy as np
    >>> s = binary_scores(np.array([0.9, 0.2, 0.7, 0.1]), np.array([1, 0, 0, -1]))
    >>> s.tp, s.fp, s.tn, round(s.dice, 3)
    (1, 1, 1, 0.667)
    """
    x = np.asarray(prob_or_pred)
    if x.dtype.kind == "f":
        if np.isnan(x).any():
            raise ValueError("prob_or_pred contains NaN")
        pred = (x >= threshold).astype(np.int64)
    elif x.dtype.kind in "iub":
        pred = x.astype(np.int64)
        if pred.size and (pred.min() < 0 or pred.max() > 1):
            raise ValueError("integer prob_or_pred must be a 0/1 prediction")
    else:
        raise ValueError(f"prob_or_pred must be numeric, got dtype {x.dtype}")
    cm = confusion_matrix(pred, target, 2, ignore_label)
    s = scores_from_confusion(cm)
    total = cm.sum()
    return BinaryScores(
        dice=float(s.dice[1]),
        jaccard=float(s.jaccard[1]),
        precision=float(s.precision[1]),
        recall=float(s.recall[1]),
        accuracy=float(s.accuracy) if total else float("nan"),
        tp=int(cm[1, 1]),
        fp=int(cm[0, 1]),
        fn=int(cm[1, 0]),
        tn=int(cm[0, 0]),
    )


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts).astype(np.float64)  # rank of the last member of each group
    avg = last - (counts - 1) / 2.0
    return avg[inverse.reshape(-1)]


def roc_auc(
    scores: np.ndarray,
    target: np.ndarray,
    *,
    ignore_label: int | None = -1,
) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic.

    ``AUC = (R_1 - n_1 (n_1 + 1) / 2) / (n_1 n_0)`` where ``R_1`` is the sum of
    the (tie-averaged) ranks of the positive voxels' scores.  Equals the
    probability that a random positive scores higher than a random negative,
    ties counting one half.

    Parameters
    ----------
    scores : array_like
        Real-valued scores (higher = more likely foreground).
    target : array_like of int
        0/1 labels of the same shape; ``ignore_label`` voxels are skipped.
    ignore_label : int or None
        Target label to skip (default ``-1``).

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If either class is missing, shapes differ, or scores contain NaN.

    Examples
    --------
    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    """
    s = np.asarray(scores)
    t = np.asarray(target)
    if s.shape != t.shape:
        raise ValueError(f"scores shape {s.shape} does not match target shape {t.shape}")
    if s.dtype.kind not in "fiub":
        raise ValueError(f"scores must be numeric, got dtype {s.dtype}")
    _check_labels("target", t)
    s = s.reshape(-1)
    t = t.reshape(-1)
    if ignore_label is not None:
        keep = t != ignore_label
        s = s[keep]
        t = t[keep]
    if s.dtype.kind == "f" and np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if t.size and (t.min() < 0 or t.max() > 1):
        raise ValueError("target must hold 0/1 labels (plus ignore_label)")
    pos = t == 1
    n1 = int(pos.sum())
    n0 = int(t.size - n1)
    if n1 == 0 or n0 == 0:
        raise ValueError(f"roc_auc needs both classes, got {n1} positive and {n0} negative voxels")
    ranks = _average_ranks(s)
    r1 = float(ranks[pos].sum())
    u = r1 - n1 * (n1 + 1) / 2.0
    return float(u / (float(n1) * float(n0)))
