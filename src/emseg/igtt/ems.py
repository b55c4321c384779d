"""The extraction-of-meta-structure (EMS) module of iGTT: skeleton, random shift, random sampling."""
from __future__ import annotations

from typing import Any

import numpy as np

from emseg.noise.morphology import skeleton
from emseg.noise.synthesis import sample, shift


def ems(mask: Any, *, radius: int, fraction: float, per_section: bool = True, rng: Any = None) -> np.ndarray:
    """Extraction of meta-structures: skeleton, random shift within ``radius``, random sampling.

    The skeleton of the mask (:func:`emseg.noise.skeleton`) keeps the topology of the objects;
    every skeleton voxel is then moved by an independent offset drawn from the integer points of
    the disc of ``radius`` (:func:`emseg.noise.shift`; voxels leaving the image are dropped), and exactly ``round(fraction * n_k)`` voxels of each class
    (shifted skeleton and background) are kept, the rest becoming ``-1``
    (:func:`emseg.noise.sample`), so that voxels the shift moved off the structure weigh less.

    Parameters
    ----------
    mask : array_like of bool or 0/1, 2D or 3D
        The chosen thresholded mask.
    radius : int >= 0
        Shift radius ``r``.
    fraction : float in (0, 1]
        Sampled fraction.
    per_section : bool
        For 3D input, skeletonise and shift each z-section in-plane (anisotropic stacks).
    rng : numpy.random.Generator or int, optional
        Random source.

    Returns
    -------
    numpy.ndarray of int8
        Pseudo-labels: 1 shifted skeleton, 0 background, -1 not sampled.

    Examples
    --------
    >>> import numpy as np
    >>> m = np.zeros((16, 16), bool); m[4:12, 6:10] = True
    >>> lab = ems(m, radius=1, fraction=0.5, rng=0)
    >>> sorted(np.unique(lab).tolist()), int((lab == 1).sum()) <= int(m.sum())
    ([-1, 0, 1], True)
    """
    m = np.asarray(mask)
    if m.ndim not in (2, 3):
        raise ValueError(f"mask must be 2D (y, x) or 3D (z, y, x), got shape {m.shape}")
    if m.dtype != bool:
        if m.size and not np.isin(m, (0, 1)).all():
            raise ValueError("mask must be binary (bool or 0/1)")
    frac = float(fraction)
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    gen = np.random.default_rng(rng)
    labels = m.astype(np.int8)
    labels = skeleton(labels, per_section=per_section)
    labels = shift(labels, int(radius), per_section=per_section, rng=gen)
    labels = sample(labels, frac, rng=gen, unsampled=-1)
    return labels.astype(np.int8, copy=False)
