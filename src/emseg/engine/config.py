"""Training configuration: a TOML file mapped onto frozen dataclasses.

Every key is documented in ``docs/formats.md``. Relative volume paths are resolved against the
config file's folder. Unknown keys are errors, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from emseg.data.augment import Augmenter
from emseg.errors import InputError
from emseg.io import parse_spec, read_toml
from emseg.models.checkpoint import divisor_of
from emseg.runtime.choices import check_table_keys
from emseg.runtime.precision import DEFAULT_PRECISION, check_precision


#: The step limit of a run bounded by ``max_seconds`` only.
UNBOUNDED_STEPS = 2**62


@dataclass(frozen=True)
class CubeConfig:
    raw: str
    label: str | None = None
    prio: float | None = None
    #: Optional box [[start, stop], ...] per leading axis (e.g. [[0, 15]] = sections 0-14).
    region: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class ModelConfig:
    ndim: int | None = None  # inferred from patch_shape when unset
    depth: int = 4
    #: 16, not 32: on VNC the narrower network trains ~2x more steps in the same time and ended
    #: higher at a 10-minute budget (docs/results.md, "Defaults that train well").
    base_width: int = 16
    norm: str = "batch"
    dropout: float = 0.0
    anisotropic_levels: int = 0


#: The ``[augment]`` table: the augmenter's own fields and defaults.
AugmentConfig = Augmenter


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"  # constant | cosine | step
    warmup_steps: int = 50
    step_size: int = 1000
    gamma: float = 0.5
    min_lr_ratio: float = 0.01
    #: Multiplier of the learning rate of the encoder (the contracting path and the bottleneck):
    #: below 1 a run started with ``init`` keeps more of the encoder it was given, 0 freezes its
    #: weights (batch-norm running statistics still adapt in training mode).
    encoder_lr_scale: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    train: tuple[CubeConfig, ...]
    n_classes: int
    patch_shape: tuple[int, ...]
    valid: tuple[CubeConfig, ...] = ()
    batch_size: int = 8
    #: Per-class weights of the loss: a list, ``"auto"`` (from the training labels' class
    #: frequencies, see :func:`emseg.semantic.train.auto_class_weights`) or None (all 1).
    class_weights: tuple[float, ...] | str | None = "auto"
    #: Weight of the multi-class soft Dice term added to the lazy NLL (0 = NLL only).
    dice_weight: float = 1.0
    example_ignore_threshold: float = 0.9
    #: Optimiser steps; None = 1000, or no step limit when ``max_seconds`` is set (train for the time).
    steps: int | None = None
    valid_every: int = 200
    log_every: int = 10
    checkpoint_every: int = 100
    #: ``auto | fp32 | bf16``: bf16 autocast + channels-last where the hardware computes bf16
    #: natively (see :mod:`emseg.runtime.precision`); weights, checkpoints and losses stay float32.
    precision: str = DEFAULT_PRECISION
    #: Older spelling: ``amp = false`` means ``precision = "fp32"``.
    amp: bool = True
    #: Prepare the next batch in a background thread while the current step runs.
    prefetch: bool = True
    #: Run the training network through ``torch.compile`` (inductor); a one-off compile cost.
    compile: bool = False
    #: Stop after this many seconds of training (a fixed compute budget); None = no limit.
    max_seconds: float | None = None
    #: Checkpoint whose weights start the run (``emseg train --init``; relative to the config file).
    init: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    #: Extra tables a subcommand accepts (e.g. ``lcs``), kept as plain dicts.
    sections: Mapping[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        """``steps``, or its default: 1000 without a time budget, unbounded with one."""
        if self.steps is not None:
            return self.steps
        return UNBOUNDED_STEPS if self.max_seconds is not None else 1000

    @property
    def effective_precision(self) -> str:
        """``precision``, with the older ``amp = false`` read as ``fp32``."""
        return "fp32" if not self.amp else self.precision

    @property
    def model_ndim(self) -> int:
        if self.model.ndim is not None:
            return self.model.ndim
        return 2 if len(self.patch_shape) == 2 or self.patch_shape[0] == 1 else 3

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists, numbers, strings) for checkpoints and JSON."""
        return _plain(dataclasses.asdict(self))

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _plain(obj):
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


#: What each annotation accepts from TOML: (python types, wording in messages).
_KINDS = {
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
}


def _key_name(where: str, name: str) -> str:
    return name if where == "top level" else f"{where}.{name}"


def _check_types(cls, data: Mapping[str, Any], where: str) -> None:
    """Scalar keys must have the annotated TOML type (``steps = "2"`` is refused, naming the key)."""
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        parts = [p.strip() for p in str(f.type).split("|")]
        optional = "None" in parts
        parts = [p for p in parts if p != "None"]
        if len(parts) != 1 or parts[0] not in _KINDS:
            continue
        types, wording = _KINDS[parts[0]]
        value = data[f.name]
        if value is None and optional:
            continue
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise InputError(f"{_key_name(where, f.name)} must be {wording}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{_key_name(where, f.name)} must be finite, got {value!r}")


