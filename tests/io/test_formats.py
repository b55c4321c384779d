"""TIFF, slice folders, MRC and N5 read like HDF5: same values, lazily, with one-line errors.

Every file here is written by an independent writer (tifffile, Pillow, mrcfile, or the N5 spec
written out by hand), and what emseg reads is compared with the array that was written.
"""
from __future__ import annotations

import gzip
import json
import struct
import tracemalloc
from pathlib import Path

import h5py
import mrcfile
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from conftest import synthetic
from emseg.cli.main import cli
from emseg.errors import InputError
from emseg.io import describe_volume, open_volume, parse_spec, voxel_size_of
from emseg.io._formats import natural_key


def _stack(shape=(7, 33, 45), dtype=np.uint16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype)


# ------------------------------------------------------------------------------------- TIFF


def test_imagej_tiff_reads_lazily_with_its_voxel_size(tmp_path):
    data = _stack()
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 4.0, 1 / 4.0),
                     metadata={"spacing": 40.0, "unit": "nm", "axes": "ZYX"})
    with open_volume(str(path)) as vol:
        assert vol.shape == data.shape and vol.dtype == data.dtype
        np.testing.assert_array_equal(vol[2:5, 3:20, 7:9], data[2:5, 3:20, 7:9])
        np.testing.assert_array_equal(vol[-1], data[-1])
        np.testing.assert_array_equal(np.asarray(vol), data)
        assert voxel_size_of(vol) == pytest.approx((40.0, 4.0, 4.0))


def test_micron_calibration_is_converted_to_nm(tmp_path):
    data = _stack((3, 10, 12), np.uint8)
    path = tmp_path / "um.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 0.005, 1 / 0.005),
                     metadata={"spacing": 0.05, "unit": "micron", "axes": "ZYX"})
    with open_volume(str(path)) as vol:
        assert voxel_size_of(vol) == pytest.approx((50.0, 5.0, 5.0))


def test_ome_tiff_voxel_size(tmp_path):
    data = _stack((4, 16, 16), np.uint8)
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "ZYX", "PhysicalSizeX": 0.008, "PhysicalSizeY": 0.008,
                                                    "PhysicalSizeZ": 0.05})
    with open_volume(str(path)) as vol:
        np.testing.assert_array_equal(vol[...], data)
        assert voxel_size_of(vol) == pytest.approx((50.0, 8.0, 8.0))


@pytest.mark.parametrize("kwargs", [{"compression": "zlib"}, {"tile": (16, 16)}])
def test_compressed_or_tiled_tiff_reads_page_by_page(tmp_path, kwargs):
    data = _stack((5, 40, 48))
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, data, **kwargs)
    with open_volume(str(path)) as vol:
        assert vol.shape == data.shape
        assert vol.chunks is not None  # read through the page/tile view, not a memory map
        np.testing.assert_array_equal(vol[1:4, 5:30, 2:40], data[1:4, 5:30, 2:40])
        np.testing.assert_array_equal(vol[3], data[3])


def test_single_page_tiff_is_2d(tmp_path):
    data = _stack((1, 20, 30))[0]
    tifffile.imwrite(tmp_path / "one.tif", data)
    with open_volume(str(tmp_path / "one.tif")) as vol:
        assert vol.shape == (20, 30)
        np.testing.assert_array_equal(vol[...], data)


def _big_zero_tiff(path: Path, shape, compression=None):
    """A TIFF of zeros several times larger than what a test lets a reader hold at once."""
    plane = np.zeros(shape[1:], np.uint8)
    tifffile.imwrite(path, data=(plane for _ in range(shape[0])), shape=shape, dtype=np.uint8,
                     compression=compression)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_large_tiff_is_never_loaded_whole(tmp_path, compression):
    """Reading a 192 MiB stack section by section allocates about one section, not the stack."""
    shape = (48, 2048, 2048)
    path = tmp_path / "big.tif"
    _big_zero_tiff(path, shape, compression)
    section = shape[1] * shape[2]
    tracemalloc.start()
    try:
        with open_volume(str(path)) as vol:
            assert vol.shape == shape
            total = 0
            for z in range(0, shape[0], 8):
                total += int(vol[z].sum())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 0
    assert peak < 6 * section, f"peak {peak / 2**20:.1f} MiB for a {np.prod(shape) / 2**20:.0f} MiB stack"


