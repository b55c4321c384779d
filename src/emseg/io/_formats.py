"""Lazy readers for the formats EM arrives in besides HDF5 and zarr: MRC and N5 here, TIFF and
slice folders in :mod:`emseg.io._tiff_read`, and what they share.

Each reader is an array-like (``shape``, ``dtype``, ``chunks``, ``attrs``, ``__getitem__``,
``close``) that :class:`emseg.io.Volume` wraps, so every command reads these formats the same way.
Nothing is loaded whole: a multi-page TIFF is memory-mapped when its pages are stored contiguously
and read page by page (tifffile's zarr view) otherwise; a folder of slices reads one file per
section asked for; MRC is memory-mapped (the header read by ``mrcfile``); N5 is read chunk by
chunk (``tensorstore``, the ``n5`` extra). The voxel size found in a file's metadata is ``attrs["voxel_size_nm"]`` (z, y, x).
"""
from __future__ import annotations

import json
import math
import mmap
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import mrcfile

from emseg.errors import InputError

TIFF_SUFFIXES = (".tif", ".tiff")
MRC_SUFFIXES = (".mrc", ".rec", ".st", ".ali", ".map")
SLICE_SUFFIXES = (".tif", ".tiff", ".png")
GLOB_CHARS = "*?["

#: Length units of TIFF / N5 metadata -> nanometres.
_UNIT_NM = {"nm": 1.0, "nanometer": 1.0, "nanometre": 1.0, "um": 1e3, "µm": 1e3, "\\u00B5m": 1e3,
            "micron": 1e3, "micrometer": 1e3, "micrometre": 1e3, "mm": 1e6, "millimeter": 1e6,
            "a": 0.1, "å": 0.1, "angstrom": 0.1, "pm": 1e-3}


def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside names by value (``s2`` before ``s10``).

    Examples
    --------
    >>> sorted(["s10.tif", "s2.tif", "s1.tif"], key=natural_key)
    ['s1.tif', 's2.tif', 's10.tif']
    """
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower())
            for part in re.split(r"(\d+)", name) if part != ""]


def _nm(values: Sequence[float], unit: str | None) -> tuple[float, ...] | None:
    """``values`` in ``unit`` as nanometres, or None when a value or the unit is unusable."""
    factor = _UNIT_NM.get(str(unit or "nm").strip().lower())
    if factor is None:
        return None
    try:
        out = tuple(float(v) * factor for v in values)
    except (TypeError, ValueError):
        return None
    return out if out and all(v > 0 and math.isfinite(v) for v in out) else None


def full_index(index, ndim: int) -> tuple:
    """``index`` as a tuple of one entry per axis: an Ellipsis expanded, missing trailing axes whole.

    Examples
    --------
    >>> full_index((..., 2), 3)
    (slice(None, None, None), slice(None, None, None), 2)
    >>> full_index(1, 3)
    (1, slice(None, None, None), slice(None, None, None))
    """
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1:]
    return index + (slice(None),) * (ndim - len(index))


class _ArrayReader:
    """The array-like protocol :class:`emseg.io.Volume` reads: subclasses set the fields and ``_read``."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...] | None = None
    attrs: dict

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self._read(index))

    def _read(self, index):
        raise NotImplementedError

    def close(self) -> None:
        pass


def _close_map(array: Any) -> None:
    """Release the file mapping behind a numpy memory map (or a view of one), if nothing else uses it."""
    while array is not None and not isinstance(array, np.memmap) and isinstance(array, np.ndarray):
        array = array.base
    handle = getattr(array, "_mmap", None)
    if handle is not None:
        try:
            handle.close()
        except (BufferError, ValueError):  # still viewed by a caller: released when that goes
            pass


# ----------------------------------------------------------------------------------------- MRC


