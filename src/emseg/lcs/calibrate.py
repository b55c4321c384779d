"""Per-label logit calibration of a conditioned model, fitted on its own atlas.

Each label's pass gives an independent sigmoid p_k, and the scale of its logit z_k = logit(p_k)
differs from label to label (a class that covers its neighbours, such as membrane around glia,
is over-confident there). A :class:`Calibration` maps each logit to ``s_k = scale_k * z_k +
offset_k`` (Platt scaling, one temperature and one bias per label). The merged label map is
then the argmax of ``softmax([0, s_1, ..., s_K])``: background has the fixed logit 0.

:func:`fit_calibration` chooses ``scale`` and ``offset`` that maximise the likelihood of a
known label map under that softmax (L-BFGS on a class-stratified, reweighted subsample of
:func:`fit_subsample`: at most :data:`MAX_FIT_ENTRIES` logits for up to 63 labels, at least 256
voxels per label beyond);
:meth:`emseg.lcs.LabelPredictor.calibration` runs the model on the atlas, conditioned on each
label's atlas mask, and fits on the atlas label map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from emseg.errors import InputError

#: Voxels used by the fit (a stratified subsample beyond this).
MAX_FIT_VOXELS = 1 << 16
#: Labels x voxels held by the fit: fewer voxels for many labels, so memory does not grow with K.
MAX_FIT_ENTRIES = 1 << 20
#: Probabilities are clipped to [EPS, 1 - EPS] before taking their logit.
EPS = 1e-6
#: Weight of the penalty pulling log(scale) and offset towards 0 (keeps a separable fit finite).
RIDGE = 1e-3


def prob_logit(probs: np.ndarray) -> np.ndarray:
    """float32 logit of probabilities clipped to [EPS, 1 - EPS].

    Examples
    --------
    >>> [round(float(v), 3) for v in prob_logit(np.array([0.5, 0.9]))]
    [0.0, 2.197]
    """
    p = np.clip(np.asarray(probs, dtype=np.float32), EPS, 1 - EPS)
    return (np.log(p) - np.log1p(-p)).astype(np.float32)


@dataclass(frozen=True)
class Calibration:
    """Per-label scale and offset of the logits; ``calibrated(k, p) = scale[k] * logit(p) + offset[k]``.

    Attributes
    ----------
    labels : tuple of int
        The labels, in the order of ``scale`` and ``offset``.
    scale, offset : tuple of float
    nll_before, nll_after : float
        Mean negative log-likelihood of the fitted label map with scale 1, offset 0 and after
        the fit (NaN when not fitted).

    Examples
    --------
    >>> cal = Calibration((1, 2), (2.0, 1.0), (0.0, -1.0))
    >>> [round(float(v), 3) for v in cal.calibrated(0, np.array([0.5, 0.9]))]
    [0.0, 4.394]
    """

    labels: tuple[int, ...]
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    nll_before: float = float("nan")
    nll_after: float = float("nan")

    def __post_init__(self):
        if not len(self.labels) == len(self.scale) == len(self.offset):
            raise ValueError("labels, scale and offset must have the same length")

    def calibrated(self, k: int, probs: np.ndarray) -> np.ndarray:
        """Calibrated logit of the ``k``-th label's probabilities (float32)."""
        return (np.float32(self.scale[k]) * prob_logit(probs) + np.float32(self.offset[k])).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        # full precision: the recorded parameters reproduce the label map exactly
        return {"labels": [int(l) for l in self.labels], "scale": [float(s) for s in self.scale],
                "offset": [float(o) for o in self.offset],
                "nll_before": _finite(self.nll_before), "nll_after": _finite(self.nll_after)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Calibration":
        nan = float("nan")
        return cls(tuple(int(l) for l in data["labels"]), tuple(float(s) for s in data["scale"]),
                   tuple(float(o) for o in data["offset"]),
                   nan if data.get("nll_before") is None else float(data["nll_before"]),
                   nan if data.get("nll_after") is None else float(data["nll_after"]))


def _finite(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


def fit_subsample(label: np.ndarray, labels: Sequence[int], rng: np.random.Generator | int = 0,
                  max_voxels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the voxels of ``label`` used for a fit, and their weights.

    Voxels >= 0 only. When there are more than ``max_voxels`` (default: :data:`MAX_FIT_VOXELS`,
    fewer for many labels so that labels x voxels stays within :data:`MAX_FIT_ENTRIES`, but never
    fewer than 256 per group, which exceeds that bound beyond 63 labels), each
    group (each of ``labels``, and background: every other value) keeps at most an equal share
    of random voxels, weighted by (group size / voxels kept) so that the weighted likelihood
    estimates the likelihood of the whole map. Rare labels are thereby always represented.

    Examples
    --------
    >>> index, weight = fit_subsample(np.array([0, 0, 0, 1, -1, 2]), [1, 2], max_voxels=3)
    >>> index.tolist(), weight.tolist()
    ([2, 3, 5], [3.0, 1.0, 1.0])
    """
    flat = np.asarray(label).ravel()
    k = len(labels)
    if max_voxels is None:
        max_voxels = max(256 * (k + 1), min(MAX_FIT_VOXELS, MAX_FIT_ENTRIES // max(k, 1)))
    valid = np.flatnonzero(flat >= 0)
    if valid.size <= max_voxels:
        return valid, np.ones(valid.size)
    rng = np.random.default_rng(rng)
    group = np.zeros(valid.size, dtype=np.int64)
    for i, l in enumerate(labels):
        group[flat[valid] == l] = i + 1
    share = max(1, max_voxels // (k + 1))
    index, weight = [], []
    for g in range(k + 1):
        members = valid[group == g]
        if members.size == 0:
            continue
        keep = members if members.size <= share else rng.choice(members, share, replace=False)
        index.append(keep)
        weight.append(np.full(keep.size, members.size / keep.size))
    index, weight = np.concatenate(index), np.concatenate(weight)
    order = np.argsort(index)
    return index[order], weight[order]


def fit_calibration(logits: np.ndarray, target: np.ndarray, labels: Sequence[int], *,
                    weights: np.ndarray | None = None, iterations: int = 50) -> Calibration:
    """Fit per-label scale and offset by maximum likelihood of ``target`` under softmax([0, s_1..s_K]).

    Parameters
    ----------
    logits : (K, N) array
        Uncalibrated logits of the K labels at N voxels.
    target : (N,) int array
        The label at each voxel; values not in ``labels`` count as background.
    labels : sequence of int
        The K labels, in the order of ``logits``.
    weights : (N,) array, optional
        Weight of each voxel in the likelihood (the weights of :func:`fit_subsample`).

    The scale is parametrised as ``exp(t)`` (always positive: the ranking within a label's map is
    kept), and a small ridge on ``t`` and the offset keeps the fit finite when the atlas is
    perfectly separable.

    Examples
    --------
    >>> z = np.array([[3.0, 3.0, -3.0, 3.0], [-2.0, 1.0, -2.0, -2.0]])
    >>> cal = fit_calibration(z, np.array([1, 2, 0, 1]), [1, 2])
    >>> cal.nll_after < cal.nll_before
    True
    """
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    k = len(labels)
    if z.ndim != 2 or z.shape[0] != k:
        raise ValueError(f"logits of shape {tuple(z.shape)} for {k} labels")
    target = np.asarray(target).ravel()
    if target.shape[0] != z.shape[1]:
        raise ValueError(f"{target.shape[0]} targets for {z.shape[1]} voxels")
    if target.size == 0:
        raise InputError("no atlas voxels to calibrate the merge on")
    index = np.zeros(target.shape, dtype=np.int64)  # 0: background (any value not in labels)
    for i, label in enumerate(labels):
        index[target == label] = i + 1
    y = torch.from_numpy(index)
    w = torch.ones(y.shape[0], dtype=torch.float64) if weights is None else \
        torch.as_tensor(np.asarray(weights, dtype=np.float64))
    w = w / w.sum()
    params = torch.zeros(2, k, dtype=torch.float64, requires_grad=True)

    def nll(p: torch.Tensor) -> torch.Tensor:
        s = torch.exp(p[0])[:, None] * z + p[1][:, None]
        full = torch.cat([torch.zeros_like(s[:1]), s], dim=0)  # background logit 0
        return (torch.nn.functional.cross_entropy(full.T, y, reduction="none") * w).sum()

    with torch.no_grad():
        before = float(nll(params))
    optimizer = torch.optim.LBFGS([params], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nll(params) + RIDGE * (params ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        after = float(nll(params))
        scale, offset = torch.exp(params[0]).tolist(), params[1].tolist()
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(offset))) or after > before:
        return Calibration(tuple(int(l) for l in labels), (1.0,) * k, (0.0,) * k, before, before)
    return Calibration(tuple(int(l) for l in labels), tuple(scale), tuple(offset), before, after)
