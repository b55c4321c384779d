"""Inference with label-conditioned models (and their multi-channel baseline).

Each label's condition (atlas image + atlas mask) is turned into a code once
(:meth:`UNet.condition`). Every window is encoded once and decoded once per label. Labels are
predicted ``label_batch`` at a time over a whole block (default one): each label's map is handed
on (written) as soon as it is computed and folded into running merged statistics (largest
probability so far and its label; :mod:`emseg.lcs.merge` has the merge rules), so peak memory does
not grow with the number of labels. The calibrated merge (default) first runs the model on its own
atlas, one label at a time, and fits each label's logit scale and offset there
(:mod:`emseg.lcs.calibrate`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from emseg.engine.blocks import default_block_shape, plan_blocks
from emseg.models.checkpoint import load_model
from emseg.data import to_float
from emseg.runtime.device import resolve_device
from emseg.errors import InputError
from emseg.engine.inference import SlidingWindow
from emseg.models.loading import window_shape
from emseg.io import (auto_chunks, check_raw, open_output_group, open_volume, parse_group_spec,
                      parse_spec)
from emseg.lcs.atlas import Atlas
from emseg.lcs.config import LCSConfig
from emseg.lcs.calibrate import Calibration, fit_calibration, fit_subsample, prob_logit
from emseg.lcs.merge import CalibratedMerge, RunningMerge, calibrated_merge, check_merge, label_dtype, merge_labels
from emseg.models.conditioning import ConditionCode
from emseg.runtime.precision import DEFAULT_PRECISION, Precision, resolve_precision


def _centre_crop(cond: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Crop the spatial axes of (K, 2, *P) to ``shape`` (<= P), centred."""
    full = cond.shape[2:]
    if tuple(full) == tuple(shape):
        return cond
    if any(s > f for s, f in zip(shape, full)):
        raise InputError(f"window {tuple(shape)} is larger than the atlas patch {tuple(full)}")
    index = tuple(slice((f - s) // 2, (f - s) // 2 + s) for f, s in zip(full, shape))
    return cond[(slice(None), slice(None)) + index]


class LabelPredictor:
    """Per-label probabilities of a conditioned model (or a baseline) over any region.

    Parameters
    ----------
    model : UNet
        A conditioned network (``cond_channels == 2``, one output) or a baseline (K+1 outputs,
        channel j + 1 = ``classes[j]``), in eval mode.
    labels : sequence of int
        Labels to predict, in output order.
    patch_shape : sequence of int
        Window shape in volume axes (the training patch: the atlas has this shape).
    atlas : Atlas, optional
        Required for a conditioned model; its label map defines each label's mask.
    classes : sequence of int, optional
        Baseline only: the trained classes (channel order).
    label_batch : int
        Labels predicted together by :meth:`predict` (each holds one float32 map of the region).
    merge : {"calibrated", "max"}
        Conditioned models: how the maps are merged (:mod:`emseg.lcs.merge`); ``calibrated``
        fits :attr:`calibration` on the atlas when first needed. A baseline ignores it (softmax).

    Attributes
    ----------
    window : SlidingWindow
        Maps a float32 region (*R) to (K, *R) probabilities of all labels at once (memory K x R;
        :meth:`predict` streams them instead).

    Examples
    --------
    >>> predictor = LabelPredictor(model, [1, 3], (1, 128, 128), atlas=atlas)  # doctest: +SKIP
    >>> probs = predictor.window(image)                                      # doctest: +SKIP
    >>> merged = predictor.predict(image, on_label=lambda label, p: None)    # doctest: +SKIP
    """

    def __init__(
        self,
        model: torch.nn.Module,
        labels: Sequence[int],
        patch_shape: Sequence[int],
        *,
        atlas: Atlas | None = None,
        classes: Sequence[int] | None = None,
        overlap: float = 0.25,
        blend: str = "gaussian",
        batch_size: int = 4,
        label_batch: int = 1,
        device: str | torch.device = "cpu",
        precision: str | Precision = DEFAULT_PRECISION,
        amp: bool = False,
        merge: str = "calibrated",
    ):
        self.model = model
        self.labels = [int(l) for l in labels]
        if not self.labels:
            raise InputError("no labels to predict")
        if label_batch < 1:
            raise InputError(f"label_batch must be >= 1, got {label_batch}")
        check_merge(merge)
        self._calibration: Calibration | None = None
        self.device = torch.device(device)
        if amp and precision == "fp32" and self.device.type == "cuda":
            precision = "auto"
        self.precision = resolve_precision(precision, self.device, ndim=int(getattr(model, "ndim", 2)))
        self.precision.prepare_model(model)
        self.label_batch = label_batch
        self.conditioned = bool(getattr(model, "cond_channels", 0))
        self._codes: dict[tuple[int, ...], Any] = {}
        if self.conditioned:
            if atlas is None:
                raise ValueError("a conditioned model needs its atlas")
            self.rule = "calibrated" if merge == "calibrated" else "sigmoid"
            self.atlas = atlas
            # a prototype code does not depend on the window; the atlas condition is cropped to it
            self.global_code = getattr(model, "config", {}).get("conditioning") == "prototype"
            forward = self._forward_for(range(len(self.labels)))
        else:
            if classes is None:
                raise ValueError("a baseline model needs its class list")
            classes = [int(c) for c in classes]
            missing = [l for l in self.labels if l not in classes]
            if missing:
                raise InputError(f"label {missing[0]} is not one of the trained classes {classes}")
            self.rule = "softmax"
            self.channels = torch.tensor([classes.index(l) + 1 for l in self.labels], device=self.device)
            forward = self._baseline_forward
        self._window_args = dict(divisor=model.divisor, overlap=overlap, blend=blend, batch_size=batch_size,
                                 device=self.device, precision=self.precision)
        self.patch_shape = tuple(int(p) for p in patch_shape)
        self.window = SlidingWindow(forward, self.patch_shape, **self._window_args)

    @torch.no_grad()
    def codes(self, shape: Sequence[int]):
        """Condition codes of all labels for windows of spatial ``shape`` (the last shape is cached)."""
        key = () if self.global_code else tuple(int(s) for s in shape)
        if key not in self._codes:
            parts = []
            for i in range(0, len(self.labels), 16):  # bounded memory for many labels
                cond = torch.from_numpy(self.atlas.condition([(l,) for l in self.labels[i:i + 16]]))
                if key:
                    cond = _centre_crop(cond, key)
                parts.append(self.model.condition(cond.to(self.device)))
            self._codes = {key: ConditionCode.cat(parts)}
        return self._codes[key]

    def _forward_for(self, indices) -> Callable[[torch.Tensor], torch.Tensor]:
        indices = list(indices)

        def forward(x: torch.Tensor) -> torch.Tensor:
            code = self.codes(x.shape[2:])
            skips, features = self.model.encode(x)  # once per window, whatever the number of labels
            outs = [torch.sigmoid(self.model.decode(skips, features, code[k])[0].float()) for k in indices]
            return torch.cat(outs, dim=1)

        return forward

    def _baseline_forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.model(x).float(), dim=1)
        return probs.index_select(1, self.channels)

    @property
    def calibration(self) -> Calibration | None:
        """The per-label logit calibration (``merge="calibrated"``), fitted on the atlas once."""
        if self.rule != "calibrated":
            return None
        if self._calibration is None:
            self._calibration = self.fit_calibration()
        return self._calibration

    def fit_calibration(self) -> Calibration:
        """Fit :class:`Calibration` on the atlas: the model on the atlas image, conditioned on each
        label's atlas mask (one label at a time), against the atlas label map (other labels: background)."""
        image = self.atlas.image.reshape(self.patch_shape)
        index, weights = fit_subsample(self.atlas.label, self.labels)
        logits = np.empty((len(self.labels), index.size), dtype=np.float32)
        for k in range(len(self.labels)):
            window = SlidingWindow(self._forward_for([k]), self.patch_shape, **self._window_args)
            logits[k] = prob_logit(window(image)[0].ravel()[index])
        return fit_calibration(logits, self.atlas.label.ravel()[index], self.labels, weights=weights)

    def _running_merge(self, shape: Sequence[int]):
        if self.rule == "calibrated":
            return CalibratedMerge(self.calibration, shape)
        return RunningMerge(self.labels, self.rule, shape)

    def merge(self, probs: np.ndarray) -> np.ndarray:
        """Merged label map of (K, *S) probabilities (see :mod:`emseg.lcs.merge`)."""
        if self.rule == "calibrated":
            return calibrated_merge(probs, self.calibration)
        return merge_labels(probs, self.labels, self.rule)

    def predict(self, region: np.ndarray, *, crop: tuple[slice, ...] | None = None,
                on_label: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
        """Merged label map of a float32 region (*R), streaming the labels.

        Labels are predicted ``label_batch`` at a time (a baseline: all at once, it has one output
        per class anyway); each map, cropped to ``crop`` (slices of the region), is passed to
        ``on_label(label, probs)`` and folded into a :class:`RunningMerge`, then dropped.
        """
        crop = crop if crop is not None else tuple(slice(None) for _ in np.shape(region))
        merge = None
        step = self.label_batch if self.conditioned else len(self.labels)
        for start in range(0, len(self.labels), step):
            indices = range(start, min(start + step, len(self.labels)))
            if not self.conditioned:
                window = self.window
            else:
                window = SlidingWindow(self._forward_for(indices), self.patch_shape, **self._window_args)
            probs = window(region)
            for i, k in enumerate(indices):
                p = probs[(i,) + crop]
                if merge is None:
                    merge = self._running_merge(p.shape)
                if on_label is not None:
                    on_label(self.labels[k], p)
                merge.update(k, p)
            del probs
        return merge.result()


@dataclass
class LCSModel:
    """A network from ``emseg lcs train`` with what inference needs."""

    model: torch.nn.Module
    classes: tuple[int, ...]
    patch_shape: tuple[int, ...]
    atlas: Atlas | None
    baseline: bool
    state: dict[str, Any]

    def resolve_labels(self, labels: Sequence[int] | None) -> list[int]:
        """Check requested labels: known to a baseline, or present in the atlas of a conditioned model."""
        if labels is None:
            return list(self.classes)
        labels = [int(l) for l in labels]
        if not labels:
            raise InputError("no labels requested")
        dup = sorted({l for l in labels if labels.count(l) > 1})
        if dup:
            raise InputError(f"label {dup[0]} requested twice")
        for l in labels:
            if l <= 0:
                raise InputError(f"label {l} cannot be requested (0 is background, -1 ignore)")
            if self.baseline and l not in self.classes:
                raise InputError(f"unknown label {l}: this baseline was trained on classes "
                                 f"{', '.join(map(str, self.classes))}")
            if not self.baseline and l not in self.atlas.present:
                raise InputError(f"unknown label {l}: it does not occur in the atlas labels (present: "
                                 f"{', '.join(map(str, self.atlas.present))}); `atlas_labels` can add labels")
        return labels

    def resolve_merge(self, merge: str | None) -> str:
        """The merge to use: ``merge`` if given, else the checkpoint's ``[lcs] merge`` (a baseline: ``max``)."""
        if merge is not None:
            check_merge(merge)
        if self.baseline:
            if merge == "calibrated":
                raise InputError("the calibrated merge needs a label-conditioned checkpoint, this one is the "
                                 "baseline (its softmax is already one distribution)")
            return "max"
        # checkpoints written before the key existed get its default
        return merge or str(self.state["lcs"].get("merge", LCSConfig.merge))


def load_lcs_model(path: str | Path, device: str | torch.device = "cpu", *,
                   atlas_labels: str | None = None) -> LCSModel:
    """Load a checkpoint of ``emseg lcs train``; ``atlas_labels`` replaces the atlas label map.

    ``atlas_labels`` (``FILE:DS``) holds integer labels on the atlas, either the atlas patch or the
    whole atlas volume (cropped at the stored offset): finer labels than the training ones can be
    requested this way.

    Examples
    --------
    >>> lcs = load_lcs_model("runs/lcs/best.pt", atlas_labels="atlas.h5:fine")  # doctest: +SKIP
    """
    model, state = load_model(path, device)
    meta = state.get("lcs")
    if not isinstance(meta, dict):
        raise InputError("not a checkpoint of `emseg lcs train` (no lcs settings)", source=str(path))
    baseline = bool(meta.get("baseline"))
    atlas = None
    if not baseline:
        atlas = Atlas.from_state(state, source=str(path))
    if atlas_labels is not None:
        if baseline:
            raise InputError("`atlas_labels` needs a label-conditioned checkpoint, this one is the baseline",
                             source=str(path))
        with open_volume(atlas_labels) as vol:
            atlas = atlas.with_labels(vol[...], spec=str(vol.spec))
    return LCSModel(model, tuple(int(c) for c in meta["classes"]), tuple(int(p) for p in meta["patch_shape"]),
                    atlas, baseline, state)


# --------------------------------------------------------------------------- output container


parse_output = parse_group_spec  # the output spec of ``emseg lcs infer``: OUT.zarr[/GROUP], OUT.h5[:GROUP]


# --------------------------------------------------------------------------- the infer core


@dataclass(frozen=True)
class InferConfig:
    """Options of ``emseg lcs infer``."""

    model: str
    input: str
    output: str
    labels: tuple[int, ...] | None = None
    atlas_labels: str | None = None
    overlap: float = 0.25
    blend: str = "gaussian"
    batch_size: int = 4
    label_batch: int = 1
    block_shape: tuple[int, ...] | None = None
    #: ``calibrated | max``; default: the checkpoint's ``[lcs] merge``.
    merge: str | None = None
    device: str = "auto"
    #: ``auto | fp32 | bf16`` (see :mod:`emseg.runtime.precision`).
    precision: str = DEFAULT_PRECISION
    #: Replace an existing OUTPUT group (or file or store); refused otherwise.
    overwrite: bool = False


@dataclass(frozen=True)
class InferResult:
    """What :func:`infer_file` wrote: the arrays of the output container by name, and the run."""

    output: str
    arrays: dict[str, str]
    shape: tuple[int, ...]
    labels: tuple[int, ...]
    baseline: bool
    blocks: int
    seconds: float
    merge: str = "max"
    calibration: Calibration | None = None

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape))

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "arrays": dict(self.arrays), "shape": list(self.shape),
                "labels": list(self.labels), "baseline": self.baseline, "merge": self.merge,
                "calibration": None if self.calibration is None else self.calibration.to_dict(),
                "voxels": self.voxels,
                "blocks": self.blocks, "seconds": round(self.seconds, 3),
                "voxels_per_s": round(self.voxels / self.seconds, 1) if self.seconds > 0 else None}


