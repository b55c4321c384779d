"""Instance-segmentation metrics from one sparse contingency table (``emseg evaluate --instances``).

Both volumes hold integer instance ids: 0 is background, every positive id one object. In the
ground truth, -1 marks ignored voxels: they are dropped before anything is counted, so they belong
to no object of either volume and to no metric.

Everything is computed from a :class:`ContingencyTable`: the voxel count of every (gt id, pred id)
pair that occurs, background pairs included. The table is accumulated slab by slab
(:class:`ContingencyAccumulator`), so memory is one slab plus the table, never the volume.

* Variation of information, in bits: ``voi_split = H(pred | gt)`` and ``voi_merge = H(gt | pred)``
  on the voxels of ground-truth objects (gt > 0), predicted background counted as one more label.
  This is the CREMI convention (a split of a true object makes the prediction uncertain given the
  truth). ``skimage.metrics.variation_of_information(gt, pred, ignore_labels=(0,))`` returns the
  same two numbers in this order.
* Adapted Rand error on the same voxels, in scikit-image's form (pairs of distinct voxels):
  ``1 - 2 * sum n_ij (n_ij - 1) / (sum a_i (a_i - 1) + sum b_j (b_j - 1))`` with ``n_ij`` the
  pair counts, ``a_i`` the true object sizes and ``b_j`` the predicted label sizes inside true
  objects; precision divides the pairs together in both by those together in the prediction,
  recall by those together in the truth.
* Objects matched one to one by IoU: see :func:`matched_pairs`; precision, recall and F1 at IoU
  0.5 and 0.75, and ``ap``, the mean over IoU 0.50, 0.55, ..., 0.95 of ``TP / (TP + FP + FN)``.

A ratio whose denominator is zero is NaN (``null`` in JSON), never 0 or 1.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import numpy as np

from emseg.errors import InputError

if TYPE_CHECKING:
    from emseg.io import Volume

__all__ = [
    "IOU_THRESHOLDS",
    "ContingencyAccumulator",
    "ContingencyTable",
    "InstanceEvaluation",
    "InstanceScores",
    "evaluate_instances",
    "instance_scores",
    "matched_pairs",
]

#: The IoU thresholds of ``ap``: 0.50, 0.55, ..., 0.95 (each compared as the exact fraction k/20).
IOU_THRESHOLDS: tuple[float, ...] = tuple((10 + k) / 20 for k in range(10))

#: Voxels read per slab; a slab holds whole sections (at least one).
_SLAB_VOXELS = 1 << 24
#: Rows of slab tables collected before they are merged into the running table.
_MERGE_ROWS = 1 << 20
#: Ids below this bound pack two to a uint64 key.
_PACK = np.uint64(1 << 32)

_ArrayLike = Union["Volume", np.ndarray]


# --------------------------------------------------------------------------- the table


def _group_sum(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted distinct ``keys``, the sum of ``values`` per key and each entry's group index."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    first = np.ones(len(ordered), bool)
    first[1:] = ordered[1:] != ordered[:-1]
    starts = np.flatnonzero(first)
    sums = np.add.reduceat(values[order], starts) if len(starts) else values[:0].copy()
    inverse = np.empty(len(keys), np.intp)
    inverse[order] = np.cumsum(first) - 1
    return ordered[starts], sums, inverse


def _pair_keys(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], tuple]]:
    """One sortable key per (gt, pred) pair of uint64 ids, and the function that decodes keys.

    Keys sort as the pairs do (gt first). Ids below 2**32 pack into one uint64; larger ones are
    replaced by their ranks among the distinct ids first, which keeps every uint64 id exact.
    """
    if not len(gt) or (gt.max() < _PACK and pred.max() < _PACK):
        return (gt << np.uint64(32)) | pred, lambda k: (k >> np.uint64(32), k & np.uint64(0xFFFFFFFF))
    gt_ids, gt_rank = np.unique(gt, return_inverse=True)
    pred_ids, pred_rank = np.unique(pred, return_inverse=True)
    width = len(pred_ids)
    key = gt_rank.reshape(-1).astype(np.int64) * width + pred_rank.reshape(-1)
    return key, lambda k: (gt_ids[k // width], pred_ids[k % width])


@dataclass(frozen=True, eq=False)  # arrays: compare the fields with numpy
class ContingencyTable:
    """Voxel counts of the (gt id, pred id) pairs that occur, ignored voxels excluded.

    ``gt``, ``pred`` (uint64 ids, 0 = background) and ``count`` (int64) are aligned arrays, one
    row per distinct pair, sorted by ``(gt, pred)``.
    """

    gt: np.ndarray
    pred: np.ndarray
    count: np.ndarray

    @classmethod
    def empty(cls) -> "ContingencyTable":
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64))

    @classmethod
    def from_labels(cls, gt: np.ndarray, pred: np.ndarray, *, gt_name: str = "ground truth",
                    pred_name: str = "prediction") -> "ContingencyTable":
        """The table of two label arrays of one shape; -1 in ``gt`` is dropped.

        Raises :class:`InputError` (naming ``gt_name`` or ``pred_name``) for non-integer arrays,
        ids below -1 in the ground truth and negative ids in the prediction.
        """
        gt, pred = np.asarray(gt), np.asarray(pred)
        if gt.shape != pred.shape:
            raise InputError(f"shape {pred.shape} differs from the ground truth's {gt.shape}", source=pred_name)
        _check_ids(gt, gt_name, lowest=-1)
        _check_ids(pred, pred_name, lowest=0)
        gt, pred = gt.reshape(-1), pred.reshape(-1)
        if gt.dtype.kind == "i":
            kept = gt != -1
            if not kept.all():
                gt, pred = gt[kept], pred[kept]
        gt, pred = gt.astype(np.uint64, copy=False), pred.astype(np.uint64, copy=False)
        key, decode = _pair_keys(gt, pred)
        keys, counts = np.unique(key, return_counts=True)
        gt_ids, pred_ids = decode(keys)
        return cls(gt_ids.astype(np.uint64), pred_ids.astype(np.uint64), counts.astype(np.int64))

    @classmethod
    def merge(cls, tables: Sequence["ContingencyTable"]) -> "ContingencyTable":
        """One table whose counts are the sums of ``tables``' counts."""
        tables = [t for t in tables if len(t)]
        if not tables:
            return cls.empty()
        if len(tables) == 1:
            return tables[0]
        gt = np.concatenate([t.gt for t in tables])
        pred = np.concatenate([t.pred for t in tables])
        key, decode = _pair_keys(gt, pred)
        keys, counts, _ = _group_sum(key, np.concatenate([t.count for t in tables]))
        gt_ids, pred_ids = decode(keys)
        return cls(gt_ids.astype(np.uint64), pred_ids.astype(np.uint64), counts.astype(np.int64))

    def __len__(self) -> int:
        return len(self.count)

    @property
    def voxels(self) -> int:
        """The voxels counted (every voxel not ignored)."""
        return int(self.count.sum())


