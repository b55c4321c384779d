"""Per-label probabilities into one label map, and the Dice of label maps.

Merged label map (``labels``): for a conditioned model each label's sigmoid output p_k is an
independent "is this voxel label k" probability. Normalised over the requested labels plus
background, with background probability prod_k (1 - p_k), the argmax is taken; a voxel where no
p_k exceeds 0.5 is background. (Since prod_k (1 - p_k) <= 1 - max_k p_k, this is simply: the label
with the largest p_k if that exceeds 0.5, else 0.) For the baseline, the softmax background is
1 - sum of the requested labels' probabilities (the classes not requested count as background)
and the label map is the plain argmax.

The *calibrated* merge (``[lcs] merge = "calibrated"``) replaces the independent sigmoids by a
softmax over ``[0, s_1, ..., s_K]``, ``s_k`` the label's logit after a per-label scale and offset
fitted on the atlas (:mod:`emseg.lcs.calibrate`): the label map is the argmax of the calibrated
logits, background where none is above 0. :class:`CalibratedMerge` folds the maps in one at a
time (running argmax and running log-sum-exp).

:func:`merge_labels` merges all maps at once, :class:`RunningMerge` and :class:`CalibratedMerge`
one map at a time (memory independent of the number of labels); :class:`DiceAccumulator` scores
merged maps block by block.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from emseg.errors import InputError
from emseg.lcs.calibrate import Calibration

RULES = ("sigmoid", "softmax")
#: ``[lcs] merge`` values: the calibrated softmax, or the largest sigmoid above 0.5 (rule "sigmoid").
MERGES = ("calibrated", "max")


def check_merge(merge: str) -> str:
    """``merge`` if it is one of :data:`MERGES`, else :class:`~emseg.errors.InputError`.

    >>> check_merge("max")
    'max'
    """
    if merge not in MERGES:
        raise InputError(f"merge must be one of {', '.join(MERGES)}, got {merge!r}")
    return merge


def normalised_probabilities(probs: np.ndarray, rule: str = "sigmoid") -> np.ndarray:
    """(K+1, *S) probabilities of background and the K labels, summing to 1 per voxel.

    ``rule="sigmoid"`` (conditioned outputs): background = prod_k (1 - p_k), then all K+1 divided by
    their sum. ``rule="softmax"`` (baseline): background = 1 - sum_k p_k (clipped at 0), no rescaling
    otherwise needed.

    Examples
    --------
    >>> [round(float(v), 3) for v in normalised_probabilities(np.array([[0.5], [0.5]]))[:, 0]]
    [0.2, 0.4, 0.4]
    """
    p = np.asarray(probs, dtype=np.float64)
    if rule == "sigmoid":
        background = np.prod(1.0 - p, axis=0, keepdims=True)
    elif rule == "softmax":
        background = np.clip(1.0 - p.sum(axis=0, keepdims=True), 0.0, None)
    else:
        raise InputError(f"rule must be one of {RULES}, got {rule!r}")
    allp = np.concatenate([background, p], axis=0)
    return (allp / np.maximum(allp.sum(axis=0, keepdims=True), 1e-12)).astype(np.float32)


def merge_labels(probs: np.ndarray, labels: Sequence[int], rule: str = "sigmoid") -> np.ndarray:
    """Merged label map (values from ``labels``, 0 = background) from (K, *S) per-label probabilities.

    Argmax of :func:`normalised_probabilities`; with ``rule="sigmoid"`` voxels where no label's
    probability exceeds 0.5 are background.

    Examples
    --------
    >>> merge_labels(np.array([[0.9, 0.2, 0.4], [0.6, 0.1, 0.45]]), [3, 7]).tolist()
    [3, 0, 0]
    """
    p = np.asarray(probs, dtype=np.float32)
    if p.shape[0] != len(labels):
        raise ValueError(f"{p.shape[0]} probability maps for {len(labels)} labels")
    if rule not in RULES:
        raise InputError(f"rule must be one of {RULES}, got {rule!r}")
    values = np.concatenate([[0], np.asarray(labels, dtype=np.int64)])
    # Same result as the argmax of normalised_probabilities, without building the (K+1) maps:
    # sigmoid: prod(1 - p) <= 1 - max p, so background wins only where max p <= 0.5 (forced);
    # softmax: background is 1 - sum p.
    index = np.argmax(p, axis=0) + 1
    best = np.take_along_axis(p, index[None] - 1, axis=0)[0]
    if rule == "sigmoid":
        index[best <= 0.5] = 0
    else:
        index[1.0 - p.sum(axis=0) >= best] = 0
    return values[index]


def label_dtype(labels: Sequence[int]) -> np.dtype:
    """Smallest unsigned type holding every label."""
    top = max([0, *labels])
    return np.dtype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32)


class DiceAccumulator:
    """Per-class Dice of label maps accumulated over blocks; target voxels -1 are ignored.

    Examples
    --------
    >>> acc = DiceAccumulator([1, 2])
    >>> acc.update(np.array([1, 1, 0, 2]), np.array([1, 0, 0, -1]))
    >>> round(acc.dice()[1], 4), bool(np.isnan(acc.dice()[2]))
    (0.6667, True)
    """

    def __init__(self, classes: Sequence[int]):
        self.classes = [int(c) for c in classes]
        self.tp = np.zeros(len(self.classes), dtype=np.int64)
        self.fp = np.zeros_like(self.tp)
        self.fn = np.zeros_like(self.tp)

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        pred, target = np.asarray(pred), np.asarray(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
        keep = target >= 0
        for i, c in enumerate(self.classes):
            p, t = (pred == c) & keep, target == c
            self.tp[i] += np.count_nonzero(p & t)
            self.fp[i] += np.count_nonzero(p & ~t)
            self.fn[i] += np.count_nonzero(~p & t)

    def dice(self) -> dict[int, float]:
        """Dice per class: 2 TP / (2 TP + FP + FN), NaN where the class is in neither map."""
        denom = 2 * self.tp + self.fp + self.fn
        return {c: (float(2 * self.tp[i] / denom[i]) if denom[i] else float("nan"))
                for i, c in enumerate(self.classes)}


class RunningMerge:
    """The merged label map of :func:`merge_labels`, from per-label maps given one at a time.

    Holds the largest probability so far and its label (and, for ``rule="softmax"``, the running
    sum), so memory does not depend on the number of labels. Ties go to the earlier label, as
    with ``argmax``.

    Examples
    --------
    >>> m = RunningMerge([3, 7], "sigmoid", (3,))
    >>> m.update(0, np.array([0.9, 0.2, 0.4])); m.update(1, np.array([0.6, 0.1, 0.45]))
    >>> m.result().tolist()
    [3, 0, 0]
    """

    def __init__(self, labels: Sequence[int], rule: str, shape: Sequence[int]):
        if rule not in RULES:
            raise InputError(f"rule must be one of {RULES}, got {rule!r}")
        self.values = np.concatenate([[0], np.asarray(labels, dtype=np.int64)])
        self.rule = rule
        self.best = np.full(tuple(shape), -np.inf, dtype=np.float32)
        self.index = np.zeros(tuple(shape), dtype=np.int32)
        self.total = np.zeros(tuple(shape), dtype=np.float32) if rule == "softmax" else None

    def update(self, k: int, probs: np.ndarray) -> None:
        """Fold in the map of the ``k``-th label (0-based, in ``labels`` order)."""
        p = np.asarray(probs, dtype=np.float32)
        better = p > self.best
        self.best[better] = p[better]
        self.index[better] = k + 1
        if self.total is not None:
            self.total += p

    def result(self) -> np.ndarray:
        index = self.index.copy()
        if self.rule == "sigmoid":
            index[self.best <= 0.5] = 0
        else:
            index[1.0 - self.total >= self.best] = 0
        return self.values[index]


class CalibratedMerge:
    """Merged label map under a :class:`~emseg.lcs.calibrate.Calibration`, one map at a time.

    Holds the largest calibrated logit so far (background: 0), its label and the running
    ``log(1 + sum_k exp(s_k))``; memory does not depend on the number of labels. The label map
    equals the argmax of ``softmax([0, s_1, ..., s_K])`` (ties to background, then to the earlier
    label); :meth:`probability` is the softmax probability of the chosen label.

    Examples
    --------
    >>> m = CalibratedMerge(Calibration((3, 7), (1.0, 1.0), (0.0, -3.0)), (3,))
    >>> m.update(0, np.array([0.9, 0.2, 0.4])); m.update(1, np.array([0.99, 0.99, 0.45]))
    >>> m.result().tolist()  # label 7's logit is lowered by 3: it wins only where label 3 is unlikely
    [3, 7, 0]
    """

    def __init__(self, calibration: Calibration, shape: Sequence[int]):
        self.calibration = calibration
        self.values = np.concatenate([[0], np.asarray(calibration.labels, dtype=np.int64)])
        self.best = np.zeros(tuple(shape), dtype=np.float32)
        self.index = np.zeros(tuple(shape), dtype=np.int32)
        self.lse = np.zeros(tuple(shape), dtype=np.float32)

    def update(self, k: int, probs: np.ndarray) -> None:
        """Fold in the probabilities of the ``k``-th label (0-based, in ``calibration.labels`` order)."""
        s = self.calibration.calibrated(k, probs)
        better = s > self.best
        self.best[better] = s[better]
        self.index[better] = k + 1
        np.logaddexp(self.lse, s, out=self.lse)

    def result(self) -> np.ndarray:
        return self.values[self.index]

    def probability(self) -> np.ndarray:
        """Calibrated probability of the chosen label (background included), float32."""
        return np.exp(self.best - self.lse)


def calibrated_merge(probs: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Merged label map of (K, *S) probabilities under ``calibration`` (via :class:`CalibratedMerge`)."""
    p = np.asarray(probs)
    if p.shape[0] != len(calibration.labels):
        raise ValueError(f"{p.shape[0]} probability maps for {len(calibration.labels)} labels")
    merge = CalibratedMerge(calibration, p.shape[1:])
    for k in range(p.shape[0]):
        merge.update(k, p[k])
    return merge.result()
