"""Candidate pools of patches, streaming scoring with a U-Net, and batch selection.

A *pool* is a set of patch-shaped boxes in one or more unlabelled volumes: a regular grid
(default) or ``n`` random positions, minus the boxes that touch already-labelled voxels or
previously chosen boxes. :func:`score_pool` runs the network over the pool batch by batch and
keeps only what the strategy needs: one score per patch ``(N,)`` and, for diversity strategies,
one pooled bottleneck embedding per patch ``(N, C_b)``. Nothing of shape ``(N, C, *P)`` or
``(T, ...)`` is ever held, so memory does not grow with the pool size nor with the number of
Monte-Carlo dropout passes ``T``. :func:`select` turns scores and embeddings into a ranked
selection, and :func:`query_files` is the whole ``emseg query`` pipeline on files.

Boxes are given in volume axes ``(z, y, x)`` (or ``(y, x)`` for 2D volumes) by their minimum
corner (``offset``) and ``shape``; a box covers ``offset[i] <= v[i] < offset[i] + shape[i]``.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from emseg.active.export import (
    QUERY_FORMAT,
    QUERY_FORMAT_VERSION,
    export_crops,
    napari_note,
    query_paths,
    write_queries,
)
from emseg.active.registry import Strategy, get_strategy
from emseg.active.scores import REDUCTIONS
from emseg.data.sampling import to_float
from emseg.errors import InputError
from emseg.models import fold_batchnorm, set_mc_dropout
from emseg.precision import Precision, resolve_precision

__all__ = [
    "Box",
    "CandidatePool",
    "PoolScores",
    "Query",
    "QueryConfig",
    "QueryResult",
    "boxes_overlap",
    "build_pool",
    "grid_offsets",
    "labelled_in_boxes",
    "query_files",
    "random_offsets",
    "rank_queries",
    "score_pool",
    "select",
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


# ----------------------------------------------------------------------------- scoring
@dataclass
class PoolScores:
    """What :func:`score_pool` keeps: per-patch scores and pooled embeddings.

    ``scores`` is ``(N,)`` float64 (NaN for candidates that were not scored, e.g. labelled
    ones for uncertainty strategies) or ``None``; ``embeddings`` is ``(N, C_b)`` float32 or
    ``None``. ``max_batch`` is the largest number of patches sent through the network at once.
    """

    strategy: str
    scores: np.ndarray | None
    embeddings: np.ndarray | None
    reduction: str
    mc_samples: int | None
    forward_passes: int = 0
    max_batch: int = 0
    seconds: float = 0.0

    @property
    def patches_per_s(self) -> float:
        n = len(self.scores) if self.scores is not None else (
            len(self.embeddings) if self.embeddings is not None else 0)
        return n / self.seconds if self.seconds > 0 else float("nan")


def _network_patch(patch: tuple[int, ...], model_ndim: int) -> bool:
    """Whether the leading patch axis is squeezed away (2D net on a 3D volume)."""
    if len(patch) == model_ndim:
        return False
    if len(patch) == model_ndim + 1 and patch[0] == 1:
        return True
    raise InputError(f"patch {patch} does not suit a {model_ndim}D network (a 2D net on a 3D volume "
                     "needs patch z = 1)")


def _has_dropout(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


#: Candidates per scoring chunk (one cluster task each with ``--scheduler``).
DEFAULT_CHUNK = 256


def score_chunks(todo: np.ndarray, chunk_size: int = DEFAULT_CHUNK) -> list[np.ndarray]:
    """``todo`` cut into consecutive chunks of ``chunk_size`` candidate indices.

    Examples
    --------
    >>> [c.tolist() for c in score_chunks(np.arange(5), 2)]
    [[0, 1], [2, 3], [4]]
    """
    return [todo[i:i + chunk_size] for i in range(0, len(todo), chunk_size)]


def chunk_seed(seed: int, index: int) -> int:
    """The torch seed of scoring chunk ``index`` of a run seeded ``seed`` (independent streams).

    Examples
    --------
    >>> chunk_seed(0, 1) == chunk_seed(0, 1) != chunk_seed(0, 2)
    True
    """
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint64)[0] >> 1)


def score_boxes(
    model: torch.nn.Module,
    boxes: Sequence[Box],
    sources: Sequence[Any],
    dtypes: Sequence[np.dtype],
    strategy: Strategy,
    *,
    mc_samples: int,
    reduction: str,
    batch_size: int,
    device: torch.device,
    squeeze: bool,
    seed: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    precision: str | Precision = "fp32",
    fold: bool = False,
) -> PoolScores:
    """Scores (``(len(boxes),)``) and/or pooled embeddings of the patches ``boxes``, batch by batch.

    The per-chunk worker of :func:`score_pool` (arguments already checked there). With ``seed``
    the MC-dropout passes draw from torch seeded with it (the global generator is forked, so the
    caller's state is left as it was). The module modes of ``model`` are restored afterwards.

    MC-dropout strategies run the network's deterministic part (:meth:`~emseg.models.UNet.encode`:
    the encoder and the bottleneck convolutions, where no dropout lives) once per batch and only
    the dropout-bearing rest (:meth:`~emseg.models.UNet.decode`) ``mc_samples`` times: the same
    dropout masks are drawn in the same order as with full passes, so the scores are the same.

    Examples
    --------
    >>> part = score_boxes(net, [pool.box(0)], [vol], [vol.dtype], get_strategy("entropy"),
    ...                    mc_samples=1, reduction="mean", batch_size=8, device=torch.device("cpu"),
    ...                    squeeze=True)  # doctest: +SKIP
    """
    strat = strategy
    m_total = len(boxes)
    result = PoolScores(strat.name, None, None, reduction, int(mc_samples) if strat.needs_mc_dropout else None)
    scores = np.full(m_total, np.nan, dtype=np.float64) if strat.needs_scores else None
    embeddings = None
    modes = {m: m.training for m in model.modules()}
    prec = resolve_precision(precision, device, ndim=int(getattr(model, "ndim", 2)))
    split = hasattr(model, "encode") and hasattr(model, "decode")
    if fold:  # a copy with batch norm folded into the convolutions: faster, equal up to rounding
        model = fold_batchnorm(model.eval())
    prec.prepare_model(model)
    fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if seed is not None \
        else contextlib.nullcontext()
    start = time.perf_counter()
    try:
        with torch.no_grad(), fork:
            if seed is not None:
                torch.manual_seed(seed)
            for b0 in range(0, m_total, batch_size):
                sel = slice(b0, min(b0 + batch_size, m_total))
                x = prec.prepare_input(_read_boxes(boxes[sel], sources, dtypes, squeeze).to(device))
                result.max_batch = max(result.max_batch, len(x))
                deterministic = strat.needs_embeddings or not strat.needs_mc_dropout
                if deterministic:
                    model.eval()
                    with prec.autocast():
                        out = model(x, return_embedding=True) if strat.needs_embeddings else model(x)
                    result.forward_passes += 1
                    logits, emb = out if strat.needs_embeddings else (out, None)
                    if emb is not None:
                        pooled = emb.float().mean(dim=tuple(range(2, emb.ndim))).cpu().numpy()
                        if embeddings is None:
                            embeddings = np.zeros((m_total, pooled.shape[1]), dtype=np.float32)
                        embeddings[sel] = pooled
                    if strat.needs_scores and not strat.needs_mc_dropout:
                        s = strat.score_fn(_probabilities(logits), reduction)
                        scores[sel] = s.double().cpu().numpy()
                    del out, logits, emb
                if strat.needs_scores and strat.needs_mc_dropout:
                    set_mc_dropout(model, True)
                    if split:
                        with prec.autocast():
                            encoded = model.encode(x)

                    def passes(x=x) -> Iterator[torch.Tensor]:
                        for _ in range(int(mc_samples)):
                            result.forward_passes += 1
                            with prec.autocast():
                                logits = model.decode(*encoded)[0] if split else model(x)
                            yield _probabilities(logits)

                    s = strat.score_fn(passes(), reduction)
                    scores[sel] = s.double().cpu().numpy()
                    encoded = None
                if on_batch is not None:
                    on_batch(sel.stop)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    result.scores = scores
    result.embeddings = embeddings
    result.seconds = time.perf_counter() - start
    return result


def _read_boxes(boxes: Sequence[Box], sources: Sequence[Any], dtypes: Sequence[np.dtype],
                squeeze: bool) -> torch.Tensor:
    patches = []
    for box in boxes:
        block = to_float(np.asarray(sources[box.volume][box.slices()]), dtypes[box.volume])
        patches.append(block[0] if squeeze else block)
    return torch.from_numpy(np.stack(patches)[:, None])


def score_pool(
    model: torch.nn.Module,
    pool: CandidatePool,
    sources: Sequence[Any],
    strategy: str | Strategy,
    *,
    mc_samples: int = 10,
    reduction: str = "mean",
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    raw_dtypes: Sequence[Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    seed: int | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    precision: str | Precision = "fp32",
    fold: bool = False,
) -> PoolScores:
    """Score the pool with ``model``, streaming batch by batch.

    Each patch goes through the network in one forward pass of the whole patch. Uncertainty
    strategies keep one score per patch; MC-dropout strategies (BALD) run ``mc_samples`` passes
    per batch with only dropout sampling (:func:`~emseg.models.set_mc_dropout`; BatchNorm uses
    its running statistics) and fold them into a running accumulator, so memory is bounded by
    one batch whatever ``T``; diversity strategies keep the bottleneck features
    (``model(x, return_embedding=True)[1]``) averaged over space, ``(C_b,)`` per patch.
    Uncertainty scores are computed for free candidates only unless the strategy also needs
    embeddings (hybrid), whose labelled members serve as centres. The module modes of
    ``model`` are restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        A U-Net (:class:`~emseg.models.UNet`) already on ``device``.
    pool : CandidatePool
    sources : sequence of array-like
        Raw volumes, one per pool volume (sliceable; integers are scaled by
        :func:`~emseg.data.to_float`).
    strategy : str or Strategy
    mc_samples : int
        Dropout passes ``T`` for MC-dropout strategies (default 10).
    reduction : {"mean", "sum"}
        Reduction of pixel-wise scores over the patch.
    batch_size : int
        Patches per forward pass.
    device : str or torch.device
    raw_dtypes : sequence of dtype, optional
        Dtype used to scale each source (default ``source.dtype``).
    progress : callable, optional
        ``progress(done, total)`` after each batch.
    seed : int, optional
        MC-dropout strategies: the candidates are scored in chunks of ``chunk_size`` (batches
        within a chunk), and chunk ``k`` seeds torch with :func:`chunk_seed` ``(seed, k)``, so the
        scores do not depend on what ran before, nor on where a chunk runs
        (:func:`score_pool_on_cluster` gives the same result). ``None`` draws from torch's
        current global state.
    chunk_size : int
        Candidates per chunk (a multiple of ``batch_size`` keeps the batches of an unchunked run).
    precision : {"fp32", "bf16", "auto"} or Precision
        Network arithmetic (:mod:`emseg.precision`); scores are computed in float32 either way.
    fold : bool
        Score with a copy of ``model`` whose batch norm is folded into the convolutions
        (:func:`~emseg.models.fold_batchnorm`): 2-3x faster on CPU, equal up to rounding.

    Returns
    -------
    PoolScores

    Examples
    --------
    >>> from emseg.models import UNet
    >>> net = UNet(ndim=2, out_channels=2, depth=1, base_width=2).eval()
    >>> vol = np.zeros((1, 8, 8), dtype=np.uint8)
    >>> pool = build_pool([vol.shape], (1, 4, 4))
    >>> score_pool(net, pool, [vol], "entropy").scores.shape
    (4,)
    """
    strat = get_strategy(strategy) if not isinstance(strategy, Strategy) else strategy
    if reduction not in REDUCTIONS or reduction == "none":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if len(sources) != len(pool.volume_shapes):
        raise ValueError(f"{len(sources)} sources for a pool over {len(pool.volume_shapes)} volumes")
    for i, (src, shape) in enumerate(zip(sources, pool.volume_shapes)):
        if tuple(src.shape) != tuple(shape):
            raise ValueError(f"source {i} has shape {tuple(src.shape)}, the pool expects {tuple(shape)}")
    if strat.needs_mc_dropout:
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, (int, np.integer)) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        if not _has_dropout(model):
            raise InputError(f"strategy {strat.name!r} samples dropout, but this network has no dropout "
                             "(train it with model.dropout > 0)")
    n = len(pool)
    result = PoolScores(strat.name, None, None, reduction,
                        int(mc_samples) if strat.needs_mc_dropout else None)
    if not (strat.needs_scores or strat.needs_embeddings) or n == 0:
        return result
    device = torch.device(device)
    squeeze = _network_patch(pool.patch_shape, int(getattr(model, "ndim", len(pool.patch_shape))))
    dtypes = [np.dtype(d) for d in raw_dtypes] if raw_dtypes is not None else [
        np.dtype(s.dtype) for s in sources]
    todo = np.arange(n) if strat.needs_embeddings else pool.free_indices()
    scores = np.full(n, np.nan, dtype=np.float64) if strat.needs_scores else None
    embeddings = None
    start = time.perf_counter()
    done = 0
    for k, idx in enumerate(score_chunks(todo, chunk_size)):
        boxes = [pool.box(int(i)) for i in idx]

        def on_batch(m: int, done: int = done) -> None:
            if progress is not None:
                progress(done + m, len(todo))

        part = score_boxes(model, boxes, sources, dtypes, strat, mc_samples=mc_samples, reduction=reduction,
                           batch_size=batch_size, device=device, squeeze=squeeze,
                           seed=None if seed is None else chunk_seed(seed, k), on_batch=on_batch,
                           precision=precision, fold=fold)
        if part.scores is not None:
            scores[idx] = part.scores
        if part.embeddings is not None:
            if embeddings is None:
                embeddings = np.zeros((n, part.embeddings.shape[1]), dtype=np.float32)
            embeddings[idx] = part.embeddings
        result.forward_passes += part.forward_passes
        result.max_batch = max(result.max_batch, part.max_batch)
        done += len(idx)
    result.scores = scores
    result.embeddings = embeddings
    result.seconds = time.perf_counter() - start
    return result


@dataclass(frozen=True)
class ScoreJob:
    """What a worker needs to score chunks of candidates (paths, no open handles)."""

    model: str
    model_mtime_ns: int
    model_size: int
    sources: tuple[str, ...]
    dtypes: tuple[str, ...]
    strategy: str
    mc_samples: int
    reduction: str
    batch_size: int
    squeeze: bool
    seed: int | None
    device: str = "auto"
    precision: str = "fp32"
    fold: bool = False


@dataclass(frozen=True)
class ScoreTask:
    """Chunk ``index``: the boxes of candidates ``indices``."""

    index: int
    indices: np.ndarray
    boxes: tuple[Box, ...]


#: One scoring task at a time per process: threads of one worker share the cached network (whose
#: modes are switched while scoring) and torch's global random generator (MC dropout).
_SCORE_LOCK = threading.Lock()


def score_task(task: ScoreTask, job: ScoreJob) -> PoolScores:
    """Worker side of :func:`score_pool_on_cluster`: score one chunk with the network cached per process.

    Examples
    --------
    >>> part = score_task(tasks[0], job)  # doctest: +SKIP
    """
    from emseg.checkpoint import cached_model
    from emseg.io import open_volume

    model, device = cached_model(job.model, job.device, mtime_ns=job.model_mtime_ns, size=job.model_size)
    with contextlib.ExitStack() as stack:
        sources = [stack.enter_context(open_volume(spec)) for spec in job.sources]
        with _SCORE_LOCK:
            return score_boxes(model, task.boxes, sources, [np.dtype(d) for d in job.dtypes],
                               get_strategy(job.strategy), mc_samples=job.mc_samples, reduction=job.reduction,
                               batch_size=job.batch_size, device=device, squeeze=job.squeeze,
                               seed=None if job.seed is None else chunk_seed(job.seed, task.index),
                               precision=job.precision, fold=job.fold)


def score_pool_on_cluster(
    model_path: str,
    pool: CandidatePool,
    sources: Sequence[str],
    strategy: str,
    *,
    mc_samples: int = 10,
    reduction: str = "mean",
    batch_size: int = 8,
    device: str = "auto",
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
    precision: str = "fp32",
    fold: bool = False,
    scheduler: str | None = None,
    workers: int | None = None,
    client: Any = None,
    retries: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> PoolScores:
    """:func:`score_pool` as tasks of a dask.distributed cluster, one per chunk of candidates.

    Each task loads the network once per worker (:func:`emseg.checkpoint.cached_model`), reads
    its patches from the volume specs ``sources`` and returns its scores and pooled embeddings,
    gathered here. Chunks, batches and MC-dropout seeds (:func:`chunk_seed`) are those of
    ``score_pool(..., seed=seed, chunk_size=chunk_size)``, so both give the same result (on the
    same hardware and thread count).

    Parameters
    ----------
    model_path : str
        Checkpoint, on a path every worker sees.
    pool : CandidatePool
    sources : sequence of str
        Volume specs (``FILE.h5:DATASET``, ``FILE.zarr/ARRAY``) of the pool volumes.
    strategy : str
        A strategy name (:data:`~emseg.active.registry.STRATEGIES`).
    mc_samples, reduction, batch_size, seed, chunk_size
        As in :func:`score_pool`.
    device : str
        Resolved on each worker.
    scheduler, workers, client, retries
        As in :func:`emseg.cluster.run_blocks`.
    progress : callable, optional
        ``progress(done, total)`` candidates after each chunk.

    Returns
    -------
    PoolScores

    Examples
    --------
    >>> scores = score_pool_on_cluster("best.pt", pool, ["stack.h5:raw"], "entropy",
    ...                                scheduler="local", workers=4)  # doctest: +SKIP
    """
    import os
    from pathlib import Path

    from emseg.cluster import run_blocks
    from emseg.io import open_volume, parse_spec

    strat = get_strategy(strategy)
    if reduction not in REDUCTIONS or reduction == "none":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size), ("mc_samples", mc_samples)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if len(sources) != len(pool.volume_shapes):
        raise ValueError(f"{len(sources)} sources for a pool over {len(pool.volume_shapes)} volumes")
    specs, dtypes = [], []
    for i, (spec, shape) in enumerate(zip(sources, pool.volume_shapes)):
        s = parse_spec(spec)
        s = type(s)(Path(s.path).resolve(), s.key, s.fmt)
        with open_volume(s) as vol:
            if tuple(vol.shape) != tuple(shape):
                raise ValueError(f"source {i} has shape {tuple(vol.shape)}, the pool expects {tuple(shape)}")
            dtypes.append(str(vol.dtype))
        specs.append(str(s))
    n = len(pool)
    result = PoolScores(strat.name, None, None, reduction, int(mc_samples) if strat.needs_mc_dropout else None)
    if not (strat.needs_scores or strat.needs_embeddings) or n == 0:
        return result
    from emseg.checkpoint import load_checkpoint

    path = Path(model_path).resolve()
    st = os.stat(path)
    model_ndim = int(load_checkpoint(path)["model_config"].get("ndim", len(pool.patch_shape)))
    job = ScoreJob(str(path), st.st_mtime_ns, st.st_size, tuple(specs), tuple(dtypes), strat.name, int(mc_samples),
                   reduction, int(batch_size), _network_patch(pool.patch_shape, model_ndim), int(seed), device,
                   str(precision), bool(fold))
    todo = np.arange(n) if strat.needs_embeddings else pool.free_indices()
    tasks = [ScoreTask(k, idx, tuple(pool.box(int(i)) for i in idx))
             for k, idx in enumerate(score_chunks(todo, chunk_size))]
    scores = np.full(n, np.nan, dtype=np.float64) if strat.needs_scores else None
    state: dict[str, Any] = {"embeddings": None, "done": 0}
    start = time.perf_counter()

    def on_done(task: ScoreTask, part: PoolScores) -> None:
        if part.scores is not None:
            scores[task.indices] = part.scores
        if part.embeddings is not None:
            if state["embeddings"] is None:
                state["embeddings"] = np.zeros((n, part.embeddings.shape[1]), dtype=np.float32)
            state["embeddings"][task.indices] = part.embeddings
        result.forward_passes += part.forward_passes
        result.max_batch = max(result.max_batch, part.max_batch)
        state["done"] += len(task.indices)
        if progress is not None:
            progress(state["done"], len(todo))

    run_blocks(functools.partial(score_task, job=job), tasks, scheduler=scheduler, workers=workers,
               client=client, retries=retries, on_done=on_done, fail_fast=True,
               failure_hint="no output was written; rerun to score again")
    result.scores = scores
    result.embeddings = state["embeddings"]
    result.seconds = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------- selection
def _take_non_overlapping(pool: CandidatePool, order: np.ndarray, n: int) -> np.ndarray:
    if not pool.may_overlap:
        return order[:n]
    picks: list[int] = []
    p = np.asarray(pool.patch_shape, dtype=np.int64)
    for i in order:
        if len(picks) == n:
            break
        if picks:
            chosen = np.asarray(picks)
            same = pool.volume_index[chosen] == pool.volume_index[i]
            o = pool.offsets[chosen]
            hit = same & np.all((o < pool.offsets[i] + p) & (pool.offsets[i] < o + p), axis=1)
            if hit.any():
                continue
        picks.append(int(i))
    return np.asarray(picks, dtype=np.int64)


def select(
    pool: CandidatePool,
    strategy: str | Strategy,
    n: int,
    *,
    scores: PoolScores | None = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Choose ``n`` free candidates of ``pool`` with ``strategy``; indices in pick order.

    Uncertainty strategies take the highest scores (ties: lower index); random takes a uniform
    random order; k-means clusters the free candidates' embeddings; core-set (k-center greedy)
    and hybrid treat the labelled candidates (earlier queries and the candidates touching
    training labels) as existing centres. When candidates can overlap (random positions, or a
    stride below the patch), every strategy skips a candidate that overlaps an earlier pick
    (core-set and hybrid rule the overlapping candidates out as they go; k-means serves each
    cluster by its nearest member that does not overlap an earlier pick), so fewer than ``n``
    may come back from a crowded pool.

    Parameters
    ----------
    pool : CandidatePool
    strategy : str or Strategy
    n : int
        Number of picks, at most the number of free candidates.
    scores : PoolScores, optional
        Output of :func:`score_pool` (required unless the strategy is ``random``).
    rng : numpy.random.Generator or int or None
        Random source (random order, k-means seeding, first core-set pick without labels).

    Returns
    -------
    numpy.ndarray
        int64 indices into the pool, best first.

    Examples
    --------
    >>> pool = build_pool([(1, 8, 8)], (1, 4, 4))
    >>> select(pool, "random", 2, rng=0).shape
    (2,)
    """
    strat = get_strategy(strategy) if not isinstance(strategy, Strategy) else strategy
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    free = pool.free_indices()
    if n > len(free):
        raise InputError(f"cannot select {n} patches: the pool has {len(free)} free candidates")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    gen = np.random.default_rng(rng)
    if strat.kind == "random":
        return _take_non_overlapping(pool, free[gen.permutation(len(free))], n)
    if scores is None:
        raise ValueError(f"strategy {strat.name!r} needs scores from score_pool()")
    if strat.needs_scores and (scores.scores is None or np.isnan(scores.scores[free]).any()):
        raise ValueError(f"strategy {strat.name!r} needs a score for every free candidate")
    if strat.needs_embeddings and scores.embeddings is None:
        raise ValueError(f"strategy {strat.name!r} needs embeddings from score_pool()")
    if strat.kind == "uncertainty":
        order = free[np.argsort(-scores.scores[free], kind="stable")]
        return _take_non_overlapping(pool, order, n)
    lab = pool.labelled_indices()
    emb = torch.from_numpy(scores.embeddings)
    params = inspect.signature(strat.select_fn).parameters
    conflicts = _overlap_conflicts(pool) if pool.may_overlap and "conflicts" in params else None
    if strat.kind == "hybrid":
        s = torch.from_numpy(np.nan_to_num(scores.scores, nan=-np.inf))
        picks = strat.select_fn(s, emb, n, labeled_idx=lab, **({"conflicts": conflicts} if conflicts else {}))
        return picks.cpu().numpy().astype(np.int64)
    if "labeled_idx" in params:  # core-set: labelled candidates are existing centres
        picks = strat.select_fn(emb, n, labeled_idx=lab, rng=gen if len(lab) == 0 else None,
                                **({"conflicts": conflicts} if conflicts else {}))
        return picks.cpu().numpy().astype(np.int64)
    local = None
    if conflicts is not None:  # k-means runs over the free candidates: map their indices
        to_local = np.full(len(pool), -1, dtype=np.int64)
        to_local[free] = np.arange(len(free))

        def local(i: int) -> np.ndarray:
            ruled = to_local[conflicts(int(free[i]))]
            return ruled[ruled >= 0]

    picks = strat.select_fn(emb[torch.from_numpy(free)], n, rng=gen,
                            **({"conflicts": local} if local is not None else {}))  # k-means over free ones
    return free[picks.cpu().numpy()]


