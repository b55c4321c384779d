"""iGTT: unsupervised binary segmentation by iterative ground-truth training.

Implements the unsupervised iteration strategy of Luo et al., "Deep Neural Networks Learn
Meta-Structures from Noisy Labels in Semantic Segmentation" (AAAI 2022), section "Unsupervised
Binary-class Segmentation Based on Meta-Structures", Algorithm 1:

1. start from all-background pseudo-labels ``Y* = 0``;
2. every epoch, train a single-channel sigmoid U-Net on ``Y*`` with
   ``L = w_dmi * L_DMI + w_iou * L_IoU`` (equation 6; ``-1`` voxels are ignored);
3. predict the whole image, ``P``; build ``K`` thresholds evenly spaced between ``min P`` and
   ``max P`` (equations 2-3) and threshold ``P`` at each (``p > t``);
4. keep the mask with the lowest DMI against ``P`` (equation 4: ``-log|det(P S^T)|`` on the
   2 x 2 joint matrix), inverting it when it covers more than half of the image (see
   :func:`invert_if_large`);
5. pass it through the extraction-of-meta-structure (EMS) module -- skeleton, random shift within
   a radius, random sampling (:func:`ems`) -- and use the result as the next ``Y*``.

The network keeps its weights (and optimizer state) across epochs. Thresholding baselines (Otsu and
adaptive Gaussian thresholding from scikit-image) are computed alongside, see
:func:`threshold_baselines`. The whole image is held in memory: iGTT is transductive (it segments
the image it is trained on), meant for stacks of a few sections, not whole datasets.
"""
from __future__ import annotations

import csv
import io
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emseg.checkpoint import load_checkpoint, load_model, save_checkpoint
from emseg.config import AugmentConfig, CubeConfig, ModelConfig, OptimConfig, TrainConfig
from emseg.data import Augmenter, Cube, PatchSampler
from emseg.device import resolve_device
from emseg.errors import InputError
from emseg.blocks import default_block_shape, plan_blocks
from emseg.inference import SlidingWindow, predict_block, softmax_forward
from emseg.io import atomic_write_json, atomic_write_text, check_raw, create_volume, open_volume
from emseg.losses import dmi_loss, iou_loss
from emseg.metrics import binary_scores, roc_auc
from emseg.models import fold_batchnorm
from emseg.precision import resolve_precision
from emseg.noise.synthesis import sample, shift, skeleton

__all__ = [
    "BASELINES",
    "METRIC_COLUMNS",
    "Baseline",
    "IGTTConfig",
    "IGTTResult",
    "Selection",
    "binary_metrics",
    "candidate_thresholds",
    "dmi_per_threshold",
    "ems",
    "run_igtt",
    "invert_if_large",
    "select_mask",
    "threshold_baselines",
]

#: Columns of ``metrics.csv`` (one row per completed epoch; score columns empty without ground truth).
METRIC_COLUMNS = ("epoch", "threshold", "dmi", "fg_fraction", "inverted", "train_loss",
                  "label_fg_fraction", "label_fraction", "dice", "auc", "accuracy", "seconds")

#: Names of the thresholding baselines, in report order.
BASELINES = ("otsu", "adaptive")

_STATE = "igtt_state.pt"
_TRAIN_DIR = "train"
_DEFAULT_EPS = 1e-3  # same smoothing as emseg.losses.dmi_loss


# --------------------------------------------------------------------------- configuration


def _err(message: str) -> InputError:
    return InputError(message)


