"""Segmentation losses for label-efficient training.

All functions take and return :class:`torch.Tensor` objects and are differentiable
with respect to the network output (``logits`` or ``probs``).

* :func:`lazy_nll` -- negative log-likelihood with "lazy labels": per-patch
  masks telling which classes are annotated (``labeled``) and which classes are
  known to be absent from the whole patch (``not_present``).
* :func:`soft_dice_loss` and :func:`iou_loss` -- soft overlap losses for a
  binary probability map.
* :func:`dmi_loss` -- determinant-based mutual information loss (Xu et al.,
  2019, "L_DMI: An Information-theoretic Noise-robust Loss Function"), robust to
  label noise.

Conventions: tensors are ``(B, C, *S)`` with spatial axes ``S = (z, y, x)`` or
``(y, x)``; integer targets use ``-1`` for "ignore".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "LazyNLLLoss",
    "dmi_loss",
    "iou_loss",
    "lazy_nll",
    "soft_dice_loss",
]

_IGNORE = -1


# --------------------------------------------------------------------------- helpers


def _is_integer_tensor(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _as_float(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``x`` as a floating tensor with the dtype and device of ``like``."""
    return x.to(device=like.device, dtype=like.dtype)


def _check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_mask_values(name: str, m: torch.Tensor) -> None:
    if m.is_floating_point() and not bool(torch.isfinite(m).all()):
        raise ValueError(f"{name} must be finite")
    if m.dtype != torch.bool and bool((m < 0).any()):
        raise ValueError(f"{name} must be non-negative (0/1 flags)")


# --------------------------------------------------------------------------- lazy NLL


def _check_target_range(target: torch.Tensor, k: int, prefix: str = "") -> None:
    """Target values must lie in ``-1 .. k-1`` (-1 = ignore)."""
    if target.numel() > 0:
        tmin, tmax = int(target.min()), int(target.max())
        if tmin < _IGNORE or tmax > k - 1:
            raise ValueError(
                f"{prefix}target values must lie in -1..{k - 1} (-1 = ignore), found range {tmin}..{tmax}"
            )


