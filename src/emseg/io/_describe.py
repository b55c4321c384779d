"""What emseg sees in a volume (the core of ``emseg info``): format, shape, dtype, chunks, voxel size, values."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from emseg.io._ome import voxel_size_of
from emseg.io._validate import _slabs
from emseg.io._volume import FORMAT_NAMES, open_volume


@dataclass(frozen=True)
class VolumeInfo:
    spec: str
    format: str
    shape: tuple[int, ...]
    dtype: str
    #: Storage chunks (blocks, tiles, pages) as emseg reads them; None for a contiguous file.
    chunks: tuple[int, ...] | None
    #: nm per voxel along each axis (z, y, x), from the file's metadata; None when it says nothing.
    voxel_size_nm: tuple[float, ...] | None
    #: Smallest and largest value, and how many are not finite (None when not scanned).
    min: float | None = None
    max: float | None = None
    nonfinite: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["chunks"] = list(self.chunks) if self.chunks else None
        out["voxel_size_nm"] = list(self.voxel_size_nm) if self.voxel_size_nm else None
        return out


def describe_volume(spec: str, *, scan: bool = True,
                    progress: Callable[[int, int], None] | None = None) -> VolumeInfo:
    """Open ``spec`` as every command would and report what is there.

    With ``scan`` the value range is computed slab by slab (memory bounded by one slab; the whole
    volume is read once); ``progress(done_voxels, total_voxels)`` follows it.
    """
    with open_volume(spec) as vol:
        fmt = FORMAT_NAMES[vol.spec.fmt]
        if vol.spec.fmt == "zarr" and str(vol.spec.path).lower().endswith(".ome.zarr"):
            fmt = "OME-Zarr"
        voxel = voxel_size_of(vol)
        low = high = bad = None
        if scan:
            total, done, bad = int(np.prod(vol.shape)), 0, 0
            plane = int(np.prod(vol.shape[1:]))
            for sl in _slabs(vol.shape):
                data = np.asarray(vol[sl])
                if data.dtype.kind == "f":
                    finite = np.isfinite(data)
                    missing = int(data.size - np.count_nonzero(finite))
                    bad += missing
                    data = data[finite] if missing else data
                if data.size:
                    lo, hi = data.min(), data.max()
                    low = lo if low is None else min(low, lo)
                    high = hi if high is None else max(high, hi)
                done += (sl.stop - sl.start) * plane
                if progress is not None:
                    progress(done, total)
        return VolumeInfo(
            spec=str(vol.spec), format=fmt, shape=vol.shape, dtype=str(vol.dtype), chunks=vol.chunks,
            voxel_size_nm=tuple(float(v) for v in voxel) if voxel else None,
            min=None if low is None else float(low), max=None if high is None else float(high),
            nonfinite=bad,
        )
