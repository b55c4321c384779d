"""Volume I/O: spec parsing, lazy reading, round trips and atomic writing for HDF5 and zarr."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from emseg.errors import InputError
from emseg.io import VolumeSpec, auto_chunks, create_volume, open_volume, parse_spec, read_info


def _all_names(root: Path) -> set[str]:
    """Every file and folder name below ``root`` (recursively), hidden ones included."""
    return {p.name for p in root.rglob("*")}


def _leftovers(root: Path) -> list[str]:
    """Temporary names (``.NAME.tmp-*`` / ``.NAME.old-*``) anywhere below ``root``."""
    return sorted(n for n in _all_names(root) if n.startswith(".") and (".tmp-" in n or ".old-" in n))


# --------------------------------------------------------------------------- parse_spec


@pytest.mark.parametrize(
    "text, path, key",
    [
        ("data.h5:raw", "data.h5", "raw"),
        ("dir/data.hdf5:volumes/raw", "dir/data.hdf5", "volumes/raw"),
        ("data.hdf:/raw", "data.hdf", "raw"),
        ("/abs/DATA.H5:label", "/abs/DATA.H5", "label"),
        ("with:colon/data.h5:raw", "with:colon/data.h5", "raw"),
    ],
)
def test_parse_spec_h5(text, path, key):
    spec = parse_spec(text)
    assert spec.fmt == "h5"
    assert spec.path == Path(path)
    assert spec.key == key


@pytest.mark.parametrize(
    "text, path, key",
    [
        ("out.zarr", "out.zarr", ""),
        ("out.zarr/", "out.zarr", ""),
        ("out.zarr/probs", "out.zarr", "probs"),
        ("dir/out.zarr/pred/probs", "dir/out.zarr", "pred/probs"),
        ("my.zarrdata/x.zarr/arr", "my.zarrdata/x.zarr", "arr"),
    ],
)
def test_parse_spec_zarr(text, path, key):
    spec = parse_spec(text)
    assert spec.fmt == "zarr"
    assert spec.path == Path(path)
    assert spec.key == key


@pytest.mark.parametrize("text", ["data.h5", "data.h5:", "data.hdf5", "image.raw", "vol.n5foo", "x.zarrfoo", ""])
def test_parse_spec_rejects_bad_specs(text):
    with pytest.raises(InputError) as info:
        parse_spec(text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{text}: ") if text else message.startswith("unknown volume format")
    assert "FILE.h5:DATASET" in message  # says how to write a spec


def test_spec_string_round_trip_and_sibling():
    for text in ("a/b.h5:grp/label", "a/b.zarr/grp/label", "a/b.zarr"):
        assert str(parse_spec(text)) == text
        assert parse_spec(parse_spec(text)) == parse_spec(text)
    assert str(parse_spec("a/b.h5:grp/label").sibling("info")) == "a/b.h5:grp/info"
    assert str(parse_spec("a/b.h5:label").sibling("info")) == "a/b.h5:info"
    assert parse_spec("a/b.zarr/label").sibling("info") == VolumeSpec(Path("a/b.zarr"), "info", "zarr")


# --------------------------------------------------------------------------- round trips


ROUND_TRIP_SPECS = [
    ("vol.h5:data", (37, 29), "uint8"),
    ("vol.h5:data", (5, 21, 18), "float32"),
    ("vol.hdf5:grp/data", (5, 21, 18), "int16"),
    ("vol.zarr", (37, 29), "float32"),
    ("vol.zarr", (5, 21, 18), "uint8"),
    ("vol.zarr/data", (37, 29), "int16"),
    ("vol.zarr/data", (5, 21, 18), "float32"),
    ("vol.zarr/grp/data", (5, 21, 18), "uint8"),
]


@pytest.mark.parametrize("spec, shape, dtype", ROUND_TRIP_SPECS)
def test_round_trip(tmp_path, spec, shape, dtype):
    rng = np.random.default_rng(0)
    data = (rng.integers(-100, 100, size=shape) if dtype == "int16" else rng.integers(0, 255, size=shape)
            if dtype == "uint8" else rng.standard_normal(shape)).astype(dtype)
    target = f"{tmp_path}/{spec}"
    attrs = {"note": "hello", "classes": [1, 2, 3], "scale": 0.5}
    # Chunks smaller than the volume so that several are written and read, in two pieces.
    with create_volume(target, shape, dtype, chunks=(2,) + (16,) * (len(shape) - 1), attrs=attrs) as out:
        half = shape[0] // 2
        out[:half] = data[:half]
        out[half:] = data[half:]
    with open_volume(target) as vol:
        assert vol.shape == shape
        assert vol.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(vol[...], data)
        np.testing.assert_array_equal(np.asarray(vol), data)
        assert vol.attrs["note"] == "hello"
        assert list(vol.attrs["classes"]) == [1, 2, 3]
        assert vol.attrs["scale"] == 0.5
    assert _leftovers(tmp_path) == []


def test_unwritten_region_has_fill_value(tmp_path):
    with create_volume(tmp_path / "a.zarr/x", (4, 6), "float32", chunks=(2, 2)) as out:
        out[:2] = 1.0
    with open_volume(tmp_path / "a.zarr/x") as vol:
        np.testing.assert_array_equal(vol[...], np.r_[np.ones((2, 6)), np.zeros((2, 6))])


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_lazy_slices_equal_numpy_slices(tmp_path, fmt):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 60000, size=(6, 40, 33)).astype(np.uint16)
    if fmt == "h5":
        with h5py.File(tmp_path / "v.h5", "w") as fh:
            fh.create_dataset("raw", data=data, chunks=(1, 8, 8))
        spec = f"{tmp_path}/v.h5:raw"
    else:
        zarr.create_array(store=str(tmp_path / "v.zarr"), name="raw", data=data, chunks=(1, 8, 8))
        spec = f"{tmp_path}/v.zarr/raw"
    with open_volume(spec) as vol:
        assert vol.chunks == (1, 8, 8)
        for _ in range(20):
            lo = [int(rng.integers(0, s)) for s in data.shape]
            hi = [int(rng.integers(a + 1, s + 1)) for a, s in zip(lo, data.shape)]
            sl = tuple(slice(a, b) for a, b in zip(lo, hi))
            block = vol[sl]
            assert isinstance(block, np.ndarray)
            np.testing.assert_array_equal(block, data[sl])
        np.testing.assert_array_equal(vol[3], data[3])
        np.testing.assert_array_equal(vol[2:5, 7, 1:30:3], data[2:5, 7, 1:30:3])


def test_read_only_access_does_not_change_file(tmp_path):
    data = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    with h5py.File(tmp_path / "v.h5", "w") as fh:
        fh.create_dataset("raw", data=data)
    with open_volume(f"{tmp_path}/v.h5:raw") as vol:
        block = vol[...]
        block[...] = 0  # the returned block is a copy, not a view of the file
        assert not hasattr(vol.array, "__setitem__") or vol.array.file.mode == "r"
    with h5py.File(tmp_path / "v.h5", "r") as fh:
        np.testing.assert_array_equal(fh["raw"][...], data)


# --------------------------------------------------------------------------- atomic writing


def _write_previous(spec: str, value: float) -> None:
    with create_volume(spec, (4, 5), "float32", chunks=(2, 5)) as out:
        out[...] = value


@pytest.mark.parametrize("rel", ["out.h5:pred", "out.zarr", "out.zarr/pred", "out.zarr/grp/pred"])
def test_exception_keeps_previous_output_and_leaves_no_temp_files(tmp_path, rel):
    spec = f"{tmp_path}/{rel}"
    _write_previous(spec, 7.0)
    names_before = _all_names(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with create_volume(spec, (4, 5), "float32", chunks=(2, 5), overwrite=True) as out:
            out[:2] = -1.0
            raise RuntimeError("boom")
    with open_volume(spec) as vol:
        np.testing.assert_array_equal(vol[...], np.full((4, 5), 7.0, dtype=np.float32))
    assert _leftovers(tmp_path) == []
    assert _all_names(tmp_path) == names_before


@pytest.mark.parametrize("rel", ["new.h5:pred", "new.zarr", "new.zarr/pred"])
def test_exception_on_fresh_output_leaves_nothing(tmp_path, rel):
    spec = f"{tmp_path}/{rel}"
    with pytest.raises(RuntimeError):
        with create_volume(spec, (4, 5), "uint8") as out:
            out[...] = 1
            raise RuntimeError("boom")
    with pytest.raises(InputError):
        open_volume(spec)
    assert _leftovers(tmp_path) == []
    if rel.startswith("new.h5") or rel == "new.zarr":
        assert not parse_spec(spec).path.exists()


@pytest.mark.parametrize("rel", ["new.h5:pred", "new.zarr", "new.zarr/pred"])
def test_output_invisible_until_commit(tmp_path, rel):
    spec = f"{tmp_path}/{rel}"
    with create_volume(spec, (3, 4), "uint8") as out:
        out[...] = 5
        with pytest.raises(InputError):
            open_volume(spec)
    with open_volume(spec) as vol:
        np.testing.assert_array_equal(vol[...], np.full((3, 4), 5, np.uint8))


def test_h5_output_keeps_other_datasets_and_replaces_its_own(tmp_path):
    path = tmp_path / "f.h5"
    raw = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    with h5py.File(path, "w") as fh:
        fh.create_dataset("raw", data=raw)
        fh.create_dataset("grp/label", data=raw % 3)
        fh["raw"].attrs["resolution"] = [40, 4, 4]
        fh.create_dataset("pred", data=np.zeros((9,), np.int64))  # replaced, with another shape
    with create_volume(f"{path}:pred", (3, 4, 5), "float32", overwrite=True) as out:
        out[...] = 0.25
    with h5py.File(path, "r") as fh:
        assert sorted(fh.keys()) == ["grp", "pred", "raw"]
        np.testing.assert_array_equal(fh["raw"][...], raw)
        np.testing.assert_array_equal(fh["grp/label"][...], raw % 3)
        assert list(fh["raw"].attrs["resolution"]) == [40, 4, 4]
        assert fh["pred"].shape == (3, 4, 5) and fh["pred"].dtype == np.float32
        assert np.all(fh["pred"][...] == 0.25)


def test_zarr_output_keeps_sibling_arrays(tmp_path):
    store = tmp_path / "f.zarr"
    with create_volume(f"{store}/raw", (4, 4), "uint8") as out:
        out[...] = 3
    with create_volume(f"{store}/pred", (4, 4), "uint8") as out:
        out[...] = 9
    with create_volume(f"{store}/pred", (2, 2), "uint8", overwrite=True) as out:  # replace an existing array
        out[...] = 1
    with open_volume(f"{store}/raw") as raw, open_volume(f"{store}/pred") as pred:
        assert np.all(raw[...] == 3)
        assert pred.shape == (2, 2) and np.all(pred[...] == 1)
    assert _leftovers(tmp_path) == []


def test_create_volume_missing_folder_is_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        create_volume(f"{tmp_path}/nope/out.h5:x", (2, 2), "uint8")


@pytest.mark.parametrize("shape, itemsize", [((100, 2000, 3000), 1), ((3, 20, 1024, 1024), 4), ((7, 9), 8),
                                             ((50_000_000,), 2), ((1, 1, 1), 4)])
def test_auto_chunks_fit_budget_and_shape(shape, itemsize):
    target = 1 << 20
    chunks = auto_chunks(shape, itemsize, target)
    assert len(chunks) == len(shape)
    assert all(1 <= c <= s for c, s in zip(chunks, shape))
    assert np.prod(chunks, dtype=np.int64) * itemsize <= target


def test_read_info_defaults_when_absent(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as fh:
        fh.create_dataset("label", data=np.zeros((2, 2), np.uint8))
    info = read_info(f"{tmp_path}/f.h5:label", 4)
    np.testing.assert_array_equal(info, [[1, 1, 1, 1], [0, 0, 0, 0]])


def test_read_info_reads_sibling_dataset(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as fh:
        fh.create_dataset("cube/label", data=np.zeros((2, 2), np.uint8))
        fh.create_dataset("cube/info", data=np.array([[1, 0, 1], [0, 1, 0]], dtype=np.int64))
    info = read_info(f"{tmp_path}/f.h5:cube/label", 3)
    assert info.dtype == np.uint8
    np.testing.assert_array_equal(info, [[1, 0, 1], [0, 1, 0]])


_NAME = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=6)


@settings(max_examples=25, deadline=None)
@given(
    folders=st.lists(_NAME, max_size=3),
    stem=_NAME,
    suffix=st.sampled_from([".h5", ".hdf5", ".hdf", ".zarr"]),
    key=st.lists(_NAME, max_size=3),
    absolute=st.booleans(),
)
def test_volume_specs_round_trip_through_str(folders, stem, suffix, key, absolute):
    """``str(parse_spec(text)) == text`` for every well-formed spec, and parsing ``str(spec)`` gives ``spec``."""
    fmt = "zarr" if suffix == ".zarr" else "h5"
    if fmt == "h5" and not key:
        key = ["data"]  # an HDF5 spec always names a dataset
    path = ("/" if absolute else "") + "/".join([*folders, stem + suffix])
    text = f"{path}:{'/'.join(key)}" if fmt == "h5" else "/".join([path, *key])
    spec = parse_spec(text)
    assert (spec.fmt, spec.key, spec.path) == (fmt, "/".join(key), Path(path))
    assert str(spec) == text
    assert parse_spec(str(spec)) == spec
    assert parse_spec(spec) is spec
