"""Per-sample uncertainty scores for active learning on segmentation outputs.

Every score is computed pixel-wise from class probabilities and reduced over the
spatial axes to one number per sample, following Roels & Saeys, *Cost-efficient
segmentation of electron microscopy images using active learning*: maximum
entropy, least confidence and Bayesian active learning by disagreement (BALD,
Houlsby et al. 2011; Gal et al. 2017) with Monte-Carlo dropout.

Conventions
-----------
``probs`` has shape ``(B, C, *S)`` with ``S`` = ``(Y, X)`` or ``(Z, Y, X)`` (any number of
spatial axes, including none, is accepted). Probabilities are taken over axis 1. A single
channel (``C == 1``) is read as the foreground probability of a sigmoid output and expanded
to the two classes ``(1 - p, p)``. Probabilities of exactly 0 or 1 are fine: ``0 log 0`` is
taken as 0 (:func:`torch.special.xlogy`), so no NaN appears.

``reduction`` is one of ``"mean"`` (default: mean over pixels, so scores of patches of
different sizes stay comparable), ``"sum"`` (the cumulated score of the paper; ranking is the
same as ``"mean"`` when all patches share one size) or ``"none"`` (the ``(B, *S)`` map).

All functions work on the device and (floating) dtype of their input, never modify it, and
integer inputs are rejected.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from emseg.errors import InputError

__all__ = [
    "REDUCTIONS",
    "BaldAccumulator",
    "bald",
    "entropy",
    "least_confidence",
]

#: Valid values of the ``reduction`` argument.
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")

# Tolerance on the probability range check; generous enough for float16 softmax outputs.
_RANGE_TOL = 1e-3


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise InputError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")


def _as_probs(probs: object, *, name: str = "probs", min_dim: int = 2) -> torch.Tensor:
    """Validate a probability tensor ``(B, C, *S)`` and expand a single channel to two."""
    if not isinstance(probs, torch.Tensor):
        probs = torch.as_tensor(probs)
    if not probs.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {probs.dtype}")
    if probs.ndim < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dims (batch, classes, *spatial); "
            f"got shape {tuple(probs.shape)}"
        )
    if probs.numel() == 0:
        raise ValueError(f"{name} must not be empty; got shape {tuple(probs.shape)}")
    lo, hi = torch.aminmax(probs)
    # NaN fails both comparisons below, so test it explicitly through the extrema.
    if torch.isnan(lo) or torch.isnan(hi) or lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ValueError(
            f"{name} must hold probabilities in [0, 1]; "
            f"got values in [{lo.item():g}, {hi.item():g}]"
        )
    cdim = min_dim - 1  # class axis
    if probs.shape[cdim] == 1:
        probs = torch.cat([1 - probs, probs], dim=cdim)
    return probs


def _reduce(pixel_map: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a ``(B, *S)`` map over its spatial axes."""
    if reduction == "none":
        return pixel_map
    flat = pixel_map.reshape(pixel_map.shape[0], -1)
    return flat.mean(dim=1) if reduction == "mean" else flat.sum(dim=1)


