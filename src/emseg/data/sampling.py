"""Patch sampling from lazily read cubes, in proportion to each cube's priority."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from emseg.data.values import to_float
from emseg.errors import InputError
from emseg.io import (
    VolumeRegion,
    check_not_present,
    check_patch_fits,
    check_raw,
    open_volume,
    read_info,
    validate_labels,
)


@dataclass
class Cube:
    """One training cube: raw volume, label volume (or None), lazy-label info and priority.

    ``raw`` and ``label`` are anything sliceable with numpy semantics (an opened
    :class:`~emseg.io.Volume`, an h5py dataset, a zarr array or a numpy array).
    """

    raw: Any
    label: Any
    info: np.ndarray
    prio: float
    name: str = ""
    raw_dtype: np.dtype = field(default=None)  # type: ignore[assignment]
    #: Voxels per class in ``label`` (counted when the cube is opened); None when not known.
    counts: np.ndarray | None = None

    def __post_init__(self):
        if self.raw_dtype is None:
            self.raw_dtype = np.dtype(self.raw.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.raw.shape)

    @property
    def has_not_present(self) -> bool:
        return bool(np.any(self.info[1]))


def _view(volume, region):
    return volume if region is None else VolumeRegion(volume, region, str(volume.spec))


def close_cubes(cubes: Sequence[Cube]) -> None:
    """Close the volumes that :func:`open_cubes` opened (in-memory arrays need nothing)."""
    for cube in cubes:
        for vol in (cube.raw, cube.label):
            if hasattr(vol, "close"):
                vol.close()


def open_cubes(entries: Sequence[Any], n_classes: int, patch_shape: Sequence[int]) -> list[Cube]:
    """Open and validate the cubes of a config (objects with ``raw``, ``label`` and ``prio``).

    Every check raises :class:`~emseg.errors.InputError` naming the file and dataset. Cubes without
    an explicit ``prio`` get one proportional to their number of voxels when no cube sets one,
    and 1.0 otherwise.
    """
    cubes = []
    for entry in entries:
        raw = _view(open_volume(entry.raw), getattr(entry, "region", None))
        check_raw(raw)
        label = info = counts = None
        if entry.label:
            label = _view(open_volume(entry.label), getattr(entry, "region", None))
            counts = validate_labels(label, n_classes, raw=raw)  # shape, dtype, values first
            info = read_info(entry.label, n_classes)
            check_not_present(info, counts, str(label.spec))
        else:
            info = np.zeros((2, n_classes), dtype=np.uint8)
        check_patch_fits(patch_shape, raw.shape, str(raw.spec))
        cubes.append(Cube(raw, label, info, entry.prio if entry.prio is not None else np.nan, str(raw.spec),
                          counts=counts))
    prios = np.array([c.prio for c in cubes], dtype=float)
    if cubes and np.all(np.isnan(prios)):
        for c in cubes:
            c.prio = float(np.prod(c.shape))
    else:
        for c in cubes:
            if np.isnan(c.prio):
                c.prio = 1.0
    for c in cubes:
        if not c.prio > 0:
            raise InputError(f"prio must be > 0, got {c.prio}", source=c.name)
    return cubes


class PatchSampler:
    """Draw random patches from cubes, choosing cube ``i`` with probability prio_i / sum(prio).

    Only the patch is read from disk. A patch whose ignored (-1) fraction exceeds
    ``example_ignore_threshold`` is redrawn (up to ``max_redraws`` times), except in cubes that carry
    not-present flags, where a fully ignored patch still teaches what is absent.

    Parameters
    ----------
    cubes : list of Cube
    patch_shape : sequence of int
        Patch shape in volume axes, e.g. ``(1, 256, 256)`` for 2D patches from a 3D volume.
    squeeze : bool
        Drop the leading axis of length 1 (2D network on a 3D volume).
    """

    def __init__(
        self,
        cubes: Sequence[Cube],
        patch_shape: Sequence[int],
        *,
        example_ignore_threshold: float = 1.0,
        max_redraws: int = 50,
        squeeze: bool = False,
    ):
        if not cubes:
            raise ValueError("no training cubes")
        self.cubes = list(cubes)
        self.patch_shape = tuple(int(p) for p in patch_shape)
        self.threshold = float(example_ignore_threshold)
        self.max_redraws = int(max_redraws)
        self.squeeze = squeeze and self.patch_shape[0] == 1
        prios = np.array([c.prio for c in self.cubes], dtype=float)
        self.probabilities = prios / prios.sum()

    def _region(self, cube: Cube, rng: np.random.Generator) -> tuple[slice, ...]:
        starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(cube.shape, self.patch_shape)]
        return tuple(slice(a, a + p) for a, p in zip(starts, self.patch_shape))

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """One patch: (raw float32 (*P), label int64 (*P), info (2, K), cube index)."""
        index = int(rng.choice(len(self.cubes), p=self.probabilities))
        cube = self.cubes[index]
        for _ in range(self.max_redraws + 1):
            region = self._region(cube, rng)
            if cube.label is None:
                label = np.full(self.patch_shape, -1, dtype=np.int64)
            else:
                label = np.asarray(cube.label[region]).astype(np.int64)
            if cube.has_not_present or np.mean(label < 0) <= self.threshold:
                break
        raw = to_float(np.asarray(cube.raw[region]), cube.raw_dtype)
        if self.squeeze:
            raw, label = raw[0], label[0]
        return raw, label, cube.info, index

    def batch(self, size: int, rng: np.random.Generator, augmenter=None) -> dict[str, np.ndarray]:
        """A batch as numpy arrays: ``raw`` (B,1,*P), ``target`` (B,*P), ``labeled``/``not_present`` (B,K)."""
        raws, labels, infos, cubes = [], [], [], []
        for _ in range(size):
            raw, label, info, index = self.draw(rng)
            if augmenter is not None:
                raw, label = augmenter(raw, label, rng)
            raws.append(raw)
            labels.append(label)
            infos.append(info)
            cubes.append(index)
        info = np.stack(infos).astype(np.float32)
        return {
            "raw": np.stack(raws)[:, None].astype(np.float32),
            "target": np.stack(labels).astype(np.int64),
            "labeled": info[:, 0],
            "not_present": info[:, 1],
            "cube": np.asarray(cubes),
        }
