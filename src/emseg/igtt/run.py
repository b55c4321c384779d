"""The iGTT pipeline (:func:`run_igtt`): unsupervised binary segmentation by iterative ground-truth training.

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
   :func:`~emseg.igtt.thresholds.invert_if_large`);
5. pass it through the extraction-of-meta-structure (EMS) module -- skeleton, random shift within
   a radius, random sampling (:func:`~emseg.igtt.ems.ems`) -- and use the result as the next ``Y*``.

The network keeps its weights (and optimizer state) across epochs. Thresholding baselines (Otsu and
adaptive Gaussian thresholding from scikit-image) are computed alongside, see
:func:`~emseg.igtt.baselines.threshold_baselines`. The whole image is held in memory: iGTT is transductive (it segments
the image it is trained on), meant for stacks of a few sections, not whole datasets.
"""
from __future__ import annotations

import dataclasses

import csv
import io
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emseg.models.checkpoint import load_checkpoint, load_model, save_checkpoint
from emseg.engine.config import CubeConfig, ModelConfig, OptimConfig, TrainConfig
from emseg.data import Augmenter, Cube, PatchSampler
from emseg.runtime.device import resolve_device
from emseg.errors import InputError
from emseg.igtt.baselines import binary_metrics, threshold_baselines
from emseg.igtt.config import METRIC_COLUMNS, IGTTConfig
from emseg.igtt.ems import ems
from emseg.igtt.thresholds import Selection, select_mask
from emseg.engine.inference import WindowOptions, make_predictor, predict_array
from emseg.io import atomic_write_json, atomic_write_text, check_raw, create_volume, open_volume
from emseg.losses import dmi_loss, iou_loss
from emseg.engine.training import run_training
from emseg.runtime.precision import DEFAULT_PRECISION
from emseg.runtime import Runtime

_STATE = "igtt_state.pt"
_TRAIN_DIR = "train"


# --------------------------------------------------------------------------- training task


class _IGTTTask:
    """Task for :func:`emseg.engine.training.run_training`: a sigmoid U-Net on in-memory pseudo-labels."""

    name = "igtt"
    metric_columns: tuple[str, ...] = ()
    has_validation = False

    def __init__(self, volume: np.ndarray, labels: np.ndarray, config: IGTTConfig):
        self.config = config
        info = np.array([[1, 1], [0, 0]], dtype=np.uint8)  # both classes labelled, none absent
        cube = Cube(raw=volume, label=labels, info=info, prio=1.0, name="igtt")
        self.sampler = PatchSampler([cube], (1,) + tuple(config.patch_shape), squeeze=True)
        self.augmenter = Augmenter() if config.augment else None

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

    def validate(self, model, device, precision):  # pragma: no cover - no validation in iGTT
        return None

    def extra_state(self) -> dict[str, Any]:
        return {}  # iGTT's own state file holds the epoch's labels and rows

    def check_resume(self, state, source: str) -> None:
        pass  # run_igtt writes the last.pt each epoch continues from, and checks its own state file

    def close(self) -> None:
        pass  # the volume is an array in memory


def _model_config(config: IGTTConfig) -> dict[str, Any]:
    return dict(ndim=2, in_channels=1, out_channels=1, depth=config.depth, base_width=config.base_width,
                norm="batch", dropout=0.0, anisotropic_levels=0)


def _train_config(config: IGTTConfig, raw_name: str, total_steps: int) -> TrainConfig:
    return TrainConfig(
        train=(CubeConfig(raw=raw_name),), n_classes=1, patch_shape=(1,) + tuple(config.patch_shape),
        batch_size=config.batch_size, steps=total_steps, valid_every=10**9,
        log_every=max(1, min(10, config.steps_per_epoch)), checkpoint_every=10**9, precision=config.precision,
        model=ModelConfig(ndim=2, depth=config.depth, base_width=config.base_width, norm="batch"),
        augment=Augmenter() if config.augment else Augmenter(flip=False, rotate90=False, brightness=0.0,
                                                            contrast=0.0),
        optim=OptimConfig(lr=config.lr),
    )


