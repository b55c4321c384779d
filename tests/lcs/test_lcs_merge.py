"""LCS calibrated merge (per-label logit calibration fitted on the atlas, streamed) and the split
augmentation (condition on one part of a class, in atlas and target alike)."""
from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import write_h5
from emseg.cli.main import cli
from emseg.errors import InputError
from emseg.io import open_volume
from emseg.lcs import LabelPredictor, LCSTask, lcs_config_from_dict, load_lcs_model, merge_labels, train_lcs
from emseg.lcs.calibrate import MAX_FIT_ENTRIES, MAX_FIT_VOXELS, Calibration, fit_calibration, fit_subsample, prob_logit
from emseg.lcs.merge import CalibratedMerge, calibrated_merge
from emseg.lcs.split import split_part, split_target, thick_part
from emseg.runtime import Runtime
from test_lcs import _random_model_and_atlas, _write_config, build, data_h5  # noqa: F401 (fixture)

sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731


def overconfident_case(n, rng):
    """Labels 1 ('membrane') and 2 ('glia'): label 1's map is high on label 2's voxels too, and
    higher than label 2's own map there, so the largest sigmoid picks 1 on every voxel of 2."""
    truth = rng.choice([0, 1, 2], size=n, p=[0.5, 0.3, 0.2])
    mean1 = np.select([truth == 0, truth == 1, truth == 2], [-4.0, 4.0, 4.0])
    mean2 = np.select([truth == 0, truth == 1, truth == 2], [-4.0, -3.0, 2.0])
    z = np.stack([mean1 + rng.normal(0, 0.5, n), mean2 + rng.normal(0, 0.5, n)])
    return truth, sigmoid(z).astype(np.float32)


def test_calibrated_merge_recovers_the_label_map_where_max_fails():
    rng = np.random.default_rng(0)
    atlas_truth, atlas_probs = overconfident_case(4000, rng)
    cal = fit_calibration(prob_logit(atlas_probs), atlas_truth, [1, 2])
    assert cal.nll_after < 0.5 * cal.nll_before
    truth, probs = overconfident_case(20000, rng)  # new voxels, same behaviour
    maxed = merge_labels(probs, [1, 2])
    assert np.mean(maxed[truth == 2] == 2) < 0.01  # max: glia is lost under membrane
    merged = calibrated_merge(probs, cal)
    for c in (0, 1, 2):
        assert np.mean(merged[truth == c] == c) > 0.99
    # labels not requested count as background in the fit; the label order follows `labels`
    cal2 = fit_calibration(prob_logit(atlas_probs[::-1]), np.where(atlas_truth == 0, 7, atlas_truth), [2, 1])
    np.testing.assert_allclose(cal2.scale[::-1], cal.scale, rtol=1e-3)


def test_calibrated_merge_equals_an_all_at_once_softmax():
    rng = np.random.default_rng(1)
    probs = rng.random((5, 40, 30)).astype(np.float32)
    probs[0, 0, :5] = 1.0  # saturated probabilities are clipped, not infinite
    labels = (4, 9, 2, 7, 1)
    cal = Calibration(labels, tuple(rng.uniform(0.3, 3, 5)), tuple(rng.normal(0, 1.5, 5)))
    # reference: the full (K + 1) softmax in float64 with torch, background logit 0
    p = torch.from_numpy(probs.astype(np.float64)).clamp(1e-6, 1 - 1e-6)
    s = torch.tensor(cal.scale, dtype=torch.float64)[:, None, None] * torch.logit(p) + \
        torch.tensor(cal.offset, dtype=torch.float64)[:, None, None]
    soft = torch.softmax(torch.cat([torch.zeros(1, 40, 30, dtype=torch.float64), s]), dim=0)
    expected = np.array((0,) + labels)[soft.argmax(0).numpy()]
    streamed = CalibratedMerge(cal, (40, 30))
    for k in range(5):
        streamed.update(k, probs[k])
    np.testing.assert_array_equal(streamed.result(), expected)
    np.testing.assert_array_equal(calibrated_merge(probs, cal), expected)
    np.testing.assert_allclose(streamed.probability(), soft.max(0).values.numpy(), rtol=1e-4)
    # identity calibration: background wins exactly where every p_k <= 0.5
    ident = calibrated_merge(probs, Calibration(labels, (1.0,) * 5, (0.0,) * 5))
    np.testing.assert_array_equal(ident == 0, probs.max(0) <= 0.5)


