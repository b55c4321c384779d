"""Segmentation losses for label-efficient training.

All functions take and return :class:`torch.Tensor` objects and are differentiable
with respect to the network output (``logits`` or ``probs``).

* :func:`lazy_nll` -- negative log-likelihood with "lazy labels": per-patch
  masks telling which classes are annotated (``labeled``) and which classes are
  known to be absent from the whole patch (``not_present``); :func:`lazy_soft_dice` the
  multi-class soft Dice under the same masks.
* :func:`soft_dice_loss` and :func:`iou_loss` -- soft overlap losses for a
  binary probability map.
* :func:`dmi_loss` -- determinant-based mutual information loss (Xu et al.,
  2019, "L_DMI: An Information-theoretic Noise-robust Loss Function"), robust to
  label noise.

Conventions: tensors are ``(B, C, *S)`` with spatial axes ``S = (z, y, x)`` or
``(y, x)``; integer targets use ``-1`` for "ignore".
"""
from __future__ import annotations

from emseg.losses.binary import dmi_loss, iou_loss, soft_dice_loss
from emseg.losses.lazy import LazyNLLLoss, lazy_nll, lazy_soft_dice

__all__ = [
    "LazyNLLLoss",
    "dmi_loss",
    "iou_loss",
    "lazy_nll",
    "lazy_soft_dice",
    "soft_dice_loss",
]
