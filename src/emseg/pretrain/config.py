"""The configuration of ``emseg pretrain``: a TOML file of raw volumes, the network and the pretext.

The file takes the training keys that make sense without labels (``patch_shape``, ``batch_size``,
``steps``, ``max_seconds``, ``log_every``, ``checkpoint_every``, ``precision``, ``prefetch``,
``compile``, ``init`` and the ``[model]``, ``[augment]`` and ``[optim]`` tables of ``emseg train``),
one or more ``[[data]]`` tables (``raw``, optional ``region`` and ``prio``) and a ``[pretext]``
table (:class:`PretextConfig`). Unknown keys are errors. Every key is documented in
``docs/formats.md``. The defaults are the recipe of ``docs/pretrain.md``: batches of 16 patches,
learning rate 1e-3, 60% of 16 x 16 blocks hidden.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from emseg.engine.config import TrainConfig, _build, config_from_dict, read_toml
from emseg.errors import InputError
from emseg.pretrain.pretext import KINDS

#: Top-level keys of a pretraining config.
KEYS = ("patch_shape", "batch_size", "steps", "max_seconds", "log_every", "checkpoint_every", "precision", "amp",
        "prefetch", "compile", "init", "model", "augment", "optim", "data", "pretext")
#: Keys of a ``[[data]]`` table.
DATA_KEYS = ("raw", "region", "prio")
#: Defaults that differ from ``emseg train``'s.
DEFAULTS: dict[str, Any] = {"batch_size": 16}
OPTIM_DEFAULTS: dict[str, Any] = {"lr": 1e-3}


@dataclass(frozen=True)
class PretextConfig:
    """The ``[pretext]`` table (see :mod:`emseg.pretrain.pretext` for what each kind does).

    Attributes
    ----------
    kind : {"masked", "denoise", "contrastive"}
        The pretext task. ``masked`` is the default for now; the choice is measured in
        ``docs/results.md``.
    mask_ratio : float
        ``masked``: share of the blocks hidden, in (0, 1).
    block : int
        ``masked``: block side in-plane, in voxels.
    block_z : int
        ``masked``, 3D networks: block depth in sections (1 = each section masked on its own).
    norm_target : bool
        ``masked``: reconstruct the patch standardised to zero mean and unit variance instead
        of the raw intensities.
    noise_std : float
        ``denoise``: standard deviation of the added Gaussian noise (intensities in [0, 1]);
        ``contrastive``: the largest standard deviation of each view's noise.
    embed_dim : int
        ``contrastive``: channels per voxel of the compared maps (the pretraining network's
        output head, which ``--init`` leaves out), 2 to 256.
    """

    kind: str = "masked"
    mask_ratio: float = 0.6
    block: int = 16
    block_z: int = 1
    norm_target: bool = False
    noise_std: float = 0.1
    embed_dim: int = 32

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"pretext.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not (math.isfinite(self.mask_ratio) and 0 < self.mask_ratio < 1):
            raise InputError(f"pretext.mask_ratio must be in (0, 1), got {self.mask_ratio!r}")
        for key in ("block", "block_z"):
            if getattr(self, key) < 1:
                raise InputError(f"pretext.{key} must be >= 1, got {getattr(self, key)!r}")
        if not (math.isfinite(self.noise_std) and self.noise_std > 0):
            raise InputError(f"pretext.noise_std must be a positive number, got {self.noise_std!r}")
        if not 2 <= self.embed_dim <= 256:
            raise InputError(f"pretext.embed_dim must be from 2 to 256, got {self.embed_dim!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PretrainConfig:
    """A pretraining run: the shared training settings (raw volumes as ``train`` cubes) and the
    pretext (which sets the network's output channels: one, or ``embed_dim`` for ``contrastive``)."""

    training: TrainConfig
    pretext: PretextConfig = dataclasses.field(default_factory=PretextConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"training": self.training.to_dict(), "pretext": self.pretext.to_dict()}


def pretrain_config_from_dict(data: Mapping[str, Any], *, base_dir: str | Path = ".",
                              source: str = "config") -> PretrainConfig:
    """Build a :class:`PretrainConfig` from a parsed TOML mapping, checking every key.

    Examples
    --------
    >>> cfg = pretrain_config_from_dict({"patch_shape": [1, 32, 32], "data": [{"raw": "a.h5:raw"}]})
    >>> cfg.training.batch_size, cfg.training.optim.lr, cfg.pretext.kind
    (16, 0.001, 'masked')
    """
    data = dict(data)
    try:
        unknown = sorted(set(data) - set(KEYS))
        if unknown:
            raise InputError(f"unknown key(s) {', '.join(unknown)} in a pretraining config (known: "
                             f"{', '.join(sorted(KEYS))})")
        entries = data.pop("data", [])
        if isinstance(entries, Mapping) or not isinstance(entries, list) or not entries:
            raise InputError("no [[data]] volumes: add [[data]] tables with raw = \"FILE:DATASET\"")
        for entry in entries:
            if not isinstance(entry, Mapping):
                raise InputError("each [[data]] entry must be a table with raw (and optional region, prio)")
            if "label" in entry:
                raise InputError("[[data]] takes raw volumes only: labels are for `emseg train`, which can start "
                                 "from the pretrained weights with --init")
            extra = sorted(set(entry) - set(DATA_KEYS))
            if extra:
                raise InputError(f"unknown key(s) {', '.join(extra)} in [[data]] (known: {', '.join(DATA_KEYS)})")
            if "raw" not in entry:
                raise InputError("a [[data]] table needs raw = \"FILE:DATASET\"")
        pretext = data.pop("pretext", {})
        if not isinstance(pretext, Mapping):
            raise InputError("[pretext] must be a table")
        pretext_config = _build(PretextConfig, pretext, "pretext")
        if "patch_shape" not in data:
            raise InputError("missing required key 'patch_shape'")
        optim = data.pop("optim", {})
        if not isinstance(optim, Mapping):
            raise InputError("[optim] must be a table")
        train_data = dict(DEFAULTS, **data, train=entries, n_classes=1, class_weights=[], dice_weight=0.0,
                          optim=dict(OPTIM_DEFAULTS, **optim))
    except InputError as exc:
        raise InputError(str(exc), source=source) from None
    training = config_from_dict(train_data, base_dir=base_dir, source=source)
    return PretrainConfig(training, pretext_config)


def load_pretrain_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> PretrainConfig:
    """Read a pretraining config; ``overrides`` replace keys (``None`` values ignored; dotted keys
    such as ``"optim.lr"`` or ``"pretext.kind"`` reach into tables)."""
    path = Path(path)
    data = read_toml(path, overrides=overrides)
    return pretrain_config_from_dict(data, base_dir=path.parent, source=str(path))
