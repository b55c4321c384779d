"""The atlas of a label-conditioned model: one patch-sized image with its integer label map.

The atlas is cropped (never resized) from an atlas volume at a fixed offset, so the conditioning
image has the resolution of the images the network sees. It is stored inside the checkpoint.
A *condition* for a set of classes is the 2-channel tensor (atlas image, binary atlas mask of the
union of those classes), with the spatial shape of the network's input patch.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from emseg.data import to_float
from emseg.errors import InputError
from emseg.io import check_raw, open_volume

#: Largest atlas label volume (voxels) searched for a default offset.
MAX_SEARCH_VOXELS = 1 << 26
#: Largest number of candidate offsets tried by the search (the stride grows beyond it).
MAX_CANDIDATES = 1 << 16


def array_sha256(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes (C order).

    Examples
    --------
    >>> len(array_sha256(np.zeros((2, 2), dtype=np.uint8)))
    64
    """
    a = np.ascontiguousarray(array)
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Atlas:
    """A patch-sized atlas in network axes.

    Attributes
    ----------
    image : numpy.ndarray
        float32 intensities (raw integer types divided by their maximum), network axes (*P).
    label : numpy.ndarray
        int64 label map of the same shape; ``-1`` voxels never belong to a mask.
    patch_shape : tuple of int
        The patch in volume axes (e.g. ``(1, 128, 128)`` for a 2D network on a 3D volume).
    offset : tuple of int
        Where the patch was cropped in the atlas volume (volume axes).
    source_shape : tuple of int
        Shape of the atlas volume it was cropped from.
    raw_spec, label_spec : str
        Where the atlas came from (recorded for provenance).

    Examples
    --------
    >>> atlas = Atlas(np.zeros((4, 4), np.float32), np.eye(4, dtype=np.int64), (4, 4), (0, 0), (4, 4))
    >>> atlas.condition([(1,)]).shape
    (1, 2, 4, 4)
    """

    image: np.ndarray
    label: np.ndarray
    patch_shape: tuple[int, ...]
    offset: tuple[int, ...]
    source_shape: tuple[int, ...]
    raw_spec: str = ""
    label_spec: str = ""

    def __post_init__(self):
        if self.image.shape != self.label.shape:
            raise InputError(f"atlas image shape {self.image.shape} differs from atlas label shape "
                             f"{self.label.shape}")

    @property
    def present(self) -> list[int]:
        """Labels (>= 1) that occur in the atlas patch."""
        values = np.unique(self.label)
        return [int(v) for v in values if v >= 1]

    def mask(self, classes: Iterable[int]) -> np.ndarray:
        """Binary float32 mask of the union of ``classes`` in the atlas label map."""
        return np.isin(self.label, np.asarray(list(classes), dtype=np.int64)).astype(np.float32)

    def condition(self, class_sets: Sequence[Iterable[int]]) -> np.ndarray:
        """Conditioning array (N, 2, *P): atlas image and binary atlas mask for each class set."""
        out = np.empty((len(class_sets), 2) + self.image.shape, dtype=np.float32)
        out[:, 0] = self.image
        for i, classes in enumerate(class_sets):
            out[i, 1] = self.mask(classes)
        return out

    def with_labels(self, label: np.ndarray, spec: str = "") -> "Atlas":
        """The same atlas image with another label map on it (e.g. finer labels).

        ``label`` may have the shape of the atlas patch (volume or network axes) or of the whole
        atlas volume, in which case the patch is cropped at the stored offset.
        """
        label = np.asarray(label)
        if not np.issubdtype(label.dtype, np.integer):
            raise InputError(f"atlas labels must be integers, found {label.dtype}", source=spec or None)
        shape = tuple(label.shape)
        if shape == self.source_shape:
            label = label[_region(self.offset, self.patch_shape)]
        elif shape not in (self.patch_shape, self.image.shape):
            raise InputError(f"atlas labels have shape {shape}, which matches neither the atlas patch "
                             f"{self.patch_shape} nor the atlas volume {self.source_shape}", source=spec or None)
        return replace(self, label=label.reshape(self.image.shape).astype(np.int64), label_spec=spec)

    def to_state(self) -> dict[str, Any]:
        """Checkpoint entries: tensors plus plain metadata (``torch.load(weights_only=True)`` safe)."""
        return {
            "atlas_image": torch.from_numpy(np.ascontiguousarray(self.image, dtype=np.float32)),
            "atlas_label": torch.from_numpy(np.ascontiguousarray(self.label, dtype=np.int64)),
            "atlas": {
                "patch_shape": [int(p) for p in self.patch_shape],
                "offset": [int(o) for o in self.offset],
                "source_shape": [int(s) for s in self.source_shape],
                "raw_spec": self.raw_spec, "label_spec": self.label_spec,
                "image_sha256": array_sha256(self.image.astype(np.float32)),
                "label_sha256": array_sha256(self.label.astype(np.int64)),
            },
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], source: str = "checkpoint") -> "Atlas":
        """Rebuild the atlas stored by :meth:`to_state`, checking its recorded SHA-256."""
        try:
            meta = state["atlas"]
            image = state["atlas_image"].cpu().numpy().astype(np.float32)
            label = state["atlas_label"].cpu().numpy().astype(np.int64)
        except (KeyError, AttributeError):
            raise InputError("no atlas in this checkpoint", source=source) from None
        if array_sha256(image) != meta["image_sha256"] or array_sha256(label) != meta["label_sha256"]:
            raise InputError("the atlas stored in this checkpoint does not match its recorded sha256",
                             source=source)
        return cls(image, label, tuple(meta["patch_shape"]), tuple(meta["offset"]), tuple(meta["source_shape"]),
                   meta.get("raw_spec", ""), meta.get("label_spec", ""))


