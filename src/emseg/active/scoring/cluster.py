"""Pool scoring on a cluster: the chunks of :func:`emseg.active.scoring.stream.score_pool` as tasks of the
block executor (:func:`emseg.engine.cluster.run_blocks`), each worker loading the checkpoint once.

The chunks and their seeds (:func:`~emseg.active.scoring.stream.score_chunks`,
:func:`~emseg.active.scoring.stream.chunk_seed`) are those of the in-process scoring, so both give the same
scores; the parts are gathered with the same helper.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emseg.active.pool import Box, CandidatePool
from emseg.active.registry import get_strategy
from emseg.active.scoring.stream import (
    DEFAULT_CHUNK,
    Gather,
    PoolScores,
    check_counts,
    check_reduction,
    chunk_seed,
    score_boxes,
    score_chunks,
    squeeze_leading_axis,
    strategy_candidates,
)
from emseg.models.checkpoint import CheckpointFile, load_checkpoint
from emseg.engine.cluster import run_blocks
from emseg.io import open_volume, parse_spec
from emseg.runtime.precision import DEFAULT_PRECISION

__all__ = ["ScoreJob", "ScoreTask", "score_pool_on_cluster", "score_task"]


@dataclass(frozen=True)
class ScoreJob:
    """What a worker needs to score chunks of candidates (paths, no open handles)."""

    model: CheckpointFile
    sources: tuple[str, ...]
    dtypes: tuple[str, ...]
    strategy: str
    mc_samples: int
    reduction: str
    batch_size: int
    squeeze: bool
    seed: int | None
    device: str = "auto"
    precision: str = DEFAULT_PRECISION
    fold: bool = False


@dataclass(frozen=True)
class ScoreTask:
    """Chunk ``index``: the boxes of candidates ``indices``."""

    index: int
    indices: np.ndarray
    boxes: tuple[Box, ...]


#: One scoring task at a time per process: threads of one worker share the cached network (whose
#: modes are switched while scoring) and torch's global random generator (MC dropout).
_SCORE_LOCK = threading.Lock()


def score_task(task: ScoreTask, job: ScoreJob) -> PoolScores:
    """Worker side of :func:`score_pool_on_cluster`: score one chunk with the network cached per process.

    Examples
    --------
    >>> part = score_task(tasks[0], job)  # doctest: +SKIP
    """
    model, device = job.model.cached_model(job.device)
    with contextlib.ExitStack() as stack:
        sources = [stack.enter_context(open_volume(spec)) for spec in job.sources]
        with _SCORE_LOCK:
            return score_boxes(model, task.boxes, sources, [np.dtype(d) for d in job.dtypes],
                               get_strategy(job.strategy), mc_samples=job.mc_samples, reduction=job.reduction,
                               batch_size=job.batch_size, device=device, squeeze=job.squeeze,
                               seed=None if job.seed is None else chunk_seed(job.seed, task.index),
                               precision=job.precision, fold=job.fold)


def score_pool_on_cluster(
    model_path: str,
    pool: CandidatePool,
    sources: Sequence[str],
    strategy: str,
    *,
    mc_samples: int = 10,
    reduction: str = "mean",
    batch_size: int = 8,
    device: str = "auto",
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
    precision: str = DEFAULT_PRECISION,
    fold: bool = False,
    scheduler: str | None = None,
    workers: int | None = None,
    client: Any = None,
    retries: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> PoolScores:
    """:func:`score_pool` as tasks of a dask.distributed cluster, one per chunk of candidates.

    Each task loads the network once per worker (:func:`emseg.models.checkpoint.cached_model`), reads
    its patches from the volume specs ``sources`` and returns its scores and pooled embeddings,
    gathered here. Chunks, batches and MC-dropout seeds (:func:`chunk_seed`) are those of
    ``score_pool(..., seed=seed, chunk_size=chunk_size)``, so both give the same result (on the
    same hardware and thread count).

    Parameters
    ----------
    model_path : str
        Checkpoint, on a path every worker sees.
    pool : CandidatePool
    sources : sequence of str
        Volume specs (``FILE.h5:DATASET``, ``FILE.zarr/ARRAY``) of the pool volumes.
    strategy : str
        A strategy name (:data:`~emseg.active.registry.STRATEGIES`).
    mc_samples, reduction, batch_size, seed, chunk_size
        As in :func:`score_pool`.
    device : str
        Resolved on each worker.
    scheduler, workers, client, retries
        As in :func:`emseg.engine.cluster.run_blocks`.
    progress : callable, optional
        ``progress(done, total)`` candidates after each chunk.

    Returns
    -------
    PoolScores

    Examples
    --------
    >>> scores = score_pool_on_cluster("best.pt", pool, ["stack.h5:raw"], "entropy",
    ...                                scheduler="local", workers=4)  # doctest: +SKIP
    """
    strat = get_strategy(strategy)
    check_reduction(reduction)
    check_counts(batch_size=batch_size, chunk_size=chunk_size, mc_samples=mc_samples)
    if len(sources) != len(pool.volume_shapes):
        raise ValueError(f"{len(sources)} sources for a pool over {len(pool.volume_shapes)} volumes")
    specs, dtypes = [], []
    for i, (spec, shape) in enumerate(zip(sources, pool.volume_shapes)):
        s = parse_spec(spec)
        s = type(s)(Path(s.path).resolve(), s.key, s.fmt)
        with open_volume(s) as vol:
            if tuple(vol.shape) != tuple(shape):
                raise ValueError(f"source {i} has shape {tuple(vol.shape)}, the pool expects {tuple(shape)}")
            dtypes.append(str(vol.dtype))
        specs.append(str(s))
    n = len(pool)
    result = PoolScores(strat.name, None, None, reduction, int(mc_samples) if strat.needs_mc_dropout else None)
    if not (strat.needs_scores or strat.needs_embeddings) or n == 0:
        return result
    path = Path(model_path).resolve()
    checkpoint = CheckpointFile.of(path)
    model_ndim = int(load_checkpoint(path)["model_config"].get("ndim", len(pool.patch_shape)))
    job = ScoreJob(checkpoint, tuple(specs), tuple(dtypes), strat.name, int(mc_samples), reduction, int(batch_size),
                   squeeze_leading_axis(pool.patch_shape, model_ndim), int(seed), device, str(precision), bool(fold))
    todo = strategy_candidates(pool, strat)
    tasks = [ScoreTask(k, idx, tuple(pool.box(int(i)) for i in idx))
             for k, idx in enumerate(score_chunks(todo, chunk_size))]
    gather = Gather(result, n, strat.needs_scores)
    state = {"done": 0}

    def on_done(task: ScoreTask, part: PoolScores) -> None:
        gather.add(task.indices, part)
        state["done"] += len(task.indices)
        if progress is not None:
            progress(state["done"], len(todo))

    run_blocks(functools.partial(score_task, job=job), tasks, scheduler=scheduler, workers=workers,
               client=client, retries=retries, on_done=on_done, fail_fast=True,
               failure_hint="no output was written; rerun to score again")
    return gather.finish()
