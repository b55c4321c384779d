"""Checkpoints: written atomically, loadable with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict: ``model`` (state dict), ``model_config`` (the network's constructor
kwargs, so it can be rebuilt without the config file), ``optimizer``, ``step``, ``best_metric``,
``rng`` (python, numpy and torch states), ``config`` (the training config as a plain dict),
``task`` (what kind of model: ``segmentation``, ``lcs``, ...) and ``emseg_version``.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch

from emseg import __version__
from emseg.errors import InputError
from emseg.models import build_model


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` under a temporary name, then rename it into place."""
    path = Path(path)
    state = dict(state, emseg_version=__version__)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
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
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise InputError(f"not a readable emseg checkpoint ({type(exc).__name__}: {exc})".splitlines()[0],
                         source=str(path)) from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise InputError("not an emseg checkpoint (no model / model_config)", source=str(path))
    return state


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the network stored in a checkpoint; returns ``(model, checkpoint)`` in eval mode."""
    state = load_checkpoint(path)
    model = build_model(state["model_config"])
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return model, state