class MrcVolume(_ArrayReader):
    """An MRC / CCP4 file (``.mrc``, ``.rec``, ``.st``, ``.ali``, ``.map``), memory-mapped.

    The voxel size comes from the header (Å, converted to nm; absent when the header says 0).
    """

    def __init__(self, path: Path):
        self._map = self._data = None
        try:  # mrcfile checks the header and finds the data; the data are then mapped read-only here
            with mrcfile.mmap(str(path), mode="r", permissive=False) as mrc:
                data = mrc.data
                if data is None or data.ndim not in (2, 3):
                    raise InputError(f"MRC data of shape {getattr(data, 'shape', None)}: emseg reads 2D or 3D "
                                     "volumes", source=str(path))
                shape, stored, offset = tuple(int(s) for s in data.shape), np.dtype(data.dtype), int(data.offset)
                vs = mrc.voxel_size
                sizes = [float(vs.z), float(vs.y), float(vs.x)][3 - data.ndim:]
                del data
        except InputError:
            raise
        except Exception as exc:
            reason = str(exc).split("\n")[0]
            raise InputError(f"not a readable MRC file ({reason})", source=str(path)) from None
        # A mapping of our own: copying whole sections out of mrcfile's numpy memmap measured 2.4x
        # slower than out of a plain read-only mapping in a probe (docs/benchmarks.md, formats).
        with open(path, "rb") as fh:
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._data = np.frombuffer(self._map, dtype=stored, count=math.prod(shape), offset=offset).reshape(shape)
        self.shape = shape
        self.dtype = stored.newbyteorder("=")
        self.chunks = None
        self.attrs = {"format": "mrc"}
        voxel = _nm(sizes, "angstrom")
        if voxel:
            self.attrs["voxel_size_nm"] = list(voxel)

    def _read(self, index):
        return np.array(self._data[index], dtype=self.dtype)  # a copy in native byte order

    def close(self) -> None:
        self._data = None
        handle, self._map = getattr(self, "_map", None), None
        if handle is not None:
            try:
                handle.close()
            except BufferError:  # a view is still held somewhere: released when it goes
                pass


# ------------------------------------------------------------------------------------------ N5


def _non_negative(index, shape: Sequence[int]) -> tuple:
    """``index`` (ints, slices, an Ellipsis) with numpy's negative positions made explicit: tensorstore
    reads -1 as a coordinate, not as the last element."""
    index = full_index(index, len(shape))
    out = []
    for i, size in zip(index, shape):
        if isinstance(i, slice):
            start, stop, step = i.indices(size)
            out.append(slice(start, max(start, stop), step) if step > 0 else i)
        elif isinstance(i, (int, np.integer)):
            out.append(int(i) + size if i < 0 else int(i))
        else:
            out.append(i)
    return tuple(out)


def _n5_voxel_size(attrs: dict, ndim: int) -> tuple[float, ...] | None:
    """Voxel size (z, y, x) nm from N5 attributes: ``pixelResolution`` (with unit) or ``resolution``.

    N5 lists axes x first; emseg's order is the reverse.
    """
    pixel = attrs.get("pixelResolution")
    if isinstance(pixel, dict) and isinstance(pixel.get("dimensions"), list):
        values, unit = pixel["dimensions"], pixel.get("unit", "nm")
    elif isinstance(attrs.get("resolution"), list):
        values, unit = attrs["resolution"], attrs.get("unit", "nm")
    else:
        return None
    if len(values) != ndim:
        return None
    return _nm(list(reversed(values)), unit)


class N5Dataset(_ArrayReader):
    """One dataset of an N5 container, read chunk by chunk through tensorstore.

    N5 stores dimensions x first (Fortran order); emseg shows them reversed, (z, y, x), as the
    N5 readers of the Python ecosystem do.
    """

    def __init__(self, root: Path, key: str):
        where = f"{root}/{key}" if key else str(root)
        attr_file = root / key / "attributes.json" if key else root / "attributes.json"
        if not attr_file.is_file():
            raise InputError("no attributes.json: not an N5 dataset", source=where)
        try:
            meta = json.loads(attr_file.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"unreadable attributes.json ({exc})", source=where) from None
        if not isinstance(meta, dict) or "dimensions" not in meta or "dataType" not in meta:
            raise InputError("attributes.json has no dimensions/dataType: an N5 group, not a dataset", source=where)
        try:
            import tensorstore as ts
        except ImportError:
            raise InputError("reading N5 needs tensorstore: pip install 'emseg[n5]'", source=where) from None
        try:
            store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(root)}, "path": key},
                            read=True).result()
        except Exception as exc:
            raise InputError(f"cannot open the N5 dataset ({str(exc).splitlines()[0]})", source=where) from None
        self._store = store.T
        self.shape = tuple(int(s) for s in self._store.shape)
        self.dtype = np.dtype(self._store.dtype.numpy_dtype)
        self.chunks = tuple(int(c) for c in reversed(meta.get("blockSize", []))) or None
        self.attrs = {k: v for k, v in meta.items() if k not in ("dimensions", "blockSize", "dataType", "compression")}
        self.attrs["format"] = "n5"
        voxel = _n5_voxel_size(meta, len(self.shape))
        if voxel:
            self.attrs["voxel_size_nm"] = list(voxel)
        self._where = where

    def _read(self, index):
        try:
            return self._store[_non_negative(index, self.shape)].read().result()
        except Exception as exc:
            raise InputError(f"cannot read N5 blocks ({str(exc).splitlines()[0]})", source=self._where) from None
