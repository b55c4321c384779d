"""TIFF outputs that Fiji opens: an ImageJ hyperstack with the voxel size, written block by block.

The file is created at its full size under a temporary name (uncompressed, contiguous pages) and
memory-mapped, so blocks are written in any order without holding the volume in memory; commit
flushes it and renames it into place. Past :data:`BIGTIFF_BYTES` it is a BigTIFF (classic TIFF
offsets stop at 4 GiB), still with the ImageJ description: Fiji opens it through Bio-Formats.
Channel-first outputs (class probabilities, ``(C, Z, Y, X)``) are stored in ImageJ's order
``(Z, C, Y, X)``; writes take emseg's order.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tifffile

from emseg.errors import InputError
from emseg.io._store import StagedArray

__all__ = ["BIGTIFF_BYTES", "TiffOutputVolume", "IMAGEJ_DTYPES"]

#: Data larger than this are written as BigTIFF (a margin below 4 GiB for the headers).
BIGTIFF_BYTES = (1 << 32) - (1 << 25)
#: The sample types ImageJ opens natively; others are written as plain TIFF.
IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


class TiffOutputVolume(StagedArray):
    """One volume written into ``tmp`` (a memory-mapped TIFF) and renamed to ``final`` on :meth:`commit`.

    Parameters
    ----------
    final, tmp : Path
    shape : sequence of int
        In emseg's order: (Z, Y, X) / (Y, X), or (C, Z, Y, X) / (C, Y, X) with ``channels``.
    dtype : numpy dtype
    channels : bool
        The first axis is channels (written as ImageJ channels).
    voxel_size : (z, y, x) or (y, x) in nm, optional
    attrs : dict, optional
        emseg's attributes of the output, kept as JSON under ``emseg`` in the ImageJ description.
    bigtiff_bytes : int
        Switch to BigTIFF above this many bytes of data.
    """

    def __init__(self, final: Path, tmp: Path, shape: Sequence[int], dtype, *, channels: bool = False,
                 voxel_size: Sequence[float] | None = None, attrs: dict | None = None,
                 bigtiff_bytes: int = BIGTIFF_BYTES):
        self.final, self._tmp = Path(final), Path(tmp)
        self.spec = str(final)
        shape = tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        spatial = shape[1:] if channels else shape
        if len(spatial) not in (2, 3):
            raise InputError(f"a TIFF output holds 2D or 3D volumes, not shape {shape}", source=str(final))
        order = list(range(len(shape)))
        if channels and len(spatial) == 3:
            order = [1, 0, 2, 3]  # (C, Z, Y, X) -> ImageJ's (Z, C, Y, X)
        file_shape = tuple(shape[i] for i in order)
        axes = ("ZYX" if len(spatial) == 3 else "YX") if not channels else ("ZCYX" if len(spatial) == 3 else "CYX")
        imagej = dtype in IMAGEJ_DTYPES
        bigtiff = math.prod(shape) * dtype.itemsize > bigtiff_bytes
        kwargs: dict[str, Any] = {"bigtiff": bigtiff, "photometric": "minisblack"}
        # emseg's attributes plus the layout, so that emseg reads its own file back with every axis
        # (ImageJ drops length-1 channels and sections)
        note = json.dumps(dict(attrs or {}, _layout={"shape": list(shape), "channels": bool(channels)}),
                          separators=(",", ":"), default=str)
        if imagej:
            meta: dict[str, Any] = {"axes": axes, "emseg": note}
            if voxel_size is not None:
                voxel = [float(v) for v in voxel_size][-len(spatial):]
                kwargs["resolution"] = (1.0 / voxel[-1], 1.0 / voxel[-2])  # tifffile takes (x, y)
                meta["unit"] = "nm"
                if len(spatial) == 3:
                    meta["spacing"] = voxel[0]
            kwargs.update(imagej=True, metadata=meta)
        else:
            kwargs.update(metadata={"axes": axes, "emseg": note})
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*nonconformant BigTIFF ImageJ.*")
                self._map = tifffile.memmap(str(self._tmp), shape=file_shape, dtype=dtype, **kwargs)
        except (OSError, ValueError) as exc:
            self._tmp.unlink(missing_ok=True)
            raise InputError(f"cannot write the TIFF output ({exc})", source=str(final)) from None
        self.array = self._map.transpose(np.argsort(order)) if order != sorted(order) else self._map
        self.bigtiff, self.imagej = bigtiff, imagej
        self.committed = False

    def __getitem__(self, index) -> np.ndarray:
        return np.array(self.array[index])  # a copy: the map is closed on commit

    def _close_map(self) -> None:
        mapped, self._map, self.array = getattr(self, "_map", None), None, None
        if mapped is not None:
            mapped.flush()
            handle = getattr(mapped, "_mmap", None)
            del mapped
            if handle is not None:
                try:
                    handle.close()
                except BufferError:  # a caller still holds a view: the map closes when that goes
                    pass

    def commit(self) -> None:
        if self.committed:
            return
        self._close_map()
        os.replace(self._tmp, self.final)
        self.committed = True
        self.release_claim()

    def discard(self) -> None:
        try:
            self._close_map()
        finally:
            self._tmp.unlink(missing_ok=True)
            self.release_claim()
