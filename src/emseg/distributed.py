"""Scaling out: blockwise work on a dask.distributed cluster with resume, and data-parallel training.

Three layers, usable separately:

* :func:`run_blocks` runs a function over independent blocks, either in this process or on a
  dask.distributed cluster (a :class:`distributed.LocalCluster` or an existing scheduler), with
  bounded retries, per-block done markers (:class:`DoneMarkers`) so a rerun skips finished blocks,
  and a one-line :class:`BlockFailed` error naming the block that could not be computed.
* :func:`predict_resumable` is ``emseg predict --scheduler ...`` / ``--resume``: each task reads its
  block plus halo, predicts it with a model loaded once per worker and writes its own chunks of a
  ``.partial`` zarr array, which is renamed into place when every block is done.
* :class:`ProcessGroup` is the torch.distributed context :func:`emseg.training.run_training` uses
  under ``torchrun`` (one process per device, gradients averaged by DistributedDataParallel).

dask and distributed are an optional extra (``pip install 'emseg[distributed]'``); they are
imported only when a cluster is asked for.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from emseg.errors import InputError
from emseg.locks import lock_output

#: Environment variable naming block indices whose tasks fail on purpose (comma-separated), to
#: rehearse a crash and the resume that follows. Read by the process that plans the run.
FAIL_BLOCKS_ENV = "EMSEG_FAIL_BLOCKS"
#: Attribute of a partial output holding the parameters it was started with.
RESUME_ATTR = "emseg_resume"
PARTIAL_SUFFIX = ".partial"
DONE_DIR = ".done"


# --------------------------------------------------------------------------------------------
# dask.distributed: clients and the generic block executor
# --------------------------------------------------------------------------------------------

def require_distributed():
    """Import and return the ``distributed`` module, or raise :class:`InputError` saying how to get it.

    Examples
    --------
    >>> distributed = require_distributed()  # doctest: +SKIP
    """
    try:
        import distributed  # noqa: PLC0415 - optional dependency, imported on demand
    except ImportError:
        raise InputError("running on a cluster needs the optional dask.distributed packages: "
                         "pip install 'emseg[distributed]'") from None
    return distributed


def default_workers() -> int:
    """Worker processes of ``--scheduler local`` when not given: the CPU cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


@contextlib.contextmanager
def open_client(scheduler: str, *, workers: int | None = None, processes: bool = True) -> Iterator[Any]:
    """A dask.distributed ``Client`` for ``scheduler``, closed (with its cluster) on exit.

    Parameters
    ----------
    scheduler : str
        ``"local"`` starts a :class:`distributed.LocalCluster` of ``workers`` processes with one
        thread each; an address such as ``"tcp://10.0.0.5:8786"`` connects to a running scheduler
        (started by ``dask scheduler`` or dask-jobqueue).
    workers : int, optional
        Worker count of the local cluster [default: :func:`default_workers`]; only with ``"local"``.
    processes : bool
        Local workers as processes (the default) or as threads of this process.

    Examples
    --------
    >>> with open_client("local", workers=2) as client:  # doctest: +SKIP
    ...     report = run_blocks(fn, blocks, client=client)
    """
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if scheduler == "local":
        distributed = require_distributed()
        import dask

        # dask sets MALLOC_TRIM_THRESHOLD_ in new workers, which also freezes glibc's mmap threshold:
        # every large tensor is then mapped and unmapped anew, and torch inference runs ~2x slower.
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            cluster = distributed.LocalCluster(
                n_workers=workers or default_workers(), threads_per_worker=1, processes=processes,
                dashboard_address=None, silence_logs=logging.CRITICAL)  # failures are reported by run_blocks
        client = distributed.Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    if "://" not in scheduler:
        raise InputError(f"--scheduler must be 'local' or a scheduler address such as tcp://HOST:8786, "
                         f"got {scheduler!r}")
    if workers is not None:
        raise InputError("--workers applies to --scheduler local only (an existing cluster has its own workers)")
    distributed = require_distributed()
    try:
        client = distributed.Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise InputError(f"cannot reach the dask scheduler ({type(exc).__name__}: {exc})".splitlines()[0],
                         source=scheduler) from None
    try:
        yield client
    finally:
        client.close()