def test_truncated_tiff_is_one_line(tmp_path):
    data = _stack((6, 40, 50), np.uint8)
    for name, kwargs in (("ij.tif", {"imagej": True}), ("z.tif", {"compression": "zlib"})):
        path = tmp_path / name
        tifffile.imwrite(path, data, **kwargs)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) * 2 // 3])
        with pytest.raises(InputError, match="truncated") as err:
            open_volume(str(path))
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_colour_tiff_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((8, 9, 3), np.uint8), photometric="rgb")
    with pytest.raises(InputError, match="colour"):
        open_volume(str(tmp_path / "rgb.tif"))


# ------------------------------------------------------------------------------ slice folders


def test_natural_order():
    names = ["z10.tif", "z2.tif", "z1.tif", "Z3.tif", "z100.tif"]
    assert sorted(names, key=natural_key) == ["z1.tif", "z2.tif", "Z3.tif", "z10.tif", "z100.tif"]


def test_folder_of_tiff_slices_in_natural_order(tmp_path):
    data = _stack((12, 21, 17))
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(12):  # unpadded numbers: lexical order would put 10 and 11 after 1
        tifffile.imwrite(folder / f"sec_{z}.tif", data[z], imagej=True, resolution=(1 / 5.0, 1 / 5.0),
                         metadata={"unit": "nm"})
    (folder / "notes.txt").write_text("not a slice")
    for spec in (str(folder), str(folder) + "/", str(folder / "sec_*.tif")):
        with open_volume(spec) as vol:
            assert vol.shape == data.shape
            np.testing.assert_array_equal(vol[...], data)
            np.testing.assert_array_equal(vol[3:11:2, 4:9, -3:], data[3:11:2, 4:9, -3:])
            np.testing.assert_array_equal(vol[10, 2], data[10, 2])
    with open_volume(str(folder)) as vol:  # one slice gives only the in-plane calibration
        assert vol.attrs["voxel_size_nm"] == pytest.approx([5.0, 5.0])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_slices(tmp_path, dtype):
    data = _stack((5, 13, 19), dtype)
    for z in range(5):
        Image.fromarray(data[z]).save(tmp_path / f"{z}.png")
    with open_volume(str(tmp_path / "*.png")) as vol:
        assert vol.dtype == dtype
        np.testing.assert_array_equal(vol[...], data)


def test_slices_of_different_shape_or_dtype_are_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for z in range(3):
        tifffile.imwrite(a / f"{z}.tif", np.zeros((10, 10 if z != 2 else 11), np.uint8))
        tifffile.imwrite(b / f"{z}.tif", np.zeros((10, 10), np.uint8 if z != 1 else np.uint16))
    with pytest.raises(InputError, match=r"2\.tif: slice of shape \(10, 11\)"):
        open_volume(str(a))
    with pytest.raises(InputError, match=r"1\.tif: .*dtype uint16"):
        open_volume(str(b))


def test_glob_matching_nothing_and_empty_folder(tmp_path):
    with pytest.raises(InputError, match="matches no file"):
        open_volume(str(tmp_path / "*.tif"))
    with pytest.raises(InputError, match="no .tif, .tiff or .png slice"):
        open_volume(str(tmp_path) + "/")


# ----------------------------------------------------------------------------------------- MRC


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_mrc_memory_mapped_with_header_voxel_size(tmp_path, dtype):
    data = _stack((6, 24, 31)).astype(dtype)
    path = tmp_path / "tomo.mrc"
    with mrcfile.new(str(path)) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = (12.0, 11.0, 30.0)  # x, y, z in Å
    with open_volume(str(path)) as vol:
        assert vol.shape == data.shape
        np.testing.assert_array_equal(vol[2:4, 1:20, 5:6], data[2:4, 1:20, 5:6])
        assert voxel_size_of(vol) == pytest.approx((3.0, 1.1, 1.2))


