"""The embedded default job: synthetic EM-like data, a short training, prediction, evaluation."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import h5py

from emseg.engine.config import config_from_dict
from emseg.errors import InputError
from emseg.semantic.evaluation import evaluate_volumes
from emseg.io import open_volume
from emseg.metrics import SegmentationScores
from emseg.semantic.predict import PredictConfig, PredictResult, predict_file
from emseg.synthetic import CLASSES, make_volume
from emseg.engine.training import TrainResult
from emseg.semantic.train import train
from emseg.runtime.precision import DEFAULT_PRECISION
from emseg.runtime import Runtime

DEMO_SHAPE = (12, 256, 256)
TRAIN_SECTIONS = 8  # sections 0-7 train, 8-11 are held out


@dataclass
class DemoResult:
    out_dir: Path
    train: TrainResult
    predict: PredictResult
    scores: SegmentationScores
    classes: tuple[str, ...] = CLASSES

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "classes": list(self.classes), "train": self.train.to_dict(),
                "predict": self.predict.to_dict(), "test_scores": self.scores.to_dict()}


def write_demo_data(out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.h5`` (sections 0-7) and ``test.h5`` (sections 8-11), each with raw and label."""
    vol = make_volume(DEMO_SHAPE, rng=seed)
    paths = []
    for name, sl in (("train.h5", slice(0, TRAIN_SECTIONS)), ("test.h5", slice(TRAIN_SECTIONS, None))):
        path = out_dir / name
        with h5py.File(path, "w") as fh:
            fh.create_dataset("raw", data=vol.raw[sl], chunks=(1, 256, 256))
            fh.create_dataset("label", data=vol.label[sl], chunks=(1, 256, 256), compression="gzip")
            fh["label"].attrs["classes"] = list(CLASSES)
        paths.append(path)
    return paths[0], paths[1]


def demo_config(train_path: Path, steps: int) -> dict[str, Any]:
    return {
        "n_classes": 3, "patch_shape": [1, 128, 128], "batch_size": 4, "steps": steps,
        "log_every": 10, "checkpoint_every": 50, "valid_every": 1_000_000,
        "train": [{"raw": f"{train_path}:raw", "label": f"{train_path}:label"}],
        "model": {"depth": 3, "base_width": 12, "norm": "batch"},
        "optim": {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 10},
        "augment": {"brightness": 0.05, "contrast": 0.1},
    }


def run_demo(
    out_dir: str | Path,
    *,
    steps: int = 250,
    runtime: Runtime = Runtime(),
    train_progress: Callable[[dict], None] | None = None,
    predict_progress: Callable[[int, int], None] | None = None,
) -> DemoResult:
    """Generate data into ``out_dir``, train, predict the held-out sections and score them.

    An existing demo run in ``out_dir`` is replaced.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be an integer >= 1, got {steps!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("last.pt", "best.pt", "metrics.csv"):
        (out / "run" / name).unlink(missing_ok=True)
    precision = runtime.precision_or(DEFAULT_PRECISION)
    train_path, test_path = write_demo_data(out, runtime.seed)
    config = config_from_dict(dict(demo_config(train_path, steps), precision=precision), source="demo")
    result = train(config, out / "run", runtime=runtime, progress=train_progress)
    pred = predict_file(PredictConfig(model=str(out / "run" / "last.pt"), input=f"{test_path}:raw",
                                      output=str(out / "prediction.zarr"), output_type="labels", device=runtime.device,
                                      precision=precision, overwrite=True),  # the demo's own output
                        progress=predict_progress)
    with open_volume(str(out / "prediction.zarr")) as p, open_volume(f"{test_path}:label") as gt:
        scores = evaluate_volumes(p, gt, n_classes=3)
    return DemoResult(out, result, pred, scores)