class DoneMarkers:
    """One empty marker file per finished block in ``directory`` (created on first use).

    Markers are written by the process that collects results, after a block's data are on disk,
    so a marker always means "this block's output is complete".

    Examples
    --------
    >>> markers = DoneMarkers(tmp / ".done")  # doctest: +SKIP
    >>> markers.mark(3); sorted(markers.done())  # doctest: +SKIP
    [3]
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def done(self) -> set[int]:
        """Indices of the finished blocks."""
        if not self.directory.is_dir():
            return set()
        return {int(p.name) for p in self.directory.iterdir() if p.name.isdigit()}

    def is_done(self, index: int) -> bool:
        return (self.directory / str(int(index))).exists()

    def mark(self, index: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / str(int(index))).touch()

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def describe_block(block: Any) -> str:
    """``block 3 [0:4, 0:64, 64:128]`` for a :class:`~emseg.inference.Block`, else ``block 3``."""
    index = getattr(block, "index", "?")
    inner = getattr(block, "inner", None)
    if inner is None:
        return f"block {index}"
    return f"block {index} [{', '.join(f'{s.start}:{s.stop}' for s in inner)}]"


class BlockFailed(InputError):
    """A block could not be computed within its retries; finished blocks stay recorded."""

    def __init__(self, block: Any, attempts: int, cause: BaseException | str, *, failed: int = 1,
                 source: str | None = None, hint: str = "rerun the same command to compute only the missing blocks"):
        self.block = block
        self.index = getattr(block, "index", None)
        self.attempts = attempts
        self.failed = failed
        text = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        text = (text.strip().splitlines() or [type(cause).__name__])[0]
        others = f"; {failed - 1} other block(s) failed too" if failed > 1 else ""
        super().__init__(f"{describe_block(block)} failed after {attempts} attempt(s) ({text}){others}; {hint}",
                         source=source)


@dataclass
class BlockRun:
    """What :func:`run_blocks` did: indices computed now, indices skipped as already done."""

    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _index(block: Any, position: int) -> int:
    return int(getattr(block, "index", position))


def run_blocks(
    fn: Callable[[Any], Any],
    blocks: Sequence[Any],
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    client: Any = None,
    retries: int = 2,
    done: DoneMarkers | None = None,
    on_done: Callable[[Any, Any], None] | None = None,
    fail_fast: bool = False,
    failure_source: str | None = None,
    failure_hint: str | None = None,
) -> BlockRun:
    """Run ``fn(block)`` for every block not yet marked done, in-process or on a dask cluster.

    Parameters
    ----------
    fn : callable
        ``fn(block) -> result``; it must be picklable for a cluster (a module-level function or a
        :func:`functools.partial` of one) and write its own output (results come back to this
        process, so keep them small). Blocks must be independent: no two may write the same chunk.
    blocks : sequence
        Work items; ``item.index`` (an int) identifies each one, else its position.
    scheduler : str, optional
        ``None`` runs in this process, one block after another; ``"local"`` starts a LocalCluster
        of ``workers`` processes; ``"tcp://HOST:PORT"`` uses a running scheduler.
    client : distributed.Client, optional
        An open client to use instead of ``scheduler``.
    retries : int
        Extra attempts of a failing block (dask ``retries=``) before it counts as failed.
    done : DoneMarkers, optional
        Blocks marked there are skipped; each finished block is marked.
    on_done : callable, optional
        ``on_done(block, result)`` in this process after each finished block.
    fail_fast : bool
        Cancel the remaining blocks at the first failure instead of finishing all the others.
    failure_source, failure_hint : str, optional
        ``source`` of the :class:`BlockFailed` raised when blocks fail (the output, say), and the
        advice ending its message [default: rerun to compute only the missing blocks].

    Returns
    -------
    BlockRun

    Raises
    ------
    BlockFailed
        Naming the lowest-numbered failed block (with its slices) and the number of failures,
        after every other block was finished (unless ``fail_fast``) and marked.

    Examples
    --------
    >>> report = run_blocks(functools.partial(task, job=job), plan_blocks(shape, block, halo),
    ...                     scheduler="local", workers=4, done=DoneMarkers(out / ".done"))  # doctest: +SKIP
    >>> len(report.computed), len(report.skipped)  # doctest: +SKIP
    (12, 4)
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    start = time.perf_counter()
    finished = done.done() if done is not None else set()
    report = BlockRun()
    todo = []
    for position, block in enumerate(blocks):
        if _index(block, position) in finished:
            report.skipped.append(_index(block, position))
        else:
            todo.append((position, block))

    def record(position: int, block: Any, result: Any) -> None:
        if done is not None:
            done.mark(_index(block, position))
        report.computed.append(_index(block, position))
        if on_done is not None:
            on_done(block, result)

    failures: list[tuple[int, Any, BaseException | str]] = []
    if client is None and scheduler is None:
        for position, block in todo:
            error: BaseException | None = None
            for _ in range(retries + 1):
                try:
                    result = fn(block)
                except Exception as exc:  # retried, then reported with the block
                    error = exc
                    continue
                error = None
                record(position, block, result)
                break
            if error is not None:
                failures.append((position, block, error))
                if fail_fast:
                    break
    elif todo:
        with contextlib.ExitStack() as stack:
            if client is None:
                client = stack.enter_context(open_client(scheduler, workers=workers))
            _run_on_client(client, fn, todo, retries, fail_fast, record, failures)
    report.seconds = time.perf_counter() - start
    if failures:
        failures.sort(key=lambda f: _index(f[1], f[0]))
        _, block, cause = failures[0]
        extra = {"hint": failure_hint} if failure_hint else {}
        raise BlockFailed(block, retries + 1, cause, failed=len(failures), source=failure_source, **extra)
    return report