def _predict(model: torch.nn.Module, volume: np.ndarray, window: int, device: torch.device,
             precision: str = DEFAULT_PRECISION) -> np.ndarray:
    """Foreground probabilities of a (z, y, x) in-memory volume with a 2D network."""
    patch = (1, min(window, volume.shape[1]), min(window, volume.shape[2]))
    predictor = make_predictor(model, patch, WindowOptions(precision=precision), device)
    out = np.empty(volume.shape, dtype=np.float32)
    for block, probs in predict_array(predictor, volume, patch):
        out[block.inner] = probs[0]
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


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty).

    >>> mask_iou(np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 0], bool))
    0.3333333333333333
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union


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
    runtime: Runtime = Runtime(),
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
    runtime : Runtime
        Device and seed (the seed drives the network initialisation, patch sampling and the EMS
        randomness); its ``precision``, when set, replaces the config's.
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
    dev = resolve_device(runtime.device)
    seed = runtime.seed

    out.mkdir(parents=True, exist_ok=True)
    state_path, train_dir = out / _STATE, out / _TRAIN_DIR
    rows: list[dict[str, Any]] = []
    start_epoch = 0
    labels = np.zeros(vol3.shape, dtype=np.int8)  # Y* = 0: all background
    prev_mask: np.ndarray | None = None  # the previous epoch's chosen mask (for `mask_iou_prev`)
    train_state: dict[str, Any] | None = None
    if resume:
        if not state_path.exists():
            raise InputError(f"nothing to resume: no {_STATE}", source=str(out))
        saved = load_checkpoint(state_path)
        meta = saved.get("igtt") or {}
        if meta.get("resume_key") != _resume_key(cfg):
            raise InputError("the run was made with other options (only `epochs` may change on `resume`)",
                             source=str(state_path))
        if meta.get("seed") != int(seed) or tuple(meta.get("shape", ())) != tuple(vol3.shape):
            raise InputError("the run was made with another `seed` or another image", source=str(state_path))
        start_epoch = int(meta["epoch"])
        rows = [dict(r) for r in meta["rows"]]
        labels = meta["labels"].numpy().astype(np.int8)
        if "mask_bits" in meta:
            prev_mask = np.unpackbits(meta["mask_bits"].numpy(), count=vol3.size).astype(bool).reshape(vol3.shape)
        train_state = {k: v for k, v in saved.items() if k != "igtt"}
    elif state_path.exists():
        raise InputError(f"already holds an iGTT run ({_STATE}): pass `resume` to continue it or choose "
                         "another `out_dir`", source=str(out))
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

        tres = run_training(task, tcfg, train_dir, runtime=dataclasses.replace(runtime, device=str(dev)),
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
            "mask_iou_prev": None if prev_mask is None else mask_iou(sel.mask, prev_mask),
            "dice": None, "auc": None, "accuracy": None,
        }
        prev_mask = np.asarray(sel.mask, dtype=bool)
        if truth is not None:
            row.update(binary_metrics(1.0 - prob if sel.inverted else prob, sel.mask, truth))
        row["seconds"] = time.perf_counter() - t_epoch
        rows.append(row)

        if cfg.save_pseudo_labels:
            spec = f"{out / 'pseudo_labels.h5'}:epoch_{n:02d}"
            with create_volume(spec, image_shape, "int8", attrs={"epoch": n, "ems": cfg.ems},
                               overwrite=True) as dest:  # the run folder's own files (it is locked)
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
            "mask_bits": torch.from_numpy(np.packbits(prev_mask.ravel())),
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
                           attrs=attrs, overwrite=True) as dest:
            dest[...] = fg_prob.reshape((1,) + tuple(image_shape))
        with create_volume(str(out / "segmentation.zarr"), image_shape, "uint8", attrs=attrs,
                           overwrite=True) as dest:
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
