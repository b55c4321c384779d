"""Checkpoints: written atomically, loadable with ``torch.load(weights_only=True)``, checked on load.

A checkpoint is a plain dict: ``model`` (state dict), ``model_config`` (the network's constructor
kwargs, so it can be rebuilt without the config file), ``optimizer``, ``step``, ``best_metric``,
``rng`` (python, numpy and torch states), ``config`` (the training config as a plain dict),
``task`` (what kind of model: ``segmentation``, ``lcs``, ...) and ``emseg_version``.

Loading a network (:func:`load_model`) trusts nothing in the file: ``model_config`` is checked
against :data:`MODEL_SCHEMA` and bounded in size (:func:`check_model_config`) before anything is
built, the state dict must match the rebuilt network key by key and shape by shape, and every
tensor must be finite. Each failure is an :class:`~emseg.errors.InputError` naming the file.
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from emseg import __version__
from emseg.runtime.device import resolve_device
from emseg.errors import InputError
from emseg.metrics import MAX_CLASSES
from emseg.runtime.locks import temp_name
from emseg.models import build_model
from emseg.models.conditioning import CONDITIONINGS
from emseg.models.unet import NORMS

#: The most parameters a network may have (4 GiB of float32 weights).
MAX_PARAMETERS = 1 << 30
#: The most activation values one window may produce in a forward pass (32 GiB of float32).
MAX_ACTIVATIONS = 1 << 33

#: ``model_config`` keys: (types, minimum, maximum); ``None`` = unbounded. Missing keys take the
#: network's defaults.
MODEL_SCHEMA: dict[str, tuple[tuple[type, ...], float | None, float | None]] = {
    "ndim": ((int,), 2, 3),
    "in_channels": ((int,), 1, 4096),
    "out_channels": ((int,), 1, 4096),
    "depth": ((int,), 0, 16),
    "base_width": ((int,), 1, 65536),
    "norm": ((str,), None, None),
    "dropout": ((float, int), 0, None),
    "anisotropic_levels": ((int,), 0, 17),
    "cond_channels": ((int,), 0, 4096),
    "conditioning": ((str,), None, None),
}
_DEFAULTS = dict(ndim=2, in_channels=1, out_channels=2, depth=4, base_width=32, norm="batch", dropout=0.0,
                 anisotropic_levels=0, cond_channels=0, conditioning="maxpool")


def _levels(config: Mapping[str, Any]) -> tuple[list[int], list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Widths, kernels and pooling factors per level, as the U-Net builds them."""
    ndim, depth, flat_levels = config["ndim"], config["depth"], config["anisotropic_levels"]
    widths = [config["base_width"] * 2 ** i for i in range(depth + 1)]
    kernels, pools = [], []
    for level in range(depth + 1):
        flat = ndim == 3 and level < flat_levels
        kernels.append((1, 3, 3) if flat else (3,) * ndim)
        pools.append((1, 2, 2) if flat else (2,) * ndim)
    return widths, kernels, pools[:depth]


def count_parameters(config: Mapping[str, Any]) -> int:
    """Trainable parameters of the U-Net ``config`` describes, computed without building it."""
    cfg = dict(_DEFAULTS, **config)
    widths, kernels, pools = _levels(cfg)
    norm = cfg["norm"]
    bias = norm == "none"

    def block(cin: int, cout: int, kernel: Sequence[int]) -> int:
        k = math.prod(kernel)
        norm_params = 0 if norm == "none" else 2 * cout
        return (cin * cout * k + (cout if bias else 0) + norm_params
                + cout * cout * k + (cout if bias else 0) + norm_params)

    depth = cfg["depth"]
    total, cin = 0, cfg["in_channels"]
    for level in range(depth):
        total += block(cin, widths[level], kernels[level])
        cin = widths[level]
    total += block(cin, widths[depth], kernels[depth])
    total += _conditioning_parameters(cfg, widths, kernels, block)
    for level in range(depth):
        total += widths[level + 1] * widths[level] * math.prod(pools[level]) + widths[level]  # up-convolution
        total += block(2 * widths[level], widths[level], kernels[level])
    total += widths[0] * cfg["out_channels"] + cfg["out_channels"]  # 1x1 head
    return total