def _overlap_conflicts(pool: CandidatePool) -> Callable[[int], np.ndarray]:
    """``conflicts(i)``: the candidates of ``pool`` sharing a voxel with candidate ``i``."""

    def conflicts(i: int) -> np.ndarray:
        return np.flatnonzero(pool.overlapping(pool.box(int(i))))

    return conflicts


# ----------------------------------------------------------------------------- queries
@dataclass(frozen=True)
class Query:
    """One ranked pick: ``rank`` 1 is the first choice."""

    rank: int
    volume: str
    box: Box
    score: float | None
    strategy: str

    def to_dict(self) -> dict[str, Any]:
        center = [o + (s - 1) / 2 for o, s in zip(self.box.offset, self.box.shape)]
        return {"rank": self.rank, "volume": self.volume, "volume_index": self.box.volume,
                "offset": list(self.box.offset), "shape": list(self.box.shape), "center": center,
                "score": self.score, "strategy": self.strategy}


def rank_queries(pool: CandidatePool, picks: np.ndarray, strategy: str,
                 scores: PoolScores | None = None) -> list[Query]:
    """Turn picked indices into ranked :class:`Query` records (score ``None`` when unscored)."""
    out = []
    for rank, i in enumerate(np.asarray(picks, dtype=np.int64), start=1):
        s = None
        if scores is not None and scores.scores is not None and math.isfinite(scores.scores[i]):
            s = float(scores.scores[i])
        box = pool.box(int(i))
        out.append(Query(rank, pool.names[box.volume], box, s, strategy))
    return out


