"""Segmentation networks: a 2D/3D U-Net with embedding output, MC dropout and conditioning."""
from __future__ import annotations

from emseg.models.unet import UNet, build_model, fold_batchnorm, set_mc_dropout

__all__ = ["UNet", "build_model", "fold_batchnorm", "set_mc_dropout"]
