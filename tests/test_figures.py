"""Pictures of `emseg query --sheet` and `emseg noise --report`: maps checked against the query scores,
figures read back as images, bad input refused before anything is written."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import synthetic, tiny_train_config, to_toml, write_h5
from emseg.active.sheet import check_sheet_output, pixel_maps
from emseg.models.checkpoint import load_model
from emseg.cli.main import cli
from emseg.data.values import to_float
from emseg.errors import InputError
from emseg.noise.figure import example_section, report_figure_path

plt_image = pytest.importorskip("matplotlib.image")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sheet")
    vol = synthetic((4, 64, 64), 0)
    data = write_h5(tmp / "train.h5", raw=vol.raw, label=vol.label)
    (tmp / "train.toml").write_text(to_toml(tiny_train_config(data, steps=2, model={"dropout": 0.2})))
    result = CliRunner().invoke(cli, ["train", str(tmp / "train.toml"), "--out", str(tmp / "run"), "--device", "cpu",
                                      "-q"])
    assert result.exit_code == 0, result.output
    return tmp / "run" / "best.pt", data, np.asarray(vol.raw)


@pytest.mark.parametrize("strategy", ["entropy", "least_confidence"])
def test_sheet_maps_average_to_the_query_scores(trained, tmp_path, strategy):
    model_path, data, raw = trained
    sheet = tmp_path / "q.png"
    result = CliRunner().invoke(cli, ["query", str(model_path), f"{data}:raw", "--strategy", strategy, "--n", "5",
                                      "--patch", "1,32,32", "--sheet", str(sheet), "--json", "--device", "cpu",
                                      "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["outputs"]["sheet"] == str(sheet)
    model, _ = load_model(model_path)
    patches = [to_float(raw[z:z + 1, y:y + 32, x:x + 32]) for z, y, x in (q["offset"] for q in doc["queries"])]
    maps = pixel_maps(model, patches, strategy)
    assert all(m.shape == (1, 32, 32) for m in maps)
    # the mean of each pixel map is the patch score the ranking used (reduction "mean")
    np.testing.assert_allclose([m.mean() for m in maps], [q["score"] for q in doc["queries"]], rtol=1e-4)
    bound = math.log(3) if strategy == "entropy" else 1 - 1 / 3
    assert all(m.min() >= 0 and m.max() <= bound + 1e-6 for m in maps)
    image = plt_image.imread(sheet)
    assert image.ndim == 3 and image.shape[1] > 2 * image.shape[0]  # 2 rows of 4 (raw, map) pairs: wide
    assert not list(tmp_path.glob(".*tmp*"))


def test_bald_sheet_and_bad_sheet_paths(trained, tmp_path, monkeypatch):
    model_path, data, raw = trained
    model, _ = load_model(model_path)
    patch = to_float(raw[0:1, :32, :32])
    a, b = pixel_maps(model, [patch], "bald", mc_samples=4, seed=3), pixel_maps(model, [patch], "bald", mc_samples=4,
                                                                                seed=3)
    np.testing.assert_array_equal(a[0], b[0])  # seeded dropout masks
    assert a[0].min() >= 0 and a[0].max() > 0
    out = tmp_path / "q.json"
    result = CliRunner().invoke(cli, ["query", str(model_path), f"{data}:raw", "--n", "2", "--patch", "1,32,32",
                                      "--out", str(out), "--sheet", str(tmp_path / "missing" / "q.png"),
                                      "--device", "cpu"])
    assert result.exit_code == 2 and "missing" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()  # refused before the query ran
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(InputError, match="needs matplotlib"):
        check_sheet_output(tmp_path / "q.png")


def test_noise_report_figure(tmp_path):
    vol = synthetic((3, 40, 48), 0)
    src = write_h5(tmp_path / "clean.h5", label=vol.label)
    result = CliRunner().invoke(cli, ["noise", f"{src}:label", f"{tmp_path}/noisy.h5:flip", "--flip", "0.3",
                                      "--report", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    figure = tmp_path / "noisy_flip_report.png"
    assert doc["report_figure"] == str(figure) and figure.is_file()
    image = plt_image.imread(figure)
    assert image.shape[0] > 100 and image.shape[1] > 2 * image.shape[0]
    # without --report no figure
    result = CliRunner().invoke(cli, ["noise", f"{src}:label", f"{tmp_path}/n2.zarr", "--flip", "0.3", "-q"])
    assert result.exit_code == 0 and not (tmp_path / "n2_report.png").exists()


def test_figure_path_and_example_section():
    assert report_figure_path("out/noisy.h5:grp/flip45").as_posix() == "out/noisy_grp_flip45_report.png"
    assert report_figure_path("noisy.zarr/skel").as_posix() == "noisy_skel_report.png"
    assert report_figure_path("noisy.ome.zarr").as_posix() == "noisy_report.png"
    big = np.arange(5 * 600 * 30).reshape(5, 600, 30)
    section, index = example_section(big)
    assert section.shape == (512, 30)
    np.testing.assert_array_equal(section, big[2, 44:556, :])
