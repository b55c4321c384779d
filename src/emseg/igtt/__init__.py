"""iGTT: unsupervised binary segmentation by iterative ground-truth training (``emseg igtt``).

:mod:`~emseg.igtt.run` is the pipeline (:func:`run_igtt`), :mod:`~emseg.igtt.thresholds` the
threshold selection, :mod:`~emseg.igtt.ems` the meta-structure extraction (built on the label
perturbations of :mod:`emseg.noise`), :mod:`~emseg.igtt.baselines` the thresholding baselines and
scores, :mod:`~emseg.igtt.config` the options.
"""
from __future__ import annotations

from emseg.igtt.baselines import BASELINES, Baseline, binary_metrics, threshold_baselines
from emseg.igtt.config import METRIC_COLUMNS, IGTTConfig
from emseg.igtt.ems import ems
from emseg.igtt.run import IGTTResult, run_igtt
from emseg.igtt.thresholds import Selection, candidate_thresholds, dmi_per_threshold, invert_if_large, select_mask

__all__ = [
    "BASELINES",
    "METRIC_COLUMNS",
    "Baseline",
    "IGTTConfig",
    "IGTTResult",
    "Selection",
    "binary_metrics",
    "candidate_thresholds",
    "dmi_per_threshold",
    "ems",
    "run_igtt",
    "invert_if_large",
    "select_mask",
    "threshold_baselines",
]