def _run_on_client(client, fn, todo, retries, fail_fast, record, failures) -> None:
    distributed = require_distributed()
    token = uuid.uuid4().hex[:8]
    keys = [f"emseg-block-{_index(b, p)}-{token}" for p, b in todo]
    futures = client.map(fn, [b for _, b in todo], key=keys, retries=retries)
    where = {f.key: item for f, item in zip(futures, todo)}
    try:
        for future in distributed.as_completed(futures):
            position, block = where[future.key]
            if future.status == "finished":
                record(position, block, future.result())
            elif future.status == "error":
                failures.append((position, block, future.exception()))
                if fail_fast:
                    client.cancel(futures)
                    break
            elif future.status == "cancelled" and not failures:
                failures.append((position, block, "cancelled by the scheduler"))
    finally:
        client.cancel([f for f in futures if not f.done()])


# --------------------------------------------------------------------------------------------
# emseg predict on a cluster, resumable
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PredictJob:
    """Everything a worker needs to predict one block (absolute paths, no open handles)."""

    model: str
    model_mtime_ns: int
    model_size: int
    input: str
    store: str
    key: str
    patch_shape: tuple[int, ...]
    overlap: float
    blend: str
    batch_size: int
    output_type: str
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    fail_blocks: tuple[int, ...] = ()


_MODELS: dict[tuple, tuple[torch.nn.Module, torch.device]] = {}
_MODELS_LOCK = threading.Lock()