def _conditioning_parameters(cfg: Mapping[str, Any], widths, kernels, block) -> int:
    """Parameters of the conditioning modules (:mod:`emseg.models.conditioning`)."""
    cond, depth, kind = cfg["cond_channels"], cfg["depth"], cfg["conditioning"]
    if not cond:
        return 0
    w, k = widths[depth], math.prod(kernels[depth])
    if kind == "maxpool":
        return block(w + cond, w, kernels[depth])
    if kind == "atlas":  # block(w, w) split into its two convolutions, + the condition convolution + 1x1 per level
        return block(w, w, kernels[depth]) + cond * w * k + w + sum(cond * widths[l] + widths[l] for l in range(depth))
    dim, hidden, film = 2 * sum(widths), max(64, 2 * w), 2 * sum(widths)  # prototype: the FiLM MLP
    return dim * hidden + hidden + hidden * film + film


def divisor_of(config: Mapping[str, Any]) -> tuple[int, ...]:
    """Per-axis factor that input sides must be multiples of (the product of the pooling factors)."""
    cfg = dict(_DEFAULTS, **config)
    div = [1] * cfg["ndim"]
    for pool in _levels(cfg)[2]:
        div = [d * p for d, p in zip(div, pool)]
    return tuple(div)


def activation_elements(config: Mapping[str, Any], patch: Sequence[int]) -> int:
    """About how many values one window of ``patch`` (network axes) creates in a forward pass.

    Counts, at every level, the encoder's and decoder's feature maps (two convolutions each, the
    skip and the concatenation) at that level's resolution.
    """
    cfg = dict(_DEFAULTS, **config)
    widths, _, pools = _levels(cfg)
    div = divisor_of(cfg)
    size = [int(math.ceil(p / d) * d) for p, d in zip(patch, div)]  # the window the network sees
    total = 0
    for level in range(cfg["depth"] + 1):
        voxels = math.prod(size)
        total += (6 if level < cfg["depth"] else 2) * widths[level] * voxels
        if level < cfg["depth"]:
            size = [max(1, s // p) for s, p in zip(size, pools[level])]
    return total


def check_model_config(config: Any, *, source: str, patch: Sequence[int] | None = None) -> dict[str, Any]:
    """Check a stored ``model_config`` before building anything; returns it with defaults filled in.

    Types and ranges follow :data:`MODEL_SCHEMA`; the parameter count must stay under
    :data:`MAX_PARAMETERS` and, given the window ``patch`` (in the network's axes), the activations
    of one window under :data:`MAX_ACTIVATIONS`. Raises :class:`InputError` naming ``source``.

    Examples
    --------
    >>> check_model_config({"ndim": 2, "depth": 2, "base_width": 4}, source="m.pt")["out_channels"]
    2
    >>> check_model_config({"depth": "two"}, source="m.pt")
    Traceback (most recent call last):
    ...
    emseg.errors.InputError: m.pt: model_config.depth must be an integer, got 'two'
    """
    if not isinstance(config, Mapping):
        raise InputError(f"model_config must be a table, got {type(config).__name__}", source=source)
    unknown = sorted(set(config) - set(MODEL_SCHEMA))
    if unknown:
        raise InputError(f"model_config has unknown key(s) {', '.join(map(str, unknown))}", source=source)
    cfg = dict(_DEFAULTS, **config)
    for key, (types, low, high) in MODEL_SCHEMA.items():
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, types):
            kind = {int: "an integer", str: "a string"}.get(types[0], "a number")
            raise InputError(f"model_config.{key} must be {kind}, got {value!r}", source=source)
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"model_config.{key} must be finite, got {value!r}", source=source)
        if (low is not None and value < low) or (high is not None and value > high):
            raise InputError(f"model_config.{key} must be in [{low}, {high if high is not None else 'inf'}], "
                             f"got {value!r}", source=source)
    if cfg["conditioning"] not in CONDITIONINGS:
        raise InputError(f"model_config.conditioning must be one of {', '.join(CONDITIONINGS)}, "
                         f"got {cfg['conditioning']!r}", source=source)
    if cfg["conditioning"] == "prototype" and cfg["cond_channels"] not in (0, 2):
        raise InputError("model_config.conditioning prototype needs cond_channels = 2", source=source)
    if cfg["norm"] not in NORMS:
        raise InputError(f"model_config.norm must be one of {', '.join(NORMS)}, got {cfg['norm']!r}", source=source)
    if not cfg["dropout"] < 1:
        raise InputError(f"model_config.dropout must be in [0, 1), got {cfg['dropout']!r}", source=source)
    if cfg["ndim"] == 2 and cfg["anisotropic_levels"]:
        raise InputError("model_config.anisotropic_levels applies to 3D networks only", source=source)
    if cfg["anisotropic_levels"] > cfg["depth"] + 1:
        raise InputError(f"model_config.anisotropic_levels must be <= depth + 1 = {cfg['depth'] + 1}, "
                         f"got {cfg['anisotropic_levels']}", source=source)
    n = count_parameters(cfg)
    if n > MAX_PARAMETERS:
        raise InputError(f"model_config describes a network of {n:.3g} parameters (more than {MAX_PARAMETERS:.3g}): "
                         f"depth {cfg['depth']}, base_width {cfg['base_width']}", source=source)
    if patch is not None:
        acts = activation_elements(cfg, patch)
        if acts > MAX_ACTIVATIONS:
            raise InputError(f"a window of {tuple(patch)} through this network needs about {acts:.3g} activation "
                             f"values (more than {MAX_ACTIVATIONS:.3g}): choose a smaller `patch_shape`", source=source)
    return dict(config)


