"""The blockwise post-processing of ``emseg segment``: objects from per-voxel maps, never holding
more than a block and its halo.

:func:`segment_maps` reads a map (a foreground mask or a boundary probability, one block at a time)
and writes objects with ids consistent across blocks:


``components``
    1. each block labels the connected components of its foreground alone; its ids are made
       unique by the count of ids before it (:class:`~emseg.instances.stitch.IdTable`) and written;
    2. ids that touch across block faces are merged (:func:`~emseg.instances.stitch.face_pairs`,
       :func:`~emseg.instances.stitch.resolve_ids`), objects under ``min_size`` dropped and the
       rest numbered 1..N; 3. each block is relabelled through that map. The partition equals the
       connected components of the whole volume exactly, for every block grid.

``watershed``
    1. seeds (the connected components of the eroded low-boundary region) are labelled and merged
       across faces as above, so every seed has one global id; the erosion reads ``seed_erosion``
       voxels of context, which makes the seeds exact; 2. each block is flooded from the global
       seeds found in the block and its ``halo`` and keeps its inner part, so an object carries its
       seed's id in every block it reaches and needs no matching across faces; voxels no seed within
       the halo reached are then flooded from the objects written around their block; 3. objects
       under ``min_size`` are dropped and the rest numbered 1..N. A block differs from the whole-volume
       watershed only where a basin would be flooded from beyond the halo; with ``per_section``
       and blocks of whole sections the result equals the whole-volume one exactly.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import zarr

from emseg.engine.blocks import Block, plan_blocks
from emseg.instances.config import SegmentConfig, check_block
from emseg.instances.objects import crop, grow, label_mask, neighbourhood, seed_region, watershed_block
from emseg.instances.stitch import IdTable, face_pairs, resolve_ids
from emseg.io import auto_chunks, zarr_compressors
from emseg.io._store import staging_tag
from emseg.runtime.locks import clean_stale_temps

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SegmentStats:
    """What :func:`segment_maps` did: objects written, provisional ids, pairs merged across faces,
    objects removed by the size filter; for the watershed, the seeds and the voxels flooded from
    neighbouring blocks because no seed within their block's halo reached them."""

    n_objects: int
    provisional: int
    merged_pairs: int
    removed_small: int
    n_seeds: int | None = None
    refilled: int | None = None


def segment_maps(read_map: Callable[[tuple[slice, ...]], np.ndarray], shape: Sequence[int], config: SegmentConfig,
                 dest: Any, *, block_shape: Sequence[int], scratch: "Scratch",
                 progress: Progress | None = None) -> SegmentStats:
    """Objects of the map ``read_map(region)`` (see :func:`~emseg.instances.objects.object_map`) of a
    volume of ``shape``, written into ``dest`` (uint64, sliceable for writing and reading back)
    block by block; ``scratch`` holds the watershed's seeds."""
    shape = tuple(int(s) for s in shape)
    halo = config.halo_for(shape)
    check_block(block_shape, shape, halo)
    blocks = plan_blocks(shape, block_shape, (0,) * len(shape))
    structure = neighbourhood(len(shape), config.connectivity, config.per_section)
    passes = 3 if config.mode == "components" else 4
    tick = Ticker(progress, sum(b.size for b in blocks), passes)

    if config.mode == "components":
        table = _label_blocks(blocks, dest, structure, lambda b: read_map(b.inner), tick)
        pairs = _pairs(blocks, dest, shape, structure, tick)
        mapping, n_objects, found = resolve_ids(table.total, pairs, table.sizes, config.min_size)
        _relabel(blocks, dest, mapping, tick)
        return SegmentStats(n_objects, table.total, len(pairs), found - n_objects)

    seed_halo = config.seed_halo_for(shape)
    seeds = scratch.array("seeds", shape, np.uint64, block_shape)

    def seed_mask(block: Block) -> np.ndarray:
        region = grow(block.inner, seed_halo, shape)
        return crop(seed_region(read_map(region), config), region, block.inner)

    table = _label_blocks(blocks, seeds, structure, seed_mask, tick)
    pairs = _pairs(blocks, seeds, shape, structure, tick)
    seed_ids, n_seeds, _ = resolve_ids(table.total, pairs, table.sizes, config.seed_min_size)
    sizes = np.zeros(n_seeds + 1, dtype=np.int64)
    holes = []
    for block in blocks:
        region = grow(block.inner, halo, shape)
        boundary = read_map(region)
        inner = crop(watershed_block(boundary, seed_ids[np.asarray(seeds[region])], config), region, block.inner)
        dest[block.inner] = inner
        ids, counts = np.unique(inner, return_counts=True)
        np.add.at(sizes, ids.astype(np.int64), counts)
        if _unflooded(inner, crop(boundary, region, block.inner), config).any():
            holes.append(block)
        tick(block)
    refilled = _flood_holes(holes, read_map, shape, config, dest, sizes, scratch, block_shape)
    sizes[0] = 0
    mapping, n_objects, found = resolve_ids(n_seeds, np.zeros((0, 2), np.int64), sizes, config.min_size)
    _relabel(blocks, dest, mapping, tick)
    return SegmentStats(n_objects, table.total, len(pairs), found - n_objects, n_seeds=n_seeds, refilled=refilled)