def _pixel_entropy(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``-sum_c p log p`` over ``dim`` with ``0 log 0 = 0`` (natural log, nats)."""
    return -torch.special.xlogy(probs, probs).sum(dim=dim)


def entropy(probs: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Pixel-wise Shannon entropy of the class distribution, reduced per sample.

    Parameters
    ----------
    probs : torch.Tensor
        Class probabilities, shape ``(B, C, *S)``; ``C == 1`` means a sigmoid foreground
        probability (expanded to ``(1 - p, p)``).
    reduction : {"mean", "sum", "none"}
        Reduction over the spatial axes; ``"none"`` returns the ``(B, *S)`` entropy map.

    Returns
    -------
    torch.Tensor
        ``(B,)`` scores (or the ``(B, *S)`` map) in nats, between 0 (one-hot) and ``log C``
        (uniform). Higher means more uncertain.

    Examples
    --------
    >>> p = torch.full((1, 2, 4, 4), 0.5)
    >>> entropy(p)  # log 2
    tensor([0.6931])
    """
    _check_reduction(reduction)
    probs = _as_probs(probs)
    return _reduce(_pixel_entropy(probs), reduction)


def least_confidence(probs: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Pixel-wise least-confidence score ``1 - max_c p``, reduced per sample.

    Parameters
    ----------
    probs : torch.Tensor
        Class probabilities, shape ``(B, C, *S)``; ``C == 1`` as in :func:`entropy`.
    reduction : {"mean", "sum", "none"}
        Reduction over the spatial axes.

    Returns
    -------
    torch.Tensor
        ``(B,)`` scores (or the ``(B, *S)`` map) in ``[0, 1 - 1/C]``. Higher means less
        confident.

    Examples
    --------
    >>> p = torch.tensor([[[0.9, 0.5]], [[0.1, 0.5]]]).permute(1, 0, 2)  # (1, 2, 2)
    >>> least_confidence(p)
    tensor([0.3000])
    """
    _check_reduction(reduction)
    probs = _as_probs(probs)
    return _reduce(1 - probs.amax(dim=1), reduction)


class BaldAccumulator:
    """Streaming BALD (mutual information) over Monte-Carlo dropout passes.

    Feed one stochastic forward pass ``(B, C, *S)`` at a time with :meth:`update`; only the
    running sum of probabilities and the running sum of per-pass entropies are kept, so memory
    does not grow with the number of passes ``T``. The score per pixel is

    ``H[mean_t p_t] - mean_t H[p_t]``,

    the mutual information between the prediction and the model weights under the dropout
    posterior. Round-off can make it slightly negative where all passes agree; such values are
    clamped to 0.

    Inputs are detached; sums are kept in the input dtype promoted to at least float32, on the
    input's device.

    Examples
    --------
    >>> acc = BaldAccumulator()
    >>> acc.update(torch.tensor([[[1.0], [0.0]]]))  # pass 1: class 0 for sure
    >>> acc.update(torch.tensor([[[0.0], [1.0]]]))  # pass 2: class 1 for sure
    >>> acc.result()  # passes disagree completely: log 2
    tensor([0.6931])
    """

    def __init__(self) -> None:
        self._sum_p: torch.Tensor | None = None
        self._sum_h: torch.Tensor | None = None
        self.n_passes: int = 0

    def update(self, probs: torch.Tensor) -> None:
        """Add one stochastic pass of class probabilities, shape ``(B, C, *S)``."""
        probs = _as_probs(probs).detach()
        if self._sum_p is None:
            dtype = torch.promote_types(probs.dtype, torch.float32)
            self._sum_p = torch.zeros(probs.shape, dtype=dtype, device=probs.device)
            self._sum_h = torch.zeros(
                probs.shape[:1] + probs.shape[2:], dtype=dtype, device=probs.device
            )
        elif probs.shape != self._sum_p.shape:
            raise ValueError(
                f"pass shape {tuple(probs.shape)} differs from the first pass "
                f"{tuple(self._sum_p.shape)}"
            )
        assert self._sum_h is not None
        p = probs.to(device=self._sum_p.device, dtype=self._sum_p.dtype)
        self._sum_p += p
        self._sum_h += _pixel_entropy(p)
        self.n_passes += 1

    def mean_probs(self) -> torch.Tensor:
        """Predictive (MC-averaged) class probabilities ``mean_t p_t``, shape ``(B, C, *S)``."""
        if self._sum_p is None:
            raise ValueError("no pass has been added; call update() first")
        return self._sum_p / self.n_passes

    def result(self, reduction: str = "mean") -> torch.Tensor:
        """BALD scores from the passes so far.

        Parameters
        ----------
        reduction : {"mean", "sum", "none"}
            Reduction over the spatial axes.

        Returns
        -------
        torch.Tensor
            ``(B,)`` scores (or the ``(B, *S)`` map), non-negative, at most ``log C``.
        """
        _check_reduction(reduction)
        mean_p = self.mean_probs()
        assert self._sum_h is not None
        mi = _pixel_entropy(mean_p) - self._sum_h / self.n_passes
        return _reduce(mi.clamp_min(0), reduction)


def bald(mc_probs: torch.Tensor | Iterable[torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """BALD score (mutual information) from ``T`` Monte-Carlo dropout passes.

    Parameters
    ----------
    mc_probs : torch.Tensor or iterable of torch.Tensor
        Either a stacked tensor ``(T, B, C, *S)`` or an iterable of ``T`` passes of shape
        ``(B, C, *S)``. ``C == 1`` is read as a sigmoid foreground probability.
    reduction : {"mean", "sum", "none"}
        Reduction over the spatial axes.

    Returns
    -------
    torch.Tensor
        ``(B,)`` scores (or the ``(B, *S)`` map): ``H[mean_t p_t] - mean_t H[p_t]`` per pixel,
        clamped at 0. Zero when all passes agree.

    See Also
    --------
    BaldAccumulator : the same score computed one pass at a time.

    Examples
    --------
    >>> mc = torch.full((5, 2, 2, 8, 8), 0.5)  # T=5 identical passes
    >>> bald(mc)
    tensor([0., 0.])
    """
    _check_reduction(reduction)
    if isinstance(mc_probs, torch.Tensor):
        if mc_probs.ndim < 3:
            raise ValueError(
                "mc_probs must have at least 3 dims (passes, batch, classes, *spatial); "
                f"got shape {tuple(mc_probs.shape)}"
            )
        if mc_probs.shape[0] == 0:
            raise ValueError("mc_probs holds no pass (T = 0)")
    acc = BaldAccumulator()
    for p in mc_probs:
        acc.update(p)
    if acc.n_passes == 0:
        raise ValueError("mc_probs holds no pass (T = 0)")
    return acc.result(reduction)
