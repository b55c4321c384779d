"""Streaming evaluation of a predicted volume against ground truth (``emseg evaluate``)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from emseg.errors import InputError
from emseg.io import Volume
from emseg.metrics import MAX_CLASSES, ConfusionAccumulator, SegmentationScores

_SLAB_VOXELS = 1 << 24


def _labels_of(pred: Volume, gt_shape: tuple[int, ...], sl: tuple[slice, ...]) -> np.ndarray:
    if pred.shape == gt_shape:
        block = pred[sl]
        if np.issubdtype(block.dtype, np.floating):
            raise InputError("prediction has the ground truth's shape but float values: give labels, "
                             "or probabilities with a leading channel axis", source=str(pred.spec))
        return block.astype(np.int64)
    probs = pred[(slice(None),) + sl]
    if probs.shape[0] > 1:
        return np.argmax(probs, axis=0)
    return (probs[0] > 0.5 / _scale_of(pred, probs.dtype)).astype(np.int64)


def _scale_of(pred: Volume, dtype: np.dtype) -> float:
    """Probability per stored unit: 1 for floats, the ``scale`` attribute of integer probabilities
    (``emseg predict --dtype uint8`` writes 1/255), else 1 / the type's maximum."""
    if np.issubdtype(dtype, np.floating):
        return 1.0
    scale = getattr(pred, "attrs", {}).get("scale")
    try:
        return float(scale) if scale else 1.0 / float(np.iinfo(dtype).max)
    except (TypeError, ValueError):
        return 1.0 / float(np.iinfo(dtype).max)


def evaluate_volumes(
    prediction: Volume,
    ground_truth: Volume,
    *,
    n_classes: int | None = None,
    ignore_label: int = -1,
    progress: Callable[[int, int], None] | None = None,
) -> SegmentationScores:
    """Per-class Jaccard, Dice, precision and recall, read slab by slab.

    ``prediction`` is a label volume of the ground truth's shape or probabilities (C, *S), turned
    into labels by argmax (a single channel is thresholded at 0.5).
    """
    if n_classes is not None and n_classes < 1:
        raise InputError(f"n_classes must be >= 1, got {n_classes}")
    gt_shape = ground_truth.shape
    if not gt_shape or any(s < 1 for s in gt_shape):
        raise InputError(f"ground truth is empty (shape {gt_shape})", source=str(ground_truth.spec))
    if not prediction.shape or any(s < 1 for s in prediction.shape):
        raise InputError(f"prediction is empty (shape {prediction.shape})", source=str(prediction.spec))
    if not np.issubdtype(ground_truth.dtype, np.integer):
        raise InputError(f"ground truth must be integer labels, found {ground_truth.dtype}", source=str(ground_truth.spec))
    if prediction.shape != gt_shape and prediction.shape[1:] != gt_shape:
        raise InputError(f"prediction shape {prediction.shape} matches neither ground truth shape {gt_shape} "
                         f"nor (C, {', '.join(map(str, gt_shape))})", source=str(prediction.spec))
    if n_classes is None:
        if prediction.shape != gt_shape:
            n_classes = max(2, prediction.shape[0])
        else:
            stated = prediction.attrs.get("n_classes", 0)
            if isinstance(stated, (bool, np.bool_)) or not isinstance(stated, (int, np.integer)):
                raise InputError(f"attribute 'n_classes' must be an integer, got {stated!r}"[:120],
                                 source=str(prediction.spec))
            n_classes = int(stated)
    plane = int(np.prod(gt_shape[1:])) if len(gt_shape) > 1 else 1
    step = max(1, _SLAB_VOXELS // max(plane, 1))
    slabs = [(slice(a, min(a + step, gt_shape[0])),) for a in range(0, gt_shape[0], step)]
    if not n_classes:
        top = 0
        for sl in slabs:
            top = max(top, int(_labels_of(prediction, gt_shape, sl).max()), int(ground_truth[sl].max()))
        n_classes = top + 1
    if not 1 <= n_classes <= MAX_CLASSES:  # the confusion matrix is n_classes x n_classes
        raise InputError(f"{n_classes} classes (at most {MAX_CLASSES}): labels or `n_classes` out of range",
                         source=str(prediction.spec))
    acc = ConfusionAccumulator(n_classes, ignore_label=ignore_label)
    for i, sl in enumerate(slabs):
        gt = ground_truth[sl].astype(np.int64)
        pred = _labels_of(prediction, gt_shape, sl)
        bad = (gt != ignore_label) & ((gt < 0) | (gt >= n_classes))
        if bad.any():
            raise InputError(f"label {int(gt[bad].flat[0])} outside 0..{n_classes - 1}", source=str(ground_truth.spec))
        try:
            acc.update(pred, gt)
        except ValueError as exc:
            raise InputError(str(exc), source=str(prediction.spec)) from None
        if progress is not None:
            progress(i + 1, len(slabs))
    return acc.scores()
