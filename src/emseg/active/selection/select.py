"""Selecting a batch of candidates from a scored pool (top-k, diversity, hybrid), without overlaps."""
from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
import torch

from emseg.active.pool import CandidatePool
from emseg.active.registry import Strategy, get_strategy
from emseg.active.scoring.stream import PoolScores
from emseg.errors import InputError

__all__ = ["select"]


def _take_non_overlapping(pool: CandidatePool, order: np.ndarray, n: int) -> np.ndarray:
    if not pool.may_overlap:
        return order[:n]
    picks: list[int] = []
    p = np.asarray(pool.patch_shape, dtype=np.int64)
    for i in order:
        if len(picks) == n:
            break
        if picks:
            chosen = np.asarray(picks)
            same = pool.volume_index[chosen] == pool.volume_index[i]
            o = pool.offsets[chosen]
            hit = same & np.all((o < pool.offsets[i] + p) & (pool.offsets[i] < o + p), axis=1)
            if hit.any():
                continue
        picks.append(int(i))
    return np.asarray(picks, dtype=np.int64)


def select(
    pool: CandidatePool,
    strategy: str | Strategy,
    n: int,
    *,
    scores: PoolScores | None = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Choose ``n`` free candidates of ``pool`` with ``strategy``; indices in pick order.

    Uncertainty strategies take the highest scores (ties: lower index); random takes a uniform
    random order; k-means clusters the free candidates' embeddings; core-set (k-center greedy)
    and hybrid treat the labelled candidates (earlier queries and the candidates touching
    training labels) as existing centres. When candidates can overlap (random positions, or a
    stride below the patch), every strategy skips a candidate that overlaps an earlier pick
    (core-set and hybrid rule the overlapping candidates out as they go; k-means serves each
    cluster by its nearest member that does not overlap an earlier pick), so fewer than ``n``
    may come back from a crowded pool.

    Parameters
    ----------
    pool : CandidatePool
    strategy : str or Strategy
    n : int
        Number of picks, at most the number of free candidates.
    scores : PoolScores, optional
        Output of :func:`score_pool` (required unless the strategy is ``random``).
    rng : numpy.random.Generator or int or None
        Random source (random order, k-means seeding, first core-set pick without labels).

    Returns
    -------
    numpy.ndarray
        int64 indices into the pool, best first.

    Examples
    --------
    >>> pool = build_pool([(1, 8, 8)], (1, 4, 4))
    >>> select(pool, "random", 2, rng=0).shape
    (2,)
    """
    strat = get_strategy(strategy) if not isinstance(strategy, Strategy) else strategy
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    free = pool.free_indices()
    if n > len(free):
        raise InputError(f"cannot select {n} patches: the pool has {len(free)} free candidates")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    gen = np.random.default_rng(rng)
    if strat.kind == "random":
        return _take_non_overlapping(pool, free[gen.permutation(len(free))], n)
    if scores is None:
        raise ValueError(f"strategy {strat.name!r} needs scores from score_pool()")
    if strat.needs_scores and (scores.scores is None or np.isnan(scores.scores[free]).any()):
        raise ValueError(f"strategy {strat.name!r} needs a score for every free candidate")
    if strat.needs_embeddings and scores.embeddings is None:
        raise ValueError(f"strategy {strat.name!r} needs embeddings from score_pool()")
    if strat.kind == "uncertainty":
        order = free[np.argsort(-scores.scores[free], kind="stable")]
        return _take_non_overlapping(pool, order, n)
    lab = pool.labelled_indices()
    emb = torch.from_numpy(scores.embeddings)
    params = inspect.signature(strat.select_fn).parameters
    conflicts = _overlap_conflicts(pool) if pool.may_overlap and "conflicts" in params else None
    if strat.kind == "hybrid":
        s = torch.from_numpy(np.nan_to_num(scores.scores, nan=-np.inf))
        picks = strat.select_fn(s, emb, n, labeled_idx=lab, **({"conflicts": conflicts} if conflicts else {}))
        return picks.cpu().numpy().astype(np.int64)
    if "labeled_idx" in params:  # core-set: labelled candidates are existing centres
        picks = strat.select_fn(emb, n, labeled_idx=lab, rng=gen if len(lab) == 0 else None,
                                **({"conflicts": conflicts} if conflicts else {}))
        return picks.cpu().numpy().astype(np.int64)
    local = None
    if conflicts is not None:  # k-means runs over the free candidates: map their indices
        to_local = np.full(len(pool), -1, dtype=np.int64)
        to_local[free] = np.arange(len(free))

        def local(i: int) -> np.ndarray:
            ruled = to_local[conflicts(int(free[i]))]
            return ruled[ruled >= 0]

    picks = strat.select_fn(emb[torch.from_numpy(free)], n, rng=gen,
                            **({"conflicts": local} if local is not None else {}))  # k-means over free ones
    return free[picks.cpu().numpy()]


def _overlap_conflicts(pool: CandidatePool) -> Callable[[int], np.ndarray]:
    """``conflicts(i)``: the candidates of ``pool`` sharing a voxel with candidate ``i``."""

    def conflicts(i: int) -> np.ndarray:
        return np.flatnonzero(pool.overlapping(pool.box(int(i))))

    return conflicts