def _unflooded(labels: np.ndarray, boundary: np.ndarray, config: SegmentConfig) -> np.ndarray:
    """Voxels left 0 inside the region the watershed floods (``mask_threshold``, or everywhere)."""
    zero = labels == 0
    return zero & (boundary < config.mask_threshold) if config.mask_threshold is not None else zero


def _flood_holes(holes: list[Block], read_map: Callable[[tuple[slice, ...]], np.ndarray], shape: tuple[int, ...],
                 config: SegmentConfig, dest: Any, sizes: np.ndarray, scratch: "Scratch",
                 block_shape: Sequence[int]) -> int:
    """Flood what no seed within a block's halo reached from the objects already written around it.

    A voxel left 0 inside the flooded region had its seed beyond the halo (the whole-volume
    watershed would have flooded it): each such block is flooded again from the ids written in
    it and around it (the halo, at least one voxel across each face that objects cross), and only
    its 0 voxels take the result. Rounds repeat while they fill anything; a round floods only from
    what was written before it (``scratch`` records the round of each filled voxel), so floods
    from both sides of a seedless stretch advance alike, block by block. Voxels no object can
    reach stay 0, as in the whole volume. Returns the voxels filled.
    """
    if not holes:
        return 0
    within = (0,) + (1,) * (len(shape) - 1) if config.per_section and len(shape) == 3 else (1,) * len(shape)
    reach = tuple(max(h, w) for h, w in zip(config.halo_for(shape), within))
    stamp = scratch.array("refilled", shape, np.uint32, block_shape)
    filled, round_ = 0, 0
    while holes:
        round_ += 1
        left, changed = [], False
        for block in holes:
            region = grow(block.inner, reach, shape)
            boundary, labels = read_map(region), np.asarray(dest[region])
            labels = np.where(np.asarray(stamp[region]) < round_, labels, 0)  # not what this round filled
            after = crop(watershed_block(boundary, labels, config), region, block.inner)
            before = crop(labels, region, block.inner).copy()  # only this block writes here: nothing masked
            new = (before == 0) & (after != 0)
            if new.any():
                before[new] = after[new]
                dest[block.inner] = before
                stamp[block.inner] = np.where(new, round_, np.asarray(stamp[block.inner]))
                ids, counts = np.unique(after[new], return_counts=True)
                np.add.at(sizes, ids.astype(np.int64), counts)
                filled += int(np.count_nonzero(new))
                changed = True
            if _unflooded(before, crop(boundary, region, block.inner), config).any():
                left.append(block)
        if not changed:
            break
        holes = left
    return filled


def _label_blocks(blocks: Sequence[Block], store: Any, structure: np.ndarray,
                  mask_of: Callable[[Block], np.ndarray], tick: "Ticker") -> IdTable:
    """Label each block's mask alone and write its ids, shifted to be unique, into ``store``."""
    table = IdTable()
    for block in blocks:
        labels, n = label_mask(mask_of(block), structure)
        offset = table.add(np.bincount(labels.ravel(), minlength=n + 1)[1:])
        out = labels.astype(np.uint64)
        out[labels > 0] += np.uint64(offset)
        store[block.inner] = out
        tick(block)
    return table


def _pairs(blocks: Sequence[Block], store: Any, shape: tuple[int, ...], structure: np.ndarray,
           tick: "Ticker") -> np.ndarray:
    found = []
    for block in blocks:
        found.append(face_pairs(store, block.inner, shape, structure))
        tick(block)
    return np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), np.uint64)


def _relabel(blocks: Sequence[Block], dest: Any, mapping: np.ndarray, tick: "Ticker") -> None:
    for block in blocks:
        dest[block.inner] = mapping[np.asarray(dest[block.inner])]
        tick(block)


class Ticker:
    """``progress(done, total)`` over every pass of the blocks (a pass = each block once)."""

    def __init__(self, progress: Progress | None, voxels: int, passes: int, done_passes: int = 0):
        self.progress, self.voxels = progress, voxels
        self.total = voxels * passes
        self.done = voxels * done_passes
        if progress is not None:
            progress(self.done, self.total)

    def __call__(self, block: Block) -> None:
        self.done += block.size
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)


class Scratch:
    """Intermediate arrays of one run: zarr arrays in a hidden folder beside the output
    (``.NAME.segment.tmp-PID-RANDOM``, removed on close; a dead run's folder is removed by the next
    run), or numpy arrays in memory when ``near`` is None."""

    def __init__(self, near: Path | None = None):
        self.folder: Path | None = None
        if near is not None:
            near = Path(near)
            clean_stale_temps(near.parent, [f"{near.name}.segment"])
            self.folder = near.parent / f".{near.name}.segment.{staging_tag()}"
            self.folder.mkdir(parents=True)

    def array(self, name: str, shape: Sequence[int], dtype: Any, block_shape: Sequence[int]) -> Any:
        if self.folder is None:
            return np.zeros(tuple(shape), dtype=dtype)
        dtype = np.dtype(dtype)
        chunks = tuple(min(c, b) for c, b in zip(auto_chunks(shape, dtype.itemsize), block_shape))
        return zarr.create_array(store=str(self.folder / name), shape=tuple(shape), dtype=dtype, chunks=chunks,
                                 compressors=zarr_compressors(dtype), fill_value=0)

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
