"""Embedding helpers of the diversity selectors: checked inputs, centring, blocked squared distances.

Squared Euclidean distances are evaluated as ``|x|^2 - 2 x.c + |c|^2`` (clamped at 0), a block of
centres at a time (:data:`BLOCK_ELEMS` entries at most), so no ``(N, N)`` matrix and no ``x - c``
difference array is built; :func:`centred` subtracts the mean embedding first (see
:mod:`emseg.active.selection.diversity`).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["BLOCK_ELEMS", "Conflicts", "as_embeddings", "as_index", "centred", "check_count", "conflict_index",
           "min_sq_dist_to_set", "sq_dists_to"]

# Largest number of distance entries computed at once when reducing against a block of
# centres (keeps memory at ~64 MiB in float32 whatever N and the labelled set size).
BLOCK_ELEMS = 1 << 24


def check_count(n: object, *, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"{name} must be an integer; got {n!r}")
    if n < 0:
        raise ValueError(f"{name} must be >= 0; got {n}")
    return int(n)


def as_embeddings(embeddings: object) -> torch.Tensor:
    if not isinstance(embeddings, torch.Tensor):
        embeddings = torch.as_tensor(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must have shape (N, D); got {tuple(embeddings.shape)}")
    if embeddings.shape[1] == 0:
        raise ValueError("embeddings must have at least one feature (D >= 1)")
    if not embeddings.is_floating_point():
        embeddings = embeddings.to(torch.float32)
    if not bool(torch.isfinite(embeddings).all()):
        raise ValueError("embeddings must be finite (found NaN or inf)")
    return embeddings.detach()


def as_index(idx: object, n_total: int, device: torch.device, *, name: str) -> torch.Tensor:
    """Validate an index set into ``range(n_total)``; returns unique sorted int64 indices."""
    if idx is None:
        return torch.zeros(0, dtype=torch.int64, device=device)
    t = torch.as_tensor(np.asarray(idx) if not isinstance(idx, torch.Tensor) else idx)
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    if t.dtype == torch.bool:
        if t.shape != (n_total,):
            raise ValueError(f"boolean {name} must have shape ({n_total},); got {tuple(t.shape)}")
        return torch.nonzero(t.to(device)).flatten()
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must hold integer indices; got dtype {t.dtype}")
    t = t.reshape(-1).to(device=device, dtype=torch.int64)
    if int(t.min()) < 0 or int(t.max()) >= n_total:
        raise ValueError(
            f"{name} must lie in [0, {n_total}); got values in [{int(t.min())}, {int(t.max())}]"
        )
    return torch.unique(t)


def centred(x: torch.Tensor) -> torch.Tensor:
    """``x`` minus its mean row (mean and difference in float64), in at least float32."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x64 = x.to(torch.float64)
    return (x64 - x64.mean(dim=0)).to(dtype)


Conflicts = Callable[[int], object]


def conflict_index(conflicts: Conflicts | None, i: int, device: torch.device) -> torch.Tensor | None:
    if conflicts is None:
        return None
    ruled = conflicts(int(i))
    t = torch.as_tensor(np.asarray(ruled, dtype=np.int64).reshape(-1), device=device)
    return t


def sq_dists_to(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances ``(N, K)`` from rows of ``x`` to rows of ``c`` (expansion form)."""
    c_sq = (c * c).sum(dim=1)
    d = x_sq[:, None] - 2.0 * (x @ c.T) + c_sq[None, :]
    return d.clamp_min_(0)


def min_sq_dist_to_set(x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``min_j |x_i - c_j|^2`` for every row of ``x``, processing ``centres`` in blocks."""
    n = x.shape[0]
    out = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    block = max(1, BLOCK_ELEMS // max(n, 1))
    for start in range(0, centres.shape[0], block):
        d = sq_dists_to(x, x_sq, centres[start : start + block])
        out = torch.minimum(out, d.amin(dim=1))
    return out
