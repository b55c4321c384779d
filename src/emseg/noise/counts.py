"""Exact-count selection on the voxel-keyed streams of :mod:`emseg.noise.streams`.

:class:`Selection` holds the per-class hash thresholds that choose exactly ``round(p_k n_k)``
voxels of each class of a volume, found together with the chosen voxels of an in-memory array
(:func:`select`) or by scans of chunks (:func:`selection_from_chunks`): voxels below a narrow
window around each class's expected threshold are chosen as they are hashed, and the few inside the
window decide the exact m-th smallest hash afterwards (the window widens when it misses).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np

from emseg.noise import streams
from emseg.noise.checks import round_count
from emseg.noise.streams import STREAM_SELECT, Box, stream_key, voxel_hash  # noqa: F401 (stream_key: examples)

_MASK64 = (1 << 64) - 1

#: ``on_hash(start, h)``: sees the selection hashes ``h`` of voxels ``start ..`` of a pass.
HashHook = Callable[[int, np.ndarray], None]

__all__ = ["Selection", "select", "selection_from_chunks", "selection_in_memory"]

# --------------------------------------------------------------------------- #
# exact-count selection
# --------------------------------------------------------------------------- #
def _fraction_table(fractions: float | Sequence[float], classes: np.ndarray) -> np.ndarray:
    """Fraction of each class: one number for all, or a sequence indexed by class (0 beyond)."""
    if isinstance(fractions, Real):
        return np.full(classes.shape, float(fractions))
    fr = np.asarray(fractions, dtype=np.float64)
    out = np.zeros(classes.shape)
    inside = classes < fr.size
    out[inside] = fr[classes[inside]]
    return out


def _class_counts(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted classes >= 0 present in ``flat`` and their voxel counts."""
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    top = int(flat.max())
    if top < 16:  # few classes: one comparison each, no index copy
        counts = np.array([np.count_nonzero(flat == k) for k in range(top + 1)], dtype=np.int64)
        classes = np.flatnonzero(counts)
        return classes.astype(np.int64), counts[classes]
    valid = flat[flat >= 0] if flat.dtype.kind == "i" else flat
    if top < 1 << 20:
        counts = np.bincount(valid.astype(np.intp, copy=False), minlength=top + 1)
        classes = np.flatnonzero(counts)
        return classes.astype(np.int64), counts[classes].astype(np.int64)
    classes, counts = np.unique(valid, return_counts=True)
    return classes.astype(np.int64), counts.astype(np.int64)


