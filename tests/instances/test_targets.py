"""``emseg targets``: boundaries equal a brute-force search of each voxel's neighbours, touching
objects are separated, -1 is kept, per section differs from 3D where objects touch across
sections, membranes enclose one interior per cell, and the targets train and segment."""
from __future__ import annotations

import itertools
import json

import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from scipy import ndimage

from conftest import synthetic, tiny_train_config, to_toml, write_h5
from emseg.cli.main import cli
from emseg.errors import InputError
from emseg.instances import TargetsConfig, boundary_targets, make_targets
from emseg.io import open_volume, validate_labels


def brute_force(ids: np.ndarray, width: int, per_section: bool) -> np.ndarray:
    """Each voxel against every voxel within ``width`` (Chebyshev), -1 and the outside ignored."""
    ids3 = ids if ids.ndim == 3 else ids[None]
    out = np.zeros(ids3.shape, np.int8)
    dz = 0 if per_section else width
    Z, Y, X = ids3.shape
    for z, y, x in itertools.product(range(Z), range(Y), range(X)):
        a = ids3[z, y, x]
        if a <= 0:
            out[z, y, x] = a  # 0 background, -1 ignore
            continue
        other = False
        for oz, oy, ox in itertools.product(range(-dz, dz + 1), range(-width, width + 1), range(-width, width + 1)):
            zz, yy, xx = z + oz, y + oy, x + ox
            if 0 <= zz < Z and 0 <= yy < Y and 0 <= xx < X:
                b = ids3[zz, yy, xx]
                if b != -1 and b != a:
                    other = True
        out[z, y, x] = 2 if other else 1
    return out if ids.ndim == 3 else out[0]