@pytest.mark.parametrize("order", ["<", ">"])
def test_whole_mrc_sections_read_in_one_call_agree_with_the_map(tmp_path, order):
    data = _stack((5, 12, 9), np.int16)
    with mrcfile.new(str(tmp_path / "v.mrc")) as mrc:
        mrc.set_data(data.astype(np.dtype(np.int16).newbyteorder(order)))
    with open_volume(str(tmp_path / "v.mrc")) as vol:
        for index in [2, -1, slice(1, 4), slice(None), Ellipsis, (slice(0, 2), slice(None), slice(None)),
                      (3, slice(2, 5)), slice(None, None, 2)]:
            got = vol[index]
            assert got.dtype == np.dtype(np.int16) and got.dtype.isnative
            np.testing.assert_array_equal(got, data[index])


def test_mrc_data_after_an_extended_header_and_a_2d_mrc(tmp_path):
    data = _stack((3, 10, 7)).astype(np.float32)
    with mrcfile.new(str(tmp_path / "ext.mrc")) as mrc:
        mrc.set_extended_header(np.arange(100, dtype=np.int32))  # 400 bytes between header and data
        mrc.set_data(data)
    with open_volume(str(tmp_path / "ext.mrc")) as vol:
        np.testing.assert_array_equal(vol[...], data)
    with mrcfile.new(str(tmp_path / "one.mrc")) as mrc:
        mrc.set_data(data[1])
    with open_volume(str(tmp_path / "one.mrc")) as vol:
        assert vol.shape == (10, 7)
        np.testing.assert_array_equal(vol[...], data[1])


def test_truncated_mrc_is_one_line(tmp_path):
    path = tmp_path / "cut.mrc"
    with mrcfile.new(str(path)) as mrc:
        mrc.set_data(np.zeros((4, 32, 32), np.float32))
    raw = path.read_bytes()
    path.write_bytes(raw[:-1000])
    with pytest.raises(InputError, match="not a readable MRC") as err:
        open_volume(str(path))
    assert str(path) in str(err.value)


# ------------------------------------------------------------------------------------------ N5


