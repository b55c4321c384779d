"""Counter-based random streams keyed by the global voxel coordinate.

Every random number of the noise modes is a 64-bit hash of the run key (:func:`stream_key`),
a stream id (``STREAM_*``) and the voxel's linear index ``i`` in the *whole* volume
(:func:`linear_index`): the splitmix64 output ``mix(base + i * gamma)``, where ``base`` is a
hash of key and stream (:func:`voxel_hash`). A voxel's numbers therefore do not depend on the
block it is processed in. A :class:`Box` (a block of a volume) hashes its voxels in chunks of
:data:`CHUNK` voxels without building their index, which bounds the memory and keeps the work
in cache. The exact-count selections drawn from these streams are in :mod:`emseg.noise.counts`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from emseg.noise.checks import check_int

__all__ = [
    "CHUNK",
    "STREAM_RANDOM",
    "STREAM_SELECT",
    "STREAM_SHIFT",
    "Box",
    "block_rng",
    "linear_index",
    "stream_key",
    "unit",
    "voxel_hash",
]

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64 increment (odd)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_U64 = np.uint64

#: Voxels hashed per step: the scratch arrays of a step stay in the CPU cache.
CHUNK = 1 << 18

# Stream ids: the numbers a voxel draws for different purposes are independent.
STREAM_SELECT = 1  # flip / sample: which voxels are chosen
# 2 is retired: the new class of a flip with K > 2 comes from the low bits of STREAM_SELECT
STREAM_RANDOM = 3  # random labels
STREAM_SHIFT = 4  # shift: the offset of a foreground voxel


def _mix64_int(z: int) -> int:
    """splitmix64 finaliser on a Python int (a bijection of ``[0, 2**64)``)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _mix64(z: np.ndarray, tmp: np.ndarray | None = None) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array, in place (wrapping arithmetic); ``tmp`` is a
    scratch array of the same shape."""
    tmp = np.empty_like(z) if tmp is None else tmp
    for shift, mult in ((30, _MIX1), (27, _MIX2)):
        np.right_shift(z, _U64(shift), out=tmp)
        z ^= tmp
        z *= _U64(mult)
    np.right_shift(z, _U64(31), out=tmp)
    z ^= tmp
    return z


def _stream_base(key: int, stream: int) -> int:
    """Start of the Weyl sequence of ``(key, stream)``: a hash of both."""
    return _mix64_int(key ^ ((stream * _GAMMA) & _MASK64))


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
    """64-bit hash of voxel indices under ``(key, stream)``: ``mix(base + index * gamma)`` (the
    splitmix64 output). For fixed key and stream it is a bijection of the index, so distinct
    voxels never tie.

    Examples
    --------
    >>> h = voxel_hash(1, STREAM_SELECT, np.arange(6))
    >>> bool(np.array_equal(h, np.concatenate([h for _, h in Box.of((2, 3)).hashes(1, STREAM_SELECT)])))
    True
    """
    z = np.array(index, dtype=np.uint64)
    z *= _U64(_GAMMA)
    z += _U64(_stream_base(key, stream))
    return _mix64(z)


def unit(h: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) from 64-bit hashes (their top 53 bits)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class Box(NamedTuple):
    """A box of a volume: its shape, the global coordinate of its first voxel and the volume's
    shape (all tuples of int)."""

    shape: tuple[int, ...]
    origin: tuple[int, ...]
    volume_shape: tuple[int, ...]

    @classmethod
    def of(cls, shape: Sequence[int], origin: Sequence[int] | None = None,
           volume_shape: Sequence[int] | None = None) -> Box:
        """The box ``shape`` at ``origin`` (default: zeros) of ``volume_shape`` (default: ``shape``)."""
        shape = tuple(int(n) for n in shape)
        origin = (0,) * len(shape) if origin is None else tuple(int(o) for o in origin)
        return cls(shape, origin, shape if volume_shape is None else tuple(int(n) for n in volume_shape))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def runs(self) -> tuple[np.ndarray, int]:
        """Global index (uint64) of the first voxel of each run of the box that is contiguous in
        the volume, in C order, and the length of a run.

        Examples
        --------
        >>> starts, run = Box.of((2, 2, 3), (1, 0, 0), (4, 2, 3)).runs()
        >>> starts.tolist(), run
        ([6], 12)
        """
        j = len(self.shape) - 1
        while j > 0 and self.shape[j] == self.volume_shape[j]:
            j -= 1  # a whole axis: runs continue over it
        outer = self.shape[:j] + (1,) * (len(self.shape) - j)
        return linear_index(outer, self.origin, self.volume_shape).reshape(-1), int(np.prod(self.shape[j:]))

    def hashes(self, key: int, stream: int, chunk: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, h)``: :func:`voxel_hash` of the box's voxels at flat (C-order) positions
        ``start .. start + h.size``, in chunks of at most ``chunk`` (default :data:`CHUNK`)
        voxels. ``h`` is overwritten by the next chunk: use it before asking for the next."""
        chunk = CHUNK if chunk is None else int(chunk)
        starts, run = self.runs()
        if self.size == 0:
            return
        firsts = starts * _U64(_GAMMA) + _U64(_stream_base(key, stream))
        steps = np.arange(min(chunk, run), dtype=np.uint64) * _U64(_GAMMA)
        z, tmp = np.empty(min(chunk, self.size), np.uint64), np.empty(min(chunk, self.size), np.uint64)
        if run >= chunk:  # chunks within a run
            for r, first in enumerate(firsts.tolist()):
                for c in range(0, run, chunk):
                    m = min(chunk, run - c)
                    np.add(steps[:m], _U64((first + c * _GAMMA) & _MASK64), out=z[:m])
                    yield r * run + c, _mix64(z[:m], tmp[:m])
            return
        rows = chunk // run  # whole runs per chunk
        for r in range(0, firsts.size, rows):
            m = min(rows, firsts.size - r)
            np.add(firsts[r:r + m, None], steps[None, :], out=z[:m * run].reshape(m, run))
            yield r * run, _mix64(z[:m * run], tmp[:m * run])


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