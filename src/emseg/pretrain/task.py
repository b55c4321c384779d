"""Self-supervised pretraining with the shared training loop.

:class:`PretrainTask` plugs into :func:`emseg.engine.training.run_training`, so a pretraining run
has every property of ``emseg train``: bf16 on hardware that computes it, prefetched batches,
atomic checkpoints, exact resume, the stop on non-finite losses, one writer per run folder,
``metrics.csv`` and torchrun. The network is the segmentation U-Net of the ``[model]`` table
with one output channel (the reconstruction; ``embed_dim`` for ``contrastive``), so ``emseg train
--init DIR/last.pt`` takes every tensor but the output head. Checkpoints have ``task =
"pretrain"`` and hold the ``pretext`` settings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from emseg.data import Cube, PatchSampler, close_cubes, open_cubes
from emseg.engine.training import TrainResult, fit
from emseg.errors import InputError
from emseg.pretrain.config import PretrainConfig
from emseg.pretrain.pretext import make_pretext_batch, pretext_loss, turn_back, vicreg_loss


class PretrainTask:
    """A U-Net trained on a pretext task for :func:`run_training` (one output channel, ``embed_dim``
    for ``contrastive``).

    Parameters
    ----------
    config : PretrainConfig
    cubes : sequence of Cube, optional
        Use these (e.g. in-memory arrays) instead of opening the ``[[data]]`` volumes.
    """

    name = "pretrain"
    metric_columns: tuple[str, ...] = ()

    def __init__(self, config: PretrainConfig, *, cubes: Sequence[Cube] | None = None):
        self.config = config
        self.training = config.training
        self.pretext = config.pretext
        self.ndim = self.training.model_ndim
        patch = self.training.patch_shape
        self.cubes = list(cubes) if cubes is not None else open_cubes(self.training.train, 1, patch)
        self.valid_cubes: list[Cube] = []
        self.sampler = PatchSampler(self.cubes, patch, squeeze=self.ndim == 2 and len(patch) == 3)
        self.augmenter = self.training.augment

    def model_config(self) -> dict[str, Any]:
        m = self.training.model
        out = self.pretext.embed_dim if self.pretext.kind == "contrastive" else 1
        return dict(ndim=self.ndim, in_channels=1, out_channels=out, depth=m.depth, base_width=m.base_width,
                    norm=m.norm, dropout=m.dropout, anisotropic_levels=m.anisotropic_levels)

    def batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        raw = self.sampler.batch(self.training.batch_size, rng, self.augmenter)["raw"]
        return {k: torch.from_numpy(v) for k, v in make_pretext_batch(raw, self.pretext, self.ndim, rng).items()}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.pretext.kind == "contrastive":  # both views in one pass: batch norm sees them together
            n = batch["raw"].shape[0]
            maps = model(torch.cat([batch["raw"], batch["view"]]))
            return vicreg_loss(maps[:n], turn_back(maps[n:], batch["transforms"]), batch["voxels"])
        return pretext_loss(model(batch["raw"]), batch["target"], batch.get("mask"))

    def validate(self, model: torch.nn.Module, device: torch.device, precision: Any) -> dict[str, float] | None:
        return None  # the pretext has no labels to validate on; its loss is the curve

    def extra_state(self) -> dict[str, Any]:
        """Checkpoint entries beyond the network: the ``[pretext]`` settings."""
        return {"pretext": self.pretext.to_dict()}

    def check_resume(self, state: Mapping[str, Any], source: str) -> None:
        """A resumed run must be a pretraining run with the same pretext settings."""
        if state.get("task") != self.name:
            raise InputError(f"last.pt was written by `{state.get('task')}` training, not by pretraining",
                             source=source)
        stored = state.get("pretext")
        if isinstance(stored, Mapping):  # keys added since a run was written take their defaults
            stored = dict(type(self.pretext)().to_dict(), **stored)
        if stored != self.pretext.to_dict():
            raise InputError(f"last.pt was pretrained with other [pretext] settings ({state.get('pretext')})",
                             source=source)

    def close(self) -> None:
        close_cubes(self.cubes)


def pretrain(config: PretrainConfig, out_dir: str | Path, *, cubes: Sequence[Cube] | None = None,
             **options: Any) -> TrainResult:
    """Pretrain a U-Net on raw volumes (the core of ``emseg pretrain``); writes ``out_dir/last.pt``.

    ``options`` are those of :func:`~emseg.engine.training.run_training`: ``runtime``, ``resume``,
    ``progress`` and ``stop_after``; ``cubes`` replace the config's ``[[data]]`` (in-memory volumes).

    Examples
    --------
    >>> from emseg.pretrain import load_pretrain_config
    >>> result = pretrain(load_pretrain_config("pretrain.toml"), "runs/pre")  # doctest: +SKIP
    """
    return fit(PretrainTask(config, cubes=cubes), config.training, out_dir, **options)
