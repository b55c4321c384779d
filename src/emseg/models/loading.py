"""A checkpoint opened to predict one volume.

Every command that runs a trained network over a volume (``emseg predict`` in-process and on a
cluster, ``emseg segment``) reads the checkpoint the same way, in two steps:

- :func:`read_for_volume` loads and checks the checkpoint and fits its window to the volume's axes
  (:func:`window_shape`), bounding the activations of that window, without building the network;
- :func:`open_for_volume` builds the network on the resolved device, resolves the precision once
  (:func:`emseg.runtime.precision.resolve_precision`) and prepares the network for inference: batch
  norm folded into the convolutions, weights in the precision's memory format, compiled if asked.

:func:`cached_open` keeps one opened network per process for cluster workers, which predict many
blocks of one run.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from emseg.errors import InputError
from emseg.models.checkpoint import (check_model_config, load_checkpoint, model_from_state, network_patch,
                                     unchanged_stat)
from emseg.models.unet import fold_batchnorm
from emseg.runtime.device import resolve_device
from emseg.runtime.precision import DEFAULT_PRECISION, Precision, resolve_precision


def window_shape(patch: Sequence[int] | None, trained: Sequence[int] | None, volume_shape: Sequence[int],
                 model_ndim: int) -> tuple[int, ...]:
    """The window shape in volume axes: given, or the training patch adapted to the volume's axes."""
    patch = tuple(patch) if patch else tuple(trained or (256,) * model_ndim)
    if len(patch) == len(volume_shape) + 1 and patch[0] == 1:
        patch = patch[1:]
    if len(patch) == len(volume_shape) - 1 and model_ndim == 2:
        patch = (1,) + patch
    if len(patch) != len(volume_shape):
        raise InputError(f"`patch_shape` {patch} does not fit a {len(volume_shape)}D volume")
    if model_ndim == 3 and len(volume_shape) != 3:
        raise InputError("a 3D network needs a 3D volume")
    if any(p < 1 for p in patch):
        raise InputError(f"`patch_shape` sides must be positive, got {patch}")
    if model_ndim == 2 and len(patch) == 3 and patch[0] != 1:
        raise InputError(f"`patch_shape` {patch}: a 2D network on a 3D volume needs z = 1")
    return patch


@dataclass(frozen=True)
class VolumeCheckpoint:
    """A checked checkpoint and the window it predicts a volume with (:func:`read_for_volume`)."""

    path: str
    #: The window in volume axes (a leading 1 on a 3D volume feeds a 2D network).
    patch: tuple[int, ...]
    #: What the network sees at most: the window clipped to the volume.
    window: tuple[int, ...]
    #: The loaded checkpoint (:func:`~emseg.models.checkpoint.load_checkpoint`).
    state: dict[str, Any]

    @property
    def n_classes(self) -> int:
        return int(self.state["model_config"]["out_channels"])

    @property
    def ndim(self) -> int:
        return int(self.state["model_config"].get("ndim", 2))


def read_for_volume(path: Any, volume_shape: Sequence[int], *, patch_shape: Sequence[int] | None = None
                    ) -> VolumeCheckpoint:
    """Load and check checkpoint ``path`` for a volume of ``volume_shape``; the network is not built.

    ``patch_shape`` overrides the training patch. A label-conditioned checkpoint is refused (it
    predicts through ``emseg lcs infer``); the window's activations are bounded
    (:func:`~emseg.models.checkpoint.check_model_config`).
    """
    source = str(path)
    state = load_checkpoint(path)
    model_config = check_model_config(state["model_config"], source=source)
    if model_config.get("cond_channels"):
        raise InputError("this checkpoint is label-conditioned: use `emseg lcs infer`", source=source)
    ndim = int(model_config.get("ndim", 2))
    patch = window_shape(patch_shape, (state.get("config") or {}).get("patch_shape"), volume_shape, ndim)
    window = tuple(min(p, s) for p, s in zip(patch, volume_shape))
    check_model_config(model_config, source=source, patch=network_patch(window, model_config))
    return VolumeCheckpoint(source, patch, window, state)


@dataclass(frozen=True)
class OpenNetwork:
    """A network ready to predict (:func:`open_for_volume`): ``net`` maps (B, 1, *P) to logits."""

    net: torch.nn.Module
    divisor: tuple[int, ...]
    device: torch.device
    precision: Precision


def prepare_network(model: torch.nn.Module, precision: Precision, compile_: bool = False) -> torch.nn.Module:
    """``model`` for inference: eval mode, batch norm folded, the precision's memory format, compiled if asked."""
    folded = fold_batchnorm(model.eval())
    net = precision.prepare_model(folded)
    return torch.compile(net, dynamic=False) if compile_ else net


def precision_for(checkpoint: VolumeCheckpoint, *, device: str = "auto",
                  precision: str | Precision = DEFAULT_PRECISION) -> tuple[torch.device, Precision]:
    """The device and the precision ``checkpoint``'s network runs in, each resolved once."""
    dev = resolve_device(device)
    return dev, resolve_precision(precision, dev, ndim=checkpoint.ndim)


def open_for_volume(checkpoint: VolumeCheckpoint, *, device: str = "auto",
                    precision: str | Precision = DEFAULT_PRECISION, compile_: bool = False) -> OpenNetwork:
    """Build ``checkpoint``'s network on ``device`` and prepare it to run in ``precision`` (:func:`precision_for`)."""
    model = model_from_state(checkpoint.state, source=checkpoint.path)  # on the CPU, as stored
    folded = fold_batchnorm(model)
    dev, chosen = precision_for(checkpoint, device=device, precision=precision)
    net = chosen.prepare_model(folded.to(dev))
    return OpenNetwork(torch.compile(net, dynamic=False) if compile_ else net, tuple(model.divisor), dev, chosen)


_OPEN: dict[tuple, OpenNetwork] = {}
_OPEN_LOCK = threading.Lock()


def cached_open(path: str, volume_shape: Sequence[int], *, patch_shape: Sequence[int], device: str = "auto",
                precision: str = DEFAULT_PRECISION, compile_: bool = False, mtime_ns: int | None = None,
                size: int | None = None) -> OpenNetwork:
    """:func:`open_for_volume` once per process and run (a cluster worker predicts many blocks).

    The cache is keyed by the path, modification time and size of the checkpoint and by the run's
    choices; when ``mtime_ns``/``size`` are given and the file differs, the run's checkpoint was
    replaced: an error. One network is kept per process.
    """
    st = unchanged_stat(path, mtime_ns, size)
    key = (path, st.st_mtime_ns, st.st_size, tuple(volume_shape), tuple(patch_shape), device, str(precision),
           compile_)
    with _OPEN_LOCK:
        if key not in _OPEN:
            checkpoint = read_for_volume(path, volume_shape, patch_shape=patch_shape)
            opened = open_for_volume(checkpoint, device=device, precision=precision, compile_=compile_)
            _OPEN.clear()
            _OPEN[key] = opened
        return _OPEN[key]


def forget_opened() -> None:
    """Drop the network :func:`cached_open` keeps (an in-process run is over)."""
    with _OPEN_LOCK:
        _OPEN.clear()