def lazy_nll(
    logits: torch.Tensor,
    target: torch.Tensor,
    labeled: torch.Tensor | None = None,
    not_present: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
    example_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Negative log-likelihood with lazy labels (partially annotated classes).

    With ``p = softmax(logits, dim=1)``, class weight :math:`w_k`, example weight
    :math:`e_{b,v}` (both default to 1) and :math:`V` voxels per patch:

    .. math::

        S_{bkv} &= [t_{bv} = k]\,\mathrm{labeled}_{bk} \\
        \mathrm{up} &= -\sum_{b,k,v} S_{bkv}\, w_k\, e_{bv} \log p_{bkv} \\
        \mathrm{down} &= -\sum_{b,k,v} \mathrm{not\_present}_{bk}\, w_k\, e_{bv}
                         \log(1 - p_{bkv}) \\
        \mathrm{loss} &= \frac{\mathrm{up} + \mathrm{down}}
                              {\max(\sum S + V \sum_{b,k} \mathrm{not\_present}_{bk},\ 1)}

    The ``down`` term runs over every voxel of the patch, ignored voxels
    included: a class flagged as not present is absent everywhere in that patch.
    Without masks and weights the loss is the cross-entropy averaged over the
    labelled (``target != -1``) voxels; if nothing is labelled it is ``0``.

    :math:`\log(1 - p_k)` is evaluated as ``logsumexp`` of the logits with class
    ``k`` removed minus ``logsumexp`` of all logits, so loss and gradients stay
    finite even when ``p_k`` rounds to 1.

    Parameters
    ----------
    logits : torch.Tensor
        Floating tensor ``(B, K, *S)`` of unnormalised class scores.
    target : torch.Tensor
        Integer tensor ``(B, *S)`` with values in ``-1 .. K-1``; ``-1`` = ignore.
    labeled : torch.Tensor, optional
        ``(B, K)`` 0/1 flags (bool, integer or float): class ``k`` is annotated in
        patch ``b``.  Voxels whose target class is not flagged contribute nothing.
        Defaults to all ones.  Fractional values act as weights.
    not_present : torch.Tensor, optional
        ``(B, K)`` 0/1 flags: class ``k`` does not occur anywhere in patch ``b``.
        Defaults to all zeros.  Non-zero entries need ``K >= 2``.
    class_weights : torch.Tensor, optional
        ``(K,)`` non-negative class weights :math:`w_k`.
    example_weights : torch.Tensor, optional
        ``(B, *S)`` non-negative per-voxel weights :math:`e_{bv}`.

    Returns
    -------
    torch.Tensor
        Scalar loss (dtype of ``logits``, at least float32).

    Raises
    ------
    ValueError
        On a shape mismatch, a non-integer target, target values outside
        ``-1 .. K-1`` or negative masks/weights.

    Examples
    --------
    >>> import torch
    >>> logits = torch.zeros(1, 3, 4, 4)
    >>> target = torch.zeros(1, 4, 4, dtype=torch.long)
    >>> round(float(lazy_nll(logits, target)), 4)  # log(3)
    1.0986
    >>> np_ = torch.tensor([[0.0, 0.0, 1.0]])      # class 2 absent from the patch
    >>> float(lazy_nll(logits, target, not_present=np_)) > 0
    True
    """
    logits = _check_tensor("logits", logits)
    target = _check_tensor("target", target)
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor, got dtype {logits.dtype}")
    if logits.ndim < 2:
        raise ValueError(f"logits must have shape (B, K, *S), got {tuple(logits.shape)}")
    if not _is_integer_tensor(target):
        raise ValueError(f"target must be an integer tensor, got dtype {target.dtype}")
    B, K = int(logits.shape[0]), int(logits.shape[1])
    spatial = tuple(logits.shape[2:])
    if tuple(target.shape) != (B, *spatial):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape "
            f"{tuple(logits.shape)}; expected {(B, *spatial)}"
        )
    for name, m in (("labeled", labeled), ("not_present", not_present)):
        if m is not None:
            _check_tensor(name, m)
            if tuple(m.shape) != (B, K):
                raise ValueError(f"{name} shape {tuple(m.shape)} does not match (B, K) = {(B, K)}")
            _check_mask_values(name, m)
    if class_weights is not None:
        _check_tensor("class_weights", class_weights)
        if tuple(class_weights.shape) != (K,):
            raise ValueError(
                f"class_weights shape {tuple(class_weights.shape)} does not match (K,) = {(K,)}"
            )
        _check_mask_values("class_weights", class_weights)
    if example_weights is not None:
        _check_tensor("example_weights", example_weights)
        if tuple(example_weights.shape) != (B, *spatial):
            raise ValueError(
                f"example_weights shape {tuple(example_weights.shape)} does not match "
                f"target shape {(B, *spatial)}"
            )
        _check_mask_values("example_weights", example_weights)
    _check_target_range(target, K)

    # Work in at least float32 (half precision log-sum-exp is too coarse).
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    V = 1
    for s in spatial:
        V *= int(s)
    x = x.reshape(B, K, V)
    t = target.to(device=x.device).reshape(B, V).long()

    valid = t != _IGNORE
    t0 = torch.where(valid, t, torch.zeros_like(t))  # safe index for gather

    log_p = F.log_softmax(x, dim=1)  # (B, K, V)
    log_p_t = log_p.gather(1, t0.unsqueeze(1)).squeeze(1)  # (B, V)

    sel = valid.to(x.dtype)  # S summed over k: (B, V)
    if labeled is not None:
        sel = sel * _as_float(labeled, x).gather(1, t0)
    w = None if class_weights is None else _as_float(class_weights, x)
    e = None if example_weights is None else _as_float(example_weights, x).reshape(B, V)

    voxel_w = sel
    if w is not None:
        voxel_w = voxel_w * w[t0]
    if e is not None:
        voxel_w = voxel_w * e
    # torch.where keeps 0 * (-inf) from arising should a masked voxel be extreme.
    up = -(torch.where(voxel_w != 0, voxel_w * log_p_t, torch.zeros_like(log_p_t))).sum()
    count = sel.sum()

    down = x.new_zeros(())
    if not_present is not None:
        npr = _as_float(not_present, x)  # (B, K)
        if w is not None:
            npr_w = npr * w.unsqueeze(0)
        else:
            npr_w = npr
        active = torch.nonzero(npr_w.detach().sum(0) != 0).flatten().tolist()
        if active and K < 2:
            raise ValueError("not_present needs at least two classes (K >= 2)")
        if active:
            lse_all = torch.logsumexp(x, dim=1)  # (B, V)
            class_ids = torch.arange(K, device=x.device).view(1, K, 1)
            neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
            for k in active:
                lse_rest = torch.logsumexp(torch.where(class_ids == k, neg_inf, x), dim=1)
                log1m_p = lse_rest - lse_all  # log(1 - p_k), (B, V)
                if e is not None:
                    per_patch = (e * log1m_p).sum(1)
                else:
                    per_patch = log1m_p.sum(1)
                down = down - (npr_w[:, k] * per_patch).sum()
        count = count + V * npr.sum()

    denom = torch.clamp(count, min=1.0)
    return (up + down) / denom


class LazyNLLLoss(torch.nn.Module):
    """Module wrapper around :func:`lazy_nll` holding optional class weights.

    Parameters
    ----------
    class_weights : torch.Tensor or sequence of float, optional
        ``(K,)`` class weights, stored as a buffer (moves with ``.to(device)``).

    Examples
    --------
    >>> import torch
    >>> crit = LazyNLLLoss(class_weights=[1.0, 2.0])
    >>> logits = torch.zeros(2, 2, 3, 3, requires_grad=True)
    >>> target = torch.ones(2, 3, 3, dtype=torch.long)
    >>> loss = crit(logits, target)
    >>> loss.backward()
    """

    class_weights: torch.Tensor | None

    def __init__(self, class_weights: torch.Tensor | list[float] | tuple[float, ...] | None = None):
        super().__init__()
        if class_weights is not None:
            cw = torch.as_tensor(class_weights, dtype=torch.float32).detach().clone()
            if cw.ndim != 1:
                raise ValueError(f"class_weights must be 1-D, got shape {tuple(cw.shape)}")
            self.register_buffer("class_weights", cw)
        else:
            self.class_weights = None

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        labeled: torch.Tensor | None = None,
        not_present: torch.Tensor | None = None,
        example_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Evaluate :func:`lazy_nll` with the stored class weights."""
        return lazy_nll(
            logits,
            target,
            labeled=labeled,
            not_present=not_present,
            class_weights=self.class_weights,
            example_weights=example_weights,
        )

    def extra_repr(self) -> str:
        if self.class_weights is None:
            return "class_weights=None"
        return f"class_weights={self.class_weights.tolist()}"


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
    probs = _check_tensor("probs", probs)
    target = _check_tensor("target", target)
    if not probs.is_floating_point():
        raise ValueError(f"{fname}: probs must be a floating tensor, got dtype {probs.dtype}")
    if probs.ndim == target.ndim + 1 and probs.ndim >= 2 and probs.shape[1] == 1:
        probs = probs.squeeze(1)
    if mask is not None:
        mask = _check_tensor("mask", mask)
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
        ok = (tf == 0) | (tf == 1) | (tf == _IGNORE)
        if not bool(ok.all()):
            raise ValueError(f"{fname}: target values must be 0, 1 or -1 (ignore)")
    if mask is not None:
        _check_mask_values("mask", mask)
    tf = target.to(device=probs.device)
    m = (tf != _IGNORE).to(probs.dtype)
    if mask is not None:
        m = m * _as_float(mask, probs)
    t = torch.where(tf == 1, 1.0, 0.0).to(probs.dtype)
    return probs, t, m


def _batch_sums(x: torch.Tensor, per_sample: bool) -> torch.Tensor:
    if per_sample:
        if x.ndim == 0:
            raise ValueError("per_sample=True needs a leading batch axis")
        return x.reshape(x.shape[0], -1).sum(1)
    return x.sum().reshape(1)


def soft_dice_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    per_sample: bool = True,
) -> torch.Tensor:
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
    p, t, m = _binary_inputs("soft_dice_loss", probs, target, mask)
    inter = _batch_sums(p * t * m, per_sample)
    denom = _batch_sums(p * m, per_sample) + _batch_sums(t * m, per_sample)
    dice = (2.0 * inter + eps) / (denom + eps)
    return (1.0 - dice).mean()


