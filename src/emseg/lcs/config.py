"""The ``[lcs]`` table of a training config: :class:`LCSConfig`, read and checked.

:func:`load_lcs_config` reads a training config with an ``[lcs]`` table into the shared
:class:`~emseg.engine.config.TrainConfig` and an :class:`LCSConfig`; relative atlas paths are resolved
against the config file's folder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from emseg.engine.config import TrainConfig, load_config
from emseg.errors import InputError
from emseg.io import parse_spec
from emseg.lcs.merge import MERGES
from emseg.runtime.choices import check_integer, check_number, check_table_keys

DICE_MODES = ("class", "batch", "sample")
LCS_CONDITIONINGS = ("prototype", "atlas")


@dataclass(frozen=True)
class LCSConfig:
    """The ``[lcs]`` table of a training config.

    Attributes
    ----------
    classes : tuple of int
        Classes the model learns (values 1..n_classes-1); default all foreground classes.
    atlas_raw, atlas_label : str or None
        Atlas image and label volumes (required unless ``baseline``); relative paths are resolved
        against the config file's folder.
    atlas_offset : tuple of int or None
        Corner of the patch-sized atlas crop in the atlas volume (volume axes); default: the
        window on a half-patch grid that contains the most classes, then the most voxels of the
        rarest one, nearest to the centre.
    merge_prob : float
        Probability that a second class is merged into a sample's target and atlas mask.
    split_prob : float
        Probability that a sample's class (set) is restricted to one part, in target and atlas
        mask alike: its thick or its thin part at a random radius (:mod:`emseg.lcs.split`).
    negative_prob : float
        Probability that a sample is conditioned on a class absent from its patch (when the
        patch lacks one of the annotated classes); otherwise on a class present in it.
    bce_weight : float
        Weight of the binary cross-entropy term (mean over each patch's voxels, then over the
        batch) added to the soft Dice loss.
    dice : {"class", "batch", "sample"}
        How the soft Dice of a batch is formed. ``class`` (default): pooled over the patches
        conditioned on the same class set, then averaged over the sets in the batch (every class
        weighs the same). ``batch``: pooled over the whole batch (large classes dominate).
        ``sample``: mean of per-patch Dice. A pool with an empty target scores the mean predicted
        probability instead of its Dice (which would be constant), so it still has a gradient.
    conditioning : {"prototype", "atlas"}
        How the network reads the condition (:mod:`emseg.models.conditioning`): ``prototype``
        (default), class prototypes of the atlas applied by FiLM; ``atlas``, the seed's atlas
        image and mask, area-pooled to the bottleneck.
    baseline : bool
        Train the multi-channel baseline instead (``emseg lcs train --baseline``).
    baseline_dice_weight : float
        Baseline only: weight of the mean soft Dice of the foreground channels; the baseline's loss
        is ``bce_weight`` x lazy NLL + ``baseline_dice_weight`` x Dice, so that at the defaults (1, 1)
        it is the same family and weighting as the label-conditioned loss (BCE + soft Dice).
    merge : {"calibrated", "max"}
        How ``emseg lcs infer`` and validation merge the per-label maps (:mod:`emseg.lcs.merge`):
        ``calibrated`` (default), a softmax over per-label logits calibrated on the atlas;
        ``max``, the largest sigmoid if above 0.5.
    """

    classes: tuple[int, ...] = ()
    atlas_raw: str | None = None
    atlas_label: str | None = None
    atlas_offset: tuple[int, ...] | None = None
    merge_prob: float = 0.5
    split_prob: float = 0.0
    negative_prob: float = 0.3
    bce_weight: float = 1.0
    dice: str = "class"
    conditioning: str = "prototype"
    baseline: bool = False
    baseline_dice_weight: float = 1.0
    merge: str = "calibrated"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["classes"] = [int(c) for c in self.classes]
        out["atlas_offset"] = None if self.atlas_offset is None else [int(o) for o in self.atlas_offset]
        return out


def lcs_config_from_dict(data: Mapping[str, Any], *, n_classes: int, base_dir: str | Path = ".",
                         baseline: bool | None = None, source: str = "[lcs]") -> LCSConfig:
    """Build and check an :class:`LCSConfig` from the ``[lcs]`` table (a mapping).

    Examples
    --------
    >>> lcs_config_from_dict({"classes": [1, 2], "atlas_raw": "a.h5:raw", "atlas_label": "a.h5:label"},
    ...                      n_classes=3).classes
    (1, 2)
    """
    data = dict(data)
    check_table_keys(data, LCSConfig, "lcs", source=source)
    if baseline is not None:
        data["baseline"] = bool(baseline)
    base = Path(base_dir)
    for key in ("atlas_raw", "atlas_label"):
        if data.get(key) is not None:
            spec = parse_spec(str(data[key]))
            path = spec.path if spec.path.is_absolute() else base / spec.path
            data[key] = str(dataclasses.replace(spec, path=path))
    try:
        classes = data.get("classes")
        data["classes"] = (tuple(range(1, n_classes)) if classes is None
                           else tuple(check_integer(c, "classes") for c in classes))
        if data.get("atlas_offset") is not None:
            data["atlas_offset"] = tuple(check_integer(o, "atlas_offset") for o in data["atlas_offset"])
        for key in ("merge_prob", "split_prob", "negative_prob", "bce_weight", "baseline_dice_weight"):
            if key in data:
                data[key] = check_number(data[key], key)
        config = LCSConfig(**data)
    except (TypeError, ValueError) as exc:
        raise InputError(f"[lcs]: {exc}".splitlines()[0], source=source) from None
    check_lcs_config(config, n_classes, source=source)
    return config


def check_lcs_config(config: LCSConfig, n_classes: int, *, source: str = "[lcs]") -> None:
    """Consistency checks of an :class:`LCSConfig` against ``n_classes``."""
    if not config.classes:
        raise InputError("[lcs] classes is empty (need at least one class)", source=source)
    bad = [c for c in config.classes if not 1 <= c < n_classes]
    if bad:
        raise InputError(f"[lcs] classes must lie in 1..{n_classes - 1} (n_classes={n_classes}), got {bad[0]}",
                         source=source)
    if len(set(config.classes)) != len(config.classes):
        raise InputError(f"[lcs] classes has duplicates: {list(config.classes)}", source=source)
    if not 0 <= config.merge_prob <= 1:
        raise InputError(f"[lcs] merge_prob must be in [0, 1], got {config.merge_prob}", source=source)
    if not 0 <= config.split_prob <= 1:
        raise InputError(f"[lcs] split_prob must be in [0, 1], got {config.split_prob}", source=source)
    if config.merge not in MERGES:
        raise InputError(f"[lcs] merge must be one of {', '.join(MERGES)}, got {config.merge!r}", source=source)
    if not 0 <= config.negative_prob <= 1:
        raise InputError(f"[lcs] negative_prob must be in [0, 1], got {config.negative_prob}", source=source)
    if config.conditioning not in LCS_CONDITIONINGS:
        raise InputError(f"[lcs] conditioning must be one of {', '.join(LCS_CONDITIONINGS)}, "
                         f"got {config.conditioning!r}", source=source)
    if config.bce_weight < 0 or config.baseline_dice_weight < 0:
        raise InputError("[lcs] bce_weight and baseline_dice_weight must be >= 0", source=source)
    if not isinstance(config.baseline, bool):
        raise InputError(f"[lcs] baseline must be true or false, got {config.baseline!r}", source=source)
    if config.dice not in DICE_MODES:
        raise InputError(f"[lcs] dice must be one of {', '.join(DICE_MODES)}, got {config.dice!r}", source=source)
    if not config.baseline and (not config.atlas_raw or not config.atlas_label):
        raise InputError("[lcs] needs atlas_raw and atlas_label (e.g. atlas_raw = \"f.h5:raw\")", source=source)


def load_lcs_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None,
                    baseline: bool | None = None) -> tuple[TrainConfig, LCSConfig]:
    """Read a training config with an ``[lcs]`` table: ``(TrainConfig, LCSConfig)``.

    Examples
    --------
    >>> config, lcs = load_lcs_config("lcs.toml", overrides={"steps": 100})  # doctest: +SKIP
    """
    config = load_config(path, overrides=overrides, sections=("lcs",))
    table = config.sections.get("lcs", {})
    return config, lcs_config_from_dict(table, n_classes=config.n_classes, base_dir=Path(path).parent,
                                        baseline=baseline, source=str(path))
