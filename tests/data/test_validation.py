"""Input validation: every bad input is an InputError naming the file and the dataset, and the
command line turns it into one ``error: ...`` line with exit code 2 (a traceback only with -v)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import tiny_train_config, to_toml, write_h5
from emseg.cli.main import cli
from emseg.engine.config import CubeConfig
from emseg.data import open_cubes
from emseg.errors import InputError
from emseg.io import check_patch_fits, check_raw, open_volume, read_info, validate_labels

SHAPE = (2, 32, 32)
N_CLASSES = 3
PATCH = (1, 16, 16)


def _good() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, SHAPE).astype(np.uint8)
    label = rng.integers(0, N_CLASSES, SHAPE).astype(np.uint8)
    return raw, label


@dataclass
class Case:
    """A broken data file: ``build(dir)`` writes it; the error must name ``file`` and ``dataset``."""

    name: str
    build: Callable[[Path], dict]
    dataset: str  # the dataset the message must name
    words: str  # a word of the problem description
    patch: tuple[int, ...] = PATCH


def _missing_file(d: Path) -> dict:
    return {"raw": f"{d}/absent.h5:raw", "label": None, "file": d / "absent.h5"}


def _missing_dataset(d: Path) -> dict:
    raw, label = _good()
    write_h5(d / "c.h5", raw=raw, label=label)
    return {"raw": f"{d}/c.h5:raw", "label": f"{d}/c.h5:labels", "file": d / "c.h5"}


def _shape_mismatch(d: Path) -> dict:
    raw, label = _good()
    write_h5(d / "c.h5", raw=raw, label=label[:, :, :20])
    return {"raw": f"{d}/c.h5:raw", "label": f"{d}/c.h5:label", "file": d / "c.h5"}


def _float_labels(d: Path) -> dict:
    raw, label = _good()
    write_h5(d / "c.h5", raw=raw, label=label.astype(np.float32))
    return {"raw": f"{d}/c.h5:raw", "label": f"{d}/c.h5:label", "file": d / "c.h5"}


def _label_too_large(d: Path) -> dict:
    raw, label = _good()
    label[1, 5, 7] = N_CLASSES
    write_h5(d / "c.h5", raw=raw, label=label)
    return {"raw": f"{d}/c.h5:raw", "label": f"{d}/c.h5:label", "file": d / "c.h5"}


def _label_below_ignore(d: Path) -> dict:
    raw, label = _good()
    label = label.astype(np.int16)
    label[0, 0, 3] = -1  # fine
    label[1, 30, 2] = -2  # not fine
    write_h5(d / "c.h5", raw=raw, label=label)
    return {"raw": f"{d}/c.h5:raw", "label": f"{d}/c.h5:label", "file": d / "c.h5"}


def _info_shape(d: Path) -> dict:
    raw, label = _good()
    write_h5(d / "c.h5", raw=raw, label=label, info=np.ones((2, N_CLASSES + 1), np.uint8))
    return {"raw": f"{d}/c.h5:raw", "label": f"{d}/c.h5:label", "file": d / "c.h5"}


def _info_values(d: Path) -> dict:
    raw, label = _good()
    info = np.array([[1, 1, 1], [0, 2, 0]], np.uint8)
    write_h5(d / "c.h5", raw=raw, label=label, info=info)
    return {"raw": f"{d}/c.h5:raw", "label": f"{d}/c.h5:label", "file": d / "c.h5"}


def _not_present_but_labelled(d: Path) -> dict:
    raw, label = _good()
    label[label == 2] = 0
    label[0, 9, 9] = 2  # a single voxel of class 2
    info = np.array([[1, 1, 1], [0, 0, 1]], np.uint8)
    write_h5(d / "c.h5", raw=raw, label=label, info=info)
    return {"raw": f"{d}/c.h5:raw", "label": f"{d}/c.h5:label", "file": d / "c.h5"}


def _nan_raw(d: Path) -> dict:
    raw, label = _good()
    raw = raw.astype(np.float32)
    raw[1, 4, 4] = np.nan
    write_h5(d / "c.h5", raw=raw, label=label)
    return {"raw": f"{d}/c.h5:raw", "label": f"{d}/c.h5:label", "file": d / "c.h5"}


def _inf_raw(d: Path) -> dict:
    raw, label = _good()
    raw = raw.astype(np.float64)
    raw[0, 31, 0] = -np.inf
    write_h5(d / "c.h5", raw=raw)
    return {"raw": f"{d}/c.h5:raw", "label": None, "file": d / "c.h5"}


def _patch_too_large(d: Path) -> dict:
    raw, label = _good()
    write_h5(d / "c.h5", raw=raw, label=label)
    return {"raw": f"{d}/c.h5:raw", "label": f"{d}/c.h5:label", "file": d / "c.h5"}


CASES = [
    Case("missing file", _missing_file, "", "no such file"),
    Case("missing dataset", _missing_dataset, "labels", "no dataset"),
    Case("shape mismatch", _shape_mismatch, "label", "shape"),
    Case("non-integer labels", _float_labels, "label", "integer"),
    Case("label >= n_classes", _label_too_large, "label", "outside"),
    Case("label < -1", _label_below_ignore, "label", "-2"),
    Case("info shape", _info_shape, "info", "shape"),
    Case("info values", _info_values, "info", "0 and 1"),
    Case("not-present class labelled", _not_present_but_labelled, "label", "not present"),
    Case("NaN raw", _nan_raw, "raw", "NaN"),
    Case("inf raw", _inf_raw, "raw", "inf"),
    Case("patch too large", _patch_too_large, "raw", "larger", patch=(1, 64, 16)),
]
IDS = [c.name for c in CASES]


def _check_message(message: str, case: Case, file: Path) -> None:
    assert "\n" not in message
    assert str(file) in message, message
    if case.dataset:
        assert f":{case.dataset}" in message or f"'{case.dataset}'" in message, message
    assert case.words in message, message


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_open_cubes_raises_input_error(tmp_path, case):
    spec = case.build(tmp_path)
    entry = CubeConfig(raw=spec["raw"], label=spec["label"])
    with pytest.raises(InputError) as info:
        open_cubes([entry], N_CLASSES, case.patch)
    message = str(info.value)
    assert "\n" not in message and case.words in message, message
    _check_message(str(info.value), case, spec["file"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cli_reports_one_line_and_exit_2(tmp_path, case):
    spec = case.build(tmp_path)
    config = tiny_train_config(Path("unused.h5"), patch_shape=list(case.patch), steps=1)
    config["train"] = [{"raw": spec["raw"], "label": spec["label"]}]
    (tmp_path / "train.toml").write_text(to_toml(config))
    runner = CliRunner()
    result = runner.invoke(cli, ["train", str(tmp_path / "train.toml"), "--out", str(tmp_path / "run"),
                                 "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    _check_message(lines[0], case, spec["file"])
    assert not (tmp_path / "run" / "last.pt").exists()

    verbose = runner.invoke(cli, ["-v", "train", str(tmp_path / "train.toml"), "--out", str(tmp_path / "run")])
    assert verbose.exit_code == 2
    assert "Traceback" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == lines[0]


# --------------------------------------------------------------------------- the functions one by one


def test_valid_cube_passes_and_counts_classes(tmp_path):
    raw, label = _good()
    label = label.astype(np.int8)
    label[0, :4] = -1
    write_h5(tmp_path / "c.h5", raw=raw, label=label, info=np.array([[1, 1, 1], [0, 0, 0]], np.uint8))
    with open_volume(f"{tmp_path}/c.h5:raw") as r, open_volume(f"{tmp_path}/c.h5:label") as lab:
        check_raw(r)
        counts = validate_labels(lab, N_CLASSES, raw=r, info=read_info(lab.spec, N_CLASSES))
    expected = [(label == k).sum() for k in range(N_CLASSES)]
    np.testing.assert_array_equal(counts, expected)
    cubes = open_cubes([CubeConfig(f"{tmp_path}/c.h5:raw", f"{tmp_path}/c.h5:label")], N_CLASSES, PATCH)
    assert cubes[0].shape == SHAPE


def test_label_extremes_are_accepted(tmp_path):
    raw, _ = _good()
    label = np.full(SHAPE, -1, np.int64)
    label[0, 0, 0] = N_CLASSES - 1
    label[1, 0, 0] = 0
    write_h5(tmp_path / "c.h5", raw=raw, label=label)
    with open_volume(f"{tmp_path}/c.h5:label") as lab:
        np.testing.assert_array_equal(validate_labels(lab, N_CLASSES), [1, 0, 1])


def test_not_present_class_absent_from_labels_is_fine(tmp_path):
    raw, label = _good()
    label = label.astype(np.int8)
    label[label == 1] = -1
    write_h5(tmp_path / "c.h5", raw=raw, label=label,
             info=np.array([[1, 0, 1], [0, 1, 0]], np.uint8))
    cubes = open_cubes([CubeConfig(f"{tmp_path}/c.h5:raw", f"{tmp_path}/c.h5:label")], N_CLASSES, PATCH)
    np.testing.assert_array_equal(cubes[0].info, [[1, 0, 1], [0, 1, 0]])
    assert cubes[0].has_not_present


def test_raw_of_wrong_dimensionality(tmp_path):
    write_h5(tmp_path / "c.h5", raw=np.zeros((2, 2, 8, 8), np.uint8))
    with open_volume(f"{tmp_path}/c.h5:raw") as vol, pytest.raises(InputError, match="2D .* or 3D"):
        check_raw(vol)


def test_nan_position_is_reported(tmp_path):
    raw = np.zeros((5, 4, 4), np.float32)
    raw[3, 2, 1] = np.nan
    write_h5(tmp_path / "c.h5", raw=raw)
    with open_volume(f"{tmp_path}/c.h5:raw") as vol, pytest.raises(InputError, match="index 3"):
        check_raw(vol)


@pytest.mark.parametrize("patch, shape, ok", [((1, 8, 8), (1, 8, 8), True), ((2, 8, 8), (1, 8, 8), False),
                                              ((8, 8), (1, 8, 8), False), ((8, 9), (8, 8), False),
                                              ((4, 4), (8, 8), True)])
def test_check_patch_fits(patch, shape, ok):
    if ok:
        check_patch_fits(patch, shape, "f.h5:raw")
    else:
        with pytest.raises(InputError, match="f.h5:raw"):
            check_patch_fits(patch, shape, "f.h5:raw")


def test_missing_dataset_lists_available_ones(tmp_path):
    write_h5(tmp_path / "c.h5", raw=np.zeros((2, 2)), label=np.zeros((2, 2), np.uint8))
    with pytest.raises(InputError) as info:
        open_volume(f"{tmp_path}/c.h5:lable")
    assert "label" in str(info.value) and "raw" in str(info.value)


def test_missing_zarr_array_names_store_and_key(tmp_path):
    import zarr

    zarr.create_array(store=str(tmp_path / "s.zarr"), name="raw", shape=(2, 2), dtype="uint8")
    with pytest.raises(InputError) as info:
        open_volume(f"{tmp_path}/s.zarr/label")
    assert str(tmp_path / "s.zarr") in str(info.value) and "'label'" in str(info.value)


def test_not_an_h5_file(tmp_path):
    (tmp_path / "c.h5").write_text("not hdf5")
    with pytest.raises(InputError, match="HDF5"):
        open_volume(f"{tmp_path}/c.h5:raw")
