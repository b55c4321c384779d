"""Tests for emseg.noise: RCL / PCL / RL synthesis and transition matrices."""

from __future__ import annotations

import itertools
import json

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy import stats
from skimage import morphology

from emseg.noise import (
    TransitionMatrix,
    block_rng,
    dilate,
    erode,
    flip,
    flip_matrix,
    noise_report,
    random_label_matrix,
    random_labels,
    required_halo,
    sample,
    shift,
    skeleton,
    transition_matrix,
)


# --------------------------------------------------------------------------- #
# fixtures
# --------------------------------------------------------------------------- #
def blobs(shape, n_classes=2, sigma=3.0, seed=0, ignore_frac=0.0):
    """Smooth random label image with ``n_classes`` classes (and optional ignore)."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    edges = np.quantile(field, np.linspace(0, 1, n_classes + 1)[1:-1])
    lab = np.digitize(field, edges).astype(np.int64)
    if ignore_frac:
        lab[rng.random(shape) < ignore_frac] = -1
    return lab


@pytest.fixture
def multi3d():
    return blobs((6, 40, 40), n_classes=4, sigma=2.0, seed=1, ignore_frac=0.05)


@pytest.fixture
def binary2d():
    return blobs((96, 96), n_classes=2, sigma=3.0, seed=2)


# --------------------------------------------------------------------------- #
# flip
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("p", [0.0, 0.1, 0.45, 0.9, 1.0])
def test_flip_exact_counts_and_never_keeps_class(multi3d, p):
    noisy = flip(multi3d, p, rng=3)
    assert noisy.shape == multi3d.shape
    np.testing.assert_array_equal(noisy[multi3d == -1], -1)
    for k in range(4):
        here = multi3d == k
        n_k = int(here.sum())
        changed = int((noisy[here] != k).sum())
        # every chosen voxel leaves its class, so changed == number chosen
        assert changed == round(p * n_k)
        assert noisy[here].min() >= 0 and noisy[here].max() <= 3


@pytest.mark.parametrize("p", [0.2, 0.7])
def test_flip_and_sample_choose_every_voxel_equally_often(p):
    # exact-count selection must still be uniform over the voxels of a class
    clean = np.zeros((4, 6), dtype=np.int64)
    clean[:, :3] = 1
    clean[0, 0] = -1
    gen = np.random.default_rng(0)
    flipped = np.zeros(clean.shape)
    dropped = np.zeros(clean.shape)
    reps = 1500
    for _ in range(reps):
        flipped += flip(clean, p, rng=gen) != clean
        dropped += sample(clean, p, rng=gen) == -1
    assert flipped[0, 0] == 0 and dropped[0, 0] == reps  # ignore untouched
    for k in (0, 1):
        here = clean == k
        assert stats.chisquare(flipped[here]).pvalue > 1e-3
        assert stats.chisquare(dropped[here]).pvalue > 1e-3


def test_flip_binary_separate_fractions(binary2d):
    noisy = flip(binary2d, p_fg=0.3, p_bg=0.05, rng=0)
    n_fg, n_bg = int((binary2d == 1).sum()), int((binary2d == 0).sum())
    assert int(((binary2d == 1) & (noisy == 0)).sum()) == round(0.3 * n_fg)
    assert int(((binary2d == 0) & (noisy == 1)).sum()) == round(0.05 * n_bg)
    # p sets the default of the fraction not given explicitly
    noisy = flip(binary2d, 0.2, p_fg=0.0, rng=0)
    assert int(((binary2d == 1) & (noisy == 0)).sum()) == 0
    assert int(((binary2d == 0) & (noisy == 1)).sum()) == round(0.2 * n_bg)


def test_flip_targets_uniform_over_other_classes():
    k_total = 5
    rng = np.random.default_rng(11)
    clean = rng.integers(0, k_total, size=(40, 100))
    noisy = flip(clean, 0.8, rng=12)
    for k in range(k_total):
        targets = noisy[(clean == k) & (noisy != k)]
        observed = np.bincount(targets, minlength=k_total)
        assert observed[k] == 0
        others = np.delete(observed, k)
        # chi-square goodness of fit against the uniform distribution
        assert stats.chisquare(others).pvalue > 1e-3


def test_flip_n_classes_extends_targets():
    clean = np.zeros((20, 20), dtype=np.int64)
    clean[5:15, 5:15] = 1
    noisy = flip(clean, 1.0, n_classes=3, rng=0)
    assert set(np.unique(noisy[clean == 0])) == {1, 2}
    assert set(np.unique(noisy[clean == 1])) == {0, 2}


def test_flip_dtype_kept_or_promoted(binary2d):
    assert flip(binary2d.astype(np.uint8), 0.3, rng=0).dtype == np.uint8
    as_bool = flip(binary2d.astype(bool), 0.3, rng=0)
    assert as_bool.dtype.kind in "iu"
    np.testing.assert_array_equal(as_bool, flip(binary2d, 0.3, rng=0))


def test_flip_transition_diagonal_exact(multi3d):
    p = 0.37
    tm = transition_matrix(multi3d, flip(multi3d, p, rng=5))
    assert isinstance(tm, TransitionMatrix)
    for k in range(4):
        n_k = int((multi3d == k).sum())
        assert tm.matrix[k, k] == pytest.approx(1 - round(p * n_k) / n_k, abs=1e-12)
    np.testing.assert_allclose(tm.matrix.sum(axis=1), 1.0)


# --------------------------------------------------------------------------- #
# sample
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.93, 1.0])
def test_sample_exact_counts(multi3d, p):
    noisy = sample(multi3d, p, rng=4)
    np.testing.assert_array_equal(noisy[multi3d == -1], -1)
    labelled = noisy != -1
    # kept voxels keep their label
    np.testing.assert_array_equal(noisy[labelled], multi3d[labelled])
    for k in range(4):
        n_k = int((multi3d == k).sum())
        assert int((noisy == k).sum()) == round(p * n_k)


def test_sample_unsampled_background(binary2d):
    noisy = sample(binary2d, 0.2, rng=1, unsampled=0)
    assert noisy.min() >= 0
    n_fg = int((binary2d == 1).sum())
    assert int((noisy == 1).sum()) == round(0.2 * n_fg)
    assert np.all(binary2d[noisy == 1] == 1)


def test_sample_promotes_unsigned_for_ignore(binary2d):
    out = sample(binary2d.astype(np.uint8), 0.5, rng=0)
    assert out.dtype.kind == "i" and out.min() == -1


def test_noise_report_for_sample(multi3d):
    p = 0.3
    noisy = sample(multi3d, p, rng=2)
    rep = noise_report(multi3d, noisy)
    json.dumps(rep)
    assert rep["n_classes"] == 4 and rep["rank"] == 4
    for k in range(4):
        n_k = int((multi3d == k).sum())
        assert rep["clean_counts"][k] == n_k
        assert rep["kept_fraction"][k] == pytest.approx(round(p * n_k) / n_k)
        assert rep["labelled_fraction"][k] == pytest.approx(round(p * n_k) / n_k)
    # ignore excluded from the matrix: sampled labels agree everywhere
    np.testing.assert_allclose(rep["matrix"], np.eye(4))
    assert rep["agreement"] == 1.0


def test_noise_report_absent_class_is_none():
    clean = np.array([[0, 0, 1, 1]])
    rep = noise_report(clean, clean, n_classes=3)
    assert rep["kept_fraction"] == [1.0, 1.0, None]
    json.dumps(rep)


# --------------------------------------------------------------------------- #
# transition matrices and ranks (Lemma 2)
# --------------------------------------------------------------------------- #
def test_transition_matrix_matches_brute_force():
    rng = np.random.default_rng(8)
    clean = rng.integers(-1, 3, size=(7, 9))
    noisy = rng.integers(-1, 3, size=(7, 9))
    counts = np.zeros((3, 3))
    for c, n in zip(clean.ravel().tolist(), noisy.ravel().tolist(), strict=True):
        if c >= 0 and n >= 0:
            counts[c, n] += 1
    tm = transition_matrix(clean, noisy)
    np.testing.assert_array_equal(tm.counts, counts)
    q = counts / counts.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(tm.matrix, q)
    assert transition_matrix(clean, noisy, tol=0).rank == np.linalg.matrix_rank(counts)
    # default tolerance: 3 x the multinomial standard error of the singular values
    se = np.sqrt(sum((1 - (q[i] ** 2).sum()) / counts[i].sum() for i in range(3)))
    assert tm.sampling_error == pytest.approx(se, rel=1e-12)
    assert tm.tol == pytest.approx(3 * se, rel=1e-12)
    np.testing.assert_allclose(tm.singular_values, np.linalg.svd(q, compute_uv=False))
    assert tm.rank == max(1, int((np.linalg.svd(q, compute_uv=False) > 3 * se).sum()))
    assert not tm.matrix.flags.writeable
    assert json.loads(json.dumps(tm.to_dict()))["counts"] == counts.astype(int).tolist()


def test_population_rank_rl_one_rcl_full():
    for k_total in (2, 3, 5):
        assert np.linalg.matrix_rank(random_label_matrix(0.1, k_total)) == 1
        for p in (0.1, 0.45, 0.9 if k_total > 2 else 0.3):
            q = flip_matrix(p, k_total)
            np.testing.assert_allclose(q.sum(axis=1), 1.0)
            assert np.linalg.matrix_rank(q) == k_total
        # flipping (K-1)/K of every class destroys all information
        assert np.linalg.matrix_rank(flip_matrix((k_total - 1) / k_total, k_total)) == 1
    assert np.linalg.matrix_rank(flip_matrix(p_fg=0.7, p_bg=0.3)) == 1


@pytest.mark.parametrize("k_total", [2, 3, 5])
def test_statistical_rank_rl_one_flip_full_uninformative_flip_one(k_total):
    clean = blobs((4, 48, 48), n_classes=k_total, sigma=2.0, seed=k_total)
    assert set(np.unique(clean).tolist()) == set(range(k_total))
    uniform = (k_total - 1) / k_total
    for seed in range(5):
        for p in (0.1, uniform):
            rl = random_labels(clean.shape, p, n_classes=k_total, rng=seed)
            assert transition_matrix(clean, rl, k_total).rank == 1, (p, seed)
        for p in (0.3, uniform - 0.15):  # below (K-1)/K: every class survives
            tm = transition_matrix(clean, flip(clean, p, rng=seed), k_total)
            assert tm.rank == k_total, (p, seed, tm.singular_values, tm.tol)
        tm = transition_matrix(clean, flip(clean, uniform, rng=seed), k_total)
        assert tm.rank == 1, (seed, tm.singular_values, tm.tol)
        # the exact (numerical) rank of the empirical matrices is full: the tolerance matters
        assert transition_matrix(clean, random_labels(clean.shape, 0.1, n_classes=k_total, rng=seed),
                                 k_total, tol=0).rank == k_total


def test_rank_skips_classes_absent_from_the_clean_labels():
    clean = blobs((4, 48, 48), n_classes=4, sigma=2.0, seed=1)
    clean[clean == 2] = 3  # class 2 absent from the clean labels
    noisy = flip(clean, 0.3, n_classes=4, rng=2)  # but present in the noisy ones
    tm = transition_matrix(clean, noisy, 4)
    assert tm.classes == (0, 1, 3)
    assert len(tm.singular_values) == 3 and tm.rank == 3
    rep = noise_report(clean, noisy, 4)
    assert rep["rank"] == 3 and rep["rank_classes"] == [0, 1, 3]
    assert rep["kept_fraction"][2] is None
    # a tolerance given explicitly is used as is
    assert noise_report(clean, noisy, 4, tol=2.0)["rank"] == 1
    assert noise_report(clean, noisy, 4, tol=2.0)["rank_tol"] == 2.0


VNC = Path(__file__).resolve().parents[3] / "shared/data/drosophila_vnc/vnc_stack1.h5"


@pytest.mark.skipif(not VNC.exists(), reason="drosophila VNC data not available")
def test_statistical_rank_on_the_vnc_labels():
    import h5py

    with h5py.File(VNC, "r") as fh:
        clean = fh["label"][:4].astype(np.int16)
    present = sorted(int(v) for v in np.unique(clean) if v >= 0)
    k_total = max(present) + 1
    assert k_total == 5
    uniform = (k_total - 1) / k_total
    rl = random_labels(clean.shape, 0.3, n_classes=k_total, rng=0)
    assert transition_matrix(clean, rl, k_total).rank == 1
    assert transition_matrix(clean, flip(clean, 0.45, n_classes=k_total, rng=0), k_total).rank == len(present)
    assert transition_matrix(clean, flip(clean, uniform, n_classes=k_total, rng=0), k_total).rank == 1


def test_empirical_matches_flip_matrix(multi3d):
    tm = transition_matrix(multi3d, flip(multi3d, 0.6, rng=1))
    np.testing.assert_allclose(tm.matrix, flip_matrix(0.6, 4), atol=0.05)


# --------------------------------------------------------------------------- #
# random labels
# --------------------------------------------------------------------------- #
def test_random_labels_binary_rate():
    n, p = 200 * 200, 0.1
    lab = random_labels((200, 200), p, rng=0)
    assert lab.shape == (200, 200) and set(np.unique(lab)) <= {0, 1}
    assert abs(lab.sum() - n * p) < 5 * np.sqrt(n * p * (1 - p))


def test_random_labels_multiclass_distribution():
    lab = random_labels((4, 60, 60), 0.6, n_classes=4, rng=1)
    observed = np.bincount(lab.ravel(), minlength=4)
    expected = lab.size * np.array([0.4, 0.2, 0.2, 0.2])
    assert stats.chisquare(observed, expected).pvalue > 1e-3


# --------------------------------------------------------------------------- #
# dilate / erode against scikit-image and brute force
# --------------------------------------------------------------------------- #
def reference_footprint(ndim, radius):
    if radius == 1:
        return np.ones((3,) * ndim, dtype=bool)
    return morphology.disk(radius) if ndim == 2 else morphology.ball(radius)


@pytest.mark.parametrize("shape", [(48, 48), (12, 20, 20)])
@pytest.mark.parametrize("radius", [1, 2, 3])
def test_dilate_erode_single_class_equal_skimage(shape, radius):
    lab = blobs(shape, sigma=2.0, seed=radius)
    mask = lab == 1
    fp = reference_footprint(len(shape), radius)
    np.testing.assert_array_equal(dilate(lab, radius), morphology.dilation(mask, fp))
    np.testing.assert_array_equal(erode(lab, radius), morphology.erosion(mask, fp))


@pytest.mark.parametrize("radius", [1, 2])
def test_per_section_equals_slicewise_skimage(radius):
    lab = blobs((5, 30, 30), sigma=2.0, seed=7)
    fp = reference_footprint(2, radius)
    dil = np.stack([morphology.dilation(s == 1, fp) for s in lab])
    ero = np.stack([morphology.erosion(s == 1, fp) for s in lab])
    np.testing.assert_array_equal(dilate(lab, radius, per_section=True), dil)
    np.testing.assert_array_equal(erode(lab, radius, per_section=True), ero)


def footprint_offsets(ndim, radius):
    fp = reference_footprint(ndim, radius)
    centre = np.array(fp.shape) // 2
    return [tuple(o) for o in np.argwhere(fp) - centre]


def shifted_views(lab, offsets, pad_value):
    """For each offset o, the array v with v[x] = lab[x + o] (pad outside)."""
    r = max(max(abs(c) for c in o) for o in offsets)
    padded = np.pad(lab, r, constant_values=pad_value)
    for o in offsets:
        yield padded[tuple(slice(r + c, r + c + n) for c, n in zip(o, lab.shape, strict=True))]


@pytest.mark.parametrize("radius", [1, 2])
def test_dilate_multiclass_brute_force(multi3d, radius):
    offsets = footprint_offsets(3, radius)
    # each background voxel takes the highest class among its footprint
    best = np.zeros_like(multi3d)
    for view in shifted_views(multi3d, offsets, pad_value=0):
        best = np.maximum(best, view)
    expected = np.where(multi3d == 0, best, multi3d)
    np.testing.assert_array_equal(dilate(multi3d, radius), expected)


@pytest.mark.parametrize("radius", [1, 2])
def test_erode_multiclass_brute_force(multi3d, radius):
    offsets = footprint_offsets(3, radius)
    expected = multi3d.copy()
    outside = -99
    for k in range(1, 4):
        survive = multi3d == k
        for view in shifted_views(multi3d, offsets, pad_value=outside):
            survive &= (view == k) | (view == outside)
        expected[(multi3d == k) & ~survive] = 0
    np.testing.assert_array_equal(erode(multi3d, radius), expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint32, bool])
def test_dtypes_give_same_labels(dtype):
    lab = blobs((24, 24), sigma=2.0, seed=5)
    cast = lab.astype(dtype)
    for fn in (
        lambda x: dilate(x, 2),
        lambda x: erode(x, 2),
        lambda x: skeleton(x),
        lambda x: shift(x, 1, rng=0),
        lambda x: flip(x, 0.3, rng=0),
        lambda x: sample(x, 0.3, rng=0),
    ):
        out = fn(cast)
        assert out.shape == lab.shape
        np.testing.assert_array_equal(out.astype(np.int64), fn(lab))


def test_radius_zero_is_copy(multi3d):
    for fn in (dilate, erode):
        out = fn(multi3d, 0)
        np.testing.assert_array_equal(out, multi3d)
        assert out is not multi3d and not np.shares_memory(out, multi3d)


def test_blockwise_dilate_erode_exact_with_halo(multi3d):
    radius = 2
    h = required_halo("dilate", radius)
    assert h == required_halo("erode", radius) == radius
    for fn in (dilate, erode):
        full = fn(multi3d, radius)
        out = np.zeros_like(multi3d)
        bs = 16
        for y0, x0 in itertools.product(range(0, 40, bs), repeat=2):
            ys, xs = max(y0 - h, 0), max(x0 - h, 0)
            block = fn(multi3d[:, ys : y0 + bs + h, xs : x0 + bs + h], radius)
            core = (slice(None), slice(y0 - ys, y0 - ys + bs), slice(x0 - xs, x0 - xs + bs))
            out[:, y0 : y0 + bs, x0 : x0 + bs] = block[core]
        np.testing.assert_array_equal(out, full)


# --------------------------------------------------------------------------- #
# skeleton
# --------------------------------------------------------------------------- #
def test_skeleton_inside_and_one_pixel_wide(binary2d):
    sk = skeleton(binary2d)
    on = sk == 1
    assert on.any()
    assert np.all(binary2d[on] == 1)
    assert set(np.unique(sk)) <= {0, 1}
    # no 2x2 block of skeleton pixels
    blocks = on[:-1, :-1] & on[1:, :-1] & on[:-1, 1:] & on[1:, 1:]
    assert not blocks.any()
    np.testing.assert_array_equal(on, morphology.skeletonize(binary2d == 1))


def test_skeleton_multiclass_per_class_and_ignore(multi3d):
    sk = skeleton(multi3d)  # per_section default
    np.testing.assert_array_equal(sk[multi3d == -1], -1)
    for k in range(1, 4):
        expected = np.stack([morphology.skeletonize(s == k) for s in multi3d])
        np.testing.assert_array_equal(sk == k, expected)
    assert set(np.unique(sk)) <= {-1, 0, 1, 2, 3}


def test_skeleton_3d_uses_3d_thinning():
    lab = blobs((16, 24, 24), sigma=2.0, seed=3)
    np.testing.assert_array_equal(
        skeleton(lab, per_section=False) == 1, morphology.skeletonize(lab == 1)
    )


def test_skeleton_blockwise_with_recommended_halo():
    lab = blobs((128, 128), sigma=3.0, seed=4)
    width = int(np.ceil(2 * ndi.distance_transform_edt(lab == 1).max()))
    h = required_halo("skeleton", max_width=width)
    full = skeleton(lab)
    out = np.zeros_like(lab)
    bs = 32
    for y0, x0 in itertools.product(range(0, 128, bs), repeat=2):
        ys, xs = max(y0 - h, 0), max(x0 - h, 0)
        block = skeleton(lab[ys : y0 + bs + h, xs : x0 + bs + h])
        out[y0 : y0 + bs, x0 : x0 + bs] = block[y0 - ys : y0 - ys + bs, x0 - xs : x0 - xs + bs]
    np.testing.assert_array_equal(out, full)


# --------------------------------------------------------------------------- #
# shift
# --------------------------------------------------------------------------- #
def sparse_points(shape, spacing, seed=0):
    lab = np.zeros(shape, dtype=np.int64)
    grid = tuple(slice(spacing // 2, n - spacing // 2, spacing) for n in shape)
    lab[grid] = np.random.default_rng(seed).integers(1, 3, size=lab[grid].shape)
    return lab


def disc_points(r, dims=2):
    """Integer offsets within Euclidean radius r, enumerated independently of the code."""
    import itertools

    return [d for d in itertools.product(range(-r, r + 1), repeat=dims) if sum(v * v for v in d) <= r * r]


def matched_offsets(lab, out, r):
    """Offset of every source voxel to its unique destination in a (2r+1) window."""
    offsets = []
    for y, x in np.argwhere(lab > 0):
        win = out[max(y - r, 0) : y + r + 1, max(x - r, 0) : x + r + 1]
        hits = np.argwhere(win > 0)
        assert len(hits) <= 1
        if len(hits):
            dy, dx = hits[0]
            assert win[dy, dx] == lab[y, x]
            offsets.append((dy + max(y - r, 0) - y, dx + max(x - r, 0) - x))
    return offsets


@pytest.mark.parametrize("r", [2, 3])
def test_shift_offsets_within_the_disc_and_uniform_over_its_points(r):
    lab = sparse_points((240, 240), spacing=2 * r + 2)
    out = shift(lab, r, rng=0)
    offsets = matched_offsets(lab, out, r)
    assert len(offsets) == int((lab > 0).sum())  # spacing > 2r and sources >= r from the border
    points = disc_points(r)
    assert all(o in points for o in offsets)  # inside the disc, not the (2r+1)^2 square
    observed = np.array([offsets.count(p) for p in points])
    assert observed.min() > 0
    assert stats.chisquare(observed).pvalue > 1e-3


def test_shift_3d_ball_and_per_section_disc():
    r = 2
    lab = np.zeros((60, 60, 60), np.int64)
    lab[3:-3:6, 3:-3:6, 3:-3:6] = 1
    out = shift(lab, r, rng=4)
    ball = np.array(disc_points(r, 3))
    src, dst = np.argwhere(lab > 0), np.argwhere(out > 0)
    assert len(dst) == len(src)
    # sources are 6 apart: each destination lies within r of exactly one source
    d = dst[:, None, :] - src[None, :, :]
    near = (d ** 2).sum(-1) <= r * r
    assert np.all(near.sum(1) == 1)
    moved = d[near]
    assert {tuple(v) for v in moved} <= {tuple(v) for v in ball}
    assert np.abs(moved[:, 0]).max() == r  # z moves in 3D
    sec = shift(lab, r, per_section=True, rng=4)
    for z in range(lab.shape[0]):
        assert (sec[z] > 0).sum() == (lab[z] > 0).sum()  # z kept, nothing dropped


def test_shift_drops_voxels_that_leave_the_image():
    r = 2
    lab = np.zeros((8, 3000), np.int64)
    lab[0, 3::6] = 1  # sources on the border row, 6 apart
    n = int(lab.sum())
    out = shift(lab, r, rng=5)
    points = disc_points(r)
    p_stay_row = sum(1 for dy, _ in points if dy == 0) / len(points)  # 5/13
    p_drop = sum(1 for dy, _ in points if dy < 0) / len(points)  # 4/13
    on_border = int(out[0].sum())
    kept = int(out.sum())
    sd = np.sqrt(n * p_drop * (1 - p_drop))
    assert abs((n - kept) - n * p_drop) < 4 * sd
    sd = np.sqrt(n * p_stay_row * (1 - p_stay_row))
    assert abs(on_border - n * p_stay_row) < 4 * sd
    # clipping would have put every upward move on the border row: 9/13 of the sources
    assert on_border < n * (p_stay_row + p_drop) - 4 * sd


def test_shift_collisions_and_ignore():
    lab = np.full((3, 3), 2, dtype=np.int64)
    lab[1, 1] = -1
    lab[0, 0] = 1
    out = shift(lab, 5, rng=2)
    assert out[1, 1] == -1
    assert out[(out >= 0)].max() <= 2
    # at most as many labelled voxels as before; voxels never create classes
    assert int((out > 0).sum()) <= int((lab > 0).sum())


def test_shift_radius_zero_identity(multi3d):
    np.testing.assert_array_equal(shift(multi3d, 0, rng=0), multi3d)


# --------------------------------------------------------------------------- #
# determinism, immutability, blockwise rng
# --------------------------------------------------------------------------- #
RANDOM_OPS = [
    lambda lab, rng: flip(lab, 0.3, rng=rng),
    lambda lab, rng: sample(lab, 0.3, rng=rng),
    lambda lab, rng: shift(lab, 2, rng=rng),
    lambda lab, rng: random_labels(lab.shape, 0.3, n_classes=3, rng=rng),
]


@pytest.mark.parametrize("op", RANDOM_OPS)
def test_determinism_per_seed(multi3d, op):
    a = op(multi3d, 123)
    np.testing.assert_array_equal(a, op(multi3d, 123))
    np.testing.assert_array_equal(a, op(multi3d, np.random.default_rng(123)))
    assert not np.array_equal(a, op(multi3d, 124))


ALL_OPS = RANDOM_OPS + [
    lambda lab, rng: dilate(lab, 1),
    lambda lab, rng: erode(lab, 2, per_section=True),
    lambda lab, rng: skeleton(lab),
    lambda lab, rng: skeleton(lab, per_section=False),
    lambda lab, rng: transition_matrix(lab, lab),
    lambda lab, rng: noise_report(lab, lab),
]


@pytest.mark.parametrize("op", ALL_OPS)
def test_input_not_modified(multi3d, op):
    before = multi3d.copy()
    op(multi3d, 0)
    np.testing.assert_array_equal(multi3d, before)


def test_block_rng_matches_spawn():
    children = np.random.SeedSequence(42).spawn(3)
    for i, child in enumerate(children):
        expected = np.random.default_rng(child).random(4)
        np.testing.assert_array_equal(block_rng(42, i).random(4), expected)
    nested = np.random.SeedSequence(42).spawn(2)[1].spawn(3)[2]
    np.testing.assert_array_equal(
        block_rng(42, (1, 2)).random(4), np.random.default_rng(nested).random(4)
    )
    assert not np.array_equal(block_rng(42, (0, 1)).random(4), block_rng(42, (1, 0)).random(4))


def test_required_halo_values():
    assert [required_halo(m, 3) for m in ("flip", "sample", "random")] == [0, 0, 0]
    assert [required_halo(m, 3) for m in ("dilate", "erode", "shift")] == [3, 3, 3]
    assert required_halo("skeleton", max_width=10) > 10


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
LAB = np.zeros((8, 8), dtype=np.int64)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: flip(LAB, 1.5), r"p must be in \[0, 1\], got 1.5"),
        (lambda: flip(LAB, -0.1), r"p must be in \[0, 1\]"),
        (lambda: flip(LAB, float("nan")), r"p must be in \[0, 1\]"),
        (lambda: flip(LAB, "0.5"), r"p must be a number"),
        (lambda: flip(LAB), r"flip needs p"),
        (lambda: flip(LAB, p_fg=2.0), r"p_fg must be in \[0, 1\]"),
        (lambda: flip(LAB + 2, p_fg=0.1), r"binary labels only .* n_classes=3"),
        (lambda: flip(LAB + 2, 0.1, n_classes=2), r"contain class 2 but n_classes=2"),
        (lambda: flip(LAB, 0.1, n_classes=1), r"n_classes must be an integer >= 2"),
        (lambda: flip(LAB.astype(float), 0.1), r"integer dtype, got float64"),
        (lambda: flip(LAB[0], 0.1), r"2D \(y, x\) or 3D \(z, y, x\), got 1D"),
        (lambda: flip(LAB[None, None], 0.1), r"got 4D"),
        (lambda: flip(LAB - 2, 0.1), r">= -1 .* got minimum -2"),
        (lambda: sample(LAB, 1.01), r"p must be in \[0, 1\]"),
        (lambda: sample(LAB, 0.5, unsampled=3), r"unsampled must be -1"),
        (lambda: dilate(LAB, -1), r"radius must be an integer >= 0, got -1"),
        (lambda: erode(LAB, 1.5), r"radius must be an integer >= 0, got 1.5"),
        (lambda: dilate(LAB.astype(np.float32), 1), r"integer dtype"),
        (lambda: erode(LAB, 1, per_section="yes"), r"per_section must be True or False"),
        (lambda: skeleton(LAB[0]), r"got 1D"),
        (lambda: shift(LAB, -2), r"radius must be an integer >= 0"),
        (lambda: random_labels((8,), 0.1), r"shape must be 2D"),
        (lambda: random_labels((8, 8), 2.0), r"p must be in \[0, 1\]"),
        (lambda: random_labels((8, 8), 0.1, n_classes=1), r"n_classes must be"),
        (lambda: transition_matrix(LAB, LAB[:4]), r"shapes differ"),
        (lambda: transition_matrix(LAB, LAB, tol=-1.0), r"tol must be"),
        (lambda: required_halo("blur", 1), r"mode must be one of"),
        (lambda: required_halo("skeleton"), r"needs max_width"),
        (lambda: flip_matrix(0.2, 3, p_fg=0.1), r"binary labels only"),
        (lambda: random_label_matrix(-0.5), r"p must be in \[0, 1\]"),
    ],
)
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_noise_imports_without_torch():
    """The synthesis, the blockwise runner and the transition matrix need only numpy and scikit-image."""
    import subprocess
    import sys

    code = ("import sys, emseg.noise, emseg.noise.blockwise, emseg.noise.transition; "
            "print(sorted(m for m in ('torch', 'click', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
