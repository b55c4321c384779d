"""iGTT threshold selection: K thresholds of the prediction, the one of lowest DMI, inverted when large.

Equations 2-4 of Luo et al. (AAAI 2022): thresholds evenly spaced between ``min P`` and ``max P``;
the mask whose 2 x 2 joint matrix with ``P`` has the lowest ``-log|det|`` is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_DEFAULT_EPS = 1e-3  # same smoothing as emseg.losses.dmi_loss


def _as_prob(prob: Any) -> np.ndarray:
    p = np.asarray(prob)
    if p.size == 0:
        raise ValueError("prob must not be empty")
    if p.dtype.kind not in "fiu":
        raise ValueError(f"prob must be a real array, got dtype {p.dtype}")
    if p.dtype.kind == "f" and not np.isfinite(p).all():
        raise ValueError("prob must be finite")
    return p


def candidate_thresholds(prob: Any, n_thresholds: int) -> np.ndarray:
    """``K`` thresholds ``t_k = p_min + k (p_max - p_min) / (K - 1)``, ``k = 0..K-1``.

    Parameters
    ----------
    prob : array_like
        Prediction ``P`` (any shape).
    n_thresholds : int >= 2
        ``K``.

    Returns
    -------
    numpy.ndarray
        float64 thresholds, ascending; all equal when ``P`` is constant.

    Examples
    --------
    >>> candidate_thresholds([0.2, 0.6, 0.4], 3).tolist()
    [0.2, 0.4, 0.6]
    """
    p = _as_prob(prob)
    k = int(n_thresholds)
    if k < 2:
        raise ValueError(f"n_thresholds must be >= 2, got {n_thresholds}")
    lo, hi = float(p.min()), float(p.max())
    return lo + np.arange(k, dtype=np.float64) * ((hi - lo) / (k - 1))


def dmi_per_threshold(prob: Any, thresholds: Any, *, eps: float = _DEFAULT_EPS) -> np.ndarray:
    r"""DMI between ``P`` and each thresholded mask ``S_k = [P > t_k]``.

    With ``N`` voxels, :math:`\mathcal P = [p;\ 1-p]` and :math:`\mathcal S = [s;\ 1-s]` (2 x N),
    the value for one threshold is

    .. math:: L = -\log\left(\left|\det\left(\tfrac{1}{N}\mathcal P \mathcal S^\top\right)\right|
              + \frac{\epsilon}{N^2}\right),

    exactly what :func:`emseg.losses.dmi_loss` returns for ``(P, S_k)`` (``eps`` belongs to the
    unnormalised matrix, as in Xu et al.). The ``1/N`` scaling does not change which threshold
    minimises it. All thresholds are evaluated from one sort
    of ``P`` (``O(N log N + K)``) instead of ``K`` passes.

    Parameters
    ----------
    prob : array_like
        Prediction ``P`` (foreground scores, any shape).
    thresholds : array_like
        Thresholds ``t_k``.
    eps : float
        Added to ``|det|`` before the logarithm.

    Returns
    -------
    numpy.ndarray
        One DMI value per threshold (float64).

    Examples
    --------
    >>> p = [0.1, 0.2, 0.8, 0.9]
    >>> d = dmi_per_threshold(p, [0.15, 0.5, 0.85])
    >>> int(d.argmin())   # the cut between 0.2 and 0.8 is the most informative
    1
    """
    p = _as_prob(prob).reshape(-1).astype(np.float64)
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    n = p.size
    order = np.sort(p)
    csum = np.concatenate([[0.0], np.cumsum(order)])
    total = csum[-1]
    # number of voxels with p <= t; the mask S = p > t holds the rest
    below = np.searchsorted(order, t, side="right")
    n1 = n - below  # |S|
    a = total - csum[below]  # sum of p over S
    u11 = a / n  # p * s
    u10 = (total - a) / n  # p * (1 - s)
    u01 = (n1 - a) / n  # (1 - p) * s
    u00 = (n - n1 - (total - a)) / n  # (1 - p) * (1 - s)
    det = u11 * u00 - u10 * u01
    with np.errstate(divide="ignore"):  # eps = 0 and det = 0 give +inf
        return -np.log(np.abs(det) + eps / max(n, 1) ** 2)


def invert_if_large(mask: Any, *, enabled: bool = True) -> tuple[np.ndarray, bool]:
    """Invert a binary mask that covers more than half of the image.

    Rationale: the structures segmented in microscopy (membranes, mitochondria, ER, nuclei in
    sparse samples) occupy a minority of the voxels, and a network trained from all-background
    labels has no notion of which side of a threshold is "foreground" -- its polarity is set by
    chance at initialisation. A mask covering more than half of the image therefore means the
    polarity flipped. The DMI of equation 4 cannot tell (``|det|`` is unchanged when the mask is
    complemented), so the rule does not alter the selection, only the polarity. A mask of exactly
    half is left as it is.

    Parameters
    ----------
    mask : array_like of bool or 0/1
        Binary mask.
    enabled : bool
        ``False`` returns the mask unchanged.

    Returns
    -------
    (numpy.ndarray of bool, bool)
        The (possibly inverted) mask, a new array, and whether it was inverted.

    Examples
    --------
    >>> m, flipped = invert_if_large([1, 1, 1, 0])
    >>> m.astype(int).tolist(), flipped
    ([0, 0, 0, 1], True)
    """
    m = np.asarray(mask)
    if m.dtype != bool:
        if m.size and not np.isin(m, (0, 1)).all():
            raise ValueError("mask must be binary (bool or 0/1)")
        m = m.astype(bool)
    if enabled and m.size and 2 * int(np.count_nonzero(m)) > m.size:
        return ~m, True
    return m.copy(), False


@dataclass(frozen=True)
class Selection:
    """The DMI-minimising thresholded mask of one prediction (see :func:`select_mask`).

    ``mask`` is after the inversion rule; ``fg_fraction`` is its foreground fraction;
    ``dmi`` is the DMI of the chosen threshold (unchanged by inversion); ``dmis`` holds every
    candidate's DMI in the order of ``thresholds``.
    """

    mask: np.ndarray
    threshold: float
    index: int
    dmi: float
    inverted: bool
    thresholds: np.ndarray
    dmis: np.ndarray

    @property
    def fg_fraction(self) -> float:
        return float(np.count_nonzero(self.mask)) / max(1, self.mask.size)


def select_mask(prob: Any, n_thresholds: int, *, invert_large: bool = True,
                eps: float = _DEFAULT_EPS) -> Selection:
    """Threshold ``P`` at ``K`` evenly spaced levels and keep the mask with the lowest DMI.

    Ties go to the lowest threshold. Then the inversion rule of :func:`invert_if_large` applies.

    Parameters
    ----------
    prob, n_thresholds
        As for :func:`candidate_thresholds` (``P``: foreground scores).
    invert_large : bool
        Apply the inversion rule.
    eps : float
        DMI smoothing (see :func:`dmi_per_threshold`).

    Returns
    -------
    Selection

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[0.1, 0.15, 0.9], [0.12, 0.8, 0.85]])
    >>> sel = select_mask(p, 5)
    >>> sel.mask.astype(int).tolist(), sel.inverted
    ([[0, 0, 1], [0, 1, 1]], False)
    """
    p = _as_prob(prob)
    thresholds = candidate_thresholds(p, n_thresholds)
    dmis = dmi_per_threshold(p, thresholds, eps=eps)
    index = int(np.argmin(dmis))
    mask, inverted = invert_if_large(p > thresholds[index], enabled=invert_large)
    return Selection(mask, float(thresholds[index]), index, float(dmis[index]), inverted, thresholds, dmis)
