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
from emseg.instances.metrics import __all__ as _metrics_all
from emseg.instances.targets import (TargetsConfig, TargetsResult, boundary_targets, make_targets,
                                     save_instance_labels)

__all__ = [*_metrics_all, "TargetsConfig", "TargetsResult", "boundary_targets", "make_targets",
           "save_instance_labels"]
