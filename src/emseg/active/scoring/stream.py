"""Scoring a candidate pool with a U-Net, streamed batch by batch, in this process or on a cluster.

:func:`score_pool` runs the network over the pool and keeps only what the strategy needs: one
score per patch ``(N,)`` and, for diversity strategies, one pooled bottleneck embedding per patch
``(N, C_b)``. Nothing of shape ``(N, C, *P)`` or ``(T, ...)`` is ever held, so memory does not
grow with the pool size nor with the number of Monte-Carlo dropout passes ``T``.
:func:`emseg.active.scoring.cluster.score_pool_on_cluster` runs the same chunks
(:func:`score_chunks`, seeded by :func:`chunk_seed`) as tasks of the block executor
(:func:`emseg.engine.cluster.run_blocks`); both validate their options and gather the chunks' parts with
the same helpers.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from emseg.active.pool import Box, CandidatePool
from emseg.active.registry import Strategy, get_strategy
from emseg.active.scoring.criteria import REDUCTIONS
from emseg.data.values import to_float
from emseg.errors import InputError
from emseg.models import fold_batchnorm, set_mc_dropout
from emseg.runtime.device import fork_rng
from emseg.runtime.precision import DEFAULT_PRECISION, Precision, resolve_precision

__all__ = ["PoolScores", "chunk_seed", "score_chunks", "score_pool"]


@dataclass
class PoolScores:
    """What :func:`score_pool` keeps: per-patch scores and pooled embeddings.

    ``scores`` is ``(N,)`` float64 (NaN for candidates that were not scored, e.g. labelled
    ones for uncertainty strategies; ``(N, ...)`` for a score function returning several
    values per patch, such as :func:`~emseg.active.scoring.criteria.class_statistics`) or ``None``;
    ``embeddings`` is ``(N, C_b)`` float32 or ``None``. ``max_batch`` is the largest number of
    patches sent through the network at once.
    """

    strategy: str
    scores: np.ndarray | None
    embeddings: np.ndarray | None
    reduction: str
    mc_samples: int | None
    forward_passes: int = 0
    max_batch: int = 0
    seconds: float = 0.0

    @property
    def patches_per_s(self) -> float:
        n = len(self.scores) if self.scores is not None else (
            len(self.embeddings) if self.embeddings is not None else 0)
        return n / self.seconds if self.seconds > 0 else float("nan")


class Gather:
    """The pool-wide result filled chunk by chunk (the same in-process and from cluster tasks)."""

    def __init__(self, result: PoolScores, n: int, needs_scores: bool):
        self.result = result
        self.n = n
        self.scores = np.full(n, np.nan, dtype=np.float64) if needs_scores else None
        self.embeddings: np.ndarray | None = None
        self.start = time.perf_counter()

    def add(self, indices: np.ndarray, part: PoolScores) -> None:
        if part.scores is not None:
            self.scores = _widen(self.scores, part.scores)
            self.scores[indices] = part.scores
        if part.embeddings is not None:
            if self.embeddings is None:
                self.embeddings = np.zeros((self.n, part.embeddings.shape[1]), dtype=np.float32)
            self.embeddings[indices] = part.embeddings
        self.result.forward_passes += part.forward_passes
        self.result.max_batch = max(self.result.max_batch, part.max_batch)

    def finish(self) -> PoolScores:
        self.result.scores = self.scores
        self.result.embeddings = self.embeddings
        self.result.seconds = time.perf_counter() - self.start
        return self.result


def _widen(scores: np.ndarray, part: np.ndarray) -> np.ndarray:
    """``scores`` (NaN-filled, ``(N,)``) reshaped to ``(N, *part.shape[1:])`` when a score function
    returns more than one value per patch (per-class statistics); unchanged otherwise."""
    if scores.shape[1:] == part.shape[1:]:
        return scores
    return np.full((len(scores), *part.shape[1:]), np.nan, dtype=np.float64)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS or reduction == "none":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def check_counts(**counts: Any) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def strategy_candidates(pool: CandidatePool, strat: Strategy) -> np.ndarray:
    """The candidates to score: all of them when embeddings are needed (labelled ones are centres)."""
    return np.arange(len(pool)) if strat.needs_embeddings else pool.free_indices()


def squeeze_leading_axis(patch: tuple[int, ...], model_ndim: int) -> bool:
    """Whether the leading patch axis is squeezed away (2D net on a 3D volume)."""
    if len(patch) == model_ndim:
        return False
    if len(patch) == model_ndim + 1 and patch[0] == 1:
        return True
    raise InputError(f"patch {patch} does not suit a {model_ndim}D network (a 2D net on a 3D volume "
                     "needs patch z = 1)")


def has_dropout(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


#: Candidates per scoring chunk (one cluster task each with ``--scheduler``).
DEFAULT_CHUNK = 256


def score_chunks(todo: np.ndarray, chunk_size: int = DEFAULT_CHUNK) -> list[np.ndarray]:
    """``todo`` cut into consecutive chunks of ``chunk_size`` candidate indices.

    Examples
    --------
    >>> [c.tolist() for c in score_chunks(np.arange(5), 2)]
    [[0, 1], [2, 3], [4]]
    """
    return [todo[i:i + chunk_size] for i in range(0, len(todo), chunk_size)]


def chunk_seed(seed: int, index: int) -> int:
    """The torch seed of scoring chunk ``index`` of a run seeded ``seed`` (independent streams).

    Examples
    --------
    >>> chunk_seed(0, 1) == chunk_seed(0, 1) != chunk_seed(0, 2)
    True
    """
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint64)[0] >> 1)


def score_boxes(
    model: torch.nn.Module,
    boxes: Sequence[Box],
    sources: Sequence[Any],
    dtypes: Sequence[np.dtype],
    strategy: Strategy,
    *,
    mc_samples: int,
    reduction: str,
    batch_size: int,
    device: torch.device,
    squeeze: bool,
    seed: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    precision: str | Precision = DEFAULT_PRECISION,
    fold: bool = False,
) -> PoolScores:
    """Scores (``(len(boxes),)``) and/or pooled embeddings of the patches ``boxes``, batch by batch.

    The per-chunk worker of :func:`score_pool` (arguments already checked there). With ``seed``
    the MC-dropout passes draw from torch seeded with it (the global generator is forked, so the
    caller's state is left as it was). The module modes of ``model`` are restored afterwards.

    MC-dropout strategies run the network's deterministic part (:meth:`~emseg.models.UNet.encode`:
    the encoder and the bottleneck convolutions, where no dropout lives) once per batch and only
    the dropout-bearing rest (:meth:`~emseg.models.UNet.decode`) ``mc_samples`` times: the same
    dropout masks are drawn in the same order as with full passes, so the scores are the same.

    Examples
    --------
    >>> part = score_boxes(net, [pool.box(0)], [vol], [vol.dtype], get_strategy("entropy"),
    ...                    mc_samples=1, reduction="mean", batch_size=8, device=torch.device("cpu"),
    ...                    squeeze=True)  # doctest: +SKIP
    """
    strat = strategy
    m_total = len(boxes)
    result = PoolScores(strat.name, None, None, reduction, int(mc_samples) if strat.needs_mc_dropout else None)
    scores = np.full(m_total, np.nan, dtype=np.float64) if strat.needs_scores else None
    embeddings = None
    modes = {m: m.training for m in model.modules()}
    prec = resolve_precision(precision, device, ndim=int(getattr(model, "ndim", 2)))
    split = hasattr(model, "encode") and hasattr(model, "decode")
    if fold:  # a copy with batch norm folded into the convolutions: faster, equal up to rounding
        model = fold_batchnorm(model.eval())
    prec.prepare_model(model)
    fork = fork_rng(device) if seed is not None else contextlib.nullcontext()
    start = time.perf_counter()
    try:
        with torch.no_grad(), fork:
            if seed is not None:
                torch.manual_seed(seed)
            for b0 in range(0, m_total, batch_size):
                sel = slice(b0, min(b0 + batch_size, m_total))
                x = prec.prepare_input(_read_boxes(boxes[sel], sources, dtypes, squeeze).to(device))
                result.max_batch = max(result.max_batch, len(x))
                deterministic = strat.needs_embeddings or not strat.needs_mc_dropout
                if deterministic:
                    model.eval()
                    with prec.autocast():
                        out = model(x, return_embedding=True) if strat.needs_embeddings else model(x)
                    result.forward_passes += 1
                    logits, emb = out if strat.needs_embeddings else (out, None)
                    if emb is not None:
                        pooled = emb.float().mean(dim=tuple(range(2, emb.ndim))).cpu().numpy()
                        if embeddings is None:
                            embeddings = np.zeros((m_total, pooled.shape[1]), dtype=np.float32)
                        embeddings[sel] = pooled
                    if strat.needs_scores and not strat.needs_mc_dropout:
                        s = strat.score_fn(_probabilities(logits), reduction).cpu().double().numpy()
                        scores = _widen(scores, s)
                        scores[sel] = s
                    del out, logits, emb
                if strat.needs_scores and strat.needs_mc_dropout:
                    set_mc_dropout(model, True)
                    if split:
                        with prec.autocast():
                            encoded = model.encode(x)

                    def passes(x=x) -> Iterator[torch.Tensor]:
                        for _ in range(int(mc_samples)):
                            result.forward_passes += 1
                            with prec.autocast():
                                logits = model.decode(*encoded)[0] if split else model(x)
                            yield _probabilities(logits)

                    s = strat.score_fn(passes(), reduction).cpu().double().numpy()
                    scores = _widen(scores, s)
                    scores[sel] = s
                    encoded = None
                if on_batch is not None:
                    on_batch(sel.stop)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    result.scores = scores
    result.embeddings = embeddings
    result.seconds = time.perf_counter() - start
    return result


def _read_boxes(boxes: Sequence[Box], sources: Sequence[Any], dtypes: Sequence[np.dtype],
                squeeze: bool) -> torch.Tensor:
    patches = []
    for box in boxes:
        block = to_float(np.asarray(sources[box.volume][box.slices()]), dtypes[box.volume])
        patches.append(block[0] if squeeze else block)
    return torch.from_numpy(np.stack(patches)[:, None])


def score_pool(
    model: torch.nn.Module,
    pool: CandidatePool,
    sources: Sequence[Any],
    strategy: str | Strategy,
    *,
    mc_samples: int = 10,
    reduction: str = "mean",
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    raw_dtypes: Sequence[Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    seed: int | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    precision: str | Precision = DEFAULT_PRECISION,
    fold: bool = False,
) -> PoolScores:
    """Score the pool with ``model``, streaming batch by batch.

    Each patch goes through the network in one forward pass of the whole patch. Uncertainty
    strategies keep one score per patch; MC-dropout strategies (BALD) run ``mc_samples`` passes
    per batch with only dropout sampling (:func:`~emseg.models.set_mc_dropout`; BatchNorm uses
    its running statistics) and fold them into a running accumulator, so memory is bounded by
    one batch whatever ``T``; diversity strategies keep the bottleneck features
    (``model(x, return_embedding=True)[1]``) averaged over space, ``(C_b,)`` per patch.
    Uncertainty scores are computed for free candidates only unless the strategy also needs
    embeddings (hybrid), whose labelled members serve as centres. The module modes of
    ``model`` are restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        A U-Net (:class:`~emseg.models.UNet`) already on ``device``.
    pool : CandidatePool
    sources : sequence of array-like
        Raw volumes, one per pool volume (sliceable; integers are scaled by
        :func:`~emseg.data.to_float`).
    strategy : str or Strategy
    mc_samples : int
        Dropout passes ``T`` for MC-dropout strategies (default 10).
    reduction : {"mean", "sum"}
        Reduction of pixel-wise scores over the patch.
    batch_size : int
        Patches per forward pass.
    device : str or torch.device
    raw_dtypes : sequence of dtype, optional
        Dtype used to scale each source (default ``source.dtype``).
    progress : callable, optional
        ``progress(done, total)`` after each batch.
    seed : int, optional
        MC-dropout strategies: the candidates are scored in chunks of ``chunk_size`` (batches
        within a chunk), and chunk ``k`` seeds torch with :func:`chunk_seed` ``(seed, k)``, so the
        scores do not depend on what ran before, nor on where a chunk runs
        (:func:`score_pool_on_cluster` gives the same result). ``None`` draws from torch's
        current global state.
    chunk_size : int
        Candidates per chunk (a multiple of ``batch_size`` keeps the batches of an unchunked run).
    precision : {"fp32", "bf16", "auto"} or Precision
        Network arithmetic (:mod:`emseg.runtime.precision`); scores are computed in float32 either way.
    fold : bool
        Score with a copy of ``model`` whose batch norm is folded into the convolutions
        (:func:`~emseg.models.fold_batchnorm`): 2-3x faster on CPU, equal up to rounding.

    Returns
    -------
    PoolScores

    Examples
    --------
    >>> from emseg.models import UNet
    >>> net = UNet(ndim=2, out_channels=2, depth=1, base_width=2).eval()
    >>> vol = np.zeros((1, 8, 8), dtype=np.uint8)
    >>> pool = build_pool([vol.shape], (1, 4, 4))
    >>> score_pool(net, pool, [vol], "entropy").scores.shape
    (4,)
    """
    strat = get_strategy(strategy) if not isinstance(strategy, Strategy) else strategy
    check_reduction(reduction)
    check_counts(batch_size=batch_size, chunk_size=chunk_size)
    if len(sources) != len(pool.volume_shapes):
        raise ValueError(f"{len(sources)} sources for a pool over {len(pool.volume_shapes)} volumes")
    for i, (src, shape) in enumerate(zip(sources, pool.volume_shapes)):
        if tuple(src.shape) != tuple(shape):
            raise ValueError(f"source {i} has shape {tuple(src.shape)}, the pool expects {tuple(shape)}")
    if strat.needs_mc_dropout:
        check_counts(mc_samples=mc_samples)
        if not has_dropout(model):
            raise InputError(f"strategy {strat.name!r} samples dropout, but this network has no dropout "
                             "(train it with model.dropout > 0)")
    n = len(pool)
    result = PoolScores(strat.name, None, None, reduction,
                        int(mc_samples) if strat.needs_mc_dropout else None)
    if not (strat.needs_scores or strat.needs_embeddings) or n == 0:
        return result
    device = torch.device(device)
    squeeze = squeeze_leading_axis(pool.patch_shape, int(getattr(model, "ndim", len(pool.patch_shape))))
    dtypes = [np.dtype(d) for d in raw_dtypes] if raw_dtypes is not None else [
        np.dtype(s.dtype) for s in sources]
    todo = strategy_candidates(pool, strat)
    gather = Gather(result, n, strat.needs_scores)
    done = 0
    for k, idx in enumerate(score_chunks(todo, chunk_size)):
        boxes = [pool.box(int(i)) for i in idx]

        def on_batch(m: int, done: int = done) -> None:
            if progress is not None:
                progress(done + m, len(todo))

        part = score_boxes(model, boxes, sources, dtypes, strat, mc_samples=mc_samples, reduction=reduction,
                           batch_size=batch_size, device=device, squeeze=squeeze,
                           seed=None if seed is None else chunk_seed(seed, k), on_batch=on_batch,
                           precision=precision, fold=fold)
        gather.add(idx, part)
        done += len(idx)
    return gather.finish()
