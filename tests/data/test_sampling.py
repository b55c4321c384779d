"""Patch sampling: cube choice in proportion to prio, the ignored-fraction redraw rule, and patches
that are exactly the corresponding slices of the source volumes."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from conftest import write_h5
from emseg.engine.config import CubeConfig
from emseg.data import Augmenter, Cube, PatchSampler, open_cubes
from emseg.errors import InputError

K = 3


def _info(not_present=()):
    info = np.zeros((2, K), np.uint8)
    info[0] = 1
    for k in not_present:
        info[1, k] = 1
    return info


def _position_raw(shape) -> np.ndarray:
    """float32 raw whose value encodes the voxel position: z * 10000 + y * 100 + x."""
    z, y, x = np.indices(shape)
    return (z * 10000 + y * 100 + x).astype(np.float32)


def _start_of(patch: np.ndarray) -> tuple[int, int, int]:
    v = int(round(float(patch.reshape(-1)[0])))
    return v // 10000, (v // 100) % 100, v % 100


# --------------------------------------------------------------------------- cube choice


def test_cube_choice_follows_prio_chi_square():
    prios = [1.0, 2.0, 5.0, 0.5]
    cubes = [Cube(np.zeros((2, 8, 8), np.float32), np.zeros((2, 8, 8), np.int64), _info(), p) for p in prios]
    sampler = PatchSampler(cubes, (1, 4, 4))
    rng = np.random.default_rng(7)
    n = 3000
    counts = np.bincount([sampler.draw(rng)[3] for _ in range(n)], minlength=len(prios))
    expected = n * np.array(prios) / sum(prios)
    assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_cube_choice_discriminates_against_wrong_proportions():
    """The same chi-square check rejects uniform choice: the test above has power."""
    prios = [1.0, 2.0, 5.0, 0.5]
    cubes = [Cube(np.zeros((2, 8, 8), np.float32), None, _info(), p) for p in prios]
    sampler = PatchSampler(cubes, (1, 4, 4))
    rng = np.random.default_rng(8)
    counts = np.bincount([sampler.draw(rng)[3] for _ in range(3000)], minlength=len(prios))
    assert stats.chisquare(counts, np.full(len(prios), 750.0)).pvalue < 1e-6


def test_default_prio_is_proportional_to_cube_size(tmp_path):
    shapes = [(1, 16, 16), (2, 16, 32), (3, 24, 24)]
    entries = []
    for i, shape in enumerate(shapes):
        write_h5(tmp_path / f"c{i}.h5", raw=np.zeros(shape, np.uint8), label=np.zeros(shape, np.uint8))
        entries.append(CubeConfig(f"{tmp_path}/c{i}.h5:raw", f"{tmp_path}/c{i}.h5:label"))
    cubes = open_cubes(entries, K, (1, 8, 8))
    sizes = np.array([np.prod(s) for s in shapes], dtype=float)
    sampler = PatchSampler(cubes, (1, 8, 8))
    np.testing.assert_allclose(sampler.probabilities, sizes / sizes.sum())
    rng = np.random.default_rng(3)
    n = 3000
    counts = np.bincount([sampler.draw(rng)[3] for _ in range(n)], minlength=3)
    assert stats.chisquare(counts, n * sizes / sizes.sum()).pvalue > 1e-3


def test_explicit_prio_kept_and_missing_ones_default_to_one(tmp_path):
    write_h5(tmp_path / "c.h5", raw=np.zeros((2, 16, 16), np.uint8))
    spec = f"{tmp_path}/c.h5:raw"
    cubes = open_cubes([CubeConfig(spec, prio=3.0), CubeConfig(spec)], K, (1, 8, 8))
    assert [c.prio for c in cubes] == [3.0, 1.0]
    np.testing.assert_allclose(PatchSampler(cubes, (1, 8, 8)).probabilities, [0.75, 0.25])
    with pytest.raises(InputError, match="prio"):
        open_cubes([CubeConfig(spec, prio=0.0)], K, (1, 8, 8))


def test_no_cubes_is_value_error():
    with pytest.raises(ValueError):
        PatchSampler([], (1, 4, 4))


# --------------------------------------------------------------------------- ignored-fraction redraw


def _half_labelled_cube(info) -> Cube:
    """Labels only in columns x < 16 of a 32-wide volume: an 8-wide patch is <= 50 % ignored
    when it starts at x <= 12 (13 of 25 start positions)."""
    label = np.full((1, 32, 32), -1, np.int64)
    label[..., :16] = 0
    return Cube(np.zeros((1, 32, 32), np.float32), label, info, 1.0)


def _ignored_fractions(sampler, n, seed):
    rng = np.random.default_rng(seed)
    return np.array([np.mean(sampler.draw(rng)[1] < 0) for _ in range(n)])


def test_redraw_keeps_ignored_fraction_under_threshold():
    sampler = PatchSampler([_half_labelled_cube(_info())], (1, 8, 8), example_ignore_threshold=0.5)
    fractions = _ignored_fractions(sampler, 300, 0)
    assert fractions.max() <= 0.5


def test_without_threshold_patches_are_uniform():
    sampler = PatchSampler([_half_labelled_cube(_info())], (1, 8, 8), example_ignore_threshold=1.0)
    fractions = _ignored_fractions(sampler, 300, 0)
    # 12 of 25 start positions give more than half ignored voxels.
    share = np.mean(fractions > 0.5)
    assert stats.binomtest(int(np.sum(fractions > 0.5)), 300, 12 / 25).pvalue > 1e-3, share


def test_cubes_with_not_present_flags_are_not_redrawn():
    sampler = PatchSampler([_half_labelled_cube(_info(not_present=[2]))], (1, 8, 8),
                           example_ignore_threshold=0.5)
    fractions = _ignored_fractions(sampler, 300, 0)
    assert stats.binomtest(int(np.sum(fractions > 0.5)), 300, 12 / 25).pvalue > 1e-3


def test_fully_ignored_cube_still_returns_after_redraws():
    cube = Cube(np.zeros((1, 8, 8), np.float32), np.full((1, 8, 8), -1, np.int64), _info(), 1.0)
    sampler = PatchSampler([cube], (1, 4, 4), example_ignore_threshold=0.1, max_redraws=5)
    raw, label, info, index = sampler.draw(np.random.default_rng(0))
    assert label.shape == (1, 4, 4) and np.all(label == -1) and index == 0


# --------------------------------------------------------------------------- patch content


def test_patches_equal_source_slices_numpy():
    shape = (5, 40, 33)
    raw = _position_raw(shape)
    label = np.random.default_rng(0).integers(-1, K, shape)
    cube = Cube(raw, label, _info(), 1.0)
    patch = (2, 8, 16)
    sampler = PatchSampler([cube], patch)
    rng = np.random.default_rng(1)
    starts = set()
    for _ in range(200):
        r, lab, info, index = sampler.draw(rng)
        z, y, x = _start_of(r)
        sl = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
        assert r.dtype == np.float32 and lab.dtype == np.int64
        np.testing.assert_array_equal(r, raw[sl])
        np.testing.assert_array_equal(lab, label[sl])
        np.testing.assert_array_equal(info, _info())
        starts.add((z, y, x))
    # Every start position is reachable: the corners and many others are drawn.
    assert len(starts) > 150
    zs, ys, xs = zip(*starts)
    assert min(zs) == 0 and max(zs) == shape[0] - patch[0]
    assert max(ys) <= shape[1] - patch[1] and max(xs) <= shape[2] - patch[2]


def test_patches_from_h5_cubes_equal_source_slices(tmp_path):
    shape = (4, 24, 20)
    z, y, x = np.indices(shape)
    raw = (z * 1000 + y * 30 + x).astype(np.uint16)  # unique per voxel, uint16 -> divided by 65535
    label = ((z + y + x) % K).astype(np.uint8)
    write_h5(tmp_path / "c.h5", raw=raw, label=label)
    cubes = open_cubes([CubeConfig(f"{tmp_path}/c.h5:raw", f"{tmp_path}/c.h5:label")], K, (1, 8, 8))
    sampler = PatchSampler(cubes, (1, 8, 8), squeeze=True)
    rng = np.random.default_rng(2)
    for _ in range(50):
        r, lab, _, _ = sampler.draw(rng)
        assert r.shape == (8, 8) and lab.shape == (8, 8)  # squeezed for a 2D network
        v = int(round(float(r[0, 0]) * 65535))
        z0, rest = divmod(v, 1000)
        y0, x0 = divmod(rest, 30)
        sl = (z0, slice(y0, y0 + 8), slice(x0, x0 + 8))
        np.testing.assert_allclose(r, raw[sl].astype(np.float64) / 65535, rtol=1e-6)
        np.testing.assert_array_equal(lab, label[sl])


def test_batch_shapes_and_types():
    shape = (3, 16, 16)
    cubes = [Cube(_position_raw(shape), np.zeros(shape, np.int64), _info(), 1.0),
             Cube(_position_raw(shape), None, _info(not_present=[1]), 1.0)]
    sampler = PatchSampler(cubes, (1, 8, 8), squeeze=True)
    batch = sampler.batch(5, np.random.default_rng(0))
    assert batch["raw"].shape == (5, 1, 8, 8) and batch["raw"].dtype == np.float32
    assert batch["target"].shape == (5, 8, 8) and batch["target"].dtype == np.int64
    assert batch["labeled"].shape == (5, K) and batch["not_present"].shape == (5, K)
    for b in range(5):
        if batch["cube"][b] == 1:  # a cube without labels: everything ignored, flags kept
            assert np.all(batch["target"][b] == -1)
            np.testing.assert_array_equal(batch["not_present"][b], [0, 1, 0])
        else:
            assert np.all(batch["target"][b] == 0)
            np.testing.assert_array_equal(batch["not_present"][b], [0, 0, 0])


def test_augmentation_moves_raw_and_label_together():
    shape = (2, 16, 16)
    raw = _position_raw(shape)
    label = ((raw.astype(np.int64) * 7919) % 5).astype(np.int64) - 1  # a fixed function of position
    cube = Cube(raw, label, _info(), 1.0)
    sampler = PatchSampler([cube], (2, 8, 8))
    aug = Augmenter(flip=True, rotate90=True, brightness=0.0, contrast=0.0)
    batch = sampler.batch(40, np.random.default_rng(0), aug)
    expected = ((batch["raw"][:, 0].round().astype(np.int64) * 7919) % 5) - 1
    np.testing.assert_array_equal(batch["target"], expected)
    # The augmentation really changes geometry: not all patches keep the source orientation.
    d = np.diff(batch["raw"][:, 0], axis=-1)
    assert np.any(d < 0) and np.any(d > 0)


def test_sampling_does_not_modify_sources():
    raw = _position_raw((2, 16, 16))
    label = np.zeros((2, 16, 16), np.int64)
    raw_copy, label_copy = raw.copy(), label.copy()
    sampler = PatchSampler([Cube(raw, label, _info(), 1.0)], (1, 8, 8))
    sampler.batch(8, np.random.default_rng(0), Augmenter(brightness=0.5, contrast=0.5, elastic=True))
    np.testing.assert_array_equal(raw, raw_copy)
    np.testing.assert_array_equal(label, label_copy)