def iou_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    per_sample: bool = True,
) -> torch.Tensor:
    r"""Binary soft Jaccard (IoU) loss.

    For each sample ``b`` (sums over masked voxels of all non-batch axes):

    .. math::

        L_b = 1 - \frac{\sum p t + \epsilon}{\sum p + \sum t - \sum p t + \epsilon}

    averaged over the batch (``per_sample=True``, same convention as
    :func:`soft_dice_loss`) or computed once over the pooled batch
    (``per_sample=False``).  Empty target and empty prediction give 0.

    Parameters
    ----------
    probs : torch.Tensor
        Foreground probabilities ``(B, 1, *S)`` or ``(B, *S)``.
    target : torch.Tensor
        ``(B, *S)`` 0/1 target; ``-1`` voxels are masked out.
    mask : torch.Tensor, optional
        0 excludes a voxel.
    eps : float
        Smoothing constant.
    per_sample : bool
        Per-sample mean (default) or pooled over the batch.

    Returns
    -------
    torch.Tensor
        Scalar loss in [0, 1].

    Examples
    --------
    >>> import torch
    >>> p = torch.tensor([[0.5, 0.5]]); t = torch.tensor([[1, 0]])
    >>> round(float(iou_loss(p, t)), 4)  # 1 - 0.5 / 1.5
    0.6667
    """
    p, t, m = _binary_inputs("iou_loss", probs, target, mask)
    inter = _batch_sums(p * t * m, per_sample)
    union = _batch_sums(p * m, per_sample) + _batch_sums(t * m, per_sample) - inter
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
    probs = _check_tensor("probs", probs)
    target = _check_tensor("target", target)
    multiclass = (probs.ndim == target.ndim + 1 and probs.ndim >= 2 and probs.shape[1] >= 2
                  and tuple(probs.shape[:1] + probs.shape[2:]) == tuple(target.shape))
    out_dtype = probs.dtype if probs.dtype in (torch.float32, torch.float64) else torch.float32
    if multiclass:
        joint, n, k = _dmi_joint_multiclass(probs, target, mask)
        det = torch.linalg.det(joint)
    else:
        p, t, m = _binary_inputs("dmi_loss", probs, target, mask)
        p = p.reshape(-1).double()
        t = t.reshape(-1).double()
        m = m.reshape(-1).double()
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
    return loss.to(out_dtype)