def _count_classes(flats: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_class_counts` summed over chunks of labels."""
    classes = np.zeros(0, np.int64)
    counts = np.zeros(0, np.int64)
    for flat in flats:
        c, n = _class_counts(flat)
        merged = np.union1d(classes, c)
        total = np.zeros(merged.size, np.int64)
        total[np.searchsorted(merged, classes)] += counts
        total[np.searchsorted(merged, c)] += n
        classes, counts = merged, total
    return classes, counts


def _round_counts(fractions: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.array([round_count(float(f), int(n)) for f, n in zip(fractions, counts)], dtype=np.int64)


class _Lookup:
    """Per-class values looked up by label: :meth:`index` maps labels to slots of the tables of
    :meth:`table`. Labels of 1 or 2 bytes are their own slot (viewed unsigned: no copy), small
    class ids index a table clipped at both ends, others are searched among ``classes``;
    labels that are not a class (-1, ...) land on slots holding the table's ``fill``."""

    def __init__(self, classes: np.ndarray, dtype: np.dtype) -> None:
        self.classes = classes
        dt = np.dtype(dtype)
        top = int(classes[-1]) if classes.size else 0
        if dt.itemsize <= 2:
            self.mode, self.size, self.slots = "view", 1 << (8 * dt.itemsize), classes
            self.view = np.dtype(f"u{dt.itemsize}")
        elif top < 1 << 16:
            self.mode, self.size, self.slots = "clip", top + 2, classes  # slot -1 is the last
        else:
            self.mode, self.size, self.slots = "search", classes.size + 1, np.arange(classes.size)

    def index(self, flat: np.ndarray) -> np.ndarray:
        """Slot of each label of ``flat``."""
        if self.mode == "view":
            return flat.view(self.view)
        if self.mode == "clip":
            return np.clip(flat.astype(np.intp), -1, self.size - 1)
        if self.classes.size == 0:
            return np.zeros(flat.shape, np.intp)
        values = flat.astype(np.int64, copy=False)
        pos = np.searchsorted(self.classes, values)
        np.minimum(pos, self.classes.size - 1, out=pos)
        pos[self.classes[pos] != values] = self.classes.size
        return pos

    def table(self, per_class: np.ndarray, fill: Any, dtype: Any) -> np.ndarray:
        """Table of ``per_class`` values by slot, ``fill`` where no class is."""
        out = np.full(self.size, fill, dtype=dtype)
        out[self.slots] = per_class
        return out


def _split_few(todo: list[tuple[int, int, np.uint64, np.uint64]], k: int, slot: np.ndarray, h: np.ndarray,
               sure: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_splitter` for a few classes, ``todo`` = ``(position, slot, lo, hi)`` of each active
    class: comparisons with scalars per class, no table lookups."""
    sure[...] = False
    le = np.zeros(h.shape, dtype=bool)
    part, here = np.empty(h.shape, dtype=bool), np.empty(h.shape, dtype=bool)
    below = np.zeros(k, dtype=np.int64)
    for i, s, lo, hi in todo:
        np.equal(slot, s, out=here)
        np.less(h, lo, out=part)
        part &= here
        below[i] = np.count_nonzero(part)
        sure |= part
        np.less_equal(h, hi, out=part)
        part &= here
        le |= part
    return below, le


def _split_many(lo: np.ndarray, hi: np.ndarray, position: np.ndarray, k: int, slot: np.ndarray,
                h: np.ndarray, sure: np.ndarray, count: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_splitter` for many (``k``) classes: bounds looked up per voxel, a count per class."""
    np.less(h, lo[slot], out=sure)
    le = np.less_equal(h, hi[slot])
    below = np.bincount(position[slot[sure]], minlength=k + 1)[:k] if count else np.zeros(k, np.int64)
    return below, le


def _splitter(lookup: _Lookup, lo: np.ndarray, hi: np.ndarray, active: np.ndarray, count: bool):
    """``split(slot, h, sure) -> (below, le)`` for per-class bounds ``lo <= hi`` of the
    ``active`` classes: writes ``h < lo`` of each voxel's class into ``sure`` and returns
    ``h <= hi`` and, when ``count``, the number of sure voxels per class. Other voxels (labels
    that are not a class, inactive classes) are never sure, and ``le`` only where their hash is
    0 (the caller drops those)."""
    k = lookup.classes.size
    if k <= 8:
        todo = [(i, s, lo[i], hi[i]) for i, s in enumerate(lookup.slots.tolist()) if active[i]]
        return lambda slot, h, sure: _split_few(todo, k, slot, h, sure)
    lo_t = lookup.table(np.where(active, lo, 0), 0, np.uint64)
    hi_t = lookup.table(np.where(active, hi, 0), 0, np.uint64)
    position = lookup.table(np.arange(k), k, np.intp)
    return lambda slot, h, sure: _split_many(lo_t, hi_t, position, k, slot, h, sure, count)


@dataclass
class _Scan:
    """What a pass over the hashes found: chosen voxels below their class's lower bound, per
    class (``below``), and the voxels between the bounds (class position, hash, flat position)."""

    below: np.ndarray
    edge_class: np.ndarray
    edge_hash: np.ndarray
    edge_pos: np.ndarray


def _scan(parts: Callable[[], Iterable[tuple[np.ndarray, np.ndarray, int]]], lookup: _Lookup,
          lo: np.ndarray, hi: np.ndarray, active: np.ndarray, mask: np.ndarray | None = None, *,
          count: bool = True) -> _Scan:
    """Split the voxels of ``parts()`` = ``(labels, hashes, flat start)`` chunks by the bounds of
    their class (if ``active``): ``hash < lo`` is chosen (written to ``mask`` when given),
    ``lo <= hash <= hi`` is an edge, decided afterwards (:func:`_splitter`)."""
    k = lookup.classes.size
    split = _splitter(lookup, lo, hi, active, count)
    position = lookup.table(np.arange(k), k, np.intp)
    below = np.zeros(k, np.int64)
    edges: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for flat, h, start in parts():
        slot = lookup.index(flat)
        sure = np.empty(h.size, dtype=bool) if mask is None else mask[start:start + h.size]
        part_below, le = split(slot, h, sure)
        below += part_below
        if np.count_nonzero(le) > np.count_nonzero(sure):
            pos = np.flatnonzero(le & ~sure)
            edges.append((position[slot[pos]], h[pos], pos + start))
    if not edges:
        return _Scan(below, np.zeros(0, np.intp), np.zeros(0, np.uint64), np.zeros(0, np.intp))
    cls, hs, pos = (np.concatenate(part) for part in zip(*edges))
    return _Scan(below, cls, hs, pos)


def _window(m: np.ndarray, n: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Hash bounds around the expected ``m``-th smallest of ``n`` uniform hashes, ``width``
    binomial standard deviations (plus 4 voxels) on each side."""
    q = m / n
    half = width * np.sqrt(q * (1 - q) / n) + 4.0 / n
    lo = [min(int(max(v, 0.0) * 2.0**64), _MASK64) for v in q - half]
    hi = [min(int(min(v, 1.0) * 2.0**64), _MASK64) for v in q + half]
    return np.array(lo, dtype=np.uint64), np.array(hi, dtype=np.uint64)


def _resolve(m: np.ndarray, full: np.ndarray, scan: _Scan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, chosen edges, missed classes) of a scan: class ``k`` needs ``r = m_k -
    below_k`` of its edges, the ``r`` smallest; a class whose edges cannot supply them (its
    bounds missed the ``m_k``-th smallest hash) is missed and must be scanned again."""
    k = m.size
    order = np.lexsort((scan.edge_hash, scan.edge_class))
    cls, hs = scan.edge_class[order], scan.edge_hash[order]
    first = np.searchsorted(cls, np.arange(k + 1))
    n_edges = np.diff(np.append(first, cls.size))[:k]
    need = np.where(full, n_edges, np.where(m == 0, 0, m - scan.below))
    missed = (m > 0) & ~full & ((need < 1) | (need > n_edges))
    thresholds = np.zeros(k, np.uint64)
    found = (m > 0) & ~full & ~missed
    thresholds[found] = hs[first[:k][found] + need[found] - 1]
    thresholds[full] = np.uint64(_MASK64)
    taken = np.zeros(cls.size, bool)
    taken[order] = np.arange(cls.size) - first[cls] < np.append(need, 0)[cls]
    return thresholds, taken, missed


def _search(key: int, classes: np.ndarray, counts: np.ndarray, fractions: float | Sequence[float],
            lookup: _Lookup, parts: Callable[[], Iterable[tuple[np.ndarray, np.ndarray, int]]],
            sigmas: float, mask: np.ndarray | None = None) -> Selection:
    """:class:`Selection` with exact thresholds from scans of ``parts``; ``mask`` (optional)
    receives the chosen voxels. Each class is bounded by a window around its expected quantile
    (:func:`_window`), so a scan keeps only a few ``sqrt(n_k)`` edge hashes per class; a class
    whose window misses (probability far below ``1e-9`` at 8 sigma) is widened and the scan
    repeated, the others bounded then by their exact threshold."""
    m = _round_counts(_fraction_table(fractions, classes), counts)
    full = (m == counts) & (m > 0)
    todo = (m > 0) & ~full
    lo, hi = np.zeros(classes.size, np.uint64), np.zeros(classes.size, np.uint64)
    lo[full] = hi[full] = np.uint64(_MASK64)
    width = sigmas
    lo[todo], hi[todo] = _window(m[todo], counts[todo], width)
    while True:
        scan = _scan(parts, lookup, lo, hi, m > 0, mask)
        thresholds, taken, missed = _resolve(m, full, scan)
        if not missed.any():
            if mask is not None:
                mask[scan.edge_pos[taken]] = True
            return Selection(key, classes, thresholds, m > 0)
        if width > 1e9:  # the window covers [0, 1]: cannot miss
            raise RuntimeError("selection thresholds not found: the chunks changed between passes")
        width = max(4 * width, 4.0)
        exact = todo & ~missed
        lo[exact] = hi[exact] = thresholds[exact]
        lo[missed], hi[missed] = _window(m[missed], counts[missed], width)


@dataclass(frozen=True)
class Selection:
    """Per-class thresholds of an exact-count random selection (``flip``, ``sample``).

    Voxel ``v`` of class ``k`` is chosen iff ``hash(v) <= threshold[k]``, where the hash is the
    selection stream keyed by the global coordinate of ``v``; ``threshold[k]`` is the
    ``m_k``-th smallest hash of class ``k`` with ``m_k = round(fraction_k * n_k)`` over the
    whole volume (``chosen[k]`` is False when ``m_k = 0``). Because the hash is a bijection of
    the voxel index, exactly ``m_k`` voxels are chosen, every subset of that size being
    equally likely, and any block can apply the rule on its own.
    """

    key: int
    classes: np.ndarray  # sorted int64
    thresholds: np.ndarray  # uint64
    chosen: np.ndarray  # bool: m_k > 0

    def apply(self, flat: np.ndarray, index: np.ndarray, h: np.ndarray | None = None) -> np.ndarray:
        """Boolean mask of the chosen voxels among ``flat`` (labels) at ``index`` (global);
        ``h`` may pass the selection hashes of ``index`` when already computed."""
        return self._mask(flat, _index_parts(self.key, flat, index, h))

    def mask(self, flat: np.ndarray, box: Box, on_hash: HashHook | None = None) -> np.ndarray:
        """Boolean mask of the chosen voxels among ``flat``, the labels of ``box`` in C order
        (``on_hash``: as in :func:`select`)."""
        return self._mask(flat, _box_parts(self.key, flat, box, on_hash))

    def _mask(self, flat: np.ndarray, parts: Callable[[], Iterable[tuple[np.ndarray, np.ndarray, int]]]
              ) -> np.ndarray:
        """The rule on ``parts`` (hashes of ``flat`` in chunks): below the threshold is chosen,
        equal to it too where the class is chosen."""
        sel = np.zeros(flat.shape, dtype=bool)
        if flat.size == 0 or self.classes.size == 0:
            return sel
        bound = np.where(self.chosen, self.thresholds, np.uint64(0))
        scan = _scan(parts, _Lookup(self.classes, flat.dtype), bound, bound, self.chosen, sel, count=False)
        sel[scan.edge_pos[np.append(self.chosen, False)[scan.edge_class]]] = True
        return sel


def _box_parts(key: int, flat: np.ndarray, box: Box, on_hash: HashHook | None = None):
    """``parts()`` of :func:`_scan` for the labels ``flat`` of ``box``: selection hashes in chunks,
    each shown first to ``on_hash(start, h)`` when given (which must not change ``h``)."""
    def parts():
        for start, h in box.hashes(key, STREAM_SELECT):
            if on_hash is not None:
                on_hash(start, h)
            yield flat[start:start + h.size], h, start
    return parts


def _index_parts(key: int, flat: np.ndarray, index: np.ndarray, h: np.ndarray | None = None):
    """``parts()`` of :func:`_scan` for labels ``flat`` at global ``index`` (or with hashes ``h``)."""
    def parts():
        for start in range(0, flat.size, streams.CHUNK):
            stop = start + streams.CHUNK
            hs = voxel_hash(key, STREAM_SELECT, index[start:stop]) if h is None else h[start:stop]
            yield flat[start:stop], hs, start
    return parts


def _label_chunks(flat: np.ndarray) -> Iterator[np.ndarray]:
    """``flat`` in chunks of ``16 * streams.CHUNK`` labels (the class counts' copies stay small)."""
    size = 16 * streams.CHUNK
    return (flat[start:start + size] for start in range(0, flat.size, size))


def select(key: int, flat: np.ndarray, box: Box, fractions: float | Sequence[float], *,
           sigmas: float = 8.0, on_hash: HashHook | None = None) -> tuple[Selection, np.ndarray]:
    """The :class:`Selection` of the labels ``flat`` of ``box`` taken as the whole volume, and
    its chosen voxels (boolean, like ``flat``), from one count of the classes and one pass of
    hashes (:func:`_search`). ``on_hash(start, h)`` sees each chunk of selection hashes (voxels
    ``start ..``) as it is computed, so that a caller can draw more from the same pass.

    Examples
    --------
    >>> lab = np.zeros(100, np.uint8); lab[:30] = 1
    >>> sel, chosen = select(stream_key(0), lab, Box.of((10, 10)), 0.5)
    >>> int(chosen[:30].sum()), int(chosen[30:].sum())
    (15, 35)
    """
    classes, counts = _count_classes(_label_chunks(flat))
    mask = np.empty(flat.shape, dtype=bool)
    sel = _search(key, classes, counts, fractions, _Lookup(classes, flat.dtype),
                  _box_parts(key, flat, box, on_hash), sigmas, mask)
    return sel, mask


def selection_in_memory(key: int, flat: np.ndarray, index: np.ndarray, fractions: Sequence[float], *,
                         h: np.ndarray | None = None, sigmas: float = 8.0) -> Selection:
    """:class:`Selection` of one in-memory array, labels ``flat`` at global ``index`` (exact
    ``m_k``-th smallest hash per class; ``h`` may pass the selection hashes of ``index``)."""
    classes, counts = _count_classes(_label_chunks(flat))
    return _search(key, classes, counts, fractions, _Lookup(classes, flat.dtype),
                   _index_parts(key, flat, index, h), sigmas)


def selection_from_chunks(key: int, chunks: Any, fractions: Sequence[float], *, sigmas: float = 8.0) -> Selection:
    """:class:`Selection` of a volume read in chunks, equal to :func:`selection_in_memory` of the
    whole volume.

    ``chunks()`` yields ``(flat labels, where)`` pairs covering every voxel once, ``where`` the
    flat global index of the labels or their :class:`Box`. Pass 1 counts each class; pass 2
    counts, per class, the hashes below a window around the expected quantile ``m_k / n_k``
    (``sigmas`` binomial standard deviations wide) and keeps those inside it, so the
    ``m_k``-th smallest is found by sorting a few ``sqrt(n_k)`` values. A window that misses
    (probability far below ``1e-9`` at 8 sigma) is widened and the pass repeated.
    """
    dtypes: set[np.dtype] = set()

    def labels():
        for flat, _ in chunks():
            dtypes.add(flat.dtype)
            yield flat

    classes, counts = _count_classes(labels())

    def parts():
        offset = 0
        for flat, where in chunks():
            inner = (_box_parts(key, flat, where) if isinstance(where, Box)
                     else _index_parts(key, flat, np.asarray(where)))
            for labels, h, start in inner():
                yield labels, h, offset + start
            offset += flat.size

    lookup = _Lookup(classes, dtypes.pop() if len(dtypes) == 1 else np.dtype(np.int64))
    return _search(key, classes, counts, fractions, lookup, parts, sigmas)
