"""Thresholding baselines of iGTT (Otsu, adaptive) and the binary scores every method is reported with."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from skimage.filters import threshold_local, threshold_otsu

from emseg.igtt.thresholds import invert_if_large
from emseg.metrics import binary_scores, roc_auc

#: Names of the thresholding baselines, in report order.
BASELINES = ("otsu", "adaptive")


@dataclass(frozen=True)
class Baseline:
    """A thresholding baseline: ``mask`` (foreground, after the polarity rule) and ``score``
    (foreground score for the AUC: the signed distance of the intensity to the threshold,
    positive on the foreground side, i.e. ``mask == score > 0``)."""

    name: str
    mask: np.ndarray
    score: np.ndarray
    inverted: bool
    threshold: float | None = None

    @property
    def fg_fraction(self) -> float:
        return float(np.count_nonzero(self.mask)) / max(1, self.mask.size)


def threshold_baselines(raw: Any, *, block_size: int = 51, offset: float = 0.0,
                        invert_large: bool = True) -> dict[str, Baseline]:
    """Otsu and adaptive Gaussian thresholding with the minority-foreground polarity rule.

    * ``otsu``: ``t = skimage.filters.threshold_otsu(raw)`` over the whole image/stack;
      candidate mask ``raw > t``.
    * ``adaptive``: ``T = skimage.filters.threshold_local(section, block_size, method="gaussian",
      offset=offset)`` per z-section (2D, as the sections of ssTEM stacks are imaged apart);
      candidate mask ``raw > T``.

    In EM the structures are dark, so ``raw > t`` usually selects the cytoplasm. The polarity is
    chosen with the same rule as iGTT's inversion (:func:`invert_if_large`): when the candidate
    covers more than half of the image the complement (``raw <= t``) is the foreground.

    Parameters
    ----------
    raw : array_like, 2D or 3D
        Intensities (any real dtype; passed to scikit-image as they are).
    block_size : int
        Odd neighbourhood size of the adaptive threshold.
    offset : float
        Subtracted from the local weighted mean (``threshold_local``'s ``offset``).
    invert_large : bool
        Apply the polarity rule; ``False`` keeps ``raw > threshold``.

    Returns
    -------
    dict of str to Baseline
        Keys ``"otsu"`` and ``"adaptive"``.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.full((32, 32), 200, np.uint8); img[10:14, :] = 30   # a dark band
    >>> b = threshold_baselines(img, block_size=15)
    >>> int(b["otsu"].mask.sum()), b["otsu"].inverted
    (128, True)
    """
    img = np.asarray(raw)
    if img.ndim not in (2, 3):
        raise ValueError(f"raw must be 2D (y, x) or 3D (z, y, x), got shape {img.shape}")
    if img.size == 0 or img.dtype.kind not in "fiu":
        raise ValueError("raw must be a non-empty real array")
    if block_size < 3 or block_size % 2 == 0:
        raise ValueError(f"block_size must be an odd integer >= 3, got {block_size}")
    out: dict[str, Baseline] = {}
    t = float(threshold_otsu(img))
    diff = img.astype(np.float64) - t
    mask, inverted = invert_if_large(diff > 0, enabled=invert_large)
    out["otsu"] = Baseline("otsu", mask, -diff if inverted else diff, inverted, t)

    sections = img[None] if img.ndim == 2 else img
    local = np.stack([threshold_local(s, block_size, method="gaussian", offset=offset) for s in sections])
    local = local.reshape(img.shape)
    diff = img.astype(np.float64) - local
    mask, inverted = invert_if_large(diff > 0, enabled=invert_large)
    out["adaptive"] = Baseline("adaptive", mask, -diff if inverted else diff, inverted, None)
    return out


def binary_metrics(score: Any, mask: Any, truth: Any) -> dict[str, float]:
    """Dice and accuracy of ``mask`` and ROC AUC of ``score`` against 0/1 ``truth`` (-1 ignored).

    Parameters
    ----------
    score : array_like
        Foreground scores (higher = foreground), for the AUC.
    mask : array_like of bool or 0/1
        Binary segmentation, for Dice and accuracy.
    truth : array_like of int
        Ground truth: 1 foreground, 0 background, -1 ignored.

    Returns
    -------
    dict
        ``dice``, ``auc``, ``accuracy`` (NaN when undefined, e.g. the AUC with one class only).

    Examples
    --------
    >>> m = binary_metrics([0.9, 0.2, 0.7, 0.1], [1, 0, 1, 0], [1, 0, 0, 0])
    >>> round(m["dice"], 3), m["auc"], m["accuracy"]
    (0.667, 1.0, 0.75)
    """
    mask = np.asarray(mask).astype(np.uint8)
    truth = np.asarray(truth)
    s = binary_scores(mask, truth)
    try:
        auc = roc_auc(np.asarray(score), truth)
    except ValueError:
        auc = float("nan")
    return {"dice": float(s.dice), "auc": float(auc), "accuracy": float(s.accuracy)}