def _write_n5(root: Path, key: str, data: np.ndarray, block, compression: str, attrs: dict | None = None):
    """An N5 dataset written from the specification: dimensions x first, big-endian blocks with
    a header (mode 0, ndim, block size), edge blocks cut to the volume, gzip or raw."""
    root.mkdir(exist_ok=True)
    (root / "attributes.json").write_text(json.dumps({"n5": "4.0.0"}))
    folder = root / key
    folder.mkdir(parents=True)
    meta = {"dimensions": list(reversed(data.shape)), "blockSize": list(reversed(block)),
            "dataType": data.dtype.name, "compression": {"type": compression}}
    meta.update(attrs or {})
    (folder / "attributes.json").write_text(json.dumps(meta))
    grid = [range(0, s, b) for s, b in zip(data.shape, block)]
    for start in np.array(np.meshgrid(*grid, indexing="ij")).reshape(data.ndim, -1).T:
        box = data[tuple(slice(a, a + b) for a, b in zip(start, block))]
        header = struct.pack(">HH", 0, data.ndim) + b"".join(struct.pack(">I", s) for s in reversed(box.shape))
        payload = box.astype(box.dtype.newbyteorder(">")).tobytes(order="C")
        if compression == "gzip":
            payload = gzip.compress(payload)
        index = [str(a // b) for a, b in zip(start, block)]
        where = folder.joinpath(*reversed(index))
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_bytes(header + payload)


@pytest.mark.parametrize("compression", ["raw", "gzip"])
def test_n5_written_from_the_spec_reads_in_zyx(tmp_path, compression):
    pytest.importorskip("tensorstore")
    data = _stack((9, 14, 23))
    _write_n5(tmp_path / "vol.n5", "volumes/raw", data, (4, 8, 8), compression,
              {"resolution": [4.0, 4.0, 40.0]})
    with open_volume(str(tmp_path / "vol.n5/volumes/raw")) as vol:
        assert vol.shape == data.shape and vol.chunks == (4, 8, 8)
        np.testing.assert_array_equal(vol[...], data)
        np.testing.assert_array_equal(vol[3:8, 5:14, 20:], data[3:8, 5:14, 20:])
        np.testing.assert_array_equal(vol[-1, -3:, :-2], data[-1, -3:, :-2])
        assert voxel_size_of(vol) == pytest.approx((40.0, 4.0, 4.0))


def test_n5_missing_attributes_is_one_line(tmp_path):
    data = _stack((4, 8, 8))
    _write_n5(tmp_path / "vol.n5", "raw", data, (4, 8, 8), "raw")
    (tmp_path / "vol.n5/raw/attributes.json").unlink()
    with pytest.raises(InputError, match="no attributes.json") as err:
        open_volume(str(tmp_path / "vol.n5/raw"))
    assert "vol.n5/raw" in str(err.value)


# ---------------------------------------------------------------------------- specs and info


def test_spec_formats(tmp_path):
    (tmp_path / "d").mkdir()
    assert parse_spec("a.tiff").fmt == "tif" and parse_spec("a.MRC").fmt == "mrc"
    assert parse_spec("x.n5/a/b").key == "a/b" and parse_spec("x.n5").key == ""
    assert parse_spec(str(tmp_path / "d")).fmt == "slices" and parse_spec("s/").fmt == "slices"
    assert parse_spec("s/*.tif").fmt == "slices"
    with pytest.raises(InputError, match="unknown volume format"):
        parse_spec("volume.raw")


def test_one_volume_formats_have_no_datasets(tmp_path):
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((2, 8, 8), np.uint8))
    spec = parse_spec(str(tmp_path / "s.tif"))
    assert open_volume(spec.sibling("info"), allow_missing_key=True) is None


def test_tiff_reads_like_the_same_volume_in_hdf5(tmp_path):
    data = _stack((5, 30, 40))
    tifffile.imwrite(tmp_path / "s.tif", data)
    with h5py.File(tmp_path / "s.h5", "w") as fh:
        fh["raw"] = data
    a, b = describe_volume(str(tmp_path / "s.tif")), describe_volume(str(tmp_path / "s.h5") + ":raw")
    assert (a.shape, a.dtype, a.min, a.max) == (b.shape, b.dtype, b.min, b.max)
    assert (a.min, a.max) == (float(data.min()), float(data.max()))
    assert a.format == "TIFF" and b.format == "HDF5"


def test_info_command(tmp_path):
    data = _stack((3, 10, 12)).astype(np.float32)
    data[1, 2, 3] = np.nan
    with mrcfile.new(str(tmp_path / "m.mrc")) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 20.0
    tifffile.imwrite(tmp_path / "t.tif", data[0].astype(np.uint16))
    runner = CliRunner()
    res = runner.invoke(cli, ["--json", "info", str(tmp_path / "m.mrc"), str(tmp_path / "t.tif")])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    mrc_info, tif_info = doc["volumes"]
    assert mrc_info["format"] == "MRC" and mrc_info["shape"] == [3, 10, 12]
    assert mrc_info["voxel_size_nm"] == pytest.approx([2.0, 2.0, 2.0]) and mrc_info["nonfinite"] == 1
    assert mrc_info["min"] == pytest.approx(float(np.nanmin(data)))
    assert tif_info["shape"] == [10, 12] and tif_info["dtype"] == "uint16"
    bad = runner.invoke(cli, ["info", str(tmp_path / "missing.tif")])
    assert bad.exit_code == 2 and "missing.tif: no such file" in bad.stderr


@pytest.fixture
def random_model(tmp_path) -> Path:
    """A small random 2D U-Net checkpoint with 3 classes."""
    import torch

    from emseg.models import build_model
    from emseg.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = dict(ndim=2, in_channels=1, out_channels=3, depth=2, base_width=4, norm="batch")
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"model": build_model(config).state_dict(), "model_config": config,
                           "config": {"patch_shape": [1, 32, 32]}})
    return path


def test_predict_reads_a_tiff_folder(tmp_path, random_model):
    """The same sections as a folder of TIFF slices and as HDF5 predict the same probabilities."""
    raw = synthetic((3, 64, 64), 2).raw
    folder = tmp_path / "sl"
    folder.mkdir()
    for z in range(raw.shape[0]):
        tifffile.imwrite(folder / f"{z}.tif", raw[z])
    with h5py.File(tmp_path / "same.h5", "w") as fh:
        fh["raw"] = raw
    runner = CliRunner()
    for spec, out in ((str(folder), "a.zarr"), (f"{tmp_path / 'same.h5'}:raw", "b.zarr")):
        res = runner.invoke(cli, ["--device", "cpu", "--precision", "fp32", "predict", str(random_model), spec,
                                  str(tmp_path / out)])
        assert res.exit_code == 0, res.output
    with open_volume(str(tmp_path / "a.zarr")) as a, open_volume(str(tmp_path / "b.zarr")) as b:
        np.testing.assert_array_equal(a[...], b[...])