def _build(cls, data: Mapping[str, Any], where: str):
    check_table_keys(data, cls, where)
    _check_types(cls, data, where)
    try:
        return cls(**data)
    except TypeError as exc:
        raise InputError(f"[{where}]: {exc}") from None


def _cube(entry: Any, base: Path, where: str) -> CubeConfig:
    if not isinstance(entry, Mapping):
        raise InputError(f"each [[{where}]] entry must be a table with raw/label/prio")
    cube = _build(CubeConfig, entry, where)

    def resolve(spec: str | None) -> str | None:
        if spec is None:
            return None
        parsed = parse_spec(spec)
        path = parsed.path if parsed.path.is_absolute() else base / parsed.path
        return str(dataclasses.replace(parsed, path=path))

    region = None
    if cube.region is not None:
        try:
            region = tuple((int(a), int(b)) for a, b in cube.region)
        except (TypeError, ValueError):
            raise InputError(f"[{where}] region must be a list of [start, stop] pairs, got {cube.region!r}") from None
    return CubeConfig(resolve(cube.raw), resolve(cube.label), cube.prio, region)


def config_from_dict(
    data: Mapping[str, Any],
    *,
    base_dir: str | Path = ".",
    sections: tuple[str, ...] = (),
    source: str = "config",
) -> TrainConfig:
    """Build a :class:`TrainConfig` from a parsed TOML mapping, checking every key."""
    base = Path(base_dir)
    data = dict(data)
    try:
        train = tuple(_cube(e, base, "train") for e in data.pop("train", []))
        valid = tuple(_cube(e, base, "valid") for e in data.pop("valid", []))
        model = _build(ModelConfig, data.pop("model", {}), "model")
        augment = _build(AugmentConfig, data.pop("augment", {}), "augment")
        optim = _build(OptimConfig, data.pop("optim", {}), "optim")
        extra = {name: dict(data.pop(name)) for name in sections if name in data}
        if "patch_shape" in data:
            data["patch_shape"] = _numbers(data["patch_shape"], "patch_shape", int)
        if isinstance(data.get("class_weights"), str) and data["class_weights"] != "auto":
            raise InputError(f'class_weights must be "auto" or a list of numbers, got {data["class_weights"]!r}')
        if data.get("class_weights") is not None and data["class_weights"] != "auto":
            # [] = no weights (TOML has no null to unset the "auto" default)
            data["class_weights"] = _numbers(data["class_weights"], "class_weights", float) or None
        if isinstance(data.get("init"), str):
            data["init"] = str(data["init"] if Path(data["init"]).is_absolute() else base / data["init"])
        for key in ("n_classes", "patch_shape"):
            if key not in data:
                raise InputError(f"missing required key '{key}'")
        config = _build(TrainConfig, dict(data, train=train, valid=valid, model=model, augment=augment,
                                          optim=optim, sections=extra), "top level")
        check_config(config)
    except InputError as exc:
        raise InputError(str(exc), source=source) from None
    return config


def _numbers(value: Any, key: str, kind: type) -> tuple:
    """A TOML list of integers (``kind=int``) or numbers, as a tuple; anything else names ``key``."""
    wording = "integers" if kind is int else "numbers"
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{key} must be a list of {wording}, got {value!r}")
    allowed = (int,) if kind is int else (int, float)
    for v in value:
        if isinstance(v, bool) or not isinstance(v, allowed) or (isinstance(v, float) and not math.isfinite(v)):
            raise InputError(f"{key} must be a list of {wording}, got {list(value)!r}")
    return tuple(kind(v) for v in value)


#: Ranges of single keys: (key, low, high, low inclusive, high inclusive); None = unbounded.
_RANGES = (
    ("batch_size", 1, None, True, True), ("steps", 1, None, True, True),
    ("max_seconds", 0, None, False, True), ("dice_weight", 0, None, True, True),
    ("model.depth", 1, 16, True, True), ("model.base_width", 1, 4096, True, True),
    ("model.dropout", 0, 1, True, False), ("model.anisotropic_levels", 0, None, True, True),
    ("augment.brightness", 0, None, True, True), ("augment.contrast", 0, None, True, True),
    ("augment.elastic_alpha", 0, None, True, True), ("augment.elastic_sigma", 0, None, False, True),
    ("optim.warmup_steps", 0, None, True, True), ("optim.step_size", 1, None, True, True),
    ("optim.gamma", 0, None, False, True), ("optim.min_lr_ratio", 0, 1, True, True),
    ("optim.encoder_lr_scale", 0, 1, True, True),
)


def _check_ranges(config: TrainConfig) -> None:
    for key, low, high, low_in, high_in in _RANGES:
        obj = config
        for part in key.split("."):
            obj = getattr(obj, part)
        if obj is None:
            continue
        below = obj < low if low_in else obj <= low
        above = high is not None and (obj > high if high_in else obj >= high)
        if below or above:
            lo = ("[" if low_in else "(") + str(low)
            hi = (str(high) + ("]" if high_in else ")")) if high is not None else "inf)"
            raise InputError(f"{key} must be in {lo}, {hi}, got {obj!r}")
    for cube in config.train + config.valid:
        if cube.prio is not None and not (math.isfinite(cube.prio) and cube.prio > 0):
            raise InputError(f"prio of {cube.raw} must be a positive number, got {cube.prio!r}")


