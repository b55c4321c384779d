"""Predict a volume on disk with a trained checkpoint (the core of ``emseg predict``).

:func:`predict_file` predicts block by block in this process into an atomically renamed output;
with a scheduler or ``resume`` it hands over to :func:`predict_resumable`, whose tasks
(:func:`predict_block_task`, one :class:`PredictJob` each) write their own chunks of a resumable
zarr array (:func:`emseg.engine.cluster.resumable_zarr`) in this process or on a dask cluster.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr

from emseg.engine.blocks import Block, default_block_shape, plan_blocks
from emseg.models.checkpoint import (
    CheckpointFile,
    check_model_config,
    forget_cached_models,
    load_checkpoint,
    model_from_state,
    network_patch,
)
from emseg.engine.cluster import (
    FAIL_BLOCKS_ENV,
    check_resumable_output,
    fit_chunks,
    injected_failures,
    require_distributed,
    resumable_zarr,
    run_blocks,
)
from emseg.runtime.device import resolve_device
from emseg.errors import InputError
from emseg.engine.inference import (
    PROBABILITY_DTYPES,
    PredictStats,
    WindowOptions,
    make_predictor,
    output_shape,
    predict_block,
    predict_volume,
    resolve_patch,
    to_output,
)
from emseg.io import (
    auto_chunks,
    check_distinct,
    check_output_location,
    check_output_volume,
    check_raw,
    check_overwrite,
    create_volume,
    is_ome_path,
    open_volume,
    parse_spec,
)
from emseg.runtime.precision import DEFAULT_PRECISION, resolve_precision


@dataclass(frozen=True)
class PredictConfig:
    model: str
    input: str
    output: str
    patch_shape: tuple[int, ...] | None = None  # default: the training patch
    overlap: float = 0.25
    blend: str = "gaussian"
    batch_size: int = 4
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
        """The sliding-window part of this config, as :func:`~emseg.engine.inference.make_predictor` takes it."""
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


def check_options(config: PredictConfig) -> None:
    """Prediction options that are user input: ranges checked with the parameter named."""
    if not 0 <= config.overlap < 1:
        raise InputError(f"`overlap` must be in [0, 1), got {config.overlap}")
    if config.batch_size < 1:
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

    The output is written under a temporary name and renamed when complete. Probabilities are
    stored channel-first (C, *S) as float32 (or uint8, ``config.dtype``); labels as uint8 argmax. With ``config.scheduler``
    (or ``client``, an open dask.distributed client) the blocks run on a dask cluster, and with
    ``config.resume`` (implied by a cluster) finished blocks survive a crash: see
    :func:`predict_resumable`.
    """
    if config.workers is not None and config.scheduler != "local" and client is None:
        raise InputError("`workers` applies only when `scheduler` is 'local'")
    check_distinct(config.input, config.output)
    check_options(config)
    if config.scheduler is not None or config.resume or client is not None:
        if is_ome_path(parse_spec(config.output).path):
            raise InputError("`scheduler` and `resume` write plain zarr; predict in-process for an OME-Zarr output",
                             source=str(config.output))
        check_output_location(parse_spec(config.output).path)
        check_resumable_output(parse_spec(config.output), overwrite=config.overwrite)
        return predict_resumable(config, progress=progress, client=client)
    out_spec = check_output_volume(config.output)
    check_overwrite(out_spec, overwrite=config.overwrite)  # before any work; create_volume locks and rechecks
    device = resolve_device(config.device)
    state = load_checkpoint(config.model)
    model_config = check_model_config(state["model_config"], source=str(config.model))
    if model_config.get("cond_channels"):
        raise InputError("this checkpoint is label-conditioned: use `emseg lcs infer`", source=config.model)
    trained_patch = (state.get("config") or {}).get("patch_shape")
    with open_volume(config.input) as source:
        check_raw(source)
        patch = resolve_patch(config.patch_shape, trained_patch, source.shape, int(model_config.get("ndim", 2)))
        window = tuple(min(p, s) for p, s in zip(patch, source.shape))  # what the network sees at most
        model = model_from_state(state, source=str(config.model), device=device, patch=window)
        n_classes = state["model_config"]["out_channels"]
        shape = output_shape(source.shape, n_classes, config.output_type)
        dtype = output_dtype(config)
        chunks = auto_chunks(shape, dtype.itemsize)
        spatial_chunks = chunks[1:] if config.output_type == "probabilities" else chunks
        if config.block_shape and len(config.block_shape) != len(source.shape):
            raise InputError(f"`block_shape` {tuple(config.block_shape)} does not fit a {len(source.shape)}D volume",
                             source=str(config.input))
        block_shape = tuple(config.block_shape) if config.block_shape else default_block_shape(
            source.shape, patch, spatial_chunks)
        blocks = plan_blocks(source.shape, block_shape, [p // 2 for p in patch])
        predictor = make_predictor(model, patch, config.window, device)
        attrs = {"n_classes": n_classes, "output_type": config.output_type, "source": str(config.input),
                 "model": str(Path(config.model)), "patch_shape": list(patch), "overlap": config.overlap,
                 "blend": config.blend, "precision": predictor.precision.name}
        if dtype == np.uint8 and config.output_type == "probabilities":
            attrs["scale"] = 1 / 255  # probability = value x scale
        with create_volume(out_spec, shape, dtype, chunks=chunks, attrs=attrs, overwrite=config.overwrite) as dest:
            stats = predict_volume(predictor, source, dest, blocks=blocks, output_type=config.output_type,
                                   dtype=config.dtype, progress=progress)
    return PredictResult(str(out_spec), shape, n_classes, patch, block_shape, stats,
                         precision=predictor.precision.name)


# --------------------------------------------------------------------------------------------
# predicting on a cluster (or in-process), resumable
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PredictJob:
    """Everything a worker needs to predict one block (absolute paths, no open handles)."""

    model: CheckpointFile
    input: str
    store: str
    key: str
    patch_shape: tuple[int, ...]
    window: WindowOptions
    output_type: str
    dtype: str = "float32"
    device: str = "auto"
    fail_blocks: tuple[int, ...] = ()


def predict_block_task(block: Block, job: PredictJob) -> int:
    """Worker side of a prediction: read ``block.outer``, predict, write ``block.inner``; return its index."""
    if block.index in job.fail_blocks:
        raise RuntimeError(f"failure injected by {FAIL_BLOCKS_ENV}")
    model, device = job.model.cached_model(job.device)
    predictor = make_predictor(model, job.patch_shape, job.window, device, reuse=True)
    with open_volume(job.input) as source:
        probs = predict_block(predictor, source, block, output_type=job.output_type)
    data = to_output(probs, job.output_type, job.dtype)
    dest = zarr.open_array(store=job.store, path=job.key or None, mode="r+")
    index = block.inner if job.output_type == "labels" else (slice(None),) + tuple(block.inner)
    dest[index] = data
    return block.index


def predict_resumable(config: PredictConfig, *, progress: Callable[[int, int], None] | None = None,
                      client: Any = None) -> PredictResult:
    """``emseg predict`` on a dask cluster (``config.scheduler``) or in-process with ``config.resume``.

    The output (zarr only) is written in place into a fixed ``.partial`` array whose attributes
    hold the run's parameters; each finished block gets a marker in ``.partial/.done``. A rerun
    with the same parameters computes only the blocks without a marker (different parameters:
    InputError). When every block is done the markers are removed and the array is renamed to the
    final name, so that name appears only complete. A block that fails ``config.retries + 1``
    times raises :class:`BlockFailed` after the other blocks are finished.

    Parameters
    ----------
    config : PredictConfig
    progress : callable, optional
        ``progress(done_voxels, total_voxels)``; blocks found done count at once.
    client : distributed.Client, optional
        Use this client instead of starting one from ``config.scheduler``.

    Returns
    -------
    PredictResult
        ``stats.voxels`` counts the voxels computed in this call; ``blocks_computed`` the blocks.

    Examples
    --------
    >>> cfg = PredictConfig("best.pt", "stack.h5:raw", "pred.zarr/probs", scheduler="local", workers=4)
    >>> predict_resumable(cfg).blocks_computed  # doctest: +SKIP
    48
    """
    if config.workers is not None and config.scheduler != "local" and client is None:
        raise InputError("`workers` applies only when `scheduler` is 'local'")
    out_spec = parse_spec(config.output)
    if out_spec.fmt != "zarr":
        what = "`scheduler`" if config.scheduler else "`resume`"
        raise InputError(f"{what} needs a zarr output (e.g. pred.zarr/probs): blocks are written in place by "
                         f"independent tasks, which HDF5 files do not allow", source=str(out_spec))
    if client is None and config.scheduler is not None:
        require_distributed()
    model_path = Path(config.model).resolve()
    state = load_checkpoint(model_path)
    check_model_config(state["model_config"], source=str(config.model))
    if state["model_config"].get("cond_channels"):
        raise InputError("this checkpoint is label-conditioned: use `emseg lcs infer`", source=config.model)
    checkpoint = CheckpointFile.of(model_path)
    in_spec = parse_spec(config.input)
    in_spec = type(in_spec)(in_spec.path.resolve(), in_spec.key, in_spec.fmt)
    out_spec = type(out_spec)(out_spec.path.resolve(), out_spec.key, out_spec.fmt)
    with open_volume(in_spec) as source:
        check_raw(source)
        vol_shape, vol_dtype = source.shape, str(source.dtype)
    model_ndim = state["model_config"].get("ndim", 2)
    patch = resolve_patch(config.patch_shape, (state.get("config") or {}).get("patch_shape"), vol_shape, model_ndim)
    check_model_config(state["model_config"], source=str(config.model),
                       patch=network_patch(tuple(min(p, s) for p, s in zip(patch, vol_shape)), state["model_config"]))
    n_classes = state["model_config"]["out_channels"]
    shape = output_shape(vol_shape, n_classes, config.output_type)
    dtype = output_dtype(config)
    chunks = auto_chunks(shape, dtype.itemsize)
    lead = chunks[:1] if config.output_type == "probabilities" else ()
    spatial = chunks[len(lead):]
    block_shape = tuple(config.block_shape) if config.block_shape else default_block_shape(vol_shape, patch, spatial)
    if len(block_shape) != len(vol_shape):
        raise InputError(f"`block_shape` {block_shape} does not fit a {len(vol_shape)}D volume")
    spatial = fit_chunks(block_shape, tuple(min(c, s) for c, s in zip(spatial, vol_shape)))
    chunks = lead + spatial
    blocks = plan_blocks(vol_shape, block_shape, [p // 2 for p in patch])

    attrs = {"n_classes": n_classes, "output_type": config.output_type, "source": str(config.input),
             "model": str(Path(config.model)), "patch_shape": list(patch), "overlap": config.overlap,
             "blend": config.blend}
    if dtype == np.uint8 and config.output_type == "probabilities":
        attrs["scale"] = 1 / 255
    params = {
        "model": checkpoint.path, "model_mtime_ns": checkpoint.mtime_ns, "model_size": checkpoint.size,
        "input": str(in_spec), "input_shape": list(vol_shape), "input_dtype": vol_dtype,
        "patch_shape": list(patch), "overlap": config.overlap, "blend": config.blend,
        "batch_size": config.batch_size, "output_type": config.output_type, "dtype": str(dtype),
        "block_shape": list(block_shape),
        "precision": config.precision,
        "shape": list(shape), "chunks": list(chunks)}
    with resumable_zarr(out_spec, shape, dtype, chunks, attrs=attrs, params=params,
                        what=str(parse_spec(config.output)), overwrite=config.overwrite) as part:
        job = PredictJob(model=checkpoint, input=str(in_spec), store=part.store, key=part.key,
                         patch_shape=tuple(patch), window=config.window, output_type=config.output_type,
                         dtype=config.dtype, device=config.device, fail_blocks=injected_failures())
        total = sum(b.size for b in blocks)
        finished = part.markers.done()
        counts = {"done": sum(b.size for b in blocks if b.index in finished), "computed": 0}
        if progress is not None:
            progress(counts["done"], total)

        def on_done(block: Block, _result: Any) -> None:
            counts["done"] += block.size
            counts["computed"] += block.size
            if progress is not None:
                progress(counts["done"], total)

        run = run_blocks(functools.partial(predict_block_task, job=job), blocks, scheduler=config.scheduler,
                         workers=config.workers, client=client, retries=config.retries, done=part.markers,
                         on_done=on_done, failure_source=str(config.output), failure_hint=part.hint)
        if client is None and config.scheduler is None:
            forget_cached_models()  # the in-process run is over: do not keep its network in memory
    stats = PredictStats(counts["computed"], len(blocks), run.seconds)
    # Workers here resolve the precision as this process does; a remote scheduler's may differ.
    ran = (resolve_precision(config.precision, resolve_device(config.device), ndim=int(model_ndim)).name
           if config.scheduler in (None, "local") else config.precision)
    return PredictResult(str(parse_spec(config.output)), shape, n_classes, patch, block_shape, stats, ran,
                         blocks_computed=len(run.computed), blocks_skipped=len(run.skipped))
