"""Blocks: the unit of blockwise work over a volume (planning only; numpy, no torch).

A volume is cut into *blocks* aligned with the output chunks; each block is read with a *halo*
of context (``outer``) and only its ``inner`` part is written. Prediction
(:mod:`emseg.engine.inference`), label noise (:mod:`emseg.noise.blockwise`) and the cluster executor
(:mod:`emseg.engine.cluster`) all plan their work with :func:`plan_blocks`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class Block:
    """One unit of blockwise work: ``inner`` is written, ``outer`` (inner plus halo) is read."""

    index: int
    inner: tuple[slice, ...]
    outer: tuple[slice, ...]

    @property
    def inner_in_outer(self) -> tuple[slice, ...]:
        return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(self.inner, self.outer))

    @property
    def size(self) -> int:
        return int(np.prod([s.stop - s.start for s in self.inner]))


def plan_blocks(shape: Sequence[int], block_shape: Sequence[int], halo: Sequence[int]) -> list[Block]:
    """Tile ``shape`` with blocks of ``block_shape`` (the last ones cut at the border) plus ``halo``.

    Examples
    --------
    >>> [b.inner for b in plan_blocks((5,), (3,), (1,))]
    [(slice(0, 3, None),), (slice(3, 5, None),)]
    """
    shape, block_shape, halo = tuple(shape), tuple(block_shape), tuple(halo)
    ranges = [range(0, s, b) for s, b in zip(shape, block_shape)]
    blocks = []
    for index, starts in enumerate(itertools.product(*ranges)):
        inner = tuple(slice(a, min(a + b, s)) for a, b, s in zip(starts, block_shape, shape))
        outer = tuple(slice(max(0, i.start - h), min(s, i.stop + h)) for i, h, s in zip(inner, halo, shape))
        blocks.append(Block(index, inner, outer))
    return blocks


def describe_block(block: Any) -> str:
    """``block 3 [0:4, 0:64, 64:128]`` for a :class:`Block`, else ``block 3``."""
    index = getattr(block, "index", "?")
    inner = getattr(block, "inner", None)
    if inner is None:
        return f"block {index}"
    return f"block {index} [{', '.join(f'{s.start}:{s.stop}' for s in inner)}]"


def default_block_shape(volume_shape: Sequence[int], patch_shape: Sequence[int], chunks: Sequence[int],
                        *, max_voxels: int = 1024**2) -> tuple[int, ...]:
    """Blocks wide in-plane (the halo's recomputation falls with the block side), a multiple of the chunks.

    In-plane sides aim at 1024 for 2D networks (patch z = 1 or a 2D volume) and 512 for 3D ones;
    the leading axis of a 3D volume then takes what ``max_voxels`` leaves (at most 16 sections,
    at least one patch). A 2D network on 1024 x 1024 sections thus predicts one whole section per
    block with no halo at all, instead of 16 x 512 x 512 blocks that recompute 56% more voxels;
    one section per block also keeps the peak memory of ``emseg predict`` near half of
    predicting the volume in memory (benchmarks/speed.py).
    """
    nd = len(volume_shape)
    flat = nd == 2 or int(patch_shape[0]) == 1
    side = 1024 if flat else 512

    def fit(size: int, want: int, chunk: int) -> int:
        b = int(math.ceil(max(want, chunk) / chunk) * chunk)
        return min(b, int(math.ceil(size / chunk) * chunk))

    plane = [fit(size, max(int(patch), side), chunk)
             for size, patch, chunk in zip(volume_shape[-2:], patch_shape[-2:], chunks[-2:])]
    if nd == 2:
        return tuple(plane)
    lead = [fit(size, max(int(patch), min(16, max_voxels // int(np.prod(plane))) if flat else 16), chunk)
            for size, patch, chunk in zip(volume_shape[:-2], patch_shape[:-2], chunks[:-2])]
    return tuple(lead + plane)
