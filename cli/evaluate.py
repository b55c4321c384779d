"""``emseg evaluate``: per-class scores of a prediction against ground truth, or with
``--instances`` the instance metrics of two instance-id volumes."""
from __future__ import annotations

import click
from rich.table import Table

from emseg.cli._ui import common_options, emit, fmt, progress_bar, scores_table
from emseg.instances.metrics import evaluate_instances
from emseg.semantic.evaluation import evaluate_volumes
from emseg.io import open_volume

#: The table's columns: payload key -> header.
_COLUMNS = {"voi_split": "VOI split", "voi_merge": "VOI merge", "adapted_rand_error": "ARE", "f1_50": "F1 @0.5",
            "f1_75": "F1 @0.75", "ap": "AP", "n_gt": "GT", "n_pred": "pred"}


@click.command("evaluate")
@click.argument("prediction")
@click.argument("ground_truth")
@click.option("--ignore-label", type=int, default=-1, help="Ground-truth label excluded from the scores.")
@click.option("--n-classes", type=int, default=None, help="Number of classes [default: from the prediction].")
@click.option("--instances", is_flag=True,
              help="Instance metrics instead: both volumes hold object ids (0 = background, -1 in GROUND_TRUTH "
                   "= ignored): VOI split/merge, adapted Rand error, F1 at IoU 0.5 and 0.75, AP over IoU 0.5:0.95.")
@click.option("--per-section", is_flag=True,
              help="With --instances: score each section (first axis) on its own; the list and the mean.")
@common_options
def command(prediction, ground_truth, ignore_label, n_classes, instances, per_section):
    """Jaccard (IoU), Dice, precision, recall per class, or object metrics, streamed over slabs.

    PREDICTION is a label volume or probabilities (C,*S) (argmax is taken). With --instances, both
    are instance-id volumes of one shape, scored by variation of information, adapted Rand error,
    F1 of objects matched one to one and AP (docs/instances.md).

    \b
    Example:
      emseg evaluate pred.zarr/probs stack1.h5:label --json
      emseg evaluate --instances pred.zarr/mito_ids stack1.h5:mito_ids --per-section
    """
    if not instances:
        if per_section:
            raise click.UsageError("--per-section applies only with --instances")
        with open_volume(prediction) as pred, open_volume(ground_truth) as gt, progress_bar("evaluate") as update:
            scores = evaluate_volumes(pred, gt, n_classes=n_classes, ignore_label=ignore_label, progress=update)
        payload = scores.to_dict()
        emit(payload, lambda c: c.print(scores_table(payload, f"{prediction} vs {ground_truth}")))
        return
    if n_classes is not None or ignore_label != -1:
        raise click.UsageError("--n-classes and --ignore-label apply only without --instances "
                               "(with --instances, -1 in GROUND_TRUTH is ignored)")
    with open_volume(prediction) as pred, open_volume(ground_truth) as gt, progress_bar("evaluate") as update:
        result = evaluate_instances(pred, gt, per_section=per_section, progress=update)
    payload = result.to_dict()
    emit(payload, lambda c: c.print(instance_table(payload, f"{prediction} vs {ground_truth}")))


def instance_table(payload: dict, title: str) -> Table:
    """The main instance metrics: one row for the volume, or one per section and their mean."""
    sections = "per_section" in payload
    caption = ("F1: objects matched one to one at IoU above 0.5, 0.75; AP: mean over IoU 0.50:0.95 of "
               "TP / (TP + FP + FN); GT, pred: objects" + (" (summed in the mean row)" if sections else ""))
    table = Table(title=title, caption=caption)
    table.add_column("section" if sections else "", justify="left")
    for header in _COLUMNS.values():
        table.add_column(header, justify="right")
    for row in payload.get("per_section", []):
        table.add_row(str(row["section"]), *(fmt(row[c], 3) for c in _COLUMNS))
    table.add_row("mean" if sections else "volume", *(fmt(payload[c], 3) for c in _COLUMNS), style="bold")
    return table
