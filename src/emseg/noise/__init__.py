"""Noisy-label synthesis and analysis (RCL, PCL, RL; transition matrices).

See :mod:`emseg.noise.synthesis` (RCL, RL, shift) and :mod:`emseg.noise.morphology` (PCL) for
the perturbations, :mod:`emseg.noise.streams` for the voxel-keyed random streams they draw from,
:mod:`emseg.noise.transition` for noise transition matrices, :mod:`emseg.noise.report` for the
report of a noisy volume against its clean labels, :mod:`emseg.noise.params`,
:mod:`emseg.noise.process` and :mod:`emseg.noise.blockwise` for a run on a volume on disk.
"""

from __future__ import annotations

from emseg.noise.morphology import dilate, erode, skeleton
from emseg.noise.counts import Selection
from emseg.noise.streams import block_rng, stream_key
from emseg.noise.synthesis import (
    HALO_MODES,
    SKELETON_HALO_MARGIN,
    flip,
    random_labels,
    required_halo,
    sample,
    shift,
)
from emseg.noise.report import TransitionCounter, noise_report, report_from_counts
from emseg.noise.transition import (
    TransitionMatrix,
    flip_matrix,
    random_label_matrix,
    rank_statistics,
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
