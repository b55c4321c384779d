"""``emseg segment``: objects block by block equal those of the whole volume (components exactly,
watershed exactly per section with whole-section blocks, within a small variation of information
in 3D), the size filter, uint64 ids, the output formats and the command line."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from skimage.metrics import variation_of_information
from skimage.segmentation import watershed

from conftest import synthetic, write_h5
from emseg.cli.main import cli
from emseg.errors import InputError
from emseg.instances.config import SegmentConfig, load_segment_config, segment_config_from_dict
from emseg.instances.objects import neighbourhood
from emseg.engine.cluster import BlockFailed
import emseg.instances.blockwise as blockwise
from emseg.instances.segment import BlockwiseOptions, SegmentFileConfig, segment_file, segment_probabilities
from emseg.instances.stitch import resolve_ids
from emseg.models import build_model
from emseg.models.checkpoint import save_checkpoint
from emseg.synthetic import make_volume


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """The same objects up to their ids: the same background, and ids paired one to one."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return len(pairs) == len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1]))


def blobs(shape=(10, 48, 52), seed=0, level=0.56) -> np.ndarray:
    """Random smooth blobs: many objects of many sizes, some spanning several blocks."""
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), 1.2) > level


def two_class(fg: np.ndarray) -> np.ndarray:
    fg = fg.astype(np.float32)
    return np.stack([1 - fg, fg])


def run(probs, config: SegmentConfig, block) -> np.ndarray:
    out = np.zeros(probs.shape[1:], np.uint64)
    segment_probabilities(probs, config.replace(block_shape=block), out)
    return out


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    return np.where(small[labels], 0, labels)


# ----------------------------------------------------------------------------- components


@pytest.mark.parametrize("per_section, connectivity", [(False, 1), (False, 3), (True, 2)])
def test_components_blockwise_equal_the_whole_volume_exactly(per_section, connectivity):
    fg = blobs()
    ref, n = ndimage.label(fg, neighbourhood(3, connectivity, per_section))
    assert n > 20
    config = SegmentConfig(classes=(1,), min_size=0, per_section=per_section, connectivity=connectivity)
    for block in [(1, 48, 52), (3, 16, 13), (4, 7, 52)]:  # 1-voxel-thick blocks along z among them
        out = run(two_class(fg), config, block)
        assert out.dtype == np.uint64
        assert same_partition(ref, out), block
        assert np.array_equal(np.unique(out), np.arange(n + 1))  # ids 1..N, consecutive


def test_the_size_filter_counts_an_object_over_every_block_it_spans():
    fg = np.zeros((6, 20, 20), bool)
    fg[:, 8:11, 8:11] = True  # 54 voxels, 9 per section
    fg[2, 2:4, 2:4] = True  # 4 voxels
    fg[4, 15:18, 14:19] = True  # 15 voxels
    config = SegmentConfig(classes=(1,), min_size=10, per_section=False)
    for block in [(1, 20, 20), (2, 9, 10), (6, 20, 20)]:
        out = run(two_class(fg), config, block)
        assert set(np.unique(out)) == {0, 1, 2}
        assert np.count_nonzero(out == out[0, 9, 9]) == 54  # pieces of 9 < 10 per block, kept whole
        assert not out[2, 2:4, 2:4].any()
    fg = blobs(seed=3)
    ref = remove_small(ndimage.label(fg)[0], 40)
    out = run(two_class(fg), SegmentConfig(classes=(1,), min_size=40, per_section=False), (3, 16, 13))
    assert same_partition(ref, out)


def test_threshold_foreground_sums_the_probabilities_of_the_classes():
    rng = np.random.default_rng(1)
    probs = rng.random((4, 6, 30, 30)).astype(np.float32)
    probs = ndimage.gaussian_filter(probs, (0, 0, 1.5, 1.5))
    probs /= probs.sum(0, keepdims=True)
    fg = probs[1] + probs[3] > 0.52
    config = SegmentConfig(classes=(1, 3), threshold=0.52, min_size=0, per_section=False)
    assert same_partition(ndimage.label(fg)[0], run(probs, config, (2, 11, 30)))
    argmax = np.isin(probs.argmax(0), (1, 3))
    config = SegmentConfig(classes=(1, 3), min_size=0, per_section=False)
    assert same_partition(ndimage.label(argmax)[0], run(probs, config, (2, 11, 30)))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), block=st.tuples(st.integers(1, 5), st.integers(1, 9), st.integers(1, 9)),
       connectivity=st.integers(1, 3), level=st.floats(0.45, 0.6))