def _check_ids(labels: np.ndarray, name: str, *, lowest: int) -> None:
    if labels.dtype.kind not in "iu":
        raise InputError(f"instance ids must be integers, found {labels.dtype}", source=name)
    if labels.dtype.kind == "i" and labels.size and labels.min() < lowest:
        value = int(labels[labels < lowest].flat[0])
        allowed = "ids >= 0 and -1 = ignore" if lowest == -1 else "ids >= 0"
        raise InputError(f"negative instance id {value} (allowed: {allowed})", source=name)


class ContingencyAccumulator:
    """A :class:`ContingencyTable` summed block by block: ``add(gt, pred)``, then ``table()``.

    Slab tables are kept aside and merged into the running table once they hold as many rows as
    it does (or ``2**20``), so the cost stays linear in the rows added.
    """

    def __init__(self, *, gt_name: str = "ground truth", pred_name: str = "prediction"):
        self._names = {"gt_name": gt_name, "pred_name": pred_name}
        self._table = ContingencyTable.empty()
        self._parts: list[ContingencyTable] = []
        self._rows = 0

    def add(self, gt: np.ndarray, pred: np.ndarray) -> None:
        part = ContingencyTable.from_labels(gt, pred, **self._names)
        self._parts.append(part)
        self._rows += len(part)
        if self._rows > max(_MERGE_ROWS, len(self._table)):
            self._flush()

    def _flush(self) -> None:
        self._table = ContingencyTable.merge([self._table, *self._parts])
        self._parts, self._rows = [], 0

    def table(self) -> ContingencyTable:
        self._flush()
        return self._table


# --------------------------------------------------------------------------- objects and matching


def _fraction(threshold: float) -> Fraction:
    value = Fraction(threshold).limit_denominator(1000)
    if not Fraction(1, 2) <= value < 1:
        raise ValueError(f"IoU threshold must be in [0.5, 1), got {threshold}")
    return value


