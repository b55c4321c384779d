"""Losses of a binary probability map: soft Dice, IoU and the noise-robust DMI loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from emseg.losses._checks import (IGNORE, as_float, as_float64, check_mask_values, check_target_range, check_tensor,
                                  is_integer_tensor)

__all__ = ["dmi_loss", "iou_loss", "soft_dice_loss"]


# --------------------------------------------------------------------------- binary overlap losses


def _binary_inputs(
    fname: str,
    probs: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and align a binary probability map, target and mask.

    Returns ``(p, t, m)`` as floating tensors of identical shape.  A channel axis
    of size 1 on ``probs`` (``(B, 1, *S)`` against a ``(B, *S)`` target) is
    squeezed.  Target voxels equal to ``-1`` are excluded through ``m``.
    """
    probs = check_tensor("probs", probs)
    target = check_tensor("target", target)
    if not probs.is_floating_point():
        raise ValueError(f"{fname}: probs must be a floating tensor, got dtype {probs.dtype}")
    if probs.ndim == target.ndim + 1 and probs.ndim >= 2 and probs.shape[1] == 1:
        probs = probs.squeeze(1)
    if mask is not None:
        mask = check_tensor("mask", mask)
        if mask.ndim == target.ndim + 1 and mask.ndim >= 2 and mask.shape[1] == 1:
            mask = mask.squeeze(1)
    if tuple(probs.shape) != tuple(target.shape):
        raise ValueError(
            f"{fname}: probs shape {tuple(probs.shape)} does not match target shape "
            f"{tuple(target.shape)}"
        )
    if mask is not None and tuple(mask.shape) != tuple(target.shape):
        raise ValueError(
            f"{fname}: mask shape {tuple(mask.shape)} does not match target shape "
            f"{tuple(target.shape)}"
        )
    if target.numel() > 0:
        tf = target.detach()
        ok = (tf == 0) | (tf == 1) | (tf == IGNORE)
        if not bool(ok.all()):
            raise ValueError(f"{fname}: target values must be 0, 1 or -1 (ignore)")
    if mask is not None:
        check_mask_values("mask", mask)
    tf = target.to(device=probs.device)
    m = (tf != IGNORE).to(probs.dtype)
    if mask is not None:
        m = m * as_float(mask, probs)
    t = torch.where(tf == 1, 1.0, 0.0).to(probs.dtype)
    return probs, t, m


def _batch_sums(x: torch.Tensor, per_sample: bool) -> torch.Tensor:
    if per_sample:
        if x.ndim == 0:
            raise ValueError("per_sample=True needs a leading batch axis")
        return x.reshape(x.shape[0], -1).sum(1)
    return x.sum().reshape(1)