@dataclass(frozen=True)
class IGTTConfig:
    """Options of :func:`igtt` (every bad value raises ``ValueError``).

    Parameters
    ----------
    epochs : int
        Number of iterations (train, predict, select, EMS).
    n_thresholds : int
        ``K``, thresholds evenly spaced from ``min P`` to ``max P`` (both included); >= 2.
    ems : bool
        Pass the chosen mask through the EMS module; ``False`` trains on the mask itself.
    shift_radius : int
        EMS: radius (voxels) of the in-plane disc each skeleton voxel is moved within.
    sample_fraction : float
        EMS: fraction of each class (skeleton foreground and background) kept; the rest is -1
        (ignored by the loss).
    invert_large : bool
        Invert a chosen mask covering more than half of the image (see :func:`invert_if_large`).
    dmi_weight, iou_weight : float
        Weights of the DMI and IoU terms of the training loss (both 1 in the paper).
    steps_per_epoch, batch_size : int
        Training steps per epoch and patches per step.
    patch_shape : tuple of int
        In-plane training patch ``(y, x)``; multiples of ``2**depth``.
    depth, base_width : int
        U-Net size (down-sampling steps, feature maps at the first level).
    lr : float
        Adam learning rate (constant; the optimizer state carries across epochs).
    augment : bool
        Random flips, 90 degree rotations and small brightness/contrast changes of the patches.
    predict_window : int
        In-plane side of the sliding window used to predict the image (rounded up to the network's
        multiple; the fully convolutional network accepts windows larger than its training patch).
    adaptive_block_size, adaptive_offset : int, float
        ``block_size`` (odd) and ``offset`` of the adaptive thresholding baseline
        (:func:`skimage.filters.threshold_local`, ``method="gaussian"``).
    baselines : bool
        Compute the Otsu and adaptive thresholding baselines.
    save_pseudo_labels : bool
        Write each epoch's new pseudo-labels to ``pseudo_labels.h5:epoch_NN``.
    precision : {"auto", "fp32", "bf16"}
        Network arithmetic for training and prediction (:mod:`emseg.precision`).

    Examples
    --------
    >>> cfg = IGTTConfig(epochs=5, shift_radius=3)
    >>> cfg.n_thresholds
    20
    """

    epochs: int = 10
    n_thresholds: int = 20
    ems: bool = True
    shift_radius: int = 2
    sample_fraction: float = 0.5
    invert_large: bool = True
    dmi_weight: float = 1.0
    iou_weight: float = 1.0
    steps_per_epoch: int = 100
    batch_size: int = 4
    patch_shape: tuple[int, int] = (128, 128)
    depth: int = 3
    base_width: int = 16
    lr: float = 1e-3
    augment: bool = True
    predict_window: int = 256
    adaptive_block_size: int = 51
    adaptive_offset: float = 0.0
    baselines: bool = True
    save_pseudo_labels: bool = False
    precision: str = "auto"

    def __post_init__(self) -> None:
        patch = tuple(int(p) for p in self.patch_shape)
        if len(patch) == 3 and patch[0] == 1:
            patch = patch[1:]
        object.__setattr__(self, "patch_shape", patch)
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.n_thresholds >= 2, f"n_thresholds (K) must be >= 2, got {self.n_thresholds}"),
            (self.shift_radius >= 0, f"shift_radius must be >= 0, got {self.shift_radius}"),
            (0.0 < self.sample_fraction <= 1.0, f"sample_fraction must be in (0, 1], got {self.sample_fraction}"),
            (self.dmi_weight >= 0 and self.iou_weight >= 0 and self.dmi_weight + self.iou_weight > 0,
             f"loss weights must be >= 0 and not both 0, got dmi {self.dmi_weight}, iou {self.iou_weight}"),
            (self.steps_per_epoch >= 1, f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (len(patch) == 2 and all(p >= 1 for p in patch),
             f"patch_shape must be two positive sides (y, x), got {tuple(self.patch_shape)}"),
            (self.depth >= 1 and self.base_width >= 1,
             f"depth and base_width must be >= 1, got {self.depth}, {self.base_width}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.predict_window >= 1, f"predict_window must be >= 1, got {self.predict_window}"),
            (self.precision in ("auto", "fp32", "bf16"),
             f"precision must be auto, fp32 or bf16, got {self.precision!r}"),
            (self.adaptive_block_size >= 3 and self.adaptive_block_size % 2 == 1,
             f"adaptive_block_size must be an odd integer >= 3, got {self.adaptive_block_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise _err(message)
        divisor = 2 ** self.depth
        if any(p % divisor for p in patch):
            raise _err(f"patch_shape {patch} must be a multiple of {divisor} (2**depth) on each side")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for checkpoints, JSON and the resume check)."""
        d = asdict(self)
        d["patch_shape"] = list(self.patch_shape)
        return d


# --------------------------------------------------------------------------- threshold selection


def _as_prob(prob: Any) -> np.ndarray:
    p = np.asarray(prob)
    if p.size == 0:
        raise ValueError("prob must not be empty")
    if p.dtype.kind not in "fiu":
        raise ValueError(f"prob must be a real array, got dtype {p.dtype}")
    if p.dtype.kind == "f" and not np.isfinite(p).all():
        raise ValueError("prob must be finite")
    return p


def candidate_thresholds(prob: Any, n_thresholds: int) -> np.ndarray:
    """``K`` thresholds ``t_k = p_min + k (p_max - p_min) / (K - 1)``, ``k = 0..K-1``.

    Parameters
    ----------
    prob : array_like
        Prediction ``P`` (any shape).
    n_thresholds : int >= 2
        ``K``.

    Returns
    -------
    numpy.ndarray
        float64 thresholds, ascending; all equal when ``P`` is constant.

    Examples
    --------
    >>> candidate_thresholds([0.2, 0.6, 0.4], 3).tolist()
    [0.2, 0.4, 0.6]
    """
    p = _as_prob(prob)
    k = int(n_thresholds)
    if k < 2:
        raise ValueError(f"n_thresholds must be >= 2, got {n_thresholds}")
    lo, hi = float(p.min()), float(p.max())
    return lo + np.arange(k, dtype=np.float64) * ((hi - lo) / (k - 1))


def dmi_per_threshold(prob: Any, thresholds: Any, *, eps: float = _DEFAULT_EPS) -> np.ndarray:
    r"""DMI between ``P`` and each thresholded mask ``S_k = [P > t_k]``.

    With ``N`` voxels, :math:`\mathcal P = [p;\ 1-p]` and :math:`\mathcal S = [s;\ 1-s]` (2 x N),
    the value for one threshold is

    .. math:: L = -\log\left(\left|\det\left(\tfrac{1}{N}\mathcal P \mathcal S^\top\right)\right|
              + \frac{\epsilon}{N^2}\right),

    exactly what :func:`emseg.losses.dmi_loss` returns for ``(P, S_k)`` (``eps`` belongs to the
    unnormalised matrix, as in Xu et al.). The ``1/N`` scaling does not change which threshold
    minimises it. All thresholds are evaluated from one sort
    of ``P`` (``O(N log N + K)``) instead of ``K`` passes.

    Parameters
    ----------
    prob : array_like
        Prediction ``P`` (foreground scores, any shape).
    thresholds : array_like
        Thresholds ``t_k``.
    eps : float
        Added to ``|det|`` before the logarithm.

    Returns
    -------
    numpy.ndarray
        One DMI value per threshold (float64).

    Examples
    --------
    >>> p = [0.1, 0.2, 0.8, 0.9]
    >>> d = dmi_per_threshold(p, [0.15, 0.5, 0.85])
    >>> int(d.argmin())   # the cut between 0.2 and 0.8 is the most informative
    1
    """
    p = _as_prob(prob).reshape(-1).astype(np.float64)
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    n = p.size
    order = np.sort(p)
    csum = np.concatenate([[0.0], np.cumsum(order)])
    total = csum[-1]
    # number of voxels with p <= t; the mask S = p > t holds the rest
    below = np.searchsorted(order, t, side="right")
    n1 = n - below  # |S|
    a = total - csum[below]  # sum of p over S
    u11 = a / n  # p * s
    u10 = (total - a) / n  # p * (1 - s)
    u01 = (n1 - a) / n  # (1 - p) * s
    u00 = (n - n1 - (total - a)) / n  # (1 - p) * (1 - s)
    det = u11 * u00 - u10 * u01
    with np.errstate(divide="ignore"):  # eps = 0 and det = 0 give +inf
        return -np.log(np.abs(det) + eps / max(n, 1) ** 2)


def invert_if_large(mask: Any, *, enabled: bool = True) -> tuple[np.ndarray, bool]:
    """Invert a binary mask that covers more than half of the image.

    Rationale: the structures segmented in microscopy (membranes, mitochondria, ER, nuclei in
    sparse samples) occupy a minority of the voxels, and a network trained from all-background
    labels has no notion of which side of a threshold is "foreground" -- its polarity is set by
    chance at initialisation. A mask covering more than half of the image therefore means the
    polarity flipped. The DMI of equation 4 cannot tell (``|det|`` is unchanged when the mask is
    complemented), so the rule does not alter the selection, only the polarity. A mask of exactly
    half is left as it is.

    Parameters
    ----------
    mask : array_like of bool or 0/1
        Binary mask.
    enabled : bool
        ``False`` returns the mask unchanged.

    Returns
    -------
    (numpy.ndarray of bool, bool)
        The (possibly inverted) mask, a new array, and whether it was inverted.

    Examples
    --------
    >>> m, flipped = invert_if_large([1, 1, 1, 0])
    >>> m.astype(int).tolist(), flipped
    ([0, 0, 0, 1], True)
    """
    m = np.asarray(mask)
    if m.dtype != bool:
        if m.size and not np.isin(m, (0, 1)).all():
            raise ValueError("mask must be binary (bool or 0/1)")
        m = m.astype(bool)
    if enabled and m.size and 2 * int(np.count_nonzero(m)) > m.size:
        return ~m, True
    return m.copy(), False


@dataclass(frozen=True)
class Selection:
    """The DMI-minimising thresholded mask of one prediction (see :func:`select_mask`).

    ``mask`` is after the inversion rule; ``fg_fraction`` is its foreground fraction;
    ``dmi`` is the DMI of the chosen threshold (unchanged by inversion); ``dmis`` holds every
    candidate's DMI in the order of ``thresholds``.
    """

    mask: np.ndarray
    threshold: float
    index: int
    dmi: float
    inverted: bool
    thresholds: np.ndarray
    dmis: np.ndarray

    @property
    def fg_fraction(self) -> float:
        return float(np.count_nonzero(self.mask)) / max(1, self.mask.size)


def select_mask(prob: Any, n_thresholds: int, *, invert_large: bool = True,
                eps: float = _DEFAULT_EPS) -> Selection:
    """Threshold ``P`` at ``K`` evenly spaced levels and keep the mask with the lowest DMI.

    Ties go to the lowest threshold. Then the inversion rule of :func:`invert_if_large` applies.

    Parameters
    ----------
    prob : array_like
        Prediction ``P`` (foreground scores).
    n_thresholds : int >= 2
        ``K``.
    invert_large : bool
        Apply the inversion rule.
    eps : float
        DMI smoothing (see :func:`dmi_per_threshold`).

    Returns
    -------
    Selection

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[0.1, 0.15, 0.9], [0.12, 0.8, 0.85]])
    >>> sel = select_mask(p, 5)
    >>> sel.mask.astype(int).tolist(), sel.inverted
    ([[0, 0, 1], [0, 1, 1]], False)
    """
    p = _as_prob(prob)
    thresholds = candidate_thresholds(p, n_thresholds)
    dmis = dmi_per_threshold(p, thresholds, eps=eps)
    index = int(np.argmin(dmis))
    mask, inverted = invert_if_large(p > thresholds[index], enabled=invert_large)
    return Selection(mask, float(thresholds[index]), index, float(dmis[index]), inverted, thresholds, dmis)


# --------------------------------------------------------------------------- EMS module


def ems(mask: Any, *, radius: int, fraction: float, per_section: bool = True, rng: Any = None) -> np.ndarray:
    """Extraction of meta-structures: skeleton, random shift within ``radius``, random sampling.

    The skeleton of the mask (:func:`emseg.noise.skeleton`) keeps the topology of the objects;
    every skeleton voxel is then moved by an independent offset drawn from the integer points of
    the disc of ``radius`` (:func:`emseg.noise.shift`; voxels leaving the image are dropped), and exactly ``round(fraction * n_k)`` voxels of each class
    (shifted skeleton and background) are kept, the rest becoming ``-1``
    (:func:`emseg.noise.sample`), so that voxels the shift moved off the structure weigh less.

    Parameters
    ----------
    mask : array_like of bool or 0/1, 2D or 3D
        The chosen thresholded mask.
    radius : int >= 0
        Shift radius ``r``.
    fraction : float in (0, 1]
        Sampled fraction.
    per_section : bool
        For 3D input, skeletonise and shift each z-section in-plane (anisotropic stacks).
    rng : numpy.random.Generator or int, optional
        Random source.

    Returns
    -------
    numpy.ndarray of int8
        Pseudo-labels: 1 shifted skeleton, 0 background, -1 not sampled.

    Examples
    --------
    >>> import numpy as np
    >>> m = np.zeros((16, 16), bool); m[4:12, 6:10] = True
    >>> lab = ems(m, radius=1, fraction=0.5, rng=0)
    >>> sorted(np.unique(lab).tolist()), int((lab == 1).sum()) <= int(m.sum())
    ([-1, 0, 1], True)
    """
    m = np.asarray(mask)
    if m.ndim not in (2, 3):
        raise ValueError(f"mask must be 2D (y, x) or 3D (z, y, x), got shape {m.shape}")
    if m.dtype != bool:
        if m.size and not np.isin(m, (0, 1)).all():
            raise ValueError("mask must be binary (bool or 0/1)")
    frac = float(fraction)
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    gen = np.random.default_rng(rng)
    labels = m.astype(np.int8)
    labels = skeleton(labels, per_section=per_section)
    labels = shift(labels, int(radius), per_section=per_section, rng=gen)
    labels = sample(labels, frac, rng=gen, unsampled=-1)
    return labels.astype(np.int8, copy=False)


# --------------------------------------------------------------------------- baselines and scores


@dataclass(frozen=True)
class Baseline:
    """A thresholding baseline: ``mask`` (foreground, after the polarity rule) and ``score``
    (foreground score for the AUC: the signed distance of the intensity to the threshold,
    positive on the foreground side, i.e. ``mask == score > 0``)."""

    name: str
    mask: np.ndarray
    score: np.ndarray
    inverted: bool
    threshold: float | None = None

    @property
    def fg_fraction(self) -> float:
        return float(np.count_nonzero(self.mask)) / max(1, self.mask.size)


def threshold_baselines(raw: Any, *, block_size: int = 51, offset: float = 0.0,
                        invert_large: bool = True) -> dict[str, Baseline]:
    """Otsu and adaptive Gaussian thresholding with the minority-foreground polarity rule.

    * ``otsu``: ``t = skimage.filters.threshold_otsu(raw)`` over the whole image/stack;
      candidate mask ``raw > t``.
    * ``adaptive``: ``T = skimage.filters.threshold_local(section, block_size, method="gaussian",
      offset=offset)`` per z-section (2D, as the sections of ssTEM stacks are imaged apart);
      candidate mask ``raw > T``.

    In EM the structures are dark, so ``raw > t`` usually selects the cytoplasm. The polarity is
    chosen with the same rule as iGTT's inversion (:func:`invert_if_large`): when the candidate
    covers more than half of the image the complement (``raw <= t``) is the foreground.

    Parameters
    ----------
    raw : array_like, 2D or 3D
        Intensities (any real dtype; passed to scikit-image as they are).
    block_size : int
        Odd neighbourhood size of the adaptive threshold.
    offset : float
        Subtracted from the local weighted mean (``threshold_local``'s ``offset``).
    invert_large : bool
        Apply the polarity rule; ``False`` keeps ``raw > threshold``.

    Returns
    -------
    dict of str to Baseline
        Keys ``"otsu"`` and ``"adaptive"``.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.full((32, 32), 200, np.uint8); img[10:14, :] = 30   # a dark band
    >>> b = threshold_baselines(img, block_size=15)
    >>> int(b["otsu"].mask.sum()), b["otsu"].inverted
    (128, True)
    """
    from skimage.filters import threshold_local, threshold_otsu

    img = np.asarray(raw)
    if img.ndim not in (2, 3):
        raise ValueError(f"raw must be 2D (y, x) or 3D (z, y, x), got shape {img.shape}")
    if img.size == 0 or img.dtype.kind not in "fiu":
        raise ValueError("raw must be a non-empty real array")
    if block_size < 3 or block_size % 2 == 0:
        raise ValueError(f"block_size must be an odd integer >= 3, got {block_size}")
    out: dict[str, Baseline] = {}
    t = float(threshold_otsu(img))
    diff = img.astype(np.float64) - t
    mask, inverted = invert_if_large(diff > 0, enabled=invert_large)
    out["otsu"] = Baseline("otsu", mask, -diff if inverted else diff, inverted, t)

    sections = img[None] if img.ndim == 2 else img
    local = np.stack([threshold_local(s, block_size, method="gaussian", offset=offset) for s in sections])
    local = local.reshape(img.shape)
    diff = img.astype(np.float64) - local
    mask, inverted = invert_if_large(diff > 0, enabled=invert_large)
    out["adaptive"] = Baseline("adaptive", mask, -diff if inverted else diff, inverted, None)
    return out


def binary_metrics(score: Any, mask: Any, truth: Any) -> dict[str, float]:
    """Dice and accuracy of ``mask`` and ROC AUC of ``score`` against 0/1 ``truth`` (-1 ignored).

    Parameters
    ----------
    score : array_like
        Foreground scores (higher = foreground), for the AUC.
    mask : array_like of bool or 0/1
        Binary segmentation, for Dice and accuracy.
    truth : array_like of int
        Ground truth: 1 foreground, 0 background, -1 ignored.

    Returns
    -------
    dict
        ``dice``, ``auc``, ``accuracy`` (NaN when undefined, e.g. the AUC with one class only).

    Examples
    --------
    >>> m = binary_metrics([0.9, 0.2, 0.7, 0.1], [1, 0, 1, 0], [1, 0, 0, 0])
    >>> round(m["dice"], 3), m["auc"], m["accuracy"]
    (0.667, 1.0, 0.75)
    """
    mask = np.asarray(mask).astype(np.uint8)
    truth = np.asarray(truth)
    s = binary_scores(mask, truth)
    try:
        auc = roc_auc(np.asarray(score), truth)
    except ValueError:
        auc = float("nan")
    return {"dice": float(s.dice), "auc": float(auc), "accuracy": float(s.accuracy)}


# --------------------------------------------------------------------------- training task


class _IGTTTask:
    """Task for :func:`emseg.training.run_training`: a sigmoid U-Net on in-memory pseudo-labels."""

    name = "igtt"
    metric_columns: tuple[str, ...] = ()
    has_validation = False

    def __init__(self, volume: np.ndarray, labels: np.ndarray, config: IGTTConfig):
        self.config = config
        info = np.array([[1, 1], [0, 0]], dtype=np.uint8)  # both classes labelled, none absent
        cube = Cube(raw=volume, label=labels, info=info, prio=1.0, name="igtt")
        self.sampler = PatchSampler([cube], (1,) + tuple(config.patch_shape), squeeze=True)
        self.augmenter = Augmenter(flip=True, rotate90=True, brightness=0.1, contrast=0.1) \
            if config.augment else None

    def model_config(self) -> dict[str, Any]:
        return _model_config(self.config)

    def batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        data = self.sampler.batch(self.config.batch_size, rng, self.augmenter)
        return {"raw": torch.from_numpy(data["raw"]), "target": torch.from_numpy(data["target"])}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        probs = torch.sigmoid(model(batch["raw"]).float())
        target = batch["target"]
        loss = probs.new_zeros(())
        if self.config.dmi_weight:
            loss = loss + self.config.dmi_weight * dmi_loss(probs, target)
        if self.config.iou_weight:
            loss = loss + self.config.iou_weight * iou_loss(probs, target, per_sample=False)
        return loss

    def validate(self, model, device):  # pragma: no cover - no validation in iGTT
        return None


def _model_config(config: IGTTConfig) -> dict[str, Any]:
    return dict(ndim=2, in_channels=1, out_channels=1, depth=config.depth, base_width=config.base_width,
                norm="batch", dropout=0.0, anisotropic_levels=0)


def _train_config(config: IGTTConfig, raw_name: str, total_steps: int) -> TrainConfig:
    return TrainConfig(
        train=(CubeConfig(raw=raw_name),), n_classes=1, patch_shape=(1,) + tuple(config.patch_shape),
        batch_size=config.batch_size, steps=total_steps, valid_every=10**9,
        log_every=max(1, min(10, config.steps_per_epoch)), checkpoint_every=10**9, precision=config.precision,
        model=ModelConfig(ndim=2, depth=config.depth, base_width=config.base_width, norm="batch"),
        augment=AugmentConfig(flip=config.augment, rotate90=config.augment,
                              brightness=0.1 if config.augment else 0.0,
                              contrast=0.1 if config.augment else 0.0),
        optim=OptimConfig(lr=config.lr),
    )


def _predict(model: torch.nn.Module, volume: np.ndarray, window: int, device: torch.device,
             precision: str = "fp32") -> np.ndarray:
    """Foreground probabilities of a (z, y, x) in-memory volume with a 2D network."""
    model.eval()
    patch = (1, min(window, volume.shape[1]), min(window, volume.shape[2]))
    prec = resolve_precision(precision, device, ndim=model.ndim)
    net = prec.prepare_model(fold_batchnorm(model))
    predictor = SlidingWindow(softmax_forward(net), patch, divisor=model.divisor, overlap=0.25,
                              batch_size=4, device=device, precision=prec)
    out = np.empty(volume.shape, dtype=np.float32)
    blocks = plan_blocks(volume.shape, default_block_shape(volume.shape, patch, (1, 1, 1)),
                         (0, patch[1] // 2, patch[2] // 2))
    for block in blocks:
        out[block.inner] = predict_block(predictor, volume, block, raw_dtype=volume.dtype)[0]
    return out


# --------------------------------------------------------------------------- the pipeline


@dataclass
class IGTTResult:
    """What :func:`igtt` did.

    ``rows`` holds one dict per completed epoch (the ``metrics.csv`` columns), earlier calls'
    epochs included; ``epochs_run`` the epochs computed in this call. ``scores`` are the final
    Dice/AUC/accuracy of iGTT and ``baselines`` those of the thresholding baselines (name ->
    dict), both only with ground truth (``baselines`` always holds the foreground fractions).
    """

    out_dir: Path
    epochs: int
    start_epoch: int
    final_epoch: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    epochs_run: list[int] = field(default_factory=list)
    threshold: float | None = None
    inverted: bool | None = None
    fg_fraction: float | None = None
    scores: dict[str, float] | None = None
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return self.final_epoch >= self.epochs

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir), "epochs": self.epochs, "start_epoch": self.start_epoch,
            "final_epoch": self.final_epoch, "epochs_run": list(self.epochs_run), "complete": self.complete,
            "threshold": self.threshold, "inverted": self.inverted, "fg_fraction": self.fg_fraction,
            "scores": self.scores, "baselines": self.baselines, "rows": self.rows, "outputs": self.outputs,
            "interrupted": self.interrupted, "seconds": round(self.seconds, 3),
        }


def _load_array(data: Any, name: str) -> tuple[np.ndarray, str]:
    """An in-memory copy of a spec (``f.h5:ds`` / ``f.zarr/arr``) or array, and a display name."""
    if isinstance(data, (str, os.PathLike)):
        with open_volume(str(data)) as vol:
            if name == "raw":
                check_raw(vol)
            return np.asarray(vol[...]), str(vol.spec)
    arr = np.array(data, copy=True)
    return arr, f"<{name} array>"


def _binary_truth(label: np.ndarray, foreground: Sequence[int] | None) -> np.ndarray:
    lab = label.astype(np.int64, copy=False)
    fg = (lab > 0) if foreground is None else np.isin(lab, np.asarray(list(foreground), dtype=np.int64))
    return np.where(lab < 0, -1, fg.astype(np.int64)).astype(np.int8)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in METRIC_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def _csv_value(v: Any) -> Any:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return f"{v:.6g}"
    return v




def _resume_key(config: IGTTConfig) -> dict[str, Any]:
    """The options that must not change on --resume (epochs may grow; outputs are free)."""
    d = config.to_dict()
    for k in ("epochs", "save_pseudo_labels", "baselines", "adaptive_block_size", "adaptive_offset",
              "predict_window"):
        d.pop(k)
    return d


def _ems_rng(seed: int, epoch: int) -> np.random.Generator:
    # one reproducible stream per epoch, independent of where a run was resumed
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(epoch), 7)))


def run_igtt(
    raw: Any,
    config: IGTTConfig | None,
    out_dir: str | Path,
    *,
    label: Any = None,
    foreground: Sequence[int] | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
    stop_after: int | None = None,
) -> IGTTResult:
    """Unsupervised binary segmentation of ``raw`` by iterative ground-truth training (iGTT).

    Parameters
    ----------
    raw : str or array_like
        The image: a volume spec (``"f.h5:raw"``, ``"f.zarr/raw"``) or an array, 2D ``(y, x)`` or
        3D ``(z, y, x)`` (a 2D network runs on each section). Read into memory.
    config : IGTTConfig or None
        Options (``None``: the defaults).
    out_dir : str or Path
        Output folder (created): ``model.pt``, ``metrics.csv``, ``prediction.zarr``,
        ``segmentation.zarr``, ``report.json``, ``igtt_state.pt``, ``train/`` and, with
        ``save_pseudo_labels``, ``pseudo_labels.h5``.
    label : str or array_like, optional
        Ground truth of the same shape, only to score iGTT and the baselines (never used to train).
    foreground : sequence of int, optional
        Label values counted as foreground in ``label`` (default: every value > 0); -1 is ignored.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    seed : int
        Seeds the network initialisation, patch sampling and the EMS randomness.
    progress : callable, optional
        Called with a dict: ``{"phase": "train", "epoch", "epochs", "step", "total", "loss"}`` per
        training step and ``{"phase": "epoch", "epoch", "epochs", "row"}`` per completed epoch.
    resume : bool
        Continue the run in ``out_dir`` after its last completed epoch (the same options are
        required except ``epochs``, which may grow).
    stop_after : int, optional
        Stop this call after that many epochs (the run can be resumed).

    Returns
    -------
    IGTTResult

    Raises
    ------
    ValueError
        (:class:`emseg.errors.InputError`) on bad input, a run already in ``out_dir`` without
        ``resume``, or a resume with other options.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.random.default_rng(0).integers(0, 60, (64, 64)).astype(np.uint8)
    >>> img[20:30, 20:30] = 220
    >>> res = run_igtt(img, IGTTConfig(epochs=2, steps_per_epoch=5, patch_shape=(32, 32), depth=2,
    ...                            base_width=4), "runs/igtt")  # doctest: +SKIP
    >>> res.final_epoch  # doctest: +SKIP
    2
    """
    t_start = time.perf_counter()
    cfg = config if config is not None else IGTTConfig()
    if not isinstance(cfg, IGTTConfig):
        raise InputError(f"config must be an IGTTConfig, got {type(cfg).__name__}")
    if stop_after is not None and stop_after < 0:
        raise InputError(f"stop_after must be >= 0, got {stop_after}")
    out = Path(out_dir)
    volume, raw_name = _load_array(raw, "raw")
    if volume.ndim not in (2, 3) or volume.size == 0 or volume.dtype.kind not in "fiu":
        raise InputError(f"raw must be a non-empty 2D (y, x) or 3D (z, y, x) real image, got shape "
                         f"{volume.shape} dtype {volume.dtype}", source=raw_name)
    image_shape = volume.shape
    vol3 = volume[None] if volume.ndim == 2 else volume
    if any(p > s for p, s in zip(cfg.patch_shape, vol3.shape[1:])):
        raise InputError(f"patch {cfg.patch_shape} is larger than the image sections {vol3.shape[1:]}",
                         source=raw_name)
    truth = None
    if label is not None:
        lab, label_name = _load_array(label, "label")
        if lab.shape != image_shape:
            raise InputError(f"label shape {lab.shape} differs from raw shape {image_shape}", source=label_name)
        if lab.dtype.kind not in "iub":
            raise InputError(f"label must hold integers, got dtype {lab.dtype}", source=label_name)
        truth = _binary_truth(lab, foreground).reshape(vol3.shape)
    dev = resolve_device(device)

    out.mkdir(parents=True, exist_ok=True)
    state_path, train_dir = out / _STATE, out / _TRAIN_DIR
    rows: list[dict[str, Any]] = []
    start_epoch = 0
    labels = np.zeros(vol3.shape, dtype=np.int8)  # Y* = 0: all background
    train_state: dict[str, Any] | None = None
    if resume:
        if not state_path.exists():
            raise InputError(f"nothing to resume: no {_STATE}", source=str(out))
        saved = load_checkpoint(state_path)
        meta = saved.get("igtt") or {}
        if meta.get("resume_key") != _resume_key(cfg):
            raise InputError("the run was made with other options (only --epochs may change on --resume)",
                             source=str(state_path))
        if meta.get("seed") != int(seed) or tuple(meta.get("shape", ())) != tuple(vol3.shape):
            raise InputError("the run was made with another --seed or another image", source=str(state_path))
        start_epoch = int(meta["epoch"])
        rows = [dict(r) for r in meta["rows"]]
        labels = meta["labels"].numpy().astype(np.int8)
        train_state = {k: v for k, v in saved.items() if k != "igtt"}
    elif state_path.exists():
        raise InputError(f"already holds an iGTT run ({_STATE}): pass --resume to continue it or choose "
                         "another --out", source=str(out))
    elif train_dir.exists():
        shutil.rmtree(train_dir)  # leftovers of a first epoch that never completed

    result = IGTTResult(out, cfg.epochs, start_epoch, start_epoch, rows=rows)

    # baselines (cheap, recomputed on resume)
    if cfg.baselines:
        for name, b in threshold_baselines(vol3, block_size=cfg.adaptive_block_size, offset=cfg.adaptive_offset,
                                           invert_large=cfg.invert_large).items():
            entry: dict[str, Any] = {"fg_fraction": b.fg_fraction, "inverted": b.inverted,
                                     "threshold": b.threshold}
            if truth is not None:
                entry.update(binary_metrics(b.score, b.mask, truth))
            result.baselines[name] = entry

    from emseg.training import run_training  # noqa: PLC0415 - imported here: training may use emseg.noise

    last_prob: np.ndarray | None = None
    last_sel: Selection | None = None
    epoch = start_epoch
    model = None
    while epoch < cfg.epochs:
        if stop_after is not None and epoch - start_epoch >= stop_after:
            break
        t_epoch = time.perf_counter()
        n = epoch + 1
        # the training checkpoint of the last completed epoch is the truth (not a half-done epoch)
        if train_state is not None:
            train_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(train_dir / "last.pt", train_state)
        elif (train_dir / "last.pt").exists():
            shutil.rmtree(train_dir)
        task = _IGTTTask(vol3, labels, cfg)
        tcfg = _train_config(cfg, raw_name, n * cfg.steps_per_epoch)

        def on_step(info: dict[str, Any], _n: int = n) -> None:
            if progress is not None:
                progress({"phase": "train", "epoch": _n, "epochs": cfg.epochs, "step": info["step"],
                          "total": cfg.epochs * cfg.steps_per_epoch, "loss": info["loss"]})

        tres = run_training(task, tcfg, train_dir, device=str(dev), seed=int(seed),
                            resume=train_state is not None, progress=on_step)
        (train_dir / "best.pt").unlink(missing_ok=True)  # no validation: last.pt is the model
        if tres.interrupted:
            result.interrupted = True
            break
        model, train_state = load_model(train_dir / "last.pt", dev)

        prob = _predict(model, vol3, cfg.predict_window, dev, cfg.precision)
        sel = select_mask(prob, cfg.n_thresholds, invert_large=cfg.invert_large)
        if cfg.ems:
            labels = ems(sel.mask, radius=cfg.shift_radius, fraction=cfg.sample_fraction, per_section=True,
                         rng=_ems_rng(seed, n))
        else:
            labels = sel.mask.astype(np.int8)
        kept = labels >= 0
        row: dict[str, Any] = {
            "epoch": n, "threshold": sel.threshold, "dmi": sel.dmi, "fg_fraction": sel.fg_fraction,
            "inverted": bool(sel.inverted),
            "train_loss": float(np.mean(tres.losses)) if tres.losses else None,
            "label_fg_fraction": float(np.count_nonzero(labels == 1)) / max(1, int(np.count_nonzero(kept))),
            "label_fraction": float(np.count_nonzero(kept)) / labels.size,
            "dice": None, "auc": None, "accuracy": None,
        }
        if truth is not None:
            row.update(binary_metrics(1.0 - prob if sel.inverted else prob, sel.mask, truth))
        row["seconds"] = time.perf_counter() - t_epoch
        rows.append(row)

        if cfg.save_pseudo_labels:
            spec = f"{out / 'pseudo_labels.h5'}:epoch_{n:02d}"
            with create_volume(spec, image_shape, "int8", attrs={"epoch": n, "ems": cfg.ems}) as dest:
                dest[...] = labels.reshape(image_shape)
        # model.pt: loadable by `emseg predict` (model, model_config, config.patch_shape)
        save_checkpoint(out / "model.pt", {
            "model": train_state["model"], "model_config": train_state["model_config"],
            "config": train_state["config"], "task": "igtt", "step": train_state["step"],
            "igtt": {"epoch": n, "threshold": sel.threshold, "inverted": bool(sel.inverted),
                     "config": cfg.to_dict()},
        })
        _write_csv(out / "metrics.csv", rows)
        # the epoch is complete once this state is on disk (written atomically, last)
        save_checkpoint(state_path, dict(train_state, igtt={
            "epoch": n, "rows": rows, "labels": torch.from_numpy(labels), "seed": int(seed),
            "shape": list(vol3.shape), "resume_key": _resume_key(cfg), "config": cfg.to_dict(),
        }))
        epoch = n
        result.final_epoch = n
        result.epochs_run.append(n)
        last_prob, last_sel = prob, sel
        if progress is not None:
            progress({"phase": "epoch", "epoch": n, "epochs": cfg.epochs, "row": dict(row)})

    if result.final_epoch >= cfg.epochs and not result.interrupted:
        if last_prob is None:  # resumed a finished run: predict again with the saved model
            model, _ = load_model(out / "model.pt", dev)
            last_prob = _predict(model, vol3, cfg.predict_window, dev, cfg.precision)
            last_sel = select_mask(last_prob, cfg.n_thresholds, invert_large=cfg.invert_large)
        assert last_sel is not None
        fg_prob = (1.0 - last_prob) if last_sel.inverted else last_prob
        attrs = {"threshold": last_sel.threshold, "inverted": bool(last_sel.inverted), "epoch": result.final_epoch,
                 "source": raw_name, "note": "foreground probability (1 - network output when inverted)"}
        with create_volume(str(out / "prediction.zarr"), (1,) + tuple(image_shape), "float32",
                           attrs=attrs) as dest:
            dest[...] = fg_prob.reshape((1,) + tuple(image_shape))
        with create_volume(str(out / "segmentation.zarr"), image_shape, "uint8", attrs=attrs) as dest:
            dest[...] = last_sel.mask.reshape(image_shape).astype(np.uint8)
        result.threshold, result.inverted = last_sel.threshold, bool(last_sel.inverted)
        result.fg_fraction = last_sel.fg_fraction
        if truth is not None:
            result.scores = binary_metrics(fg_prob, last_sel.mask, truth)
        result.outputs = {name: str(out / name) for name in
                          ("model.pt", "metrics.csv", "prediction.zarr", "segmentation.zarr", "report.json")}
        if cfg.save_pseudo_labels:
            result.outputs["pseudo_labels.h5"] = str(out / "pseudo_labels.h5")
    result.seconds = time.perf_counter() - t_start
    if result.complete:
        atomic_write_json(out / "report.json", result.to_dict())
    return result
