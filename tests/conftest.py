"""Shared fixtures: tiny synthetic volumes on disk, one torch thread, fixed seeds."""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from emseg.synthetic import make_volume

# The test machine has few cores shared with other work: one thread keeps timings stable
# and makes CPU results bit-reproducible between runs.
torch.set_num_threads(1)

SEED = 1234


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same python, numpy and torch random state."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    yield


_VOLUME_CACHE: dict[tuple, Any] = {}


def synthetic(shape=(4, 64, 64), seed: int = 0):
    """``make_volume(shape, rng=seed)``, generated once per session (callers must not modify it)."""
    key = (tuple(shape), seed)
    if key not in _VOLUME_CACHE:
        vol = make_volume(tuple(shape), rng=seed)
        vol.raw.setflags(write=False)
        vol.label.setflags(write=False)
        _VOLUME_CACHE[key] = vol
    return _VOLUME_CACHE[key]


def write_h5(path: Path, **datasets: np.ndarray) -> Path:
    """Write each keyword as a dataset of an HDF5 file (appending to an existing file)."""
    with h5py.File(path, "a") as fh:
        for name, data in datasets.items():
            if name in fh:
                del fh[name]
            fh.create_dataset(name, data=np.asarray(data))
    return path


@pytest.fixture
def synthetic_h5(tmp_path) -> Path:
    """An h5 file with ``raw`` (uint8) and ``label`` (uint8, 0..2) of shape (4, 64, 64)."""
    vol = synthetic((4, 64, 64), 0)
    return write_h5(tmp_path / "train.h5", raw=vol.raw, label=vol.label)


@pytest.fixture
def synthetic_valid_h5(tmp_path) -> Path:
    """A second, independent (2, 64, 64) volume with raw and label, for validation."""
    vol = synthetic((2, 64, 64), 1)
    return write_h5(tmp_path / "valid.h5", raw=vol.raw, label=vol.label)


def tiny_train_config(train_h5: Path, **overrides: Any) -> dict[str, Any]:
    """A training config dict small enough for a step to take a few milliseconds on a CPU."""
    config: dict[str, Any] = {
        "n_classes": 3,
        "patch_shape": [1, 32, 32],
        "batch_size": 2,
        "steps": 6,
        "log_every": 1,
        "checkpoint_every": 100,
        "valid_every": 1000,
        "amp": False,
        "train": [{"raw": f"{train_h5}:raw", "label": f"{train_h5}:label"}],
        "model": {"depth": 2, "base_width": 4, "norm": "batch"},
        # the plain lazy NLL at a constant rate: what the training mechanics' tests reason about
        "optim": {"lr": 1e-2, "schedule": "constant", "warmup_steps": 0},
        "class_weights": [],
        "dice_weight": 0.0,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def to_toml(config: dict[str, Any]) -> str:
    """Serialise the small config dicts used in tests to TOML (no external writer needed)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines, tables, arrays = [], [], []
    for k, v in config.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            arrays.append((k, v))
        else:
            lines.append(f"{k} = {value(v)}")
    for k, table in tables:
        lines.append(f"\n[{k}]")
        lines += [f"{kk} = {value(vv)}" for kk, vv in table.items()]
    for k, entries in arrays:
        for entry in entries:
            lines.append(f"\n[[{k}]]")
            lines += [f"{kk} = {value(vv)}" for kk, vv in entry.items() if vv is not None]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- blockwise on dask.distributed
HAVE_DASK = importlib.util.find_spec("distributed") is not None
needs_dask = pytest.mark.skipif(not HAVE_DASK, reason="dask.distributed is not installed (extra 'distributed')")
#: The labelled volume of the cluster tests and a block grid of 2 x 2 x 2 = 8 blocks on it.
CLUSTER_SHAPE = (4, 48, 48)
CLUSTER_BLOCK = (2, 24, 24)
CLUSTER_BLOCKS = 8


@pytest.fixture(scope="module")
def client():
    """An in-process dask cluster of 2 workers, one per test module."""
    from emseg.engine.cluster import open_client

    with open_client("local", workers=2, processes=False) as c:
        yield c


@pytest.fixture
def labels_h5(tmp_path):
    """Synthetic 3-class labels of :data:`CLUSTER_SHAPE` in ``lab.h5:label``."""
    return write_h5(tmp_path / "lab.h5", label=synthetic(CLUSTER_SHAPE, 3).label)


def zarr_array(path, key=None):
    import zarr

    return zarr.open_array(store=str(path), path=key, mode="r")


def ome_models():
    """``ome_zarr_models.v05`` (the OME-Zarr 0.5 validator), or a skip where it is not installed."""
    return pytest.importorskip("ome_zarr_models.v05")


def ome_group(path):
    import zarr

    return zarr.open_group(store=str(path), mode="r")


def validated_ome_image(path):
    """The store at ``path`` parsed by ome-zarr-models (raises when it breaks the 0.5 spec)."""
    return ome_models().Image.from_zarr(ome_group(path))
