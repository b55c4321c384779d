"""Noisy-label synthesis and analysis (RCL, PCL, RL; transition matrices).

See :mod:`emseg.noise.synthesis` for the perturbations and
:mod:`emseg.noise.transition` for noise transition matrices.
"""

from __future__ import annotations

from emseg.noise.synthesis import (
    HALO_MODES,
    SKELETON_HALO_MARGIN,
    Selection,
    block_rng,
    dilate,
    erode,
    flip,
    random_labels,
    required_halo,
    sample,
    shift,
    skeleton,
    stream_key,
)
from emseg.noise.transition import (
    TransitionCounter,
    TransitionMatrix,
    flip_matrix,
    noise_report,
    random_label_matrix,
    rank_statistics,
    report_from_counts,
    transition_from_counts,
    transition_matrix,
)

__all__ = [
    "HALO_MODES",
    "SKELETON_HALO_MARGIN",
    "Selection",
    "TransitionCounter",
    "TransitionMatrix",
    "block_rng",
    "dilate",
    "erode",
    "flip",
    "flip_matrix",
    "noise_report",
    "random_label_matrix",
    "random_labels",
    "rank_statistics",
    "report_from_counts",
    "required_halo",
    "sample",
    "shift",
    "skeleton",
    "stream_key",
    "transition_from_counts",
    "transition_matrix",
]