def test_calibrated_merge_memory_is_flat_in_the_number_of_labels():
    shape = (64, 256)
    rng = np.random.default_rng(2)

    def peak(k):
        cal = Calibration(tuple(range(1, k + 1)), (1.0,) * k, (0.0,) * k)
        tracemalloc.start()
        merge = CalibratedMerge(cal, shape)
        for i in range(k):
            merge.update(i, rng.random(shape, dtype=np.float32))  # one map at a time, then dropped
        merge.result()
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top

    small, large = peak(2), peak(40)
    assert large < 1.1 * small
    assert small < 16 * np.prod(shape) * 4  # a few maps of the block, not K of them


def test_fit_subsample_is_stratified_bounded_and_reweighted():
    rng = np.random.default_rng(5)
    label = rng.choice([0, 1, 2, 3, -1], size=(40, 50, 60), p=[0.7, 0.2, 0.05, 0.001, 0.049])
    for labels in ([1, 2, 3], list(range(1, 40))):
        index, weight = fit_subsample(label, labels)
        assert len(labels) * index.size <= max(MAX_FIT_ENTRIES, 256 * (len(labels) + 1) * len(labels))
        assert index.size <= MAX_FIT_VOXELS and np.all(label.ravel()[index] >= 0)
        assert len(np.unique(index)) == index.size
        values = label.ravel()[index]
        # weights restore each group's size (background: every value not requested)
        for v in (1, 2, 3):
            np.testing.assert_allclose(weight[values == v].sum(), np.count_nonzero(label == v), rtol=1e-9)
        background = (label >= 0) & ~np.isin(label, labels)
        np.testing.assert_allclose(weight[~np.isin(values, labels)].sum(), np.count_nonzero(background), rtol=1e-9)
        assert np.count_nonzero(values == 3) == np.count_nonzero(label == 3)
    # a weighted fit on the subsample matches the fit on every voxel
    truth, probs = overconfident_case(200000, rng)
    z = prob_logit(probs)
    full = fit_calibration(z, truth, [1, 2])
    index, weight = fit_subsample(truth, [1, 2], max_voxels=6000)
    sub = fit_calibration(z[:, index], truth[index], [1, 2], weights=weight)
    np.testing.assert_allclose(sub.scale, full.scale, rtol=0.15)
    np.testing.assert_allclose(sub.nll_before, full.nll_before, rtol=0.05)


