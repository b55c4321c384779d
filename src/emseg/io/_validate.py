"""Input validation with one-line errors naming the file, the dataset and the problem."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from emseg.errors import InputError
from emseg.io._volume import Volume, VolumeSpec, open_volume, parse_spec

#: Voxels read at once while scanning a volume for validation.
_SCAN_VOXELS = 1 << 24


def _slabs(shape: Sequence[int]):
    """Slices along axis 0 covering the volume in slabs of about ``_SCAN_VOXELS`` voxels."""
    plane = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    step = max(1, _SCAN_VOXELS // max(1, plane))
    for start in range(0, shape[0], step):
        yield slice(start, min(start + step, shape[0]))


def read_info(label_spec: str | VolumeSpec, n_classes: int) -> np.ndarray:
    """Read the lazy-label ``info`` dataset that sits beside a label dataset.

    Returns a (2, n_classes) uint8 array: row 0 ``mask_class_labeled``, row 1
    ``mask_class_not_present``. When there is no ``info`` dataset every class is labelled and none
    is flagged not-present.
    """
    spec = parse_spec(label_spec)
    info_spec = spec.sibling("info")
    vol = open_volume(info_spec, allow_missing_key=True)
    if vol is None:
        info = np.zeros((2, n_classes), dtype=np.uint8)
        info[0] = 1
        return info
    with vol:
        data = vol[...]
    if data.shape != (2, n_classes):
        raise InputError(
            f"info must have shape (2, {n_classes}) (mask_class_labeled, mask_class_not_present), "
            f"found {data.shape}",
            source=str(info_spec),
        )
    if not np.all(np.isin(data, (0, 1))):
        raise InputError("info must contain only 0 and 1", source=str(info_spec))
    return data.astype(np.uint8)


def check_not_empty(volume, what: str = "volume") -> None:
    """Every side must be at least 1 (a 0-size volume has nothing to compute)."""
    shape = tuple(int(s) for s in volume.shape)
    if not shape or any(s < 1 for s in shape):
        raise InputError(f"{what} is empty (shape {shape})", source=str(getattr(volume, "spec", "") or what))


def check_raw(raw: Volume) -> None:
    """Raw must be 2D/3D, non-empty, numeric and finite."""
    src = str(raw.spec)
    if raw.ndim not in (2, 3):
        raise InputError(f"raw must be 2D (y,x) or 3D (z,y,x), found {raw.ndim}D {raw.shape}", source=src)
    check_not_empty(raw, "raw")
    if not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        raise InputError(f"raw must be numeric, found {raw.dtype}", source=src)
    if np.issubdtype(raw.dtype, np.floating):
        for sl in _slabs(raw.shape):
            block = raw[sl]
            if not np.all(np.isfinite(block)):
                bad = "NaN" if np.isnan(block).any() else "inf"
                z = sl.start + int(np.argwhere(~np.isfinite(block))[0][0])
                raise InputError(f"raw contains {bad} (first at index {z} of axis 0)", source=src)


def validate_labels(
    label: Volume,
    n_classes: int,
    *,
    raw: Volume | None = None,
    info: np.ndarray | None = None,
) -> np.ndarray:
    """Check a label volume against ``n_classes``, its raw volume and its ``info`` masks.

    Returns the per-class voxel counts (n_classes,) and raises :class:`InputError` for
    non-integer labels, values outside {-1, 0..n_classes-1}, a shape differing from ``raw``, or a
    class flagged not-present that occurs in the labels.
    """
    src = str(label.spec)
    if raw is not None and raw.shape != label.shape:
        raise InputError(f"label shape {label.shape} differs from raw {raw.spec} shape {raw.shape}", source=src)
    if not np.issubdtype(label.dtype, np.integer):
        raise InputError(f"labels must be integers, found {label.dtype}", source=src)
    counts = np.zeros(n_classes, dtype=np.int64)
    for sl in _slabs(label.shape):
        block = np.asarray(label[sl]).astype(np.int64, copy=False)
        bad = (block < -1) | (block >= n_classes)
        if bad.any():
            value = int(block[bad].flat[0])
            raise InputError(
                f"label value {value} outside {{-1, 0..{n_classes - 1}}} (n_classes={n_classes})",
                source=src,
            )
        counts += np.bincount(block[block >= 0].ravel(), minlength=n_classes)[:n_classes]
    if info is not None:
        check_not_present(info, counts, src)
    return counts


def check_not_present(info: np.ndarray, counts: np.ndarray, source: str) -> None:
    """A class flagged not present in ``info`` must have no voxels (``counts`` per class)."""
    clash = np.flatnonzero((info[1] == 1) & (counts > 0))
    if clash.size:
        k = int(clash[0])
        raise InputError(
            f"class {k} is marked not present in info but occurs in the labels ({counts[k]} voxels)",
            source=source,
        )


def check_patch_fits(patch_shape: Sequence[int], volume_shape: Sequence[int], source: str) -> None:
    """The patch must fit inside the volume along every axis."""
    if len(patch_shape) != len(volume_shape):
        raise InputError(
            f"patch {tuple(patch_shape)} has {len(patch_shape)} axes, volume {tuple(volume_shape)} has "
            f"{len(volume_shape)}",
            source=source,
        )
    if any(p > s for p, s in zip(patch_shape, volume_shape)):
        raise InputError(f"patch {tuple(patch_shape)} is larger than the volume {tuple(volume_shape)}", source=source)
