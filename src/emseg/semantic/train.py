"""``emseg train``: the segmentation task of the shared training loop, with lazy labels.

:class:`SegmentationTask` supplies :func:`~emseg.engine.training.run_training` with patches of the
``[[train]]`` cubes, the lazy-label loss (NLL, optionally with soft Dice, class weights) and the
validation Jaccard of the ``[[valid]]`` cubes (:func:`evaluate_cubes`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from emseg.data import Cube, PatchSampler, close_cubes, open_cubes
from emseg.engine.config import TrainConfig
from emseg.engine.inference import WindowOptions, make_predictor, predict_array
from emseg.engine.training import TrainResult, fit
from emseg.errors import InputError
from emseg.losses import lazy_nll, lazy_soft_dice
from emseg.metrics import ConfusionAccumulator
from emseg.runtime.precision import DEFAULT_PRECISION, Precision


class SegmentationTask:
    """Multi-class U-Net trained with the lazy-label NLL (``emseg train``).

    The cubes are opened from ``config.train``/``config.valid`` unless given (e.g. in-memory
    :class:`~emseg.data.Cube` objects holding numpy arrays).
    """

    name = "segmentation"

    def __init__(self, config: TrainConfig, *, cubes: Sequence[Cube] | None = None,
                 valid_cubes: Sequence[Cube] | None = None):
        self.config = config
        self.ndim = config.model_ndim
        squeeze = self.ndim == 2 and len(config.patch_shape) == 3
        self.cubes = list(cubes) if cubes is not None else open_cubes(
            config.train, config.n_classes, config.patch_shape)
        self.valid_cubes = list(valid_cubes) if valid_cubes is not None else open_cubes(
            config.valid, config.n_classes, config.patch_shape)
        for cube in self.valid_cubes:
            if cube.label is None:
                raise InputError("validation cubes need labels", source=cube.name)
        self.sampler = PatchSampler(self.cubes, config.patch_shape, squeeze=squeeze,
                                    example_ignore_threshold=config.example_ignore_threshold)
        self.augmenter = config.augment
        weights = auto_class_weights(self.cubes, config.n_classes) if config.class_weights == "auto" \
            else config.class_weights
        self.class_weights = torch.tensor(weights, dtype=torch.float32) if weights else None
        k = config.n_classes
        self.metric_columns = ("valid_score",) + tuple(f"valid_jaccard_{c}" for c in range(k))

    def model_config(self) -> dict[str, Any]:
        m = self.config.model
        return dict(ndim=self.ndim, in_channels=1, out_channels=self.config.n_classes, depth=m.depth,
                    base_width=m.base_width, norm=m.norm, dropout=m.dropout,
                    anisotropic_levels=m.anisotropic_levels)

    def batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        data = self.sampler.batch(self.config.batch_size, rng, self.augmenter)
        return {k: torch.from_numpy(v) for k, v in data.items() if k != "cube"}

    def loss(self, model, batch):
        logits = model(batch["raw"])
        weights = self.class_weights.to(logits.device) if self.class_weights is not None else None
        logits = logits.float()
        loss = lazy_nll(logits, batch["target"], batch["labeled"], batch["not_present"], weights)
        if self.config.dice_weight:
            loss = loss + self.config.dice_weight * lazy_soft_dice(logits, batch["target"], batch["labeled"],
                                                                   batch["not_present"])
        return loss

    def validate(self, model, device, precision: str | Precision = DEFAULT_PRECISION):
        if not self.valid_cubes:
            return None
        return evaluate_cubes(model, self.valid_cubes, self.config.patch_shape, self.config.n_classes, device,
                              precision=precision)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def check_resume(self, state: Mapping[str, Any], source: str) -> None:
        pass  # last.pt's network must match the config's, which the training loop checks

    def close(self) -> None:
        close_cubes(self.cubes + self.valid_cubes)


def auto_class_weights(cubes: Sequence[Cube], n_classes: int, *, max_ratio: float = 25.0) -> tuple[float, ...]:
    """Class weights from the training labels' class frequencies (``class_weights = "auto"``).

    ``f_k`` is the fraction of class ``k`` among the labelled voxels of the cubes that annotate it
    (``mask_class_labeled``); the weight is :math:`w_k \\propto f_k^{-1/2}` (inverse square root: rare
    classes count more without the false positives of full inverse-frequency weighting), capped at
    ``max_ratio`` times the smallest weight and scaled so that an average labelled voxel has weight 1.
    Classes with no labelled voxel get the largest weight.
    """
    counts = np.zeros(n_classes, dtype=np.float64)
    for cube in cubes:
        if cube.counts is None:
            if cube.label is None:
                continue
            block = np.asarray(cube.label[...]).astype(np.int64).ravel()
            cube.counts = np.bincount(block[block >= 0], minlength=n_classes)[:n_classes]
        counts += np.asarray(cube.counts, dtype=np.float64) * (np.asarray(cube.info[0]) > 0)
    if counts.sum() <= 0:
        return (1.0,) * n_classes
    freq = counts / counts.sum()
    seen = freq > 0
    w = np.ones(n_classes)
    w[seen] = freq[seen] ** -0.5
    w = np.minimum(w, w[seen].min() * max_ratio)
    w[~seen] = w[seen].max()
    w /= float((freq * w).sum())
    return tuple(float(v) for v in w)


def evaluate_cubes(model, cubes, patch_shape, n_classes, device, *,
                   precision: str | Precision = DEFAULT_PRECISION,
                   on_block: Callable[[int, Any, np.ndarray], None] | None = None) -> dict[str, float]:
    """Sliding-window prediction of labelled cubes; Jaccard per class and ``valid_score``.

    ``valid_score`` is the mean Jaccard over the foreground classes 1..K-1 (over all classes when
    K = 1), ignoring classes absent from both prediction and labels. ``on_block(i, block,
    labels)``, when given, sees the predicted labels (argmax) of each block of cube ``i``
    (``block.inner`` the region they cover).
    """
    predictor = make_predictor(model, patch_shape, WindowOptions(precision=precision), device)
    acc = ConfusionAccumulator(n_classes)
    for i, cube in enumerate(cubes):
        for block, probs in predict_array(predictor, cube.raw, patch_shape, raw_dtype=cube.raw_dtype):
            labels = np.argmax(probs, axis=0)
            if on_block is not None:
                on_block(i, block, labels)
            acc.update(labels, np.asarray(cube.label[block.inner]).astype(np.int64))
    scores = acc.scores()
    jac = np.asarray(scores.jaccard, dtype=float)
    fg = jac[1:] if n_classes > 1 else jac
    score = float(np.nanmean(fg)) if np.isfinite(fg).any() else float("nan")
    out = {"valid_score": score}
    out.update({f"valid_jaccard_{c}": float(j) for c, j in enumerate(jac)})
    return out


def train(config: TrainConfig, out_dir: str | Path, **options: Any) -> TrainResult:
    """Train a segmentation U-Net with lazy labels (the core of ``emseg train``).

    ``options`` are those of :func:`~emseg.engine.training.run_training`: ``runtime``
    (:class:`~emseg.runtime.Runtime`), ``resume``, ``progress`` and ``stop_after``.

    Examples
    --------
    >>> from emseg.engine.config import load_config
    >>> result = train(load_config("train.toml"), "runs/mito", resume=True)  # doctest: +SKIP
    """
    return fit(SegmentationTask(config), config, out_dir, **options)
