"""Counter-based random streams keyed by the global voxel coordinate.

Every random number of the noise modes is a 64-bit hash of the run key (:func:`stream_key`),
a stream id (``STREAM_*``) and the voxel's linear index in the *whole* volume
(:func:`linear_index`), two splitmix64 rounds (:func:`voxel_hash`). A voxel's numbers
therefore do not depend on the block it is processed in. :class:`Selection` holds the
per-class hash thresholds that choose exactly ``round(p_k n_k)`` voxels of each class of a
volume, found in memory (:func:`selection_in_memory`) or by scans of chunks
(:func:`selection_from_chunks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np

from emseg.noise.checks import check_int, round_count

__all__ = [
    "STREAM_CLASS",
    "STREAM_RANDOM",
    "STREAM_SELECT",
    "STREAM_SHIFT",
    "Selection",
    "block_rng",
    "linear_index",
    "selection_from_chunks",
    "selection_in_memory",
    "stream_key",
    "unit",
    "voxel_hash",
]

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64 increment (odd)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB

# Stream ids: the numbers a voxel draws for different purposes are independent.
STREAM_SELECT = 1  # flip / sample: which voxels are chosen
STREAM_CLASS = 2  # flip with K > 2: the new class
STREAM_RANDOM = 3  # random labels
STREAM_SHIFT = 4  # shift: the offset of a foreground voxel


def _mix64_int(z: int) -> int:
    """splitmix64 finaliser on a Python int (a bijection of ``[0, 2**64)``)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array, in place (wrapping arithmetic)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(_MIX1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(_MIX2)
    z ^= z >> np.uint64(31)
    return z


def stream_key(rng: Any = None) -> int:
    """The 64-bit key of the counter-based streams of :func:`flip`, :func:`sample`,
    :func:`random_labels` and :func:`shift`.

    The key is one 64-bit draw of ``numpy.random.default_rng(rng)``: a
    :class:`numpy.random.Generator` is advanced by that draw, an int seed ``s`` gives the key
    of ``default_rng(s)`` (so ``rng=s`` and ``rng=default_rng(s)`` agree), and ``None`` a
    fresh key from the operating system's entropy.

    Examples
    --------
    >>> stream_key(7) == stream_key(np.random.default_rng(7)), stream_key(7) == stream_key(8)
    (True, False)
    """
    if not isinstance(rng, (np.random.Generator, np.random.SeedSequence, type(None))):
        check_int(rng, "rng seed", minimum=0)
    return int(np.random.default_rng(rng).integers(0, 1 << 64, dtype=np.uint64))


def linear_index(shape: Sequence[int], origin: Sequence[int], volume_shape: Sequence[int]) -> np.ndarray:
    """uint64 C-order index in ``volume_shape`` of every voxel of the box ``origin + shape``."""
    out = np.zeros((), dtype=np.uint64)
    stride = 1
    parts = []
    for n, o, total in zip(reversed(tuple(shape)), reversed(tuple(origin)), reversed(tuple(volume_shape))):
        parts.append((np.arange(int(o), int(o) + int(n), dtype=np.uint64) * np.uint64(stride)))
        stride *= int(total)
    for axis, part in enumerate(reversed(parts)):
        view = [1] * len(parts)
        view[axis] = part.size
        out = out + part.reshape(view)
    return np.broadcast_to(out, tuple(int(n) for n in shape)).copy()


def voxel_hash(key: int, stream: int, index: np.ndarray) -> np.ndarray:
    """64-bit hash of voxel indices under ``(key, stream)``: for fixed key and stream it is a
    bijection of the index (two splitmix64 rounds), so distinct voxels never tie."""
    k1 = _mix64_int(key ^ ((stream * _GAMMA) & _MASK64))
    k2 = _mix64_int(k1 + _GAMMA)
    z = np.asarray(index, dtype=np.uint64) ^ np.uint64(k1)
    z = _mix64(z)
    z += np.uint64(k2)
    return _mix64(z)


def unit(h: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) from 64-bit hashes (their top 53 bits)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


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
    valid = flat[flat >= 0] if flat.dtype.kind == "i" else flat
    if valid.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    top = int(valid.max())
    if top < 1 << 20:
        counts = np.bincount(valid.astype(np.intp, copy=False), minlength=top + 1)
        classes = np.flatnonzero(counts)
        return classes.astype(np.int64), counts[classes].astype(np.int64)
    classes, counts = np.unique(valid, return_counts=True)
    return classes.astype(np.int64), counts.astype(np.int64)


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
        sel = np.zeros(flat.shape, dtype=bool)
        if self.classes.size == 0 or flat.size == 0:
            return sel
        if h is None:
            h = voxel_hash(self.key, STREAM_SELECT, index)
        top = int(self.classes[-1])
        if top < 1 << 16:  # few class ids: direct lookup tables
            thr = np.zeros(top + 2, dtype=np.uint64)
            use = np.zeros(top + 2, dtype=bool)
            thr[self.classes] = self.thresholds
            use[self.classes] = self.chosen
            pos = flat.astype(np.intp, copy=False)
            if flat.dtype.kind == "i":
                pos = np.where((pos < 0) | (pos > top), top + 1, pos)
            else:
                pos = np.minimum(pos, top + 1)
            return use[pos] & (h <= thr[pos])
        vals = flat.astype(np.int64, copy=False)
        pos = np.searchsorted(self.classes, vals)
        pos = np.minimum(pos, self.classes.size - 1)
        known = (self.classes[pos] == vals) & self.chosen[pos]
        sel[known] = h[known] <= self.thresholds[pos[known]]
        return sel


def _round_counts(fractions: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.array([round_count(float(f), int(n)) for f, n in zip(fractions, counts)], dtype=np.int64)


def selection_in_memory(key: int, flat: np.ndarray, index: np.ndarray, fractions: Sequence[float], *,
                         h: np.ndarray | None = None) -> Selection:
    """:class:`Selection` of one in-memory array (exact ``m_k``-th smallest hash per class)."""
    classes, counts = _class_counts(flat)
    m = _round_counts(_fraction_table(fractions, classes), counts)
    thresholds = np.zeros(classes.size, dtype=np.uint64)
    h = voxel_hash(key, STREAM_SELECT, index) if h is None else h
    todo = np.flatnonzero(m > 0)
    if todo.size and todo.size <= 64:
        for i in todo:
            hk = h[flat == classes[i]]
            thresholds[i] = np.partition(hk, m[i] - 1)[m[i] - 1]
    elif todo.size:
        valid = flat >= 0 if flat.dtype.kind == "i" else np.ones(flat.shape, bool)
        lab, hv = flat[valid].astype(np.int64), h[valid]
        order = np.lexsort((hv, lab))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        thresholds[todo] = hv[order[starts[todo] + m[todo] - 1]]
    thresholds[(m == counts) & (m > 0)] = np.uint64(_MASK64)  # the whole class: same as from chunks
    return Selection(key, classes, thresholds, m > 0)


def selection_from_chunks(key: int, chunks: Any, fractions: Sequence[float], *, sigmas: float = 8.0) -> Selection:
    """:class:`Selection` of a volume read in chunks, equal to :func:`selection_in_memory` of the
    whole volume.

    ``chunks()`` yields ``(flat labels, flat global index)`` pairs covering every voxel once.
    Pass 1 counts each class; pass 2 counts, per class, the hashes below a window around the
    expected quantile ``m_k / n_k`` (``sigmas`` binomial standard deviations wide) and keeps
    those inside it, so the ``m_k``-th smallest is found by sorting a few ``sqrt(n_k)``
    values. A window that misses (probability far below ``1e-9`` at 8 sigma) is widened and
    the pass repeated for its classes.
    """
    classes = np.zeros(0, np.int64)
    counts = np.zeros(0, np.int64)
    for flat, _ in chunks():
        c, n = _class_counts(flat)
        merged = np.union1d(classes, c)
        total = np.zeros(merged.size, np.int64)
        total[np.searchsorted(merged, classes)] += counts
        total[np.searchsorted(merged, c)] += n
        classes, counts = merged, total
    m = _round_counts(_fraction_table(fractions, classes), counts)
    thresholds = np.zeros(classes.size, dtype=np.uint64)
    full = (m == counts) & (m > 0)
    thresholds[full] = np.uint64(_MASK64)
    todo = np.flatnonzero((m > 0) & ~full)
    width = sigmas
    while todo.size:
        q = m[todo] / counts[todo]
        half = width * np.sqrt(q * (1 - q) / counts[todo]) + 4.0 / counts[todo]
        lo_f, hi_f = q - half, q + half
        lo64 = np.array([min(int(max(v, 0.0) * 2.0**64), _MASK64) for v in lo_f], dtype=np.uint64)
        hi64 = np.array([min(int(min(v, 1.0) * 2.0**64), _MASK64) for v in hi_f], dtype=np.uint64)
        hi_open = hi_f >= 1.0
        below = np.zeros(todo.size, np.int64)
        inside: list[list[np.ndarray]] = [[] for _ in todo]
        cls = classes[todo]
        for flat, index in chunks():
            vals = flat.astype(np.int64, copy=False)
            pos = np.minimum(np.searchsorted(cls, vals), cls.size - 1)
            hit = cls[pos] == vals
            if not hit.any():
                continue
            pos = pos[hit]
            h = voxel_hash(key, STREAM_SELECT, index[hit])
            is_below = h < lo64[pos]
            below += np.bincount(pos[is_below], minlength=todo.size)
            win = ~is_below & ((h < hi64[pos]) | hi_open[pos])
            if win.any():
                wp, wh = pos[win], h[win]
                order = np.argsort(wp, kind="stable")
                wp, wh = wp[order], wh[order]
                cuts = np.flatnonzero(np.diff(wp)) + 1
                for part_p, part_h in zip(np.split(wp, cuts), np.split(wh, cuts)):
                    inside[int(part_p[0])].append(part_h)
        missed = []
        for j, i in enumerate(todo):
            rank = int(m[i] - below[j])
            values = np.sort(np.concatenate(inside[j])) if inside[j] else np.zeros(0, np.uint64)
            if 1 <= rank <= values.size:
                thresholds[i] = values[rank - 1]
            else:
                missed.append(i)
        if missed and width > 1e9:  # the window covers [0, 1]: cannot miss
            raise RuntimeError("selection thresholds not found: the chunks changed between passes")
        todo = np.asarray(missed, dtype=np.int64)
        width = max(4 * width, 4.0)
    return Selection(key, classes, thresholds, m > 0)


def block_rng(seed: int, index: int | Sequence[int]) -> np.random.Generator:
    """Independent, reproducible random stream for one block.

    Returns ``numpy.random.default_rng(SeedSequence(seed, spawn_key=index))``,
    which is the stream ``SeedSequence(seed).spawn(...)`` would give block
    ``index``; nested indices ``(iz, iy, ix)`` correspond to nested spawns.

    Parameters
    ----------
    seed : int >= 0
        Run seed.
    index : int or sequence of int >= 0
        Block index (flat or per axis).

    Returns
    -------
    numpy.random.Generator

    Examples
    --------
    >>> a = block_rng(7, (0, 1, 2)).integers(1000)
    >>> b = block_rng(7, (0, 1, 2)).integers(1000)
    >>> bool(a == b)
    True
    """
    s = check_int(seed, "seed", minimum=0)
    key = (index,) if isinstance(index, (int, np.integer)) else tuple(index)
    key = tuple(check_int(i, "block index", minimum=0) for i in key)
    return np.random.default_rng(np.random.SeedSequence(s, spawn_key=key))