"""k-means sampling: the member nearest each of ``n`` k-means++ seeded centroids (:func:`kmeans_select`)."""
from __future__ import annotations


import numpy as np
import torch

from emseg.active.scoring.embeddings import (
    Conflicts,
    as_embeddings,
    centred,
    check_count,
    conflict_index,
    sq_dists_to,
)

__all__ = ["kmeans_select"]


def _kmeanspp_init(
    x: torch.Tensor, x_sq: torch.Tensor, n: int, gen: np.random.Generator
) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007); returns the seed indices ``(n,)``."""
    n_total = x.shape[0]
    chosen = [int(gen.integers(n_total))]
    min_d = sq_dists_to(x, x_sq, x[chosen[0]][None])[:, 0]
    taken = torch.zeros(n_total, dtype=torch.bool, device=x.device)
    taken[chosen[0]] = True
    for _ in range(1, n):
        w = min_d.to(torch.float64).masked_fill(taken, 0.0)
        total = float(w.sum())
        if total > 0:
            # D^2 sampling through the cumulative sum: one uniform draw per centre.
            cum = torch.cumsum(w, dim=0)
            u = torch.tensor([gen.random() * total], dtype=torch.float64, device=x.device)
            i = int(torch.searchsorted(cum, u, right=True).clamp_max(n_total - 1))
            while taken[i]:  # guards the zero-weight boundary case of round-off
                i = int(torch.argmax(w))
        else:  # all remaining points coincide with a centre: pick uniformly among the rest
            free = torch.nonzero(~taken).flatten()
            i = int(free[int(gen.integers(free.numel()))])
        chosen.append(i)
        taken[i] = True
        min_d = torch.minimum(min_d, sq_dists_to(x, x_sq, x[i][None])[:, 0])
    return torch.as_tensor(chosen, dtype=torch.int64, device=x.device)


def kmeans_select(
    embeddings: torch.Tensor,
    n: int,
    rng: np.random.Generator | int | None = None,
    n_iter: int = 50,
    *,
    conflicts: Conflicts | None = None,
) -> torch.Tensor:
    """k-means sampling: one sample per cluster, the member nearest each of ``n`` centroids.

    Runs k-means++ seeding followed by at most ``n_iter`` Lloyd iterations (stopping early
    once assignments no longer change). A cluster that becomes empty is re-seeded at the
    sample farthest from its assigned centroid. The selection holds, for each cluster, the
    member nearest to the centroid (ties: lowest index); if a cluster is still empty at the
    end (only possible with duplicated embeddings), the nearest sample not selected yet is
    used, so indices are always distinct.

    Parameters
    ----------
    embeddings : torch.Tensor
        ``(N, D)`` sample embeddings.
    n : int
        Number of clusters = number of selected samples, ``0 <= n <= N``.
    rng : numpy.random.Generator or int or None
        Random source or seed for the seeding; equal seeds give equal selections.
    n_iter : int
        Maximum number of Lloyd iterations (>= 0); default 50.
    conflicts : callable, optional
        ``conflicts(i)`` -> indices ruled out once ``i`` is picked. Clusters are then served in
        seeding order, each by its nearest member not ruled out (or, when all are, the nearest
        sample not ruled out); clusters are skipped once nothing is left.

    Returns
    -------
    torch.Tensor
        ``(n,)`` int64 indices on the embeddings' device, one per cluster in seeding order
        (fewer with ``conflicts``, when every remaining sample is ruled out).

    Examples
    --------
    >>> x = torch.cat([torch.randn(20, 2), torch.randn(20, 2) + 50])
    >>> sel = kmeans_select(x, 2, rng=0)
    >>> sorted(int(i) // 20 for i in sel)  # one per blob
    [0, 1]
    """
    x = as_embeddings(embeddings)
    n = check_count(n)
    n_iter = check_count(n_iter, name="n_iter")
    n_total = x.shape[0]
    if n > n_total:
        raise ValueError(f"cannot select n={n} from {n_total} embeddings")
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=x.device)
    gen = np.random.default_rng(rng)
    x = centred(x)
    x_sq = (x * x).sum(dim=1)
    centroids = x[_kmeanspp_init(x, x_sq, n, gen)].clone()
    arange_k = torch.arange(n, device=x.device)

    assign = sq_dists_to(x, x_sq, centroids).argmin(dim=1)
    for _ in range(n_iter):
        counts = torch.bincount(assign, minlength=n)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        nonempty = counts > 0
        centroids = torch.where(
            nonempty[:, None], sums / counts.clamp_min(1)[:, None].to(x.dtype), centroids
        )
        for j in torch.nonzero(~nonempty).flatten().tolist():
            # Re-seed an empty cluster at the point worst served by the current assignment.
            own = centroids[assign]
            d_own = x_sq - 2.0 * (x * own).sum(1) + (own * own).sum(1)
            far = int(torch.argmax(d_own))
            centroids[j] = x[far]
            assign[far] = j
        new_assign = sq_dists_to(x, x_sq, centroids).argmin(dim=1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign

    d = sq_dists_to(x, x_sq, centroids)
    member = assign[:, None] == arange_k[None, :]
    if conflicts is not None:
        return _serve_clusters(d, member, conflicts)
    picks = d.masked_fill(~member, float("inf")).argmin(dim=0)
    empty = ~member.any(dim=0)
    if bool(empty.any()):
        taken = torch.zeros(n_total, dtype=torch.bool, device=x.device)
        taken[picks[~empty]] = True
        for j in torch.nonzero(empty).flatten().tolist():
            i = int(d[:, j].masked_fill(taken, float("inf")).argmin())
            picks[j] = i
            taken[i] = True
    return picks


def _serve_clusters(d: torch.Tensor, member: torch.Tensor, conflicts: Conflicts) -> torch.Tensor:
    """One pick per cluster in order, skipping samples ruled out by earlier picks."""
    n_total, n = d.shape
    out_of_play = torch.zeros(n_total, dtype=torch.bool, device=d.device)
    picks: list[int] = []
    for j in range(n):
        if bool(out_of_play.all()):
            break
        cand = d[:, j].masked_fill(out_of_play, float("inf"))
        inside = member[:, j] & ~out_of_play
        i = int(cand.masked_fill(~member[:, j], float("inf")).argmin()) if bool(inside.any()) else int(cand.argmin())
        picks.append(i)
        out_of_play[i] = True
        ruled = conflict_index(conflicts, i, d.device)
        if ruled is not None and ruled.numel():
            out_of_play[ruled] = True
    return torch.as_tensor(picks, dtype=torch.int64, device=d.device)