@pytest.mark.parametrize("seed,width,per_section,shape", [
    (0, 1, True, (3, 9, 11)), (1, 1, False, (3, 9, 11)), (2, 2, True, (2, 12, 10)), (3, 2, False, (4, 8, 9)),
    (4, 1, True, (13, 12)), (5, 3, False, (5, 7, 8)),
])
def test_boundaries_equal_brute_force(seed, width, per_section, shape):
    rng = np.random.default_rng(seed)
    # blocky random ids (so that objects have interiors), a few -1 voxels
    coarse = rng.integers(0, 5, size=tuple((s + 1) // 2 for s in shape))
    ids = np.kron(coarse, np.ones((2,) * len(shape), int))[tuple(slice(0, s) for s in shape)].astype(np.int32)
    ids[rng.random(shape) < 0.05] = -1
    got = boundary_targets(ids, width=width, per_section=per_section)
    assert got.dtype == np.int8
    assert np.array_equal(got, brute_force(ids, width, per_section))
    assert np.array_equal(got == -1, ids == -1)


def test_unsigned_ids_equal_brute_force():
    ids = np.kron(np.random.default_rng(7).integers(0, 4, (2, 5, 5)), np.ones((1, 3, 3), int)).astype(np.uint64)
    assert np.array_equal(boundary_targets(ids), brute_force(ids.astype(np.int64), 1, True))


def tiles(shape, width: int, seed: int) -> np.ndarray:
    """Touching boxes, every side longer than 2 width + 1, random ids (0 for some)."""
    rng = np.random.default_rng(seed)
    cuts = []
    for s in shape:
        edges = [0]
        while edges[-1] < s:
            edges.append(edges[-1] + int(rng.integers(2 * width + 2, 2 * width + 6)))
        edges[-1] = s
        if len(edges) > 2 and edges[-1] - edges[-2] < 2 * width + 2:
            edges.pop(-2)
        cuts.append(edges)
    ids = np.zeros(shape, np.int64)
    n = 0
    for box in itertools.product(*[zip(e[:-1], e[1:]) for e in cuts]):
        n += 1
        ids[tuple(slice(a, b) for a, b in box)] = n if rng.random() > 0.15 else 0
    return ids


@pytest.mark.parametrize("width,per_section", [(1, False), (2, False), (1, True), (2, True)])
def test_touching_objects_are_separated(width, per_section):
    ids = tiles((3, 40, 44), width, seed=width) if per_section else tiles((12, 30, 28), width, seed=width)
    if per_section:
        ids = np.repeat(ids[:1], 3, axis=0)  # whole-depth boxes: per section each is 2D
    target = boundary_targets(ids, width=width, per_section=per_section)
    structure = np.ones((3,) * 3, bool)  # even corner neighbours do not join two objects
    if per_section:
        structure[0] = structure[2] = False
    interiors, n = ndimage.label(target == 1, structure=structure)
    pairs = {(int(a), int(b)) for a, b in zip(interiors[target == 1], ids[target == 1])}
    objects = set(np.unique(ids[ids > 0]).tolist())
    expected = len(objects) * (ids.shape[0] if per_section else 1)
    assert n == expected and len(pairs) == n  # each interior lies in one object
    assert {b for _, b in pairs} == objects
    # and no voxel of an object's interior is within `width` of another object
    assert np.array_equal(target > 0, ids > 0)


def test_per_section_differs_from_3d():
    ids = np.zeros((2, 8, 8), np.int64)
    ids[0, 1:7, 1:7] = 1
    ids[1, 1:7, 1:7] = 2  # one object on top of another
    flat = boundary_targets(ids, per_section=True)
    solid = boundary_targets(ids, per_section=False)
    assert (flat[:, 2:6, 2:6] == 1).all()  # in-plane, each section's object has an interior
    assert (solid[:, 1:7, 1:7] == 2).all()  # in 3D the two touch across the sections
    assert np.array_equal(flat, brute_force(ids, 1, True)) and np.array_equal(solid, brute_force(ids, 1, False))


def test_from_classes_is_components_then_boundaries():
    labels = np.zeros((2, 20, 20), np.int16)
    labels[:, 2:8, 2:8] = 1
    labels[:, 12:18, 3:17] = 1
    labels[:, 10, :] = 2
    labels[0, 0, 0] = -1
    got = boundary_targets(labels, source="classes", classes=(1,))
    ids, _ = ndimage.label(labels == 1)
    ids = np.where(labels == -1, -1, ids)
    assert np.array_equal(got, brute_force(ids, 1, True))
    # classes that do not occur make no objects
    assert (boundary_targets(labels, source="classes", classes=(9,))[labels >= 0] == 0).all()


def membrane_grid(n_cells=4, cell=9, membrane=2, depth=2):
    """A grid of membrane lines (class 2) around n_cells x n_cells cells of background (0) with a
    mitochondrion (class 1) in some; the grid does not close at the volume border."""
    side = n_cells * (cell + membrane)
    labels = np.zeros((depth, side, side), np.int8)
    for k in range(1, n_cells):
        start = k * (cell + membrane) - membrane
        labels[:, start:start + membrane, :] = 2
        labels[:, :, start:start + membrane] = 2
    labels[:, 3:5, 3:5] = 1
    labels[:, 14:16, 25:27] = 1
    return labels


def test_enclosed_by_gives_one_interior_per_cell():
    labels = membrane_grid()
    got = boundary_targets(labels, source="classes", enclosed_by=(2, 3, 4))
    assert np.array_equal(got == 2, labels == 2) and np.array_equal(got == 1, labels != 2)
    structure = ndimage.generate_binary_structure(3, 1)
    structure[0] = structure[2] = False
    _, n = ndimage.label(got == 1, structure=structure)
    assert n == 16 * labels.shape[0]  # 4 x 4 cells in each section, border cells included
    wide = boundary_targets(labels, source="classes", enclosed_by=(2,), width=2)
    grown = ndimage.binary_dilation(labels == 2, structure=np.ones((1, 3, 3), bool))
    assert np.array_equal(wide == 2, grown)
    assert ndimage.label(wide == 1, structure=structure)[1] == 16 * labels.shape[0]


def test_bad_parameters():
    with pytest.raises(InputError, match="`classes` must be class ids >= 0"):
        TargetsConfig(source="classes", classes=(-1,))
    with pytest.raises(InputError, match="not both"):
        TargetsConfig(source="classes", classes=(1,), enclosed_by=(2,))
    with pytest.raises(InputError, match="`width`"):
        TargetsConfig(width=0)
    with pytest.raises(InputError, match="integers"):
        boundary_targets(np.zeros((4, 4), np.float32))
    with pytest.raises(InputError, match="-2"):
        boundary_targets(np.full((4, 4), -2))


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    return lines[0]


def test_cli_targets_json_attrs_and_dtypes(tmp_path):
    ids = tiles((3, 24, 24), 1, seed=3)
    ids[0, :2, :2] = -1
    src = write_h5(tmp_path / "l.h5", ids=ids.astype(np.int32), classes=membrane_grid())
    result = _cli("targets", f"{src}:ids", f"{tmp_path}/t.h5:ids", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    with h5py.File(tmp_path / "t.h5", "r") as fh:
        out, attrs = fh["ids"][...], dict(fh["ids"].attrs)
    assert out.dtype == np.int8 and np.array_equal(out, boundary_targets(ids))
    assert attrs["n_classes"] == 3 and json.loads(attrs["targets"])["width"] == 1
    assert doc["n_objects"] == len(np.unique(ids[ids > 0])) and doc["dtype"] == "int8"
    assert sum(doc["counts"].values()) == ids.size and doc["counts"]["ignored"] == 4
    with open_volume(f"{tmp_path}/t.h5:ids") as vol:
        validate_labels(vol, 3)

    result = _cli("targets", f"{src}:classes", tmp_path / "cells.zarr", "--enclosed-by", "2,3,4", "--3d", "--json")
    assert result.exit_code == 0, result.output
    out = zarr.open_array(store=str(tmp_path / "cells.zarr"), mode="r")[...]
    assert out.dtype == np.uint8 and set(np.unique(out)) == {1, 2}
    assert json.loads(result.stdout)["n_objects"] == 16  # 3D regions through both sections

    assert _cli("targets", f"{src}:classes", f"{tmp_path}/t.h5:m", "--from-classes", "7").exit_code == 0
    assert "--overwrite" in _error(_cli("targets", f"{src}:ids", f"{tmp_path}/t.h5:ids"))
    assert _cli("targets", f"{src}:ids", f"{tmp_path}/t.h5:ids", "--overwrite", "--width", "2").exit_code == 0


def test_cli_targets_errors(tmp_path):
    src = write_h5(tmp_path / "l.h5", f=np.zeros((2, 8, 8), np.float32), neg=np.full((2, 8, 8), -3, np.int16),
                   ok=np.zeros((2, 8, 8), np.uint8))
    line = _error(_cli("targets", f"{src}:f", tmp_path / "o.zarr"))
    assert "l.h5:f" in line and "integers" in line
    line = _error(_cli("targets", f"{src}:neg", tmp_path / "o.zarr"))
    assert "l.h5:neg" in line and "-3" in line
    assert "--from-classes" in _error(_cli("targets", f"{src}:ok", tmp_path / "o.zarr", "--from-classes", "-1"))
    assert "not both" in _error(_cli("targets", f"{src}:ok", tmp_path / "o.zarr", "--from-classes", "1",
                                     "--enclosed-by", "2"))
    assert "overwrite the input" in _error(_cli("targets", f"{src}:ok", f"{src}:ok"))
    assert not (tmp_path / "o.zarr").exists()


def test_targets_train_predict_segment(tmp_path):
    vol = synthetic((4, 64, 64), 0)
    data = write_h5(tmp_path / "data.h5", raw=vol.raw, label=vol.label)
    result = _cli("targets", f"{data}:label", f"{data}:target", "--from-classes", "1", "-q")
    assert result.exit_code == 0, result.output
    config = tiny_train_config(data, steps=3, train=[{"raw": f"{data}:raw", "label": f"{data}:target"}])
    (tmp_path / "train.toml").write_text(to_toml(config))
    run = tmp_path / "run"
    result = _cli("train", tmp_path / "train.toml", "--out", run, "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    result = _cli("predict", run / "last.pt", f"{data}:raw", tmp_path / "p.zarr", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    result = _cli("segment", "--from-probabilities", tmp_path / "p.zarr", tmp_path / "cells.zarr",
                  "--mode", "watershed", "--boundary-classes", "2", "--json")
    assert result.exit_code == 0, result.output
    assert zarr.open_array(store=str(tmp_path / "cells.zarr"), mode="r").dtype == np.uint64


def test_make_targets_per_section_equals_arrays(tmp_path):
    ids = np.random.default_rng(2).integers(-1, 6, (5, 16, 12)).astype(np.int64)
    src = write_h5(tmp_path / "l.h5", ids=ids)
    result = make_targets(TargetsConfig(labels=f"{src}:ids", output=str(tmp_path / "o.zarr"), width=2))
    out = zarr.open_array(store=str(tmp_path / "o.zarr"), mode="r")[...]
    assert np.array_equal(out, brute_force(ids, 2, True)) and result.dtype == "int8"


@pytest.mark.parametrize("per_section", [True, False])
def test_width_one_is_find_boundaries_inner(per_section):
    from skimage.segmentation import find_boundaries

    ids = np.kron(np.random.default_rng(11).integers(0, 5, (3, 7, 7)), np.ones((1, 2, 2), int))[:, :13, :12]
    got = boundary_targets(ids, per_section=per_section)
    if per_section:
        inner = np.stack([find_boundaries(s, mode="inner", connectivity=2) for s in ids])
    else:
        inner = find_boundaries(ids, mode="inner", connectivity=3)
    assert np.array_equal(got == 2, inner & (ids > 0))