# ------------------------------------------------------------------------------- TIFF outputs


def _predict(runner, model, spec, out, *extra):
    res = runner.invoke(cli, ["--device", "cpu", "--precision", "fp32", "predict", str(model), spec, str(out),
                              *extra])
    assert res.exit_code == 0, res.output
    return res


def test_predict_writes_tiffs_that_imagej_readers_open(tmp_path, random_model):
    """Labels and probabilities as ImageJ hyperstacks with the source's voxel size: tifffile reads
    them as ImageJ files with the same values as the zarr output, and emseg reads them back."""
    raw = synthetic((3, 64, 64), 2).raw
    with h5py.File(tmp_path / "in.h5", "w") as fh:
        fh["raw"] = raw
        fh.attrs["voxel_size_nm"] = [50.0, 5.0, 5.0]
    runner, spec = CliRunner(), f"{tmp_path / 'in.h5'}:raw"
    _predict(runner, random_model, spec, tmp_path / "ref.zarr")
    _predict(runner, random_model, spec, tmp_path / "p.tif")
    _predict(runner, random_model, spec, tmp_path / "l.tif", "--output-type", "labels")
    with open_volume(str(tmp_path / "ref.zarr")) as ref:
        probs = ref[...]
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        assert tif.is_imagej and not tif.is_bigtiff
        assert tif.series[0].axes == "ZCYX" and tif.imagej_metadata["channels"] == 3
        assert tif.imagej_metadata["spacing"] == pytest.approx(50.0) and tif.imagej_metadata["unit"] == "nm"
        assert tif.pages[0].tags["XResolution"].value == (1, 5) or \
            tif.pages[0].tags["XResolution"].value[1] / tif.pages[0].tags["XResolution"].value[0] == pytest.approx(5.0)
        np.testing.assert_array_equal(tif.asarray(), np.moveaxis(probs, 0, 1))
    with tifffile.TiffFile(tmp_path / "l.tif") as tif:
        assert tif.is_imagej and tif.series[0].axes == "ZYX"
        np.testing.assert_array_equal(tif.asarray(), np.argmax(probs, axis=0))
    with open_volume(str(tmp_path / "p.tif")) as back:
        assert back.shape == probs.shape and back.attrs["n_classes"] == 3
        np.testing.assert_array_equal(back[...], probs)
        assert voxel_size_of(back) == pytest.approx((50.0, 5.0, 5.0))
    res = runner.invoke(cli, ["--json", "evaluate", str(tmp_path / "p.tif"), str(tmp_path / "l.tif")])
    assert res.exit_code == 0 and json.loads(res.stdout)["mean_jaccard"] == pytest.approx(1.0)


def test_uint8_probabilities_everywhere(tmp_path, random_model):
    raw = synthetic((3, 64, 64), 2).raw
    tifffile.imwrite(tmp_path / "in.tif", raw, photometric="minisblack")
    runner = CliRunner()
    _predict(runner, random_model, str(tmp_path / "in.tif"), tmp_path / "f.zarr")
    _predict(runner, random_model, str(tmp_path / "in.tif"), tmp_path / "u.zarr", "--dtype", "uint8")
    _predict(runner, random_model, str(tmp_path / "in.tif"), tmp_path / "u.tif", "--dtype", "uint8")
    with open_volume(str(tmp_path / "f.zarr")) as f, open_volume(str(tmp_path / "u.zarr")) as u, \
            open_volume(str(tmp_path / "u.tif")) as t:
        assert u.dtype == np.uint8 and u.attrs["scale"] == pytest.approx(1 / 255)
        assert np.abs(u[...] / 255.0 - f[...]).max() <= 0.5 / 255 + 1e-6
        np.testing.assert_array_equal(t[...], u[...])


