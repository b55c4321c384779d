"""Objects from a semantic network, block by block with consistent ids (the core of ``emseg segment``).

:func:`segment_file` runs the network of an ``emseg train`` checkpoint over a raw volume block by
block (:func:`~emseg.engine.inference.predict_volume`) and keeps, per voxel, only what the mode
reads (:func:`~emseg.instances.objects.object_map`: a foreground mask or a boundary probability)
in a scratch array beside the output; :func:`segment_probabilities` does the same from class
probabilities already on disk (``emseg predict``'s (C, *S) output) or in memory. Both then run
:func:`~emseg.instances.blockwise.segment_maps` (modes and their exactness there).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from emseg.engine.blocks import default_block_shape, plan_blocks
from emseg.engine.inference import predict_volume, predictor_for
from emseg.errors import InputError
from emseg.instances.blockwise import Progress, Scratch, SegmentStats, segment_maps
from emseg.instances.config import SegmentConfig, default_segment_block
from emseg.instances.objects import map_dtype, object_map
from emseg.io import (VolumeSpec, auto_chunks, check_distinct, check_output_volume, check_overwrite, check_raw,
                      create_volume, open_volume)
from emseg.models.loading import open_for_volume, read_for_volume
from emseg.runtime.precision import DEFAULT_PRECISION
from emseg.semantic.predict import PredictConfig, check_options



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

    def __post_init__(self) -> None:
        network = self.model is not None or self.input is not None
        if network and self.probabilities is not None:
            raise InputError("give either a `model` and an `input`, or `probabilities`, not both")
        if not network and self.probabilities is None:
            raise InputError("give a `model` and an `input`, or `probabilities`")
        if network and (self.model is None or self.input is None):
            raise InputError("the network form needs both a `model` and an `input`")

    def predict_config(self) -> PredictConfig:
        """The same run as an :class:`~emseg.semantic.predict.PredictConfig` (its checks are reused)."""
        return PredictConfig(model=str(self.model), input=str(self.input), output=self.output,
                             patch_shape=self.patch_shape, overlap=self.overlap, blend=self.blend,
                             batch_size=self.batch_size, block_shape=self.segment.block_shape, device=self.device,
                             precision=self.precision, compile=self.compile, overwrite=self.overwrite)



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
                          progress: Progress | None = None) -> SegmentResult:
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

    Examples
    --------
    >>> probs = np.stack([1 - fg, fg])  # doctest: +SKIP
    >>> labels = np.zeros(fg.shape, np.uint64)  # doctest: +SKIP
    >>> segment_probabilities(probs, SegmentConfig(classes=(1,), min_size=10), labels).n_objects  # doctest: +SKIP
    12
    """
    start = time.perf_counter()
    if isinstance(probs, (str, Path, VolumeSpec)):
        if not isinstance(out, np.ndarray):
            check_distinct(str(probs), str(out))
        with open_volume(str(probs)) as volume:
            return _segment_reader(ProbabilityReader(volume, source=str(volume.spec)), config, out, start,
                                   overwrite=overwrite, progress=progress, source=str(probs),
                                   chunks=volume.chunks)
    return _segment_reader(ProbabilityReader(probs), config, out, start, overwrite=overwrite, progress=progress,
                           source=None, chunks=getattr(probs, "chunks", None))


