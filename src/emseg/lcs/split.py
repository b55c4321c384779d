"""Split augmentation: condition on one part of a class, in the atlas and in the patch alike.

A model trained on coarse classes never sees a condition that is a sub-part of a class, so a fine
atlas mask at inference (say glia inside "membrane + glia") is read as the coarse class. With
probability ``[lcs] split_prob`` a sample's class set is therefore restricted to one part, in its
atlas mask and in its target.

"The same part" has to be defined without any correspondence between the atlas and the patch
(they are different images), so it is a property each voxel has in either: its **local
thickness** within the class mask. The *thick part* at radius r is the morphological opening of
the mask by a disk of radius r (in-plane: per section for 3D patches): the voxels covered by
some disk of radius r that fits inside the mask. The *thin part* is the rest of the mask. The
radius r (:data:`SPLIT_RADII`, voxels) and the side are drawn per sample and applied to both.

Why thickness: it depends on the mask alone, so intensity augmentation of the patch cannot move
the boundary between the parts, and flips and rotations do not change it; it is a scale property,
which is how sub-classes of EM structures often differ (sheets and bodies against thin
membranes, large against small organelles). On the VNC training sections, other image-derived
splits did not separate the sub-classes of the coarse class "membrane + glia": its largest
connected component holds 97-99% of each section's voxels, and the smoothed intensity of membrane
and glia voxels has the same distribution. Thickness does (at radius 6, 99.8% of glia voxels but 30% of
membrane voxels are in the thick part).

Borders: the mask is extended by edge padding before the opening, so a thick body cut by the
patch border stays thick. Ignored voxels (label -1) may or may not belong to the class: a class
voxel whose side depends on that (thick if the ignored voxels were class, thin if not) is
ignored in the target too.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

#: Inclusive range of the disk radius (voxels, in-plane) of a split.
SPLIT_RADII = (2, 8)
#: A split is used only when each part holds at least this fraction of the atlas mask.
MIN_PART_FRACTION = 0.05


def _disk(radius: int, ndim: int) -> np.ndarray:
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    disk = x * x + y * y <= radius * radius
    return disk.reshape((1,) * (ndim - 2) + disk.shape)


def thick_part(mask: np.ndarray, radius: int) -> np.ndarray:
    """Voxels of ``mask`` covered by an in-plane disk of ``radius`` that fits inside it (opening).

    The last two axes are the plane; the mask is edge-padded in-plane first.

    Examples
    --------
    >>> m = np.zeros((9, 12), bool); m[1:8, 1:8] = True; m[4, 8:11] = True  # a square with a spur
    >>> t = thick_part(m, 2)
    >>> bool(t[4, 4]), bool(t[4, 10]), int(t.sum()) < int(m.sum())
    (True, False, True)
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim < 2:
        raise ValueError(f"thick_part needs at least 2 axes, got shape {mask.shape}")
    pad = [(0, 0)] * (mask.ndim - 2) + [(radius, radius)] * 2
    padded = np.pad(mask, pad, mode="edge")
    opened = ndimage.binary_opening(padded, structure=_disk(radius, mask.ndim))
    inner = tuple(slice(None) for _ in range(mask.ndim - 2)) + (slice(radius, -radius),) * 2
    return opened[inner] & mask


def split_part(mask: np.ndarray, radius: int, thick: bool) -> np.ndarray:
    """The thick part of ``mask`` at ``radius`` (``thick``), or the rest of it."""
    part = thick_part(mask, radius)
    return part if thick else np.asarray(mask, dtype=bool) & ~part


def draw_split(rng: np.random.Generator) -> tuple[int, bool]:
    """A random split: (radius in :data:`SPLIT_RADII`, thick side or not)."""
    return int(rng.integers(SPLIT_RADII[0], SPLIT_RADII[1] + 1)), bool(rng.random() < 0.5)


def atlas_part(atlas_mask: np.ndarray, radius: int, thick: bool) -> np.ndarray | None:
    """The part of an atlas mask for a split, or None when a part would hold less than
    :data:`MIN_PART_FRACTION` of the mask (the split would not be a proper sub-part there)."""
    mask = np.asarray(atlas_mask) > 0
    total = int(np.count_nonzero(mask))
    part = split_part(mask, radius, thick)
    n = int(np.count_nonzero(part))
    if total == 0 or min(n, total - n) < MIN_PART_FRACTION * total:
        return None
    return part


def split_target(label: np.ndarray, class_set: Sequence[int], target: np.ndarray, radius: int,
                 thick: bool) -> np.ndarray:
    """Restrict a binary ``target`` (1 class set, 0 not, -1 ignored) to one part of the class set.

    Class voxels outside the part become 0. Where ``label`` has ignored voxels, class voxels
    whose side would change if those voxels belonged to the class become -1.
    """
    label = np.asarray(label)
    mask = np.isin(label, np.asarray(class_set, dtype=np.int64))
    thick_mask = thick_part(mask, radius)
    part = thick_mask if thick else mask & ~thick_mask
    out = np.array(target, dtype=np.int64, copy=True)
    out[mask & ~part & (out == 1)] = 0
    ignored = label < 0
    if np.any(ignored) and np.any(mask):
        alt = thick_part(mask | ignored, radius) & mask  # the thick part if the ignored voxels were class
        unsure = alt != thick_mask
        out[unsure & mask] = -1
    return out