def test_bigtiff_past_the_limit_keeps_the_imagej_description(tmp_path):
    from emseg.io._tiff_write import TiffOutputVolume

    data = _stack((4, 32, 48), np.uint16)
    out = TiffOutputVolume(tmp_path / "big.tif", tmp_path / ".big.tif.tmp", data.shape, data.dtype,
                           voxel_size=(30.0, 3.0, 3.0), bigtiff_bytes=data.nbytes - 1)
    with out:
        for z in (3, 0, 2, 1):  # any order: the file is a memory map
            out[z] = data[z]
    assert not (tmp_path / ".big.tif.tmp").exists()
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        assert tif.is_bigtiff and tif.is_imagej
        np.testing.assert_array_equal(tif.asarray(), data)
    with open_volume(str(tmp_path / "big.tif")) as back:
        assert voxel_size_of(back) == pytest.approx((30.0, 3.0, 3.0))


def test_failed_tiff_output_leaves_the_previous_file(tmp_path):
    from emseg.io import create_volume

    path = tmp_path / "l.tif"
    tifffile.imwrite(path, np.ones((2, 8, 8), np.uint8))
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with create_volume(str(path), (2, 8, 8), np.uint8, overwrite=True) as out:
            out[0] = 7
            raise RuntimeError("interrupted")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["l.tif"]
    with pytest.raises(InputError, match="already exists"):
        create_volume(str(path), (2, 8, 8), np.uint8)


# ------------------------------------------------------------------ handles, layouts, voxel axes


def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_tiff_output_keeps_x_and_y_voxel_sizes_apart(tmp_path):
    from emseg.io._tiff_write import TiffOutputVolume

    data = _stack((2, 8, 12), np.uint16)
    with TiffOutputVolume(tmp_path / "v.tif", tmp_path / ".v.tmp", data.shape, data.dtype,
                          voxel_size=(30.0, 4.0, 5.0)) as out:
        out[...] = data
    with tifffile.TiffFile(tmp_path / "v.tif") as tif:
        x, y = tif.pages[0].tags["XResolution"].value, tif.pages[0].tags["YResolution"].value
        assert x[1] / x[0] == pytest.approx(5.0) and y[1] / y[0] == pytest.approx(4.0)
    with open_volume(str(tmp_path / "v.tif")) as vol:
        assert voxel_size_of(vol) == pytest.approx((30.0, 4.0, 5.0))


@pytest.mark.parametrize("shape", [(1, 3, 16, 16), (2, 1, 16, 16), (1, 16, 16)])
def test_emseg_tiffs_come_back_with_every_axis(tmp_path, shape):
    from emseg.io import create_volume

    data = np.random.default_rng(0).random(shape).astype(np.float32)
    with create_volume(str(tmp_path / "p.tif"), shape, np.float32,
                       attrs={"output_type": "probabilities", "n_classes": shape[0]}) as out:
        out[...] = data
    with open_volume(str(tmp_path / "p.tif")) as vol:
        assert vol.shape == shape and "_layout" not in vol.attrs
        np.testing.assert_array_equal(vol[...], data)


def test_closing_tiff_volumes_releases_their_files(tmp_path):
    from emseg.io._tiff_read import OPEN_FDS, OPEN_MAPS

    import resource
    assert 64 <= OPEN_FDS <= max(64, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 8)
    tifffile.imwrite(tmp_path / "one.tif", _stack((3, 8, 8), np.uint8), photometric="minisblack")
    folder = tmp_path / "many"
    folder.mkdir()
    n = max(OPEN_MAPS, OPEN_FDS) + 40
    for z in range(n):
        tifffile.imwrite(folder / f"{z}.tif", np.full((4, 5), z % 250, np.uint8))
    before = _open_fds()
    for _ in range(3):
        with open_volume(str(tmp_path / "one.tif")) as vol:
            vol[1]
    assert _open_fds() == before
    with open_volume(str(folder)) as vol:
        assert [int(vol[z, 0, 0]) for z in range(n)] == [z % 250 for z in range(n)]  # rows read: descriptors
        assert _open_fds() - before <= OPEN_FDS + 1  # descriptors beyond the bound are closed
        assert [int(vol[z, ::2, 0][0]) for z in range(n)] == [z % 250 for z in range(n)]  # strided: maps
        assert _open_fds() - before <= OPEN_FDS + OPEN_MAPS + 1  # maps beyond theirs too
    assert _open_fds() == before


def test_slice_folders_take_numpy_indexing(tmp_path):
    data = _stack((5, 7, 9), np.uint8)
    for z in range(5):
        tifffile.imwrite(tmp_path / f"{z}.tif", data[z])
    mask = np.array([True, False, True, False, False])
    with open_volume(str(tmp_path) + "/") as vol:
        np.testing.assert_array_equal(vol[mask], data[mask])
        np.testing.assert_array_equal(vol[[4, -1, 0]], data[[4, -1, 0]])
        with pytest.raises(IndexError):
            vol[[5]]


