"""Objects, not only classes: instance labels from semantic predictions and instance metrics."""
from emseg.instances.metrics import (
    IOU_THRESHOLDS,
    ContingencyAccumulator,
    ContingencyTable,
    InstanceEvaluation,
    InstanceScores,
    evaluate_instances,
    instance_scores,
    matched_pairs,
)

__all__ = [
    "IOU_THRESHOLDS",
    "ContingencyAccumulator",
    "ContingencyTable",
    "InstanceEvaluation",
    "InstanceScores",
    "evaluate_instances",
    "instance_scores",
    "matched_pairs",
]
