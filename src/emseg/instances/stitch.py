"""Consistent ids across blocks (numpy and scipy): provisional ids, face merges, the final id map.

Each block labels its inner part alone with ids 1..n, made unique by adding the count of ids in
the blocks before it (a prefix sum, :class:`~emseg.instances.blockwise.GlobalIds`). Once every
block is written, :func:`face_pairs` reads, for each block, the planes on both sides of its lower
faces and lists the pairs of provisional ids that touch across them under the neighbourhood (with
the diagonal neighbours of ``connectivity`` 2 and 3, the lower plane is read one voxel wider).
:func:`resolve_ids` merges touching ids (connected components of the pair graph, which is
union-find), drops objects below a size and numbers the rest 1..N in the order of their first
provisional id: one map of size (provisional ids + 1), applied block by block.

Connected components of the whole volume follow exactly: two foreground voxels in different
blocks are connected iff a chain of neighbouring foreground voxels joins them, and each link of
such a chain either stays in one block (the block's own labelling) or crosses a face (a pair).
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def neighbour_offsets(structure: np.ndarray) -> list[tuple[int, ...]]:
    """The offsets (each side in -1..1) of the neighbours in a 3^ndim ``structure``, centre excluded."""
    centre = tuple(s // 2 for s in structure.shape)
    return [tuple(int(i - c) for i, c in zip(index, centre))
            for index in itertools.product(*[range(s) for s in structure.shape])
            if structure[index] and index != centre]


def face_pairs(store: Any, inner: Sequence[slice], shape: Sequence[int], structure: np.ndarray) -> np.ndarray:
    """Pairs (k, 2) of ids that touch across the lower faces of the block ``inner``.

    For each axis along which the block does not start at 0, reads the block's first plane
    and the plane before it (one voxel wider along the other axes, for diagonal neighbours) from
    ``store`` and pairs every nonzero voxel with each nonzero neighbour across the face. Every pair
    of neighbouring voxels in different blocks is seen from the block holding its upper voxel.
    """
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    offsets = neighbour_offsets(structure)
    found = []
    for axis in range(nd):
        k = inner[axis].start
        steps = [d for d in offsets if d[axis] == 1]
        if k == 0 or not steps:
            continue
        others = [a for a in range(nd) if a != axis]
        wide = any(d[a] for d in steps for a in others)
        hi_index = list(inner)
        hi_index[axis] = slice(k, k + 1)
        lo_index = [slice(max(0, s.start - 1), min(n, s.stop + 1)) if wide else s for s, n in zip(inner, shape)]
        lo_index[axis] = slice(k - 1, k)
        hi = np.asarray(store[tuple(hi_index)]).squeeze(axis)
        lo = np.asarray(store[tuple(lo_index)]).squeeze(axis)
        if not hi.any() or not lo.any():
            continue
        for d in steps:
            hi_sl, lo_sl = [], []
            for a in others:
                s, e = inner[a], d[a]
                start, stop = max(s.start, e), min(s.stop, shape[a] + e)  # lower voxel p - e inside the volume
                if start >= stop:
                    break
                hi_sl.append(slice(start - s.start, stop - s.start))
                lo_sl.append(slice(start - e - lo_index[a].start, stop - e - lo_index[a].start))
            else:
                h, lw = hi[tuple(hi_sl)], lo[tuple(lo_sl)]
                both = (h != 0) & (lw != 0)
                if both.any():
                    found.append(np.stack([lw[both], h[both]], axis=1).astype(np.uint64))
    if not found:
        return np.zeros((0, 2), dtype=np.uint64)
    return np.unique(np.concatenate(found), axis=0)


def resolve_ids(total: int, pairs: np.ndarray, sizes: np.ndarray,
                min_size: int = 0) -> tuple[np.ndarray, int, int]:
    """The map from provisional ids 0..``total`` to final ids 0..N, N, and the number of objects
    before the size filter.

    Ids joined by ``pairs`` become one object (connected components of the pair graph); an
    object whose summed ``sizes`` is below ``min_size`` maps to 0; the others are numbered
    1..N in the order of their smallest provisional id. The map is uint64 of size ``total + 1``.
    """
    n = int(total) + 1
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs):
        graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        n_comp, comp = connected_components(graph, directed=False)
    else:
        n_comp, comp = n, np.arange(n)
    comp_size = np.bincount(comp, weights=np.asarray(sizes, dtype=np.float64), minlength=n_comp)
    _, first = np.unique(comp, return_index=True)  # the smallest id of each component
    keep = comp_size >= 1
    keep[comp[0]] = False  # background
    found = int(np.count_nonzero(keep))
    keep &= comp_size >= int(min_size)
    kept = np.flatnonzero(keep)
    kept = kept[np.argsort(first[kept], kind="stable")]
    new = np.zeros(n_comp, dtype=np.uint64)
    new[kept] = np.arange(1, len(kept) + 1, dtype=np.uint64)
    return new[comp], int(len(kept)), found
