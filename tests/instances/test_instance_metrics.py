"""``emseg.instances.metrics``: VOI and adapted Rand error equal scikit-image's, the matcher equals a
brute-force one-to-one assignment, AP its direct formula; slab streaming, sections, relabelling and
the command line."""
from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from skimage.metrics import adapted_rand_error, variation_of_information

from conftest import write_h5
from emseg.cli.main import cli
from emseg.errors import InputError
from emseg.instances import (IOU_THRESHOLDS, ContingencyTable, evaluate_instances, instance_scores,
                             matched_pairs)
from emseg.instances import metrics
from emseg.io import open_volume

METRIC_KEYS = {"voi_split", "voi_merge", "adapted_rand_error", "are_precision", "are_recall", "f1_50",
               "precision_50", "recall_50", "f1_75", "precision_75", "recall_75", "ap", "ap_by_threshold",
               "n_gt", "n_pred", "matched_50", "matched_75"}


def _scores(pred, gt, **kwargs):
    return evaluate_instances(np.asarray(pred), np.asarray(gt), **kwargs)


def _dense(labels):
    """Ids renumbered 1..n in order, 0 (and -1) kept: skimage indexes its table by the ids."""
    _, rank = np.unique(labels, return_inverse=True)
    return np.where(labels <= 0, labels, rank.reshape(labels.shape) + 1)