def _check_output_spares_input(input_spec: str, output: str) -> None:
    """Raise :class:`InputError` when writing the OUTPUT container would replace or clash with INPUT."""
    src, (path, group, fmt) = parse_spec(input_spec), parse_output(output)
    if src.fmt != fmt or src.path.resolve() != path.resolve():
        return
    parent, _, name = src.key.rpartition("/")
    if fmt == "zarr":  # the group (or the whole store) is replaced
        clash = not group or src.key == group or src.key.startswith(group + "/")
    else:  # datasets GROUP/prob_<l> and GROUP/labels are (re)created
        clash = src.key == group or (parent == group and (name == "labels" or name.startswith("prob_")))
    if clash:
        raise InputError(f"the output would overwrite the input {src}", source=output)


def infer_file(config: InferConfig, *, progress: Callable[[int, int], None] | None = None) -> InferResult:
    """Predict the requested labels of ``config.input`` into the container ``config.output``.

    Writes float32 ``prob_<label>`` (the model's probability of each label, before merging) and
    ``labels`` (the merged label map, see :func:`merge_labels`), block by block; everything appears
    at once when complete.

    Examples
    --------
    >>> infer_file(InferConfig("runs/lcs/best.pt", "stack.h5:raw", "pred.zarr", labels=(1, 3)))  # doctest: +SKIP
    """
    if not 0 <= config.overlap < 1:
        raise InputError(f"`overlap` must be in [0, 1), got {config.overlap}")
    if config.batch_size < 1 or config.label_batch < 1:
        raise InputError("`batch_size` and `label_batch` must be >= 1")
    _check_output_spares_input(config.input, config.output)
    device = resolve_device(config.device)
    lcs = load_lcs_model(config.model, device, atlas_labels=config.atlas_labels)
    labels = lcs.resolve_labels(config.labels)
    merge = lcs.resolve_merge(config.merge)
    start = time.perf_counter()
    with open_volume(config.input) as source:
        check_raw(source)
        patch = window_shape(None, lcs.patch_shape, source.shape, lcs.model.ndim)
        predictor = LabelPredictor(lcs.model, labels, patch, atlas=lcs.atlas, classes=lcs.classes,
                                   overlap=config.overlap, blend=config.blend, batch_size=config.batch_size,
                                   label_batch=config.label_batch, device=device, precision=config.precision,
                                   merge=merge)
        calibration = predictor.calibration
        shape = source.shape
        chunks = auto_chunks(shape, 4)
        block_shape = tuple(config.block_shape) if config.block_shape else default_block_shape(shape, patch, chunks)
        if len(block_shape) != len(shape):
            raise InputError(f"`block_shape` {block_shape} does not fit a {len(shape)}D volume")
        blocks = plan_blocks(shape, block_shape, [p // 2 for p in patch])
        attrs = {"model": str(config.model), "source": str(config.input), "labels": labels,
                 "merge_rule": predictor.rule, "merge": merge, "baseline": lcs.baseline}
        if calibration is not None:
            attrs.update(calibration_scale=list(calibration.scale), calibration_offset=list(calibration.offset))
        total = int(np.prod(shape))
        done = 0
        with open_output_group(config.output, source, overwrite=config.overwrite) as out:
            probs_out = {l: out.create(f"prob_{l}", shape, np.float32, dict(attrs, label=l)) for l in labels}
            merged = out.create("labels", shape, label_dtype(labels), attrs)
            for block in blocks:
                raw = to_float(np.asarray(source[block.outer]), source.dtype)

                def write(label: int, probs: np.ndarray, inner=block.inner) -> None:
                    probs_out[label][inner] = probs

                labels_map = predictor.predict(raw, crop=block.inner_in_outer, on_label=write)
                merged[block.inner] = labels_map.astype(label_dtype(labels))
                done += block.size
                if progress is not None:
                    progress(done, total)
            arrays = {name: out.spec(name) for name in out.arrays}
    return InferResult(str(config.output), arrays, tuple(shape), tuple(labels), lcs.baseline, len(blocks),
                       time.perf_counter() - start, merge, calibration)
