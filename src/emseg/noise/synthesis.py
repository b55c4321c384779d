"""Synthesis of noisy segmentation labels.

Implements the label perturbations used to study how segmentation networks learn
from noisy labels (Luo et al., "Deep Neural Networks Learn Meta-Structures from
Noisy Labels in Semantic Segmentation", AAAI 2022):

* **RCL** (randomised clean labels): :func:`flip` swaps an exact fraction of each
  class to other classes; :func:`sample` keeps an exact fraction of each class and
  marks the rest unlabelled.
* **PCL** (perturbed clean labels): :func:`dilate`, :func:`erode` and
  :func:`skeleton` perturb object boundaries.
* **RL** (random labels): :func:`random_labels` draws labels independently of any
  ground truth.
* :func:`shift` randomly displaces every foreground voxel, the perturbation step of
  the extraction-of-meta-structure (EMS) module of iGTT.

Conventions
-----------
Arrays are 2D ``(y, x)`` or 3D ``(z, y, x)`` integer label images: ``0`` is
background, ``1..K-1`` are foreground classes and ``-1`` marks ignored voxels.
Every function returns a new array of the input's shape; inputs are never modified
and ignore voxels are never changed. Randomness comes from ``rng`` (a
:class:`numpy.random.Generator`, an int seed or ``None``), normalised with
:func:`numpy.random.default_rng`.

Blockwise processing
--------------------
Large volumes may be processed block by block. Each block is read with the halo
given by :func:`required_halo` on every side (clipped at the volume border),
processed, and cropped back to its core.

* ``dilate`` / ``erode`` with that halo give exactly the whole-volume result.
  With ``per_section=True`` no halo is needed along z.
* ``skeleton`` is a global thinning and is not exactly blockwise-safe; see
  :func:`required_halo` for the recommended halo.
* The random modes (``flip``, ``sample``, ``random``, ``shift``) are made
  reproducible by deriving one random stream per block from ``(seed, block
  index)`` with :func:`block_rng`. The result then depends on the seed *and* the
  block grid: exact per-class counts of ``flip``/``sample`` hold per block (the
  whole-volume count may differ from ``round(p * n_k)`` by the per-block rounding),
  and ``shift`` (halo ``radius``) moves the halo voxels with the block's own stream.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

__all__ = [
    "HALO_MODES",
    "SKELETON_HALO_MARGIN",
    "block_rng",
    "dilate",
    "erode",
    "flip",
    "random_labels",
    "required_halo",
    "sample",
    "shift",
    "skeleton",
]

#: Modes understood by :func:`required_halo`.
HALO_MODES = ("flip", "sample", "random", "dilate", "erode", "skeleton", "shift")


# --------------------------------------------------------------------------- #
# validation helpers (shared with ``transition``)
# --------------------------------------------------------------------------- #
def _as_labels(labels: ArrayLike, name: str = "labels", *, spatial: bool = True) -> np.ndarray:
    """Return ``labels`` as an integer ndarray, validated (no copy)."""
    arr = np.asarray(labels)
    if arr.dtype.kind not in "biu":
        raise ValueError(f"{name} must have an integer dtype, got {arr.dtype}")
    if spatial and arr.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be 2D (y, x) or 3D (z, y, x), got {arr.ndim}D with shape {arr.shape}"
        )
    if arr.dtype.kind == "i" and arr.size:
        lo = int(arr.min())
        if lo < -1:
            raise ValueError(f"{name} must be >= -1 (-1 = ignore), got minimum {lo}")
    return arr


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    v = float(value)
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def _check_int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v}")
    return v


def _check_radius(radius: Any) -> int:
    return _check_int(radius, "radius", minimum=0)


def _max_label(arr: np.ndarray) -> int:
    return int(arr.max()) if arr.size else 0


def _resolve_n_classes(arr: np.ndarray, n_classes: Any, name: str = "labels") -> int:
    """Default ``max label + 1`` (at least 2); check labels fit an explicit value."""
    top = _max_label(arr)
    if n_classes is None:
        return max(top + 1, 2)
    k = _check_int(n_classes, "n_classes", minimum=2)
    if top >= k:
        raise ValueError(f"{name} contain class {top} but n_classes={k}")
    return k


def _fit_dtype(dtype: np.dtype, lo: int, hi: int) -> np.dtype:
    """``dtype`` if it can hold ``[lo, hi]``, else the smallest promotion that can.

    Boolean input is treated as ``uint8``.
    """
    dt = np.dtype(np.uint8) if dtype.kind == "b" else np.dtype(dtype)
    info = np.iinfo(dt)
    if info.min <= lo and hi <= info.max:
        return dt
    need = np.promote_types(np.min_scalar_type(lo), np.min_scalar_type(hi))
    out = np.promote_types(dt, need)
    return out if out.kind in "iu" else np.dtype(np.int64)


def _present_classes(flat: np.ndarray, top: int) -> list[int]:
    """Labels ``0..top`` that may occur in ``flat``: all of them for few classes,
    else those that do occur."""
    if top < 64:
        return list(range(top + 1))
    valid = flat[flat >= 0] if flat.dtype.kind == "i" else flat
    if top > 1 << 20:
        return np.unique(valid).tolist()
    return np.flatnonzero(np.bincount(valid.astype(np.intp, copy=False))).tolist()


def _exact_selection(
    gen: np.random.Generator, flat: np.ndarray, fractions: Sequence[float], classes: Sequence[int]
) -> np.ndarray:
    """Boolean mask choosing exactly ``round(fractions[k] * n_k)`` voxels of each class.

    For each class the chosen set is uniform over all subsets of that size: a
    Bernoulli draft (one float32 uniform per voxel against the class fraction) is
    uniform given its size, and uniformly dropping surplus members, or adding
    missing ones from the rest of the class, keeps it uniform. ``classes`` must
    list every class present; ignore voxels are never chosen.
    """
    if flat.dtype.kind == "b":
        flat = flat.view(np.uint8)
    u = gen.random(flat.shape, dtype=np.float32)
    rates = {k: np.float32(fractions[k]) for k in classes}
    uniform = len(set(rates.values())) <= 1
    if uniform and rates:
        sel = u < next(iter(rates.values()))
        if flat.dtype.kind == "i":
            sel &= flat >= 0
    else:
        sel = np.zeros(flat.shape, dtype=bool)
    for k in classes:
        in_class = flat == k
        n_k = int(np.count_nonzero(in_class))
        if n_k == 0:
            continue
        m = _round_count(fractions[k], n_k)
        drafted = (sel if uniform else u < rates[k]) & in_class
        c = int(np.count_nonzero(drafted))
        # corrections go straight into ``sel`` when it already holds the draft
        target = sel if uniform else drafted
        if c > m:
            idx = np.flatnonzero(drafted)
            target[idx[gen.choice(c, c - m, replace=False, shuffle=False)]] = False
        elif c < m:
            idx = np.flatnonzero(in_class & ~drafted)
            target[idx[gen.choice(idx.size, m - c, replace=False, shuffle=False)]] = True
        if not uniform:
            sel |= drafted
    return sel


def _round_count(p: float, n: int) -> int:
    """``round(p * n)`` (halves to even, as Python's :func:`round`)."""
    return int(round(p * n))


# --------------------------------------------------------------------------- #
# RCL
# --------------------------------------------------------------------------- #
def flip(
    labels: ArrayLike,
    p: float | None = None,
    *,
    n_classes: int | None = None,
    p_fg: float | None = None,
    p_bg: float | None = None,
    rng: Any = None,
) -> np.ndarray:
    """Randomised clean labels by flipping (RCL).

    For every class ``k``, exactly ``round(p_k * n_k)`` of its ``n_k`` labelled
    voxels are chosen uniformly without replacement and set to a class drawn
    uniformly from the ``n_classes - 1`` *other* classes. Ignore voxels (-1) are
    untouched.

    Parameters
    ----------
    labels : array_like of int, 2D or 3D
        Clean labels (0 background, -1 ignore).
    p : float in [0, 1], optional
        Flip fraction of every class.
    n_classes : int >= 2, optional
        Number of classes the flips draw from. Defaults to ``max(labels) + 1``
        (at least 2).
    p_fg, p_bg : float in [0, 1], optional
        Binary labels only: flip fractions of class 1 and class 0. Each defaults
        to ``p`` (or 0 when ``p`` is not given).
    rng : numpy.random.Generator or int, optional
        Random source.

    Returns
    -------
    numpy.ndarray
        Noisy labels, same shape; same dtype unless it cannot hold
        ``n_classes - 1`` (then promoted; booleans become ``uint8``).

    Notes
    -----
    The number flipped is ``round(p * n_k)`` with Python's rounding (halves to
    even). The chosen set is drawn as a Bernoulli draft (one uniform per voxel)
    corrected to the exact count by uniformly dropping or adding voxels, which
    keeps every subset of that size equally likely; the cost is close to that of
    ``rng.random(labels.shape) < p``. A seed fully determines the result. For
    the population transition matrix of this process see
    :func:`emseg.noise.flip_matrix`.

    Examples
    --------
    >>> import numpy as np
    >>> clean = np.zeros((4, 5), dtype=np.int64); clean[1:3, 1:4] = 1
    >>> noisy = flip(clean, 0.5, rng=0)
    >>> int((noisy[clean == 1] == 0).sum()), int((noisy[clean == 0] == 1).sum())
    (3, 7)
    """
    arr = _as_labels(labels)
    k_total = _resolve_n_classes(arr, n_classes)
    if p is None and p_fg is None and p_bg is None:
        raise ValueError("flip needs p, or p_fg/p_bg for binary labels")
    base = 0.0 if p is None else _check_fraction(p, "p")
    fractions = [base] * k_total
    if p_fg is not None or p_bg is not None:
        if k_total != 2:
            raise ValueError(
                f"p_fg/p_bg apply to binary labels only (n_classes=2), got n_classes={k_total}"
            )
        if p_bg is not None:
            fractions[0] = _check_fraction(p_bg, "p_bg")
        if p_fg is not None:
            fractions[1] = _check_fraction(p_fg, "p_fg")
    gen = np.random.default_rng(rng)

    out = arr.astype(_fit_dtype(arr.dtype, 0, k_total - 1), copy=True)
    flat_out = out.reshape(-1)
    flat_in = arr.reshape(-1)
    classes = _present_classes(flat_in, _max_label(arr))
    chosen = _exact_selection(gen, flat_in, fractions, classes)
    if k_total == 2:  # the only other class: 0 <-> 1
        flat_out ^= chosen.view(np.uint8).astype(flat_out.dtype, copy=False)
        return out
    where = np.flatnonzero(chosen)
    offsets = gen.integers(1, k_total, size=where.size, dtype=np.int64)
    flat_out[where] = (flat_out[where].astype(np.int64) + offsets) % k_total
    return out


def sample(
    labels: ArrayLike,
    p: float,
    *,
    rng: Any = None,
    unsampled: int = -1,
) -> np.ndarray:
    """Randomised clean labels by sampling (RCL).

    For every class ``k``, exactly ``round(p * n_k)`` of its ``n_k`` labelled
    voxels, chosen uniformly without replacement, keep their label; the others
    become ``unsampled``. Ignore voxels (-1) are untouched.

    Parameters
    ----------
    labels : array_like of int, 2D or 3D
        Clean labels (0 background, -1 ignore).
    p : float in [0, 1]
        Fraction of each class that is kept.
    rng : numpy.random.Generator or int, optional
        Random source.
    unsampled : {-1, 0}
        Value of voxels not sampled: -1 (ignore; excluded from training, as in the
        paper) or 0 (background).

    Returns
    -------
    numpy.ndarray
        Same shape; same dtype unless it cannot hold ``unsampled`` (unsigned and
        boolean input is promoted to a signed type when ``unsampled=-1``).

    Examples
    --------
    >>> import numpy as np
    >>> clean = np.zeros((4, 5), dtype=np.int64); clean[1:3, 1:4] = 1
    >>> noisy = sample(clean, 0.5, rng=0)
    >>> int((noisy == 1).sum()), int((noisy == 0).sum()), int((noisy == -1).sum())
    (3, 7, 10)
    """
    arr = _as_labels(labels)
    frac = _check_fraction(p, "p")
    if isinstance(unsampled, (bool, np.bool_)) or unsampled not in (-1, 0):
        raise ValueError(f"unsampled must be -1 (ignore) or 0 (background), got {unsampled!r}")
    gen = np.random.default_rng(rng)

    flat_in = arr.reshape(-1)
    classes = _present_classes(flat_in, _max_label(arr))
    keep = _exact_selection(gen, flat_in, [frac] * (max(classes, default=0) + 1), classes)
    if arr.dtype.kind == "i":
        keep |= flat_in < 0
    out_dtype = _fit_dtype(arr.dtype, int(unsampled), 0)
    out = np.where(keep, flat_in, np.array(unsampled, dtype=out_dtype))
    return out.astype(out_dtype, copy=False).reshape(arr.shape)


# --------------------------------------------------------------------------- #
# PCL
# --------------------------------------------------------------------------- #
def _footprint(ndim: int, radius: int, per_section: bool) -> np.ndarray:
    """Full 3x3(x3) box at radius 1, disk/ball of ``radius`` beyond.

    These footprints are symmetric and shrink-closed (an offset with one
    coordinate moved towards 0 stays inside), so edge-replicating borders
    (``mode="nearest"``) never bring in a value the footprint does not already
    see inside the volume: max/min filters then ignore the border exactly. (The
    ``mode="ignore"`` of scikit-image 0.26 morphology pads with the dtype's
    extreme value, which comes out wrong for int64 with non-box footprints.)
    """
    from skimage.morphology import ball, disk

    in_plane = per_section and ndim == 3
    dims = 2 if in_plane else ndim
    if radius == 1:
        fp = np.ones((3,) * dims, dtype=np.uint8)
    else:
        fp = disk(radius) if dims == 2 else ball(radius)
    return fp[np.newaxis] if in_plane else fp


def _check_per_section(per_section: Any) -> bool:
    if not isinstance(per_section, (bool, np.bool_)):
        raise ValueError(f"per_section must be True or False, got {per_section!r}")
    return bool(per_section)


def dilate(labels: ArrayLike, radius: int, *, per_section: bool = False) -> np.ndarray:
    """Perturbed clean labels by dilation (PCL).

    Every foreground class ``k >= 1`` is dilated as a binary mask with a footprint
    of the given radius (full 3x3 / 3x3x3 box at radius 1,
    :func:`skimage.morphology.disk` / :func:`~skimage.morphology.ball` of that
    radius beyond), computed for all classes at once as a grey-value dilation.

    Parameters
    ----------
    labels : array_like of int, 2D or 3D
        Clean labels (0 background, -1 ignore).
    radius : int >= 0
        Footprint radius; 0 returns a copy.
    per_section : bool
        For 3D input, dilate each z-section in-plane only (anisotropic ssTEM
        stacks). Has no effect on 2D input.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype.

    Notes
    -----
    Precedence: voxels that are foreground or ignore in the input keep their
    label (dilation only claims background), and a background voxel reached by
    several dilated classes takes the **highest** class id among them. This is a
    max filter of the label image applied to background voxels only. Dilated
    masks reach across ignore voxels without changing them. The image border
    adds nothing.

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((5, 5), dtype=np.int64); lab[2, 2] = 1
    >>> int(dilate(lab, 1).sum())
    9
    """
    from scipy import ndimage as ndi

    arr = _as_labels(labels)
    r = _check_radius(radius)
    section = _check_per_section(per_section)
    if r == 0:
        return arr.copy()
    grown = ndi.grey_dilation(arr, footprint=_footprint(arr.ndim, r, section), mode="nearest")
    return np.where(arr == 0, grown, arr)


def erode(labels: ArrayLike, radius: int, *, per_section: bool = False) -> np.ndarray:
    """Perturbed clean labels by erosion (PCL).

    Every foreground class ``k >= 1`` is eroded as a binary mask with the footprint
    of :func:`dilate`; eroded-away voxels become background (0).

    Parameters
    ----------
    labels : array_like of int, 2D or 3D
        Clean labels (0 background, -1 ignore).
    radius : int >= 0
        Footprint radius; 0 returns a copy.
    per_section : bool
        For 3D input, erode each z-section in-plane only. No effect on 2D input.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype.

    Notes
    -----
    A class-``k`` voxel survives iff every in-volume voxel under the footprint is
    class ``k``; any other label, including ignore (-1) and other foreground
    classes, erodes it. Outside the volume counts as class ``k`` (objects are not
    eroded from the image border), as in :func:`skimage.morphology.erosion`.

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((5, 5), dtype=np.int64); lab[1:4, 1:4] = 1
    >>> int(erode(lab, 1).sum())
    1
    """
    from scipy import ndimage as ndi

    arr = _as_labels(labels)
    r = _check_radius(radius)
    section = _check_per_section(per_section)
    if r == 0:
        return arr.copy()
    fp = _footprint(arr.ndim, r, section)
    lo = ndi.grey_erosion(arr, footprint=fp, mode="nearest")
    hi = ndi.grey_dilation(arr, footprint=fp, mode="nearest")
    removed = (arr > 0) & ((lo != arr) | (hi != arr))
    return np.where(removed, np.zeros((), dtype=arr.dtype), arr)


def class_boxes(arr: np.ndarray):
    """Yield ``(k, box)`` for every class k >= 1 present in ``arr``: its bounding box grown by
    one voxel on each side (clipped to the array). The class ids are read in the array's own
    integer type, so no int64 copy of the volume is made."""
    from scipy import ndimage as ndi

    if arr.dtype.kind == "b":
        fg = arr.view(np.uint8)
    else:
        fg = np.maximum(arr, 0) if arr.dtype.kind == "i" else arr
    for k, box in enumerate(ndi.find_objects(fg), start=1):
        if box is None:
            continue
        yield k, tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, arr.shape, strict=True))


