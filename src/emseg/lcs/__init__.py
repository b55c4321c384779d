"""Label-conditioned segmentation (LCS; Ma, Lee & Sabuncu, "Label conditioned segmentation").

One single-output U-Net segments any number of classes: the class is chosen by a condition, the
atlas image and the binary atlas mask of that class, read either as class prototypes of the
atlas applied by FiLM (``conditioning = "prototype"``) or area-pooled at the bottleneck as in the
seed (``"atlas"``). Training and inference memory do not depend on the number of classes;
inference runs one conditioned pass per requested label, and labels drawn on the atlas but never
trained on can be requested too.

* :mod:`emseg.lcs.atlas` -- the patch-sized atlas stored in checkpoints.
* :mod:`emseg.lcs.config` -- the ``[lcs]`` table of a training config.
* :mod:`emseg.lcs.loss` -- the conditioned loss (soft Dice with an empty-target term, BCE).
* :mod:`emseg.lcs.task` -- class-set sampling, :class:`LCSTask` for the shared training loop, baseline.
* :mod:`emseg.lcs.merge` -- per-label probabilities into merged label maps, their Dice.
* :mod:`emseg.lcs.infer` -- batched conditioned inference, output container.
"""
from __future__ import annotations

from emseg.io import OutputGroup
from emseg.lcs.atlas import Atlas, array_sha256, choose_offset, load_atlas
from emseg.lcs.config import LCSConfig, lcs_config_from_dict, load_lcs_config
from emseg.lcs.loss import conditioned_loss, dice_or_empty
from emseg.lcs.merge import DiceAccumulator, RunningMerge, merge_labels, normalised_probabilities
from emseg.lcs.infer import (
    InferConfig,
    InferResult,
    LabelPredictor,
    LCSModel,
    infer_file,
    load_lcs_model,
    parse_output,
)
from emseg.lcs.task import LCSTask, binary_target, channel_lut, draw_class_set, evaluate_lcs, train_lcs

__all__ = [
    "Atlas", "DiceAccumulator", "InferConfig", "InferResult", "LCSConfig", "LCSModel", "LCSTask",
    "LabelPredictor", "OutputGroup", "RunningMerge", "array_sha256", "binary_target", "channel_lut", "choose_offset",
    "conditioned_loss", "dice_or_empty", "draw_class_set", "evaluate_lcs", "infer_file", "lcs_config_from_dict",
    "load_atlas", "load_lcs_config", "load_lcs_model", "merge_labels", "normalised_probabilities",
    "parse_output", "train_lcs",
]