@dataclass(frozen=True)
class QueryConfig:
    """Everything ``emseg query`` needs.

    ``exclude_labels`` maps a pool volume index to label volume specs; ``exclude_boxes`` holds
    boxes (dicts with ``volume`` spec or ``volume_index``, ``offset``, ``shape``) from earlier
    queries. ``out`` is the JSON path (the CSV goes beside it with the same stem); ``export``
    an optional HDF5 file for the crops. ``scheduler`` (``"local"`` or ``"tcp://HOST:PORT"``)
    scores the pool as cluster tasks (:func:`score_pool_on_cluster`), ``workers`` sizes a local one.
    """

    model: str
    pool: tuple[str, ...]
    strategy: str = "entropy"
    n: int = 20
    patch_shape: tuple[int, ...] | None = None
    candidates: int | None = None
    mc_samples: int = 10
    reduction: str = "mean"
    batch_size: int = 8
    exclude_labels: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    exclude_boxes: tuple[Mapping[str, Any], ...] = ()
    out: str | None = None
    export: str | None = None
    seed: int = 0
    device: str = "auto"
    #: ``auto | fp32 | bf16`` (see :mod:`emseg.precision`).
    precision: str = "auto"
    scheduler: str | None = None
    workers: int | None = None


@dataclass
class QueryResult:
    """The ranked queries and what produced them (``to_dict()`` is the JSON document)."""

    strategy: str
    model: str
    patch_shape: tuple[int, ...]
    volumes: list[str]
    volume_shapes: list[tuple[int, ...]]
    queries: list[Query]
    n_candidates: int
    n_excluded: int
    n_labelled: int
    reduction: str
    mc_samples: int | None
    seed: int
    ignored_boxes: int = 0
    seconds_scoring: float = 0.0
    seconds_total: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def axes(self) -> str:
        return "zyx"[-len(self.patch_shape):]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": QUERY_FORMAT, "version": QUERY_FORMAT_VERSION, "axes": self.axes,
            "convention": napari_note(self.axes),
            "strategy": self.strategy, "model": self.model, "patch_shape": list(self.patch_shape),
            "volumes": list(self.volumes), "volume_shapes": [list(s) for s in self.volume_shapes],
            "n_candidates": self.n_candidates, "n_excluded": self.n_excluded,
            "n_labelled": self.n_labelled, "ignored_boxes": self.ignored_boxes, "reduction": self.reduction, "mc_samples": self.mc_samples,
            "seed": self.seed, "seconds_scoring": round(self.seconds_scoring, 3),
            "seconds_total": round(self.seconds_total, 3), "outputs": dict(self.outputs),
            "queries": [q.to_dict() for q in self.queries],
        }