def skeleton(labels: ArrayLike, *, per_section: bool = True) -> np.ndarray:
    """Perturbed clean labels by skeletonisation (PCL).

    Each foreground class ``k >= 1`` is reduced to its one-voxel-wide skeleton
    (:func:`skimage.morphology.skeletonize`: Zhang-Suen thinning in 2D, Lee's
    method in 3D); every other labelled voxel becomes background. Ignore voxels
    (-1) are untouched.

    Parameters
    ----------
    labels : array_like of int, 2D or 3D
        Clean labels (0 background, -1 ignore).
    per_section : bool
        For 3D input, skeletonise each z-section in 2D (default, suited to
        anisotropic ssTEM stacks); ``False`` uses 3D thinning. No effect on 2D.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype.

    Notes
    -----
    Classes are thinned separately, so touching objects of different classes
    keep separate skeletons. The result is not exactly blockwise-safe; see
    :func:`required_halo`.

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((5, 7), dtype=np.int64); lab[1:4, 1:6] = 1
    >>> sk = skeleton(lab)
    >>> bool(np.all(lab[sk == 1] == 1)), int(sk.sum()) < int(lab.sum())
    (True, True)
    """
    from skimage.morphology import skeletonize

    arr = _as_labels(labels)
    section = _check_per_section(per_section) and arr.ndim == 3
    out = np.zeros_like(arr)
    if arr.dtype.kind == "i":
        out[arr < 0] = -1
    # one voxel of margin so thinning sees the object's true surroundings
    for k, box in class_boxes(arr):
        mask = arr[box] == k
        if section:
            thin = np.stack([skeletonize(m) for m in mask])
        else:
            thin = skeletonize(mask)
        out[box][thin] = k
    return out


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
        dims = tuple(_check_int(s, "shape entries", minimum=0) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of ints, got {shape!r}") from None
    if len(dims) not in (2, 3):
        raise ValueError(f"shape must be 2D (y, x) or 3D (z, y, x), got {tuple(shape)!r}")
    frac = _check_fraction(p, "p")
    k_total = _check_int(n_classes, "n_classes", minimum=2)
    out_dtype = np.dtype(dtype)
    if out_dtype.kind not in "iu" or np.iinfo(out_dtype).max < k_total - 1:
        raise ValueError(f"dtype {out_dtype} cannot hold labels 0..{k_total - 1}")
    gen = np.random.default_rng(rng)
    u = gen.random(dims)
    if k_total == 2 or frac == 0.0:
        return (u < frac).astype(out_dtype)
    # given u < p, u / p is uniform on [0, 1): reuse it to pick the class
    out = np.zeros(dims, dtype=out_dtype)
    fg = u < frac
    cls = 1 + np.floor(u[fg] * ((k_total - 1) / frac)).astype(np.int64)
    out[fg] = np.minimum(cls, k_total - 1)
    return out


def shift(
    labels: ArrayLike,
    radius: int,
    *,
    per_section: bool = False,
    rng: Any = None,
) -> np.ndarray:
    """Randomly displace every foreground voxel (the EMS shift of iGTT).

    Each foreground voxel (label >= 1) moves by an independent offset drawn
    uniformly from the integers ``[-radius, radius]`` along each axis, clipped to
    the volume; the result is background except where voxels land.

    Parameters
    ----------
    labels : array_like of int, 2D or 3D
        Labels, typically a skeleton (0 background, -1 ignore).
    radius : int >= 0
        Maximum displacement per axis; 0 returns a copy.
    per_section : bool
        For 3D input, shift in-plane only (z offset 0). No effect on 2D.
    rng : numpy.random.Generator or int, optional
        Random source.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype.

    Notes
    -----
    Ignore voxels (-1) stay -1; a voxel landing on one is dropped. Where several
    voxels land on the same place the highest class wins. Offsets are drawn per
    axis in (z, y, x) order for the foreground voxels in C order.

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((9, 9), dtype=np.int64); lab[4, 4] = 1
    >>> ys, xs = np.nonzero(shift(lab, 2, rng=0))
    >>> bool(abs(ys[0] - 4) <= 2 and abs(xs[0] - 4) <= 2)
    True
    """
    arr = _as_labels(labels)
    r = _check_radius(radius)
    section = _check_per_section(per_section) and arr.ndim == 3
    gen = np.random.default_rng(rng)
    if r == 0:
        return arr.copy()
    flat_in = arr.reshape(-1)
    ignore = flat_in < 0 if arr.dtype.kind == "i" else np.zeros(flat_in.shape, bool)
    out = np.where(ignore, flat_in, np.zeros((), dtype=arr.dtype))
    src = np.flatnonzero(flat_in > 0)
    coords = list(np.unravel_index(src, arr.shape))
    for axis, n in enumerate(arr.shape):
        if section and axis == 0:
            continue
        moved = coords[axis] + gen.integers(-r, r + 1, size=src.size)
        coords[axis] = np.clip(moved, 0, n - 1)
    dst = np.ravel_multi_index(tuple(coords), arr.shape)
    values = flat_in[src]
    keep = ~ignore[dst]
    dst, values = dst[keep], values[keep]
    if values.size and values.min() == values.max():
        out[dst] = values[0]
    else:
        np.maximum.at(out, dst, values)
    return out.reshape(arr.shape)


# --------------------------------------------------------------------------- #
# blockwise support
# --------------------------------------------------------------------------- #
#: Margin added to the object width for the recommended skeleton halo.
SKELETON_HALO_MARGIN = 4


def required_halo(mode: str, radius: int = 0, *, max_width: int | None = None) -> int:
    """Halo (voxels per side) a block needs for ``mode`` when processed blockwise.

    Parameters
    ----------
    mode : str
        One of ``"flip"``, ``"sample"``, ``"random"`` (pointwise: 0),
        ``"dilate"``, ``"erode"`` (``radius``: exact), ``"shift"`` (``radius``, so
        voxels of neighbouring blocks can move in) or ``"skeleton"``.
    radius : int >= 0
        Radius of the operation (dilate, erode, shift).
    max_width : int, optional
        Skeleton only: the largest object width in voxels, i.e. the diameter of
        the largest disk/ball inscribed in an object (``2 * max`` of the Euclidean
        distance transform of the foreground, rounded up). Required for
        ``mode="skeleton"``.

    Returns
    -------
    int
        Halo along every processed axis. With ``per_section=True`` the z-axis
        needs none.

    Notes
    -----
    Thinning peels one boundary layer per iteration and stops when nothing
    changes, so a block cut only influences the skeleton within about one object
    width of the cut. The recommended skeleton halo is
    ``max_width + SKELETON_HALO_MARGIN``. On random smooth blobs (2D Zhang-Suen
    and 3D Lee thinning, 32-64 voxel blocks) blockwise and whole-volume
    skeletons matched exactly from about ``max_width / 2`` (2D) and
    ``max_width`` (3D) on, whereas a zero halo changed thousands of voxels. This
    is not a guarantee: thinning preserves topology and is therefore not strictly
    local, so treat blockwise skeletons with this halo as matching in practice
    rather than by construction (per-section skeletons are exact along z).

    Examples
    --------
    >>> required_halo("dilate", 2), required_halo("flip"), required_halo("skeleton", max_width=12)
    (2, 0, 16)
    """
    if mode not in HALO_MODES:
        raise ValueError(f"mode must be one of {', '.join(HALO_MODES)}; got {mode!r}")
    r = _check_radius(radius)
    if mode in ("flip", "sample", "random"):
        return 0
    if mode in ("dilate", "erode", "shift"):
        return r
    if max_width is None:
        raise ValueError("required_halo('skeleton') needs max_width (largest object width)")
    return _check_int(max_width, "max_width", minimum=0) + SKELETON_HALO_MARGIN


def block_rng(seed: int, index: int | Sequence[int]) -> np.random.Generator:
    """Independent, reproducible random stream for one block.

    Returns ``numpy.random.default_rng(SeedSequence(seed, spawn_key=index))``,
    which is the stream ``SeedSequence(seed).spawn(...)`` would give block
    ``index``; nested indices ``(iz, iy, ix)`` correspond to nested spawns.

    Parameters
    ----------
    seed : int >= 0
        Run seed.
    index : int or sequence of int >= 0
        Block index (flat or per axis).

    Returns
    -------
    numpy.random.Generator

    Examples
    --------
    >>> a = block_rng(7, (0, 1, 2)).integers(1000)
    >>> b = block_rng(7, (0, 1, 2)).integers(1000)
    >>> bool(a == b)
    True
    """
    s = _check_int(seed, "seed", minimum=0)
    key = (index,) if isinstance(index, (int, np.integer)) else tuple(index)
    key = tuple(_check_int(i, "block index", minimum=0) for i in key)
    return np.random.default_rng(np.random.SeedSequence(s, spawn_key=key))