def _segment_reader(reader: ProbabilityReader, config: SegmentConfig, out: Any, start: float, *, overwrite: bool,
                    progress: Progress | None, source: str | None, chunks: Any) -> SegmentResult:
    shape = reader.shape
    config.check_for(shape, reader.n_classes, source=source)
    halo = config.halo_for(shape)
    spatial = tuple(chunks[1:]) if chunks and len(chunks) == len(shape) + 1 else (1,) * len(shape)
    block_shape = tuple(config.block_shape) if config.block_shape else default_segment_block(
        shape, default_block_shape(shape, (1,) * len(shape), spatial), halo)

    def read_map(region: tuple[slice, ...]) -> np.ndarray:
        return object_map(reader(region), config)

    if isinstance(out, np.ndarray):
        if out.shape != shape or out.dtype != np.uint64:
            raise InputError(f"the output array must be uint64 of shape {shape}, got {out.dtype} {out.shape}")
        stats = segment_maps(read_map, shape, config, out, block_shape=block_shape, scratch=Scratch(None),
                             progress=progress)
        output = "<array>"
    else:
        out_spec = check_output_volume(out)
        check_overwrite(out_spec, overwrite=overwrite)
        attrs = output_attrs(config, source=source)
        with create_volume(out_spec, shape, np.uint64, chunks=_chunks(shape, block_shape), attrs=attrs,
                           overwrite=overwrite) as dest, Scratch(out_spec.path) as scratch:
            stats = segment_maps(read_map, shape, config, dest, block_shape=block_shape, scratch=scratch,
                                 progress=progress)
        output = str(out_spec)
    return SegmentResult(output, shape, block_shape, halo, len(plan_blocks(shape, block_shape, (0,) * len(shape))),
                         time.perf_counter() - start, stats, config)


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


def segment_file(config: SegmentFileConfig, *, progress: Progress | None = None, client: Any = None) -> SegmentResult:
    """``emseg segment``: objects of ``config.input`` by the network ``config.model`` (or from
    ``config.probabilities``) into ``config.output`` (uint64), block by block with consistent ids.

    The output is written under a temporary name and renamed when complete; nothing is written
    when the input is refused. ``client`` is not used (segmentation runs in this process).
    """
    if client is not None:
        raise InputError("`segment` runs in this process; a dask client is not supported")
    if config.probabilities is not None:
        return segment_probabilities(config.probabilities, config.segment, config.output,
                                     overwrite=config.overwrite, progress=progress)
    start = time.perf_counter()
    seg = config.segment
    check_distinct(config.input, config.output)
    pconfig = config.predict_config()
    check_options(pconfig)
    out_spec = check_output_volume(config.output)
    check_overwrite(out_spec, overwrite=config.overwrite)
    with open_volume(config.input) as source:
        check_raw(source)
        shape = source.shape
        checkpoint = read_for_volume(config.model, shape, patch_shape=config.patch_shape)
        seg.check_for(shape, max(2, checkpoint.n_classes), source=str(config.model))
        opened = open_for_volume(checkpoint, device=config.device, precision=config.precision,
                                 compile_=config.compile)
        patch = checkpoint.patch
        halo = seg.halo_for(shape)
        block_shape = tuple(seg.block_shape) if seg.block_shape else default_segment_block(
            shape, default_block_shape(shape, patch, auto_chunks(shape, 4)), halo)
        predictor = predictor_for(opened, patch, pconfig.window)
        attrs = output_attrs(seg, source=str(config.input), model=str(Path(config.model)))
        attrs.update(patch_shape=list(patch), overlap=config.overlap, precision=opened.precision.name)
        blocks = plan_blocks(shape, block_shape, [p // 2 for p in patch])
        total = sum(b.size for b in blocks)
        passes = 4 if seg.mode == "components" else 5

        def network_progress(done: int, _total: int) -> None:
            if progress is not None:
                progress(done, total * passes)

        def rest_progress(done: int, _total: int) -> None:
            if progress is not None:
                progress(total + done, total * passes)

        with create_volume(out_spec, shape, np.uint64, chunks=_chunks(shape, block_shape), attrs=attrs,
                           overwrite=config.overwrite) as dest, Scratch(out_spec.path) as scratch:
            maps = scratch.array("map", shape, map_dtype(seg), block_shape)
            predict_volume(predictor, source, _MapWriter(maps, seg), blocks=blocks, output_type="probabilities",
                           progress=network_progress)
            stats = segment_maps(lambda region: np.asarray(maps[region]), shape, seg, dest, block_shape=block_shape,
                                 scratch=scratch, progress=rest_progress)
    return SegmentResult(str(out_spec), shape, block_shape, halo, len(blocks),
                         time.perf_counter() - start, stats, seg, patch_shape=patch,
                         precision=opened.precision.name)
