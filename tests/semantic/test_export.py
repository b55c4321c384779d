"""bioimage.io export: the package passes bioimageio.core's own model test, and predictions through
bioimageio.core agree with `emseg predict`."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import synthetic, tiny_train_config, to_toml, write_h5
from emseg.cli.main import cli
from emseg.io import open_volume

core = pytest.importorskip("bioimageio.core")

VNC = Path("/work/shared/data/drosophila_vnc/vnc_stack1.h5")
CITATION = "A. Author. A synthetic EM stack. (2024)"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    vol = synthetic((4, 64, 64), 0)
    h5 = write_h5(tmp / "train.h5", raw=vol.raw, label=vol.label)
    with h5py.File(h5, "a") as fh:
        fh.attrs.update({"citation": CITATION, "doi": "10.1234/abcd", "license": "CC BY-NC-SA 3.0 Unported",
                         "dataset": "synthetic stack"})
    (tmp / "train.toml").write_text(to_toml(tiny_train_config(h5, steps=2)))
    runner = CliRunner()
    result = runner.invoke(cli, ["train", str(tmp / "train.toml"), "--out", str(tmp / "run"), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["export", str(tmp / "run" / "best.pt"), str(tmp / "model.zip"),
                                 "--test-input", f"{h5}:raw", "--json"])
    assert result.exit_code == 0, result.output
    return tmp, json.loads(result.stdout)


def test_bioimageio_core_model_test_passes(exported):
    tmp, info = exported
    summary = core.test_model(str(tmp / "model.zip"))
    failed = [d.name for d in summary.details if d.status == "failed"]
    assert summary.status == "passed", failed
    assert info["axes"] == "bcyx" and info["patch_shape"] == [32, 32] and info["halo"] == [8, 8]


def test_package_contents(exported):
    tmp, _ = exported
    with zipfile.ZipFile(tmp / "model.zip") as zf:
        names = set(zf.namelist())
        rdf = json.loads(zf.read("rdf.yaml"))
        cover = zf.read("cover.png")
        test_in = np.load(zf.open("test_input.npy"))
    assert {"weights.pt", "weights.torchscript", "emseg_unet.py", "README.md"} <= names
    assert cover[:8] == b"\x89PNG\r\n\x1a\n"
    inp, out = rdf["inputs"][0], rdf["outputs"][0]
    assert [a.get("id", a["type"]) for a in inp["axes"]] == ["batch", "channel", "y", "x"]
    assert inp["axes"][2]["size"] == {"min": 32, "step": 4}  # the patch; depth 2 -> multiples of 4
    assert [a.get("halo") for a in out["axes"][2:]] == [8, 8]
    scale = [p for p in inp["preprocessing"] if p["id"] == "scale_linear"][0]["kwargs"]
    assert scale["gain"] * 255 == pytest.approx(1.0) and scale["offset"] == 0
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]["out_channels"] == 3
    assert any(c.get("doi") == "10.1234/abcd" and c["text"] == CITATION for c in rdf["cite"])
    assert rdf["training_data"]["license"] == "CC-BY-NC-SA-3.0"
    # the test input is the central patch of the middle section of the training raw
    with h5py.File(tmp / "train.h5", "r") as fh:
        np.testing.assert_array_equal(test_in[0, 0], fh["raw"][2, 16:48, 16:48])


def _crop_agrees(tmp, crop: np.ndarray):
    """bioimageio.core's prediction of ``crop`` (y, x) equals emseg's one-window prediction of the
    crop padded as the package says (symmetric, by the halo), with the halo cropped off again."""
    padded = np.pad(crop, 8, mode="symmetric")
    h5 = write_h5(tmp / "crop.h5", raw=padded[None])
    side = ",".join(str(s) for s in padded.shape)
    result = CliRunner().invoke(cli, ["predict", str(tmp / "run" / "best.pt"), f"{h5}:raw", str(tmp / "crop.zarr"),
                                      "--patch", f"1,{side}", "--overlap", "0", "--device", "cpu",
                                      "--precision", "fp32", "-q", "--overwrite"])
    assert result.exit_code == 0, result.output
    with open_volume(str(tmp / "crop.zarr")) as vol:
        ours = vol[:, 0, 8:-8, 8:-8]
    model = core.load_model_description(str(tmp / "model.zip"))
    sample = core.predict(model=model, inputs=crop[None, None])
    theirs = np.asarray(sample.members["probabilities"].data)[0]
    np.testing.assert_allclose(theirs, ours, atol=1e-5)  # fp32 on both sides (auto is bf16 on CPU)


def test_round_trip_agrees_with_emseg_predict(exported):
    tmp, _ = exported
    _crop_agrees(tmp, synthetic((2, 64, 64), 1).raw[0, :48, :40])


@pytest.mark.skipif(not VNC.exists(), reason="VNC data not present")
def test_round_trip_on_a_vnc_crop(exported):
    tmp, _ = exported
    with h5py.File(VNC, "r") as fh:
        crop = fh["raw"][10, 500:564, 300:364]
    _crop_agrees(tmp, crop)


def test_bad_output_is_a_one_line_error(exported, tmp_path):
    tmp, _ = exported
    result = CliRunner().invoke(cli, ["export", str(tmp / "run" / "best.pt"), str(tmp_path / "model.tar")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert ".zip" in result.stderr and not list(tmp_path.iterdir())
