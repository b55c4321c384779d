"""RL (random labels) and the EMS shift: label noise that does not depend on the classes of the
voxels it changes, drawn from the voxel-keyed streams of :mod:`emseg.noise.streams` (so blocks give
the whole-volume result; ``shift`` with a halo of its radius)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from emseg.noise.checks import check_fraction, check_int, checked_labels_radius
from emseg.noise.streams import STREAM_RANDOM, STREAM_SHIFT, Box, stream_key, unit, voxel_hash


def _disc_offsets(radius: int, ndim: int, in_plane: bool) -> np.ndarray:
    """Integer offsets ``d`` with ``|d| <= radius``: a disc (2D or in-plane) or a ball (3D), as
    ``(M, ndim)`` int64 in C order of the offsets."""
    dims = 2 if (in_plane or ndim == 2) else 3
    grid = np.stack(np.meshgrid(*([np.arange(-radius, radius + 1)] * dims), indexing="ij"), -1).reshape(-1, dims)
    disc = grid[(grid ** 2).sum(1) <= radius * radius]
    if dims < ndim:
        disc = np.concatenate([np.zeros((len(disc), ndim - dims), np.int64), disc], axis=1)
    return disc.astype(np.int64)



# --------------------------------------------------------------------------- #
# RL and EMS shift
# --------------------------------------------------------------------------- #
def random_labels(
    shape: Sequence[int],
    p: float,
    *,
    n_classes: int = 2,
    rng: Any = None,
    dtype: DTypeLike = np.int32,
) -> np.ndarray:
    """Random labels (RL), independent of any ground truth.

    Each voxel is foreground with probability ``p``. For ``n_classes > 2`` a
    foreground voxel's class is uniform over ``1..n_classes-1``, so
    ``P(0) = 1 - p`` and ``P(k) = p / (n_classes - 1)``; ``p = (K-1)/K`` gives
    labels uniform over all ``K`` classes.

    Parameters
    ----------
    shape : sequence of int
        2D ``(y, x)`` or 3D ``(z, y, x)`` shape.
    p : float in [0, 1]
        Foreground probability (the paper's generation probability).
    n_classes : int >= 2
        Number of classes.
    rng : numpy.random.Generator or int, optional
        Random source.
    dtype : integer dtype
        Output dtype (default ``int32``).

    Returns
    -------
    numpy.ndarray
        Labels of the given shape.

    Examples
    --------
    >>> lab = random_labels((64, 64), 0.1, rng=0)
    >>> bool(0.07 < lab.mean() < 0.13)
    True
    """
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    try:
        dims = tuple(check_int(s, "shape entries", minimum=0) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of ints, got {shape!r}") from None
    if len(dims) not in (2, 3):
        raise ValueError(f"shape must be 2D (y, x) or 3D (z, y, x), got {tuple(shape)!r}")
    frac = check_fraction(p, "p")
    k_total = check_int(n_classes, "n_classes", minimum=2)
    out_dtype = np.dtype(dtype)
    if out_dtype.kind not in "iu" or np.iinfo(out_dtype).max < k_total - 1:
        raise ValueError(f"dtype {out_dtype} cannot hold labels 0..{k_total - 1}")
    return random_at(dims, frac, k_total, stream_key(rng), out_dtype)


def random_at(dims: Sequence[int], frac: float, k_total: int, key: int, out_dtype: np.dtype, *,
               origin: Sequence[int] | None = None, volume_shape: Sequence[int] | None = None) -> np.ndarray:
    """:func:`random_labels` of the box ``dims`` at ``origin`` of a volume of ``volume_shape``."""
    box = Box.of(dims, origin, volume_shape)
    out = np.zeros(box.size, dtype=out_dtype)
    for start, h in box.hashes(key, STREAM_RANDOM):
        u = unit(h)
        part = out[start:start + h.size]
        if k_total == 2 or frac == 0.0:
            part[...] = u < frac
            continue
        # given u < p, u / p is uniform on [0, 1): reuse it to pick the class
        fg = u < frac
        part[fg] = np.minimum(1 + np.floor(u[fg] * ((k_total - 1) / frac)).astype(np.int64), k_total - 1)
    return out.reshape(box.shape)


def shift(
    labels: ArrayLike,
    radius: int,
    *,
    per_section: bool = False,
    rng: Any = None,
) -> np.ndarray:
    """Randomly displace every foreground voxel within a radius (the EMS shift of iGTT).

    Each foreground voxel (label >= 1) moves by an independent offset drawn uniformly from
    the integer points ``d`` of the disc (2D, or in-plane for ``per_section``) or ball (3D)
    ``|d| <= radius``; a voxel moved out of the image is dropped (not clipped to the border,
    which would pile voxels up there). The result is background except where voxels land.

    Parameters
    ----------
    labels, radius, per_section
        As for :func:`emseg.noise.morphology.dilate`; ``labels`` are typically a skeleton,
        ``radius`` is the largest (Euclidean) shift in voxels and ``per_section`` keeps the
        z offset at 0.
    rng : numpy.random.Generator or int, optional
        Random source (see :func:`stream_key`).

    Returns
    -------
    numpy.ndarray
        The shifted labels, same shape and dtype.

    Notes
    -----
    Ignore voxels (-1) stay -1; a voxel landing on one is dropped. Where several voxels land
    on the same place the highest class wins. The offset of a voxel is a function of the key
    and of the voxel's coordinate only (a counter-based stream), so a block of a larger volume
    shifted with the same key and a halo of ``radius`` gives exactly the whole-volume result.

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((9, 9), dtype=np.int64); lab[4, 4] = 1
    >>> ys, xs = np.nonzero(shift(lab, 2, rng=0))
    >>> bool((ys[0] - 4) ** 2 + (xs[0] - 4) ** 2 <= 4)
    True
    """
    arr, r, section = checked_labels_radius(labels, radius, per_section)
    return shift_at(arr, r, section, stream_key(rng))


def shift_at(arr: np.ndarray, r: int, section: bool, key: int, *,
              origin: Sequence[int] | None = None, volume_shape: Sequence[int] | None = None) -> np.ndarray:
    """:func:`shift` of the box ``arr`` at ``origin`` of a volume of ``volume_shape``; voxels that
    leave ``arr`` are dropped (exact inside a block read with a halo of ``r``)."""
    if r == 0:
        return arr.copy()
    origin = (0,) * arr.ndim if origin is None else origin
    volume_shape = arr.shape if volume_shape is None else volume_shape
    flat_in = arr.reshape(-1)
    ignore = flat_in < 0 if arr.dtype.kind == "i" else np.zeros(flat_in.shape, bool)
    out = np.where(ignore, flat_in, np.zeros((), dtype=arr.dtype))
    src = np.flatnonzero(flat_in > 0)
    if src.size == 0:
        return out.reshape(arr.shape)
    coords = np.stack(np.unravel_index(src, arr.shape), axis=1)
    index = np.ravel_multi_index(tuple((coords + np.asarray(origin, dtype=np.int64)).T), tuple(volume_shape))
    table = _disc_offsets(r, arr.ndim, section)
    pick = np.minimum((unit(voxel_hash(key, STREAM_SHIFT, index)) * len(table)).astype(np.int64),
                      len(table) - 1)
    coords += table[pick]
    inside = np.all((coords >= 0) & (coords < np.asarray(arr.shape)), axis=1)
    dst = np.ravel_multi_index(tuple(coords[inside].T), arr.shape)
    values = flat_in[src[inside]]
    keep = ~ignore[dst]
    dst, values = dst[keep], values[keep]
    if values.size and values.min() == values.max():
        out[dst] = values[0]
    else:
        np.maximum.at(out, dst, values)
    return out.reshape(arr.shape)
