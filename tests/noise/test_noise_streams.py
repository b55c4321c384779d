"""The voxel-keyed streams of ``emseg.noise.streams``: chunked hashing of boxes, exact-count
selection for every label layout, grid and chunk independence, uniformity."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy import stats

from emseg.noise import flip, random_labels, sample
from emseg.noise import streams, synthesis
from emseg.noise.blockwise import apply_noise, output_dtype, plan_noise_blocks, resolve_params, selection_for
from emseg.noise.counts import select
from emseg.noise.streams import (
    STREAM_RANDOM,
    STREAM_SELECT,
    Box,
    linear_index,
    stream_key,
    unit,
    voxel_hash,
)


def small_chunks(monkeypatch, size):
    """Hash and fill in chunks of ``size`` voxels, so small arrays take the multi-chunk paths."""
    monkeypatch.setattr(streams, "CHUNK", size)
    monkeypatch.setattr(synthesis, "CHUNK", size)


def binary_blobs(shape, seed=0, fg=0.1, dtype=np.uint8):
    """Binary labels with a foreground fraction of about ``fg`` in clumps (like mitochondria)."""
    rng = np.random.default_rng(seed)
    field = rng.standard_normal(shape).cumsum(-1).cumsum(-2)
    return (field > np.quantile(field, 1 - fg)).astype(dtype)


# --------------------------------------------------------------------------- chunked hashes of a box
@pytest.mark.parametrize("box", [
    Box.of((5, 7, 9)),                          # the whole volume: one run
    Box.of((3, 4, 5), (1, 2, 3), (5, 7, 9)),    # an inner block: runs of 5
    Box.of((2, 7, 9), (3, 0, 0), (5, 7, 9)),    # whole planes: one run of 126
    Box.of((2, 3, 9), (1, 4, 0), (5, 7, 9)),    # whole rows: runs of 27
    Box.of((6, 11), (3, 2), (20, 30)),          # 2D
    Box.of((0, 4, 4), (0, 0, 0), (3, 4, 4)),    # empty
])
@pytest.mark.parametrize("chunk", [1, 4, 9, 27, 63, 10**6])
def test_box_hashes_equal_voxel_hash_of_the_global_index(box, chunk):
    key = stream_key(5)
    expected = voxel_hash(key, STREAM_SELECT, linear_index(box.shape, box.origin, box.volume_shape).reshape(-1))
    got, position = [], 0
    for start, h in box.hashes(key, STREAM_SELECT, chunk):
        assert start == position and 0 < h.size <= chunk
        got.append(h.copy())
        position += h.size
    assert position == box.size
    np.testing.assert_array_equal(np.concatenate(got) if got else np.zeros(0, np.uint64), expected)


def test_voxel_hash_is_a_bijection_and_streams_differ():
    index = np.arange(1 << 16, dtype=np.uint64)
    h = voxel_hash(stream_key(1), STREAM_SELECT, index)
    assert np.unique(h).size == index.size
    assert not np.array_equal(h, voxel_hash(stream_key(1), STREAM_RANDOM, index))
    assert not np.array_equal(h, voxel_hash(stream_key(2), STREAM_SELECT, index))


# --------------------------------------------------------------------------- uniformity
@pytest.mark.parametrize("stride", [1, 1024, 1 << 20])
def test_hash_values_are_uniform_and_neighbours_independent(stride):
    # consecutive voxels (stride 1), voxels a row apart, voxels a plane apart
    n = 1 << 18
    u = unit(voxel_hash(stream_key(3), STREAM_SELECT, np.arange(n, dtype=np.uint64) * np.uint64(stride)))
    assert stats.chisquare(np.bincount((u * 256).astype(np.intp), minlength=256)).pvalue > 1e-4
    # pairs of neighbours: a 16 x 16 table of (u[i], u[i + 1]) must be flat
    pairs = (u[:-1:2] * 16).astype(np.intp) * 16 + (u[1::2] * 16).astype(np.intp)
    assert stats.chisquare(np.bincount(pairs, minlength=256)).pvalue > 1e-4
    # the class stream of the same voxels is uncorrelated with the selection stream
    v = unit(voxel_hash(stream_key(3), STREAM_RANDOM, np.arange(n, dtype=np.uint64) * np.uint64(stride)))
    assert abs(np.corrcoef(u, v)[0, 1]) < 5 / np.sqrt(n)


@pytest.mark.parametrize("op", ["flip", "sample"])
def test_selected_voxels_are_spatially_uniform(op):
    # one class, 64^3 voxels: the chosen voxels must spread evenly over 8 x 8 x 8 bins
    lab = np.zeros((64, 64, 64), np.uint8)
    p = 0.2
    chosen = flip(lab, p, rng=4) == 1 if op == "flip" else sample(lab, p, rng=4) == 0
    assert int(chosen.sum()) == round(p * lab.size)
    bins = chosen.reshape(8, 8, 8, 8, 8, 8).sum(axis=(1, 3, 5)).ravel()
    assert stats.chisquare(bins).pvalue > 1e-4
    # neighbours along x, y and z are chosen independently: P(both) = p^2
    for axis in range(3):
        a = np.moveaxis(chosen, axis, 0)
        both = np.count_nonzero(a[:-1] & a[1:]) / a[:-1].size
        assert both == pytest.approx(p * p, abs=5 * np.sqrt(p * p / a[:-1].size))


# --------------------------------------------------------------------------- exact counts, every layout
def layouts():
    rng = np.random.default_rng(0)
    shape = (3, 37, 41)
    multi = rng.integers(0, 4, size=shape)
    multi[rng.random(shape) < 0.05] = -1
    many = rng.integers(-1, 12, size=shape)
    return {
        "bool": binary_blobs(shape).astype(bool),
        "uint8 binary": binary_blobs(shape),
        "int8 with ignore": multi.astype(np.int8),
        "uint16 3 classes": rng.integers(0, 3, size=shape).astype(np.uint16),
        "int16 12 classes": many.astype(np.int16),
        "int32 12 classes": many.astype(np.int32),
        "int64 4 classes": multi.astype(np.int64),
        "int64 large ids": np.where(multi >= 0, multi * 70001 + 65536, -1).astype(np.int64),
        "uint64 large ids": (rng.integers(0, 10, size=shape) * (1 << 40)).astype(np.uint64),
    }


@pytest.mark.parametrize("name", sorted(layouts()))
@pytest.mark.parametrize("chunk", [None, 97])
def test_exact_counts_for_every_label_layout(monkeypatch, name, chunk):
    lab = layouts()[name]
    if chunk:
        small_chunks(monkeypatch, chunk)
    values = lab.astype(np.int64)
    classes = np.unique(values[values >= 0])
    kept = sample(lab, 0.37, rng=1)
    np.testing.assert_array_equal(kept[values < 0], -1)
    for k in classes:
        here = values == k
        assert int((kept[here] == lab[here]).sum()) == round(0.37 * int(here.sum())), (name, k)
    if classes.max() < 64:  # flip needs the classes 0..K-1
        noisy = flip(lab, 0.37, rng=1)
        np.testing.assert_array_equal(noisy[values < 0], -1)
        for k in classes:
            here = values == k
            assert int((noisy[here] != k).sum()) == round(0.37 * int(here.sum())), (name, k)


def test_exact_counts_round_halves_to_even():
    lab = np.zeros((4, 5), np.uint8)
    lab[0, :3] = 1  # n_1 = 3, n_0 = 17: p = 0.5 gives 1.5 -> 2 and 8.5 -> 8
    noisy = flip(lab, 0.5, rng=2)
    assert int(((lab == 1) & (noisy == 0)).sum()) == 2
    assert int(((lab == 0) & (noisy == 1)).sum()) == 8


@pytest.mark.parametrize("p", [0.0, 1e-6, 0.5, 1 - 1e-6, 1.0])
def test_exact_counts_at_the_ends_over_many_chunks(monkeypatch, p):
    small_chunks(monkeypatch, 1000)
    lab = binary_blobs((8, 64, 64), seed=3)
    noisy = flip(lab, p, rng=6)
    for k in (0, 1):
        n_k = int((lab == k).sum())
        assert int(((lab == k) & (noisy != k)).sum()) == round(p * n_k)


@pytest.mark.parametrize("dtype,k", [(np.uint8, 5), (np.uint8, 256), (np.int8, 128), (np.int16, 300),
                                     (np.uint64, 3), (np.int64, 7)])
def test_flip_moves_a_chosen_voxel_by_the_low_bits_of_its_selection_hash(dtype, k):
    # new = (old + 1 + draw) mod k, draw from the low 32 bits of the selection stream: no overflow
    # at the ends of the dtype (k = 256 in uint8, k = 128 in int8)
    rng = np.random.default_rng(0)
    lab = rng.integers(0, k, size=(4, 30, 33)).astype(dtype)
    if np.dtype(dtype).kind == "i":
        lab[0, 0, :5] = -1
    noisy = flip(lab, 0.6, n_classes=k, rng=2)
    h = voxel_hash(stream_key(2), STREAM_SELECT, np.arange(lab.size)).reshape(lab.shape)
    offset = 1 + (((h & np.uint64(0xFFFFFFFF)) * np.uint64(k - 1)) >> np.uint64(32)).astype(np.int64)
    expected = (lab.astype(np.int64) + offset) % k
    chosen = noisy != lab
    np.testing.assert_array_equal(noisy[chosen].astype(np.int64), expected[chosen])
    for c in range(min(k, 8)):
        here = lab == c
        assert int(chosen[here].sum()) == round(0.6 * int(here.sum()))


def test_missed_windows_are_widened_to_the_same_choice(monkeypatch):
    # sigmas = 0 leaves windows of a few voxels around each quantile: most miss and are widened
    small_chunks(monkeypatch, 500)
    lab = layouts()["int8 with ignore"].reshape(-1)
    box, key, fractions = Box.of((lab.size,)), stream_key(9), [0.2, 0.5, 1.0, 0.0]
    ref_sel, ref_mask = select(key, lab, box, fractions)
    got_sel, got_mask = select(key, lab, box, fractions, sigmas=0.0)
    np.testing.assert_array_equal(got_mask, ref_mask)
    np.testing.assert_array_equal(got_sel.thresholds, ref_sel.thresholds)
    np.testing.assert_array_equal(ref_sel.mask(lab, box), ref_mask)


# --------------------------------------------------------------------------- grid and chunk independence
CASES = {
    "flip": ({"p": 0.45}, lambda lab, seed: flip(lab, 0.45, rng=seed)),
    "flip-K5": ({"p": 0.45, "n_classes": 5}, lambda lab, seed: flip(lab, 0.45, n_classes=5, rng=seed)),
    "sample": ({"p": 0.1}, lambda lab, seed: sample(lab, 0.1, rng=seed)),
    "random": ({"p": 0.1}, lambda lab, seed: random_labels(lab.shape, 0.1, rng=seed, dtype=lab.dtype)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk", [None, 100])
def test_blockwise_equals_whole_array_on_several_grids(monkeypatch, case, chunk):
    # uint8 binary labels like the VNC mitochondria; grids with whole planes, whole rows, odd blocks
    lab = binary_blobs((6, 70, 90), seed=1)
    if chunk:
        small_chunks(monkeypatch, chunk)
    mode = case.split("-")[0]
    params, whole_fn = CASES[case]
    params = resolve_params(lab, mode, params)
    whole = whole_fn(lab, 21)
    selection = selection_for(lab, mode, params, 21)
    if selection is not None:
        ref = select(stream_key(21), lab.reshape(-1), Box.of(lab.shape),
                     0.1 if mode == "sample" else [0.45] * int(params["n_classes"]))[0]
        np.testing.assert_array_equal(selection.thresholds, ref.thresholds)
    for block in [(1, 70, 90), (6, 13, 17), (2, 70, 31), (4, 9, 90), (6, 70, 90)]:
        out = np.zeros(lab.shape, dtype=output_dtype(mode, params, lab.dtype))
        apply_noise(lab, out, mode, params, 21, blocks=plan_noise_blocks(lab.shape, mode, params, block),
                    selection=selection)
        np.testing.assert_array_equal(out, whole, err_msg=f"{case} {block}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunk_size_does_not_change_the_result(monkeypatch, case):
    lab = binary_blobs((5, 40, 52), seed=2)
    fn = CASES[case][1]
    expected = fn(lab, 8)
    for size in (1, 7, 64, 2080, 10400):  # 2080 = one plane, 10400 = the whole array
        small_chunks(monkeypatch, size)
        np.testing.assert_array_equal(fn(lab, 8), expected, err_msg=f"{case} chunk {size}")


# --------------------------------------------------------------------------- memory
def test_flip_memory_is_a_few_bytes_per_voxel():
    # the mask and the output (1 byte each) plus a chunk's scratch; never 8 bytes per voxel
    lab = binary_blobs((32, 512, 512), seed=0)
    tracemalloc.start()
    try:
        flip(lab, 0.45, rng=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * lab.nbytes + 8 * 8 * streams.CHUNK, peak / 2**20
