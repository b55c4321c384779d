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
from emseg.instances.targets import TargetsConfig, TargetsResult, boundary_targets, make_targets

__all__ = [
    "IOU_THRESHOLDS",
    "ContingencyAccumulator",
    "ContingencyTable",
    "InstanceEvaluation",
    "InstanceScores",
    "TargetsConfig",
    "TargetsResult",
    "boundary_targets",
    "evaluate_instances",
    "instance_scores",
    "make_targets",
    "matched_pairs",
]
