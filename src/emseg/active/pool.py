"""Candidate pools: patch-shaped boxes in unlabelled volumes (the first step of ``emseg query``).

A *pool* is a set of patch-shaped boxes in one or more unlabelled volumes: a regular grid
(default) or ``n`` random positions, minus the boxes that touch already-labelled voxels or
previously chosen boxes (:func:`build_pool`). :mod:`~emseg.active.scoring.stream` scores a pool,
:mod:`~emseg.active.selection.select` picks a batch from it and :mod:`~emseg.active.query` is the whole
pipeline on files.

Boxes are given in volume axes ``(z, y, x)`` (or ``(y, x)`` for 2D volumes) by their minimum
corner (``offset``) and ``shape``; a box covers ``offset[i] <= v[i] < offset[i] + shape[i]``.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from emseg.errors import InputError

__all__ = [
    "Box",
    "CandidatePool",
    "boxes_overlap",
    "build_pool",
    "grid_offsets",
    "labelled_in_boxes",
    "random_offsets",
]

# Voxels of a label volume read at once when testing candidates against labelled regions.
_LABEL_SLAB_VOXELS = 1 << 24


# ----------------------------------------------------------------------------- boxes
@dataclass(frozen=True)
class Box:
    """A patch-shaped box in volume ``volume`` (an index into the pool's volumes).

    Examples
    --------
    >>> Box(0, (2, 0, 64), (1, 64, 64)).slices()
    (slice(2, 3, None), slice(0, 64, None), slice(64, 128, None))
    """

    volume: int
    offset: tuple[int, ...]
    shape: tuple[int, ...]

    def slices(self) -> tuple[slice, ...]:
        """Numpy index of the box in its volume."""
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.shape))

    def overlaps(self, other: Box) -> bool:
        """Whether the two boxes share at least one voxel (same volume, all axes intersect)."""
        return self.volume == other.volume and all(
            a < b + t and b < a + s
            for a, s, b, t in zip(self.offset, self.shape, other.offset, other.shape)
        )

    def to_dict(self) -> dict[str, Any]:
        return {"volume_index": self.volume, "offset": list(self.offset), "shape": list(self.shape)}


def _check_patch(patch_shape: Sequence[int], volume_shape: Sequence[int], where: str) -> tuple[int, ...]:
    patch = tuple(int(p) for p in patch_shape)
    if len(patch) != len(volume_shape):
        raise InputError(f"patch {patch} has {len(patch)} axes, volume {tuple(volume_shape)} has "
                         f"{len(volume_shape)}", source=where)
    if any(p < 1 for p in patch):
        raise InputError(f"patch sides must be >= 1, got {patch}", source=where)
    if any(p > s for p, s in zip(patch, volume_shape)):
        raise InputError(f"patch {patch} is larger than the volume {tuple(volume_shape)}", source=where)
    return patch


def grid_offsets(
    volume_shape: Sequence[int], patch_shape: Sequence[int], stride: Sequence[int] | None = None
) -> np.ndarray:
    """Offsets of a regular grid of patches inside a volume.

    Parameters
    ----------
    volume_shape, patch_shape : sequence of int
        Shapes in the same axes.
    stride : sequence of int, optional
        Step between neighbouring patches; default the patch shape (non-overlapping tiling
        from the origin; a remainder at the far border smaller than a patch is not covered).

    Returns
    -------
    numpy.ndarray
        ``(M, ndim)`` int64 offsets in C order (last axis fastest).

    Examples
    --------
    >>> grid_offsets((1, 8, 8), (1, 4, 4)).tolist()
    [[0, 0, 0], [0, 0, 4], [0, 4, 0], [0, 4, 4]]
    """
    patch = _check_patch(patch_shape, volume_shape, "grid")
    stride = patch if stride is None else tuple(int(s) for s in stride)
    if len(stride) != len(patch) or any(s < 1 for s in stride):
        raise ValueError(f"stride must have {len(patch)} positive entries, got {stride}")
    axes = [np.arange(0, s - p + 1, st, dtype=np.int64) for s, p, st in zip(volume_shape, patch, stride)]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1).reshape(-1, len(patch))


def random_offsets(
    volume_shape: Sequence[int],
    patch_shape: Sequence[int],
    n: int,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """``n`` uniformly random patch offsets inside a volume (duplicates removed, order kept).

    Examples
    --------
    >>> random_offsets((4, 64, 64), (1, 32, 32), 5, rng=0).shape
    (5, 3)
    """
    patch = _check_patch(patch_shape, volume_shape, "random positions")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    gen = np.random.default_rng(rng)
    highs = np.array([s - p + 1 for s, p in zip(volume_shape, patch)], dtype=np.int64)
    offsets = gen.integers(0, highs, size=(int(n), len(patch)), dtype=np.int64)
    _, first = np.unique(offsets, axis=0, return_index=True)
    return offsets[np.sort(first)]


def boxes_overlap(
    offsets: np.ndarray,
    patch_shape: Sequence[int],
    box_offsets: np.ndarray,
    box_shapes: np.ndarray,
) -> np.ndarray:
    """For each patch at ``offsets`` (M, d), whether it overlaps any of the given boxes (K, d).

    Examples
    --------
    >>> boxes_overlap(np.array([[0, 0], [0, 8]]), (4, 4), np.array([[2, 2]]), np.array([[4, 4]]))
    array([ True, False])
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, len(patch_shape))
    box_offsets = np.asarray(box_offsets, dtype=np.int64).reshape(-1, len(patch_shape))
    box_shapes = np.asarray(box_shapes, dtype=np.int64).reshape(-1, len(patch_shape))
    out = np.zeros(len(offsets), dtype=bool)
    patch = np.asarray(patch_shape, dtype=np.int64)
    for b, s in zip(box_offsets, box_shapes):
        out |= np.all((offsets < b + s) & (b < offsets + patch), axis=1)
    return out


