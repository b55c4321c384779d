"""Apply one label perturbation to a volume on disk, block by block: ``emseg noise INPUT OUTPUT``.

:func:`noise_file` adds what a run on disk needs to the per-block function of
:mod:`emseg.noise.process`: parameter checks, data-dependent parameters (number of classes,
skeleton halo; :mod:`emseg.noise.params`), the blocks run in this process or as tasks of a
dask.distributed cluster (:func:`emseg.engine.cluster.run_blocks`, resumable), an atomically written,
chunked and compressed output carrying :func:`provenance` attributes, and an optional streamed
transition report.

The names of the blockwise pipeline (:func:`process_block`, :func:`apply_noise`,
:func:`plan_noise_blocks`, :func:`selection_for`, :func:`check_params`, :func:`resolve_params`,
:func:`halo_shape`, :func:`output_dtype`, ...) are importable from here as well as from their
own modules.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emseg import __version__
from emseg.engine.cluster import fit_chunks, injected_failures, require_distributed
from emseg.engine.resumable import PartialZarr, check_resumable_output, run_resumable
from emseg.errors import InputError
from emseg.metrics import MAX_CLASSES
from emseg.io import (
    check_distinct,
    check_overwrite,
    check_not_empty,
    check_output_location,
    check_output_volume,
    create_volume,
    open_volume,
    parse_spec,
)
from emseg.noise.checks import check_int
from emseg.noise.params import (
    MODES,
    REGISTRY,
    check_block_shape,
    check_params,
    default_block_shape,
    estimate_max_width,
    halo_shape,
    max_object_width,
    output_dtype,
    resolve_params,
)
from emseg.noise.process import (
    NoiseJob,
    apply_noise,
    block_chunks,
    noise_block_task,
    plan_noise_blocks,
    process_block,
    selection_for,
)
from emseg.noise.report import TransitionCounter

__all__ = [
    "MODES",
    "NoiseConfig",
    "NoiseResult",
    "apply_noise",
    "block_chunks",
    "check_params",
    "default_block_shape",
    "estimate_max_width",
    "halo_shape",
    "max_object_width",
    "noise_file",
    "output_dtype",
    "plan_noise_blocks",
    "process_block",
    "provenance",
    "resolve_params",
    "selection_for",
]


def provenance(
    mode: str,
    params: Mapping[str, Any],
    seed: int,
    source: str,
    block_shape: Sequence[int],
    halo: Sequence[int],
) -> dict[str, Any]:
    """Attributes recording how a noisy volume was made.

    ``emseg_version``, ``noise_mode``, ``noise_params`` (JSON object string),
    ``noise_seed``, ``noise_source`` (the input volume), ``noise_block_shape``
    and ``noise_halo`` (the block grid; the output does not depend on it), and
    ``n_classes`` when the mode fixes it. Flat scalars and lists, so HDF5 and
    zarr store them alike.

    Examples
    --------
    >>> attrs = provenance("flip", {"p": 0.45, "n_classes": 2}, 7, "a.h5:label", (16, 64, 64), (0, 0, 0))
    >>> attrs["noise_mode"], attrs["noise_params"], attrs["n_classes"]
    ('flip', '{"n_classes": 2, "p": 0.45}', 2)
    """
    attrs = {
        "emseg_version": __version__,
        "noise_mode": mode,
        "noise_params": json.dumps(dict(params), sort_keys=True),
        "noise_seed": int(seed),
        "noise_source": str(source),
        "noise_block_shape": [int(b) for b in block_shape],
        "noise_halo": [int(h) for h in halo],
    }
    if params.get("n_classes") is not None:
        attrs["n_classes"] = int(params["n_classes"])
    return attrs


@dataclass(frozen=True)
class NoiseResult:
    """What :func:`noise_file` did."""

    output: str
    shape: tuple[int, ...]
    dtype: str
    mode: str
    params: dict[str, Any]
    seed: int
    block_shape: tuple[int, ...]
    halo: tuple[int, ...]
    blocks: int
    seconds: float
    report: dict[str, Any] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def voxels_per_s(self) -> float:
        n = int(np.prod(self.shape))
        return n / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "output": self.output, "shape": list(self.shape), "dtype": self.dtype,
            "mode": self.mode, "params": dict(self.params), "seed": self.seed,
            "block_shape": list(self.block_shape), "halo": list(self.halo), "blocks": self.blocks,
            "seconds": round(self.seconds, 4), "voxels_per_s": self.voxels_per_s,
            "report": self.report,
        }


def _same_volume(a: Any, b: Any) -> bool:
    return a.fmt == b.fmt and a.key == b.key and Path(a.path).resolve() == Path(b.path).resolve()


@dataclass(frozen=True)
class NoiseConfig:
    """What :func:`noise_file` writes, and how (the options of ``emseg noise``).

    Attributes
    ----------
    input, output : str
        ``FILE.h5:DATASET`` or ``FILE.zarr[/ARRAY]``; they must differ.
    mode : str
        One of :data:`MODES`.
    params : mapping
        The mode's parameters, as in :func:`check_params` (missing or ``None``: the default).
    seed : int >= 0
        Seed of the random modes (recorded for the others too).
    block_shape : tuple of int, optional
        Block grid (default :func:`default_block_shape`); the output does not depend on it.
    n_classes : int >= 2, optional
        Number of classes: the default ``n_classes`` of ``flip``/``random`` and the
        size of the report; clean labels must be below it.
    report : bool
        Accumulate the clean -> noisy transition counts while writing and return
        :func:`~emseg.noise.noise_report` of the whole volume.
    rank_tol : float, optional
        Absolute singular-value tolerance of the report's ``rank`` (default: three sampling
        errors derived from the counts, :func:`~emseg.noise.rank_statistics`).
    scheduler : str, optional
        ``"local"`` or ``"tcp://HOST:PORT"``: compute the blocks as tasks of a dask.distributed
        cluster (see :func:`emseg.engine.cluster.run_blocks`), written in place into a resumable
        ``.partial`` zarr array; a rerun computes only the blocks not yet done. Zarr output only.
    workers : int, optional
        Worker processes of ``scheduler="local"``.
    retries : int
        Extra attempts of a failing block on a cluster.

    Examples
    --------
    >>> NoiseConfig("stack.h5:label", "noisy.h5:flip45", "flip", {"p": 0.45}).retries
    2
    """

    input: str
    output: str
    mode: str
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    block_shape: tuple[int, ...] | None = None
    n_classes: int | None = None
    report: bool = False
    rank_tol: float | None = None
    scheduler: str | None = None
    workers: int | None = None
    retries: int = 2
    #: Replace an existing OUTPUT dataset or array; refused otherwise.
    overwrite: bool = False


def noise_file(
    config: NoiseConfig,
    *,
    progress: Callable[[int, int], None] | None = None,
    client: Any = None,
) -> NoiseResult:
    """Write a noisy copy of the label volume ``config.input`` to ``config.output``.

    Parameters
    ----------
    config : NoiseConfig
    progress : callable, optional
        ``progress(done_blocks, total_blocks)``.
    client : distributed.Client, optional
        An open client to use instead of ``config.scheduler``.

    Returns
    -------
    NoiseResult

    Raises
    ------
    emseg.errors.InputError
        Bad parameters, a missing or non-label input, or labels that do not fit
        ``n_classes``; nothing is written then.

    Notes
    -----
    Parameters are checked, and data-dependent ones resolved, before the output is
    created; it is written under a temporary name and renamed into place only when
    every block succeeded.

    Examples
    --------
    >>> noise_file(NoiseConfig("stack.h5:label", "noisy.h5:label", "flip", {"p": 0.45}, seed=1))  # doctest: +SKIP
    """
    mode, n_classes, rank_tol = config.mode, config.n_classes, config.rank_tol
    scheduler, workers = config.scheduler, config.workers
    try:
        checked = check_params(mode, config.params)
        if n_classes is not None:
            n_classes = check_int(n_classes, "n_classes", minimum=2, maximum=MAX_CLASSES)
            if REGISTRY[mode].classes:
                if checked["n_classes"] not in (None, n_classes):
                    raise ValueError(
                        f"n_classes given twice: {checked['n_classes']} and {n_classes}"
                    )
                checked = check_params(mode, {**checked, "n_classes": n_classes})
        seed = check_int(config.seed, "seed", minimum=0)
        if rank_tol is not None and not (isinstance(rank_tol, (int, float)) and 0 <= rank_tol < float("inf")):
            raise ValueError(f"rank tolerance must be a finite number >= 0, got {rank_tol!r}")
    except ValueError as exc:
        raise InputError(str(exc)) from None
    in_spec, out_spec = parse_spec(config.input), parse_spec(config.output)
    if _same_volume(in_spec, out_spec):
        raise InputError("OUTPUT must differ from INPUT (the clean labels are kept)", source=str(out_spec))
    check_distinct(in_spec, out_spec)  # an OUTPUT group or zarr root holding INPUT
    on_cluster = scheduler is not None or client is not None
    if on_cluster and out_spec.fmt != "zarr":
        raise InputError("`scheduler` needs a zarr output (e.g. noisy.zarr/flip45): blocks are written in place "
                         "by independent tasks, which HDF5 files do not allow", source=str(out_spec))
    if workers is not None and scheduler != "local":
        raise InputError("`workers` applies only when `scheduler` is 'local'")
    if on_cluster:
        check_output_location(out_spec.path)
        check_resumable_output(out_spec, overwrite=config.overwrite)
    else:
        check_output_volume(out_spec)
        check_overwrite(out_spec, overwrite=config.overwrite)
    with open_volume(in_spec) as source:
        src = str(source.spec)
        if source.ndim not in (2, 3):
            raise InputError(f"labels must be 2D (y,x) or 3D (z,y,x), found {source.ndim}D {source.shape}",
                             source=src)
        check_not_empty(source, "labels")
        if source.dtype.kind not in "biu":
            raise InputError(f"labels must be integers, found {source.dtype}", source=src)
        try:
            blocks_shape = check_block_shape(config.block_shape, source.shape)
            resolved = resolve_params(source, mode, checked, block_shape=blocks_shape)
            selection = selection_for(source, mode, resolved, seed, block_shape=blocks_shape)
        except ValueError as exc:
            raise InputError(str(exc), source=src) from None
        halo = halo_shape(mode, resolved, source.ndim)
        blocks = plan_noise_blocks(source.shape, mode, resolved, blocks_shape)
        dtype = output_dtype(mode, resolved, source.dtype)
        abs_source = f"{Path(in_spec.path).resolve()}" + (
            f":{in_spec.key}" if in_spec.fmt == "h5" else (f"/{in_spec.key}" if in_spec.key else ""))
        attrs = provenance(mode, resolved, seed, abs_source, blocks_shape, halo)
        k_min = n_classes if n_classes is not None else resolved.get("n_classes")
        counter = TransitionCounter(k_min) if config.report else None
        if on_cluster:
            job = NoiseJob(input=abs_source, mode=mode, params=dict(resolved), seed=seed, n_classes=n_classes,
                           selection=selection)
            shape, dtype, seconds = _noise_resumable(
                job, out_spec, source.shape, dtype, block_chunks(blocks_shape, dtype.itemsize), attrs, blocks,
                scheduler=scheduler, workers=workers, retries=config.retries, client=client, progress=progress,
                overwrite=config.overwrite)
            if counter is not None:
                _count_transitions(source, str(out_spec), blocks, counter)
            return NoiseResult(output=str(out_spec), shape=tuple(shape), dtype=str(dtype), mode=mode,
                               params=resolved, seed=seed, block_shape=blocks_shape, halo=halo,
                               blocks=len(blocks), seconds=seconds,
                               report=counter.report(tol=rank_tol) if counter is not None else None,
                               attrs=attrs)
        start = time.perf_counter()
        dest = create_volume(out_spec, source.shape, dtype, chunks=block_chunks(blocks_shape, dtype.itemsize),
                             attrs=attrs, overwrite=config.overwrite)
        try:
            apply_noise(source, dest, mode, resolved, seed, blocks=blocks, counter=counter,
                        n_classes=n_classes, progress=progress, selection=selection)
        except ValueError as exc:
            dest.discard()
            raise InputError(str(exc), source=src) from None
        except BaseException:
            dest.discard()
            raise
        shape = source.shape
    dest.commit()
    seconds = time.perf_counter() - start
    summary = counter.report(tol=rank_tol) if counter is not None else None
    return NoiseResult(output=str(out_spec), shape=tuple(shape), dtype=str(dtype), mode=mode,
                       params=resolved, seed=seed, block_shape=blocks_shape, halo=halo,
                       blocks=len(blocks), seconds=seconds, report=summary, attrs=attrs)


# --------------------------------------------------------------------------- #


def _noise_resumable(job: NoiseJob, out_spec: Any, shape: tuple[int, ...], dtype: np.dtype,
                     chunks: Sequence[int], attrs: dict[str, Any], blocks: Sequence[Any], *,
                     scheduler: str | None, workers: int | None, retries: int, client: Any,
                     progress: Callable[[int, int], None] | None,
                     overwrite: bool = False) -> tuple[tuple[int, ...], np.dtype, float]:
    """Write the blocks as cluster tasks into a resumable ``.partial`` zarr array, renamed when complete.

    One writer at a time: the partial is locked while it is written (:func:`emseg.engine.resumable.resumable_zarr`).
    """
    if client is None:
        require_distributed()
    out_spec = type(out_spec)(Path(out_spec.path).resolve(), out_spec.key, out_spec.fmt)
    block_shape = tuple(int(b) for b in attrs["noise_block_shape"])
    chunks = fit_chunks(block_shape, tuple(min(int(c), int(s)) for c, s in zip(chunks, shape)))
    params = dict(attrs, emseg_version=None, shape=list(shape), dtype=str(dtype), chunks=list(chunks))
    job = dataclasses.replace(job, fail_blocks=injected_failures())

    def task_for(part: PartialZarr) -> Callable[[Any], int]:
        return functools.partial(noise_block_task, job=dataclasses.replace(job, store=part.store, key=part.key))

    run = run_resumable(task_for, blocks, out_spec, shape, dtype, chunks, attrs=attrs, params=params,
                        scheduler=scheduler, workers=workers, client=client, retries=retries, progress=progress,
                        overwrite=overwrite)
    return tuple(shape), np.dtype(dtype), run.seconds


def _count_transitions(source: Any, output: str, blocks: Sequence[Any], counter: TransitionCounter) -> None:
    """Update ``counter`` with (clean, noisy) of every block, reading both volumes back."""
    with open_volume(output) as noisy:
        for block in blocks:
            counter.update(np.asarray(source[block.inner]), np.asarray(noisy[block.inner]))
