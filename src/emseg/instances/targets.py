"""Training targets for ``emseg segment``: objects as classes, with the boundaries between them.

A semantic network trained on foreground alone cannot separate objects that touch. The targets
made here add a boundary class: 0 background, 1 object interior, 2 object boundary, and -1
(ignore) kept where the labels have it. They are ordinary class labels, so ``emseg train`` (lazy
labels included) takes them as they are, and ``emseg segment --mode watershed
--boundary-classes 2`` floods the interiors between the boundaries of the trained network.

Sources (docs/instances.md, "Training targets"):

- ``instances``: ids, 0 background, -1 ignore. A voxel of object ``a`` is a boundary voxel when a
  voxel within ``width`` of it (the box of side ``2 width + 1``: Chebyshev distance, in-plane
  with ``per_section``) holds another id, an object or background. Every object therefore
  has a boundary on each side of a contact, and the interiors of two objects are at least
  ``2 width + 1`` voxels apart. ``-1`` voxels and the outside of the volume count as no id.
- ``classes`` with ``classes``: the objects are the connected components (face neighbours)
  of the voxels whose class is in ``classes``, then as above.
- ``classes`` with ``enclosed_by``: the voxels of the boundary classes become class 2, every
  other voxel (not -1) class 1, the interior of the region (cell) it belongs to; regions that
  touch the volume border are class 1 too. ``width`` > 1 grows the boundary by ``width - 1``
  voxels into the regions.

Memory: with ``per_section`` the file core reads and writes a few sections at a time (the depth
of one output chunk); in 3D it holds the whole volume.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

from emseg.errors import InputError
from emseg.io import auto_chunks, check_distinct, check_output_volume, check_overwrite, create_volume, open_volume

__all__ = ["BACKGROUND", "BOUNDARY", "INTERIOR", "SOURCES", "TargetsConfig", "TargetsResult", "boundary_targets",
           "make_targets"]

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2
SOURCES = ("instances", "classes")
#: The classes of a target volume, by index.
CLASS_NAMES = ("background", "interior", "boundary")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TargetsConfig:
    """How class targets are made from labels (see the module docstring)."""

    labels: str | None = None
    output: str | None = None
    source: str = "instances"
    classes: tuple[int, ...] = ()
    enclosed_by: tuple[int, ...] = ()
    width: int = 1
    per_section: bool = True
    overwrite: bool = False

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
        object.__setattr__(self, "enclosed_by", tuple(int(c) for c in self.enclosed_by))
        if self.source not in SOURCES:
            raise InputError(f"`source` must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if isinstance(self.width, bool) or int(self.width) != self.width or self.width < 1:
            raise InputError(f"`width` must be an integer >= 1, got {self.width}")
        for name in ("classes", "enclosed_by"):
            negative = [c for c in getattr(self, name) if c < 0]
            if negative:
                raise InputError(f"`{name}` must be class ids >= 0, got {negative[0]}")
        if self.source == "instances" and (self.classes or self.enclosed_by):
            raise InputError("`classes` and `enclosed_by` apply to class labels, not to instance ids")
        if self.source == "classes" and bool(self.classes) == bool(self.enclosed_by):
            raise InputError("class labels need either `classes` (object classes) or `enclosed_by` "
                             "(boundary classes), not both")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                if k not in ("labels", "output", "overwrite")}


@dataclass
class TargetsResult:
    """What :func:`make_targets` wrote."""

    output: str
    shape: tuple[int, ...]
    dtype: str
    n_objects: int
    counts: dict[str, int]
    seconds: float
    config: TargetsConfig = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "shape": list(self.shape), "dtype": self.dtype, "n_classes": 3,
                "classes": list(CLASS_NAMES), "n_objects": self.n_objects, "counts": dict(self.counts),
                "seconds": self.seconds, "config": self.config.to_dict()}


# --------------------------------------------------------------------------- arrays


def _box(ndim: int, width: int, per_section: bool) -> tuple[int, ...]:
    """The neighbourhood box: side 2 width + 1, one voxel along the first axis per section."""
    side = 2 * width + 1
    if per_section and ndim == 3:
        return (1, side, side)
    return (side,) * ndim


def _structure(ndim: int, per_section: bool) -> np.ndarray:
    """Face neighbours, in-plane only per section."""
    structure = ndimage.generate_binary_structure(ndim, 1)
    if per_section and ndim == 3:
        structure[0] = structure[2] = False
    return structure


def _components(mask: np.ndarray, per_section: bool) -> tuple[np.ndarray, int]:
    """Connected components of ``mask`` (face neighbours, in-plane per section) and their count."""
    ids, n = ndimage.label(mask, structure=_structure(mask.ndim, per_section))
    return ids, int(n)


def _instance_boundaries(ids: np.ndarray, width: int, per_section: bool) -> np.ndarray:
    """Classes 0/1/2 (and -1) from ids, -1 voxels ignored as neighbours.

    A grey dilation (maximum filter) and a grey erosion (minimum filter) over the box compare each
    voxel with every id within ``width``: an object voxel whose box holds a larger or a smaller id
    is a boundary voxel. The filters are separable, so the cost does not grow with the box's
    volume. Outside the volume the edge is repeated (``nearest``), which adds no new id.
    """
    if np.issubdtype(ids.dtype, np.signedinteger):
        ids = ids.astype(np.int64, copy=False)
        ignore = ids == -1
        top = np.iinfo(np.int64).max
        high = np.where(ignore, top, ids)  # an ignored voxel never lowers the minimum
    else:
        ids = ids.astype(np.uint64, copy=False)
        ignore = None
        high = ids
    box = _box(ids.ndim, width, per_section)
    larger = ndimage.maximum_filter(ids, size=box, mode="nearest") > ids  # -1 never raises the maximum
    smaller = ndimage.minimum_filter(high, size=box, mode="nearest") < ids
    out = np.zeros(ids.shape, np.int8)
    objects = ids > 0
    out[objects] = INTERIOR
    out[objects & (larger | smaller)] = BOUNDARY
    if ignore is not None:
        out[ignore] = -1
    return out


def _enclosed(labels: np.ndarray, enclosed_by: Sequence[int], width: int, per_section: bool) -> np.ndarray:
    labels = labels.astype(np.int64, copy=False)
    boundary = np.isin(labels, enclosed_by)
    if width > 1:
        grown = ndimage.maximum_filter(boundary, size=_box(labels.ndim, width - 1, per_section), mode="nearest")
        boundary = grown & (labels != -1)
    out = np.full(labels.shape, INTERIOR, np.int8)
    out[boundary] = BOUNDARY
    out[labels == -1] = -1
    return out


def check_labels(block: np.ndarray, source: str, where: str | None = None) -> None:
    """Integer labels with no value below -1 (instance ids and classes alike)."""
    if not np.issubdtype(block.dtype, np.integer):
        raise InputError(f"labels must be integers, found {block.dtype}", source=where)
    if np.issubdtype(block.dtype, np.signedinteger) and block.size and int(block.min()) < -1:
        kind = "ids" if source == "instances" else "classes"
        raise InputError(f"label value {int(block.min())}: {kind} must be >= 0, or -1 to ignore", source=where)


def save_instance_labels(ids: np.ndarray, output: str, *, attrs: dict[str, Any] | None = None,
                         overwrite: bool = False) -> str:
    """Write instance ids held in memory (a corrected ``emseg segment`` output, say) as an instance-label
    volume that ``emseg targets`` reads: uint64, or int64 when -1 marks voxels to ignore.

    ``attrs`` are recorded beside ``output_type = "instance_labels"`` (a ``voxel_size_nm`` among them
    is kept as the volume's voxel size). Written under a temporary name and renamed; ids below -1 or
    not integers are an :class:`InputError` and nothing is written.
    """
    ids = np.asarray(ids)
    check_labels(ids, "instances", output)
    if ids.ndim not in (2, 3) or not ids.size:
        raise InputError(f"instance labels must be a non-empty 2D (y,x) or 3D (z,y,x) array, found {ids.shape}",
                         source=output)
    signed = np.issubdtype(ids.dtype, np.signedinteger) and int(ids.min()) < 0
    dtype = np.int64 if signed else np.uint64
    out_spec = check_output_volume(output)
    check_overwrite(out_spec, overwrite=overwrite)
    with create_volume(out_spec, ids.shape, dtype, chunks=auto_chunks(ids.shape, 8),
                       attrs={**(attrs or {}), "output_type": "instance_labels"}, overwrite=overwrite) as dest:
        dest[tuple(slice(None) for _ in ids.shape)] = ids.astype(dtype)
    return str(out_spec)


def _targets_and_count(labels: np.ndarray, config: TargetsConfig) -> tuple[np.ndarray, int]:
    """Targets of one array (a section per section, or the whole volume) and its count of components
    (``classes``) or regions (``enclosed_by``)."""
    if config.source == "instances":
        ids, n = labels, 0  # objects are counted by id over the whole volume by the caller
    elif config.classes:
        objects = np.isin(labels, config.classes)
        ids, n = _components(objects, config.per_section)
        ids = np.where(labels == -1, -1, ids) if np.issubdtype(labels.dtype, np.signedinteger) else ids
    else:
        regions = (labels != -1) & ~np.isin(labels, config.enclosed_by)
        _, n = _components(regions, config.per_section)
        return _enclosed(labels, config.enclosed_by, config.width, config.per_section), n
    return _instance_boundaries(ids, config.width, config.per_section), n


def boundary_targets(labels: np.ndarray, *, source: str = "instances", classes: Sequence[int] = (),
                     enclosed_by: Sequence[int] = (), width: int = 1, per_section: bool = True) -> np.ndarray:
    """Classes 0 background, 1 object interior, 2 object boundary (int8, -1 kept) from ``labels``.

    ``labels`` are instance ids (``source="instances"``: 0 background, -1 ignore) or classes
    (``source="classes"`` with the object ``classes``, or the boundary classes ``enclosed_by``),
    2D (y, x) or 3D (z, y, x). ``per_section`` looks for neighbours in-plane only (z is the first
    axis); ``width`` is the boundary's thickness inside each object.

    Examples
    --------
    >>> ids = np.array([[1, 1, 1, 2, 2, 2]] * 3)
    >>> boundary_targets(ids)[1]
    array([1, 1, 2, 2, 1, 1], dtype=int8)
    """
    config = TargetsConfig(source=source, classes=tuple(classes), enclosed_by=tuple(enclosed_by), width=width,
                           per_section=per_section)
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise InputError(f"labels must be 2D (y,x) or 3D (z,y,x), found {labels.ndim}D {labels.shape}")
    check_labels(labels, source)
    return _targets_and_count(labels, config)[0]


# --------------------------------------------------------------------------- volumes


def _scan(volume, source: str, where: str, step: int) -> bool:
    """Check every voxel, section slab by slab; whether -1 occurs."""
    check_labels(np.zeros(0, volume.dtype), source, where)
    if not np.issubdtype(volume.dtype, np.signedinteger):
        return False
    has_ignore = False
    for start in range(0, volume.shape[0], step):
        block = np.asarray(volume[start:start + step])
        check_labels(block, source, where)
        has_ignore = has_ignore or bool((block == -1).any())
    return has_ignore


def make_targets(config: TargetsConfig, *, progress: Progress | None = None) -> TargetsResult:
    """Write the targets of ``config.labels`` to ``config.output`` (``emseg targets``).

    The output is int8 when the labels hold -1, uint8 otherwise, with attributes recording the
    parameters and ``n_classes = 3``; it is written under a temporary name and renamed.
    """
    if not config.labels or not config.output:
        raise InputError("give the `labels` volume and the `output`")
    start = time.perf_counter()
    check_distinct(config.labels, config.output)
    out_spec = check_output_volume(config.output)
    check_overwrite(out_spec, overwrite=config.overwrite)
    with open_volume(config.labels) as volume:
        where = str(volume.spec)
        shape = tuple(int(s) for s in volume.shape)
        if len(shape) not in (2, 3) or any(s < 1 for s in shape):
            raise InputError(f"labels must be a non-empty 2D (y,x) or 3D (z,y,x) volume, found {shape}",
                             source=where)
        chunks = auto_chunks(shape, 1)
        sectioned = config.per_section and len(shape) == 3
        step = chunks[0] if sectioned else shape[0]
        has_ignore = _scan(volume, config.source, where, max(1, chunks[0]))
        dtype = np.int8 if has_ignore else np.uint8
        attrs = {"output_type": "labels", "n_classes": 3, "classes": json.dumps(list(CLASS_NAMES)),
                 "targets": json.dumps(config.to_dict(), sort_keys=True), "source": where}
        counts = np.zeros(4, np.int64)  # -1, 0, 1, 2
        n_objects = 0
        ids_seen = np.zeros(0, np.int64)
        with create_volume(out_spec, shape, dtype, chunks=chunks, attrs=attrs, overwrite=config.overwrite) as dest:
            for lo in range(0, shape[0], step):
                block = np.asarray(volume[lo:lo + step])
                if sectioned:
                    parts = [_targets_and_count(section, config) for section in block]
                    target = np.stack([p[0] for p in parts])
                    n_objects += sum(p[1] for p in parts)
                else:
                    target, n = _targets_and_count(block, config)
                    n_objects += n
                if config.source == "instances":
                    ids_seen = np.union1d(ids_seen, np.unique(block[block > 0]).astype(np.int64))
                counts += np.bincount(target.ravel().astype(np.int64) + 1, minlength=4)[:4]
                dest[lo:lo + len(block)] = target.astype(dtype)
                if progress is not None:
                    progress(min(lo + step, shape[0]), shape[0])
    if config.source == "instances":
        n_objects = int(ids_seen.size)  # objects by id, whichever sections they reach
    names = ("ignored",) + CLASS_NAMES
    return TargetsResult(str(out_spec), shape, np.dtype(dtype).name, n_objects,
                         {name: int(c) for name, c in zip(names, counts)}, time.perf_counter() - start, config)
