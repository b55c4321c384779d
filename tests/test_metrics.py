from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from emseg.metrics import (
    ConfusionAccumulator,
    binary_scores,
    confusion_matrix,
    roc_auc,
    scores_from_confusion,
)

# --------------------------------------------------------------------------- brute force


def brute_confusion(pred, target, k, ignore=-1):
    cm = [[0] * k for _ in range(k)]
    for p, t in zip(np.ravel(pred).tolist(), np.ravel(target).tolist()):
        if t == ignore:
            continue
        cm[t][p] += 1
    return np.array(cm)


def set_scores(pred, target, k, ignore=-1):
    """Per-class scores from index sets; None where undefined."""
    pred = np.ravel(pred).tolist()
    target = np.ravel(target).tolist()
    kept = [i for i, t in enumerate(target) if t != ignore]
    out = {"jaccard": [], "dice": [], "precision": [], "recall": [], "support": []}
    for c in range(k):
        P = {i for i in kept if pred[i] == c}
        T = {i for i in kept if target[i] == c}
        inter, union = len(P & T), len(P | T)
        out["jaccard"].append(inter / union if union else None)
        out["dice"].append(2 * inter / (len(P) + len(T)) if (P or T) else None)
        out["precision"].append(inter / len(P) if P else None)
        out["recall"].append(inter / len(T) if T else None)
        out["support"].append(len(T))
    correct = sum(pred[i] == target[i] for i in kept)
    out["accuracy"] = correct / len(kept) if kept else None
    return out


def mean_defined(values):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def as_none(x):
    return None if (isinstance(x, float) and math.isnan(x)) else x


# --------------------------------------------------------------------------- confusion matrix


@pytest.mark.parametrize("seed", range(4))
def test_confusion_matrix_matches_loop(seed):
    rng = np.random.default_rng(seed)
    k = 2 + seed
    shape = (3, 5, 7)
    target = rng.integers(-1, k, size=shape)
    pred = rng.integers(0, k, size=shape)
    cm = confusion_matrix(pred, target, k)
    assert cm.dtype == np.int64 and cm.shape == (k, k)
    np.testing.assert_array_equal(cm, brute_confusion(pred, target, k))
    assert cm.sum() == np.count_nonzero(target != -1)


def test_ignore_label_excluded():
    rng = np.random.default_rng(1)
    target = rng.integers(-1, 3, size=(20, 20))
    pred = rng.integers(0, 3, size=(20, 20))
    other = pred.copy()
    other[target == -1] = 99  # anything, even out of range, at ignored voxels
    np.testing.assert_array_equal(confusion_matrix(pred, target, 3), confusion_matrix(other, target, 3))
    # custom ignore label, and no ignoring at all
    t255 = np.where(target == -1, 255, target)
    np.testing.assert_array_equal(
        confusion_matrix(pred, t255, 3, ignore_label=255), brute_confusion(pred, target, 3)
    )
    t0 = np.where(target == -1, 0, target)
    np.testing.assert_array_equal(
        confusion_matrix(pred, t0, 3, ignore_label=None), brute_confusion(pred, t0, 3, ignore=None)
    )


@pytest.mark.parametrize(
    "pred, target, k, match",
    [
        ([0, 3], [0, 1], 3, "pred labels"),
        ([0, 1], [0, 3], 3, "target labels"),
        ([0, 1], [0, -2], 3, "target labels"),
        ([0, 1, 1], [0, 1], 3, "shape"),
        ([0.0, 1.0], [0, 1], 3, "integer"),
        ([0, 1], [0, 1], 0, "n_classes"),
    ],
)
def test_confusion_matrix_validation(pred, target, k, match):
    with pytest.raises(ValueError, match=match):
        confusion_matrix(np.array(pred), np.array(target), k)