def test_any_block_grid_gives_the_components_of_the_whole_volume(seed, block, connectivity, level):
    fg = blobs((5, 12, 13), seed, level)
    ref = ndimage.label(fg, neighbourhood(3, connectivity, False))[0]
    out = run(two_class(fg), SegmentConfig(classes=(1,), min_size=0, per_section=False,
                                           connectivity=connectivity), block)
    assert same_partition(ref, out)


def test_resolve_ids_merges_pairs_numbers_by_first_id_and_drops_small_objects():
    mapping, n, found = resolve_ids(5, np.array([[4, 2], [5, 3]]), np.array([0, 1, 7, 2, 7, 1]), min_size=3)
    assert mapping.dtype == np.uint64 and (n, found) == (2, 3)
    assert mapping.tolist() == [0, 0, 1, 2, 1, 2]  # {1} too small; {2, 4} first, then {3, 5}


# ----------------------------------------------------------------------------- watershed


def membrane_probabilities(shape, seed, noise=0.5) -> np.ndarray:
    """Three classes (background, membrane, mitochondria) of the synthetic volume, smoothed, with
    smooth noise: a stand-in for a network's output. Its noise keeps the boundary map above the
    default seed threshold (0.1, chosen on VNC) almost everywhere, so the watershed tests on it
    seed at 0.25."""
    vol = make_volume(shape, n_cells=25, n_mito=8, rng=seed)
    rng = np.random.default_rng(seed)
    onehot = np.stack([vol.label == c for c in range(3)]).astype(np.float32)
    smooth = ndimage.gaussian_filter(onehot, (0, 0, 1, 1))
    smooth += noise * ndimage.gaussian_filter(rng.random(onehot.shape).astype(np.float32), (0, 0, 1, 1))
    return (smooth / smooth.sum(0, keepdims=True)).astype(np.float32)


def watershed_per_section(probs: np.ndarray, config: SegmentConfig) -> np.ndarray:
    """The whole-volume reference, written out: each section alone, with scikit-image."""
    boundary = probs[list(config.boundary_classes)].sum(0)
    flat = ndimage.generate_binary_structure(2, config.connectivity)
    out = np.zeros(boundary.shape, np.int64)
    for z, section in enumerate(boundary):
        region = ndimage.binary_erosion(section < config.seed_threshold, flat, iterations=config.seed_erosion,
                                        border_value=1)
        seeds = remove_small(ndimage.label(region, flat)[0], config.seed_min_size)
        mask = section < config.mask_threshold if config.mask_threshold is not None else None
        cells = remove_small(watershed(section, seeds, mask=mask, connectivity=config.connectivity), config.min_size)
        out[z] = np.where(cells > 0, cells + z * 10**6, 0)
    return out


@pytest.mark.parametrize("mask_threshold", [None, 0.6])
def test_watershed_per_section_with_whole_sections_equals_the_whole_volume_exactly(mask_threshold):
    probs = membrane_probabilities((5, 80, 80), seed=2)
    config = SegmentConfig(mode="watershed", seed_threshold=0.25,
                           boundary_classes=(1,), min_size=20, mask_threshold=mask_threshold)
    ref = watershed_per_section(probs, config)
    assert len(np.unique(ref)) > 50
    for block in [(1, 80, 80), (2, 80, 80), (5, 80, 80)]:
        assert same_partition(ref, run(probs, config, block)), block


def test_watershed_per_section_with_split_sections_stays_close():
    probs = membrane_probabilities((4, 80, 80), seed=4)
    config = SegmentConfig(mode="watershed", seed_threshold=0.25, boundary_classes=(1,), min_size=20, halo=24)
    ref = run(probs, config, (4, 80, 80))
    for block in [(1, 40, 40), (2, 24, 80), (4, 27, 33)]:
        assert sum(variation_of_information(ref, run(probs, config, block))) <= 0.01, block


def watershed_3d(probs: np.ndarray, config: SegmentConfig) -> np.ndarray:
    """The whole-volume 3D reference, written out with scikit-image."""
    boundary = probs[list(config.boundary_classes)].sum(0)
    cube = ndimage.generate_binary_structure(3, config.connectivity)
    region = ndimage.binary_erosion(boundary < config.seed_threshold, cube, iterations=config.seed_erosion,
                                    border_value=1)
    seeds = remove_small(ndimage.label(region, cube)[0], config.seed_min_size)
    return remove_small(watershed(boundary, seeds, connectivity=config.connectivity), config.min_size)