def test_evaluate_scales_one_channel_uint8_probabilities(tmp_path):
    from emseg.semantic.evaluation import evaluate_volumes

    probs = np.full((1, 2, 8, 8), 0.1, np.float32)
    probs[0, :, :4] = 0.9
    gt = np.zeros((2, 8, 8), np.int64)
    gt[:, :4] = 1
    with h5py.File(tmp_path / "p.h5", "w") as fh:
        fh["f"] = probs
        fh["u"] = np.rint(probs * 255).astype(np.uint8)
        fh["u"].attrs["scale"] = 1 / 255
        fh["gt"] = gt
    with open_volume(f"{tmp_path}/p.h5:f") as f, open_volume(f"{tmp_path}/p.h5:u") as u, \
            open_volume(f"{tmp_path}/p.h5:gt") as g:
        a, b = evaluate_volumes(f, g, n_classes=2), evaluate_volumes(u, g, n_classes=2)
    assert list(a.jaccard) == list(b.jaccard) == [1.0, 1.0]


@pytest.mark.parametrize("name, kwargs, plain", [
    ("u8", {}, True), ("u16 big-endian", {"byteorder": ">"}, True), ("strips", {"rowsperstrip": 7}, True),
    ("strip arrays past the first read", {"rowsperstrip": 1}, True),
    ("imagej", {"imagej": True}, True), ("zlib", {"compression": "zlib"}, False), ("tiled", {"tile": (16, 16)}, False),
    ("bigtiff", {"bigtiff": True}, False)])
def test_the_light_header_reader_agrees_with_tifffile_or_declines(tmp_path, name, kwargs, plain):
    from emseg.io._tiff_layout import plain_tiff_layout

    dtype = np.uint16 if "u16" in name else np.uint8
    data = _stack((1, 1500 if "past" in name else 64, 48), dtype)[0]  # 1500 strips: 12 kB of offsets and counts
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, data, **kwargs)
    layout = plain_tiff_layout(path)
    assert (layout is not None) == plain
    if plain:
        shape, found, (offset, order) = layout
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            assert shape == page.shape and found == page.dtype and offset == page.dataoffsets[0]
        np.testing.assert_array_equal(np.memmap(path, dtype=found.newbyteorder(order), mode="r", offset=offset,
                                                shape=shape), data)
        with open_volume(str(tmp_path) + "/") as vol:  # the whole section read in one call
            np.testing.assert_array_equal(vol[0], data)


@pytest.mark.parametrize("rows", [40, 1500])  # 1500 one-row strips: the first directory lies past the first read
def test_slices_sharing_the_first_slices_header_share_its_layout(tmp_path, rows):
    data = _stack((4, rows, 24), np.uint8)
    for z in range(4):
        kwargs = {"rowsperstrip": 7} if z == 2 else ({"rowsperstrip": 1} if rows == 1500 else {})
        tifffile.imwrite(tmp_path / f"{z}.tif", data[z], **kwargs)  # slice 2: another header, another layout
    with open_volume(str(tmp_path) + "/") as vol:
        np.testing.assert_array_equal(vol[...], data)
        np.testing.assert_array_equal(vol[:, 5:9, 3:20], data[:, 5:9, 3:20])
        for index in [(2, 7), (1, slice(-3, None)), (0, slice(5, 9), slice(None, None, 2)), (3, -1, 4),
                      (2, slice(9, 5))]:  # rows read in one call, or cut from the map
            np.testing.assert_array_equal(vol[index], data[index])


def test_whole_sections_of_big_endian_slices(tmp_path):
    data = _stack((3, 12, 10), np.uint16)
    for z in range(3):
        tifffile.imwrite(tmp_path / f"{z}.tif", data[z], byteorder=">")
    with open_volume(str(tmp_path) + "/") as vol:
        whole = vol[...]
        assert whole.dtype == np.dtype(np.uint16) and whole.dtype.isnative
        np.testing.assert_array_equal(whole, data)
        np.testing.assert_array_equal(vol[1, 3:5], data[1, 3:5])