def test_streaming_equals_whole_volume():
    rng = np.random.default_rng(7)
    k = 4
    target = rng.integers(-1, k, size=(6, 10, 9))
    pred = rng.integers(0, k, size=(6, 10, 9))
    acc = ConfusionAccumulator(k)
    for z in range(0, 6, 4):
        for y in range(0, 10, 3):
            sl = (slice(z, z + 4), slice(y, y + 3))
            acc.update(pred[sl], target[sl])
    whole = confusion_matrix(pred, target, k)
    np.testing.assert_array_equal(acc.matrix, whole)
    assert acc.n_voxels == np.count_nonzero(target != -1)
    a, b = acc.scores(), scores_from_confusion(whole)
    assert a.to_dict() == b.to_dict()
    # merging two partial accumulators
    left = ConfusionAccumulator(k).update(pred[:3], target[:3])
    right = ConfusionAccumulator(k).update(pred[3:], target[3:])
    np.testing.assert_array_equal(left.merge(right).matrix, whole)
    m = acc.matrix
    m[0, 0] += 1000  # the property returns a copy
    np.testing.assert_array_equal(acc.matrix, whole)
    acc.reset()
    assert acc.n_voxels == 0


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize("seed", range(5))
def test_scores_match_set_computation(seed):
    rng = np.random.default_rng(100 + seed)
    k = 5
    target = rng.integers(-1, 3, size=60)  # classes 3, 4 never in the target
    pred = rng.integers(0, 4, size=60)  # class 4 never predicted -> undefined everywhere
    s = scores_from_confusion(confusion_matrix(pred, target, k))
    ref = set_scores(pred, target, k)
    for key in ("jaccard", "dice", "precision", "recall"):
        got = [as_none(float(v)) for v in getattr(s, key)]
        assert got == pytest.approx(ref[key]), key
        mean = as_none(getattr(s, "mean_" + key))
        assert mean == pytest.approx(mean_defined(ref[key])), key
    assert s.support.tolist() == ref["support"]
    assert s.accuracy == pytest.approx(ref["accuracy"])
    assert math.isnan(s.jaccard[4]) and math.isnan(s.recall[3])
    d = s.to_dict()
    text = json.dumps(d, allow_nan=False)  # plain, finite JSON
    back = json.loads(text)
    assert back["jaccard"][4] is None
    assert back["dice"] == pytest.approx(ref["dice"])
    assert all(type(v) is float or v is None for v in back["precision"])


def test_scores_edge_cases():
    empty = scores_from_confusion(np.zeros((3, 3), dtype=np.int64))
    assert math.isnan(empty.accuracy) and math.isnan(empty.mean_jaccard)
    assert empty.to_dict()["accuracy"] is None
    perfect = scores_from_confusion(np.diag([5, 0, 7]))
    assert perfect.mean_jaccard == 1.0 and perfect.mean_dice == 1.0 and perfect.accuracy == 1.0
    assert math.isnan(perfect.jaccard[1])
    with pytest.raises(ValueError):
        scores_from_confusion(np.ones((2, 3), dtype=int))
    with pytest.raises(ValueError):
        scores_from_confusion(-np.ones((2, 2), dtype=int))
    with pytest.raises(ValueError):
        perfect.jaccard[0] = 0.0  # read-only


def test_binary_scores_match_sets():
    rng = np.random.default_rng(3)
    prob = rng.random(200)
    target = rng.integers(-1, 2, size=200)
    s = binary_scores(prob, target, threshold=0.3)
    keep = target != -1
    P = set(np.flatnonzero(keep & (prob >= 0.3)))
    T = set(np.flatnonzero(keep & (target == 1)))
    assert s.tp == len(P & T) and s.fp == len(P - T) and s.fn == len(T - P)
    assert s.tp + s.fp + s.fn + s.tn == keep.sum()
    assert s.dice == pytest.approx(2 * len(P & T) / (len(P) + len(T)))
    assert s.jaccard == pytest.approx(len(P & T) / len(P | T))
    assert s.accuracy == pytest.approx((s.tp + s.tn) / keep.sum())
    # integer/bool predictions are used as is
    pred = (prob >= 0.3)
    assert binary_scores(pred, target) == s
    assert binary_scores(pred.astype(np.uint8), target) == s
    json.dumps(s.to_dict(), allow_nan=False)
    with pytest.raises(ValueError):
        binary_scores(np.array([0, 2]), np.array([0, 1]))
    with pytest.raises(ValueError):
        binary_scores(np.array([0.1, 0.9]), np.array([0, 2]))


# --------------------------------------------------------------------------- ROC AUC


def brute_auc(scores, target):
    pos = [s for s, t in zip(scores, target) if t == 1]
    neg = [s for s, t in zip(scores, target) if t == 0]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(4))
def test_roc_auc_matches_pair_count_and_scipy(seed):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 2, size=80)
    scores = np.round(rng.random(80) + 0.4 * target, 1)  # coarse rounding -> many ties
    auc = roc_auc(scores, target)
    assert auc == pytest.approx(brute_auc(scores, target), rel=1e-12)
    u = mannwhitneyu(scores[target == 1], scores[target == 0], alternative="two-sided").statistic
    assert auc == pytest.approx(u / ((target == 1).sum() * (target == 0).sum()), rel=1e-12)


def test_roc_auc_ignore_and_errors():
    scores = np.array([[0.2, 0.9], [0.5, 0.1]])
    target = np.array([[0, 1], [-1, 0]])
    assert roc_auc(scores, target) == 1.0
    assert roc_auc(-scores, target) == 0.0
    assert roc_auc(np.ones(4), np.array([0, 1, 0, 1])) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="shape"):
        roc_auc(np.zeros(3), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(np.array([np.nan, 0.2]), np.array([0, 1]))
