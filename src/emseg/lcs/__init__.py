"""Label-conditioned segmentation (LCS; Ma, Lee & Sabuncu, "Label conditioned segmentation").

One single-output U-Net segments any number of classes: the class is chosen by a condition, the
atlas image and the binary atlas mask of that class, read either as class prototypes of the
atlas applied by FiLM (``conditioning = "prototype"``) or area-pooled at the bottleneck as in the
seed (``"atlas"``). Training and inference memory do not depend on the number of classes;
inference runs one conditioned pass per requested label, and labels drawn on the atlas but never
trained on can be requested too.

* :mod:`emseg.lcs.atlas` -- the patch-sized atlas stored in checkpoints.
* :mod:`emseg.lcs.task` -- ``[lcs]`` config, :class:`LCSTask` for the shared training loop, baseline.
* :mod:`emseg.lcs.predict` -- batched conditioned inference, merged label maps, output container.
"""
from __future__ import annotations

from emseg.io import OutputGroup
from emseg.lcs.atlas import Atlas, array_sha256, choose_offset, load_atlas
from emseg.lcs.predict import (
    DiceAccumulator,
    InferConfig,
    InferResult,
    LabelPredictor,
    LCSModel,
    RunningMerge,
    infer_file,
    load_lcs_model,
    merge_labels,
    normalised_probabilities,
    parse_output,
)
from emseg.lcs.task import (
    LCSConfig,
    LCSTask,
    binary_target,
    channel_lut,
    conditioned_loss,
    dice_or_empty,
    draw_class_set,
    evaluate_lcs,
    lcs_config_from_dict,
    load_lcs_config,
    train_lcs,
)

__all__ = [
    "Atlas", "DiceAccumulator", "InferConfig", "InferResult", "LCSConfig", "LCSModel", "LCSTask",
    "LabelPredictor", "OutputGroup", "RunningMerge", "array_sha256", "binary_target", "channel_lut", "choose_offset",
    "conditioned_loss", "dice_or_empty", "draw_class_set", "evaluate_lcs", "infer_file", "lcs_config_from_dict",
    "load_atlas", "load_lcs_config", "load_lcs_model", "merge_labels", "normalised_probabilities",
    "parse_output", "train_lcs",
]