def _region(offset: Sequence[int], patch: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(int(o), int(o) + int(p)) for o, p in zip(offset, patch))


def _window_starts(size: int, patch: int, stride: int) -> np.ndarray:
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return np.asarray(starts, dtype=np.int64)


def window_counts(label: np.ndarray, patch_shape: Sequence[int], value: int,
                  starts: Sequence[np.ndarray]) -> np.ndarray:
    """Voxels equal to ``value`` in every window of ``patch_shape`` starting at the grid ``starts``.

    Uses an integral image (summed-area table), so the cost does not depend on the window size.
    Returns an int64 array of shape ``tuple(len(s) for s in starts)``.

    Examples
    --------
    >>> window_counts(np.eye(4, dtype=int), (2, 2), 1, [np.array([0, 2]), np.array([0, 1, 2])]).tolist()
    [[2, 1, 0], [0, 1, 2]]
    """
    table = (np.asarray(label) == value).astype(np.int32)
    for axis in range(table.ndim):
        table = np.cumsum(table, axis=axis, dtype=np.int64 if table.size >= 2**31 else np.int32)
    table = np.pad(table, [(1, 0)] * table.ndim)
    total = np.zeros(tuple(len(s) for s in starts), dtype=np.int64)
    for corner in itertools.product((0, 1), repeat=table.ndim):
        index = np.ix_(*[s + c * int(p) for s, c, p in zip(starts, corner, patch_shape)])
        sign = -1 if (table.ndim - sum(corner)) % 2 else 1
        total += sign * table[index].astype(np.int64)
    return total