def _blocks(rng, shape=(6, 24, 24), cell=(2, 6, 6), n=9):
    """Blocky labels: random ids on a coarse grid, upsampled."""
    coarse = rng.integers(0, n, size=tuple(s // c for s, c in zip(shape, cell)))
    return np.kron(coarse, np.ones(cell, np.int64))


def _volume_pairs():
    rng = np.random.default_rng(7)
    noise_gt = rng.integers(-1, 6, size=(5, 13, 11))
    noise_pred = rng.integers(0, 8, size=(5, 13, 11))
    gt = _blocks(rng)
    gt[0, :3] = -1
    pred = _blocks(rng, cell=(3, 4, 8))  # another grid: splits and merges
    near = np.where(rng.random(gt.shape) < 0.1, rng.integers(0, 9, gt.shape), np.maximum(gt, 0))
    return {"random": (noise_pred, noise_gt), "structured": (pred, gt), "near": (near, gt)}


@pytest.mark.parametrize("case", ["random", "structured", "near"])
def test_voi_and_adapted_rand_error_equal_scikit_image_on_the_kept_voxels(case):
    pred, gt = _volume_pairs()[case]
    keep = gt != -1
    assert (~keep).any()
    scores = _scores(pred, gt).scores
    split, merge = variation_of_information(gt[keep], pred[keep], ignore_labels=(0,))
    assert scores.voi_split == pytest.approx(split, rel=1e-12, abs=1e-12)
    assert scores.voi_merge == pytest.approx(merge, rel=1e-12, abs=1e-12)
    are = adapted_rand_error(gt[keep], pred[keep], ignore_labels=(0,))[0]
    assert scores.adapted_rand_error == pytest.approx(are, rel=1e-12, abs=1e-12)


def test_split_is_over_segmentation_and_merge_under_segmentation():
    gt = np.ones((2, 4, 4), np.int64)
    halves = np.ones_like(gt)
    halves[:, :, 2:] = 2
    over = _scores(halves, gt).scores
    under = _scores(gt, halves).scores
    assert over.voi_split == pytest.approx(1.0) and over.voi_merge == 0.0  # one bit: which half
    assert under.voi_split == 0.0 and under.voi_merge == pytest.approx(1.0)
    # pairs: over-segmentation loses recall (true pairs apart), keeps precision
    assert over.are_precision == 1.0 and over.are_recall < 1.0
    assert under.are_recall == 1.0 and under.are_precision < 1.0


def _pair_counts(pred, gt):
    """Ordered pairs of distinct voxels inside true objects: together in gt, in pred, in both."""
    fg = gt > 0
    g, p = gt[fg], pred[fg]
    same_g = g[:, None] == g[None, :]
    same_p = p[:, None] == p[None, :]
    off = ~np.eye(len(g), dtype=bool)
    return (same_g & off).sum(), (same_p & off).sum(), (same_g & same_p & off).sum()


@pytest.mark.parametrize("seed", range(4))
def test_adapted_rand_precision_and_recall_count_voxel_pairs(seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(-1, 4, size=(3, 6, 5))
    pred = rng.integers(0, 4, size=gt.shape)
    keep = gt != -1
    gt_pairs, pred_pairs, both = _pair_counts(pred[keep], gt[keep])
    scores = _scores(pred, gt).scores
    assert scores.are_precision == pytest.approx(both / pred_pairs)
    assert scores.are_recall == pytest.approx(both / gt_pairs)
    assert scores.adapted_rand_error == pytest.approx(1 - 2 * both / (gt_pairs + pred_pairs))


def _brute_force(pred, gt):
    """Per threshold, the matched pairs of a maximum one-to-one assignment over pairs above it,
    IoUs computed from the masks."""
    keep = gt != -1
    gt_ids = [g for g in np.unique(gt[keep]) if g > 0]
    pred_ids = [p for p in np.unique(pred[keep]) if p > 0]
    iou = [[Fraction(int(((gt == g) & (pred == p) & keep).sum()), int((((gt == g) | (pred == p)) & keep).sum()))
            for p in pred_ids] for g in gt_ids]
    matches = {}
    for t in IOU_THRESHOLDS:
        t_exact = Fraction(round(t * 20), 20)
        above = np.array([[v > t_exact for v in row] for row in iou], bool).reshape(len(gt_ids), len(pred_ids))
        rows, cols = linear_sum_assignment(above.astype(float), maximize=True) if above.size else ([], [])
        matches[t] = {(gt_ids[r], pred_ids[c]) for r, c in zip(rows, cols) if above[r, c]}
    return len(gt_ids), len(pred_ids), matches


@st.composite
def _label_pairs(draw):
    """Blocky ground truth (-1 included) and a prediction that relabels a fraction of its voxels,
    merging two ids or not."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = draw(st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)))
    cell = draw(st.sampled_from([(1, 1, 1), (1, 2, 2), (1, 3, 2)]))
    n = draw(st.integers(1, 8))
    gt = np.kron(rng.integers(-1, n + 1, size=shape), np.ones(cell, np.int64))
    flip = draw(st.sampled_from([0.0, 0.05, 0.2, 0.5]))
    pred = np.where(rng.random(gt.shape) < flip, rng.integers(0, n + 3, size=gt.shape), np.maximum(gt, 0))
    if draw(st.booleans()):
        pred[pred == 2] = 1
    return pred, gt


def _assert_ratio(value, num, den):
    """``value`` is num / den, or NaN when den is 0."""
    assert np.isnan(value) if den == 0 else value == pytest.approx(num / den)


@settings(max_examples=60, deadline=None)
@given(_label_pairs())
def test_matching_f1_and_ap_equal_a_brute_force_one_to_one_assignment(pair):
    pred, gt = pair
    n_gt, n_pred, matches = _brute_force(pred, gt)
    scores = _scores(pred, gt).scores
    table = ContingencyTable.from_labels(gt, pred)
    assert (scores.n_gt, scores.n_pred) == (n_gt, n_pred)
    for t in (0.5, 0.75):
        got = set(zip(*(ids.tolist() for ids in matched_pairs(table, t))))
        assert got == matches[t]
    tp = {t: len(m) for t, m in matches.items()}
    for t, key in ((0.5, "50"), (0.75, "75")):
        n = tp[t]
        values = scores.to_dict()
        assert values[f"matched_{key}"] == n
        _assert_ratio(values[f"f1_{key}"], 2 * n, n_gt + n_pred)
        _assert_ratio(values[f"precision_{key}"], n, n_pred)
        _assert_ratio(values[f"recall_{key}"], n, n_gt)
    if n_gt + n_pred:
        direct = [tp[t] / (n_gt + n_pred - tp[t]) for t in IOU_THRESHOLDS]
        assert scores.ap_by_threshold == pytest.approx(direct)
        assert scores.ap == pytest.approx(sum(direct) / len(direct))
    else:
        assert np.isnan(scores.ap)


def test_a_pair_at_exactly_the_threshold_is_no_match():
    gt = np.array([[1, 1, 0, 0]])
    pred = np.array([[1, 0, 0, 0]])  # IoU exactly 1/2
    assert _scores(pred, gt).scores.matched_50 == 0
    gt = np.array([[1, 1, 1, 0]])
    pred = np.array([[1, 1, 1, 1]])  # IoU 3/4: the voxel on background counts
    scores = _scores(pred, gt).scores
    assert scores.matched_50 == 1 and scores.matched_75 == 0
    assert scores.ap_by_threshold[IOU_THRESHOLDS.index(0.7)] == 1.0


def test_thresholds_below_one_half_are_refused():
    with pytest.raises(ValueError, match="0.5"):
        matched_pairs(ContingencyTable.empty(), 0.3)


def _assert_same(a, b):
    np.testing.assert_equal(a.to_dict(), b.to_dict())


@pytest.mark.parametrize("case", ["random", "structured", "near"])
def test_slab_streaming_changes_nothing(case, monkeypatch):
    pred, gt = _volume_pairs()[case]
    whole = _scores(pred, gt, slab=gt.shape[0])
    monkeypatch.setattr(metrics, "_MERGE_ROWS", 1)  # merge after every slab
    for slab in (1, 3, None):
        _assert_same(_scores(pred, gt, slab=slab).scores, whole.scores)
    acc = metrics.ContingencyAccumulator()
    for z in range(gt.shape[0]):
        acc.add(gt[z], pred[z])
    full = ContingencyTable.from_labels(gt, pred)
    table = acc.table()
    for name in ("gt", "pred", "count"):
        np.testing.assert_array_equal(getattr(table, name), getattr(full, name))


def test_wide_ids_int64_and_uint64_give_the_same_scores():
    pred, gt = _volume_pairs()["structured"]
    base = _scores(pred, gt).scores
    big_pred = np.where(pred > 0, np.uint64(2**64 - 100) + pred.astype(np.uint64), np.uint64(0))
    big_gt = np.where(gt > 0, np.int64(2**62) + gt * np.int64(2**40), gt)
    assert big_pred.dtype == np.uint64 and big_gt.dtype == np.int64
    _assert_same(_scores(big_pred, big_gt).scores, base)
    _assert_same(_scores(big_pred, big_gt, slab=1).scores, base)
    table = ContingencyTable.from_labels(big_gt, big_pred)
    assert table.pred.max() == np.uint64(2**64 - 100) + np.uint64(pred.max())  # exact, no float rounding


def test_per_section_equals_each_section_alone():
    pred, gt = _volume_pairs()["near"]
    result = _scores(pred, gt, per_section=True, slab=4)
    assert len(result.per_section) == gt.shape[0]
    for z in range(gt.shape[0]):
        _assert_same(result.per_section[z], instance_scores(ContingencyTable.from_labels(gt[z], pred[z])))
        _assert_same(result.per_section[z], _scores(pred[z:z + 1], gt[z:z + 1]).scores)
    assert result.scores.ap == pytest.approx(np.mean([s.ap for s in result.per_section]))
    assert result.scores.voi_split == pytest.approx(np.mean([s.voi_split for s in result.per_section]))
    assert result.scores.n_gt == sum(s.n_gt for s in result.per_section)
    # an id in two sections is two 2D objects
    same = np.maximum(gt, 0)
    both = _scores(same, gt, per_section=True).scores
    assert both.n_gt == sum(len(np.unique(s[s > 0])) for s in same)


def test_per_section_means_skip_sections_where_a_metric_is_undefined():
    gt = np.zeros((2, 4, 4), np.int64)
    gt[0, :2, :2] = 1
    result = _scores(gt, gt, per_section=True)
    assert np.isnan(result.per_section[1].voi_split) and np.isnan(result.per_section[1].ap)
    assert result.scores.voi_split == 0.0 and result.scores.ap == 1.0


def test_permuting_ids_changes_nothing():
    rng = np.random.default_rng(3)
    for pred, gt in _volume_pairs().values():
        base = _scores(pred, gt).scores.to_dict()
        gt_map = np.concatenate([[0], 1 + rng.permutation(int(gt.max()))])
        pred_map = np.concatenate([[0], 1 + rng.permutation(int(pred.max()))])
        permuted = _scores(pred_map[pred], np.where(gt < 0, -1, gt_map[np.maximum(gt, 0)])).scores.to_dict()
        for key, value in base.items():
            np.testing.assert_allclose(permuted[key], value, rtol=1e-12, atol=1e-12)


def test_identical_volumes_are_perfect():
    _, gt = _volume_pairs()["structured"]
    scores = _scores(np.maximum(gt, 0), gt).scores
    assert scores.voi_split == 0.0 and scores.voi_merge == 0.0 and scores.adapted_rand_error == 0.0
    assert scores.f1_50 == scores.f1_75 == scores.ap == 1.0 and scores.n_gt == scores.n_pred > 1


def test_empty_inputs_give_undefined_scores_not_numbers():
    zeros = np.zeros((2, 3, 3), np.int64)
    scores = _scores(zeros, zeros).scores
    assert scores.n_gt == scores.n_pred == 0
    assert all(np.isnan(getattr(scores, k)) for k in ("voi_split", "adapted_rand_error", "f1_50", "ap"))


@pytest.mark.parametrize("gt, pred, words, names", [
    (np.zeros((2, 3, 3), np.int64), np.zeros((2, 3, 4), np.int64), "differs", "p.h5:x"),
    (np.zeros((2, 3, 3), np.int64), np.zeros((2, 3, 3), np.float32), "float32", "p.h5:x"),
    (np.zeros((2, 3, 3), np.float64), np.zeros((2, 3, 3), np.int64), "float64", "g.h5:y"),
    (np.full((2, 3, 3), -2, np.int64), np.zeros((2, 3, 3), np.int64), "-2", "g.h5:y"),
    (np.zeros((2, 3, 3), np.int64), np.full((2, 3, 3), -1, np.int32), "-1", "p.h5:x"),
])
def test_bad_input_is_one_line_naming_the_volume(tmp_path, gt, pred, words, names):
    write_h5(tmp_path / "g.h5", y=gt)
    write_h5(tmp_path / "p.h5", x=pred)
    with open_volume(f"{tmp_path}/p.h5:x") as p, open_volume(f"{tmp_path}/g.h5:y") as g:
        with pytest.raises(InputError) as err:
            evaluate_instances(p, g)
    message = str(err.value)
    assert words in message and names in message and "\n" not in message


def test_command_line_json_and_per_section(tmp_path):
    pred, gt = _volume_pairs()["near"]
    write_h5(tmp_path / "v.h5", pred=pred.astype(np.uint32), gt=gt.astype(np.int16))
    runner = CliRunner()
    args = ["evaluate", "--instances", f"{tmp_path}/v.h5:pred", f"{tmp_path}/v.h5:gt", "--json"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert METRIC_KEYS <= set(doc) and "per_section" not in doc
    expected = _scores(pred, gt).scores
    assert doc["voi_split"] == pytest.approx(expected.voi_split) and doc["ap"] == pytest.approx(expected.ap)

    result = runner.invoke(cli, args + ["--per-section"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert METRIC_KEYS <= set(doc) and len(doc["per_section"]) == gt.shape[0]
    assert all(METRIC_KEYS <= set(row) for row in doc["per_section"])

    human = runner.invoke(cli, args[:-1])
    assert human.exit_code == 0 and "VOI" in human.stdout and "AP" in human.stdout


def test_command_line_refuses_a_float_volume_with_exit_2_and_one_line(tmp_path):
    write_h5(tmp_path / "v.h5", pred=np.zeros((2, 4, 4), np.float32), gt=np.zeros((2, 4, 4), np.int64))
    result = CliRunner().invoke(cli, ["evaluate", "--instances", f"{tmp_path}/v.h5:pred", f"{tmp_path}/v.h5:gt"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "v.h5:pred" in lines[0] and "float32" in lines[0]


@pytest.mark.parametrize("extra", [["--per-section"], ["--instances", "--n-classes", "3"]])
def test_command_line_options_of_the_other_mode_are_usage_errors(tmp_path, extra):
    write_h5(tmp_path / "v.h5", a=np.zeros((2, 4, 4), np.int64))
    result = CliRunner().invoke(cli, ["evaluate", f"{tmp_path}/v.h5:a", f"{tmp_path}/v.h5:a", *extra])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