def _dmi_joint_multiclass(
    probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Unnormalised ``K x K`` joint matrix ``P^T S`` (float64), the voxel count ``N`` and ``K``."""
    if not probs.is_floating_point():
        raise ValueError(f"dmi_loss: probs must be a floating tensor, got dtype {probs.dtype}")
    if not _is_integer_tensor(target):
        raise ValueError(f"dmi_loss: target must be an integer tensor, got dtype {target.dtype}")
    k = int(probs.shape[1])
    if mask is not None:
        mask = _check_tensor("mask", mask)
        if tuple(mask.shape) != tuple(target.shape):
            raise ValueError(
                f"dmi_loss: mask shape {tuple(mask.shape)} does not match target shape "
                f"{tuple(target.shape)}"
            )
        _check_mask_values("mask", mask)
    _check_target_range(target, k, "dmi_loss: ")
    x = probs.double().movedim(1, -1).reshape(-1, k)  # (N, K)
    t = target.to(device=probs.device).reshape(-1).long()
    w = (t != _IGNORE).double()
    if mask is not None:
        w = w * mask.to(device=probs.device, dtype=torch.float64).reshape(-1)
    onehot = F.one_hot(torch.where(t >= 0, t, torch.zeros_like(t)), k).double() * w[:, None]
    return x.T @ onehot, w.sum(), k