def _overlap_sums(fname: str, probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                  per_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum p t m, sum p m + sum t m)`` per sample (or pooled) of the checked inputs of the overlap
    loss ``fname``."""
    p, t, m = _binary_inputs(fname, probs, target, mask)
    inter = _batch_sums(p * t * m, per_sample)
    return inter, _batch_sums(p * m, per_sample) + _batch_sums(t * m, per_sample)


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-6,
                   *, per_sample: bool = True) -> torch.Tensor:
    r"""Binary soft Dice loss.

    For each sample ``b`` (sums over all non-batch axes, restricted to voxels with
    ``m = 1``):

    .. math::

        L_b = 1 - \frac{2 \sum p t m + \epsilon}{\sum p m + \sum t m + \epsilon}

    and the result is the mean of :math:`L_b` over the batch.  An empty target
    with an empty prediction (or a sample with every voxel masked) gives
    :math:`L_b = 1 - \epsilon/\epsilon = 0`.

    Parameters
    ----------
    probs : torch.Tensor
        Foreground probabilities ``(B, 1, *S)`` or ``(B, *S)``, values in [0, 1].
    target : torch.Tensor
        ``(B, *S)`` (or same shape as ``probs``) with values 0/1; ``-1`` voxels are
        treated as masked out.
    mask : torch.Tensor, optional
        Same shape as ``target`` (or ``probs``); 0 excludes a voxel.
    eps : float
        Smoothing constant added to numerator and denominator.
    per_sample : bool
        If False, pool all voxels of the batch into one Dice score.

    Returns
    -------
    torch.Tensor
        Scalar loss in [0, 1].

    Examples
    --------
    >>> import torch
    >>> t = torch.tensor([[0, 1, 1, 0]])
    >>> float(soft_dice_loss(t.float(), t)) < 1e-6
    True
    """
    inter, denom = _overlap_sums("soft_dice_loss", probs, target, mask, per_sample)
    dice = (2.0 * inter + eps) / (denom + eps)
    return (1.0 - dice).mean()


def iou_loss(probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-6,
             *, per_sample: bool = True) -> torch.Tensor:
    r"""Binary soft Jaccard (IoU) loss.

    For each sample ``b`` (sums over masked voxels of all non-batch axes):

    .. math::

        L_b = 1 - \frac{\sum p t + \epsilon}{\sum p + \sum t - \sum p t + \epsilon}

    averaged over the batch (``per_sample=True``, same convention as
    :func:`soft_dice_loss`) or computed once over the pooled batch
    (``per_sample=False``).  Empty target and empty prediction give 0.

    Parameters
    ----------
    probs, target, mask, eps, per_sample
        As for :func:`soft_dice_loss`.

    Returns
    -------
    torch.Tensor
        Scalar loss ``1 - IoU`` in [0, 1].

    Examples
    --------
    >>> import torch
    >>> p = torch.tensor([[0.5, 0.5]]); t = torch.tensor([[1, 0]])
    >>> round(float(iou_loss(p, t)), 4)  # 1 - 0.5 / 1.5
    0.6667
    """
    inter, total = _overlap_sums("iou_loss", probs, target, mask, per_sample)
    union = total - inter
    return (1.0 - (inter + eps) / (union + eps)).mean()


def dmi_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    eps: float = 1e-3,
) -> torch.Tensor:
    r"""Determinant-based mutual information (DMI) loss (Xu et al., 2019).

    With :math:`P` (``N x K``) the predicted class distribution and :math:`S` the one-hot
    target (``N x K``) over the ``N`` kept voxels (all voxels of the batch pooled together),
    Xu et al. define :math:`L = -\log(|\det(P^\top S)| + \epsilon)` on the *unnormalised*
    joint matrix, where :math:`\epsilon = 10^{-3}` is negligible next to
    :math:`|\det| \sim N^K`. This function returns the same loss shifted by the constant
    :math:`K \log N`, so that its value does not grow with the patch size:

    .. math::

        U = \frac{1}{N} P^\top S, \qquad
        L = -\log\left(|\det U| + \frac{\epsilon}{N^K}\right)
          = -\log\left(|\det(P^\top S)| + \epsilon\right) + K \log N .

    ``eps`` is thus scaled with ``N``: it never competes with the determinant of a sparse
    target. (Adding ``eps`` to the normalised determinant instead would swamp it: with 0.5 %
    foreground ``|det U|`` is about ``0.005`` and the gradient shrank fivefold.) The gradient
    is exactly that of Xu et al.'s loss. ``U`` and its determinant are computed in float64
    whatever the input dtype, so the log-determinant keeps its precision when ``det U`` is
    small; the result is returned in the dtype of ``probs`` (at least float32).

    Two layouts are accepted:

    * **binary**: foreground probabilities ``p`` of shape ``(B, 1, *S)`` with a ``(B, *S)``
      target, or any shape equal to the target's; :math:`P = [1 - p,\ p]`, ``K = 2``;
    * **K classes**: class probabilities ``(B, K, *S)`` with ``K >= 2`` (rows summing to 1,
      e.g. a softmax) and a ``(B, *S)`` target in ``0 .. K-1``; the ``K x K`` determinant
      is taken with :func:`torch.linalg.det` in float64.

    A perfect prediction maximises :math:`|\det U|` (``prod_k n_k / N^K``); a prediction
    independent of the target gives :math:`\det U \approx 0`.

    Parameters
    ----------
    probs : torch.Tensor
        Probabilities, binary or K-class layout (see above).
    target : torch.Tensor
        Integer target; ``-1`` voxels are excluded.
    mask : torch.Tensor, optional
        Same shape as ``target``; 0 excludes a voxel.  Fractional values weight
        voxels (``N`` is then the sum of the weights).
    eps : float
        Smoothing added to ``|det(P^T S)|`` of the unnormalised matrix (default ``1e-3``,
        as Xu et al.).

    Returns
    -------
    torch.Tensor
        Scalar loss, bounded below by ``-log(1/K^K + eps/N^K)`` (``-log(1/4)`` for binary).

    Examples
    --------
    >>> import torch
    >>> t = torch.tensor([0, 0, 1, 1])
    >>> perfect = dmi_loss(t.float(), t)
    >>> flat = dmi_loss(torch.full((4,), 0.5), t)
    >>> bool(perfect < flat)
    True
    >>> round(float(perfect), 3)  # -log(2 * 2 / 4**2 + 1e-3 / 4**2)
    1.386
    """
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"dmi_loss: eps must be >= 0, got {eps}")
    probs = check_tensor("probs", probs)
    target = check_tensor("target", target)
    multiclass = (probs.ndim == target.ndim + 1 and probs.ndim >= 2 and probs.shape[1] >= 2
                  and tuple(probs.shape[:1] + probs.shape[2:]) == tuple(target.shape))
    out_dtype = probs.dtype if probs.dtype in (torch.float32, torch.float64) else torch.float32
    if multiclass:
        joint, n, k = _dmi_joint_multiclass(probs, target, mask)
        det = torch.linalg.det(joint)
    else:
        p, t, m = _binary_inputs("dmi_loss", probs, target, mask)
        p = as_float64(p.reshape(-1))
        t = as_float64(t.reshape(-1))
        m = as_float64(m.reshape(-1))
        n = m.sum()
        q = 1.0 - p
        u = 1.0 - t
        # joint[i, j] = sum_n m_n P[n, i] S[n, j], i = predicted, j = true class (unnormalised)
        u00 = (m * q * u).sum()
        u01 = (m * q * t).sum()
        u10 = (m * p * u).sum()
        u11 = (m * p * t).sum()
        det = u00 * u11 - u01 * u10
        k = 2
    n = torch.clamp(n, min=1.0)
    loss = -torch.log(det.abs() + eps) + k * torch.log(n)
    return loss.to(device=probs.device, dtype=out_dtype)


def _dmi_joint_multiclass(
    probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Unnormalised ``K x K`` joint matrix ``P^T S`` (float64), the voxel count ``N`` and ``K``."""
    if not probs.is_floating_point():
        raise ValueError(f"dmi_loss: probs must be a floating tensor, got dtype {probs.dtype}")
    if not is_integer_tensor(target):
        raise ValueError(f"dmi_loss: target must be an integer tensor, got dtype {target.dtype}")
    k = int(probs.shape[1])
    if mask is not None:
        mask = check_tensor("mask", mask)
        if tuple(mask.shape) != tuple(target.shape):
            raise ValueError(
                f"dmi_loss: mask shape {tuple(mask.shape)} does not match target shape "
                f"{tuple(target.shape)}"
            )
        check_mask_values("mask", mask)
    check_target_range(target, k, "dmi_loss: ")
    x = as_float64(probs).movedim(1, -1).reshape(-1, k)  # (N, K)
    t = target.to(device=x.device).reshape(-1).long()
    w = (t != IGNORE).double()
    if mask is not None:
        w = w * mask.to(device=x.device, dtype=torch.float64).reshape(-1)
    onehot = F.one_hot(torch.where(t >= 0, t, torch.zeros_like(t)), k).double() * w[:, None]
    return x.T @ onehot, w.sum(), k
