"""Training: exact resume, checkpoint contents, metrics.csv, divergence, validation, lazy labels."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

import emseg
from conftest import synthetic, tiny_train_config, write_h5
from emseg.models.checkpoint import load_model
from emseg.engine.config import config_from_dict
from emseg.errors import InputError, TrainingDiverged
from emseg.engine.inference import SlidingWindow, softmax_forward
from emseg.models import build_model
from emseg.semantic.train import SegmentationTask, train
from emseg.runtime import Runtime

METRIC_COLUMNS = ["step", "loss", "lr", "patches_per_s", "elapsed_s", "valid_score",
                  "valid_jaccard_0", "valid_jaccard_1", "valid_jaccard_2"]


def _config(train_h5, **overrides):
    return config_from_dict(tiny_train_config(train_h5, **overrides))


def _rows(run_dir) -> tuple[list[str], list[dict[str, str]]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- (a) exact resume


def test_resume_continues_exactly(tmp_path, synthetic_h5, monkeypatch):
    config = _config(synthetic_h5)
    full = train(config, tmp_path / "full", runtime=Runtime(device="cpu", seed=3))
    assert len(full.losses) == 6 and full.final_step == 6 and not full.interrupted

    first = train(config, tmp_path / "split", runtime=Runtime(device="cpu", seed=3), stop_after=3)
    assert first.interrupted and first.final_step == 3
    assert _load(tmp_path / "split" / "last.pt")["step"] == 3
    rest = train(config, tmp_path / "split", runtime=Runtime(device="cpu", seed=3), resume=True)
    assert rest.start_step == 3 and rest.final_step == 6 and len(rest.losses) == 3
    np.testing.assert_allclose(first.losses, full.losses[:3], rtol=0, atol=1e-6)
    np.testing.assert_allclose(rest.losses, full.losses[3:], rtol=0, atol=1e-6)
    _, rows = _rows(tmp_path / "split")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(_load(tmp_path / "split" / "last.pt")["model"].values(),
                    _load(tmp_path / "full" / "last.pt")["model"].values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_resume_from_periodic_checkpoint_after_a_crash(tmp_path, synthetic_h5, monkeypatch):
    """A crash at step 6 with checkpoints every 4 steps: resume redoes steps 5-6 identically and
    metrics.csv drops the rows logged after the checkpoint."""
    full = train(_config(synthetic_h5), tmp_path / "full", runtime=Runtime(device="cpu", seed=5))
    config = _config(synthetic_h5, checkpoint_every=4)
    real_loss = SegmentationTask.loss
    calls = []

    def crashing(self, model, batch):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("power cut")
        return real_loss(self, model, batch)

    monkeypatch.setattr(SegmentationTask, "loss", crashing)
    with pytest.raises(RuntimeError, match="power cut"):
        train(config, tmp_path / "run", runtime=Runtime(device="cpu", seed=5))
    assert _load(tmp_path / "run" / "last.pt")["step"] == 4
    assert [int(r["step"]) for r in _rows(tmp_path / "run")[1]] == [1, 2, 3, 4, 5]
    monkeypatch.setattr(SegmentationTask, "loss", real_loss)
    rest = train(config, tmp_path / "run", runtime=Runtime(device="cpu", seed=5), resume=True)
    np.testing.assert_allclose(rest.losses, full.losses[4:], rtol=0, atol=1e-6)
    assert [int(r["step"]) for r in _rows(tmp_path / "run")[1]] == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- (b) checkpoints


def test_checkpoint_contents(tmp_path, synthetic_h5):
    config = _config(synthetic_h5)
    train(config, tmp_path / "run", runtime=Runtime(device="cpu", seed=0))
    for name in ("last.pt", "best.pt"):
        state = _load(tmp_path / "run" / name)
        for key in ("model", "optimizer", "step", "best_metric", "rng", "config", "emseg_version", "model_config"):
            assert key in state, (name, key)
        assert state["step"] == 6
        assert state["best_metric"] is None  # no validation cubes
        assert state["emseg_version"] == emseg.__version__
        assert isinstance(state["config"], dict)
        assert json.loads(json.dumps(state["config"])) == state["config"]  # plain data only
        assert state["config"]["patch_shape"] == [1, 32, 32] and state["config"]["n_classes"] == 3
        assert {"numpy", "python", "torch"} <= set(state["rng"])
        assert set(state["optimizer"]) == {"state", "param_groups"}
        model = build_model(state["model_config"])
        model.load_state_dict(state["model"])
        assert model.config["depth"] == 2 and model.config["base_width"] == 4
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


def test_best_checkpoint_without_validation_follows_resume(tmp_path, synthetic_h5):
    """Without validation best.pt holds the newest weights, also after an interrupted run resumes."""
    config = _config(synthetic_h5)
    train(config, tmp_path / "run", runtime=Runtime(device="cpu", seed=0), stop_after=3)
    assert _load(tmp_path / "run" / "best.pt")["step"] == 3
    train(config, tmp_path / "run", runtime=Runtime(device="cpu", seed=0), resume=True)
    last, best = _load(tmp_path / "run" / "last.pt"), _load(tmp_path / "run" / "best.pt")
    assert last["step"] == 6
    assert best["step"] == 6
    for a, b in zip(last["model"].values(), best["model"].values()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- (c) metrics.csv


@pytest.mark.parametrize("log_every, steps_logged", [(2, [2, 4, 6]), (4, [4, 6])])
def test_metrics_csv_rows_per_log_step(tmp_path, synthetic_h5, log_every, steps_logged):
    config = _config(synthetic_h5, log_every=log_every)
    result = train(config, tmp_path / "run", runtime=Runtime(device="cpu", seed=0))
    columns, rows = _rows(tmp_path / "run")
    assert columns == METRIC_COLUMNS
    assert [int(r["step"]) for r in rows] == steps_logged
    previous = 0
    for row in rows:
        step = int(row["step"])
        window = result.losses[previous:step]
        assert float(row["loss"]) == pytest.approx(np.mean(window), rel=1e-5)
        assert float(row["lr"]) == pytest.approx(1e-2)
        assert float(row["patches_per_s"]) > 0 and float(row["elapsed_s"]) >= 0
        assert all(row[c] == "" for c in METRIC_COLUMNS[5:])  # no validation configured
        previous = step


# --------------------------------------------------------------------------- (d) divergence


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path, synthetic_h5, monkeypatch):
    config = _config(synthetic_h5, checkpoint_every=1)
    real_loss = SegmentationTask.loss
    calls = []

    def nan_at_three(self, model, batch):
        calls.append(1)
        loss = real_loss(self, model, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(SegmentationTask, "loss", nan_at_three)
    with pytest.raises(TrainingDiverged) as info:
        train(config, tmp_path / "run", runtime=Runtime(device="cpu", seed=0))
    assert info.value.step == 3 and math.isnan(info.value.value)
    assert "step 3" in str(info.value)
    state = _load(tmp_path / "run" / "last.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# --------------------------------------------------------------------------- (e) run folders


def test_existing_run_needs_resume(tmp_path, synthetic_h5):
    config = _config(synthetic_h5, steps=1)
    train(config, tmp_path / "run", runtime=Runtime(device="cpu"))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(InputError, match="`resume`"):
        train(config, tmp_path / "run", runtime=Runtime(device="cpu"))
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    with pytest.raises(InputError, match="nothing to resume"):
        train(config, tmp_path / "other", runtime=Runtime(device="cpu"), resume=True)
    wider = _config(synthetic_h5, steps=2, model={"base_width": 6})
    with pytest.raises(InputError, match="different network"):
        train(wider, tmp_path / "run", runtime=Runtime(device="cpu"), resume=True)


# --------------------------------------------------------------------------- (f) validation


def _jaccard(pred: np.ndarray, gt: np.ndarray, k: int) -> float:
    inter = np.sum((pred == k) & (gt == k))
    union = np.sum((pred == k) | (gt == k))
    return inter / union if union else float("nan")


def test_validation_columns_and_best_checkpoint(tmp_path, synthetic_h5, synthetic_valid_h5):
    config = _config(synthetic_h5, valid_every=3,
                     valid=[{"raw": f"{synthetic_valid_h5}:raw", "label": f"{synthetic_valid_h5}:label"}])
    result = train(config, tmp_path / "run", runtime=Runtime(device="cpu", seed=0))
    columns, rows = _rows(tmp_path / "run")
    assert columns == METRIC_COLUMNS
    scored = {int(r["step"]): r for r in rows if r["valid_score"] != ""}
    assert sorted(scored) == [3, 6]
    for row in scored.values():
        jac = [float(row[f"valid_jaccard_{k}"]) for k in range(3)]
        assert all(0 <= j <= 1 for j in jac)
        assert float(row["valid_score"]) == pytest.approx(np.mean(jac[1:]), rel=1e-5)
    best_step = max(scored, key=lambda s: float(scored[s]["valid_score"]))
    best = _load(tmp_path / "run" / "best.pt")
    assert best["step"] == best_step
    assert best["best_metric"] == pytest.approx(float(scored[best_step]["valid_score"]), rel=1e-5)
    assert result.best_metric == pytest.approx(best["best_metric"])

    # The step-6 Jaccard recomputed independently from the final weights.
    model, _ = load_model(tmp_path / "run" / "last.pt")
    predictor = SlidingWindow(softmax_forward(model), (1, 32, 32), divisor=model.divisor, overlap=0.25)
    vol = synthetic((2, 64, 64), 1)
    pred = np.argmax(predictor(vol.raw.astype(np.float32) / 255), axis=0)
    for k in range(3):
        expected = _jaccard(pred, vol.label, k)
        got = float(scored[6][f"valid_jaccard_{k}"])
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), k


def test_validation_cube_without_labels_is_refused(tmp_path, synthetic_h5):
    config = _config(synthetic_h5, valid=[{"raw": f"{synthetic_h5}:raw"}])
    with pytest.raises(InputError, match="validation cubes need labels"):
        train(config, tmp_path / "run", runtime=Runtime(device="cpu"))


# --------------------------------------------------------------------------- (g) lazy labels


def test_not_present_flag_drives_class_probability_down(tmp_path):
    """Labels all -1 and class 1 flagged not present: the only signal is 'no class 1 here'."""
    raw = synthetic((4, 64, 64), 0).raw
    write_h5(tmp_path / "lazy.h5", raw=raw, label=np.full(raw.shape, -1, np.int8),
             info=np.array([[1, 1, 1], [0, 1, 0]], np.uint8))
    overrides = dict(model={"norm": "group"}, optim={"lr": 1e-2}, augment={"brightness": 0.0, "contrast": 0.0})
    trained = _config(tmp_path / "lazy.h5", steps=16, **overrides)
    initial = trained.replace(steps=0)  # the untrained network (a config file needs steps >= 1)
    train(initial, tmp_path / "init", runtime=Runtime(device="cpu", seed=0))
    train(trained, tmp_path / "trained", runtime=Runtime(device="cpu", seed=0))

    def mean_p1(run):
        model, _ = load_model(tmp_path / run / "last.pt")
        with torch.no_grad():
            probs = torch.softmax(model(torch.from_numpy(raw.astype(np.float32) / 255)[:, None]), dim=1)
        return probs[:, 1].mean().item(), probs[:, 0].mean().item() + probs[:, 2].mean().item()

    before, _ = mean_p1("init")
    after, others = mean_p1("trained")
    assert after < 0.7 * before, (before, after)
    assert others > 1 - after - 1e-5
