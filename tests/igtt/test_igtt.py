"""Tests for emseg.igtt: threshold selection, inversion, EMS, baselines, pipeline, CLI."""
from __future__ import annotations

import csv
import json

import click
import h5py
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from scipy import ndimage as ndi
from skimage.filters import threshold_local, threshold_otsu
from skimage.morphology import skeletonize

from emseg.models.checkpoint import load_model
from emseg.cli._ui import AppState
from emseg.errors import InputError
from emseg.losses import dmi_loss
from emseg.igtt import (
    IGTTConfig,
    binary_metrics,
    candidate_thresholds,
    dmi_per_threshold,
    ems,
    run_igtt,
    invert_if_large,
    select_mask,
    threshold_baselines,
)
from emseg.semantic.predict import PredictConfig, predict_file
from emseg.cli.main import cli
from emseg.io import open_volume
from emseg.runtime import Runtime
from conftest import ome_group, ome_models, validated_ome_image, write_h5


# --------------------------------------------------------------------------- helpers
def brute_force_dmi(p: np.ndarray, s: np.ndarray) -> float:
    """-log|det(P S^T)| with P = [p; 1-p], S = [s; 1-s] (2 x N), as in the seed's equations 4-5."""
    p = p.reshape(-1).astype(np.float64)
    s = s.reshape(-1).astype(np.float64)
    big_p = np.stack([p, 1 - p])
    big_s = np.stack([s, 1 - s])
    det = np.linalg.det(big_p @ big_s.T)
    return float("inf") if det == 0 else -np.log(abs(det))


def smooth_prob(shape, seed=0, sigma=2.0):
    rng = np.random.default_rng(seed)
    f = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    return 1 / (1 + np.exp(-4 * f / f.std()))


