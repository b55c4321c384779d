"""OME-Zarr 0.5 outputs and inputs: every written store is validated with ome-zarr-models, pyramid
levels are checked against brute-force pooling, and the commands write and read it end to end."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from conftest import synthetic, tiny_train_config, to_toml, write_h5
from emseg.cli.main import cli
from emseg.errors import InputError
from emseg.io import create_volume, open_volume, voxel_size_of
from emseg.io import _ome
from emseg.io.ome import plan_factors, write_ome

models = pytest.importorskip("ome_zarr_models.v05")

VOXEL = (50.0, 4.6, 4.6)


def _group(path):
    return zarr.open_group(store=str(path), mode="r")


def _validated_image(path):
    """The store at ``path`` parsed by ome-zarr-models (raises when it breaks the 0.5 spec)."""
    return models.Image.from_zarr(_group(path))


def _mean_pool(a, factor):
    """Reference pooling by explicit loops over the output voxels (edge boxes: repeated last voxel)."""
    out_shape = [-(-s // f) for s, f in zip(a.shape, factor)]
    out = np.empty(out_shape, dtype=np.float64)
    for idx in np.ndindex(*out_shape):
        box = []
        for i, f, s in zip(idx, factor, a.shape):
            box.append([min(i * f + k, s - 1) for k in range(f)])
        out[idx] = a[np.ix_(*box)].mean()
    return out


def _h5_with_voxel(tmp_path, raw):
    path = write_h5(tmp_path / "in.h5", raw=raw)
    with h5py.File(path, "a") as fh:
        fh.attrs["voxel_size_nm"] = np.array(VOXEL)
    return path


def test_probabilities_image_pyramid_units_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    src = _h5_with_voxel(tmp_path, rng.integers(0, 255, (3, 70, 67), dtype=np.uint8))
    probs = rng.random((2, 3, 70, 67)).astype(np.float32)
    out = tmp_path / "p.ome.zarr"
    with create_volume(str(out), probs.shape, "float32", attrs={"source": f"{src}:raw", "n_classes": 2}) as dst:
        dst[...] = probs
    image = _validated_image(out)
    ms = image.ome_attributes.multiscales[0]
    assert [(a.name, a.type) for a in ms.axes] == [("c", "channel"), ("z", "space"), ("y", "space"), ("x", "space")]
    assert [a.unit for a in ms.axes[1:]] == ["nanometer"] * 3
    assert len(ms.datasets) == 2  # 70x67 -> 35x34 (>= 32), the next would be 18x17
    level1 = np.asarray(_group(out)["1"])
    assert level1.shape == (2, 3, 35, 34)  # z is 50 nm, still longer than 9.2: not pooled
    np.testing.assert_allclose(level1, _mean_pool(probs, (1, 1, 2, 2)), rtol=1e-6)
    meta = _group(out).attrs["ome"]["multiscales"][0]["datasets"]
    assert meta[0]["coordinateTransformations"][0]["scale"] == [1.0, *VOXEL]
    assert meta[1]["coordinateTransformations"][0]["scale"] == pytest.approx([1.0, 50.0, 9.2, 9.2])
    assert meta[1]["coordinateTransformations"][1]["translation"] == pytest.approx([0, 0, 2.3, 2.3])
    with open_volume(str(out)) as vol:  # level 0 by default, voxel size read back in nm
        np.testing.assert_array_equal(vol[...], probs)
        assert vol.attrs["n_classes"] == 2 and voxel_size_of(vol) == pytest.approx(VOXEL)

    labels = probs.argmax(0).astype(np.uint8) + 1
    with create_volume(f"{out}/labels/seg", labels.shape, "uint8") as dst:
        dst[...] = labels
    image = _validated_image(out)
    assert image.labels is not None
    group = _group(out / "labels" / "seg")
    label_image = models.ImageLabel.from_zarr(group)
    label_ms = label_image.ome_attributes.multiscales[0]
    assert len(label_ms.datasets) == len(ms.datasets)
    np.testing.assert_array_equal(np.asarray(group["1"]), labels[:, ::2, ::2])
    colours = {c.label_value for c in label_image.ome_attributes.image_label.colors}
    assert colours == set(np.unique(labels).tolist())
    assert _group(out / "labels").attrs["ome"]["labels"] == ["seg"]
    with open_volume(f"{out}/labels/seg/1") as vol:
        assert vol.shape == (3, 35, 34) and voxel_size_of(vol) == pytest.approx((50.0, 9.2, 9.2))


def test_label_root_store_is_an_image_label(tmp_path):
    labels = synthetic((4, 64, 64), 0).label
    out = tmp_path / "seg.ome.zarr"
    with create_volume(str(out), labels.shape, labels.dtype) as dst:
        dst[...] = labels
    group = _group(out)
    models.ImageLabel.from_zarr(group)
    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    assert len(datasets) == 2
    # no voxel size: unit-less, and z (scale 1) is pooled with y, x
    assert np.array_equal(np.asarray(group["1"]), labels[::2, ::2, ::2])
    assert np.issubdtype(group["0"].dtype, np.integer)


def test_pyramid_is_blockwise_with_bounded_reads(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    data = rng.random((2, 130, 97)).astype(np.float32)
    reads = []

    class Counting:
        def __init__(self, a):
            self.a, self.shape, self.dtype = a, a.shape, a.dtype

        def __getitem__(self, box):
            block = self.a[box]
            reads.append(block.size)
            return block

    monkeypatch.setattr(_ome, "BLOCK_VOXELS", 2048)
    dst = zarr.create_array(store=str(tmp_path / "d.zarr"), shape=(2, 65, 49), dtype="float32", chunks=(1, 16, 16))
    _ome.downsample_level(Counting(data), dst, (1, 2, 2), labels=False)
    np.testing.assert_allclose(np.asarray(dst), _mean_pool(data, (1, 2, 2)), rtol=1e-6)
    assert len(reads) > 4 and max(reads) <= 2048 * 4  # each read covers one output block, pooled 2 x 2


def test_plan_factors_follows_anisotropy():
    # VNC-like: z is pooled once y, x voxels grow past it
    factors = plan_factors((20, 1024, 1024), (50.0, 4.6, 4.6), channel=False)
    assert factors[:3] == [(1, 2, 2)] * 3 and factors[3] == (2, 2, 2)
    assert len(factors) + 1 == 6  # MAX_LEVELS
    assert plan_factors((1, 40, 40), (1.0, 1.0, 1.0), channel=False) == []


def test_ome_input_levels_and_bad_input(tmp_path):
    data = np.random.default_rng(2).random((1, 64, 64)).astype(np.float32)
    out = write_ome(tmp_path / "i.ome.zarr", image=data, voxel_size=VOXEL)
    with open_volume(f"{out}/1") as vol:
        assert vol.shape == (1, 32, 32)
    with pytest.raises(InputError, match=r"no level '3' \(levels: 0, 1\)"):
        open_volume(f"{out}/3")
    bare = tmp_path / "bare.ome.zarr"
    zarr.open_group(store=str(bare), mode="w")
    with pytest.raises(InputError, match="no 'multiscales'"):
        open_volume(str(bare))


# --------------------------------------------------------------------------- commands


@pytest.fixture
def trained(tmp_path, synthetic_h5):
    (tmp_path / "train.toml").write_text(to_toml(tiny_train_config(synthetic_h5, steps=2)))
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "train.toml"), "--out", str(tmp_path / "run"),
                                      "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    return tmp_path / "run" / "best.pt"


def test_predict_writes_ome_zarr_matching_plain_zarr(tmp_path, trained, synthetic_h5):
    with h5py.File(synthetic_h5, "a") as fh:
        fh.attrs["voxel_size_nm"] = np.array(VOXEL)
    runner = CliRunner()
    base = ["predict", str(trained), f"{synthetic_h5}:raw"]
    for out in ("plain.zarr", "p.ome.zarr"):
        result = runner.invoke(cli, [*base, str(tmp_path / out), "--device", "cpu", "-q"])
        assert result.exit_code == 0, result.output
    _validated_image(tmp_path / "p.ome.zarr")
    with open_volume(str(tmp_path / "plain.zarr")) as a, open_volume(str(tmp_path / "p.ome.zarr")) as b:
        np.testing.assert_array_equal(a[...], b[...])
        assert voxel_size_of(b) == pytest.approx(VOXEL)
    result = runner.invoke(cli, [*base, f"{tmp_path}/p.ome.zarr/labels/seg", "--output-type", "labels",
                                 "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    with open_volume(str(tmp_path / "plain.zarr")) as a, open_volume(f"{tmp_path}/p.ome.zarr/labels/seg") as s:
        np.testing.assert_array_equal(s[...], a[...].argmax(0))
    models.ImageLabel.from_zarr(_group(tmp_path / "p.ome.zarr" / "labels" / "seg"))
    result = runner.invoke(cli, [*base, str(tmp_path / "r.ome.zarr"), "--resume", "--device", "cpu"])
    assert result.exit_code == 2 and "plain zarr" in result.stderr
    assert not (tmp_path / "r.ome.zarr").exists()


def test_cli_reads_ome_input_and_refuses_bad_ones(tmp_path, trained):
    raw = synthetic((4, 64, 64), 0).raw
    src = write_ome(tmp_path / "raw.ome.zarr", image=raw, voxel_size=VOXEL)
    runner = CliRunner()
    result = runner.invoke(cli, ["predict", str(trained), str(src), str(tmp_path / "a.zarr"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    h5 = write_h5(tmp_path / "raw.h5", raw=raw)
    result = runner.invoke(cli, ["predict", str(trained), f"{h5}:raw", str(tmp_path / "b.zarr"), "--device", "cpu"])
    with open_volume(str(tmp_path / "a.zarr")) as a, open_volume(str(tmp_path / "b.zarr")) as b:
        np.testing.assert_array_equal(a[...], b[...])
    zarr.open_group(store=str(tmp_path / "bare.ome.zarr"), mode="w")
    for bad, words in ((f"{src}/5", "no level '5'"), (str(tmp_path / "bare.ome.zarr"), "no 'multiscales'")):
        result = runner.invoke(cli, ["predict", str(trained), bad, str(tmp_path / "c.ome.zarr"), "--device", "cpu"])
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], result.stderr
        assert not (tmp_path / "c.ome.zarr").exists()


def test_noise_writes_ome_labels(tmp_path):
    label = synthetic((4, 64, 64), 0).label
    src = _h5_with_voxel(tmp_path, label)
    runner = CliRunner()
    out = tmp_path / "noisy.ome.zarr"
    result = runner.invoke(cli, ["noise", f"{src}:raw", str(out), "--dilate", "1"])
    assert result.exit_code == 0, result.output
    plain = tmp_path / "noisy.zarr"
    assert runner.invoke(cli, ["noise", f"{src}:raw", str(plain), "--dilate", "1"]).exit_code == 0
    group = _group(out)
    models.ImageLabel.from_zarr(group)
    np.testing.assert_array_equal(np.asarray(group["0"]), np.asarray(zarr.open_array(store=str(plain), mode="r")))
    assert group.attrs["ome"]["multiscales"][0]["axes"][0]["unit"] == "nanometer"
    result = runner.invoke(cli, ["noise", f"{src}:raw", str(tmp_path / "c.ome.zarr"), "--dilate", "1",
                                 "--scheduler", "local"])
    assert result.exit_code == 2 and not (tmp_path / "c.ome.zarr").exists()