@dataclass(frozen=True)
class _Objects:
    """The objects of a table and the pairs that can match (IoU > 1/2)."""

    n_gt: int
    n_pred: int
    gt: np.ndarray  # candidate pairs: gt id, pred id, intersection, union
    pred: np.ndarray
    inter: np.ndarray
    union: np.ndarray

    @classmethod
    def of(cls, table: ContingencyTable) -> "_Objects":
        is_gt, is_pred = table.gt > 0, table.pred > 0
        gt_ids, gt_sizes, _ = _group_sum(table.gt[is_gt], table.count[is_gt])
        pred_ids, pred_sizes, _ = _group_sum(table.pred[is_pred], table.count[is_pred])
        both = is_gt & is_pred
        gt, pred, inter = table.gt[both], table.pred[both], table.count[both]
        union = gt_sizes[np.searchsorted(gt_ids, gt)] + pred_sizes[np.searchsorted(pred_ids, pred)] - inter
        above_half = 2 * inter > union
        return cls(len(gt_ids), len(pred_ids), gt[above_half], pred[above_half], inter[above_half], union[above_half])

    def matched(self, threshold: float) -> np.ndarray:
        """Mask of the candidate pairs whose IoU exceeds ``threshold``, compared exactly."""
        t = _fraction(threshold)
        inter, union = self.inter, self.union
        if len(union) and int(union.max()) * t.denominator >= 1 << 62:
            inter, union = inter.astype(object), union.astype(object)
        return np.asarray(inter * t.denominator > union * t.numerator, bool)