def blob_image(size=48, seed=0):
    """Bright discs on dark noise, and their 0/1 truth."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    truth = np.zeros((size, size), np.int64)
    for cy, cx, r in [(12, 12, 5), (34, 14, 4), (18, 34, 6), (38, 38, 4)]:
        truth[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    img = rng.normal(50, 15, (size, size)) + 150 * truth
    return np.clip(img, 0, 255).astype(np.uint8), truth


TINY = dict(epochs=2, steps_per_epoch=3, batch_size=2, patch_shape=(32, 32), depth=2, base_width=4,
            n_thresholds=8, shift_radius=1, predict_window=32, adaptive_block_size=15,
            precision="fp32")  # outputs are compared exactly with other fp32 predictions


# --------------------------------------------------------------------------- threshold selection
def test_candidate_thresholds_are_evenly_spaced_from_min_to_max():
    p = smooth_prob((20, 30))
    t = candidate_thresholds(p, 7)
    np.testing.assert_allclose(t, np.linspace(p.min(), p.max(), 7))


@pytest.mark.parametrize("k", [5, 17, 40])
@pytest.mark.parametrize("seed", [0, 1])
def test_selection_picks_the_dmi_minimising_mask(k, seed):
    p = smooth_prob((40, 50), seed=seed)
    sel = select_mask(p, k, invert_large=False)
    thresholds = np.linspace(p.min(), p.max(), k)
    brute = [brute_force_dmi(p, p > t) for t in thresholds]
    best = int(np.argmin(brute))
    assert sel.index == best
    np.testing.assert_array_equal(sel.mask, p > thresholds[best])
    # the reported values are the N-normalised form: they differ from -log|det(P S^T)| by 2 log N
    finite = np.isfinite(brute)
    n = p.size
    np.testing.assert_allclose(dmi_per_threshold(p, thresholds, eps=0.0)[finite] - 2 * np.log(n),
                               np.asarray(brute)[finite], rtol=1e-9, atol=1e-9)


def test_dmi_per_threshold_equals_the_training_loss():
    p = smooth_prob((16, 16), seed=3)
    thresholds = np.linspace(p.min(), p.max(), 6)[1:-1]
    ours = dmi_per_threshold(p, thresholds)
    pt = torch.from_numpy(p)
    for t, value in zip(thresholds, ours):
        ref = float(dmi_loss(pt, torch.from_numpy((p > t).astype(np.int64))))
        assert value == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_constant_prediction_gives_empty_selection():
    sel = select_mask(np.full((8, 8), 0.3), 5)
    assert not sel.mask.any() and not sel.inverted


# --------------------------------------------------------------------------- inversion
def test_inversion_rule():
    m = np.zeros(10, bool)
    m[:6] = True  # 60 %
    out, flipped = invert_if_large(m)
    assert flipped and np.array_equal(out, ~m)
    half = np.zeros(10, bool)
    half[:5] = True
    out, flipped = invert_if_large(half)  # exactly half: unchanged
    assert not flipped and np.array_equal(out, half)
    out, flipped = invert_if_large(m, enabled=False)
    assert not flipped and np.array_equal(out, m)
    before = m.copy()
    invert_if_large(m)
    assert np.array_equal(m, before)  # input untouched


def test_selection_inverts_a_majority_mask_without_changing_its_dmi():
    # most voxels high: the best cut leaves a large "p > t" region
    rng = np.random.default_rng(0)
    p = np.where(rng.random((30, 30)) < 0.8, rng.uniform(0.7, 0.9, (30, 30)), rng.uniform(0.1, 0.3, (30, 30)))
    sel = select_mask(p, 10)
    raw_mask = p > sel.threshold
    assert raw_mask.mean() > 0.5 and sel.inverted
    np.testing.assert_array_equal(sel.mask, ~raw_mask)
    assert brute_force_dmi(p, sel.mask) == pytest.approx(brute_force_dmi(p, raw_mask))
    assert select_mask(p, 10, invert_large=False).mask.mean() > 0.5


# --------------------------------------------------------------------------- EMS
def _mask_2d():
    m = np.zeros((40, 40), bool)
    m[5:15, 5:30] = True
    m[22:35, 10:16] = True
    m[25:28, 20:38] = True
    return m


@pytest.mark.parametrize("radius,fraction", [(0, 1.0), (2, 0.5), (3, 0.2)])
def test_ems_is_a_shifted_sampled_skeleton(radius, fraction):
    m = _mask_2d()
    before = m.copy()
    lab = ems(m, radius=radius, fraction=fraction, rng=1)
    assert np.array_equal(m, before)
    assert set(np.unique(lab)) <= {-1, 0, 1}
    sk = skeletonize(m)
    fg = lab == 1
    # every foreground pixel lies within (Chebyshev) distance r of a skeleton pixel
    near = ndi.maximum_filter(sk, size=2 * radius + 1)
    assert near[fg].all()
    # no more foreground than the sampled share of the skeleton
    assert fg.sum() <= round(fraction * sk.sum()) + 1
    if radius == 0 and fraction == 1.0:
        np.testing.assert_array_equal(fg, sk)
        assert (lab >= 0).all()
    # the sampled fraction of the image (per class, rounded)
    assert abs((lab >= 0).mean() - fraction) <= 2 / lab.size
    # reproducible
    np.testing.assert_array_equal(lab, ems(m, radius=radius, fraction=fraction, rng=1))


def test_ems_on_a_stack_works_per_section():
    m = np.stack([_mask_2d(), _mask_2d()[::-1]])
    lab = ems(m, radius=2, fraction=1.0, rng=0)
    for z in range(2):
        sk = skeletonize(m[z])
        near = ndi.maximum_filter(sk, size=5)
        fg = lab[z] == 1
        # not vacuous: each section keeps most of its own skeleton (shifted; a few voxels may land
        # on one another or leave the image), and nothing far from it
        assert 0.75 * sk.sum() <= fg.sum() <= sk.sum()
        assert near[fg].all()


# --------------------------------------------------------------------------- baselines and metrics
@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_baselines_equal_direct_skimage_calls(offset):
    rng = np.random.default_rng(2)
    img = (rng.normal(170, 20, (2, 40, 40))).clip(0, 255).astype(np.uint8)
    img[:, 10:13, :] = 40  # dark minority structures
    img[:, :, 25:27] = 50
    b = threshold_baselines(img, block_size=15, offset=offset)
    t = threshold_otsu(img)
    ref = img > t
    if ref.mean() > 0.5:
        ref = ~ref
    assert b["otsu"].threshold == pytest.approx(t)
    np.testing.assert_array_equal(b["otsu"].mask, ref)
    assert b["otsu"].inverted
    local = np.stack([threshold_local(s, 15, method="gaussian", offset=offset) for s in img])
    ref = img > local
    if ref.mean() > 0.5:
        ref = ~ref
    np.testing.assert_array_equal(b["adaptive"].mask, ref)
    np.testing.assert_array_equal(b["adaptive"].score > 0, b["adaptive"].mask)
    # without the polarity rule the raw "brighter than threshold" masks come back
    np.testing.assert_array_equal(threshold_baselines(img, block_size=15, invert_large=False)["otsu"].mask, img > t)


def test_binary_metrics_against_direct_formulas():
    rng = np.random.default_rng(0)
    truth = (rng.random(300) < 0.3).astype(np.int64)
    score = truth * 0.4 + rng.random(300)
    mask = score > 0.7
    m = binary_metrics(score, mask, truth)
    inter = np.sum(mask & (truth == 1))
    assert m["dice"] == pytest.approx(2 * inter / (mask.sum() + truth.sum()))
    assert m["accuracy"] == pytest.approx(np.mean(mask == (truth == 1)))
    pos, neg = score[truth == 1], score[truth == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert m["auc"] == pytest.approx(pairs)


# --------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("bad", [dict(epochs=0), dict(n_thresholds=1), dict(sample_fraction=0.0),
                                 dict(shift_radius=-1), dict(patch_shape=(30, 32), depth=2),
                                 dict(dmi_weight=0.0, iou_weight=0.0), dict(adaptive_block_size=10)])
def test_bad_options_raise_value_error(bad):
    with pytest.raises(ValueError):
        IGTTConfig(**bad)


# --------------------------------------------------------------------------- pipeline
def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_pipeline_end_to_end_outputs_and_resume(tmp_path):
    img, truth = blob_image()
    before = img.copy()
    cfg = IGTTConfig(**TINY, save_pseudo_labels=True)
    full = run_igtt(img, cfg, tmp_path / "full", label=truth, runtime=Runtime(device="cpu", seed=3))
    assert np.array_equal(img, before)
    out = tmp_path / "full"
    assert full.complete and full.final_epoch == 2 and full.epochs_run == [1, 2]
    rows = _rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(r["dice"] and r["auc"] and r["accuracy"] for r in rows)
    assert rows[0]["mask_iou_prev"] == "" and 0.0 <= float(rows[1]["mask_iou_prev"]) <= 1.0
    assert set(full.baselines) == {"otsu", "adaptive"} and "dice" in full.baselines["otsu"]
    assert json.loads((out / "report.json").read_text())["final_epoch"] == 2

    # pseudo-labels: one dataset per epoch, values -1/0/1, about sample_fraction kept
    with h5py.File(out / "pseudo_labels.h5", "r") as fh:
        assert sorted(fh) == ["epoch_01", "epoch_02"]
        lab = fh["epoch_02"][...]
    assert lab.shape == img.shape and set(np.unique(lab)) <= {-1, 0, 1}
    assert abs((lab >= 0).mean() - cfg.sample_fraction) < 0.01

    # model.pt works with `emseg predict`; the written segmentation is the DMI choice on that output
    model, state = load_model(out / "model.pt")
    assert state["model_config"]["out_channels"] == 1
    with h5py.File(tmp_path / "img.h5", "w") as fh:
        fh["raw"] = img
    predict_file(PredictConfig(model=str(out / "model.pt"), input=f"{tmp_path / 'img.h5'}:raw",
                               output=str(tmp_path / "p.zarr"), device="cpu", precision="fp32"))
    p_net = zarr.open_array(str(tmp_path / "p.zarr"), mode="r")[...][0]
    pred = zarr.open_array(str(out / "prediction.zarr"), mode="r")
    seg = zarr.open_array(str(out / "segmentation.zarr"), mode="r")[...]
    inverted = bool(pred.attrs["inverted"])
    np.testing.assert_allclose(pred[...][0], 1 - p_net if inverted else p_net, atol=1e-5)
    ref = select_mask(p_net, cfg.n_thresholds)
    assert ref.inverted == inverted
    assert np.mean(seg.astype(bool) != ref.mask) < 1e-3  # equal up to float ties
    assert full.scores is not None and 0 <= full.scores["dice"] <= 1

    # interrupted after epoch 1, then resumed: epoch 2 only, same result as the full run
    part = run_igtt(img, cfg, tmp_path / "part", label=truth, runtime=Runtime(device="cpu", seed=3), stop_after=1)
    assert part.final_epoch == 1 and not part.complete
    assert not (tmp_path / "part" / "prediction.zarr").exists()
    first_rows = _rows(tmp_path / "part" / "metrics.csv")
    events = []
    resumed = run_igtt(img, cfg, tmp_path / "part", label=truth, runtime=Runtime(device="cpu", seed=3), resume=True,
                   progress=events.append)
    assert resumed.start_epoch == 1 and resumed.epochs_run == [2] and resumed.complete
    assert {e["epoch"] for e in events} == {2}
    assert min(e["step"] for e in events if e["phase"] == "train") == cfg.steps_per_epoch + 1
    resumed_rows = _rows(tmp_path / "part" / "metrics.csv")
    assert resumed_rows[0] == first_rows[0]  # epoch 1 kept as written (its timing too), not recomputed
    for a, b in zip(resumed_rows, rows):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}

    # guards: a second run into the same folder, and a resume with other options
    with pytest.raises(InputError, match="pass `resume` to continue it"):
        run_igtt(img, cfg, tmp_path / "part", runtime=Runtime(device="cpu", seed=3))
    with pytest.raises(InputError, match="other options"):
        run_igtt(img, IGTTConfig(**{**TINY, "shift_radius": 2}), tmp_path / "part", runtime=Runtime(device="cpu", seed=3), resume=True)
    with pytest.raises(InputError, match="nothing to resume"):
        run_igtt(img, cfg, tmp_path / "none", runtime=Runtime(device="cpu"), resume=True)


def test_cli_end_to_end_json(tmp_path):
    from emseg.cli.igtt import command

    img, truth = blob_image(seed=1)
    path = tmp_path / "blobs.h5"
    with h5py.File(path, "w") as fh:
        fh["raw"] = np.stack([img, img[::-1]])
        fh["label"] = np.stack([truth, truth[::-1]]).astype(np.uint8)
    out = tmp_path / "run"
    args = [f"{path}:raw", "--out", str(out), "--label", f"{path}:label", "--foreground", "1",
            "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--patch", "32,32", "--depth", "2",
            "--base-width", "4", "--thresholds", "6", "--predict-window", "32", "--adaptive-block", "15",
            "--no-ems", "--json", "--device", "cpu", "--seed", "1"]
    result = CliRunner().invoke(command, args, obj=AppState())
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["complete"] and payload["final_epoch"] == 1
    assert set(payload["baselines"]) == {"otsu", "adaptive"}
    assert set(payload["scores"]) == {"dice", "auc", "accuracy"}
    assert payload["rows"][0]["label_fraction"] == 1.0  # --no-ems trains on the dense mask
    assert (out / "model.pt").exists() and (out / "prediction.zarr").exists()
    assert zarr.open_array(str(out / "prediction.zarr"), mode="r").shape == (1, 2, 48, 48)


def test_igtt_is_a_command_and_noise_igtt_its_alias():
    from emseg.cli.igtt import command
    from emseg.cli.main import cli

    ctx = click.Context(cli)
    assert cli.get_command(ctx, "igtt") is command
    noise = cli.get_command(ctx, "noise")
    assert noise.get_command(click.Context(noise, parent=ctx), "igtt") is command
    for argv in (["igtt", "--help"], ["noise", "igtt", "--help"]):
        result = CliRunner().invoke(cli, argv)
        assert result.exit_code == 0 and "--epochs" in result.output and "--dmi-weight" in result.output


def test_mask_iou_matches_scikit_learn_jaccard():
    from sklearn.metrics import jaccard_score

    from emseg.igtt.run import mask_iou

    rng = np.random.default_rng(0)
    for p in (0.05, 0.5, 0.9):
        a, b = rng.random((2, 40, 30)) < p
        assert mask_iou(a, b) == pytest.approx(jaccard_score(a.ravel(), b.ravel()))
    empty = np.zeros((3, 3), bool)
    assert mask_iou(empty, empty) == 1.0 and mask_iou(empty, ~empty) == 0.0


def test_igtt_ome_zarr_option(tmp_path):
    img, _ = blob_image()
    h5 = write_h5(tmp_path / "img.h5", raw=img)
    opts = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--patch", "32,32", "--depth", "2",
            "--base-width", "4", "--predict-window", "32", "--no-baselines"]
    assert TINY["patch_shape"] == (32, 32)
    result = CliRunner().invoke(cli, ["noise", "igtt", f"{h5}:raw", "--out", str(tmp_path / "run"), *opts,
                                      "--ome-zarr", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run" / "prediction.ome.zarr"
    assert json.loads(result.stdout)["outputs"]["prediction.ome.zarr"] == str(out)
    validated_ome_image(out)
    ome_models().ImageLabel.from_zarr(ome_group(out / "labels" / "segmentation"))
    with open_volume(str(tmp_path / "run" / "prediction.zarr")) as p, open_volume(str(out)) as o:
        np.testing.assert_array_equal(p[...], o[...])