def non_finite_tensors(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` holding NaN or infinity."""
    return [k for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_state_dict(model: torch.nn.Module, stored: Any, *, source: str) -> None:
    """The stored state dict must have exactly the network's keys and shapes, all finite."""
    if not isinstance(stored, Mapping):
        raise InputError(f"model state must be a table of tensors, got {type(stored).__name__}", source=source)
    expected = model.state_dict()
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    shapes = [f"{k} {tuple(stored[k].shape) if isinstance(stored[k], torch.Tensor) else type(stored[k]).__name__}"
              f" != {tuple(v.shape)}" for k, v in expected.items()
              if k in stored and (not isinstance(stored[k], torch.Tensor) or stored[k].shape != v.shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(map(str, keys[:3]))}{more}")
        raise InputError(f"model state does not match model_config ({'; '.join(parts)})", source=source)
    bad = non_finite_tensors(stored)
    if bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        raise InputError(f"model state holds NaN or infinite values in {bad[0]}{more}: the training diverged "
                         f"before this checkpoint was written; use an earlier one", source=source)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` under a temporary name, then rename it into place.

    A ``model`` state holding NaN or infinity is refused (``ValueError``): a checkpoint on disk is
    always a usable one, and an earlier good file at ``path`` stays in place.
    """
    path = Path(path)
    bad = non_finite_tensors(state.get("model") or {})
    if bad:
        raise ValueError(f"refusing to write {path}: non-finite values in {bad[0]}")
    state = dict(state, emseg_version=__version__)
    tmp = temp_name(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``); bad files raise ``InputError``."""
    path = Path(path)
    if not path.exists():
        raise InputError("no such checkpoint file", source=str(path))
    if path.is_dir():
        raise InputError("is a folder, not a checkpoint file", source=str(path))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise InputError(f"not a readable emseg checkpoint ({type(exc).__name__}: {exc})".splitlines()[0],
                         source=str(path)) from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise InputError("not an emseg checkpoint (no model / model_config)", source=str(path))
    check_checkpoint_fields(state, source=str(path))
    return state


#: Upper bound of the patch sides a checkpoint's training config may state (classes: MAX_CLASSES).
MAX_PATCH_SIDE = 1 << 16

#: Top-level keys of a checkpoint that must be tables (dicts) when present; ``None`` is allowed
#: where a run writes it (``init`` of a run started from scratch).
_TABLES = ("model_config", "config", "optimizer", "rng", "log_window", "lcs", "igtt", "pretext", "init")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_checkpoint_fields(state: Mapping[str, Any], *, source: str) -> None:
    """Type and range of every schema field of a loaded checkpoint, each error naming the field.

    ``model`` must map names to tensors; the tables (:data:`_TABLES`) must be dicts; ``step`` an
    integer >= 0, ``task`` and ``precision`` strings, ``best_metric`` and ``elapsed_s`` numbers;
    in ``config``, ``n_classes`` an integer in [1, :data:`MAX_CLASSES`] and ``patch_shape`` 1 to 3
    integers in [1, :data:`MAX_PATCH_SIDE`]. ``model_config`` itself is checked by
    :func:`check_model_config` when the network is built.
    """
    model = state["model"]
    if not isinstance(model, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in model.items()):
        raise InputError("checkpoint field 'model' must map parameter names to tensors", source=source)
    for key in _TABLES:
        value = state.get(key)
        if value is not None and not isinstance(value, dict):
            raise InputError(f"checkpoint field '{key}' must be a table, got {type(value).__name__}", source=source)
    if not isinstance(state["model_config"], dict):
        raise InputError("checkpoint field 'model_config' must be a table", source=source)
    step = state.get("step", 0)
    if not _is_int(step) or step < 0:
        raise InputError(f"checkpoint field 'step' must be an integer >= 0, got {step!r}"[:200], source=source)
    for key in ("task", "precision"):
        if state.get(key) is not None and not isinstance(state[key], str):
            raise InputError(f"checkpoint field '{key}' must be a string, got {type(state[key]).__name__}",
                             source=source)
    for key in ("best_metric", "elapsed_s"):
        value = state.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"checkpoint field '{key}' must be a number, got {type(value).__name__}", source=source)
    config = state.get("config") or {}
    n_classes = config.get("n_classes")
    if n_classes is not None and (not _is_int(n_classes) or not 1 <= n_classes <= MAX_CLASSES):
        raise InputError(f"checkpoint field 'config.n_classes' must be an integer in [1, {MAX_CLASSES}], "
                         f"got {n_classes!r}"[:200], source=source)
    patch = config.get("patch_shape")
    if patch is not None and (not isinstance(patch, (list, tuple)) or not 1 <= len(patch) <= 3
                              or not all(_is_int(p) and 1 <= p <= MAX_PATCH_SIDE for p in patch)):
        raise InputError(f"checkpoint field 'config.patch_shape' must be 1 to 3 integers in [1, {MAX_PATCH_SIDE}], "
                         f"got {patch!r}"[:200], source=source)