def matched_pairs(table: ContingencyTable, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The (gt ids, pred ids) of the objects matched one to one at IoU > ``threshold``.

    ``IoU = n_ij / (|g_i| + |p_j| - n_ij)``, with object sizes counted on the voxels that are not
    ignored (a predicted object's voxels on true background count, so a spill lowers its IoU).
    A pair with IoU > 1/2 overlaps each of its two objects in more than half their voxels, so
    each object is in at most one such pair: for any threshold >= 0.5 the pairs above the
    threshold already form the one-to-one matching, and it is the unique maximum matching (the
    Hungarian or greedy assignment would find the same pairs). The comparison is strict (a pair at
    exactly 0.5 is no match: with ``>=`` two halves of one object would both match it) and exact,
    on integers, with the threshold read as a fraction of denominator <= 1000.
    """
    objects = _Objects.of(table)
    keep = objects.matched(threshold)
    return objects.gt[keep], objects.pred[keep]


# --------------------------------------------------------------------------- scores


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


@dataclass(frozen=True)
class InstanceScores:
    """The instance metrics of one volume or section (see the module docstring)."""

    voi_split: float
    voi_merge: float
    adapted_rand_error: float
    are_precision: float
    are_recall: float
    f1_50: float
    precision_50: float
    recall_50: float
    f1_75: float
    precision_75: float
    recall_75: float
    ap: float
    #: ``TP / (TP + FP + FN)`` at each of :data:`IOU_THRESHOLDS`; ``ap`` is their mean.
    ap_by_threshold: tuple[float, ...]
    n_gt: int
    n_pred: int
    matched_50: int
    matched_75: int

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ap_by_threshold"] = list(self.ap_by_threshold)
        return out

    @classmethod
    def mean(cls, scores: Sequence["InstanceScores"]) -> "InstanceScores":
        """The mean of each metric over ``scores`` where it is defined (NaN where nowhere);
        the object and match counts are summed."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            column = [getattr(s, f.name) for s in scores]
            if f.type == "int":
                values[f.name] = int(sum(column))
            elif f.name == "ap_by_threshold":
                stacked = np.asarray(column, np.float64).reshape(len(scores), len(IOU_THRESHOLDS))
                values[f.name] = tuple(_nanmean(stacked[:, k]) for k in range(len(IOU_THRESHOLDS)))
            else:
                values[f.name] = _nanmean(column)
        return cls(**values)


def _nanmean(values) -> float:
    finite = [float(v) for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _entropy_terms(table: ContingencyTable) -> tuple[float, float, float, float, float]:
    """VOI split, VOI merge and the three pair sums of the adapted Rand error (gt > 0 rows)."""
    fg = table.gt > 0
    gt, pred, n = table.gt[fg], table.pred[fg], table.count[fg]
    if not len(n):
        return math.nan, math.nan, 0.0, 0.0, 0.0
    _, gt_sizes, gt_of = _group_sum(gt, n)
    _, pred_sizes, pred_of = _group_sum(pred, n)
    nf = n.astype(np.float64)
    total = nf.sum()
    split = float(-np.sum(nf * np.log2(nf / gt_sizes[gt_of])) / total) + 0.0  # + 0.0: no -0.0
    merge = float(-np.sum(nf * np.log2(nf / pred_sizes[pred_of])) / total) + 0.0
    a, b = gt_sizes.astype(np.float64), pred_sizes.astype(np.float64)
    both = float(np.sum(nf * (nf - 1)))
    return split, merge, both, float(np.sum(a * (a - 1))), float(np.sum(b * (b - 1)))


def instance_scores(table: ContingencyTable) -> InstanceScores:
    """Every instance metric of one contingency table."""
    split, merge, both, gt_pairs, pred_pairs = _entropy_terms(table)
    objects = _Objects.of(table)
    n_gt, n_pred = objects.n_gt, objects.n_pred
    tp = [int(objects.matched(t).sum()) for t in IOU_THRESHOLDS]
    ap_t = tuple(_ratio(k, n_gt + n_pred - k) for k in tp)
    tp50, tp75 = tp[0], tp[IOU_THRESHOLDS.index(0.75)]
    return InstanceScores(
        voi_split=split, voi_merge=merge,
        adapted_rand_error=1.0 - _ratio(2 * both, gt_pairs + pred_pairs),
        are_precision=_ratio(both, pred_pairs), are_recall=_ratio(both, gt_pairs),
        f1_50=_ratio(2 * tp50, n_gt + n_pred), precision_50=_ratio(tp50, n_pred), recall_50=_ratio(tp50, n_gt),
        f1_75=_ratio(2 * tp75, n_gt + n_pred), precision_75=_ratio(tp75, n_pred), recall_75=_ratio(tp75, n_gt),
        ap=math.nan if n_gt + n_pred == 0 else sum(ap_t) / len(ap_t), ap_by_threshold=ap_t,
        n_gt=n_gt, n_pred=n_pred, matched_50=tp50, matched_75=tp75,
    )


@dataclass(frozen=True)
class InstanceEvaluation:
    """The result of :func:`evaluate_instances`: the scores of the volume, or with
    ``per_section`` the mean over sections (counts summed) and each section's scores."""

    scores: InstanceScores
    per_section: tuple[InstanceScores, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": "volume" if self.per_section is None else "per_section",
                               "iou_thresholds": list(IOU_THRESHOLDS), **self.scores.to_dict()}
        if self.per_section is not None:
            out["sections"] = len(self.per_section)
            out["per_section"] = [{"section": z, **s.to_dict()} for z, s in enumerate(self.per_section)]
        return out


# --------------------------------------------------------------------------- streaming over volumes


def _name(volume: _ArrayLike, default: str) -> str:
    spec = getattr(volume, "spec", None)
    return str(spec) if spec is not None else default


def evaluate_instances(
    prediction: _ArrayLike,
    ground_truth: _ArrayLike,
    *,
    per_section: bool = False,
    slab: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> InstanceEvaluation:
    """Instance metrics of ``prediction`` against ``ground_truth``, read slab by slab.

    Both are integer instance-id volumes of one shape (``emseg.io`` volumes or arrays); 0 is
    background, -1 in the ground truth is ignored. ``per_section`` scores each section along the
    first axis on its own (2D objects: an id in two sections is two objects) and returns their
    mean and list. ``slab`` is the number of sections read at once (default: about 2**24
    voxels); the result does not depend on it.
    """
    gt_name, pred_name = _name(ground_truth, "ground truth"), _name(prediction, "prediction")
    shape = tuple(ground_truth.shape)
    if not shape or any(s < 1 for s in shape):
        raise InputError(f"ground truth is empty (shape {shape})", source=gt_name)
    if tuple(prediction.shape) != shape:
        raise InputError(f"shape {tuple(prediction.shape)} differs from the ground truth's {shape}", source=pred_name)
    for volume, name in ((ground_truth, gt_name), (prediction, pred_name)):
        if np.dtype(volume.dtype).kind not in "iu":
            raise InputError(f"instance ids must be integers, found {np.dtype(volume.dtype)}", source=name)
    if per_section and len(shape) < 3:
        raise InputError(f"`per_section` needs sections along the first axis of a 3D volume, got shape {shape}",
                         source=gt_name)
    if slab is not None and slab < 1:
        raise ValueError(f"slab must be >= 1, got {slab}")
    plane = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    step = slab or max(1, _SLAB_VOXELS // plane)
    starts = range(0, shape[0], step)
    names = {"gt_name": gt_name, "pred_name": pred_name}
    accumulator = ContingencyAccumulator(**names)
    sections: list[InstanceScores] = []
    for i, start in enumerate(starts):
        sl = slice(start, min(start + step, shape[0]))
        gt, pred = np.asarray(ground_truth[sl]), np.asarray(prediction[sl])
        if per_section:
            sections += [instance_scores(ContingencyTable.from_labels(g, p, **names)) for g, p in zip(gt, pred)]
        else:
            accumulator.add(gt, pred)
        if progress is not None:
            progress(i + 1, len(starts))
    if per_section:
        return InstanceEvaluation(InstanceScores.mean(sections), tuple(sections))
    return InstanceEvaluation(instance_scores(accumulator.table()))
