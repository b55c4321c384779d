"""``emseg.semantic.evaluation``: streamed scores equal scikit-learn's on the whole volume."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import jaccard_score, precision_score, recall_score

from conftest import write_h5
from emseg.errors import InputError
from emseg.io import open_volume
from emseg.semantic.evaluation import evaluate_volumes


def _volumes(tmp_path, rng):
    gt = rng.integers(0, 3, size=(5, 17, 13))
    gt[0, :2] = -1  # ignored voxels
    probs = rng.random((3, 5, 17, 13)).astype(np.float32)
    write_h5(tmp_path / "d.h5", gt=gt, probs=probs, labels=np.argmax(probs, 0).astype(np.uint8))
    return gt, np.argmax(probs, 0)


@pytest.mark.parametrize("pred_key", ["probs", "labels"])
def test_scores_equal_scikit_learn_on_the_kept_voxels(tmp_path, pred_key):
    gt, pred = _volumes(tmp_path, np.random.default_rng(3))
    keep = gt != -1
    with open_volume(f"{tmp_path}/d.h5:{pred_key}") as p, open_volume(f"{tmp_path}/d.h5:gt") as g:
        scores = evaluate_volumes(p, g, n_classes=3)
    labels = [0, 1, 2]
    np.testing.assert_allclose(scores.jaccard, jaccard_score(gt[keep], pred[keep], labels=labels, average=None))
    np.testing.assert_allclose(scores.precision, precision_score(gt[keep], pred[keep], labels=labels, average=None))
    np.testing.assert_allclose(scores.recall, recall_score(gt[keep], pred[keep], labels=labels, average=None))
    assert sum(scores.support) == int(keep.sum())


def test_a_prediction_of_another_shape_is_refused_naming_it(tmp_path):
    write_h5(tmp_path / "e.h5", gt=np.zeros((2, 4, 4), np.int64), pred=np.zeros((2, 4, 5), np.uint8))
    with open_volume(f"{tmp_path}/e.h5:pred") as p, open_volume(f"{tmp_path}/e.h5:gt") as g:
        with pytest.raises(InputError, match="matches neither") as err:
            evaluate_volumes(p, g, n_classes=2)
    assert "e.h5" in str(err.value)