def _match_boxes(boxes: Sequence[Mapping[str, Any]], names: Sequence[str]) -> tuple[list[Box], int]:
    """Boxes of earlier queries mapped onto the current pool volumes (by volume name)."""
    index = {name: i for i, name in enumerate(names)}
    out, ignored = [], 0
    for b in boxes:
        vol = b.get("volume")
        i = index.get(str(vol)) if vol is not None else b.get("volume_index")
        if i is None or len(b["offset"]) != len(b["shape"]):
            ignored += 1
            continue
        out.append(Box(int(i), tuple(int(v) for v in b["offset"]), tuple(int(v) for v in b["shape"])))
    return out, ignored


def query_files(config: QueryConfig, *,
                progress: Callable[[int, int], None] | None = None) -> QueryResult:
    """The ``emseg query`` pipeline: load the model, build the pool, score, select, write.

    Writes ``config.out`` (JSON) and the CSV beside it atomically, and the crops to
    ``config.export`` when given.

    Examples
    --------
    >>> cfg = QueryConfig(model="run/best.pt", pool=("stack.h5:raw",), n=20,
    ...                   patch_shape=(1, 256, 256), out="queries.json")
    >>> result = query_files(cfg)  # doctest: +SKIP
    """
    from contextlib import ExitStack
    from pathlib import Path

    from emseg.checkpoint import load_model
    from emseg.device import resolve_device
    from emseg.io import check_output_location, check_raw, open_volume
    from emseg.inference import resolve_patch
    from emseg.training import check_divisible

    t0 = time.perf_counter()
    strat = get_strategy(config.strategy)
    if isinstance(config.n, bool) or config.n < 1:
        raise InputError(f"--n must be >= 1, got {config.n}")
    if not config.pool:
        raise InputError("no pool volume given")
    if config.workers is not None and config.scheduler != "local":
        raise InputError("--workers applies to --scheduler local only")
    if config.export:
        from emseg.io import parse_spec

        inputs = [parse_spec(s).path for s in config.pool]
        inputs += [parse_spec(s).path for specs in (config.exclude_labels or {}).values() for s in specs]
        export = Path(config.export).resolve()
        if any(export == p.resolve() for p in [*inputs, Path(config.model)]):
            raise InputError("--export would replace an input file; choose a new file", source=str(config.export))
    for target in (config.out, config.export):
        # Fail before any output is written, so a bad --out leaves no --export file behind.
        if target:
            check_output_location(Path(target))
    device = resolve_device(config.device)
    model, state = load_model(config.model, device)
    if state["model_config"].get("cond_channels"):
        raise InputError("this checkpoint is label-conditioned; query needs a plain segmentation network",
                         source=config.model)
    trained_patch = (state.get("config") or {}).get("patch_shape")
    with ExitStack() as stack:
        sources = []
        for spec in config.pool:
            vol = stack.enter_context(open_volume(spec))
            check_raw(vol)
            sources.append(vol)
        names = [str(v.spec) for v in sources]
        shapes = [v.shape for v in sources]
        if len({len(s) for s in shapes}) != 1:
            raise InputError("pool volumes must all be 2D or all 3D")
        patch = resolve_patch(config.patch_shape, trained_patch, shapes[0], model.ndim)
        check_divisible(patch, model.divisor, source="--patch")
        _network_patch(patch, model.ndim)
        labels: dict[int, list[Any]] = {}
        for vol_index, specs in config.exclude_labels.items():
            if not 0 <= int(vol_index) < len(sources):
                raise InputError(f"--exclude names pool volume {vol_index}, but there are {len(sources)}")
            for spec in specs:
                labels.setdefault(int(vol_index), []).append(stack.enter_context(open_volume(spec)))
        boxes, ignored = _match_boxes(config.exclude_boxes, names)
        pool = build_pool(shapes, patch, candidates=config.candidates, rng=config.seed,
                          exclude_labels=labels, labelled_boxes=boxes, names=names)
        if len(pool.free_indices()) == 0:
            raise InputError("no candidate patch left after exclusions")
        n = min(int(config.n), len(pool.free_indices()))
        if strat.needs_mc_dropout and not _has_dropout(model):
            raise InputError(f"strategy {strat.name!r} samples dropout, but this network has no dropout "
                             "(train it with model.dropout > 0)")
        if config.scheduler is not None:
            scores = score_pool_on_cluster(config.model, pool, [str(v.spec) for v in sources], strat.name,
                                           mc_samples=config.mc_samples, reduction=config.reduction,
                                           batch_size=config.batch_size, device=config.device, seed=config.seed,
                                           precision=config.precision, fold=True, scheduler=config.scheduler, workers=config.workers, progress=progress)
        else:
            scores = score_pool(model, pool, sources, strat, mc_samples=config.mc_samples,
                                reduction=config.reduction, batch_size=config.batch_size, device=device,
                                progress=progress, seed=config.seed, precision=config.precision, fold=True)
        picks = select(pool, strat, n, scores=scores, rng=config.seed)
        queries = rank_queries(pool, picks, strat.name, scores)
        result = QueryResult(
            strat.name, str(config.model), patch, names, [tuple(s) for s in shapes], queries,
            n_candidates=len(pool.free_indices()), n_excluded=pool.n_excluded,
            n_labelled=int(pool.labelled.sum()), reduction=config.reduction,
            mc_samples=scores.mc_samples, seed=config.seed, ignored_boxes=ignored,
            seconds_scoring=scores.seconds)
        if config.export:
            n_classes = int((state.get("config") or {}).get("n_classes") or
                            max(2, state["model_config"]["out_channels"]))
            export_crops(config.export, sources, queries, n_classes=n_classes)
            result.outputs["export"] = str(config.export)
        result.seconds_total = time.perf_counter() - t0
        if config.out:
            json_path, csv_path = query_paths(config.out)
            result.outputs["json"] = str(json_path)
            result.outputs["csv"] = str(csv_path)
            write_queries(result, config.out)
    return result
