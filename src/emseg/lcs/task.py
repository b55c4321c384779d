"""Training of label-conditioned models (and of the multi-channel baseline) with the shared loop.

:class:`LCSTask` plugs into :func:`emseg.engine.training.run_training`. Each patch of a batch gets one
class (among the classes annotated in its cube): with probability ``negative_prob`` one absent
from the patch (an explicit negative: the target is empty), otherwise one present in it; with
probability ``merge_prob`` a second class is merged into it. The target is the binary mask of
that class set in the patch and the condition the (atlas image, atlas mask of the same set) pair;
with probability ``split_prob`` both masks are restricted to the same part of the set (its thick
or its thin part, :mod:`emseg.lcs.split`). The loss (soft Dice with an empty-target term, plus BCE; :mod:`emseg.lcs.loss`) is computed on
that one conditioned channel only, in float32, and has a gradient on every patch, including those
without the class. The ``[lcs]`` settings are :class:`~emseg.lcs.config.LCSConfig`.

With ``baseline`` the same backbone gets K+1 output channels (background + the classes, in the
order of ``classes``), no conditioning, and the lazy-label NLL (plus optional soft Dice).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from emseg.engine.blocks import Block
from emseg.engine.config import TrainConfig
from emseg.data import PatchSampler, close_cubes, open_cubes
from emseg.errors import InputError
from emseg.engine.inference import predict_array
from emseg.lcs.atlas import Atlas, load_atlas
from emseg.lcs.config import LCSConfig, check_lcs_config
from emseg.lcs.loss import conditioned_loss
from emseg.lcs.merge import DiceAccumulator
from emseg.lcs.infer import LabelPredictor
from emseg.lcs.split import atlas_part, draw_split, split_target
from emseg.losses import lazy_nll, soft_dice_loss
from emseg.engine.training import TrainResult, fit
from emseg.runtime.precision import DEFAULT_PRECISION, Precision


# --------------------------------------------------------------------------- sampling


def draw_class_set(classes: Sequence[int], rng: np.random.Generator, merge_prob: float, *,
                   present: Sequence[int] | None = None, negative_prob: float = 0.0) -> tuple[int, ...]:
    """A class from ``classes``; with probability ``merge_prob`` a second, different one merged in.

    Without ``present`` the first class is drawn uniformly. With ``present`` (the classes that
    occur in the patch) it is drawn uniformly among the ``classes`` absent from the patch with
    probability ``negative_prob``, else among those present; when one of the two groups is empty
    the other is used. The second class is drawn uniformly from the other ``classes``.

    Examples
    --------
    >>> draw_class_set([1, 2, 3], np.random.default_rng(0), 0.0) in [(1,), (2,), (3,)]
    True
    >>> draw_class_set([1, 2, 3], np.random.default_rng(0), 0.0, present=[2], negative_prob=0.0)
    (2,)
    """
    if not len(classes):
        return ()
    pool = list(classes)
    if present is not None:
        here = set(int(c) for c in present)
        pos = [c for c in classes if int(c) in here]
        neg = [c for c in classes if int(c) not in here]
        negative = rng.random() < negative_prob
        pool = (neg if negative else pos) or pos or neg
    first = int(pool[int(rng.integers(len(pool)))])
    merge = rng.random() < merge_prob
    if merge and len(classes) > 1:
        others = [int(c) for c in classes if c != first]
        return (first, others[int(rng.integers(len(others)))])
    return (first,)


def binary_target(label: np.ndarray, class_set: Sequence[int], *, known_absent: bool = False) -> np.ndarray:
    """int64 target: 1 where ``label`` is in ``class_set``, 0 elsewhere, -1 where ``label`` is -1.

    With ``known_absent`` (every class of the set is flagged not present in the cube) ignored voxels
    become 0; an empty ``class_set`` (no annotated class to learn) gives all -1.

    Examples
    --------
    >>> binary_target(np.array([0, 1, 2, -1]), (1, 2)).tolist()
    [0, 1, 1, -1]
    """
    label = np.asarray(label)
    if not len(class_set):
        return np.full(label.shape, -1, dtype=np.int64)
    target = np.isin(label, np.asarray(class_set, dtype=np.int64)).astype(np.int64)
    if not known_absent:
        target[label < 0] = -1
    return target


def channel_lut(classes: Sequence[int], n_classes: int) -> np.ndarray:
    """Lookup ``lut[label + 1]`` -> baseline channel: -1 stays -1, ``classes[j]`` -> j + 1, others -> 0."""
    lut = np.zeros(n_classes + 1, dtype=np.int64)
    lut[0] = -1
    for j, c in enumerate(classes):
        lut[c + 1] = j + 1
    return lut


# --------------------------------------------------------------------------- the task


class LCSTask:
    """A label-conditioned U-Net (or the multi-channel baseline) for :func:`run_training`.

    Parameters
    ----------
    config : TrainConfig
    lcs : LCSConfig
    atlas : Atlas, optional
        Use this atlas instead of loading the one named in ``lcs`` (tests, benchmarks).
    """

    def __init__(self, config: TrainConfig, lcs: LCSConfig, *, atlas: Atlas | None = None):
        self.config = config
        self.lcs = lcs
        self.baseline = lcs.baseline
        self.name = "lcs_baseline" if lcs.baseline else "lcs"
        self.classes = tuple(int(c) for c in lcs.classes)
        self.ndim = config.model_ndim
        self.squeeze = self.ndim == 2 and len(config.patch_shape) == 3
        check_lcs_config(lcs, config.n_classes)
        self.cubes = open_cubes(config.train, config.n_classes, config.patch_shape)
        self.valid_cubes = open_cubes(config.valid, config.n_classes, config.patch_shape)
        for cube in self.valid_cubes:
            if cube.label is None:
                raise InputError("validation cubes need labels", source=cube.name)
        self.sampler = PatchSampler(self.cubes, config.patch_shape, squeeze=self.squeeze,
                                    example_ignore_threshold=config.example_ignore_threshold)
        self.augmenter = config.augment
        if self.baseline:
            self.atlas = None
        elif atlas is not None:
            missing = [c for c in self.classes if c not in atlas.present]
            if missing:
                raise InputError(f"class(es) {missing} do not occur in the atlas patch")
            self.atlas = atlas
        else:
            self.atlas = load_atlas(lcs.atlas_raw, lcs.atlas_label, config.patch_shape, offset=lcs.atlas_offset,
                                    classes=self.classes, squeeze=self.squeeze)
        if self.atlas is not None and self.atlas.patch_shape != tuple(config.patch_shape):
            raise InputError(f"atlas patch {self.atlas.patch_shape} differs from patch_shape "
                             f"{tuple(config.patch_shape)}")
        self.lut = channel_lut(self.classes, config.n_classes)
        self._atlas_parts: dict[tuple, np.ndarray | None] = {}  # (class set, radius, thick) -> atlas part
        self.metric_columns = ("valid_score",) + tuple(f"valid_dice_{c}" for c in self.classes)

    # -- what run_training asks for
    def model_config(self) -> dict[str, Any]:
        m = self.config.model
        return dict(ndim=self.ndim, in_channels=1, out_channels=len(self.classes) + 1 if self.baseline else 1,
                    depth=m.depth, base_width=m.base_width, norm=m.norm, dropout=m.dropout,
                    anisotropic_levels=m.anisotropic_levels,
                    **({"cond_channels": 0} if self.baseline
                       else {"cond_channels": 2, "conditioning": self.lcs.conditioning}))

    def batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        data = self.sampler.batch(self.config.batch_size, rng, self.augmenter)
        if self.baseline:
            return self._baseline_batch(data)
        out = self.conditioned_batch(data, rng)
        return {k: torch.from_numpy(out[k]) for k in ("raw", "target", "cond", "group")}

    def conditioned_batch(self, data: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Turn a sampler batch into (raw, binary target, condition) with one class set per patch.

        With probability ``split_prob`` a class set is restricted to one part (thick or thin at a
        random radius, :mod:`emseg.lcs.split`) in target and atlas mask; ``split`` holds
        (radius, thick) per patch, (0, 0) when not split.
        """
        targets, sets, parts, splits = [], [], [], []
        for b in range(data["raw"].shape[0]):
            allowed = [c for c in self.classes if data["labeled"][b, c] > 0]
            present = np.unique(data["target"][b])
            chosen = draw_class_set(allowed, rng, self.lcs.merge_prob, present=present,
                                    negative_prob=self.lcs.negative_prob)
            absent = bool(chosen) and all(data["not_present"][b, c] > 0 for c in chosen)
            target = binary_target(data["target"][b], chosen, known_absent=absent)
            part, split = None, (0, 0)
            if chosen and self.lcs.split_prob and rng.random() < self.lcs.split_prob:
                radius, thick = draw_split(rng)
                key = (tuple(sorted(chosen)), radius, thick)
                if key not in self._atlas_parts:  # the atlas is fixed: each part is computed once
                    self._atlas_parts[key] = atlas_part(self.atlas.mask(chosen), radius, thick)
                part = self._atlas_parts[key]
                if part is not None:
                    target = split_target(data["target"][b], chosen, target, radius, thick)
                    split = (radius, int(thick))
            targets.append(target)
            sets.append(chosen)
            parts.append(part)
            splits.append(split)
        cond = self.atlas.condition(sets)
        for b, part in enumerate(parts):
            if part is not None:
                cond[b, 1] = part
        keys = [(tuple(sorted(s)), sp) for s, sp in zip(sets, splits)]
        return {"raw": data["raw"], "target": np.stack(targets), "cond": cond,
                "group": np.array([keys.index(k) for k in keys], dtype=np.int64),
                "classes": np.array([[s[0], s[1] if len(s) > 1 else 0] if s else [0, 0] for s in sets]),
                "split": np.array(splits, dtype=np.int64).reshape(len(sets), 2)}

    def _baseline_batch(self, data: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        target = self.lut[data["target"] + 1]
        k = len(self.classes)
        labeled = np.zeros((target.shape[0], k + 1), dtype=np.float32)
        absent = np.zeros_like(labeled)
        rest = [c for c in range(self.config.n_classes) if c not in self.classes]
        labeled[:, 0] = np.all(data["labeled"][:, rest] > 0, axis=1)
        absent[:, 0] = np.all(data["not_present"][:, rest] > 0, axis=1)
        for j, c in enumerate(self.classes):
            labeled[:, j + 1] = data["labeled"][:, c]
            absent[:, j + 1] = data["not_present"][:, c]
        return {"raw": torch.from_numpy(data["raw"]), "target": torch.from_numpy(target),
                "labeled": torch.from_numpy(labeled), "not_present": torch.from_numpy(absent)}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.baseline:
            logits = model(batch["raw"]).float()
            loss = self.lcs.bce_weight * lazy_nll(logits, batch["target"], batch["labeled"], batch["not_present"])
            if self.lcs.baseline_dice_weight:
                probs = torch.softmax(logits, dim=1)
                dice = [soft_dice_loss(probs[:, j], _channel_target(batch["target"], j),
                                       per_sample=self.lcs.dice == "sample")  # "class" pools like "batch"
                        for j in range(1, probs.shape[1])]
                loss = loss + self.lcs.baseline_dice_weight * torch.stack(dice).mean()
            return loss
        logits = model(batch["raw"], batch["cond"]).float()
        return conditioned_loss(logits, batch["target"], bce_weight=self.lcs.bce_weight, dice=self.lcs.dice,
                                groups=batch.get("group"))

    def validate(self, model: torch.nn.Module, device: torch.device,
                 precision: str | Precision = DEFAULT_PRECISION) -> dict[str, float] | None:
        if not self.valid_cubes:
            return None
        return evaluate_lcs(model, self.valid_cubes, self.config.patch_shape, self.classes, device,
                            atlas=self.atlas, merge=self.lcs.merge, precision=precision)

    def extra_state(self) -> dict[str, Any]:
        """Checkpoint entries beyond the network: the ``[lcs]`` settings and the atlas."""
        state: dict[str, Any] = {"lcs": dict(self.lcs.to_dict(), classes=list(self.classes),
                                             patch_shape=[int(p) for p in self.config.patch_shape],
                                             n_classes=int(self.config.n_classes))}
        if self.atlas is not None:
            state.update(self.atlas.to_state())
        return state

    def check_resume(self, state: Mapping[str, Any], source: str) -> None:
        """A resumed run must hold the same classes, conditioning and atlas."""
        old = state.get("lcs")
        new = self.extra_state()
        if old is None or state.get("task") != self.name:
            raise InputError(f"last.pt was not written by this kind of training ({self.name})", source=source)
        if self.atlas is not None and old.get("conditioning", "maxpool") != self.lcs.conditioning:
            raise InputError(f"last.pt uses {old.get('conditioning', 'maxpool')} conditioning, the config asks for "
                             f"{self.lcs.conditioning}", source=source)
        if list(old["classes"]) != list(self.classes):
            raise InputError(f"last.pt was trained on classes {old['classes']}, config has {list(self.classes)}",
                             source=source)
        if self.atlas is not None:
            meta = state.get("atlas") or {}
            if (meta.get("image_sha256"), meta.get("label_sha256")) != (
                    new["atlas"]["image_sha256"], new["atlas"]["label_sha256"]):
                raise InputError("last.pt was trained with another atlas", source=source)

    def close(self) -> None:
        close_cubes(self.cubes + self.valid_cubes)


def _channel_target(target: torch.Tensor, channel: int) -> torch.Tensor:
    out = (target == channel).long()
    return torch.where(target < 0, torch.full_like(out, -1), out)


def evaluate_lcs(model, cubes, patch_shape, classes, device, *, atlas: Atlas | None = None,
                 overlap: float = 0.25, merge: str = "calibrated",
                 precision: str | Precision = DEFAULT_PRECISION) -> dict[str, float]:
    """Per-class Dice of the merged label map on labelled cubes (sliding window, all classes at once;
    ``merge`` as in :class:`LabelPredictor`, calibrated once per call).

    ``valid_score`` is the mean Dice over the classes (NaN ones skipped).
    """
    model.eval()
    predictor = LabelPredictor(model, classes, patch_shape, atlas=atlas, classes=classes, overlap=overlap,
                               device=device, merge=merge, precision=precision)
    acc = DiceAccumulator(classes)

    def merged_labels(raw: np.ndarray, block: Block) -> np.ndarray:
        return predictor.predict(raw, crop=block.inner_in_outer)

    for cube in cubes:
        for block, merged in predict_array(merged_labels, cube.raw, patch_shape, raw_dtype=cube.raw_dtype):
            acc.update(merged, np.asarray(cube.label[block.inner]))
    dice = acc.dice()
    finite = [d for d in dice.values() if math.isfinite(d)]
    out = {"valid_score": float(np.mean(finite)) if finite else float("nan")}
    out.update({f"valid_dice_{c}": d for c, d in dice.items()})
    return out


def train_lcs(config: TrainConfig, lcs: LCSConfig, out_dir: str | Path, *, atlas: Atlas | None = None,
              **options: Any) -> TrainResult:
    """Train a label-conditioned U-Net, or the baseline with ``lcs.baseline`` (``emseg lcs train``).

    ``options`` are those of :func:`~emseg.engine.training.run_training`: ``runtime``, ``resume``,
    ``progress`` and ``stop_after``.

    Checkpoints hold, besides what ``emseg train`` stores, ``lcs`` (the settings and classes) and,
    for conditioned models, ``atlas_image``/``atlas_label`` tensors with ``atlas`` metadata.

    Examples
    --------
    >>> config, lcs = load_lcs_config("lcs.toml")  # doctest: +SKIP
    >>> result = train_lcs(config, lcs, "runs/lcs")  # doctest: +SKIP
    """
    return fit(LCSTask(config, lcs, atlas=atlas), config, out_dir, **options)
