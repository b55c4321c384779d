"""Noisy-label synthesis and analysis (RCL, PCL, RL; transition matrices).

See :mod:`emseg.noise.synthesis` for the perturbations and
:mod:`emseg.noise.transition` for noise transition matrices.
"""

from __future__ import annotations

from emseg.noise.synthesis import (
    HALO_MODES,
    SKELETON_HALO_MARGIN,
    block_rng,
    dilate,
    erode,
    flip,
    random_labels,
    required_halo,
    sample,
    shift,
    skeleton,
)
from emseg.noise.transition import (
    TransitionMatrix,
    flip_matrix,
    noise_report,
    random_label_matrix,
    transition_matrix,
)

__all__ = [
    "HALO_MODES",
    "SKELETON_HALO_MARGIN",
    "TransitionMatrix",
    "block_rng",
    "dilate",
    "erode",
    "flip",
    "flip_matrix",
    "noise_report",
    "random_label_matrix",
    "random_labels",
    "required_halo",
    "sample",
    "shift",
    "skeleton",
    "transition_matrix",
]
