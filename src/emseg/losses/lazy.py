"""Negative log-likelihood with lazy labels (partially annotated classes): :func:`lazy_nll`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from emseg.losses._checks import IGNORE, as_float, check_mask_values, check_target_range, check_tensor, is_integer_tensor

__all__ = ["LazyNLLLoss", "lazy_nll", "lazy_soft_dice"]


# --------------------------------------------------------------------------- lazy NLL


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
    logits = check_tensor("logits", logits)
    target = check_tensor("target", target)
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor, got dtype {logits.dtype}")
    if logits.ndim < 2:
        raise ValueError(f"logits must have shape (B, K, *S), got {tuple(logits.shape)}")
    if not is_integer_tensor(target):
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
            check_tensor(name, m)
            if tuple(m.shape) != (B, K):
                raise ValueError(f"{name} shape {tuple(m.shape)} does not match (B, K) = {(B, K)}")
            check_mask_values(name, m)
    if class_weights is not None:
        check_tensor("class_weights", class_weights)
        if tuple(class_weights.shape) != (K,):
            raise ValueError(
                f"class_weights shape {tuple(class_weights.shape)} does not match (K,) = {(K,)}"
            )
        check_mask_values("class_weights", class_weights)
    if example_weights is not None:
        check_tensor("example_weights", example_weights)
        if tuple(example_weights.shape) != (B, *spatial):
            raise ValueError(
                f"example_weights shape {tuple(example_weights.shape)} does not match "
                f"target shape {(B, *spatial)}"
            )
        check_mask_values("example_weights", example_weights)
    check_target_range(target, K)

    # Work in at least float32 (half precision log-sum-exp is too coarse).
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    V = 1
    for s in spatial:
        V *= int(s)
    x = x.reshape(B, K, V)
    t = target.to(device=x.device).reshape(B, V).long()

    valid = t != IGNORE
    t0 = torch.where(valid, t, torch.zeros_like(t))  # safe index for gather

    log_p = F.log_softmax(x, dim=1)  # (B, K, V)
    log_p_t = log_p.gather(1, t0.unsqueeze(1)).squeeze(1)  # (B, V)

    sel = valid.to(x.dtype)  # S summed over k: (B, V)
    if labeled is not None:
        sel = sel * as_float(labeled, x).gather(1, t0)
    w = None if class_weights is None else as_float(class_weights, x)
    e = None if example_weights is None else as_float(example_weights, x).reshape(B, V)

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
        npr = as_float(not_present, x)  # (B, K)
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


def lazy_soft_dice(
    logits: torch.Tensor,
    target: torch.Tensor,
    labeled: torch.Tensor | None = None,
    not_present: torch.Tensor | None = None,
    smooth: float = 1.0,
) -> torch.Tensor:
    r"""Multi-class soft Dice loss over the batch, restricted to what the lazy labels say.

    With ``p = softmax(logits, dim=1)`` and, for class :math:`k`, the voxel mask
    :math:`m_{bkv}` = 1 where patch ``b`` annotates class ``k`` (``labeled``) and voxel ``v`` is
    labelled (``target != -1``), or everywhere in a patch that flags ``k`` as not present:

    .. math::

        D_k = \frac{2 \sum_{b,v} m\, p_{bkv} [t_{bv} = k] + s}{\sum_{b,v} m\, (p_{bkv} + [t_{bv} = k]) + s},
        \qquad \mathrm{loss} = 1 - \frac{1}{|A|} \sum_{k \in A} D_k

    where :math:`A` are the classes with any masked voxel in the batch and ``s`` the smoothing
    term. Sums run over the whole batch (one Dice per class, not per patch), so a rare class
    absent from one patch still has a well-defined, non-zero gradient from the others; a class
    absent from the whole batch penalises its predicted mass. Returns 0 when nothing is masked.

    >>> import torch
    >>> t = torch.zeros(1, 4, 4, dtype=torch.long)
    >>> round(float(lazy_soft_dice(torch.tensor([20.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 4, 4), t)), 3)
    0.0
    >>> round(float(lazy_soft_dice(torch.zeros(1, 2, 4, 4), t)), 4)  # 1 - (17/25 + 1/9) / 2
    0.6044
    """
    logits = check_tensor("logits", logits)
    target = check_tensor("target", target)
    if not logits.is_floating_point() or logits.ndim < 2:
        raise ValueError(f"logits must be a floating tensor (B, K, *S), got {logits.dtype} {tuple(logits.shape)}")
    if not is_integer_tensor(target):
        raise ValueError(f"target must be an integer tensor, got dtype {target.dtype}")
    B, K = int(logits.shape[0]), int(logits.shape[1])
    if tuple(target.shape) != (B, *logits.shape[2:]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}")
    check_target_range(target, K)
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    x = x.reshape(B, K, -1)
    t = target.to(device=x.device).reshape(B, -1).long()
    p = torch.softmax(x, dim=1)
    valid = (t != IGNORE).to(x.dtype).unsqueeze(1)  # (B, 1, V)
    lab = x.new_ones(B, K) if labeled is None else as_float(labeled, x)
    mask = valid * (lab > 0).to(x.dtype).unsqueeze(2)  # (B, K, V)
    if not_present is not None:
        mask = torch.maximum(mask, (as_float(not_present, x) > 0).to(x.dtype).unsqueeze(2).expand_as(mask))
    onehot = (t.unsqueeze(1) == torch.arange(K, device=x.device).view(1, K, 1)).to(x.dtype)
    inter = (mask * p * onehot).sum(dim=(0, 2))
    total = (mask * (p + onehot)).sum(dim=(0, 2))
    active = mask.sum(dim=(0, 2)) > 0
    if not bool(active.any()):
        return x.sum() * 0.0
    dice = (2 * inter + smooth) / (total + smooth)
    return 1.0 - dice[active].mean()


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