def cached_model(path: str, device: str = "auto", *, mtime_ns: int | None = None,
                 size: int | None = None) -> tuple[torch.nn.Module, torch.device]:
    """The network of checkpoint ``path`` on ``device``, loaded once per process and reused.

    The cache is keyed by path, modification time and size, so a changed file is reloaded; when
    ``mtime_ns``/``size`` are given and the file differs, the run's model was replaced: an error.

    Examples
    --------
    >>> model, device = cached_model("runs/mito/best.pt", "cpu")  # doctest: +SKIP
    """
    st = os.stat(path)
    if (mtime_ns is not None and st.st_mtime_ns != mtime_ns) or (size is not None and st.st_size != size):
        raise InputError("the checkpoint changed since this prediction started", source=path)
    key = (path, st.st_mtime_ns, st.st_size, device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            from emseg.checkpoint import load_model
            from emseg.device import resolve_device

            dev = resolve_device(device)
            model, _ = load_model(path, dev)
            _MODELS.clear()  # one model per process: a worker serves one run at a time
            _MODELS[key] = (model, dev)
        return _MODELS[key]


def predict_block_task(block, job: PredictJob) -> int:
    """Worker side of a prediction: read ``block.outer``, predict, write ``block.inner``; return its index."""
    import zarr

    from emseg.inference import predict_block, to_output
    from emseg.io import open_volume
    from emseg.predict import make_predictor

    if block.index in job.fail_blocks:
        raise RuntimeError(f"failure injected by {FAIL_BLOCKS_ENV}")
    model, device = cached_model(job.model, job.device, mtime_ns=job.model_mtime_ns, size=job.model_size)
    predictor = make_predictor(model, job.patch_shape, job, device)
    with open_volume(job.input) as source:
        probs = predict_block(predictor, source, block)
    data = to_output(probs, job.output_type)
    dest = zarr.open_array(store=job.store, path=job.key or None, mode="r+")
    index = block.inner if job.output_type == "labels" else (slice(None),) + tuple(block.inner)
    dest[index] = data
    return block.index


def injected_failures() -> tuple[int, ...]:
    """Block indices listed in :data:`FAIL_BLOCKS_ENV`, whose tasks fail on purpose (a rehearsal).

    Examples
    --------
    >>> injected_failures()  # with EMSEG_FAIL_BLOCKS unset
    ()
    """
    try:
        return tuple(int(i) for i in os.environ.get(FAIL_BLOCKS_ENV, "").replace(" ", "").split(",") if i)
    except ValueError:
        raise InputError(f"{FAIL_BLOCKS_ENV} must list block indices, e.g. 3,7") from None


def fit_chunks(block_shape: Sequence[int], chunks: Sequence[int]) -> tuple[int, ...]:
    """Chunks that tile ``block_shape`` exactly (so no two blocks share a chunk).

    A chunk side that does not divide the block side becomes the largest divisor of the block
    side not above it; if that is under half the chunk side, the block is a poor fit: InputError.

    Examples
    --------
    >>> fit_chunks((16, 512, 512), (4, 256, 256))
    (4, 256, 256)
    >>> fit_chunks((12, 300, 512), (8, 256, 256))
    (6, 150, 256)
    """
    out = []
    for b, c in zip(block_shape, chunks):
        c = min(c, b)
        if b % c:
            fitted = max(d for d in range(1, c + 1) if b % d == 0)
            if fitted * 2 < c:
                raise InputError(f"block {tuple(block_shape)} does not tile into chunks near {tuple(chunks)} "
                                 f"(side {b}); choose --block sides that are multiples of {tuple(chunks)}")
            c = fitted
        out.append(c)
    return tuple(out)


def partial_location(spec) -> tuple[Path, str, Path, Path]:
    """(store, key, partial folder, final folder) of the partial zarr output of ``spec``.

    ``out.zarr`` is written as ``out.zarr.partial``; ``out.zarr/pred/probs`` as
    ``out.zarr/pred/.probs.partial``. Both names are fixed, so a rerun finds them.
    """
    if spec.key:
        parent, _, name = spec.key.rpartition("/")
        key = f"{parent}/.{name}{PARTIAL_SUFFIX}" if parent else f".{name}{PARTIAL_SUFFIX}"
        return spec.path, key, spec.path / key, spec.path / spec.key
    store = spec.path.with_name(spec.path.name + PARTIAL_SUFFIX)
    return store, "", store, spec.path


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def _check_params(stored: Any, params: dict[str, Any], partial: Path) -> None:
    if stored == params:
        return
    if not isinstance(stored, dict):
        diff = ["(no parameters recorded)"]
    else:
        diff = [f"{k} {stored.get(k)!r} -> {params.get(k)!r}" for k in sorted(set(stored) | set(params))
                if stored.get(k) != params.get(k)]
    raise InputError(f"an unfinished prediction with other parameters is here ({'; '.join(diff)}): rerun with "
                     f"the original parameters to resume it, or delete it to start over", source=str(partial))


def predict_resumable(config, *, progress: Callable[[int, int], None] | None = None, client: Any = None):
    """``emseg predict`` on a dask cluster (``config.scheduler``) or in-process with ``config.resume``.

    The output (zarr only) is written in place into a fixed ``.partial`` array whose attributes
    hold the run's parameters; each finished block gets a marker in ``.partial/.done``. A rerun
    with the same parameters computes only the blocks without a marker (different parameters:
    InputError). When every block is done the markers are removed and the array is renamed to the
    final name, so that name appears only complete. A block that fails ``config.retries + 1``
    times raises :class:`BlockFailed` after the other blocks are finished.

    Parameters
    ----------
    config : emseg.predict.PredictConfig
    progress : callable, optional
        ``progress(done_voxels, total_voxels)``; blocks found done count at once.
    client : distributed.Client, optional
        Use this client instead of starting one from ``config.scheduler``.

    Returns
    -------
    emseg.predict.PredictResult
        ``stats.voxels`` counts the voxels computed in this call; ``blocks_computed`` the blocks.

    Examples
    --------
    >>> from emseg.predict import PredictConfig
    >>> cfg = PredictConfig("best.pt", "stack.h5:raw", "pred.zarr/probs", scheduler="local", workers=4)
    >>> predict_resumable(cfg).blocks_computed  # doctest: +SKIP
    48
    """
    import zarr

    from emseg.checkpoint import check_model_config, load_checkpoint, network_patch
    from emseg.inference import PredictStats, default_block_shape, output_shape, plan_blocks
    from emseg.io import auto_chunks, check_raw, open_volume, parse_spec, replace_output
    from emseg.io._volume import _zarr_compressors
    from emseg.predict import PredictResult, resolve_patch

    if config.workers is not None and config.scheduler != "local" and client is None:
        raise InputError("--workers applies to --scheduler local only")
    out_spec = parse_spec(config.output)
    if out_spec.fmt != "zarr":
        what = "--scheduler" if config.scheduler else "--resume"
        raise InputError(f"{what} needs a zarr output (e.g. pred.zarr/probs): blocks are written in place by "
                         f"independent tasks, which HDF5 files do not allow", source=str(out_spec))
    if client is None and config.scheduler is not None:
        require_distributed()
    model_path = Path(config.model).resolve()
    state = load_checkpoint(model_path)
    check_model_config(state["model_config"], source=str(config.model))
    if state["model_config"].get("cond_channels"):
        raise InputError("this checkpoint is label-conditioned: use `emseg lcs infer`", source=config.model)
    st = model_path.stat()
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
    dtype = np.dtype("float32" if config.output_type == "probabilities" else "uint8")
    chunks = auto_chunks(shape, dtype.itemsize)
    lead = chunks[:1] if config.output_type == "probabilities" else ()
    spatial = chunks[len(lead):]
    block_shape = tuple(config.block_shape) if config.block_shape else default_block_shape(vol_shape, patch, spatial)
    if len(block_shape) != len(vol_shape):
        raise InputError(f"--block {block_shape} does not fit a {len(vol_shape)}D volume")
    spatial = fit_chunks(block_shape, tuple(min(c, s) for c, s in zip(spatial, vol_shape)))
    chunks = lead + spatial
    blocks = plan_blocks(vol_shape, block_shape, [p // 2 for p in patch])

    store, key, partial, final = partial_location(out_spec)
    if not final.parent.exists() and not out_spec.key:
        raise InputError("output folder does not exist", source=str(final.parent))
    attrs = {"n_classes": n_classes, "output_type": config.output_type, "source": str(config.input),
             "model": str(Path(config.model)), "patch_shape": list(patch), "overlap": config.overlap,
             "blend": config.blend}
    params = _jsonable({
        "model": str(model_path), "model_mtime_ns": st.st_mtime_ns, "model_size": st.st_size,
        "input": str(in_spec), "input_shape": list(vol_shape), "input_dtype": vol_dtype,
        "patch_shape": list(patch), "overlap": config.overlap, "blend": config.blend,
        "batch_size": config.batch_size, "output_type": config.output_type, "block_shape": list(block_shape),
        "precision": config.precision,
        "shape": list(shape), "chunks": list(chunks)})
    if key:  # the group holding the partial array (and its lock file)
        root = zarr.open_group(store=str(store), mode="a")
        if key.rpartition("/")[0]:
            root.require_group(key.rpartition("/")[0])
    lock = lock_output(partial, what=str(parse_spec(config.output)))
    try:
        return _predict_partial(config, params, attrs, store, key, partial, final, out_spec, shape, dtype, chunks,
                                blocks, model_path, st, in_spec, patch, n_classes, block_shape, progress, client)
    finally:
        lock.release()


def _predict_partial(config, params, attrs, store, key, partial, final, out_spec, shape, dtype, chunks, blocks,
                     model_path, st, in_spec, patch, n_classes, block_shape, progress, client):
    """The locked part of :func:`predict_resumable`: create or reopen the partial, run, rename."""
    import zarr

    from emseg.inference import PredictStats
    from emseg.io import clean_output_temps, parse_spec, replace_output
    from emseg.io._volume import _zarr_compressors
    from emseg.predict import PredictResult

    clean_output_temps(out_spec)
    if partial.exists():
        try:
            array = zarr.open_array(store=str(store), path=key or None, mode="r+")
            stored = array.attrs.get(RESUME_ATTR)
        except Exception:
            stored = None
        _check_params(stored, params, partial)
    else:
        if key:
            root = zarr.open_group(store=str(store), mode="a")
            parent = key.rpartition("/")[0]
            if parent:
                root.require_group(parent)
        zarr.create_array(store=str(store), name=key or None, shape=shape, dtype=dtype, chunks=chunks,
                          compressors=_zarr_compressors(dtype), fill_value=0,
                          attributes=dict(attrs, **{RESUME_ATTR: params}))
    fail = injected_failures()
    job = PredictJob(model=str(model_path), model_mtime_ns=st.st_mtime_ns, model_size=st.st_size,
                     input=str(in_spec), store=str(store), key=key, patch_shape=tuple(patch),
                     overlap=config.overlap, blend=config.blend, batch_size=config.batch_size,
                     output_type=config.output_type, device=config.device, precision=config.precision,
                     compile=config.compile, fail_blocks=fail)
    markers = DoneMarkers(partial / DONE_DIR)
    total = sum(b.size for b in blocks)
    finished = markers.done()
    progress_state = {"done": sum(b.size for b in blocks if b.index in finished), "computed": 0}
    if progress is not None:
        progress(progress_state["done"], total)

    def on_done(block, _result) -> None:
        progress_state["done"] += block.size
        progress_state["computed"] += block.size
        if progress is not None:
            progress(progress_state["done"], total)

    hint = f"finished blocks are kept in {partial}: rerun the same command to compute only the missing ones"
    run = run_blocks(functools.partial(predict_block_task, job=job), blocks, scheduler=config.scheduler,
                     workers=config.workers, client=client, retries=config.retries, done=markers,
                     on_done=on_done, failure_source=str(config.output), failure_hint=hint)
    if client is None and config.scheduler is None:
        _MODELS.clear()  # the in-process run is over: do not keep its network in memory
    # The data are complete: rename first, then drop the bookkeeping (a crash in between leaves a
    # complete output with a stale attribute, never a partial without its parameters).
    replace_output(partial, final)
    array = zarr.open_array(store=str(out_spec.path), path=out_spec.key or None, mode="r+")
    del array.attrs[RESUME_ATTR]
    DoneMarkers(final / DONE_DIR).clear()
    stats = PredictStats(progress_state["computed"], len(blocks), run.seconds)
    return PredictResult(str(parse_spec(config.output)), shape, n_classes, patch, block_shape, stats,
                         blocks_computed=len(run.computed), blocks_skipped=len(run.skipped))


# --------------------------------------------------------------------------------------------
# torch.distributed: data-parallel training under torchrun
# --------------------------------------------------------------------------------------------

class _DDP(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel whose unknown attributes (``divisor``, ``ndim``...) come from the network."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


@dataclass
class ProcessGroup:
    """The data-parallel context of one training process.

    :meth:`from_env` reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (set by ``torchrun``) and
    joins the process group when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA); otherwise every
    method is the identity, so a single process behaves exactly as without it.

    Examples
    --------
    >>> group = ProcessGroup.from_env()
    >>> group.world_size, group.rank, group.is_main
    (1, 0, True)
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls) -> "ProcessGroup":
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise InputError("WORLD_SIZE, RANK and LOCAL_RANK must be integers") from None
        if world <= 1:
            return cls()
        if not dist.is_available():
            raise InputError("this torch build has no torch.distributed support")
        return cls(world, rank, local)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """Join the group; the device of this process (``cuda:LOCAL_RANK`` on GPUs)."""
        if not self.active:
            return device
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
            torch.cuda.set_device(device)
        self.device = device
        if not dist.is_initialized():
            # Joined once per process and kept: a process may train several times (an active
            # learning loop, say), and torchrun's store does not support joining a second time.
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    rank=self.rank, world_size=self.world_size)
            atexit.register(_leave_process_group)
        elif dist.get_world_size() != self.world_size:
            raise InputError(f"the process group has {dist.get_world_size()} processes, WORLD_SIZE says "
                             f"{self.world_size}")
        return device

    def wrap(self, model: torch.nn.Module, *, find_unused_parameters: bool = False) -> torch.nn.Module:
        """The model the loss sees: DistributedDataParallel (rank 0's weights broadcast) or as is."""
        if not self.active:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return _DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)

    def _tensor(self, values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.float64, device=self.device)

    def mean(self, value: float) -> float:
        """The mean of ``value`` over processes (NaN/inf anywhere stays non-finite)."""
        if not self.active:
            return value
        t = self._tensor([value])
        dist.all_reduce(t)
        return float(t[0]) / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on one of them."""
        if not self.active:
            return flag
        t = self._tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0] > 0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` in rank order (on every process)."""
        if not self.active:
            return [obj]
        boxes: list[Any] = [None] * self.world_size
        dist.all_gather_object(boxes, obj)
        return boxes

    def rng_state(self, state: dict[str, Any], source: str) -> dict[str, Any]:
        """This process's random state in a checkpoint (rank r restores ``rng_ranks[r]``)."""
        stored = int(state.get("world_size", 1))
        if stored != self.world_size:
            raise InputError(f"checkpoint was written by {stored} training process(es), this run has "
                             f"{self.world_size}: resume with the same process count", source=source)
        return state["rng_ranks"][self.rank] if self.active else state["rng"]

    def barrier(self) -> None:
        """Wait until every process gets here (rank 0's files are then complete)."""
        if self.active and dist.is_initialized():
            dist.barrier()


def _leave_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
