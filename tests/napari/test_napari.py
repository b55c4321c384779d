"""The napari plugin: readers and the crops writer as plain functions, then the whole annotation loop
in a real headless napari viewer (predict, query, open, paint, save, train on the painted crop)."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import select
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import synthetic, tiny_train_config, to_toml, write_h5
from emseg.cli.main import cli
from emseg.errors import InputError
from emseg.io import open_volume, write_ome
from emseg.napari import (
    crops_layers,
    file_kind,
    from_layer_labels,
    labels_from_layer,
    output_layers,
    queries_layers,
    read_crops,
    to_layer_labels,
    write_crop_labels,
)
from emseg.napari._plugin import get_reader, write_instances, write_labels

VOXEL = (50.0, 4.6, 4.6)


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """A trained tiny network, its OME-Zarr prediction, a query JSON and the exported crops."""
    tmp = tmp_path_factory.mktemp("loop")
    vol = synthetic((4, 64, 64), 0)
    raw_h5 = write_h5(tmp / "train.h5", raw=vol.raw, label=vol.label)
    with h5py.File(raw_h5, "a") as fh:
        fh.attrs["voxel_size_nm"] = np.array(VOXEL)
    (tmp / "train.toml").write_text(to_toml(tiny_train_config(raw_h5, steps=2)))
    runner = CliRunner()
    run = runner.invoke(cli, ["train", str(tmp / "train.toml"), "--out", str(tmp / "run"), "--device", "cpu", "-q"])
    assert run.exit_code == 0, run.output
    model = tmp / "run" / "best.pt"
    pred = runner.invoke(cli, ["predict", str(model), f"{raw_h5}:raw", str(tmp / "pred.ome.zarr"), "--device", "cpu",
                               "-q"])
    assert pred.exit_code == 0, pred.output
    query = runner.invoke(cli, ["query", str(model), f"{raw_h5}:raw", "--n", "3", "--patch", "1,32,32",
                                "--out", str(tmp / "queries.json"), "--export", str(tmp / "crops.h5"),
                                "--device", "cpu", "-q"])
    assert query.exit_code == 0, query.output
    return {"tmp": tmp, "raw_h5": raw_h5, "model": model, "raw": np.asarray(vol.raw)}


# --------------------------------------------------------------------------- plain functions


def test_label_values_round_trip():
    label = np.array([[-1, 0, 1], [2, -1, 0]], dtype=np.int16)
    shown = to_layer_labels(label)
    assert shown.tolist() == [[0, 1, 2], [3, 0, 1]]  # napari 0 is the unlabelled -1
    np.testing.assert_array_equal(from_layer_labels(shown), label)
    with pytest.raises(InputError, match="negative"):
        from_layer_labels(np.array([-1]))


def test_file_kinds_and_reader_declines_foreign_files(loop, tmp_path):
    tmp = loop["tmp"]
    assert file_kind(tmp / "queries.json") == "queries"
    assert file_kind(tmp / "crops.h5") == "crops"
    assert file_kind(tmp / "pred.ome.zarr") == "output"
    foreign = write_h5(tmp_path / "other.h5", raw=np.zeros((2, 2)))
    (tmp_path / "x.json").write_text('{"a": 1}')
    assert file_kind(foreign) is None and file_kind(tmp_path / "x.json") is None
    assert get_reader(str(foreign)) is None and get_reader(str(tmp / "crops.h5")) is not None


def test_prediction_layers_carry_the_voxel_size(loop, tmp_path):
    tmp = loop["tmp"]
    layers = output_layers(tmp / "pred.ome.zarr")
    (data, meta, kind), = layers
    assert kind == "image" and meta["channel_axis"] == 0 and len(meta["name"]) == 3
    levels = data if meta.get("multiscale") else [data]
    assert tuple(levels[0].shape) == (3, 4, 64, 64)
    assert meta["scale"] == pytest.approx(VOXEL)
    # h5 output of predict: the scale comes from the raw volume named in its `source` attribute
    result = CliRunner().invoke(cli, ["predict", str(loop["model"]), f"{loop['raw_h5']}:raw",
                                      f"{tmp_path}/p.h5:seg", "--output-type", "labels", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    (seg, seg_meta, seg_kind), = output_layers(tmp_path / "p.h5")
    assert seg_kind == "labels" and seg_meta["scale"] == pytest.approx(VOXEL)
    np.testing.assert_array_equal(np.asarray(seg[...]), np.asarray(levels[0][...]).argmax(0))
    # an OME-Zarr with an image and a label image: an image per channel plus a labels layer
    probs = np.random.default_rng(0).random((2, 1, 40, 40)).astype(np.float32)
    store = write_ome(tmp_path / "two.ome.zarr", image=probs, channel=True, voxel_size=VOXEL,
                      labels={"seg": probs.argmax(0).astype(np.uint8)})
    (img, img_meta, img_kind), (seg2, seg2_meta, seg2_kind) = output_layers(store)
    assert (img_kind, seg2_kind) == ("image", "labels") and seg2_meta["name"] == "seg"
    assert seg2_meta["scale"] == pytest.approx(VOXEL)
    seg2_0 = seg2[0] if seg2_meta.get("multiscale") else seg2
    np.testing.assert_array_equal(np.asarray(seg2_0[...]), probs.argmax(0))


def test_tiff_outputs_and_mrc_volumes_open_and_foreign_tiffs_are_left_to_napari(loop, tmp_path):
    import mrcfile
    import tifffile

    result = CliRunner().invoke(cli, ["predict", str(loop["model"]), f"{loop['raw_h5']}:raw", f"{tmp_path}/p.tif",
                                      "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert file_kind(tmp_path / "p.tif") == "output" and get_reader(str(tmp_path / "p.tif")) is not None
    (probs, meta, kind), = output_layers(tmp_path / "p.tif")
    assert kind == "image" and meta["channel_axis"] == 0 and tuple(probs.shape) == (3, 4, 64, 64)
    assert meta["scale"] == pytest.approx(VOXEL)
    tifffile.imwrite(tmp_path / "foreign.tif", loop["raw"])
    assert file_kind(tmp_path / "foreign.tif") is None and get_reader(str(tmp_path / "foreign.tif")) is None
    with mrcfile.new(str(tmp_path / "raw.mrc")) as mrc:
        mrc.set_data(loop["raw"].astype(np.int16))
        mrc.voxel_size = (VOXEL[2] * 10, VOXEL[1] * 10, VOXEL[0] * 10)
    (data, meta, kind), = get_reader(str(tmp_path / "raw.mrc"))(str(tmp_path / "raw.mrc"))
    assert kind == "image" and meta["scale"] == pytest.approx(VOXEL)
    np.testing.assert_array_equal(np.asarray(data[1:3]), loop["raw"][1:3])


def _segment_output(folder, seed: int, side: int) -> None:
    """``folder/objects.zarr``: ``emseg segment`` of random class probabilities (class 1 objects)."""
    probs = np.random.default_rng(seed).random((5, 3, side, side)).astype(np.float32)
    probs /= probs.sum(axis=0, keepdims=True)
    write_h5(folder / "probs.h5", probs=probs)
    result = CliRunner().invoke(cli, ["segment", "--from-probabilities", f"{folder}/probs.h5:probs",
                                      f"{folder}/objects.zarr", "--classes", "1", "--min-size", "1", "-q"])
    assert result.exit_code == 0, result.output


def test_instance_outputs_open_as_labels_with_their_ids(loop, tmp_path):
    _segment_output(tmp_path, 1, 48)
    assert file_kind(tmp_path / "objects.zarr") == "output"
    (data, meta, kind), = output_layers(tmp_path / "objects.zarr")
    assert kind == "labels" and np.asarray(data[...]).dtype == np.uint64
    with open_volume(str(tmp_path / "objects.zarr")) as vol:
        np.testing.assert_array_equal(np.asarray(data[...]), vol[...])
    assert np.asarray(data[...]).max() > 1  # the objects keep their own ids


def test_corrected_objects_save_as_instance_labels_that_targets_reads(loop, tmp_path):
    """Open an `emseg segment` output, paint a correction into it, save it through the plugin's
    writer (chosen by npe2 from the extension) and make training targets of it."""
    _segment_output(tmp_path, 3, 40)
    (data, meta, kind), = output_layers(tmp_path / "objects.zarr")
    assert kind == "labels" and isinstance(data, np.ndarray) and data.flags.writeable  # paintable
    ids = np.unique(data[data > 0])
    assert ids.size >= 3
    data[data == ids[1]] = ids[0]  # merge two objects
    data[2, :4, :4] = ids.max() + 7  # paint a new one
    data[data == ids[2]] = 0  # erase one
    expected = data.copy()
    npe2 = pytest.importorskip("npe2", reason="npe2 comes with napari (pip install 'emseg[napari]')")
    npe2.PluginManager.instance().discover()  # what napari does on start
    written = npe2.write(str(tmp_path / "fixed.zarr"), [(data, meta, "labels")], plugin_name="emseg")
    assert written == [str(tmp_path / "fixed.zarr")]
    with open_volume(str(tmp_path / "fixed.zarr")) as vol:
        assert vol.dtype == np.uint64 and vol.attrs["output_type"] == "instance_labels"
        assert "corrected_from" in vol.attrs and vol.attrs["source"] == f"{tmp_path}/probs.h5:probs"
        np.testing.assert_array_equal(vol[...], expected)
    result = CliRunner().invoke(cli, ["targets", f"{tmp_path}/fixed.zarr", f"{tmp_path}/targets.zarr",
                                      "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["n_objects"] == np.unique(expected[expected > 0]).size
    # ids below -1 are refused with one line, and nothing is written
    bad = expected.astype(np.int64)
    bad[0, 0, 0] = -2
    with pytest.raises(InputError, match="ids must be >= 0, or -1"):
        write_instances(str(tmp_path / "bad.zarr"), bad, meta)
    assert not (tmp_path / "bad.zarr").exists()


def test_queries_become_points_and_boxes(loop):
    path = loop["tmp"] / "queries.json"
    doc = json.loads(path.read_text())
    (points, pmeta, pkind), (rects, smeta, skind) = queries_layers(path)
    assert pkind == "points" and skind == "shapes"
    expected = [[o + (s - 1) / 2 for o, s in zip(q["offset"], q["shape"])] for q in doc["queries"]]
    np.testing.assert_allclose(points, expected)
    assert pmeta["scale"] == pytest.approx(VOXEL) and pmeta["face_color"] == "score"
    np.testing.assert_allclose(pmeta["features"]["score"], [q["score"] for q in doc["queries"]])
    # one rectangle per query (1-section boxes) spanning offset .. offset + shape - 1
    assert len(rects) == len(doc["queries"])
    for rect, q in zip(rects, doc["queries"]):
        z, y, x = q["offset"]
        _, h, w = q["shape"]
        assert rect[:, 0].tolist() == [z] * 4
        assert (rect[:, 1].min(), rect[:, 1].max(), rect[:, 2].min(), rect[:, 2].max()) == (y, y + h - 1, x, x + w - 1)


def test_crops_stacked_or_one_at_a_time(loop):
    path = loop["tmp"] / "crops.h5"
    doc = json.loads((loop["tmp"] / "queries.json").read_text())
    (raw, rmeta, rkind), (lab, lmeta, lkind) = crops_layers(path)
    assert (rkind, lkind) == ("image", "labels") and raw.shape == (3, 1, 32, 32)
    for i, q in enumerate(doc["queries"]):
        z, y, x = q["offset"]
        np.testing.assert_array_equal(raw[i], loop["raw"][z:z + 1, y:y + 32, x:x + 32])
    assert not lab.any()  # all unlabelled
    single = crops_layers(path, crop="crop_001")
    assert len(single) == 2 and single[0][0].shape == (1, 32, 32)
    assert single[1][1]["metadata"]["emseg_crops"]["crops"] == ["crop_001"]
    assert len(crops_layers(path, stack=False)) == 6


def test_writer_stores_labels_and_info_and_refuses_bad_input(loop, tmp_path):
    src = loop["tmp"] / "crops.h5"
    path = tmp_path / "crops.h5"
    path.write_bytes(src.read_bytes())
    painted = np.full((1, 32, 32), -1, np.int16)
    painted[0, :10, :10] = 0
    painted[0, 20:, 20:] = 1
    write_crop_labels(path, {"crop_001": painted}, not_present={"crop_001": [2]})
    doc = read_crops(path)
    np.testing.assert_array_equal(doc["crop_001"]["label"], painted)
    assert doc["crop_001"]["info"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert doc["crop_000"]["info"].tolist() == [[1, 1, 1], [0, 0, 0]]  # untouched crops keep theirs
    assert (doc["crop_000"]["label"] == -1).all()
    before = _digest(path)
    with pytest.raises(InputError, match="class 1 is marked not present but is painted"):
        write_crop_labels(path, {"crop_001": painted}, not_present={"crop_001": [1]})
    with pytest.raises(InputError, match=r"expected -1\.\.2"):
        write_crop_labels(path, {"crop_000": painted + 5})
    with pytest.raises(InputError, match="shape"):
        write_crop_labels(path, {"crop_000": painted[:, :8]})
    assert _digest(path) == before
    # a file not written by emseg: one line naming it, nothing written
    foreign = write_h5(tmp_path / "mine.h5", crop_000=np.zeros((1, 32, 32)))
    before = _digest(foreign)
    for call in (lambda: write_crop_labels(foreign, {"crop_000": painted}), lambda: read_crops(foreign),
                 lambda: write_labels(str(foreign), to_layer_labels(painted), {"metadata": {}})):
        with pytest.raises(InputError, match="not an emseg crops file") as err:
            call()
        assert str(foreign) in str(err.value) and "\n" not in str(err.value)
    assert _digest(foreign) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crops.h5", "mine.h5"]  # no temp left
    # a layer not read from the file must have the stacked shape of its crops
    with pytest.raises(InputError, match="does not match the 3 crops"):
        labels_from_layer(np.zeros((1, 32, 32), int), {}, path)


# --------------------------------------------------------------------------- napari viewer


@pytest.fixture(scope="module")
def display():
    """An X display for OpenGL: the one set, or a private Xvfb for these tests (offscreen Qt platform)."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    exe = shutil.which("Xvfb")
    if exe is None:
        pytest.skip("napari draws with OpenGL, which Qt's offscreen platform takes from an X server: "
                    "install xvfb (`make install` does where apt-get is available)")
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([exe, "-displayfd", str(write_fd), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                            pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    number = b""
    while not number.endswith(b"\n") and select.select([read_fd], [], [], 20)[0]:
        chunk = os.read(read_fd, 16)
        if not chunk:
            break
        number += chunk
    os.close(read_fd)
    if not number.strip():
        proc.kill()
        pytest.skip("Xvfb did not start")
    saved = os.environ.get("QT_QPA_PLATFORM")
    os.environ["DISPLAY"] = f":{number.decode().strip()}"
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    try:
        yield os.environ["DISPLAY"]
    finally:
        del os.environ["DISPLAY"]
        if saved is None:
            os.environ.pop("QT_QPA_PLATFORM", None)
        else:
            os.environ["QT_QPA_PLATFORM"] = saved
        proc.terminate()
        proc.wait(timeout=10)


#: Runs in a child process, so that Qt and its X connection end with it (and cannot take pytest down).
VIEWER_SCRIPT = r"""
import json, sys
import numpy as np
import napari
import qtpy

try:  # headless: Xvfb with Qt's offscreen platform gives no OpenGL context at times, and napari's query
    # of the GL extensions (for float textures) then fails; say "no float textures" instead
    import napari._vispy.layers.image as _image
    _extensions = _image.get_gl_extensions

    def _safe_extensions():
        try:
            return _extensions() or ""
        except AttributeError:
            return ""

    _image.get_gl_extensions = _safe_extensions
except ImportError:
    pass

pred, queries, crops, out = sys.argv[1:5]
viewer = napari.Viewer(show=False)
viewer.open(pred, plugin="emseg")
viewer.open(queries, plugin="emseg")
viewer.open(crops, plugin="emseg")
layers = [{"name": l.name, "kind": type(l).__name__, "scale": [float(v) for v in l.scale],
           "shape": list(np.shape(l.data)) if type(l).__name__ in ("Image", "Labels", "Points") else None}
          for l in viewer.layers]
labels = next(l for l in viewer.layers if type(l).__name__ == "Labels")
labels.brush_size = 5
labels.paint((0, 0, 16, 16), 2, refresh=True)   # class 1 (napari value 2) in crop 0
labels.paint((2, 0, 5, 5), 1, refresh=True)     # background (value 1) in crop 2
np.save(out + "/painted.npy", np.asarray(labels.data))
labels.save(crops, plugin="emseg")              # the npe2 writer
_, widget = viewer.window.add_plugin_dock_widget("emseg", "Save crop labels")   # from napari.yaml
message = widget(labels=labels, crop=2, not_present="2")   # crop 2 has no class 2
viewer.close()
json.dump({"layers": layers, "message": message, "qt": qtpy.API_NAME}, open(out + "/viewer.json", "w"))
"""


def test_annotation_loop_in_a_headless_viewer(loop, tmp_path, display):
    pytest.importorskip("napari", reason="napari is not installed (pip install 'emseg[napari]')")
    pytest.importorskip("qtpy", reason="no Qt binding (pip install 'emseg[napari]')")
    crops = tmp_path / "crops.h5"
    crops.write_bytes((loop["tmp"] / "crops.h5").read_bytes())
    run = subprocess.run([sys.executable, "-c", VIEWER_SCRIPT, str(loop["tmp"] / "pred.ome.zarr"),
                          str(loop["tmp"] / "queries.json"), str(crops), str(tmp_path)],
                         capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "viewer.json").read_text())
    # napari deprecates PyQt5; qtpy prefers it when it is installed beside PyQt6 (QT_API chooses)
    assert report["qt"] != "PyQt5", "napari runs on PyQt5, which it deprecates: pip uninstall PyQt5 (or set QT_API)"
    kinds = [layer["kind"] for layer in report["layers"]]
    assert kinds.count("Image") == 3 + 1 and kinds.count("Labels") == 1  # 3 class channels + the crops raw
    assert kinds.count("Points") == 1 and kinds.count("Shapes") == 1
    by_kind = {layer["kind"]: layer for layer in report["layers"]}
    assert report["layers"][0]["scale"] == pytest.approx(VOXEL)  # the prediction, in nm
    assert by_kind["Points"]["scale"] == pytest.approx(VOXEL)  # queries drawn over it
    assert by_kind["Labels"]["shape"] == [3, 1, 32, 32]
    painted = np.load(tmp_path / "painted.npy")
    assert (painted[0] == 2).sum() > 0 and (painted == 2).sum() == (painted[0] == 2).sum()
    doc = read_crops(crops)
    for i, name in enumerate(doc["names"]):
        np.testing.assert_array_equal(doc[name]["label"], painted[i].astype(np.int16) - 1)
    assert (doc["crop_001"]["label"] == -1).all() and (doc["crop_002"]["label"] == 0).sum() > 0
    assert doc["crop_002"]["info"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert doc["crop_000"]["info"].tolist() == [[1, 1, 1], [0, 0, 0]]
    # train one step on the painted crops, exactly as `emseg query` suggests
    config = tiny_train_config(loop["raw_h5"], steps=1, batch_size=1)
    config["train"] = [{"raw": f"{crops}:{c}/raw", "label": f"{crops}:{c}/label"} for c in ("crop_000", "crop_002")]
    (tmp_path / "retrain.toml").write_text(to_toml(config))
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "retrain.toml"), "--out", str(tmp_path / "re"),
                                      "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "re" / "metrics.csv")))
    assert rows and math.isfinite(float(rows[-1]["loss"])) and float(rows[-1]["loss"]) > 0


def test_manifest_is_installed_and_names_real_functions():
    npe2 = pytest.importorskip("npe2", reason="npe2 comes with napari (pip install 'emseg[napari]')")
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="napari.manifest") if e.name == "emseg"]
    assert entry.value == "emseg.napari:napari.yaml"
    manifest = npe2.PluginManifest.from_distribution("emseg")
    assert manifest.name == "emseg"
    commands = {c.id: c for c in manifest.contributions.commands}
    assert {r.command for r in manifest.contributions.readers} <= set(commands)
    assert [w.layer_types for w in manifest.contributions.writers] == [["labels"], ["labels"]]
    for command in commands.values():  # every python_name resolves to a callable of the plugin
        module, _, name = command.python_name.partition(":")
        assert callable(getattr(__import__(module, fromlist=[name]), name))
