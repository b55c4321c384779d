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
    "class_mass",
    "class_statistics",
    "entropy",
    "least_confidence",
    "uncertain_class_mass",
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
    probs, reduction
        As for :func:`entropy`; ``"none"`` returns the ``(B, *S)`` map.

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


def _class_reduce(per_class: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a ``(B, C, *S)`` map over its spatial axes to ``(B, C)``."""
    if reduction == "none":
        return per_class
    flat = per_class.reshape(per_class.shape[0], per_class.shape[1], -1)
    return flat.mean(dim=2) if reduction == "mean" else flat.sum(dim=2)


def _uncertain_map(probs: torch.Tensor) -> torch.Tensor:
    """``p_ik * H(p_i) / log C`` per class and pixel, ``(B, C, *S)``."""
    h = _pixel_entropy(probs) / torch.log(torch.tensor(float(probs.shape[1]), dtype=probs.dtype))
    return probs * h.unsqueeze(1)


def class_mass(probs: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Expected mass of every class, ``sum_i p_ik`` (``mean``: the expected fraction).

    Parameters
    ----------
    probs : torch.Tensor
        Class probabilities, shape ``(B, C, *S)``; ``C == 1`` as in :func:`entropy`.
    reduction : {"sum", "mean", "none"}
        Reduction over the spatial axes (default ``sum``: the expected number of voxels of class k).

    Returns
    -------
    torch.Tensor
        ``(B, C)`` (or the ``(B, C, *S)`` map).

    Examples
    --------
    >>> class_mass(torch.full((1, 2, 4, 4), 0.5))
    tensor([[8., 8.]])
    """
    _check_reduction(reduction)
    return _class_reduce(_as_probs(probs), reduction)


def uncertain_class_mass(probs: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Mass of every class where the model is uncertain: ``sum_i p_ik H(p_i) / log C``.

    Each pixel's class probability is weighted by its normalised entropy (0 for a one-hot pixel,
    1 for a uniform one), so confident pixels add nothing. Summed over the classes it is the
    patch's normalised entropy, ``sum_i H(p_i) / log C``: the uncertain mass splits the patch's
    uncertainty by class.

    Parameters
    ----------
    probs, reduction
        As for :func:`class_mass`.

    Returns
    -------
    torch.Tensor
        ``(B, C)`` (or the ``(B, C, *S)`` map), between 0 and the class mass.

    Examples
    --------
    >>> uncertain_class_mass(torch.full((1, 2, 4, 4), 0.5))  # every pixel fully uncertain
    tensor([[8., 8.]])
    """
    _check_reduction(reduction)
    return _class_reduce(_uncertain_map(_as_probs(probs)), reduction)


def class_statistics(probs: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Per class: mass, uncertain mass and peak probability, stacked as ``(B, C, 3)``.

    ``[..., 0]`` is :func:`class_mass`, ``[..., 1]`` :func:`uncertain_class_mass` (both reduced
    with ``reduction``) and ``[..., 2]`` the peak ``max_i p_ik`` over the patch, from one
    validation of ``probs``. The score function of the question selector
    (:mod:`emseg.active.questions.types`).

    Examples
    --------
    >>> class_statistics(torch.full((1, 2, 4, 4), 0.5))[0, 1].tolist()
    [8.0, 8.0, 0.5]
    """
    _check_reduction(reduction)
    if reduction == "none":
        raise ValueError("class_statistics reduces over the patch: reduction must be 'mean' or 'sum'")
    probs = _as_probs(probs)
    peak = probs.reshape(probs.shape[0], probs.shape[1], -1).amax(dim=2)
    return torch.stack([_class_reduce(probs, reduction), _class_reduce(_uncertain_map(probs), reduction), peak],
                       dim=-1)
