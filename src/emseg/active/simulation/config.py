"""The configuration of ``emseg query simulate``: a TOML file mapped onto frozen dataclasses.

:func:`load_simulate_config` reads it, :func:`simulate_config_from_dict` checks every key (unknown
keys are errors naming the table) and :func:`check_simulate_config` the ranges and the keys that
need each other; relative volume paths resolve against the file's folder. The experiment itself is
:mod:`emseg.active.simulation.loop`.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emseg.active.questions.types import CostModel, parse_ask
from emseg.active.registry import get_strategy
from emseg.engine.config import TrainConfig, config_from_dict, read_toml
from emseg.errors import InputError
from emseg.io import parse_spec

__all__ = [
    "GROWABLE",
    "PER_ARM",
    "TOP_KEYS",
    "RegionSpec",
    "SimulateConfig",
    "check_question_arms",
    "check_simulate_config",
    "load_simulate_config",
    "simulate_config_from_dict",
]

#: Keys of the simulate config besides the [pool], [test], [model], [optim] and [augment] tables.
TOP_KEYS = ("n_classes", "patch", "initial", "per_iteration", "iterations", "seeds", "strategies",
            "steps_initial", "steps_finetune", "lr_finetune", "batch_size", "mc_samples", "reduction",
            "candidates", "score_batch_size", "label_map", "class_weights", "example_ignore_threshold",
            "precision", "questions", "budget", "costs", "init", "finetune")
#: Where each round of the simulated loop starts fine-tuning (``finetune``).
FINETUNE = ("previous", "init", "scratch")
#: Keys that only add or remove rows; they may change between runs into the same folder.
GROWABLE = ("seeds", "strategies", "iterations", "questions")
#: Keys checked by each question arm against its own state (they do not change the strategies' rows).
PER_ARM = ("budget", "costs")


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class RegionSpec:
    """A raw volume, its dense ground truth and the region used (half-open ``[start, stop)``
    per leading axis; axes not listed are taken whole)."""

    raw: str
    label: str
    region: tuple[tuple[int, int], ...] = ()

    def slices(self, shape: Sequence[int]) -> tuple[slice, ...]:
        if len(self.region) > len(shape):
            raise InputError(f"region has {len(self.region)} axes, the volume {tuple(shape)} has {len(shape)}",
                             source=self.raw)
        out = []
        for axis, size in enumerate(shape):
            lo, hi = self.region[axis] if axis < len(self.region) else (0, size)
            if not 0 <= lo < hi <= size:
                raise InputError(f"region [{lo}, {hi}) is outside axis {axis} of size {size}", source=self.raw)
            out.append(slice(lo, hi))
        return tuple(out)


@dataclass(frozen=True)
class SimulateConfig:
    """Configuration of a simulated active-learning experiment (see ``docs/query.md``).

    ``train`` is a :class:`~emseg.engine.config.TrainConfig` template carrying the model, optimiser,
    augmentation, batch size and patch shape; its ``train`` cubes are empty (the labelled boxes
    are the training data) and its ``steps``/``optim.lr`` are replaced per phase.
    """

    pool: RegionSpec
    test: RegionSpec
    n_classes: int
    patch: tuple[int, ...]
    train: TrainConfig
    initial: int = 20
    per_iteration: int = 20
    iterations: int = 5
    seeds: tuple[int, ...] = (0,)
    strategies: tuple[str, ...] = ("random", "entropy")
    steps_initial: int = 500
    steps_finetune: int = 200
    lr_finetune: float | None = None
    #: A checkpoint (of ``emseg pretrain`` or ``emseg train``) the initial network starts from.
    init: str | None = None
    #: Where each round's fine-tuning starts: the previous round's weights, ``init`` again, or
    #: random weights (then trained ``steps_initial`` steps, as the initial network).
    finetune: str = "previous"
    mc_samples: int = 10
    reduction: str = "mean"
    candidates: int | None = None
    score_batch_size: int = 8
    label_map: tuple[int, ...] | None = None
    #: Question arms (:func:`~emseg.active.questions.types.parse_ask`), each spending ``budget`` per round.
    questions: tuple[str, ...] = ()
    #: Annotator seconds per round of a question arm.
    budget: float | None = None
    costs: CostModel = dataclasses.field(default_factory=CostModel)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``config.json``)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["costs"] = self.costs.to_dict()
        d["pool"] = dataclasses.asdict(self.pool)
        d["test"] = dataclasses.asdict(self.test)
        d["train"] = self.train.to_dict()
        return json.loads(json.dumps(d))

    def replace(self, **changes: Any) -> SimulateConfig:
        new = dataclasses.replace(self, **changes)
        check_simulate_config(new)
        return new


def _region(entry: Any, base: Path, where: str) -> RegionSpec:
    if not isinstance(entry, Mapping):
        raise InputError(f"[{where}] must be a table with raw, label and optional region")
    unknown = sorted(set(entry) - {"raw", "label", "region"})
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(unknown)} in [{where}] (known: label, raw, region)")
    for key in ("raw", "label"):
        if not isinstance(entry.get(key), str):
            raise InputError(f"[{where}] needs '{key}' (a FILE.h5:DATASET or FILE.zarr/ARRAY spec)")

    def resolve(spec: str) -> str:
        parsed = parse_spec(spec)
        path = parsed.path if parsed.path.is_absolute() else base / parsed.path
        return str(dataclasses.replace(parsed, path=path))

    region = []
    for pair in entry.get("region", []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, int) for v in pair)):
            raise InputError(f"[{where}] region must be a list of [start, stop] integer pairs, got {pair!r}")
        region.append((int(pair[0]), int(pair[1])))
    return RegionSpec(resolve(entry["raw"]), resolve(entry["label"]), tuple(region))


def simulate_config_from_dict(data: Mapping[str, Any], *, base_dir: str | Path = ".",
                              source: str = "config") -> SimulateConfig:
    """Build and check a :class:`SimulateConfig` from a parsed TOML mapping.

    Examples
    --------
    >>> cfg = simulate_config_from_dict({  # doctest: +SKIP
    ...     "n_classes": 2, "patch": [1, 128, 128],
    ...     "pool": {"raw": "a.h5:raw", "label": "a.h5:label", "region": [[0, 15]]},
    ...     "test": {"raw": "a.h5:raw", "label": "a.h5:label", "region": [[15, 20]]}})
    """
    base = Path(base_dir)
    data = dict(data)
    try:
        unknown = sorted(set(data) - set(TOP_KEYS) - {"pool", "test", "model", "optim", "augment"})
        if unknown:
            raise InputError(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(TOP_KEYS))}, "
                             "[pool], [test], [model], [optim], [augment])")
        for key in ("pool", "test", "n_classes", "patch"):
            if key not in data:
                raise InputError(f"missing required key '{key}'")
        pool = _region(data.pop("pool"), base, "pool")
        test = _region(data.pop("test"), base, "test")
        patch = tuple(int(p) for p in data.pop("patch"))
        train_dict: dict[str, Any] = {
            "train": [{"raw": "unused.h5:raw"}], "n_classes": data["n_classes"], "patch_shape": list(patch),
            "steps": data.get("steps_initial", 500), "valid_every": 1 << 30, "log_every": 50,
            "checkpoint_every": 100,
        }
        for key in ("batch_size", "class_weights", "example_ignore_threshold", "precision"):
            if key in data:
                train_dict[key] = data.pop(key)
        for key in ("model", "optim", "augment"):
            if key in data:
                train_dict[key] = data.pop(key)
        template = config_from_dict(train_dict, base_dir=base, source=source).replace(train=())
        kwargs: dict[str, Any] = {}
        for key in ("initial", "per_iteration", "iterations", "steps_initial", "steps_finetune", "mc_samples",
                    "score_batch_size", "n_classes"):
            if key in data:
                value = data[key]
                if isinstance(value, bool) or not isinstance(value, int):
                    raise InputError(f"'{key}' must be an integer, got {value!r}")
                kwargs[key] = value
        if "candidates" in data:
            value = data["candidates"]
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"'candidates' must be an integer (0 = the whole grid), got {value!r}")
            kwargs["candidates"] = value or None
        if "lr_finetune" in data:
            kwargs["lr_finetune"] = float(data["lr_finetune"])
        if data.get("init") is not None:
            if not isinstance(data["init"], str):
                raise InputError(f"'init' must be a checkpoint path, got {data['init']!r}")
            kwargs["init"] = str(base / data["init"])
        if data.get("finetune") is not None:
            kwargs["finetune"] = str(data["finetune"])
        if "reduction" in data:
            kwargs["reduction"] = str(data["reduction"])
        if "seeds" in data:
            seeds = data["seeds"]
            if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
                raise InputError(f"'seeds' must be a list of integers, got {seeds!r}")
            kwargs["seeds"] = tuple(seeds)
        if "strategies" in data:
            names = data["strategies"]
            if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
                raise InputError(f"'strategies' must be a list of names, got {names!r}")
            kwargs["strategies"] = tuple(names)
        if "questions" in data:
            arms = data["questions"]
            if not isinstance(arms, list) or not all(isinstance(s, str) for s in arms):
                raise InputError(f"'questions' must be a list of question arms such as \"dense+presence\", "
                                 f"got {arms!r}")
            kwargs["questions"] = tuple(arms)
        if "budget" in data:
            value = data["budget"]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"'budget' must be a number of annotator seconds, got {value!r}")
            kwargs["budget"] = float(value)
        if "costs" in data:
            if not isinstance(data["costs"], Mapping):
                raise InputError("[costs] must be a table of dense_cost_per_voxel, partial_cost_per_voxel, "
                                 "presence_cost")
            kwargs["costs"] = CostModel.from_mapping(data["costs"])
        if "label_map" in data:
            lm = data["label_map"]
            if not isinstance(lm, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in lm):
                raise InputError(f"'label_map' must be a list of class ids, got {lm!r}")
            kwargs["label_map"] = tuple(lm)
        config = SimulateConfig(pool=pool, test=test, patch=patch, train=template, **kwargs)
        check_simulate_config(config)
    except InputError as exc:
        if exc.source is not None:  # already names its file
            raise
        raise InputError(str(exc), source=source) from None
    return config


def check_simulate_config(config: SimulateConfig) -> None:
    """Consistency checks; raises :class:`~emseg.errors.InputError` with a one-line message."""
    for key in ("initial", "per_iteration", "score_batch_size", "mc_samples"):
        if getattr(config, key) < 1:
            raise InputError(f"'{key}' must be >= 1, got {getattr(config, key)}")
    for key in ("iterations", "steps_initial", "steps_finetune"):
        if getattr(config, key) < 0:
            raise InputError(f"'{key}' must be >= 0, got {getattr(config, key)}")
    if config.candidates is not None and config.candidates < 1:
        raise InputError(f"'candidates' must be >= 1 (or 0 for the whole grid), got {config.candidates}")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise InputError(f"'seeds' must be a non-empty list of distinct integers, got {list(config.seeds)}")
    if not config.strategies and not config.questions:
        raise InputError("'strategies' is empty")
    try:
        names = [get_strategy(s).name for s in config.strategies]
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if len(set(names)) != len(names):
        raise InputError(f"'strategies' lists a strategy twice: {list(config.strategies)}")
    if config.reduction not in ("mean", "sum"):
        raise InputError(f"'reduction' must be 'mean' or 'sum', got {config.reduction!r}")
    if config.n_classes < 2:
        raise InputError(f"n_classes must be >= 2, got {config.n_classes}")
    if config.label_map is not None and any(not 0 <= v < config.n_classes for v in config.label_map):
        raise InputError(f"label_map values must lie in [0, {config.n_classes}), got {list(config.label_map)}")
    if any(get_strategy(s).needs_mc_dropout for s in names) and not config.train.model.dropout > 0:
        raise InputError("strategy 'bald' samples dropout: set model.dropout > 0")
    if config.lr_finetune is not None and not config.lr_finetune > 0:
        raise InputError(f"'lr_finetune' must be > 0, got {config.lr_finetune}")
    if config.finetune not in FINETUNE:
        raise InputError(f"'finetune' must be one of {', '.join(FINETUNE)}, got {config.finetune!r}")
    if config.finetune == "init" and config.init is None:
        raise InputError("'finetune' = \"init\" needs an 'init' checkpoint")
    if config.init is not None and not Path(config.init).is_file():
        raise InputError("no such checkpoint (the 'init' key)", source=config.init)
    if config.train.optim.encoder_lr_scale != 1 and (config.init is None or config.finetune == "scratch"):
        raise InputError("optim.encoder_lr_scale slows or freezes a pretrained encoder: it needs an 'init' "
                         "checkpoint and a 'finetune' other than \"scratch\"")
    check_question_arms(config)
    needed = config.initial + config.per_iteration * config.iterations
    if config.candidates is not None and config.candidates < needed:
        raise InputError(f"'candidates' = {config.candidates} is below initial + per_iteration x iterations "
                         f"= {needed}")


def check_question_arms(config: SimulateConfig) -> None:
    """The question arms parse, are distinct (``auto`` is ``dense+partial+presence``) and have a budget."""
    arms = [parse_ask(a).name for a in config.questions]
    if len(set(arms)) != len(arms):
        raise InputError(f"'questions' lists an arm twice: {list(config.questions)}")
    if arms and config.budget is None:
        raise InputError("question arms need 'budget' (annotator seconds per round)")
    if config.budget is not None and not config.budget > 0:
        raise InputError(f"'budget' must be > 0 seconds, got {config.budget}")


def load_simulate_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> SimulateConfig:
    """Read a simulate TOML file; ``overrides`` replace top-level keys (``None`` values ignored).

    Examples
    --------
    >>> cfg = load_simulate_config("active.toml", overrides={"iterations": 2})  # doctest: +SKIP
    """
    path = Path(path)
    data = read_toml(path, overrides={k: list(v) if isinstance(v, tuple) else v for k, v in (overrides or {}).items()})
    return simulate_config_from_dict(data, base_dir=path.parent, source=str(path))
