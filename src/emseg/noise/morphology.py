"""Perturbed clean labels (PCL): dilation, erosion and skeletonisation of every class.

Numpy in, numpy out; ``-1`` (ignore) voxels are kept. :func:`dilate` and :func:`erode`
processed block by block with a halo of ``radius`` equal the whole-array result;
see :func:`emseg.noise.synthesis.required_halo` for the skeleton's halo.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage as ndi
from skimage.morphology import ball, disk, skeletonize

from emseg.noise.checks import as_labels, check_per_section, checked_labels_radius

__all__ = ["class_boxes", "dilate", "erode", "skeleton"]


def _footprint(ndim: int, radius: int, per_section: bool) -> np.ndarray:
    """Full 3x3(x3) box at radius 1, disk/ball of ``radius`` beyond.

    These footprints are symmetric and shrink-closed (an offset with one
    coordinate moved towards 0 stays inside), so edge-replicating borders
    (``mode="nearest"``) never bring in a value the footprint does not already
    see inside the volume: max/min filters then ignore the border exactly. (The
    ``mode="ignore"`` of scikit-image 0.26 morphology pads with the dtype's
    extreme value, which comes out wrong for int64 with non-box footprints.)
    """
    in_plane = per_section and ndim == 3
    dims = 2 if in_plane else ndim
    if radius == 1:
        fp = np.ones((3,) * dims, dtype=np.uint8)
    else:
        fp = disk(radius) if dims == 2 else ball(radius)
    return fp[np.newaxis] if in_plane else fp


def _checked(labels: ArrayLike, radius: Any, per_section: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """The checked labels of :func:`dilate` / :func:`erode` and their footprint (None at radius 0)."""
    arr, r, section = checked_labels_radius(labels, radius, per_section)
    return arr, (_footprint(arr.ndim, r, section) if r else None)


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
    arr, fp = _checked(labels, radius, per_section)
    if fp is None:
        return arr.copy()
    grown = ndi.grey_dilation(arr, footprint=fp, mode="nearest")
    return np.where(arr == 0, grown, arr)


def erode(labels: ArrayLike, radius: int, *, per_section: bool = False) -> np.ndarray:
    """Perturbed clean labels by erosion (PCL).

    Every foreground class ``k >= 1`` is eroded as a binary mask with the footprint
    of :func:`dilate`; eroded-away voxels become background (0).

    Parameters
    ----------
    labels, radius, per_section
        As for :func:`dilate` (``per_section``: erode each z-section in-plane only).

    Returns
    -------
    numpy.ndarray
        The eroded labels, same shape and dtype.

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
    arr, fp = _checked(labels, radius, per_section)
    if fp is None:
        return arr.copy()
    lo = ndi.grey_erosion(arr, footprint=fp, mode="nearest")
    hi = ndi.grey_dilation(arr, footprint=fp, mode="nearest")
    removed = (arr > 0) & ((lo != arr) | (hi != arr))
    return np.where(removed, np.zeros((), dtype=arr.dtype), arr)


def class_boxes(arr: np.ndarray):
    """Yield ``(k, box)`` for every class k >= 1 present in ``arr``: its bounding box grown by
    one voxel on each side (clipped to the array). The class ids are read in the array's own
    integer type, so no int64 copy of the volume is made."""
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
        As for :func:`dilate`.
    per_section : bool
        For 3D input, skeletonise each z-section in 2D (default, suited to
        anisotropic ssTEM stacks); ``False`` uses 3D thinning. No effect on 2D.

    Returns
    -------
    numpy.ndarray
        The skeletons, same shape and dtype.

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
    arr = as_labels(labels)
    section = check_per_section(per_section) and arr.ndim == 3
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

