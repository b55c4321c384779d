"""The options of an iGTT run (:class:`IGTTConfig`) and the columns of its ``metrics.csv``."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from emseg.errors import InputError
from emseg.runtime.precision import DEFAULT_PRECISION, check_precision

#: Columns of ``metrics.csv`` (one row per completed epoch; score columns empty without ground truth).
METRIC_COLUMNS = ("epoch", "threshold", "dmi", "fg_fraction", "inverted", "train_loss",
                  "label_fg_fraction", "label_fraction", "mask_iou_prev", "dice", "auc", "accuracy", "seconds")


def _err(message: str) -> InputError:
    return InputError(message)


@dataclass(frozen=True)
class IGTTConfig:
    """Options of :func:`igtt` (every bad value raises ``ValueError``).

    Parameters
    ----------
    epochs : int
        Number of iterations (train, predict, select, EMS).
    n_thresholds : int
        ``K``, thresholds evenly spaced from ``min P`` to ``max P`` (both included); >= 2.
    ems : bool
        Pass the chosen mask through the EMS module; ``False`` trains on the mask itself.
    shift_radius : int
        EMS: radius (voxels) of the in-plane disc each skeleton voxel is moved within.
    sample_fraction : float
        EMS: fraction of each class (skeleton foreground and background) kept; the rest is -1
        (ignored by the loss).
    invert_large : bool
        Invert a chosen mask covering more than half of the image (see :func:`invert_if_large`).
    dmi_weight, iou_weight : float
        Weights of the DMI and IoU terms of the training loss (both 1 in the paper).
    steps_per_epoch, batch_size : int
        Training steps per epoch and patches per step.
    patch_shape : tuple of int
        In-plane training patch ``(y, x)``; multiples of ``2**depth``.
    depth, base_width : int
        U-Net size (down-sampling steps, feature maps at the first level).
    lr : float
        Adam learning rate (constant; the optimizer state carries across epochs).
    augment : bool
        Random flips, 90 degree rotations and small brightness/contrast changes of the patches.
    predict_window : int
        In-plane side of the sliding window used to predict the image (rounded up to the network's
        multiple; the fully convolutional network accepts windows larger than its training patch).
    adaptive_block_size, adaptive_offset : int, float
        ``block_size`` (odd) and ``offset`` of the adaptive thresholding baseline
        (:func:`skimage.filters.threshold_local`, ``method="gaussian"``).
    baselines : bool
        Compute the Otsu and adaptive thresholding baselines.
    save_pseudo_labels : bool
        Write each epoch's new pseudo-labels to ``pseudo_labels.h5:epoch_NN``.
    precision : {"auto", "fp32", "bf16"}
        Network arithmetic for training and prediction (:mod:`emseg.runtime.precision`).

    Examples
    --------
    >>> cfg = IGTTConfig(epochs=5, shift_radius=3)
    >>> cfg.n_thresholds
    20
    """

    epochs: int = 10
    n_thresholds: int = 20
    ems: bool = True
    shift_radius: int = 2
    sample_fraction: float = 0.5
    invert_large: bool = True
    dmi_weight: float = 1.0
    iou_weight: float = 1.0
    steps_per_epoch: int = 100
    batch_size: int = 4
    patch_shape: tuple[int, int] = (128, 128)
    depth: int = 3
    base_width: int = 16
    lr: float = 1e-3
    augment: bool = True
    predict_window: int = 256
    adaptive_block_size: int = 51
    adaptive_offset: float = 0.0
    baselines: bool = True
    save_pseudo_labels: bool = False
    precision: str = DEFAULT_PRECISION

    def __post_init__(self) -> None:
        patch = tuple(int(p) for p in self.patch_shape)
        if len(patch) == 3 and patch[0] == 1:
            patch = patch[1:]
        object.__setattr__(self, "patch_shape", patch)
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.n_thresholds >= 2, f"n_thresholds (K) must be >= 2, got {self.n_thresholds}"),
            (self.shift_radius >= 0, f"shift_radius must be >= 0, got {self.shift_radius}"),
            (0.0 < self.sample_fraction <= 1.0, f"sample_fraction must be in (0, 1], got {self.sample_fraction}"),
            (self.dmi_weight >= 0 and self.iou_weight >= 0 and self.dmi_weight + self.iou_weight > 0,
             f"loss weights must be >= 0 and not both 0, got dmi {self.dmi_weight}, iou {self.iou_weight}"),
            (self.steps_per_epoch >= 1, f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (len(patch) == 2 and all(p >= 1 for p in patch),
             f"patch_shape must be two positive sides (y, x), got {tuple(self.patch_shape)}"),
            (self.depth >= 1 and self.base_width >= 1,
             f"depth and base_width must be >= 1, got {self.depth}, {self.base_width}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.predict_window >= 1, f"predict_window must be >= 1, got {self.predict_window}"),
            (self.adaptive_block_size >= 3 and self.adaptive_block_size % 2 == 1,
             f"adaptive_block_size must be an odd integer >= 3, got {self.adaptive_block_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise _err(message)
        check_precision(self.precision)
        divisor = 2 ** self.depth
        if any(p % divisor for p in patch):
            raise _err(f"patch_shape {patch} must be a multiple of {divisor} (2**depth) on each side")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for checkpoints, JSON and the resume check)."""
        d = asdict(self)
        d["patch_shape"] = list(self.patch_shape)
        return d
