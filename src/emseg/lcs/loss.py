"""The loss of a label-conditioned network: soft Dice (with an empty-target term) plus BCE.

:func:`conditioned_loss` scores the one conditioned output channel against a binary target
(-1 ignored), in float32 whatever the logits' dtype, and has a gradient on every patch, including
those whose target is empty (:func:`dice_or_empty`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from emseg.errors import InputError
from emseg.lcs.config import DICE_MODES


def dice_or_empty(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Soft Dice loss of one pool of voxels, or the mean probability where the target is empty.

    ``1 - (2 sum p t + eps) / (sum p + sum t + eps)`` over the voxels with ``target >= 0``; when no
    such voxel has ``target == 1`` the Dice would be a constant (0 or 1) with no useful gradient,
    so the loss is the mean predicted probability there (0 for an empty output, 1 for a full one).

    Examples
    --------
    >>> float(dice_or_empty(torch.tensor([0.25, 0.75]), torch.tensor([0, 0])))
    0.5
    """
    keep = (target >= 0).to(probs.dtype)
    t = (target == 1).to(probs.dtype)
    p = probs * keep
    tsum = t.sum()
    if tsum == 0:
        return p.sum() / keep.sum().clamp(min=1.0)
    return 1 - (2 * (p * t).sum() + eps) / (p.sum() + tsum + eps)


def conditioned_loss(logits: torch.Tensor, target: torch.Tensor, *, bce_weight: float = 1.0,
                     dice: str = "class", groups: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice of ``sigmoid(logits)`` (B, 1, *P) against a {-1, 0, 1} target, plus weighted BCE.

    ``dice="class"`` pools the Dice over the patches that share a ``groups`` id (the same class set)
    and averages over the groups; ``"batch"`` pools over the whole batch; ``"sample"`` averages
    per-patch Dice. A pool whose target is empty scores its mean probability
    (:func:`dice_or_empty`). The BCE is the mean over each patch's voxels that are not ignored,
    averaged over the patches with such voxels. Computed in float32 whatever the logits' dtype.

    Examples
    --------
    >>> t = torch.tensor([[[1, 0], [0, -1]]])
    >>> float(conditioned_loss(torch.full((1, 1, 2, 2), 9.0), t, bce_weight=0.0)) > 0.3
    True
    """
    if dice not in DICE_MODES:
        raise InputError(f"dice must be one of {DICE_MODES}, got {dice!r}")
    logits = logits.float()
    probs = torch.sigmoid(logits[:, 0])
    if dice == "class" and groups is not None:
        losses = [dice_or_empty(probs[groups == g], target[groups == g]) for g in torch.unique(groups)]
    elif dice == "sample":
        losses = [dice_or_empty(probs[b], target[b]) for b in range(probs.shape[0])]
    else:
        losses = [dice_or_empty(probs, target)]
    loss = torch.stack(losses).mean()
    if bce_weight:
        mask = (target >= 0).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits[:, 0], target.clamp(min=0).to(logits.dtype),
                                                 reduction="none") * mask
        dims = tuple(range(1, bce.dim()))
        count = mask.sum(dims)
        per_patch = bce.sum(dims) / count.clamp(min=1.0)
        valid = (count > 0).to(logits.dtype)
        loss = loss + bce_weight * (per_patch * valid).sum() / valid.sum().clamp(min=1.0)
    return loss