def test_predictor_fits_the_calibration_on_its_atlas_and_streams_it():
    model, atlas = _random_model_and_atlas(3)
    labels = [3, 1, 2]
    # fp32, as the direct calls below (``precision = "auto"`` is bf16 on a CPU with native bf16)
    predictor = LabelPredictor(model, labels, (1, 16, 16), atlas=atlas, overlap=0.0, precision="fp32")
    cal = predictor.calibration
    assert cal.labels == (3, 1, 2) and predictor.rule == "calibrated"
    # independently: one direct network call on the atlas per label, conditioned on its own mask
    logits = []
    for label in labels:
        cond = np.stack([atlas.image, (atlas.label == label).astype(np.float32)])[None]
        with torch.no_grad():
            p = torch.sigmoid(model(torch.from_numpy(atlas.image)[None, None], torch.from_numpy(cond)))
        logits.append(prob_logit(p[0, 0].numpy()).ravel())
    expected = fit_calibration(np.stack(logits), atlas.label.ravel(), labels)
    np.testing.assert_allclose(cal.scale, expected.scale, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(cal.offset, expected.offset, rtol=1e-3, atol=1e-4)
    image = np.random.default_rng(3).random((2, 40, 36)).astype(np.float32)
    streamed = LabelPredictor(model, labels, (1, 16, 16), atlas=atlas, label_batch=1).predict(image)
    together = LabelPredictor(model, labels, (1, 16, 16), atlas=atlas, label_batch=3)
    np.testing.assert_array_equal(streamed, calibrated_merge(together.window(image), together.calibration))
    with pytest.raises(InputError, match="merge must be one of"):
        LabelPredictor(model, labels, (1, 16, 16), atlas=atlas, merge="mean")


# --------------------------------------------------------------------------- split augmentation


def brute_thick_part(mask, radius):
    """Union of every disk of `radius` that fits in the edge-padded mask, one centre at a time."""
    h, w = mask.shape
    padded = np.pad(mask, radius, mode="edge")
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    offsets = [(dy, dx) for dy, dx in zip(yy.ravel(), xx.ravel()) if dy * dy + dx * dx <= radius * radius]
    out = np.zeros_like(padded)
    for cy in range(radius, h + radius):
        for cx in range(radius, w + radius):
            if all(padded[cy + dy, cx + dx] for dy, dx in offsets):
                for dy, dx in offsets:
                    out[cy + dy, cx + dx] = True
    return out[radius:-radius, radius:-radius] & mask


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_thick_part_is_the_union_of_fitting_disks(radius):
    rng = np.random.default_rng(radius)
    mask = np.zeros((20, 22), bool)
    mask[2:12, 3:15] = True  # a body
    mask[14, :] = True  # a thin line to the borders
    mask[15:20, 17:22] = True  # a body cut by two borders
    mask ^= rng.random(mask.shape) < 0.03  # holes and specks
    np.testing.assert_array_equal(thick_part(mask, radius), brute_thick_part(mask, radius))
    thin = split_part(mask, radius, thick=False)
    assert not np.any(thin & thick_part(mask, radius)) and np.array_equal(thin | thick_part(mask, radius), mask)
    # in 3D the disk is in-plane: each section on its own
    stack = np.stack([mask, np.roll(mask, 3, axis=1)])
    np.testing.assert_array_equal(thick_part(stack, radius)[1], thick_part(stack[1], radius))


def test_split_target_is_a_part_of_the_class_and_ignores_unsure_voxels():
    label = np.zeros((20, 20), np.int64)
    label[2:12, 2:12] = 1  # thick
    label[15, :] = 1  # thin
    label[2:12, 14:16] = 2
    label[5:8, 11:13] = -1  # unknown, next to the body's edge
    target = np.where(label == 1, 1, 0)
    target[label < 0] = -1
    for thick in (True, False):
        out = split_target(label, (1,), target, 2, thick)
        part = split_part(label == 1, 2, thick)
        sure = out >= 0
        np.testing.assert_array_equal(out[sure] == 1, part[sure])
        assert np.all(out[label == -1] == -1) and np.all(out[(label != 1) & (label >= 0)] == 0)
        assert np.all((out == 1) <= (label == 1))
        # unsure: the side of a class voxel differs with the unknown voxels taken as class
        alt = thick_part((label == 1) | (label == -1), 2) & (label == 1)
        np.testing.assert_array_equal(out == -1, (label == -1) | ((alt != thick_part(label == 1, 2)) & (label == 1)))


@pytest.fixture
def split_h5(tmp_path):
    """Training cubes and an atlas where class 1 has a thick body and thin lines (both parts)."""
    rng = np.random.default_rng(0)
    label = np.zeros((3, 32, 32), np.uint8)
    label[:, 4:20, 4:20] = 1
    label[:, 24, :] = 1
    label[:, 28:31, 4:30] = 2
    raw = np.choose(label, [128, 230, 25]).astype(np.uint8) + rng.integers(0, 8, label.shape).astype(np.uint8)
    alabel = np.zeros((1, 16, 16), np.uint8)
    alabel[0, 1:9, 1:9] = 1
    alabel[0, 11, :] = 1
    alabel[0, 13:16, 10:16] = 2
    araw = np.choose(alabel, [128, 230, 25]).astype(np.uint8)
    return write_h5(tmp_path / "split.h5", raw=raw, label=label, atlas_raw=araw, atlas_label=alabel)


def test_split_augmentation_targets_and_atlas_masks_agree(split_h5):
    config, lcs = build(split_h5, batch_size=64, lcs={"split_prob": 1.0, "negative_prob": 0.0})
    task = LCSTask(config, lcs)
    rng = np.random.default_rng(1)
    data = task.sampler.batch(64, rng, task.augmenter)
    out = task.conditioned_batch(data, rng)
    split = out["split"]
    assert np.any(split[:, 0] > 0) and np.any(split[:, 1] == 1) and np.any((split[:, 0] > 0) & (split[:, 1] == 0))
    for b in range(64):
        c = int(out["classes"][b, 0])
        label, target, amask = data["target"][b], out["target"][b], out["cond"][b, 1]
        radius, thick = int(split[b, 0]), bool(split[b, 1])
        assert np.all((target == 1) <= (label == c))  # a subset of the class mask
        if radius == 0:  # not split (a part would be too small on the atlas): the whole class
            np.testing.assert_array_equal(amask, task.atlas.label == c)
            continue
        np.testing.assert_array_equal(amask > 0, split_part(task.atlas.label == c, radius, thick))
        assert 0 < amask.sum() < np.sum(task.atlas.label == c)
        np.testing.assert_array_equal(target == 1, split_part(label == c, radius, thick))
    keys = [(tuple(k), tuple(s)) for k, s in zip(out["classes"], split)]
    np.testing.assert_array_equal(out["group"], [keys.index(k) for k in keys])
    task.close()
    # split_prob = 0: nothing is split
    config, lcs = build(split_h5, batch_size=16, lcs={"split_prob": 0.0})
    task = LCSTask(config, lcs)
    out = task.conditioned_batch(task.sampler.batch(16, rng, None), rng)
    assert not out["split"].any()
    task.close()


# --------------------------------------------------------------------------- keys, checkpoints, command line


@pytest.mark.parametrize("table, message", [
    ({"split_prob": 1.5}, "split_prob must be in"), ({"split_prob": "often"}, "split_prob must be a number"),
    ({"split_prob": True}, "split_prob must be a number"), ({"merge": "mean"}, "merge must be one of"),
])
def test_bad_keys_name_the_key(table, message):
    base = {"atlas_raw": "a.h5:raw", "atlas_label": "a.h5:label"}
    with pytest.raises(InputError, match=message):
        lcs_config_from_dict({**base, **table}, n_classes=3)


def test_new_keys_round_trip_through_the_checkpoint(tmp_path, data_h5):
    config, lcs = build(data_h5, steps=1, lcs={"merge": "max", "split_prob": 0.3})
    assert (lcs.merge, lcs.split_prob) == ("max", 0.3)
    train_lcs(config, lcs, tmp_path / "run", runtime=Runtime(device="cpu"))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["lcs"]["merge"] == "max" and state["lcs"]["split_prob"] == 0.3
    again = lcs_config_from_dict({k: v for k, v in state["lcs"].items() if k not in ("patch_shape", "n_classes")},
                                 n_classes=3)
    assert again == lcs
    loaded = load_lcs_model(tmp_path / "run" / "last.pt")
    assert loaded.resolve_merge(None) == "max" and loaded.resolve_merge("calibrated") == "calibrated"
    # a checkpoint from before the key existed gets the default
    del state["lcs"]["merge"]
    torch.save(state, tmp_path / "old.pt")
    assert load_lcs_model(tmp_path / "old.pt").resolve_merge(None) == "calibrated"


def test_cli_infer_records_the_calibration(tmp_path, data_h5):
    runner = CliRunner()
    cfg = _write_config(tmp_path, data_h5, steps=2)
    assert runner.invoke(cli, ["lcs", "train", str(cfg), "--out", str(tmp_path / "run"), "-q"]).exit_code == 0
    model = str(tmp_path / "run" / "best.pt")
    result = runner.invoke(cli, ["lcs", "infer", model, f"{data_h5}:raw", f"{tmp_path / 'o.h5'}:lcs",
                                 "--json", "--precision", "fp32"])  # compared with fp32
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["merge"] == "calibrated" and info["calibration"]["labels"] == [1, 2]
    cal = Calibration.from_dict(info["calibration"])
    with open_volume(info["arrays"]["prob_1"]) as p1, open_volume(info["arrays"]["prob_2"]) as p2, \
            open_volume(info["arrays"]["labels"]) as lab:
        probs, merged, attrs = np.stack([p1[...], p2[...]]), lab[...], dict(lab.attrs)
    np.testing.assert_array_equal(merged, calibrated_merge(probs, cal))
    assert attrs["merge"] == "calibrated" and attrs["merge_rule"] == "calibrated"
    np.testing.assert_allclose(attrs["calibration_scale"], cal.scale, rtol=1e-5)
    # --merge max: the largest probability above 0.5
    result = runner.invoke(cli, ["lcs", "infer", model, f"{data_h5}:raw", str(tmp_path / "m.zarr"), "--merge", "max",
                                 "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["calibration"] is None
    # the baseline has no calibrated merge
    assert runner.invoke(cli, ["lcs", "train", str(cfg), "--out", str(tmp_path / "b"), "--baseline", "-q"]).exit_code == 0
    result = runner.invoke(cli, ["lcs", "infer", str(tmp_path / "b" / "best.pt"), f"{data_h5}:raw",
                                 str(tmp_path / "b.zarr"), "--merge", "calibrated"])
    assert result.exit_code == 2 and "needs a label-conditioned checkpoint" in result.output
