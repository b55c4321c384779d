"""Batch selection rules: top-k, random, k-means, core-set (k-center greedy) and hybrid.

All selectors return a 1-D ``torch.int64`` tensor of distinct indices. Embedding-based
selectors take an ``(N, D)`` tensor (e.g. pooled U-Net bottleneck features) and compute on its
device; non-floating embeddings are converted to float32, and squared Euclidean distances are
evaluated as ``|x|^2 - 2 x.c + |c|^2`` (clamped at 0), so no ``(N, N)`` matrix and no
``x - c`` difference array is ever built by the fast paths. The expansion cancels
catastrophically when the embeddings share a large common offset (``|x|^2`` then dwarfs the
distances), so k-means and k-center greedy first subtract the mean embedding (computed in
float64); distances are translation invariant, and the centred float32 values carry only the
spread.

Selectors that may return overlapping patches accept ``conflicts``: a callable mapping a
picked index to the indices it rules out (e.g. the candidates overlapping the picked box);
those are never picked afterwards, and fewer than ``n`` indices come back when every
remaining sample is ruled out.

Randomness comes from ``rng`` (a :class:`numpy.random.Generator`, an int seed or ``None``),
normalised with :func:`numpy.random.default_rng`; a given seed gives the same selection on
every call.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from emseg.active.scoring.embeddings import (
    Conflicts,
    as_embeddings,
    as_index,
    centred,
    check_count,
    conflict_index,
    min_sq_dist_to_set,
)
from emseg.active.selection.kmeans import kmeans_select

__all__ = [
    "hybrid_select",
    "kcenter_greedy",
    "kmeans_select",
    "random_select",
    "select_top",
]

#: Default ratio ``top_m / n`` of :func:`hybrid_select`.
HYBRID_TOP_M_FACTOR = 4

# ----------------------------------------------------------------------------- simple rules
def select_top(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` highest scores, in descending order; ties go to the lower index.

    Parameters
    ----------
    scores : torch.Tensor
        1-D scores (higher = more informative). NaN is rejected.
    n : int
        Number of indices to return, ``0 <= n <= len(scores)``.

    Returns
    -------
    torch.Tensor
        ``(n,)`` int64 indices on the device of ``scores``.

    Examples
    --------
    >>> select_top(torch.tensor([0.1, 0.9, 0.5, 0.9]), 3)
    tensor([1, 3, 2])
    """
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D; got shape {tuple(scores.shape)}")
    n = check_count(n)
    if n > scores.shape[0]:
        raise ValueError(f"cannot select n={n} from {scores.shape[0]} scores")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError("scores must not contain NaN")
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:n]


def random_select(
    n_total: int, n: int, rng: np.random.Generator | int | None = None
) -> torch.Tensor:
    """``n`` distinct indices drawn uniformly from ``range(n_total)`` (the random baseline).

    Parameters
    ----------
    n_total : int
        Size of the pool.
    n : int
        Number of indices, ``0 <= n <= n_total``.
    rng : numpy.random.Generator or int or None
        Random source or seed.

    Returns
    -------
    torch.Tensor
        ``(n,)`` int64 indices (CPU), in draw order.

    Examples
    --------
    >>> random_select(10, 3, rng=0).shape
    torch.Size([3])
    """
    n_total = check_count(n_total, name="n_total")
    n = check_count(n)
    if n > n_total:
        raise ValueError(f"cannot select n={n} from a pool of {n_total}")
    gen = np.random.default_rng(rng)
    return torch.as_tensor(gen.choice(n_total, size=n, replace=False), dtype=torch.int64)


# ----------------------------------------------------------------------------- k-center greedy
def _kcenter_start(
    x: torch.Tensor, first: int | None, rng: np.random.Generator | int | None
) -> int:
    n_total = x.shape[0]
    if first is not None:
        first = check_count(first, name="first")
        if first >= n_total:
            raise ValueError(f"first must lie in [0, {n_total}); got {first}")
        return first
    if rng is not None:
        return int(np.random.default_rng(rng).integers(n_total))
    # Deterministic default: the sample farthest from the mean embedding (lowest index on ties).
    return int(torch.argmax(((x - x.mean(dim=0)) ** 2).sum(dim=1)))


