"""Objects from a semantic network, block by block with consistent ids (the core of ``emseg segment``).

:func:`segment_file` runs the network of an ``emseg train`` checkpoint over a raw volume block by
block (:func:`~emseg.engine.inference.predict_volume`) and keeps, per voxel, only what the mode
reads (:func:`~emseg.instances.objects.object_map`: a foreground mask or a boundary probability)
in a scratch array beside the output; :func:`segment_probabilities` does the same from class
probabilities already on disk (``emseg predict``'s (C, *S) output) or in memory. Both then run
:func:`~emseg.instances.blockwise.segment_maps` (modes and their exactness there).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from emseg.engine.blocks import Block, default_block_shape, plan_blocks
from emseg.engine.inference import PredictJob, predict_volume, predictor_for
from emseg.engine.resumable import check_resumable_options, resumable_zarr
from emseg.errors import InputError
from emseg.instances.blockwise import Progress, Runner, Scratch, SegmentStats, Ticker, Work, segment_maps
from emseg.instances.config import SegmentConfig, default_segment_block
from emseg.instances.objects import map_dtype, object_map
from emseg.io import (VolumeSpec, auto_chunks, check_distinct, check_output_volume, check_overwrite, check_raw,
                      create_volume, open_volume, parse_spec)
from emseg.models.loading import forget_opened, open_for_volume, read_for_volume
from emseg.runtime.precision import DEFAULT_PRECISION
from emseg.semantic.predict import PredictConfig, check_options



@dataclass(frozen=True)
class BlockwiseOptions:
    """How the blocks of every pass run: in this process (the default), keeping finished blocks
    for a rerun (``resume``; zarr OUT only), or on dask.distributed (``scheduler`` "local" with
    ``workers`` processes, or "tcp://HOST:PORT"; an open ``client`` instead), which implies
    ``resume``; ``retries`` extra attempts of a failing block."""

    resume: bool = False
    scheduler: str | None = None
    workers: int | None = None
    retries: int = 2
    client: Any = None

    @property
    def resumable(self) -> bool:
        return self.resume or self.distributed

    @property
    def distributed(self) -> bool:
        return self.scheduler is not None or self.client is not None

    def check(self, output: Any) -> None:
        if isinstance(output, np.ndarray):
            if self.resumable or self.workers is not None:
                raise InputError("`resume` and `scheduler` write a zarr output, not an array in memory")
            return
        check_resumable_options(str(output), scheduler=self.scheduler, workers=self.workers, resume=self.resumable,
                                client=self.client, command="segment", example="cells.zarr/ids")

    def runner(self, source: str | None) -> Runner:
        return Runner(self.resumable, self.scheduler, self.workers, self.client, self.retries, source)


@dataclass(frozen=True)
class SegmentFileConfig:
    """``emseg segment``: where from (a checkpoint and raw volume, or probabilities) and where to.

    Either ``model`` and ``input`` (the network runs, windowed like ``emseg predict``) or
    ``probabilities`` (a (C, *S) volume of class probabilities, float or uint8 scaled by its
    ``scale`` attribute, as ``emseg predict`` writes it).
    """

    output: str
    model: str | None = None
    input: str | None = None
    probabilities: str | None = None
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    patch_shape: tuple[int, ...] | None = None  # default: the training patch
    overlap: float = 0.25
    blend: str = "gaussian"
    batch_size: int | None = None  # default: 1 on a CPU, 4 on a GPU
    device: str = "auto"
    precision: str = DEFAULT_PRECISION
    compile: bool = False
    #: Replace an existing OUTPUT (a dataset of an HDF5 file, a zarr array or store); refused otherwise.
    overwrite: bool = False
    #: Run the blocks on dask.distributed ("local" or "tcp://HOST:PORT"); implies ``resume``.
    scheduler: str | None = None
    workers: int | None = None
    #: Keep finished blocks of every pass, so that a rerun computes only what is missing (zarr OUT).
    resume: bool = False
    retries: int = 2

    def __post_init__(self) -> None:
        network = self.model is not None or self.input is not None
        if network and self.probabilities is not None:
            raise InputError("give either a `model` and an `input`, or `probabilities`, not both")
        if not network and self.probabilities is None:
            raise InputError("give a `model` and an `input`, or `probabilities`")
        if network and (self.model is None or self.input is None):
            raise InputError("the network form needs both a `model` and an `input`")
        if self.retries < 0:
            raise InputError(f"`retries` must be >= 0, got {self.retries}")

    def blockwise(self, client: Any = None) -> BlockwiseOptions:
        return BlockwiseOptions(self.resume, self.scheduler, self.workers, self.retries, client)

    def predict_config(self) -> PredictConfig:
        """The same run as an :class:`~emseg.semantic.predict.PredictConfig` (its checks are reused)."""
        return PredictConfig(model=str(self.model), input=str(self.input), output=self.output,
                             patch_shape=self.patch_shape, overlap=self.overlap, blend=self.blend,
                             batch_size=self.batch_size, block_shape=self.segment.block_shape, device=self.device,
                             precision=self.precision, compile=self.compile, overwrite=self.overwrite,
                             scheduler=self.scheduler, workers=self.workers, resume=self.resume, retries=self.retries)



@dataclass(frozen=True)
class SegmentResult:
    """What :func:`segment_probabilities` or :func:`segment_file` wrote (the mode is the config's,
    the object count the stats')."""

    output: str
    shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    halo: tuple[int, ...]
    blocks: int
    seconds: float
    stats: SegmentStats
    config: SegmentConfig
    #: The network's window and precision (None from probabilities).
    patch_shape: tuple[int, ...] | None = None
    precision: str | None = None

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def n_objects(self) -> int:
        return self.stats.n_objects

    @property
    def voxels_per_s(self) -> float:
        voxels = int(np.prod(self.shape))
        return voxels / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        out = {"output": self.output, "shape": list(self.shape), "mode": self.mode, "n_objects": self.n_objects,
               "block_shape": list(self.block_shape), "halo": list(self.halo), "blocks": self.blocks,
               "seconds": round(self.seconds, 3), "voxels_per_s": round(self.voxels_per_s, 1),
               "provisional_ids": self.stats.provisional, "merged_pairs": self.stats.merged_pairs,
               "removed_small": self.stats.removed_small, "config": self.config.to_dict()}
        if self.stats.n_seeds is not None:
            out.update(n_seeds=self.stats.n_seeds, refilled_voxels=self.stats.refilled)
        if self.patch_shape is not None:
            out.update(patch_shape=list(self.patch_shape), precision=self.precision)
        return out


# --------------------------------------------------------------------------------------------
# from probabilities
# --------------------------------------------------------------------------------------------

class ProbabilityReader:
    """Class probabilities (C, *S) as float32: a float array as it is, an integer one times its
    ``scale`` attribute (``emseg predict --dtype uint8`` writes 1/255)."""

    def __init__(self, array: Any, *, source: str = "probabilities"):
        self.array, self.source = array, source
        shape = tuple(int(s) for s in array.shape)
        if len(shape) not in (3, 4):
            raise InputError(f"probabilities must be (C, y, x) or (C, z, y, x), found {len(shape)}D {shape}",
                             source=source)
        attrs = _attrs(array)
        if attrs.get("output_type") not in (None, "probabilities"):
            raise InputError(f"holds {attrs['output_type']}, not class probabilities (write them with "
                             f"`emseg predict --output-type probabilities`)", source=source)
        dtype = np.dtype(array.dtype)
        if dtype.kind not in "fiu" or dtype == np.bool_:
            raise InputError(f"probabilities must be float or integer, found {dtype}", source=source)
        self.n_channels = shape[0]
        if "n_classes" in attrs and int(attrs["n_classes"]) != self.n_channels:
            raise InputError(f"has {self.n_channels} channels but its n_classes attribute says {attrs['n_classes']}",
                             source=source)
        self.shape = shape[1:]
        self.scale = None
        if dtype.kind in "iu":
            self.scale = float(attrs.get("scale", 1 / 255 if dtype == np.uint8 else 1.0))

    @property
    def n_classes(self) -> int:
        """Classes the maps can name (one sigmoid channel stands for two: background and object)."""
        return max(2, self.n_channels)

    def __call__(self, region: tuple[slice, ...]) -> np.ndarray:
        """The probabilities of ``region``, checked: finite, and summing to 1 over the classes (or
        in [0, 1] for one channel), so that a raw volume given by mistake is refused."""
        data = np.asarray(self.array[(slice(None),) + tuple(region)])
        if self.scale is not None:
            data = data.astype(np.float32) * np.float32(self.scale)
        else:
            data = data.astype(np.float32, copy=False)
        where = ", ".join(f"{s.start}:{s.stop}" for s in region)
        if not np.all(np.isfinite(data)):
            raise InputError(f"probabilities are not finite in [{where}]", source=self.source)
        if data.size:
            if len(data) == 1:
                off = max(0.0, -float(data.min()), float(data.max()) - 1)
            else:
                off = float(np.abs(data.sum(axis=0) - 1).max())
            if off > PROBABILITY_TOLERANCE:
                what = "lie outside [0, 1]" if len(data) == 1 else "do not sum to 1 over the channels"
                raise InputError(f"values {what} (by up to {off:.3g}) in [{where}]: not class probabilities "
                                 f"(C, *S) of `emseg predict`", source=self.source)
        return data


#: How far probabilities may sum from 1 (uint8 storage rounds each channel by up to 0.5 / 255).
PROBABILITY_TOLERANCE = 0.05


def _attrs(array: Any) -> dict:
    try:
        return dict(getattr(array, "attrs", {}) or {})
    except Exception:
        return {}


def segment_probabilities(probs: Any, config: SegmentConfig, out: Any, *, overwrite: bool = False,
                          progress: Progress | None = None,
                          blockwise: BlockwiseOptions = BlockwiseOptions()) -> SegmentResult:
    """Objects from class probabilities (C, *S), without a network.

    Parameters
    ----------
    probs : str, VolumeSpec or array
        A volume spec (``pred.zarr/probs``, ``pred.h5:probs``) opened lazily, or an array (numpy,
        zarr, h5py) of float probabilities or integers scaled by their ``scale`` attribute.
    config : SegmentConfig
    out : str, VolumeSpec or numpy.ndarray
        An output spec, written under a temporary name and renamed when complete (zarr,
        ``.ome.zarr`` as a label image, HDF5 or ``.tif``); or a uint64 array of shape S, filled in place.
    overwrite : bool
        Replace an existing output (refused otherwise).
    progress : callable, optional
        ``progress(done, total)`` over the passes.
    blockwise : BlockwiseOptions
        Resume, or run on dask.distributed (then ``probs`` must be a spec that workers can open).

    Examples
    --------
    >>> probs = np.stack([1 - fg, fg])  # doctest: +SKIP
    >>> labels = np.zeros(fg.shape, np.uint64)  # doctest: +SKIP
    >>> segment_probabilities(probs, SegmentConfig(classes=(1,), min_size=10), labels).n_objects  # doctest: +SKIP
    12
    """
    start = time.perf_counter()
    blockwise.check(out)
    if isinstance(probs, (str, Path, VolumeSpec)):
        if not isinstance(out, np.ndarray):
            check_distinct(str(probs), str(out))
        with open_volume(str(probs)) as volume:
            reader = ProbabilityReader(volume, source=str(volume.spec))
            spec = volume.spec
            source = str(type(spec)(Path(spec.path).resolve(), spec.key, spec.fmt))
            return _segment_reader(reader, config, out, start, overwrite=overwrite, progress=progress,
                                   source=str(probs), chunks=volume.chunks, blockwise=blockwise,
                                   task_source=source if blockwise.resumable else reader)
    if blockwise.resumable:
        raise InputError("`resume` and `scheduler` read probabilities from a file (a volume spec), not an array")
    reader = ProbabilityReader(probs)
    return _segment_reader(reader, config, out, start, overwrite=overwrite, progress=progress, source=None,
                           chunks=getattr(probs, "chunks", None), blockwise=blockwise, task_source=reader)


def _segment_reader(reader: ProbabilityReader, config: SegmentConfig, out: Any, start: float, *, overwrite: bool,
                    progress: Progress | None, source: str | None, chunks: Any, blockwise: BlockwiseOptions,
                    task_source: Any) -> SegmentResult:
    shape = reader.shape
    config.check_for(shape, reader.n_classes, source=source)
    halo = config.halo_for(shape)
    spatial = tuple(chunks[1:]) if chunks and len(chunks) == len(shape) + 1 else (1,) * len(shape)
    block_shape = tuple(config.block_shape) if config.block_shape else default_segment_block(
        shape, default_block_shape(shape, (1,) * len(shape), spatial), halo)
    params = {"probabilities": task_source if isinstance(task_source, str) else None, "shape": list(shape),
              "channels": reader.n_channels, "dtype": str(np.dtype(reader.array.dtype)), "scale": reader.scale,
              **(file_stamp(task_source) if isinstance(task_source, str) else {})}

    def make_map(work: Work, run: Runner, tick: Ticker) -> None:
        run("map", functools.partial(_probability_map_task, source=task_source, work=work, config=config),
            work.blocks, work, tick)

    stats, output = _write(out, shape, block_shape, config, make_map, overwrite=overwrite, progress=progress,
                           attrs=output_attrs(config, source=source), params=params, blockwise=blockwise)
    return SegmentResult(output, shape, block_shape, halo, len(plan_blocks(shape, block_shape, (0,) * len(shape))),
                         time.perf_counter() - start, stats, config)


def _probability_map_task(block: Block, *, source: ProbabilityReader | str, work: Work, config: SegmentConfig) -> None:
    """The object map of a block of probabilities (read here, or opened by spec in a worker)."""
    if isinstance(source, str):
        with open_volume(source) as volume:
            probs = ProbabilityReader(volume, source=source)(block.inner)
    else:
        probs = source(block.inner)
    work["map"][block.inner] = object_map(probs, config)


def _write(out: Any, shape: tuple[int, ...], block_shape: tuple[int, ...], config: SegmentConfig,
           make_map: Callable[[Work, Runner, Ticker], None], *, overwrite: bool, progress: Progress | None,
           attrs: dict[str, Any], params: dict[str, Any], blockwise: BlockwiseOptions) -> tuple[SegmentStats, str]:
    """The passes of a run into ``out``: ``make_map`` fills the work array ``"map"`` (one pass),
    then :func:`~emseg.instances.blockwise.segment_maps`.

    Into an array in memory; into a new output written under a temporary name (work arrays in a
    hidden folder beside it); or, resumable, into the fixed ``.partial`` zarr array of
    :func:`~emseg.engine.resumable.resumable_zarr`, whose ``.work`` folder keeps every pass's
    finished blocks until the output is complete.
    """
    passes = 4 if config.mode == "components" else 5
    tick = Ticker(progress, int(np.prod(shape)), passes)

    def passes_into(work: Work, run: Runner) -> SegmentStats:
        work.create("map", map_dtype(config))
        make_map(work, run, tick)
        return segment_maps(work, config, run=run, tick=tick)

    if isinstance(out, np.ndarray):
        if out.shape != shape or out.dtype != np.uint64:
            raise InputError(f"the output array must be uint64 of shape {shape}, got {out.dtype} {out.shape}")
        return passes_into(Work(shape, block_shape, dest=out), Runner()), "<array>"
    if not blockwise.resumable:
        out_spec = check_output_volume(out)
        check_overwrite(out_spec, overwrite=overwrite)
        with create_volume(out_spec, shape, np.uint64, chunks=_chunks(shape, block_shape), attrs=attrs,
                           overwrite=overwrite) as dest, Scratch(out_spec.path) as scratch:
            stats = passes_into(Work(shape, block_shape, scratch.folder, dest=dest), Runner())
        return stats, str(out_spec)
    out_spec = parse_spec(out)
    plan = Work(shape, block_shape, tiled=True)
    plan.check_chunks(config)
    chunks = plan.chunks(np.uint64)
    params = dict(params, segment=config.to_dict(), block_shape=list(block_shape))
    with resumable_zarr(out_spec, shape, np.uint64, chunks, attrs=attrs, params=params, what=str(out_spec),
                        overwrite=overwrite) as part:
        folder = part.path / WORK_DIR
        folder.mkdir(exist_ok=True)
        work = Work(shape, block_shape, folder, dest_location=(part.store, part.key), tiled=True)
        runner = dataclasses.replace(blockwise.runner(str(out_spec)), hint=part.hint)
        with runner.connected() as run:
            stats = passes_into(work, run)
        # the markers first: a run killed while the work folder goes recomputes, never reads what is gone
        work.release()
        shutil.rmtree(folder / ".done", ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    return stats, str(out_spec)


def file_stamp(spec: str) -> dict[str, Any]:
    """Size and modification time of the file behind a volume spec (for a zarr or N5 array, its
    metadata file): an input replaced between a run and its resumption is noticed."""
    parsed = parse_spec(spec)
    base = parsed.path / parsed.key if parsed.key and parsed.path.is_dir() else parsed.path
    files = [base] if base.is_file() else [base / name for name in ("zarr.json", ".zarray", "attributes.json")
                                           if (base / name).is_file()]
    stats = [f.stat() for f in files]
    return {"input_size": sum(st.st_size for st in stats),
            "input_mtime_ns": max((st.st_mtime_ns for st in stats), default=0)}


#: The folder of a resumable run's work arrays and per-block results, inside its ``.partial`` output.
WORK_DIR = ".work"


def output_attrs(config: SegmentConfig, *, source: str | None, model: str | None = None) -> dict[str, Any]:
    """The attributes of an instance output: the mode and every parameter (as JSON text, which
    HDF5, zarr and TIFF all keep), and what it came from."""
    attrs: dict[str, Any] = {"output_type": "instances", "mode": config.mode,
                             "segment": json.dumps(config.to_dict(), sort_keys=True)}
    if source is not None:
        attrs["source"] = str(source)
    if model is not None:
        attrs["model"] = str(model)
    return attrs


def _chunks(shape: Sequence[int], block_shape: Sequence[int]) -> tuple[int, ...]:
    """uint64 chunks of about 1 MiB, none larger than a block."""
    return tuple(min(c, b) for c, b in zip(auto_chunks(shape, 8), block_shape))


# --------------------------------------------------------------------------------------------
# with the network
# --------------------------------------------------------------------------------------------

class _MapWriter:
    """Takes the probabilities :func:`~emseg.engine.inference.predict_volume` writes for a block and
    stores only their :func:`~emseg.instances.objects.object_map`."""

    def __init__(self, store: Any, config: SegmentConfig):
        self.store, self.config = store, config

    def __setitem__(self, index: tuple, probs: np.ndarray) -> None:
        self.store[tuple(index[1:])] = object_map(probs, self.config)


def _network_map_task(block: Block, *, job: PredictJob, work: Work, config: SegmentConfig) -> None:
    """Worker side of the network pass: a block's probabilities, kept as its object map."""
    work["map"][block.inner] = object_map(job.predict(block), config)


def segment_file(config: SegmentFileConfig, *, progress: Progress | None = None, client: Any = None) -> SegmentResult:
    """``emseg segment``: objects of ``config.input`` by the network ``config.model`` (or from
    ``config.probabilities``) into ``config.output`` (uint64), block by block with consistent ids.

    In this process the output is written under a temporary name and renamed when complete;
    nothing is written when the input is refused. With ``config.resume`` (zarr OUT) every pass
    keeps its finished blocks, so a rerun of a killed or failed run computes only what is
    missing; with ``config.scheduler`` (or ``client``, an open dask.distributed client) the blocks
    of every pass run on the cluster, resumable as well.
    """
    blockwise = config.blockwise(client)
    blockwise.check(config.output)
    if config.probabilities is not None:
        return segment_probabilities(config.probabilities, config.segment, config.output,
                                     overwrite=config.overwrite, progress=progress, blockwise=blockwise)
    start = time.perf_counter()
    seg = config.segment
    check_distinct(config.input, config.output)
    pconfig = config.predict_config()
    check_options(pconfig, resumable=blockwise.resumable, client=client)
    if not blockwise.resumable:
        check_overwrite(check_output_volume(config.output), overwrite=config.overwrite)
    with open_volume(config.input) as source:
        check_raw(source)
        shape = source.shape
        checkpoint = read_for_volume(config.model, shape, patch_shape=config.patch_shape)
        seg.check_for(shape, max(2, checkpoint.n_classes), source=str(config.model))
        # built here unless the blocks run on a remote scheduler (whose devices may differ)
        opened = open_for_volume(checkpoint, device=config.device, precision=config.precision,
                                 compile_=config.compile and not blockwise.resumable) \
            if config.scheduler in (None, "local") else None
        patch = checkpoint.patch
        halo = seg.halo_for(shape)
        block_shape = tuple(seg.block_shape) if seg.block_shape else default_segment_block(
            shape, default_block_shape(shape, patch, auto_chunks(shape, 4)), halo)
        precision = opened.precision.name if opened is not None else config.precision
        attrs = output_attrs(seg, source=str(config.input), model=str(Path(config.model)))
        attrs.update(patch_shape=list(patch), overlap=config.overlap, precision=precision)
        blocks = plan_blocks(shape, block_shape, [p // 2 for p in patch])
        if blockwise.resumable:
            job = PredictJob.for_run(config.model, config.input, shape, patch, pconfig.window, "probabilities",
                                     "float32", config.device)
            params = dict(job.params(), precision=config.precision, input_dtype=str(source.dtype))

            def make_map(work: Work, run: Runner, tick: Ticker) -> None:
                run("map", functools.partial(_network_map_task, job=job, work=work, config=seg), blocks, work, tick)
        else:
            predictor = predictor_for(opened, patch, pconfig.window)
            params = {}

            def make_map(work: Work, run: Runner, tick: Ticker) -> None:
                predict_volume(predictor, source, _MapWriter(work["map"], seg), blocks=blocks,
                               output_type="probabilities", progress=lambda done, _total: tick.reached(done))
                tick.passed()

        try:
            stats, output = _write(config.output, shape, block_shape, seg, make_map, overwrite=config.overwrite,
                                   progress=progress, attrs=attrs, params=params, blockwise=blockwise)
        finally:
            if blockwise.resumable and not blockwise.distributed:
                forget_opened()  # the tasks' network (opened once per process): not kept after the run
    return SegmentResult(output, shape, block_shape, halo, len(blocks), time.perf_counter() - start, stats, seg,
                         patch_shape=patch, precision=precision)
