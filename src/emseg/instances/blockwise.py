"""The blockwise post-processing of ``emseg segment``: objects from per-voxel maps, never holding
more than a block and its halo.

:func:`segment_maps` reads the map (a foreground mask or a boundary probability) that the caller
wrote into the run's :class:`Work` (array ``"map"``) and writes objects with ids consistent across
blocks. Each pass is a set of independent block tasks run by a :class:`Runner`: one after another
in this process, or through :func:`~emseg.engine.cluster.run_blocks` on a dask cluster and with
done markers per pass, so that a resumed run computes only what is missing. Tasks write their own
chunks of the work arrays and leave their small results (object counts, face pairs) as files; the
steps between passes (offsets, merging ids, the size filter) run in the calling process.


``components``
    1. each block labels the connected components of its foreground alone and writes its local
       ids; they are made unique by the count of ids in the blocks before it (:class:`GlobalIds`);
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

import contextlib
import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import zarr

from emseg.engine.blocks import Block, plan_blocks
from emseg.engine.cluster import DoneMarkers, fit_chunks, open_client, run_blocks
from emseg.instances.config import SegmentConfig, check_block
from emseg.instances.objects import crop, grow, label_mask, map_dtype, neighbourhood, seed_region, watershed_block
from emseg.instances.stitch import face_pairs, resolve_ids
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


# --------------------------------------------------------------------------------------------
# where the passes keep their arrays and results, and how they run
# --------------------------------------------------------------------------------------------

class Work:
    """The intermediate arrays and per-block results of one run, and its output ``dest``.

    On disk (``folder``): zarr arrays (``tiled``: chunks that tile the blocks, so that tasks in
    other processes never write one chunk together), one ``.npz`` per block and pass, and the id
    maps as ``.npy`` (memory-mapped by the tasks); a resumed run reopens all of them. In memory
    (``folder`` None): numpy arrays and dicts, for one process. ``dest`` is an open array, or
    ``dest_location`` (store, key) of a zarr array that each process opens.
    """

    def __init__(self, shape: Sequence[int], block_shape: Sequence[int], folder: Path | None = None, *,
                 dest: Any = None, dest_location: tuple[str, str] | None = None, tiled: bool = False):
        self.shape = tuple(int(s) for s in shape)
        self.block_shape = tuple(int(b) for b in block_shape)
        self.folder = Path(folder) if folder is not None else None
        self.dest_location = dest_location
        self.tiled = tiled
        self._dest = dest
        self._arrays: dict[str, Any] = {}
        self._results: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:
        if self.folder is None or self.dest_location is None:
            raise TypeError("this Work lives in one process (in memory, or with an open output)")
        return dict(self.__dict__, _dest=None, _arrays={}, _results={})

    @property
    def blocks(self) -> list[Block]:
        return plan_blocks(self.shape, self.block_shape, (0,) * len(self.shape))

    def chunks(self, dtype: Any) -> tuple[int, ...]:
        """Chunks of about 1 MiB of ``dtype``, none larger than a block (tiling it when ``tiled``)."""
        chunks = tuple(min(c, b, s) for c, b, s in
                       zip(auto_chunks(self.shape, np.dtype(dtype).itemsize), self.block_shape, self.shape))
        if not self.tiled:
            return chunks
        return fit_chunks(tuple(min(b, s) for b, s in zip(self.block_shape, self.shape)), chunks)

    def check_chunks(self, config: SegmentConfig) -> None:
        """Fail now, before any work, if an array of the run cannot be chunked to tile the blocks."""
        for dtype in (map_dtype(config), local_dtype(self.block_shape), np.uint32, np.uint64):
            self.chunks(dtype)

    def release(self) -> None:
        """Forget the open arrays and memory-mapped tables (before the folder is removed)."""
        self._arrays.clear()

    def create(self, name: str, dtype: Any) -> Any:
        """The work array ``name`` (zeros), or the one a killed run left."""
        if self.folder is None:
            array = self._arrays.get(name)
            if array is None:
                array = self._arrays[name] = np.zeros(self.shape, dtype=dtype)
            return array
        path = self.folder / name
        if (path / "zarr.json").exists():
            array = zarr.open_array(store=str(path), mode="r+")
        else:
            dtype = np.dtype(dtype)
            array = zarr.create_array(store=str(path), shape=self.shape, dtype=dtype, chunks=self.chunks(dtype),
                                      compressors=zarr_compressors(dtype), fill_value=0, overwrite=True)
        self._arrays[name] = array
        return array

    def __getitem__(self, name: str) -> Any:
        array = self._arrays.get(name)
        if array is None:
            array = self._arrays[name] = zarr.open_array(store=str(self.folder / name), mode="r+")
        return array

    @property
    def dest(self) -> Any:
        if self._dest is None:
            store, key = self.dest_location
            self._dest = zarr.open_array(store=store, path=key or None, mode="r+")
        return self._dest

    def put(self, kind: str, index: int, **values: Any) -> None:
        """Keep a block's results (small arrays) under ``kind``; on disk written under a temporary
        name and renamed, so a killed task leaves nothing half-written."""
        values = {k: np.asarray(v) for k, v in values.items()}
        if self.folder is None:
            self._results[(kind, int(index))] = values
            return
        folder = self.folder / kind
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{index}.{staging_tag()}.npz"
        with open(tmp, "wb") as fh:
            np.savez(fh, **values)
        os.replace(tmp, folder / f"{index}.npz")

    def get(self, kind: str, index: int) -> dict[str, np.ndarray]:
        if self.folder is None:
            return self._results[(kind, int(index))]
        with np.load(self.folder / kind / f"{int(index)}.npz", allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def save_table(self, name: str, table: np.ndarray) -> None:
        """An id map the tasks of the next pass read (on disk: ``NAME.npy``, renamed into place)."""
        if self.folder is None:
            self._arrays[name] = table
            return
        tmp = self.folder / f".{name}.{staging_tag()}.npy"
        np.save(tmp, table)
        os.replace(tmp, self.folder / f"{name}.npy")
        self._arrays.pop(name, None)

    def table(self, name: str) -> np.ndarray:
        table = self._arrays.get(name)
        if table is None:
            table = self._arrays[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        return table

    def markers(self, kind: str) -> DoneMarkers | None:
        return DoneMarkers(self.folder / ".done" / kind) if self.folder is not None else None


@dataclass
class Runner:
    """How a pass runs its block tasks: one after another in this process (``resumable`` False:
    a task's error propagates as it is), or through :func:`~emseg.engine.cluster.run_blocks`, with
    done markers per pass, here (``scheduler`` None) or on a dask cluster; ``source`` and ``hint``
    name the output and the advice of a :class:`~emseg.engine.cluster.BlockFailed`. Use it as a
    context manager: a ``scheduler`` is connected once for every pass."""

    resumable: bool = False
    scheduler: str | None = None
    workers: int | None = None
    client: Any = None
    retries: int = 2
    source: str | None = None
    hint: str | None = None

    @contextlib.contextmanager
    def connected(self) -> Iterator["Runner"]:
        if self.client is not None or self.scheduler is None:
            yield self
            return
        with open_client(self.scheduler, workers=self.workers) as client:
            yield Runner(self.resumable, None, None, client, self.retries, self.source, self.hint)

    @property
    def distributed(self) -> bool:
        return self.client is not None or self.scheduler is not None

    def __call__(self, kind: str, task: Callable[[Block], Any], blocks: Sequence[Block], work: Work,
                 tick: Callable[[Block], None]) -> None:
        if not self.resumable:
            for block in blocks:
                task(block)
                tick(block)
            return
        markers = work.markers(kind)
        finished = markers.done()
        for block in blocks:
            if block.index in finished:
                tick(block)
        extra = {"failure_hint": self.hint} if self.hint else {}
        run_blocks(task, blocks, scheduler=self.scheduler, workers=self.workers, client=self.client,
                   retries=self.retries, done=markers, on_done=lambda block, _result: tick(block),
                   failure_source=self.source, **extra)


class GlobalIds:
    """Provisional ids of the whole volume seen through the blocks' local ids: a voxel's local id
    plus the offset of the block holding it (the count of ids in the blocks before); 0 stays 0."""

    def __init__(self, local: Any, work: Work, offsets: np.ndarray):
        self.local, self.block_shape = local, work.block_shape
        grid = [-(-s // b) for s, b in zip(work.shape, work.block_shape)]
        self.strides = [int(np.prod(grid[a + 1:])) for a in range(len(grid))]  # plan_blocks numbers in C order
        self.offsets = np.asarray(offsets, dtype=np.uint64)

    def __getitem__(self, region: Sequence[slice]) -> np.ndarray:
        local = np.asarray(self.local[tuple(region)]).astype(np.uint64)
        axes = np.ix_(*[np.arange(s.start, s.stop) // b for s, b in zip(region, self.block_shape)])
        block = sum(ax * stride for ax, stride in zip(axes, self.strides))
        return np.where(local > 0, local + self.offsets[block], np.uint64(0))


def local_dtype(block_shape: Sequence[int]) -> np.dtype:
    """Block-local ids: uint32 unless a block could hold more objects."""
    return np.dtype(np.uint32 if int(np.prod(block_shape)) < 2**32 else np.uint64)


# --------------------------------------------------------------------------------------------
# the passes
# --------------------------------------------------------------------------------------------

def segment_maps(work: Work, config: SegmentConfig, *, run: Runner | None = None,
                 tick: Callable[[Block], None] = lambda block: None) -> SegmentStats:
    """Objects of ``work["map"]`` (see :func:`~emseg.instances.objects.object_map`) written into
    ``work.dest`` (uint64) block by block; ``tick(block)`` after each block of each pass (3 passes
    for components, 4 for the watershed)."""
    run = run or Runner()
    shape = work.shape
    check_block(work.block_shape, shape, config.halo_for(shape))
    blocks = work.blocks
    structure = neighbourhood(len(shape), config.connectivity, config.per_section)
    work.create("local", local_dtype(work.block_shape))
    watershed = config.mode == "watershed"

    run("label", functools.partial(_label_task, work=work, config=config, seeds=watershed), blocks, work, tick)
    counts = [work.get("label", b.index)["counts"] for b in blocks]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in counts])]).astype(np.uint64)
    total = int(offsets[-1])
    sizes = np.concatenate([np.zeros(1, np.int64)] + [np.asarray(c, np.int64) for c in counts])
    run("pairs", functools.partial(_pairs_task, work=work, structure=structure, offsets=offsets[:-1]),
        blocks, work, tick)
    found_pairs = [work.get("pairs", b.index)["pairs"] for b in blocks]
    pairs = np.unique(np.concatenate(found_pairs), axis=0) if found_pairs else np.zeros((0, 2), np.uint64)

    if not watershed:
        mapping, n_objects, found = resolve_ids(total, pairs, sizes, config.min_size)
        work.save_table("mapping", mapping)
        run("relabel", functools.partial(_relabel_task, work=work, offsets=offsets[:-1]), blocks, work, tick)
        return SegmentStats(n_objects, total, len(pairs), found - n_objects)

    seed_ids, n_seeds, _ = resolve_ids(total, pairs, sizes, config.seed_min_size)
    work.save_table("seed_ids", seed_ids)
    work.create("flooded", np.uint64)
    run("flood", functools.partial(_flood_task, work=work, config=config, offsets=offsets[:-1]), blocks, work, tick)
    sizes = np.zeros(n_seeds + 1, dtype=np.int64)
    holes = []
    for block in blocks:
        found = work.get("flood", block.index)
        np.add.at(sizes, found["ids"].astype(np.int64), found["counts"])
        if found["hole"]:
            holes.append(block)
    refilled = _flood_holes(holes, work, config, run, sizes)
    sizes[0] = 0
    mapping, n_objects, found = resolve_ids(n_seeds, np.zeros((0, 2), np.int64), sizes, config.min_size)
    work.save_table("mapping", mapping)
    run("relabel", functools.partial(_relabel_task, work=work, offsets=None), blocks, work, tick)
    return SegmentStats(n_objects, total, len(pairs), found - n_objects, n_seeds=n_seeds, refilled=refilled)


def _label_task(block: Block, *, work: Work, config: SegmentConfig, seeds: bool) -> None:
    """Label a block's foreground (or, for the watershed, its seed region) alone: local ids 1..n
    written into ``local``, their voxel counts kept."""
    shape = work.shape
    if seeds:
        region = grow(block.inner, config.seed_halo_for(shape), shape)
        mask = crop(seed_region(np.asarray(work["map"][region]), config), region, block.inner)
    else:
        mask = np.asarray(work["map"][block.inner])
    labels, n = label_mask(mask, neighbourhood(len(shape), config.connectivity, config.per_section))
    work["local"][block.inner] = labels.astype(work["local"].dtype)
    work.put("label", block.index, counts=np.bincount(labels.ravel(), minlength=n + 1)[1:])


def _pairs_task(block: Block, *, work: Work, structure: np.ndarray, offsets: np.ndarray) -> None:
    ids = GlobalIds(work["local"], work, offsets)
    work.put("pairs", block.index, pairs=face_pairs(ids, block.inner, work.shape, structure))


def _flood_task(block: Block, *, work: Work, config: SegmentConfig, offsets: np.ndarray) -> None:
    """Flood a block and its halo from the global seeds found there; keep the inner part."""
    shape = work.shape
    region = grow(block.inner, config.halo_for(shape), shape)
    boundary = np.asarray(work["map"][region])
    seeds = np.asarray(work.table("seed_ids")[GlobalIds(work["local"], work, offsets)[region]])
    inner = crop(watershed_block(boundary, seeds, config), region, block.inner)
    work["flooded"][block.inner] = inner
    ids, counts = np.unique(inner, return_counts=True)
    work.put("flood", block.index, ids=ids, counts=counts,
             hole=_unflooded(inner, crop(boundary, region, block.inner), config).any())


def _relabel_task(block: Block, *, work: Work, offsets: np.ndarray | None) -> None:
    """Final ids: the id map applied to the block's provisional ids (local ids plus ``offsets``,
    or the watershed's flooded seed ids). Reads work arrays only, so a repeated task writes the same."""
    ids = (GlobalIds(work["local"], work, offsets)[block.inner] if offsets is not None
           else np.asarray(work["flooded"][block.inner]))
    work.dest[block.inner] = np.asarray(work.table("mapping")[ids])


def _unflooded(labels: np.ndarray, boundary: np.ndarray, config: SegmentConfig) -> np.ndarray:
    """Voxels left 0 inside the region the watershed floods (its mask, or everywhere)."""
    zero = labels == 0
    mask = config.flood_mask(boundary)
    return zero & mask if mask is not None else zero


def _flood_holes(holes: list[Block], work: Work, config: SegmentConfig, run: Runner, sizes: np.ndarray) -> int:
    """Flood what no seed within a block's halo reached from the objects already written around it.

    A voxel left 0 inside the flooded region had its seed beyond the halo (the whole-volume
    watershed would have flooded it): each such block is flooded again from the ids written in
    it and around it (the halo, at least one voxel across each face that objects cross), and only
    its 0 voxels take the result. Rounds repeat while they fill anything; a round floods only from
    what was written before it (``stamp`` records the round of each filled voxel), so its blocks
    are independent tasks and floods from both sides of a seedless stretch advance alike, block by
    block. Voxels no object can reach stay 0, as in the whole volume. Adds the filled voxels to
    ``sizes``; returns their count.
    """
    if not holes:
        return 0
    work.create("stamp", np.uint32)
    filled, round_ = 0, 0
    while holes:
        round_ += 1
        kind = f"fill{round_}"
        run(kind, functools.partial(_fill_task, work=work, config=config, round_=round_), holes, work,
            lambda block: None)
        left, changed = [], False
        for block in holes:
            found = work.get(kind, block.index)
            np.add.at(sizes, found["ids"].astype(np.int64), found["counts"])
            filled += int(found["counts"].sum())
            changed |= bool(found["counts"].size)
            if found["hole"]:
                left.append(block)
        if not changed:
            break
        holes = left
    return filled


def _fill_task(block: Block, *, work: Work, config: SegmentConfig, round_: int) -> None:
    """One block of a flooding round: its 0 voxels flooded from the ids written before this round.

    Tasks of a round run in any order or at once: each reads the flooded ids and then their
    round stamps, and writes its stamps before its ids, so what another task of this round
    fills is seen either not at all or with its stamp, and masked alike.
    """
    shape = work.shape
    within = (0,) + (1,) * (len(shape) - 1) if config.per_section and len(shape) == 3 else (1,) * len(shape)
    reach = tuple(max(h, w) for h, w in zip(config.halo_for(shape), within))
    region = grow(block.inner, reach, shape)
    boundary = np.asarray(work["map"][region])
    labels = np.asarray(work["flooded"][region])
    labels = np.where(np.asarray(work["stamp"][region]) < round_, labels, 0)
    after = crop(watershed_block(boundary, labels, config), region, block.inner)
    before = crop(labels, region, block.inner).copy()
    new = (before == 0) & (after != 0)
    ids, counts = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    if new.any():
        before[new] = after[new]
        work["stamp"][block.inner] = np.where(new, round_, np.asarray(work["stamp"][block.inner]))
        work["flooded"][block.inner] = before
        ids, counts = np.unique(after[new], return_counts=True)
    work.put(f"fill{round_}", block.index, ids=ids, counts=counts,
             hole=_unflooded(before, crop(boundary, region, block.inner), config).any())


class Ticker:
    """``progress(done, total)`` over every pass of the blocks (a pass = each block once)."""

    def __init__(self, progress: Progress | None, voxels: int, passes: int, done_passes: int = 0):
        self.progress, self.voxels = progress, voxels
        self.total = voxels * passes
        self.done = voxels * done_passes
        if progress is not None:
            progress(self.done, self.total)

    def reached(self, done: int) -> None:
        """``done`` voxels of the current pass are done (a pass that reports voxels, not blocks)."""
        if self.progress is not None:
            self.progress(min(self.done + done, self.total), self.total)

    def passed(self) -> None:
        """A pass reported with :meth:`reached` is complete."""
        self.done += self.voxels

    def __call__(self, block: Block) -> None:
        self.done += block.size
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)


class Scratch:
    """A hidden folder beside the output for the work arrays of a run in one process
    (``.NAME.segment.tmp-PID-RANDOM``, removed on close; a dead run's folder is removed by the next
    run)."""

    def __init__(self, near: Path):
        near = Path(near)
        clean_stale_temps(near.parent, [f"{near.name}.segment"])
        self.folder = near.parent / f".{near.name}.segment.{staging_tag()}"
        self.folder.mkdir(parents=True)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
