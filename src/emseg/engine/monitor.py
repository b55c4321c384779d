"""Pictures of a training run: ``curves.png`` beside ``metrics.csv``, and optional TensorBoard logs.

:class:`TrainingMonitor` is a ``progress`` callback for :func:`emseg.engine.training.run_training` (or a
companion of another one): at every validation it redraws ``curves.png`` (loss, learning rate and
validation Jaccard per class, from ``metrics.csv``) when matplotlib is installed, and with
``tensorboard=True`` it logs the same scalars at every step plus, at each validation, a section of
the first validation cube (raw, label, prediction) under ``OUT/tensorboard``.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from emseg.data.values import to_float
from emseg.errors import InputError
from emseg.io import save_figure


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def read_metrics(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of ``metrics.csv`` as float arrays (empty cells are NaN)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    return {k: np.array([float(r[k]) if r.get(k) not in (None, "") else np.nan for r in rows]) for k in rows[0]}


def write_curves(metrics_csv: str | Path, png: str | Path | None = None) -> Path | None:
    """Draw loss, learning rate and validation Jaccard per class against the step; returns the PNG
    path, or None when matplotlib is missing or there is nothing to draw yet. Written atomically."""
    if not have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    metrics_csv = Path(metrics_csv)
    png = Path(png) if png is not None else metrics_csv.with_name("curves.png")
    cols = read_metrics(metrics_csv)
    if "step" not in cols:
        return None
    step = cols["step"]
    jac = sorted((k for k in cols if k.startswith("valid_jaccard_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    axes[0].plot(step, cols["loss"], color="C0")
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    if np.all(cols["loss"][np.isfinite(cols["loss"])] > 0):
        axes[0].set_yscale("log")
    axes[1].plot(step, cols["lr"], color="C1")
    axes[1].set(title="learning rate", xlabel="step", ylabel="lr")
    for i, k in enumerate(jac):
        ok = np.isfinite(cols[k])
        axes[2].plot(step[ok], cols[k][ok], marker="o", ms=3, color=f"C{i}", label=f"class {k.rsplit('_', 1)[1]}")
    axes[2].set(title="validation Jaccard", xlabel="step", ylabel="Jaccard", ylim=(0, 1))
    if jac:
        axes[2].legend(fontsize=8)
    else:
        axes[2].text(0.5, 0.5, "no validation data", ha="center", va="center", transform=axes[2].transAxes)
    save_figure(fig, png, dpi=90)
    return png


def validation_section(model: torch.nn.Module, raw: Any, label: Any, patch_shape: Sequence[int],
                       device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Raw, label and predicted labels of the central patch of a cube, its middle section (y, x)."""
    shape = tuple(int(s) for s in raw.shape)
    patch = [min(p, s) for p, s in zip(patch_shape[-len(shape):], shape)]
    ndim = int(getattr(model, "ndim", len(shape)))
    if len(shape) == 3 and ndim == 2:  # a 2D network on a stack: one section
        patch[0] = 1
    divisor = list(getattr(model, "divisor", [1] * ndim))
    for ax, d in zip(range(len(patch) - ndim, len(patch)), divisor):
        patch[ax] = max(d, patch[ax] - patch[ax] % d)
    box = tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(shape, patch))
    block = to_float(np.asarray(raw[box]), np.dtype(raw.dtype))
    if block.ndim > ndim:
        block = block.reshape(block.shape[-ndim:])
    x = torch.from_numpy(np.ascontiguousarray(block))[None, None].to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        pred = model(x).float().argmax(1)[0].cpu().numpy().reshape(tuple(patch))
    model.train(was_training)
    lab = np.asarray(label[box])
    mid = (lambda a: a[a.shape[0] // 2]) if len(shape) == 3 else (lambda a: a)
    return {"raw": mid(np.asarray(raw[box])), "label": mid(lab), "prediction": mid(pred)}


class TrainingMonitor:
    """A ``progress`` callback drawing ``curves.png`` and, optionally, logging to TensorBoard.

    ``valid`` is ``(raw, label)`` (lazy volumes) for the TensorBoard image; ``then`` another callback
    called first (the command line's progress bar).

    Examples
    --------
    >>> monitor = TrainingMonitor("runs/mito", tensorboard=True)  # doctest: +SKIP
    >>> run_training(task, config, "runs/mito", progress=monitor)  # doctest: +SKIP
    """

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = False, valid: tuple[Any, Any] | None = None,
                 patch_shape: Sequence[int] | None = None, n_classes: int | None = None,
                 then: Callable[[dict[str, Any]], None] | None = None):
        self.out = Path(out_dir)
        self.then = then
        self.valid = valid
        self.patch_shape = tuple(patch_shape) if patch_shape else None
        self.n_classes = n_classes
        self.writer = None
        self.curves: Path | None = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InputError("`tensorboard` needs the tensorboard package (pip install tensorboard)") from None
            self._writer_cls = SummaryWriter

    def __call__(self, info: dict[str, Any]) -> None:
        if self.then is not None:
            self.then(info)
        step = int(info["step"])
        if hasattr(self, "_writer_cls") and self.writer is None:
            self.writer = self._writer_cls(log_dir=str(self.out / "tensorboard"))
        if self.writer is not None:
            self.writer.add_scalar("train/loss", float(info["loss"]), step)
            self.writer.add_scalar("train/lr", float(info["lr"]), step)
        valid = info.get("valid")
        if not valid:
            return
        if (self.out / "metrics.csv").exists():
            self.curves = write_curves(self.out / "metrics.csv") or self.curves
        if self.writer is None:
            return
        for key, value in valid.items():
            if value is not None and np.isfinite(value):
                self.writer.add_scalar(f"valid/{key}", float(value), step)
        model = info.get("model")
        if model is not None and self.valid is not None and self.patch_shape is not None:
            device = next(model.parameters()).device
            section = validation_section(model, self.valid[0], self.valid[1], self.patch_shape, device)
            k = max(1, (self.n_classes or int(max(section["label"].max(), section["prediction"].max()) + 1)) - 1)
            raw = section["raw"].astype(np.float32)
            raw = (raw - raw.min()) / max(float(raw.max() - raw.min()), 1e-9)
            for name, img in (("raw", raw), ("label", np.clip(section["label"], 0, None) / k),
                              ("prediction", section["prediction"] / k)):
                self.writer.add_image(f"valid/{name}", np.asarray(img, np.float32)[None], step)
        self.writer.flush()

    def close(self) -> None:
        """Draw ``curves.png`` once more (runs without validation get theirs here) and close the log."""
        if (self.out / "metrics.csv").exists():
            self.curves = write_curves(self.out / "metrics.csv") or self.curves
        if self.writer is not None:
            self.writer.close()
            self.writer = None