def test_watershed_3d_blockwise_is_within_a_small_variation_of_information():
    probs = membrane_probabilities((16, 96, 96), seed=3)
    config = SegmentConfig(mode="watershed", seed_threshold=0.25,
                           boundary_classes=(1,), min_size=10, per_section=False, halo=(4, 16, 16))
    whole = run(probs, config, (16, 96, 96))
    assert same_partition(watershed_3d(probs, config), whole)
    assert len(np.unique(whole)) > 20
    for block in [(4, 32, 32), (5, 48, 40), (8, 20, 17)]:
        out = run(probs, config, block)
        assert out.dtype == np.uint64 and np.array_equal(np.unique(out[out > 0]), np.arange(1, out.max() + 1))
        assert sum(variation_of_information(whole, out)) <= 0.01, block


def test_mask_classes_keep_the_boundary_voxels_of_touching_objects():
    """A background / interior / boundary map of touching discs (the targets of `emseg targets`):
    seeds and flooding from 1 - p(interior), inside p(background) < 0.5 (``mask_classes``), give
    back every object whole, boundary voxels included; masking the same map instead loses them."""
    from emseg.instances import boundary_targets

    yy, xx = np.mgrid[:60, :90]
    ids = np.zeros((2, 60, 90), np.int64)
    for k, (cy, cx, r) in enumerate([(30, 25, 14), (30, 50, 13), (12, 75, 8), (45, 75, 9)], start=1):
        ids[:, (yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = k  # the second disc overlaps the first: touching
    ids[1] = np.where(ids[1] > 0, ids[1] + 10, 0)  # other objects in the second section
    targets = boundary_targets(ids)
    probs = np.stack([(targets == c).astype(np.float32) for c in range(3)])
    probs = 0.9 * probs + 0.1 / 3  # not one-hot: still sums to 1
    config = SegmentConfig(mode="watershed", boundary_classes=(0, 2), seed_threshold=0.5, seed_erosion=0,
                           seed_min_size=1, min_size=0, mask_threshold=0.5, mask_classes=(0,), halo=(0, 8, 8))
    for block in [(2, 60, 90), (1, 20, 30)]:
        out = run(probs, config, block)
        assert np.array_equal(out > 0, ids > 0), block  # every boundary voxel kept
        majority = {}
        for k in np.unique(ids[ids > 0]):
            found, counts = np.unique(out[ids == k], return_counts=True)
            majority[k] = found[np.argmax(counts)]
            assert counts.max() >= 0.99 * counts.sum()  # where two objects touch, a voxel may change sides
        assert len(set(majority.values())) == len(majority) == 8 == out.max()
    plain = SegmentConfig(**{**config.to_dict(), "mask_classes": None, "block_shape": (2, 60, 90)})
    assert np.array_equal(run(probs, plain, (2, 60, 90)) > 0, targets == 1)  # the same map masked: interiors only
    with pytest.raises(InputError, match="`mask_classes` needs a `mask_threshold`"):
        SegmentConfig(mode="watershed", mask_classes=(0,))
    with pytest.raises(InputError, match="`mask_classes` 3 is out of range"):
        config.replace(mask_classes=(3,)).check_for((2, 60, 90), 3)


def test_blocks_no_seed_reaches_are_flooded_from_their_neighbours():
    """A 2D corridor with a seed at each end, cut into blocks whose halo reaches no seed from the
    middle: the middle is flooded from the objects written beside it, a pocket no seed can reach
    stays 0, as in the whole volume."""
    boundary = np.full((12, 90), 0.9, np.float32)  # walls, outside the mask
    boundary[2:10, 1:80] = 0.5  # the corridor: flooded, no seed
    boundary[4:8, 2:8] = boundary[4:8, 72:78] = 0.0  # two seeds
    boundary[3:9, 83:88] = 0.5  # a pocket without a seed
    probs = np.stack([1 - boundary, boundary])
    config = SegmentConfig(mode="watershed", boundary_classes=(1,), mask_threshold=0.7, seed_erosion=0,
                           seed_min_size=1, min_size=0, halo=4)
    whole = run(probs, config, (12, 90))
    out = np.zeros(boundary.shape, np.uint64)
    result = segment_probabilities(probs, config.replace(block_shape=(12, 10)), out)
    assert result.stats.refilled > 0 and result.n_objects == 2
    for labels in (whole, out):
        assert np.array_equal(labels != 0, boundary < 0.7) is False  # the pocket
        assert (labels[2:10, 1:80] != 0).all() and not labels[3:9, 83:88].any()
        assert labels[5, 3] != labels[5, 76]
        for i in (1, 2):
            assert ndimage.label(labels == i)[1] == 1  # each object in one piece
    assert sum(variation_of_information(whole, out)) < 0.1


# ----------------------------------------------------------------------------- config and outputs


def test_segment_table_from_toml_with_overrides_and_checks(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[train]\nsteps = 3\n\n[segment]\nmode = "watershed"\nboundary_classes = [2]\nhalo = 16\n')
    config = load_segment_config(path, overrides={"min_size": 5, "seed_threshold": None})
    assert (config.mode, config.boundary_classes, config.halo, config.min_size) == ("watershed", (2,), (16,), 5)
    assert config.halo_for((20, 64, 64)) == (0, 16, 16)
    assert config.replace(per_section=False).halo_for((20, 64, 64)) == (16, 16, 16)
    path.write_text("[segment]\nmin_sise = 3\n")
    with pytest.raises(InputError, match="unknown key.*min_sise"):
        load_segment_config(path)
    with pytest.raises(InputError, match="seed_threshold"):
        segment_config_from_dict({"seed_threshold": 2.0})
    with pytest.raises(InputError, match="mask_threshold"):
        SegmentConfig(seed_threshold=0.5, mask_threshold=0.3)


@pytest.mark.parametrize("out", ["seg.zarr/objects", "seg.h5:objects", "seg.ome.zarr", "seg.tif"])
def test_from_probabilities_on_disk_writes_each_format_with_the_parameters(tmp_path, out):
    fg = blobs((4, 24, 24), seed=5)
    probs = np.round(two_class(fg) * 255).astype(np.uint8)
    store = zarr.open_array(store=str(tmp_path / "pred.zarr"), mode="w", shape=probs.shape, dtype=np.uint8)
    store[...] = probs
    store.attrs.update(n_classes=2, output_type="probabilities", scale=1 / 255)
    config = SegmentConfig(classes=(1,), min_size=0, per_section=False, block_shape=(2, 10, 24))
    result = segment_probabilities(str(tmp_path / "pred.zarr"), config, str(tmp_path / out))
    from emseg.io import open_volume

    with open_volume(str(tmp_path / out)) as vol:
        labels = vol[...]
        attrs = vol.attrs
    assert labels.dtype == np.uint64 and result.n_objects == labels.max()
    assert same_partition(ndimage.label(fg)[0], labels)
    if out.endswith(".zarr/objects") or out.endswith(":objects"):
        assert attrs["mode"] == "components" and json.loads(attrs["segment"])["classes"] == [1]
    if out.endswith(".ome.zarr"):
        assert "image-label" in zarr.open_group(store=str(tmp_path / out), mode="r").attrs["ome"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no scratch left behind


def test_probability_inputs_that_are_not_probabilities_are_refused(tmp_path):
    labels = zarr.open_array(store=str(tmp_path / "labels.zarr"), mode="w", shape=(3, 8, 8), dtype=np.uint8)
    labels.attrs.update(output_type="labels")
    with pytest.raises(InputError, match="not class probabilities"):
        segment_probabilities(str(tmp_path / "labels.zarr"), SegmentConfig(), str(tmp_path / "o.zarr"))
    raw = tmp_path / "raw.h5"
    write_h5(raw, raw=synthetic((4, 32, 32), 1).raw)
    with pytest.raises(InputError, match="do not sum to 1"):
        segment_probabilities(f"{raw}:raw", SegmentConfig(), str(tmp_path / "o.zarr"))
    with pytest.raises(InputError, match="`classes` 2 is out of range: the model has 2 classes"):
        segment_probabilities(np.ones((1, 4, 4, 4), np.float32) * 0.4, SegmentConfig(classes=(2,)),
                              np.zeros((4, 4, 4), np.uint64))
    assert not (tmp_path / "o.zarr").exists()


# ----------------------------------------------------------------------------- the network and the command line


@pytest.fixture
def model_and_raw(tmp_path) -> tuple[Path, Path]:
    """A small random 2D U-Net checkpoint (3 classes; its head scaled up so that the classes vary
    over the volume: class 1 is the argmax of about a quarter of it) and a raw volume."""
    torch.manual_seed(0)
    config = dict(ndim=2, in_channels=1, out_channels=3, depth=2, base_width=4, norm="batch")
    model = build_model(config)
    with torch.no_grad():
        model.head.weight.mul_(300)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "model_config": config,
                           "config": {"patch_shape": [1, 32, 32]}})
    raw = write_h5(tmp_path / "raw.h5", raw=synthetic((4, 64, 64), 2).raw)
    return ckpt, raw


def _cli(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_segment_with_the_network_equals_predict_then_segment_probabilities(tmp_path, model_and_raw):
    ckpt, raw = model_and_raw
    # seeds at 0.25 (not the default 0.1, chosen on VNC): the value set for the fixture's random network
    config = SegmentConfig(mode="watershed", seed_threshold=0.25,
                           boundary_classes=(2,), seed_erosion=1, min_size=0, per_section=False,
                           halo=(1, 8, 8), block_shape=(2, 32, 32))
    result = segment_file(SegmentFileConfig(output=str(tmp_path / "a.zarr"), model=str(ckpt), input=f"{raw}:raw",
                                            segment=config, device="cpu", precision="fp32"))
    assert result.n_objects > 0 and result.blocks == 8
    pred = _cli("predict", ckpt, f"{raw}:raw", tmp_path / "p.zarr", "--block", "2,32,32", "--device", "cpu",
                "--precision", "fp32", "-q")
    assert pred.exit_code == 0, pred.output
    segment_probabilities(str(tmp_path / "p.zarr"), config, str(tmp_path / "b.zarr"))
    a = zarr.open_array(store=str(tmp_path / "a.zarr"), mode="r")[...]
    b = zarr.open_array(store=str(tmp_path / "b.zarr"), mode="r")[...]
    assert np.array_equal(a, b)


def test_cli_segment_json_and_from_probabilities(tmp_path, model_and_raw):
    ckpt, raw = model_and_raw
    out = tmp_path / "mito.h5"
    result = _cli("segment", ckpt, f"{raw}:raw", f"{out}:objects", "--classes", "1", "--3d", "--min-size", "0",
                  "--block", "2,32,32", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    with h5py.File(out, "r") as fh:
        labels = fh["objects"][...]
        assert fh["objects"].attrs["output_type"] == "instances"
    assert labels.dtype == np.uint64 and doc["n_objects"] == labels.max() > 0
    assert doc["mode"] == "components" and doc["config"]["per_section"] is False and doc["blocks"] == 8
    assert _cli("predict", ckpt, f"{raw}:raw", tmp_path / "p.zarr", "--device", "cpu", "-q").exit_code == 0
    toml = tmp_path / "s.toml"
    toml.write_text('[segment]\nmode = "watershed"\nboundary_classes = [2]\nseed_threshold = 0.3\n')
    result = _cli("segment", "--from-probabilities", tmp_path / "p.zarr", tmp_path / "cells.zarr", "--config", toml,
                  "--min-size", "0", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["mode"] == "watershed" and doc["config"]["boundary_classes"] == [2] and doc["config"]["min_size"] == 0
    assert doc["config"]["seed_threshold"] == 0.3 and doc["n_objects"] > 0
    again = _cli("segment", "--from-probabilities", tmp_path / "p.zarr", tmp_path / "cells.zarr", "--config", toml)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    again = _cli("segment", "--from-probabilities", tmp_path / "p.zarr", tmp_path / "cells.zarr", "--config", toml,
                 "--overwrite", "--min-size", "0", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["n_objects"] == doc["n_objects"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.zarr", "mito.h5", "model.pt", "p.zarr", "raw.h5",
                                                          "s.toml"]  # no scratch, no lock left


@pytest.mark.parametrize("args, words", [
    (["--classes", "3"], ["model.pt", "--classes 3 is out of range", "3 classes"]),
    (["--mode", "watershed", "--boundary-classes", "1,7"], ["--boundary-classes 7 is out of range"]),
    (["--mode", "watershed", "--boundary-classes", "2", "--block", "2,8,8", "--halo", "16"],
     ["--block (2, 8, 8)", "halo (0, 16, 16)"]),
    (["--seed-threshold", "1.5"], ["--seed-threshold"]),
    (["--overlap", "1.5"], ["--overlap"]),
    (["--classes", "x"], ["--classes"]),
])
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, model_and_raw, args, words):
    ckpt, raw = model_and_raw
    result = _cli("segment", ckpt, f"{raw}:raw", tmp_path / "out.zarr", "--device", "cpu", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "out.zarr").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_refuses_a_label_conditioned_checkpoint_and_wrong_arguments(tmp_path, model_and_raw):
    _, raw = model_and_raw
    config = dict(ndim=2, in_channels=1, out_channels=1, depth=1, base_width=2, cond_channels=1)
    lcs = tmp_path / "lcs.pt"
    save_checkpoint(lcs, {"model": build_model(config).state_dict(), "model_config": config})
    result = _cli("segment", lcs, f"{raw}:raw", tmp_path / "out.zarr", "--device", "cpu")
    assert result.exit_code == 2 and "label-conditioned" in result.stderr
    for argv in (["segment", lcs, tmp_path / "out.zarr"],
                 ["segment", "--from-probabilities", tmp_path / "p.zarr", lcs, tmp_path / "out.zarr"],
                 ["segment", "--from-probabilities", tmp_path / "p.zarr", tmp_path / "out.zarr", "--patch", "1,8,8"]):
        result = _cli(*argv)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out.zarr").exists()


# ----------------------------------------------------------------------------- resumable and on a cluster


def corridor():
    """Probabilities whose watershed needs flooding rounds (see the corridor test above)."""
    boundary = np.full((2, 12, 90), 0.9, np.float32)
    boundary[:, 2:10, 1:80] = 0.5
    boundary[:, 4:8, 2:8] = boundary[:, 4:8, 72:78] = 0.0
    boundary[1, 4:8, 40:44] = 0.0  # a third seed in the second section
    config = SegmentConfig(mode="watershed", boundary_classes=(1,), mask_threshold=0.7, seed_erosion=0,
                           seed_min_size=1, min_size=0, halo=(0, 4, 4), block_shape=(1, 12, 10))
    return np.stack([1 - boundary, boundary]), config


CASES = {
    "components-3d": lambda: (two_class(blobs()), SegmentConfig(classes=(1,), per_section=False, connectivity=2,
                                                                 min_size=5, block_shape=(4, 20, 24))),
    "watershed-3d": lambda: (two_class(blobs((8, 40, 44), 3, 0.5)),  # class 0 (between blobs) as the boundary
                             SegmentConfig(mode="watershed", boundary_classes=(0,), per_section=False, seed_erosion=1,
                                           min_size=3, halo=(2, 6, 6), block_shape=(4, 16, 20))),
    "watershed-refill": corridor,
}


def _zarr_probs(tmp_path: Path, probs: np.ndarray) -> str:
    zarr.create_array(store=str(tmp_path / "p.zarr"), shape=probs.shape, dtype=probs.dtype,
                      chunks=(probs.shape[0], 1) + probs.shape[2:])[...] = probs
    return str(tmp_path / "p.zarr")


def _read(path: Path) -> np.ndarray:
    return zarr.open_array(store=str(path), mode="r")[...]


@pytest.mark.parametrize("case", sorted(CASES))
def test_resumable_runs_write_the_ids_of_the_run_in_memory(tmp_path, case):
    """A resumable run (every pass's blocks as tasks, results kept on disk) writes exactly the ids
    of the in-memory run; the partial and its work folder are gone afterwards."""
    probs, config = CASES[case]()
    expected = np.zeros(probs.shape[1:], np.uint64)
    reference = segment_probabilities(probs, config, expected)
    assert reference.n_objects > 1
    if case == "watershed-refill":
        assert reference.stats.refilled > 0
    result = segment_probabilities(_zarr_probs(tmp_path, probs), config, str(tmp_path / "o.zarr/ids"),
                                   blockwise=BlockwiseOptions(resume=True))
    assert np.array_equal(_read(tmp_path / "o.zarr/ids"), expected)
    assert result.stats == reference.stats
    assert sorted(p.name for p in (tmp_path / "o.zarr").iterdir()) == ["ids", "zarr.json"]
    assert sorted(p.name for p in (tmp_path / "o.zarr/ids").iterdir()) == ["c", "zarr.json"]
    attrs = dict(zarr.open_array(store=str(tmp_path / "o.zarr/ids"), mode="r").attrs)
    assert attrs["output_type"] == "instances" and "emseg_resume" not in attrs


def test_a_failed_pass_resumes_with_only_the_missing_blocks(tmp_path, monkeypatch):
    """A block failing in the flood pass leaves the partial; the rerun repeats no finished block
    of any pass, computes the failed one and writes the ids of an uninterrupted run."""
    probs, config = corridor()
    expected = np.zeros(probs.shape[1:], np.uint64)
    reference = segment_probabilities(probs, config, expected)
    spec, out = _zarr_probs(tmp_path, probs), str(tmp_path / "o.zarr")
    calls: dict[str, list[int]] = {}

    def counting(name, fail=None):
        original = getattr(blockwise, name)

        def task(block, **kw):
            calls.setdefault(name, []).append(block.index)
            if block.index == fail:
                raise RuntimeError("disk full")
            return original(block, **kw)
        monkeypatch.setattr(blockwise, name, task)

    counting("_label_task")
    counting("_flood_task", fail=3)
    options = BlockwiseOptions(resume=True, retries=0)
    with pytest.raises(BlockFailed, match=r"block 3 \[0:1, 0:12, 30:40\] failed after 1 attempt\(s\) "
                                          r"\(RuntimeError: disk full\); finished blocks are kept in .*o.zarr.partial"):
        segment_probabilities(spec, config, out, blockwise=options)
    assert not Path(out).exists() and (tmp_path / "o.zarr.partial").is_dir()
    n_blocks = 2 * 9
    assert sorted(calls["_label_task"]) == list(range(n_blocks)) and len(calls["_flood_task"]) == n_blocks
    monkeypatch.undo()
    calls.clear()
    counting("_label_task")
    counting("_flood_task")
    counting("_relabel_task")
    result = segment_probabilities(spec, config, out, blockwise=options)
    assert "_label_task" not in calls and calls["_flood_task"] == [3]
    assert sorted(calls["_relabel_task"]) == list(range(n_blocks))
    assert np.array_equal(_read(tmp_path / "o.zarr"), expected) and result.stats == reference.stats
    assert result.n_objects == 5  # two cells in the first section, three in the second
    assert not (tmp_path / "o.zarr.partial").exists()


def _left_partial(tmp_path: Path, monkeypatch) -> tuple[np.ndarray, SegmentConfig, str, str]:
    """A resumable run of the corridor that failed in its last pass: (probs, config, input, output)."""
    probs, config = corridor()
    spec, out = _zarr_probs(tmp_path, probs), str(tmp_path / "o.zarr")

    def fail(block, **kw):
        raise RuntimeError("stop")
    monkeypatch.setattr(blockwise, "_relabel_task", fail)
    with pytest.raises(BlockFailed):
        segment_probabilities(spec, config, out, blockwise=BlockwiseOptions(resume=True, retries=0))
    monkeypatch.undo()
    assert (tmp_path / "o.zarr.partial").is_dir()
    return probs, config, spec, out


def test_a_partial_with_other_parameters_is_not_resumed(tmp_path, monkeypatch):
    probs, config, spec, out = _left_partial(tmp_path, monkeypatch)
    with pytest.raises(InputError, match="other parameters is here .*min_size"):
        segment_probabilities(spec, config.replace(min_size=5), out, blockwise=BlockwiseOptions(resume=True))
    segment_probabilities(spec, config, out, blockwise=BlockwiseOptions(resume=True))
    assert _read(Path(out)).max() == 5


def test_two_dask_worker_processes_write_the_ids_of_the_run_in_memory(tmp_path):
    """``scheduler = "local"``: every pass's tasks pickled to two worker processes; the ids equal
    the in-memory run's (components, and a watershed with flooding rounds)."""
    pytest.importorskip("distributed")
    for case in ("components-3d", "watershed-refill"):
        probs, config = CASES[case]()
        expected = np.zeros(probs.shape[1:], np.uint64)
        segment_probabilities(probs, config, expected)
        folder = tmp_path / case
        folder.mkdir()
        cfg = SegmentFileConfig(output=str(folder / "o.zarr"), probabilities=_zarr_probs(folder, probs),
                                segment=config, scheduler="local", workers=2)
        segment_file(cfg)
        assert np.array_equal(_read(folder / "o.zarr"), expected), case


def test_resumable_segment_with_the_network_equals_the_in_process_run(tmp_path, model_and_raw):
    ckpt, raw = model_and_raw
    # seeds at 0.25, as in the test above
    config = SegmentConfig(mode="watershed", seed_threshold=0.25,
                           boundary_classes=(2,), seed_erosion=1, min_size=0, per_section=False,
                           halo=(1, 8, 8), block_shape=(2, 32, 32))
    common = dict(model=str(ckpt), input=f"{raw}:raw", segment=config, device="cpu", precision="fp32")
    segment_file(SegmentFileConfig(output=str(tmp_path / "a.zarr"), **common))
    result = segment_file(SegmentFileConfig(output=str(tmp_path / "b.zarr"), resume=True, **common))
    assert result.n_objects > 0 and result.blocks == 8
    assert np.array_equal(_read(tmp_path / "a.zarr"), _read(tmp_path / "b.zarr"))


@pytest.mark.parametrize("args, words", [
    (["--resume"], ["out.h5", "--resume needs a zarr output"]),
    (["--scheduler", "tcp://127.0.0.1:1"], ["out.h5", "--scheduler needs a zarr output"]),
    (["--workers", "2"], ["--workers applies only when --scheduler is 'local'"]),
])
def test_cli_resumable_options_need_a_zarr_output(tmp_path, model_and_raw, args, words):
    ckpt, raw = model_and_raw
    result = _cli("segment", ckpt, f"{raw}:raw", f"{tmp_path / 'out.h5'}:ids", "--device", "cpu", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines
    assert not (tmp_path / "out.h5").exists()


def test_resumable_bad_input_is_one_input_error_and_chunking_is_checked_before_any_work(tmp_path):
    """Probabilities that are not probabilities: the InputError as it is (not retried, not a failed
    block). A block that cannot be chunked to tile the volume: refused before any pass, nothing
    left; a block longer than the volume along an axis is one block there, and fine."""
    probs, config = CASES["components-3d"]()
    bad = probs.copy()
    bad[:, 6:] *= 2
    spec = _zarr_probs(tmp_path, bad)
    with pytest.raises(InputError, match="do not sum to 1") as caught:
        segment_probabilities(spec, config, str(tmp_path / "o.zarr"), blockwise=BlockwiseOptions(resume=True))
    assert not isinstance(caught.value, BlockFailed)
    shutil.rmtree(tmp_path / "p.zarr")
    # 77 sections a block: the uint64 output tiles (chunks of 11), the uint32 local ids do not
    tall = tmp_path / "tall"
    tall.mkdir()
    with pytest.raises(InputError, match="does not tile"):
        segment_probabilities(_zarr_probs(tall, two_class(blobs((120, 100, 100)))), config.replace(
            block_shape=(77, 100, 100)), str(tall / "b.zarr"), blockwise=BlockwiseOptions(resume=True))
    assert not any(p.name.startswith("b.zarr") for p in tall.iterdir())
    spec = _zarr_probs(tmp_path, probs)
    expected = np.zeros(probs.shape[1:], np.uint64)
    segment_probabilities(probs, config.replace(block_shape=(13, 20, 24)), expected)
    segment_probabilities(spec, config.replace(block_shape=(13, 20, 24)), str(tmp_path / "c.zarr"),
                          blockwise=BlockwiseOptions(resume=True))
    assert np.array_equal(_read(tmp_path / "c.zarr"), expected)


def test_a_replaced_input_is_not_resumed(tmp_path, monkeypatch):
    probs, config, spec, out = _left_partial(tmp_path, monkeypatch)
    shutil.rmtree(tmp_path / "p.zarr")
    time.sleep(0.01)
    spec = _zarr_probs(tmp_path, probs[::-1].copy())
    with pytest.raises(InputError, match="other parameters is here .*input_mtime_ns"):
        segment_probabilities(spec, config, out, blockwise=BlockwiseOptions(resume=True))


def test_cli_resume_writes_what_the_in_process_command_writes(tmp_path):
    probs, config = CASES["components-3d"]()
    spec = _zarr_probs(tmp_path, probs)
    common = ["segment", "--from-probabilities", spec, "--classes", "1", "--3d", "--min-size", "5", "--block",
              "4,20,24", "--json"]
    plain = _cli(*common[:3], tmp_path / "a.zarr", *common[3:])
    resumed = _cli(*common[:3], tmp_path / "b.zarr", *common[3:], "--resume")
    assert plain.exit_code == 0 and resumed.exit_code == 0, resumed.output
    a, b = json.loads(plain.stdout), json.loads(resumed.stdout)
    assert a["n_objects"] == b["n_objects"] > 1 and a["merged_pairs"] == b["merged_pairs"]
    assert np.array_equal(_read(tmp_path / "a.zarr"), _read(tmp_path / "b.zarr"))
