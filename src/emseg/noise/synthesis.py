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
* The random modes (``flip``, ``sample``, ``random``, ``shift``) draw every
  voxel's random numbers from a counter-based stream: a 64-bit hash of the key
  (:func:`stream_key` of ``rng``), a stream id and the voxel's linear index in the
  *whole* volume (the splitmix64 output at that index, a bijection of it). A voxel's
  numbers therefore do not depend on the block it is processed in, and a block
  processed with the same key (``shift``: with a halo of ``radius``) gives exactly
  the whole-volume result, for every block grid. The exact per-class counts of
  ``flip``/``sample`` are kept for the whole volume: the ``m_k = round(p * n_k)``
  voxels of class ``k`` with the smallest hashes are chosen, and the threshold
  (the ``m_k``-th smallest hash, :class:`Selection`) is found by a counting scan
  of the volume before the blocks are processed (:mod:`emseg.noise.process`); a
  whole array finds it in the same pass that chooses the voxels. The streams
  live in :mod:`emseg.noise.streams`; the PCL functions in :mod:`emseg.noise.morphology` (re-exported
  here), the shared checks in :mod:`emseg.noise.checks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from emseg.noise.checks import (
    as_labels,
    check_fraction,
    class_fractions,
    check_int,
    check_radius,
    fit_dtype,
    resolve_n_classes,
)
from emseg.noise.counts import HashHook, Selection, select
from emseg.noise.morphology import dilate, erode, skeleton
from emseg.noise.relabel import random_at, random_labels, shift, shift_at
from emseg.noise.streams import _GAMMA as _GOLDEN, CHUNK, Box, block_rng, stream_key, unit
from emseg.noise.streams import _mix64 as mix64

__all__ = [
    "HALO_MODES",
    "SKELETON_HALO_MARGIN",
    "Selection",
    "block_rng",
    "dilate",
    "erode",
    "flip",
    "flip_at",
    "random_at",
    "random_labels",
    "required_halo",
    "sample",
    "sample_at",
    "shift",
    "shift_at",
    "skeleton",
    "stream_key",
]
#: Modes understood by :func:`required_halo`.
HALO_MODES = ("flip", "sample", "random", "dilate", "erode", "skeleton", "shift")

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
    even): the voxels of class ``k`` with the ``round(p * n_k)`` smallest hashes
    of their global index (:mod:`emseg.noise.streams`), so every subset of that
    size is equally likely and any block grid gives the same result. One pass of
    hashes in cache-sized chunks finds the threshold and the voxels together; the
    cost is close to that of ``rng.random(labels.shape) < p``. A seed fully
    determines the result. For the population transition matrix of this process
    see :func:`emseg.noise.flip_matrix`.

    Examples
    --------
    >>> import numpy as np
    >>> clean = np.zeros((4, 5), dtype=np.int64); clean[1:3, 1:4] = 1
    >>> noisy = flip(clean, 0.5, rng=0)
    >>> int((noisy[clean == 1] == 0).sum()), int((noisy[clean == 0] == 1).sum())
    (3, 7)
    """
    arr = as_labels(labels)
    k_total = resolve_n_classes(arr, n_classes)
    if p is None and p_fg is None and p_bg is None:
        raise ValueError("flip needs p, or p_fg/p_bg for binary labels")
    return flip_at(arr, class_fractions(p, k_total, p_fg, p_bg), k_total, stream_key(rng))


def _select(arr: np.ndarray, fractions: float | Sequence[float], key: int, box: Box,
            selection: Selection | None, on_hash: HashHook | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(flat labels, chosen mask) of ``arr``, the labels of ``box``, with the volume's
    ``selection`` (default: computed from ``arr`` in the same pass); ``on_hash`` sees the
    selection hashes of that pass (:func:`~emseg.noise.counts.select`)."""
    flat_in = arr.reshape(-1)
    if selection is None:
        return flat_in, select(key, flat_in, box, fractions, on_hash=on_hash)[1]
    return flat_in, selection.mask(flat_in, box, on_hash)


def _offset_draws(size: int, k_total: int) -> tuple[np.ndarray, HashHook]:
    """(draws, hook): ``hook(start, h)`` fills ``draws[start:start + len(h)]`` with integers
    ``0 .. k_total - 2``, uniform, from the *low* 32 bits of the selection hashes ``h``
    (multiply-shift). Whether a voxel is chosen depends on its whole hash through the
    threshold, in effect on the high bits, so the low bits stay uniform among the chosen
    voxels: the new class of a flip costs no second stream."""
    n = k_total - 1
    draws = np.empty(size, dtype=np.uint64 if n > 1 << 32 else np.min_scalar_type(n))
    low = np.uint64(0xFFFFFFFF)
    scratch = np.empty(0, np.uint64)

    def hook(start: int, h: np.ndarray) -> None:
        nonlocal scratch
        if scratch.size < h.size:
            scratch = np.empty(h.size, np.uint64)
        t = scratch[:h.size]
        if n > 1 << 32:  # more than 32 bits needed: the whole hash mixed once more
            t[...] = np.minimum(np.floor(unit(mix64(h ^ np.uint64(_GOLDEN))) * n).astype(np.uint64), np.uint64(n - 1))
        else:
            np.bitwise_and(h, low, out=t)
            t *= np.uint64(n)
            t >>= np.uint64(32)
        draws[start:start + h.size] = t
    return draws, hook


def _flip_classes(flat_out: np.ndarray, chosen: np.ndarray, k_total: int, draws: np.ndarray) -> None:
    """Move every chosen voxel of ``flat_out`` to another of ``k_total`` classes, uniformly, by an
    offset ``1 + draws`` (``draws`` in ``0 .. k_total - 2``, :func:`_offset_draws`); in place.

    The arithmetic runs in the unsigned view of the labels' dtype, modulo ``2**bits``, without
    branches (a random mask makes masked numpy operations slow): with ``rest = k - offset``,
    ``new = part - rest`` when ``part >= rest``, else ``part + offset``, which always fits."""
    udt = np.dtype(f"u{flat_out.dtype.itemsize}")
    k_mod = udt.type(k_total % (1 << (8 * udt.itemsize)))
    for start in range(0, flat_out.size, CHUNK):
        where = chosen[start:start + CHUNK]
        if not where.any():
            continue
        part = flat_out[start:start + CHUNK].view(udt)
        rest = np.subtract(udt.type(k_total - 1), draws[start:start + CHUNK].astype(udt))  # in 1..k-1
        new = np.subtract(part, rest)
        new += k_mod * (part < rest).astype(udt)
        new ^= part
        new &= np.negative(where.view(np.uint8).astype(udt))  # all ones where chosen
        part ^= new


def flip_at(arr: np.ndarray, fractions: Sequence[float], k_total: int, key: int, *,
             origin: Sequence[int] | None = None, volume_shape: Sequence[int] | None = None,
             selection: Selection | None = None) -> np.ndarray:
    """:func:`flip` of the box ``arr`` at ``origin`` of a volume of ``volume_shape`` (default: the
    whole array), with the volume's ``selection`` (default: computed from ``arr``)."""
    box = Box.of(arr.shape, origin, volume_shape)
    out = arr.astype(fit_dtype(arr.dtype, 0, k_total - 1), copy=True)
    flat_out = out.reshape(-1)
    if k_total == 2:  # the only other class: 0 <-> 1
        _, chosen = _select(arr, fractions, key, box, selection)
        np.bitwise_xor(flat_out, chosen.view(np.uint8), out=flat_out)
    else:
        draws, hook = _offset_draws(flat_out.size, k_total)
        _, chosen = _select(arr, fractions, key, box, selection, hook)
        _flip_classes(flat_out, chosen, k_total, draws)
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
    arr = as_labels(labels)
    frac = check_fraction(p, "p")
    if isinstance(unsampled, (bool, np.bool_)) or unsampled not in (-1, 0):
        raise ValueError(f"unsampled must be -1 (ignore) or 0 (background), got {unsampled!r}")
    return sample_at(arr, frac, int(unsampled), stream_key(rng))


def sample_at(arr: np.ndarray, frac: float, unsampled: int, key: int, *,
               origin: Sequence[int] | None = None, volume_shape: Sequence[int] | None = None,
               selection: Selection | None = None) -> np.ndarray:
    """:func:`sample` of the box ``arr`` at ``origin`` of a volume (as :func:`flip_at`)."""
    flat_in, keep = _select(arr, frac, key, Box.of(arr.shape, origin, volume_shape), selection)
    out = flat_in.astype(fit_dtype(arr.dtype, int(unsampled), 0))
    _fill_unkept(out, flat_in, keep, unsampled)
    return out.reshape(arr.shape)


def _fill_unkept(out: np.ndarray, flat_in: np.ndarray, keep: np.ndarray, value: int) -> None:
    """Set ``out`` to ``value`` where ``keep`` is False and ``flat_in`` is not an ignore voxel, in
    place, in chunks and without branches (numpy's masked selection is slow on random masks):
    ``out ^= (out ^ value) & drop`` with ``drop`` all ones where the voxel is dropped."""
    udt = np.dtype(f"u{out.dtype.itemsize}")
    fill = np.array(value, dtype=out.dtype).view(udt)
    for start in range(0, out.size, CHUNK):
        stop = start + CHUNK
        drop = ~keep[start:stop]
        if flat_in.dtype.kind == "i":
            drop &= flat_in[start:stop] >= 0
        part = out[start:stop].view(udt)
        change = part ^ fill
        change &= np.negative(drop.view(np.uint8).astype(udt))
        part ^= change


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
    r = check_radius(radius)
    if mode in ("flip", "sample", "random"):
        return 0
    if mode in ("dilate", "erode", "shift"):
        return r
    if max_width is None:
        raise ValueError("required_halo('skeleton') needs max_width (largest object width)")
    return check_int(max_width, "max_width", minimum=0) + SKELETON_HALO_MARGIN