def _kcenter_prepare(
    embeddings: object, n: int, labeled_idx: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checked embeddings and labelled indices of a k-center selection, and its ``(n,)``
    int64 result, not yet filled."""
    x = as_embeddings(embeddings)
    n = check_count(n)
    lab = as_index(labeled_idx, x.shape[0], x.device, name="labeled_idx")
    if n + lab.numel() > x.shape[0]:
        raise ValueError(
            f"cannot select n={n} from {x.shape[0]} embeddings with {lab.numel()} already labelled"
        )
    return x, lab, torch.empty(n, dtype=torch.int64, device=x.device)


def kcenter_greedy(
    embeddings: torch.Tensor,
    n: int,
    *,
    labeled_idx: Sequence[int] | torch.Tensor | np.ndarray | None = None,
    first: int | None = None,
    rng: np.random.Generator | int | None = None,
    conflicts: Conflicts | None = None,
) -> torch.Tensor:
    """Core-set selection by greedy k-center (Sener & Savarese 2018).

    Repeatedly picks the sample whose distance to the nearest already-chosen or labelled
    sample is largest (ties: lowest index), which greedily minimises the covering radius of
    the selection. A single running minimum-distance vector is kept and updated with one
    matrix-vector product per pick (``|x|^2 - 2 x.c + |c|^2`` with ``|x|^2`` precomputed);
    neither an ``(N, N)`` matrix nor ``x - c`` is built. Labelled and chosen samples are never
    picked, even when other samples duplicate them.

    Parameters
    ----------
    embeddings : torch.Tensor
        ``(N, D)`` embeddings of all samples (labelled ones included).
    n : int
        Number of samples to pick; ``n + len(labeled_idx) <= N``.
    labeled_idx : array-like of int or bool mask, optional
        Samples already labelled; they act as existing centres and are never returned.
    first : int, optional
        Index of the first pick. When ``None``: with a labelled set the first pick is greedy
        like the others; without one it is a uniform draw from ``rng`` if ``rng`` is given,
        otherwise (default) the sample farthest from the mean embedding.
    rng : numpy.random.Generator or int or None
        Only used to draw the first pick when there is no labelled set and no ``first``.
    conflicts : callable, optional
        ``conflicts(i)`` -> indices that can no longer be picked once ``i`` is (they do not
        become centres). Picking stops early when every remaining sample is ruled out.

    Returns
    -------
    torch.Tensor
        ``(n,)`` int64 indices on the embeddings' device, in pick order (fewer with
        ``conflicts``, see above).

    Notes
    -----
    The embeddings are centred (mean subtracted in float64) before the expansion, so a large
    common offset does not cancel the distances away; the expansion itself runs in the
    embeddings' dtype (at least float32), so exact near-ties can still resolve differently
    from float64 arithmetic.

    Examples
    --------
    >>> x = torch.tensor([[0.0], [1.0], [10.0], [4.0]])
    >>> kcenter_greedy(x, 2, labeled_idx=[0])
    tensor([2, 3])
    """
    x, lab, picks = _kcenter_prepare(embeddings, n, labeled_idx)
    if len(picks) == 0:
        return picks
    x = centred(x)
    x_sq = (x * x).sum(dim=1)
    if lab.numel() > 0:
        min_d = min_sq_dist_to_set(x, x_sq, x[lab])
        min_d[lab] = -1.0
    else:
        min_d = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    start = 0
    if first is not None or lab.numel() == 0:
        i = _kcenter_start(x, first, rng)
        if lab.numel() > 0 and bool((lab == i).any()):
            raise ValueError(f"first={i} is already labelled")
        picks[0] = i
        start = 1
        min_d = torch.minimum(min_d, (x_sq - 2.0 * (x @ x[i]) + x_sq[i]).clamp_min_(0))
        min_d[i] = -1.0
        ruled = conflict_index(conflicts, i, x.device)
        if ruled is not None and ruled.numel():
            min_d[ruled] = -1.0
    for k in range(start, len(picks)):
        i = torch.argmax(min_d)  # first maximum: ties go to the lowest index
        if conflicts is not None and float(min_d[i]) < 0:  # everything left is ruled out
            return picks[:k]
        picks[k] = i
        c = x[i]
        min_d = torch.minimum(min_d, (x_sq - 2.0 * (x @ c) + x_sq[i]).clamp_min_(0))
        min_d[i] = -1.0
        ruled = conflict_index(conflicts, int(i), x.device)
        if ruled is not None and ruled.numel():
            min_d[ruled] = -1.0
    return picks


def kcenter_greedy_naive(embeddings: torch.Tensor, n: int, *,
                         labeled_idx: Sequence[int] | torch.Tensor | np.ndarray | None = None,
                         first: int | None = None, rng: np.random.Generator | int | None = None) -> torch.Tensor:
    """Reference greedy k-center that materialises ``x - c`` for every centre.

    Same rule, arguments and result as :func:`kcenter_greedy`, but distances are computed as
    ``((x - c) ** 2).sum(1)``, one ``(N, D)`` difference array per centre (labelled centres
    included). Slower and more memory-hungry; kept for benchmarks and tests.

    Examples
    --------
    >>> x = torch.tensor([[0.0], [1.0], [10.0], [4.0]])
    >>> torch.equal(kcenter_greedy_naive(x, 2, labeled_idx=[0]), kcenter_greedy(x, 2, labeled_idx=[0]))
    True
    """
    x, lab, picks = _kcenter_prepare(embeddings, n, labeled_idx)
    if len(picks) == 0:
        return picks
    chosen = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    min_d = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    for j in lab.tolist():
        diff = x - x[j]
        min_d = torch.minimum(min_d, (diff * diff).sum(dim=1))
        chosen[j] = True
    for k in range(len(picks)):
        if k == 0 and (first is not None or lab.numel() == 0):
            i = _kcenter_start(x, first, rng)
            if bool(chosen[i]):
                raise ValueError(f"first={i} is already labelled")
        else:
            i = int(torch.argmax(min_d.masked_fill(chosen, -1.0)))
        picks[k] = i
        chosen[i] = True
        diff = x - x[i]
        min_d = torch.minimum(min_d, (diff * diff).sum(dim=1))
    return picks


# ----------------------------------------------------------------------------- hybrid
def hybrid_select(
    scores: torch.Tensor,
    embeddings: torch.Tensor,
    n: int,
    *,
    top_m: int | None = None,
    labeled_idx: Sequence[int] | torch.Tensor | np.ndarray | None = None,
    conflicts: Conflicts | None = None,
) -> torch.Tensor:
    """Uncertainty then diversity: k-center greedy among the ``top_m`` most uncertain samples.

    The ``top_m`` unlabelled samples with the highest ``scores`` (ties: lowest index) form the
    candidate set; :func:`kcenter_greedy` then picks ``n`` of them, treating labelled samples
    as already-chosen centres. Without a labelled set the first pick is the most uncertain
    candidate. This is the exploration/uncertainty hybrid suggested as future work by
    Roels & Saeys.

    Parameters
    ----------
    scores : torch.Tensor
        ``(N,)`` uncertainty scores (higher = more uncertain), e.g. from :func:`entropy`.
    embeddings : torch.Tensor
        ``(N, D)`` embeddings of the same samples.
    n : int
        Number of samples to select.
    top_m : int, optional
        Candidate-set size, ``top_m >= n``. Default ``4 * n``: large enough for the diversity
        step to skip near-duplicates (overlapping or adjacent EM patches tend to share high
        scores), small enough that every pick stays among the clearly uncertain samples.
        Capped at the number of unlabelled samples.
    labeled_idx : array-like of int or bool mask, optional
        Labelled samples: never candidates, but used as existing k-center centres.
    conflicts : callable, optional
        ``conflicts(i)`` (indices into the full set) -> samples ruled out once ``i`` is picked,
        as in :func:`kcenter_greedy`.

    Returns
    -------
    torch.Tensor
        ``(n,)`` int64 indices into the full set (embeddings' device), in pick order (fewer
        with ``conflicts`` when every candidate is ruled out).

    Examples
    --------
    >>> s = torch.tensor([0.9, 0.8, 0.85, 0.1])
    >>> x = torch.tensor([[0.0], [5.0], [0.1], [9.0]])
    >>> hybrid_select(s, x, 2, top_m=3)  # 3 is never a candidate; 2 duplicates 0
    tensor([0, 1])
    """
    x = as_embeddings(embeddings)
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores)
    if scores.ndim != 1 or scores.shape[0] != x.shape[0]:
        raise ValueError(
            f"scores must have shape ({x.shape[0]},) to match embeddings; got {tuple(scores.shape)}"
        )
    n = check_count(n)
    lab = as_index(labeled_idx, x.shape[0], x.device, name="labeled_idx")
    n_free = x.shape[0] - lab.numel()
    if n > n_free:
        raise ValueError(f"cannot select n={n} from {n_free} unlabelled samples")
    if top_m is None:
        top_m = HYBRID_TOP_M_FACTOR * n
    else:
        top_m = check_count(top_m, name="top_m")
        if top_m < n:
            raise ValueError(f"top_m must be >= n={n}; got {top_m}")
    top_m = min(top_m, n_free)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=x.device)

    free_mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    free_mask[lab] = False
    free = torch.nonzero(free_mask).flatten()
    cand = free[select_top(scores.to(x.device)[free], top_m)]  # descending uncertainty
    pool = torch.cat([cand, lab])
    local_lab = torch.arange(top_m, pool.numel(), device=x.device)
    local_conflicts = None
    if conflicts is not None:
        to_local = np.full(x.shape[0], -1, dtype=np.int64)
        to_local[cand.cpu().numpy()] = np.arange(top_m)

        def local_conflicts(i: int) -> np.ndarray:
            ruled = to_local[np.asarray(conflicts(int(cand[i])), dtype=np.int64).reshape(-1)]
            return ruled[ruled >= 0]

    local = kcenter_greedy(
        x[pool], n, labeled_idx=local_lab, first=0 if lab.numel() == 0 else None, conflicts=local_conflicts
    )
    return cand[local]