def model_divisor(config: TrainConfig) -> tuple[int, ...]:
    """Per-axis factor the patch must be a multiple of: 2**depth, in-plane only on anisotropic levels."""
    m = config.model
    return divisor_of({"ndim": config.model_ndim, "depth": m.depth, "anisotropic_levels": m.anisotropic_levels})


def check_config(config: TrainConfig) -> None:
    """Checks of single keys' ranges and of keys that need each other."""
    if not config.train:
        raise InputError("no [[train]] cubes")
    if config.n_classes < 1:
        raise InputError(f"n_classes must be >= 1, got {config.n_classes}")
    if len(config.patch_shape) not in (2, 3) or any(p < 1 for p in config.patch_shape):
        raise InputError(f"patch_shape must be 2 or 3 positive ints, got {list(config.patch_shape)}")
    if config.class_weights is not None and config.class_weights != "auto" and \
            len(config.class_weights) != config.n_classes:
        raise InputError(f"class_weights has {len(config.class_weights)} entries, n_classes is {config.n_classes}")
    _check_ranges(config)
    if config.model.ndim not in (None, 2, 3):
        raise InputError(f"model.ndim must be 2 or 3, got {config.model.ndim!r}")
    if config.model.norm not in ("batch", "group", "instance", "none"):
        raise InputError(f"model.norm must be batch, group, instance or none, got {config.model.norm!r}")
    for key in ("valid_every", "log_every", "checkpoint_every"):
        if getattr(config, key) < 1:
            raise InputError(f"{key} must be >= 1, got {getattr(config, key)}")
    if not (math.isfinite(config.optim.lr) and config.optim.lr > 0):
        raise InputError(f"optim.lr must be a positive number, got {config.optim.lr}")
    if config.optim.weight_decay < 0:
        raise InputError(f"optim.weight_decay must be >= 0, got {config.optim.weight_decay}")
    if not 0 <= config.example_ignore_threshold <= 1:
        raise InputError("example_ignore_threshold must be in [0, 1]")
    if config.optim.schedule not in ("constant", "cosine", "step"):
        raise InputError(f"optim.schedule must be constant, cosine or step, got {config.optim.schedule!r}")
    check_precision(config.precision)
    if not config.amp and config.precision == "bf16":
        raise InputError("amp = false contradicts precision = \"bf16\" (drop amp; it is the older spelling)")
    if config.model_ndim == 3 and len(config.patch_shape) != 3:
        raise InputError("a 3D model needs a 3D patch_shape")
    if config.model_ndim == 2 and len(config.patch_shape) == 3 and config.patch_shape[0] != 1:
        raise InputError(f"a 2D model needs patch_shape z = 1, got {list(config.patch_shape)}")
    if config.model_ndim == 2 and config.model.anisotropic_levels:
        raise InputError("model.anisotropic_levels applies to 3D models only")
    if config.model.anisotropic_levels > config.model.depth + 1:
        raise InputError(f"model.anisotropic_levels must be <= model.depth + 1 = {config.model.depth + 1}, "
                         f"got {config.model.anisotropic_levels}")
    divisor = model_divisor(config)
    spatial = config.patch_shape[-len(divisor):]
    if any(p % d for p, d in zip(spatial, divisor)):
        raise InputError(f"patch_shape {list(config.patch_shape)} must be a multiple of {list(divisor)} for "
                         f"model.depth {config.model.depth}")


def load_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None,
                sections: tuple[str, ...] = ()) -> TrainConfig:
    """Read a TOML training config; ``overrides`` replace top-level keys (``None`` values ignored).

    Dotted override keys reach into tables, e.g. ``{"optim.lr": 1e-4}``.
    """
    path = Path(path)
    data = read_toml(path, overrides=overrides)
    return config_from_dict(data, base_dir=path.parent, sections=sections, source=str(path))


def learning_rate(optim: OptimConfig, step: int, total_steps: int, budget_used: float | None = None) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then constant, cosine or step decay.

    ``budget_used`` (0..1) is the fraction of a time budget (``max_seconds``) spent so far: the
    cosine then follows whichever runs out first, steps or time, so a run stopped by its budget
    still ends at the low learning rate.
    """
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "cosine":
        span = max(1, total_steps - optim.warmup_steps)
        t = min(1.0, (step - optim.warmup_steps) / span)
        if budget_used is not None:
            t = min(1.0, max(t, budget_used))
        low = optim.lr * optim.min_lr_ratio
        return low + 0.5 * (optim.lr - low) * (1 + math.cos(math.pi * t))
    if optim.schedule == "step":
        return optim.lr * optim.gamma ** (step // max(1, optim.step_size))
    return optim.lr
