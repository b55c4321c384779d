"""``emseg evaluate``: per-class scores of a prediction against ground truth."""
from __future__ import annotations

import click

from emseg.cli._ui import common_options, emit, progress_bar, scores_table
from emseg.semantic.evaluation import evaluate_volumes
from emseg.io import open_volume


@click.command("evaluate")
@click.argument("prediction")
@click.argument("ground_truth")
@click.option("--ignore-label", type=int, default=-1, help="Ground-truth label excluded from the scores.")
@click.option("--n-classes", type=int, default=None, help="Number of classes [default: from the prediction].")
@common_options
def command(prediction, ground_truth, ignore_label, n_classes):
    """Jaccard (IoU), Dice, precision and recall per class and their means, streamed over slabs.

    PREDICTION is a label volume or probabilities (C,*S) (argmax is taken).

    \b
    Example:
      emseg evaluate pred.zarr/probs stack1.h5:label --json
    """
    with open_volume(prediction) as pred, open_volume(ground_truth) as gt, progress_bar("evaluate") as update:
        scores = evaluate_volumes(pred, gt, n_classes=n_classes, ignore_label=ignore_label, progress=update)
    payload = scores.to_dict()
    emit(payload, lambda c: c.print(scores_table(payload, f"{prediction} vs {ground_truth}")))