def load_model(path: str | Path, device: str | torch.device = "cpu", *, patch: Sequence[int] | None = None):
    """Rebuild the network stored in a checkpoint; returns ``(model, checkpoint)`` in eval mode.

    ``model_config`` is validated (and, given the window ``patch`` in network axes, the activation
    size bounded) before the network is built; the state dict must match it and be finite.
    """
    state = load_checkpoint(path)
    return model_from_state(state, source=str(path), device=device, patch=patch), state


def model_from_state(state: Mapping[str, Any], *, source: str, device: str | torch.device = "cpu",
                     patch: Sequence[int] | None = None) -> torch.nn.Module:
    """The network of a loaded checkpoint dict, checked as :func:`load_model` does, in eval mode."""
    config = state["model_config"]
    check_model_config(config, source=source, patch=network_patch(patch, config) if patch else None)
    model = build_model(config)
    check_state_dict(model, state["model"], source=source)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return model


def network_patch(patch: Sequence[int], config: Mapping[str, Any]) -> tuple[int, ...]:
    """The window in the network's axes: a leading 1 of a 3D window fed to a 2D network dropped."""
    ndim = int(config.get("ndim", _DEFAULTS["ndim"])) if isinstance(config, Mapping) else 2
    patch = tuple(patch)
    return patch[1:] if len(patch) == ndim + 1 else patch


_MODELS: dict[tuple, tuple[torch.nn.Module, torch.device]] = {}
_MODELS_LOCK = threading.Lock()


def unchanged_stat(path: str, mtime_ns: int | None = None, size: int | None = None) -> os.stat_result:
    """``os.stat(path)``; an :class:`InputError` where ``mtime_ns``/``size`` are given and the file
    differs (the run's checkpoint was replaced since it started)."""
    st = os.stat(path)
    if (mtime_ns is not None and st.st_mtime_ns != mtime_ns) or (size is not None and st.st_size != size):
        raise InputError("the checkpoint changed since this prediction started", source=path)
    return st


def cached_model(path: str, device: str = "auto", *, mtime_ns: int | None = None,
                 size: int | None = None) -> tuple[torch.nn.Module, torch.device]:
    """The network of checkpoint ``path`` on ``device``, loaded once per process and reused.

    The cache is keyed by path, modification time and size, so a changed file is reloaded; when
    ``mtime_ns``/``size`` are given and the file differs, the run's model was replaced: an error.

    Examples
    --------
    >>> model, device = cached_model("runs/mito/best.pt", "cpu")  # doctest: +SKIP
    """
    st = unchanged_stat(path, mtime_ns, size)
    key = (path, st.st_mtime_ns, st.st_size, device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            dev = resolve_device(device)
            model, _ = load_model(path, dev)
            _MODELS.clear()  # one model per process: a worker serves one run at a time
            _MODELS[key] = (model, dev)
        return _MODELS[key]


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint as a task names it: path, modification time and size, so that a worker loads the
    run's network once (:meth:`cached_model`) and refuses a file replaced since the run started."""

    path: str
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: str | Path) -> CheckpointFile:
        """The checkpoint at ``path`` as it is now."""
        st = os.stat(path)
        return cls(str(path), st.st_mtime_ns, st.st_size)

    def cached_model(self, device: str = "auto") -> tuple[torch.nn.Module, torch.device]:
        """:func:`cached_model` of this file on ``device``."""
        return cached_model(self.path, device, mtime_ns=self.mtime_ns, size=self.size)


def forget_cached_models() -> None:
    """Drop the network :func:`cached_model` keeps (an in-process run is over)."""
    with _MODELS_LOCK:
        _MODELS.clear()
