"""Self-supervised pretraining of the U-Net on raw volumes (``emseg pretrain``)."""
from __future__ import annotations

from emseg.pretrain.config import PretextConfig, PretrainConfig, load_pretrain_config, pretrain_config_from_dict
from emseg.pretrain.task import PretrainTask, pretrain

__all__ = ["PretextConfig", "PretrainConfig", "PretrainTask", "load_pretrain_config", "pretrain",
           "pretrain_config_from_dict"]
