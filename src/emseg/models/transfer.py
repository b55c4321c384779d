"""Start a network from the weights of another checkpoint (``emseg train --init``).

The source may be any emseg checkpoint of the same architecture: one of ``emseg pretrain`` (a
1-channel reconstruction head) or of ``emseg train`` (a K-class head). Parameters and buffers are
matched by name and shape; only the output head (``head.*``) may differ, and is then left as the
new network initialised it. Everything read from the file is checked first: it is loaded with
``torch.load(weights_only=True)`` (:func:`~emseg.models.checkpoint.load_checkpoint`), its
``model_config`` is checked against the schema and parameter bounds
(:func:`~emseg.models.checkpoint.check_model_config`), and every tensor must be finite.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import torch

from emseg.errors import InputError
from emseg.models.checkpoint import _DEFAULTS, check_model_config, load_checkpoint, non_finite_tensors

#: ``model_config`` keys that must agree between the source checkpoint and the new network.
ARCHITECTURE_KEYS = ("ndim", "in_channels", "depth", "base_width", "norm", "anisotropic_levels", "cond_channels",
                     "conditioning")
#: Prefix of the output head's tensors: the only ones that may differ in shape.
HEAD_PREFIX = "head."


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def init_from_checkpoint(model: torch.nn.Module, model_config: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """Copy the weights of checkpoint ``path`` into ``model`` (built from ``model_config``).

    Returns a report (plain dict, stored in the run's checkpoints as ``init``): ``path``,
    ``sha256``, the source's ``task`` and ``step``, ``loaded`` (number of tensors copied) and
    ``loaded_values`` (their element count), and ``reinitialised`` (names of the head tensors
    kept from the new network's initialisation because their shape differs, e.g. another class
    count).

    Raises
    ------
    InputError
        Naming ``path``: not a checkpoint, a bad ``model_config``, another architecture (the first
        mismatching setting or tensor is named), or non-finite weights.

    Examples
    --------
    >>> report = init_from_checkpoint(model, model.config, "runs/pre/last.pt")  # doctest: +SKIP
    >>> report["reinitialised"]  # doctest: +SKIP
    ['head.weight', 'head.bias']
    """
    source = str(path)
    state = load_checkpoint(path)
    stored_config = check_model_config(state["model_config"], source=source)
    ours = dict(_DEFAULTS, **model_config)
    theirs = dict(_DEFAULTS, **stored_config)
    for key in ARCHITECTURE_KEYS:
        if key in ("conditioning",) and not ours["cond_channels"]:
            continue
        if ours[key] != theirs[key]:
            raise InputError(f"--init checkpoint has another architecture: {key} {theirs[key]!r} "
                             f"(this network: {ours[key]!r})", source=source)
    stored = state["model"]
    if not isinstance(stored, Mapping):
        raise InputError(f"model state must be a table of tensors, got {type(stored).__name__}", source=source)
    target = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    reinitialised: list[str] = []
    for name, tensor in target.items():
        value = stored.get(name)
        same = isinstance(value, torch.Tensor) and value.shape == tensor.shape and value.dtype == tensor.dtype
        if same:
            loaded[name] = value
        elif name.startswith(HEAD_PREFIX) and isinstance(value, torch.Tensor):
            reinitialised.append(name)
        else:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else "missing" if value is None \
                else type(value).__name__
            raise InputError(f"--init checkpoint does not match this network: {name} {got} "
                             f"(expected {tuple(tensor.shape)})", source=source)
    extra = [k for k in stored if k not in target]
    if extra:
        raise InputError(f"--init checkpoint does not match this network: unexpected {extra[0]}", source=source)
    bad = non_finite_tensors(loaded)
    if bad:
        raise InputError(f"--init checkpoint holds NaN or infinite values in {bad[0]}", source=source)
    model.load_state_dict(loaded, strict=False)
    step = state.get("step")
    return {
        "path": source,
        "sha256": file_sha256(path),
        "task": str(state.get("task", "")),
        "step": int(step) if isinstance(step, int) else None,
        "loaded": len(loaded),
        "loaded_values": int(sum(v.numel() for v in loaded.values())),
        "reinitialised": reinitialised,
    }
