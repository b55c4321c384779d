"""Training pictures: curves.png drawn from metrics.csv at each validation, TensorBoard scalars and
validation images read back with TensorBoard's own event reader."""
from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import tiny_train_config, to_toml
from emseg.cli.main import cli
from emseg.engine import monitor

pytest.importorskip("matplotlib")


def _csv_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _config(tmp_path, train_h5, valid_h5, **over):
    config = tiny_train_config(train_h5, steps=4, valid_every=2,
                               valid=[{"raw": f"{valid_h5}:raw", "label": f"{valid_h5}:label"}], **over)
    path = tmp_path / "train.toml"
    path.write_text(to_toml(config))
    return path


def test_curves_png_redrawn_at_each_validation_with_the_csv_values(tmp_path, synthetic_h5, synthetic_valid_h5,
                                                                   monkeypatch):
    import matplotlib.pyplot as plt

    figures, calls = [], []
    real_close, real_write = plt.close, monitor.write_curves
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    monkeypatch.setattr(monitor, "write_curves", lambda *a, **k: calls.append(a) or real_write(*a, **k))
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(_config(tmp_path, synthetic_h5, synthetic_valid_h5)),
                                      "--out", str(run), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert len(calls) == 2 + 1  # validations at steps 2 and 4, then once more at the end
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = plt.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 300
    # the last figure's lines hold exactly the metrics.csv columns
    rows = _csv_rows(run / "metrics.csv")
    loss_ax, lr_ax, jac_ax = figures[-1].axes
    np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), [float(r["loss"]) for r in rows], rtol=1e-9)
    np.testing.assert_allclose(lr_ax.lines[0].get_ydata(), [float(r["lr"]) for r in rows], rtol=1e-9)
    assert [line.get_label() for line in jac_ax.lines] == ["class 0", "class 1", "class 2"]
    valid_rows = [r for r in rows if r["valid_jaccard_1"]]
    np.testing.assert_allclose(jac_ax.lines[1].get_xdata(), [float(r["step"]) for r in valid_rows])
    np.testing.assert_allclose(jac_ax.lines[1].get_ydata(), [float(r["valid_jaccard_1"]) for r in valid_rows])
    for fig in figures:
        real_close(fig)


def test_tensorboard_logs_scalars_and_validation_images(tmp_path, synthetic_h5, synthetic_valid_h5):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(_config(tmp_path, synthetic_h5, synthetic_valid_h5)),
                                      "--out", str(run), "--device", "cpu", "--tensorboard", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert loss[-1].value == pytest.approx(info["final_loss"], rel=1e-6)
    rows = {int(r["step"]): r for r in _csv_rows(run / "metrics.csv")}
    lr = events.Scalars("train/lr")
    assert [e.value for e in lr] == pytest.approx([float(rows[e.step]["lr"]) for e in lr], rel=1e-5)
    jac = events.Scalars("valid/valid_jaccard_1")
    assert [e.step for e in jac] == [2, 4]
    assert [e.value for e in jac] == pytest.approx([float(rows[s]["valid_jaccard_1"]) for s in (2, 4)], rel=1e-5)
    for name in ("raw", "label", "prediction"):
        images = events.Images(f"valid/{name}")
        assert [e.step for e in images] == [2, 4]
        assert (images[-1].height, images[-1].width) == (32, 32)  # the central patch, one section


def test_tensorboard_missing_is_a_one_line_error(tmp_path, synthetic_h5, synthetic_valid_h5, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(_config(tmp_path, synthetic_h5, synthetic_valid_h5)),
                                      "--out", str(run), "--device", "cpu", "--tensorboard"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tensorboard" in lines[0]
    assert not (run / "last.pt").exists()


def test_validation_section_is_the_central_patch(synthetic_h5):
    import h5py
    import torch

    from emseg.models import build_model

    model = build_model({"ndim": 2, "in_channels": 1, "out_channels": 3, "depth": 2, "base_width": 4})
    with h5py.File(synthetic_h5, "r") as fh:
        raw, label = fh["raw"][...], fh["label"][...]
    section = monitor.validation_section(model, raw, label, (1, 32, 32))
    np.testing.assert_array_equal(section["raw"], raw[1, 16:48, 16:48])  # z: (4 - 1) // 2
    np.testing.assert_array_equal(section["label"], label[1, 16:48, 16:48])
    x = torch.from_numpy(raw[1:2, 16:48, 16:48].astype(np.float32) / 255)[None]
    with torch.no_grad():
        expected = model.eval()(x).argmax(1)[0].numpy()
    np.testing.assert_array_equal(section["prediction"], expected)
