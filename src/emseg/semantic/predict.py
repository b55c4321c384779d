"""Predict a volume on disk with a trained checkpoint (the core of ``emseg predict``).

:func:`predict_file` reads the checkpoint for the volume (:mod:`emseg.models.loading`), plans the
blocks, and predicts them in this process into an atomically renamed output; with a scheduler or
``resume`` its tasks (:func:`~emseg.engine.inference.predict_block_task`, one
:class:`~emseg.engine.inference.PredictJob` each) write their own chunks of a resumable zarr array
(:func:`emseg.engine.resumable.run_resumable`) in this process or on a dask cluster.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from emseg.data.values import PROBABILITY_DTYPES
from emseg.engine.blocks import default_block_shape, plan_blocks
from emseg.engine.cluster import fit_chunks
from emseg.engine.inference import (
    PredictJob,
    PredictStats,
    WindowOptions,
    output_shape,
    predict_volume,
    predictor_for,
)
from emseg.engine.resumable import check_resumable_options, run_resumable
from emseg.errors import InputError
from emseg.io import (
    auto_chunks,
    check_distinct,
    check_output_volume,
    check_raw,
    check_overwrite,
    create_volume,
    open_volume,
    parse_spec,
)
from emseg.models.loading import forget_opened, open_for_volume, read_for_volume
from emseg.runtime.precision import DEFAULT_PRECISION


@dataclass(frozen=True)
class PredictConfig:
    model: str
    input: str
    output: str
    patch_shape: tuple[int, ...] | None = None  # default: the training patch
    overlap: float = 0.25
    blend: str = "gaussian"
    #: Windows per forward pass; ``None``: 1 on a CPU, 4 on a GPU (:func:`~emseg.engine.inference.window_batch`).
    batch_size: int | None = None
    output_type: str = "probabilities"
    #: Sample type of probabilities: ``float32``, or ``uint8`` scaled to 0-255 (4x less to write).
    dtype: str = "float32"
    block_shape: tuple[int, ...] | None = None
    device: str = "auto"
    #: ``auto | fp32 | bf16`` (see :mod:`emseg.runtime.precision`).
    precision: str = DEFAULT_PRECISION
    #: Run the network through ``torch.compile`` (a one-off compile cost per process).
    compile: bool = False
    #: ``None`` runs in this process; ``"local"`` a LocalCluster of ``workers`` processes;
    #: ``"tcp://HOST:PORT"`` a running dask scheduler (see :mod:`emseg.engine.cluster`).
    scheduler: str | None = None
    workers: int | None = None
    #: Write into a fixed ``.partial`` zarr and skip the blocks already done (always on with a scheduler).
    resume: bool = False
    retries: int = 2
    #: Replace an existing OUTPUT (a dataset of an HDF5 file, a zarr array or store); refused otherwise.
    overwrite: bool = False

    @property
    def window(self) -> WindowOptions:
        """The sliding-window part of this config, as :func:`~emseg.engine.inference.predictor_for` takes it."""
        return WindowOptions(precision=self.precision, overlap=self.overlap, blend=self.blend,
                             batch_size=self.batch_size, compile=self.compile)


@dataclass(frozen=True)
class PredictResult:
    output: str
    shape: tuple[int, ...]
    n_classes: int
    patch_shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    stats: PredictStats
    #: What ran: ``fp32`` or ``bf16`` (``auto`` resolved).
    precision: str
    #: Blocks computed in this call and blocks found already done (resumable runs only).
    blocks_computed: int | None = None
    blocks_skipped: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "output": self.output, "shape": list(self.shape), "n_classes": self.n_classes,
            "patch_shape": list(self.patch_shape), "block_shape": list(self.block_shape),
            "precision": self.precision,
            "voxels": self.stats.voxels, "blocks": self.stats.blocks,
            "seconds": round(self.stats.seconds, 3), "voxels_per_s": round(self.stats.voxels_per_s, 1),
        }
        if self.blocks_computed is not None:
            out.update(blocks_computed=self.blocks_computed, blocks_skipped=self.blocks_skipped)
        return out


def check_options(config: PredictConfig, *, resumable: bool = False, client: Any = None) -> None:
    """Prediction options that are user input: ranges checked with the parameter named; with
    ``resumable`` also the output a resumable run can write (plain zarr) and the cluster options."""
    if resumable or config.workers is not None:
        check_resumable_options(config.output, scheduler=config.scheduler, workers=config.workers,
                                resume=resumable, client=client)
    if not 0 <= config.overlap < 1:
        raise InputError(f"`overlap` must be in [0, 1), got {config.overlap}")
    if config.batch_size is not None and config.batch_size < 1:
        raise InputError(f"`batch_size` must be >= 1, got {config.batch_size}")
    if config.blend not in ("gaussian", "constant"):
        raise InputError(f"`blend` must be gaussian or constant, got {config.blend!r}")
    if config.output_type not in ("probabilities", "labels"):
        raise InputError(f"`output_type` must be probabilities or labels, got {config.output_type!r}")
    if config.dtype not in PROBABILITY_DTYPES:
        raise InputError(f"`dtype` must be {' or '.join(PROBABILITY_DTYPES)}, got {config.dtype!r}")


def output_dtype(config: PredictConfig) -> np.dtype:
    """What is stored: uint8 labels, or probabilities as ``config.dtype``."""
    return np.dtype("uint8" if config.output_type == "labels" else config.dtype)


def predict_file(config: PredictConfig, *, progress: Callable[[int, int], None] | None = None,
                 client: Any = None) -> PredictResult:
    """Sliding-window prediction of ``config.input`` into ``config.output``, block by block.

    In this process the output is written under a temporary name and renamed when complete.
    Probabilities are stored channel-first (C, *S) as float32 (or uint8, ``config.dtype``); labels
    as uint8 argmax. With ``config.scheduler`` (or ``client``, an open dask.distributed client) the
    blocks run on a dask cluster, and with ``config.resume`` (implied by a cluster) finished blocks
    survive a crash: the output (zarr only) is written in place into a fixed ``.partial`` array
    whose attributes hold the run's parameters, a rerun with the same parameters computes only the
    blocks not yet done (other parameters: InputError), and the array is renamed to the final name
    when every block is done (:func:`emseg.engine.resumable.run_resumable`). A block that fails
    ``config.retries + 1`` times raises :class:`~emseg.engine.cluster.BlockFailed` after the other
    blocks are finished.

    Returns
    -------
    PredictResult
        ``stats.voxels`` counts the voxels computed in this call; with a resumable run
        ``blocks_computed`` and ``blocks_skipped`` count the blocks.

    Examples
    --------
    >>> cfg = PredictConfig("best.pt", "stack.h5:raw", "pred.zarr/probs", scheduler="local", workers=4)
    >>> predict_file(cfg).blocks_computed  # doctest: +SKIP
    48
    """
    resumable = config.scheduler is not None or config.resume or client is not None
    check_distinct(config.input, config.output)
    check_options(config, resumable=resumable, client=client)
    out_spec = check_output_volume(config.output) if not resumable else parse_spec(config.output)
    if not resumable:
        check_overwrite(out_spec, overwrite=config.overwrite)  # before any work; create_volume locks and rechecks
    dtype = output_dtype(config)
    attrs = output_attrs(config, dtype)
    with open_volume(config.input) as source:
        check_raw(source)
        volume_shape = source.shape
        checkpoint = read_for_volume(config.model, volume_shape, patch_shape=config.patch_shape)
        # the network is built here for a run on this machine's workers too, so that its weights are
        # checked before any task starts; not for a remote scheduler, whose devices may differ
        opened = open_for_volume(checkpoint, device=config.device, precision=config.precision,
                                 compile_=config.compile and not resumable) \
            if config.scheduler in (None, "local") else None
        patch, n_classes = checkpoint.patch, checkpoint.n_classes
        attrs.update(n_classes=n_classes, patch_shape=list(patch))
        shape = output_shape(volume_shape, n_classes, config.output_type)
        chunks = auto_chunks(shape, dtype.itemsize)
        lead = chunks[:1] if config.output_type == "probabilities" else ()
        block_shape = tuple(config.block_shape) if config.block_shape else default_block_shape(
            volume_shape, patch, chunks[len(lead):])
        if len(block_shape) != len(volume_shape):
            raise InputError(f"`block_shape` {block_shape} does not fit a {len(volume_shape)}D volume",
                             source=str(config.input))
        blocks = plan_blocks(volume_shape, block_shape, [p // 2 for p in patch])
        if resumable:
            # tasks write whole chunks: no two blocks may share one
            chunks = lead + fit_chunks(block_shape, tuple(min(c, s) for c, s in zip(chunks[len(lead):], volume_shape)))
            job = PredictJob.for_run(config.model, config.input, volume_shape, patch, config.window,
                                     config.output_type, config.dtype, config.device)
            params = dict(job.params(), input_dtype=str(source.dtype), dtype=str(dtype), block_shape=list(block_shape),
                          precision=config.precision, shape=list(shape), chunks=list(chunks))
            run = run_resumable(job.task_for, blocks, out_spec, shape, dtype, chunks, attrs=attrs, params=params,
                                weight=lambda block: block.size, scheduler=config.scheduler, workers=config.workers,
                                client=client, retries=config.retries, progress=progress,
                                overwrite=config.overwrite, what=str(out_spec))
            if client is None and config.scheduler is None:
                forget_opened()  # the in-process run is over: do not keep its network in memory
            computed = set(run.computed)
            stats = PredictStats(sum(b.size for b in blocks if b.index in computed), len(blocks), run.seconds)
            # Workers here resolve the precision as this process does; a remote scheduler's may differ.
            ran = opened.precision.name if opened is not None else config.precision
            return PredictResult(str(out_spec), shape, n_classes, patch, block_shape, stats, ran,
                                 blocks_computed=len(run.computed), blocks_skipped=len(run.skipped))
        attrs["precision"] = opened.precision.name
        predictor = predictor_for(opened, patch, config.window)
        with create_volume(out_spec, shape, dtype, chunks=chunks, attrs=attrs, overwrite=config.overwrite) as dest:
            stats = predict_volume(predictor, source, dest, blocks=blocks, output_type=config.output_type,
                                   dtype=config.dtype, progress=progress)
    return PredictResult(str(out_spec), shape, n_classes, patch, block_shape, stats, precision=opened.precision.name)


def output_attrs(config: PredictConfig, dtype: np.dtype) -> dict[str, Any]:
    """The attributes of a prediction output that the options say (what made it and how to read it
    back); the checkpoint adds ``n_classes`` and ``patch_shape``, the run its ``precision``."""
    attrs = {"output_type": config.output_type, "source": str(config.input), "model": str(Path(config.model)),
             "overlap": config.overlap, "blend": config.blend}
    if dtype == np.uint8 and config.output_type == "probabilities":
        attrs["scale"] = 1 / 255  # probability = value x scale
    return attrs
