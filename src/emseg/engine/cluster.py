"""Blockwise work on a dask.distributed cluster or in this process, resumable.

* :func:`run_blocks` runs a function over independent blocks (:mod:`emseg.engine.blocks`), either in this
  process or on a dask.distributed cluster (a :class:`distributed.LocalCluster` or an existing
  scheduler, see :func:`open_client`), with bounded retries, per-block done markers
  (:class:`DoneMarkers`) so a rerun skips finished blocks, and a one-line :class:`BlockFailed` error
  naming the block that could not be computed.
* The resume protocol of the blockwise writers, built on these, is :mod:`emseg.engine.resumable`.

dask and distributed are an optional extra (``pip install 'emseg[distributed]'``); they are
imported only when a cluster is asked for. This module needs neither torch nor a network.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from emseg.engine.blocks import describe_block
from emseg.errors import InputError

#: Environment variable naming block indices whose tasks fail on purpose (comma-separated), to
#: rehearse a crash and the resume that follows. Read by the process that plans the run.
FAIL_BLOCKS_ENV = "EMSEG_FAIL_BLOCKS"


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
        raise InputError(f"`workers` must be >= 1, got {workers}")
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
        raise InputError(f"`scheduler` must be 'local' or a scheduler address such as tcp://HOST:8786, "
                         f"got {scheduler!r}")
    if workers is not None:
        raise InputError("`workers` applies only when `scheduler` is 'local' (an existing cluster has its own workers)")
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
    InputError
        The first :class:`~emseg.errors.InputError` a task raised (bad input is not retried in
        this process; on a cluster, after the other blocks), as it is.
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
                except InputError:  # bad input: the same on every attempt, reported as it is
                    raise
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
        bad_input = [cause for _, _, cause in failures if isinstance(cause, InputError)]
        if bad_input:  # a task refused its input (the same on a rerun): say what, not which block
            raise bad_input[0]
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
# rehearsed failures and chunks that tile the blocks
# --------------------------------------------------------------------------------------------

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
                                 f"(side {b}); choose `block_shape` sides that are multiples of {tuple(chunks)}")
            c = fitted
        out.append(c)
    return tuple(out)