def choose_offset(label: np.ndarray, patch_shape: Sequence[int], classes: Sequence[int]) -> tuple[int, ...]:
    """Offset of the patch-sized window of ``label`` that best shows ``classes``.

    Windows on a grid of half-patch strides (the last one flush with the border; coarser when
    there would be more than ``MAX_CANDIDATES``) are scored by the number of ``classes`` present,
    then by the voxel count of the rarest one; ties go to the window nearest the centre (L1), then
    to the first in C order.

    Examples
    --------
    >>> lab = np.zeros((8, 8), dtype=int); lab[6, 6] = 1; lab[7, 7] = 2
    >>> choose_offset(lab, (4, 4), [1, 2])
    (4, 4)
    """
    label = np.asarray(label)
    shape = tuple(label.shape)
    patch = tuple(int(p) for p in patch_shape)
    classes = sorted(set(int(c) for c in classes))
    strides = [max(1, p // 2) for p in patch]
    while True:
        starts = [_window_starts(s, p, st) for s, p, st in zip(shape, patch, strides)]
        if int(np.prod([len(a) for a in starts])) <= MAX_CANDIDATES:
            break
        strides = [st * 2 for st in strides]
    grid = tuple(len(a) for a in starts)
    if classes:
        counts = np.stack([window_counts(label, patch, c, starts) for c in classes])
        present = np.count_nonzero(counts, axis=0)
        rarest = counts.min(axis=0)
    else:
        present = rarest = np.zeros(grid, dtype=np.int64)
    centre = [(s - p) / 2 for s, p in zip(shape, patch)]
    dist = np.zeros(grid)
    for axis, (a, c) in enumerate(zip(starts, centre)):
        dist = dist + np.abs(a - c).reshape([-1 if i == axis else 1 for i in range(len(grid))])
    # lexsort: last key is primary; among equal keys the earliest flat (C-order) index wins
    order = np.lexsort((np.arange(dist.size), dist.ravel(), -rarest.ravel(), -present.ravel()))
    best = np.unravel_index(order[0], grid)
    return tuple(int(a[i]) for a, i in zip(starts, best))


def load_atlas(
    raw_spec: str,
    label_spec: str,
    patch_shape: Sequence[int],
    *,
    offset: Sequence[int] | None = None,
    classes: Sequence[int] = (),
    squeeze: bool = False,
) -> Atlas:
    """Crop the atlas patch from an atlas volume (image + integer labels).

    Parameters
    ----------
    raw_spec, label_spec : str
        Atlas image and label volumes (``FILE.h5:DATASET`` / ``FILE.zarr/ARRAY``), same shape.
    patch_shape : sequence of int
        The training patch in volume axes; the atlas patch has exactly this shape (crop, no resize).
    offset : sequence of int, optional
        Corner of the crop; default: the window chosen by :func:`choose_offset` for ``classes``.
    classes : sequence of int
        Classes that must all occur in the atlas patch.
    squeeze : bool
        Drop a leading patch axis of 1 (2D network on a 3D atlas volume).

    Examples
    --------
    >>> atlas = load_atlas("atlas.h5:raw", "atlas.h5:label", (1, 128, 128), classes=[1, 2],
    ...                    squeeze=True)  # doctest: +SKIP
    """
    patch = tuple(int(p) for p in patch_shape)
    with open_volume(raw_spec) as raw, open_volume(label_spec) as lab:
        check_raw(raw)
        src = str(lab.spec)
        if raw.shape != lab.shape:
            raise InputError(f"atlas label shape {lab.shape} differs from atlas image {raw.spec} shape {raw.shape}",
                             source=src)
        if not np.issubdtype(lab.dtype, np.integer):
            raise InputError(f"atlas labels must be integers, found {lab.dtype}", source=src)
        shape = raw.shape
        if len(shape) != len(patch):
            raise InputError(f"atlas volume {shape} and patch {patch} have different numbers of axes", source=src)
        if any(p > s for p, s in zip(patch, shape)):
            raise InputError(f"atlas volume {shape} is smaller than the patch {patch} (the atlas is cropped, "
                             f"not resized)", source=src)
        if offset is None:
            size = int(np.prod(shape))
            if size > MAX_SEARCH_VOXELS:
                raise InputError(f"atlas volume of {size} voxels is too large to search for a patch: set "
                                 f"[lcs] atlas_offset", source=src)
            start = choose_offset(np.asarray(lab[...]), patch, classes)
        else:
            start = tuple(int(o) for o in offset)
            if len(start) != len(patch) or any(o < 0 or o + p > s for o, p, s in zip(start, patch, shape)):
                raise InputError(f"atlas_offset {list(start)} with patch {patch} does not fit the atlas volume "
                                 f"{shape}", source=src)
        region = _region(start, patch)
        image = to_float(raw[region], raw.dtype)
        label = np.asarray(lab[region]).astype(np.int64)
        raw_name, label_name = str(raw.spec), src
    if squeeze:
        image, label = image[0], label[0]
    missing = [int(c) for c in classes if not np.any(label == c)]
    if missing:
        raise InputError(f"class(es) {', '.join(map(str, missing))} do not occur in the atlas patch at offset "
                         f"{list(start)}: choose another [lcs] atlas_offset", source=label_name)
    return Atlas(image, label, patch, start, tuple(shape), raw_name, label_name)