def labelled_in_boxes(label: Any, offsets: np.ndarray, patch_shape: Sequence[int]) -> np.ndarray:
    """For each patch at ``offsets``, whether it contains a labelled voxel (label >= 0).

    The label volume is read in slabs along its first axis; within a slab, box sums of the
    labelled mask come from a summed-area table, so any number of (overlapping) candidates
    costs one pass over the rows they touch.

    Parameters
    ----------
    label : array-like
        Label volume (numpy array, :class:`~emseg.io.Volume`, ...); -1 means unlabelled.
    offsets : numpy.ndarray
        ``(M, ndim)`` patch offsets.
    patch_shape : sequence of int

    Returns
    -------
    numpy.ndarray
        ``(M,)`` bool.

    Examples
    --------
    >>> lab = -np.ones((1, 8, 8), dtype=np.int16); lab[0, 5, 5] = 0
    >>> labelled_in_boxes(lab, np.array([[0, 0, 0], [0, 4, 4]]), (1, 4, 4)).tolist()
    [False, True]
    """
    patch = np.asarray(patch_shape, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, len(patch))
    out = np.zeros(len(offsets), dtype=bool)
    if len(offsets) == 0:
        return out
    shape = tuple(int(s) for s in label.shape)
    plane = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    max_rows = max(int(patch[0]), _LABEL_SLAB_VOXELS // max(plane, 1))
    order = np.argsort(offsets[:, 0], kind="stable")
    starts = offsets[order, 0]
    i = 0
    ndim = len(patch)
    corners = list(itertools.product((0, 1), repeat=ndim))
    while i < len(order):
        lo = int(starts[i])
        # all candidates whose rows fit into [lo, lo + max_rows)
        j = int(np.searchsorted(starts, lo + max_rows - int(patch[0]), side="right"))
        j = max(j, i + 1)
        hi = int(starts[j - 1]) + int(patch[0])
        mask = np.asarray(label[lo:hi]) >= 0
        sat = np.zeros(tuple(s + 1 for s in mask.shape), dtype=np.int32 if mask.size < 2**31 else np.int64)
        sat[(slice(1, None),) * ndim] = mask
        for ax in range(ndim):
            np.cumsum(sat, axis=ax, out=sat)
        idx = order[i:j]
        rel = offsets[idx] - np.array([lo] + [0] * (ndim - 1))
        total = np.zeros(len(idx), dtype=np.int64)
        for corner in corners:
            pos = rel + np.asarray(corner) * patch
            sign = -1 if (ndim - sum(corner)) % 2 else 1
            total += sign * sat[tuple(pos.T)]
        out[idx] = total > 0
        i = j
    return out


# ----------------------------------------------------------------------------- pool
@dataclass
class CandidatePool:
    """Patch-shaped candidate boxes over one or more volumes.

    Attributes
    ----------
    volume_shapes : list of tuple of int
        Shape of each volume.
    patch_shape : tuple of int
        Shape shared by all candidates (volume axes).
    volume_index : numpy.ndarray
        ``(N,)`` volume of each candidate.
    offsets : numpy.ndarray
        ``(N, ndim)`` minimum corner of each candidate.
    labelled : numpy.ndarray
        ``(N,)`` bool: candidates that are already labelled. They are scored (their embeddings
        serve as existing centres for core-set and hybrid selection) but never selected.
    names : list of str
        Name of each volume (e.g. its ``FILE.h5:DATASET`` spec), used in outputs.
    may_overlap : bool
        Whether candidates can overlap each other (random positions, or a stride below the
        patch); selection then skips candidates overlapping an earlier pick.
    n_excluded : int
        Candidate positions removed because they touched labelled voxels or excluded boxes.
    """

    volume_shapes: list[tuple[int, ...]]
    patch_shape: tuple[int, ...]
    volume_index: np.ndarray
    offsets: np.ndarray
    labelled: np.ndarray
    names: list[str] = field(default_factory=list)
    may_overlap: bool = False
    n_excluded: int = 0

    def __post_init__(self) -> None:
        if not self.names:
            self.names = [f"volume{i}" for i in range(len(self.volume_shapes))]

    def __len__(self) -> int:
        return int(len(self.offsets))

    @property
    def ndim(self) -> int:
        return len(self.patch_shape)

    def box(self, i: int) -> Box:
        """The box of candidate ``i``."""
        return Box(int(self.volume_index[i]), tuple(int(o) for o in self.offsets[i]), self.patch_shape)

    def free_indices(self) -> np.ndarray:
        """Indices of the candidates that may still be selected."""
        return np.flatnonzero(~self.labelled)

    def labelled_indices(self) -> np.ndarray:
        return np.flatnonzero(self.labelled)

    def overlapping(self, box: Box) -> np.ndarray:
        """``(N,)`` bool: candidates sharing a voxel with ``box``."""
        same = self.volume_index == box.volume
        return same & boxes_overlap(self.offsets, self.patch_shape, np.array([box.offset]),
                                    np.array([box.shape]))

    def with_labelled(self, indices: Sequence[int] | np.ndarray) -> CandidatePool:
        """A copy with ``indices`` marked labelled (the inputs are left unchanged)."""
        labelled = self.labelled.copy()
        labelled[np.asarray(indices, dtype=np.int64)] = True
        return CandidatePool(list(self.volume_shapes), self.patch_shape, self.volume_index,
                             self.offsets, labelled, list(self.names), self.may_overlap, self.n_excluded)


def _as_boxes(boxes: Sequence[Box | Mapping[str, Any]] | None) -> list[Box]:
    out = []
    for b in boxes or ():
        if isinstance(b, Box):
            out.append(b)
        else:
            out.append(Box(int(b["volume_index"]), tuple(int(v) for v in b["offset"]),
                           tuple(int(v) for v in b["shape"])))
    return out


def build_pool(
    volume_shapes: Sequence[Sequence[int]],
    patch_shape: Sequence[int],
    *,
    candidates: int | None = None,
    stride: Sequence[int] | None = None,
    rng: np.random.Generator | int | None = None,
    exclude_labels: Mapping[int, Sequence[Any]] | None = None,
    exclude_boxes: Sequence[Box | Mapping[str, Any]] | None = None,
    labelled_boxes: Sequence[Box | Mapping[str, Any]] | None = None,
    names: Sequence[str] | None = None,
) -> CandidatePool:
    """Candidate patches over the volumes, minus those touching labelled data.

    Parameters
    ----------
    volume_shapes : sequence of shapes
        One shape per unlabelled volume.
    patch_shape : sequence of int
        Candidate shape in volume axes (e.g. ``(1, 256, 256)``).
    candidates : int, optional
        Draw this many random positions per pool (spread over the volumes in proportion to
        their number of positions); default a regular non-overlapping grid.
    stride : sequence of int, optional
        Grid step (default: the patch shape).
    rng : numpy.random.Generator or int or None
        Random source for random positions.
    exclude_labels : mapping volume index -> list of label arrays, optional
        Label volumes (training data) of the same shape as the volume; a candidate containing
        any voxel >= 0 is never selected: it stays in the pool as a labelled member, so that
        core-set and hybrid selection treat the training data as existing centres (Sener &
        Savarese), unless it also overlaps an excluded or labelled box.
    exclude_boxes : sequence of Box or dict, optional
        Boxes (e.g. earlier queries); candidates overlapping them are removed.
    labelled_boxes : sequence of Box or dict, optional
        Already-labelled boxes with the patch shape: added to the pool as labelled members
        (existing centres for core-set/hybrid) and candidates overlapping them are removed.
        Boxes of another shape are treated like ``exclude_boxes``.
    names : sequence of str, optional
        Volume names for the outputs.

    Returns
    -------
    CandidatePool

    Examples
    --------
    >>> pool = build_pool([(2, 64, 64)], (1, 32, 32))
    >>> len(pool)
    8
    """
    shapes = [tuple(int(s) for s in shape) for shape in volume_shapes]
    if not shapes:
        raise ValueError("no pool volumes")
    patch = tuple(int(p) for p in patch_shape)
    for i, shape in enumerate(shapes):
        _check_patch(patch, shape, names[i] if names else f"volume {i}")
    gen = np.random.default_rng(rng)
    per_volume: list[np.ndarray] = []
    if candidates is None:
        per_volume = [grid_offsets(shape, patch, stride) for shape in shapes]
        may_overlap = stride is not None and any(s < p for s, p in zip(stride, patch))
    else:
        if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1:
            raise ValueError(f"candidates must be a positive integer, got {candidates!r}")
        positions = np.array([np.prod([s - p + 1 for s, p in zip(shape, patch)]) for shape in shapes],
                             dtype=float)
        counts = gen.multinomial(int(candidates), positions / positions.sum())
        per_volume = [random_offsets(shape, patch, int(c), gen) for shape, c in zip(shapes, counts)]
        may_overlap = True
    volume_index = np.concatenate([np.full(len(o), i, dtype=np.int64) for i, o in enumerate(per_volume)])
    offsets = np.concatenate(per_volume, axis=0).astype(np.int64).reshape(-1, len(patch))
    keep = np.ones(len(offsets), dtype=bool)
    trained = np.zeros(len(offsets), dtype=bool)  # touches training labels: a labelled centre

    for vol, labels in (exclude_labels or {}).items():
        if not 0 <= int(vol) < len(shapes):
            raise ValueError(f"exclude_labels names volume {vol}, but there are {len(shapes)} volumes")
        for label in labels:
            if tuple(label.shape) != shapes[vol]:
                where = str(getattr(label, "spec", f"labels of volume {vol}"))
                raise InputError(f"label shape {tuple(label.shape)} differs from the pool volume shape "
                                 f"{shapes[vol]}", source=where)
            sel = np.flatnonzero(keep & (volume_index == vol))
            hit = sel[labelled_in_boxes(label, offsets[sel], patch)]
            keep[hit] = False
            trained[hit] = True

    exact: list[Box] = []
    blocking = _as_boxes(exclude_boxes)
    for b in _as_boxes(labelled_boxes):
        (exact if b.shape == patch else blocking).append(b)
    for b in blocking + exact:
        if not 0 <= b.volume < len(shapes) or len(b.offset) != len(patch):
            raise ValueError(f"box {b} does not fit the pool volumes")
        hit = (volume_index == b.volume) & boxes_overlap(offsets, patch, np.array([b.offset]),
                                                         np.array([b.shape]))
        keep &= ~hit
        trained &= ~hit
    n_excluded = int((~keep).sum())
    members = keep | trained
    volume_index, offsets = volume_index[members], offsets[members]
    labelled = trained[members]
    if exact:
        volume_index = np.concatenate([volume_index, [b.volume for b in exact]]).astype(np.int64)
        offsets = np.concatenate([offsets, np.array([b.offset for b in exact], dtype=np.int64)])
        labelled = np.concatenate([labelled, np.ones(len(exact), dtype=bool)])
    return CandidatePool(shapes, patch, volume_index, offsets, labelled,
                         list(names) if names else [], may_overlap, n_excluded)
