"""TIFF readers: one multi-page file (:class:`TiffStack`) and folders or globs of 2D slices
(:class:`SliceStack`), both lazy, with the voxel size of ImageJ or OME-TIFF metadata."""
from __future__ import annotations

import glob as globlib
import json
import logging
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr
from PIL import Image

from emseg.errors import InputError
from emseg.io._tiff_layout import head_layout, plain_tiff_layout
from emseg.io._formats import (GLOB_CHARS, SLICE_SUFFIXES, TIFF_SUFFIXES, _ArrayReader, _close_map, _nm, full_index,
                                natural_key)

# --------------------------------------------------------------------------------------- TIFF


class _TiffLog(logging.Handler):
    """Collects what tifffile logs while a file is opened (it reports damage as log warnings)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _tiff_voxel_size(tif: Any, page: Any, ndim: int) -> tuple[float, ...] | None:
    """(z, y, x) or (y, x) nm from OME-XML, else ImageJ's ``spacing``/``unit`` and the resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        found = re.search(r"<Pixels\b[^>]*>", tif.ome_metadata)
        if found:
            tag = found.group(0)
            attrs = dict(re.findall(r'(\w+)="([^"]*)"', tag))
            names = ("Z", "Y", "X")[3 - ndim:]
            sizes = [attrs.get(f"PhysicalSize{a}") for a in names]
            units = {attrs.get(f"PhysicalSize{a}Unit", "µm") for a in names}
            if all(s is not None for s in sizes) and len(units) == 1:
                return _nm(sizes, units.pop())
    meta = tif.imagej_metadata
    if not meta:  # plain resolution tags are print resolutions (dpi), not voxel sizes
        return None
    res = []
    for name in ("YResolution", "XResolution"):
        tag = page.tags.get(name)
        if tag is None:
            return None
        num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
        if not num:
            return None
        res.append(den / num)  # resolution is pixels per unit
    unit = meta.get("unit")
    if not unit:  # ImageJ writes no unit for an uncalibrated image
        return None
    if ndim == 2:
        return _nm(res, unit)
    spacing = meta.get("spacing")
    return _nm([spacing] + res, unit) if spacing is not None else None


class TiffStack(_ArrayReader):
    """A multi-page (or single-page) TIFF file as one 2D/3D volume, read lazily.

    Contiguous, uncompressed pages (what ImageJ, tifffile and most exporters write) are
    memory-mapped; compressed or scattered pages are read page by page through tifffile's zarr view.
    """

    def __init__(self, path: Path):
        self.path = path
        log = _TiffLog()
        logger = logging.getLogger("tifffile")
        logger.addHandler(log)
        try:
            self._tif = tifffile.TiffFile(str(path))
            series = self._tif.series[0]
            shape, axes, page = tuple(series.shape), series.axes, series.pages[0]
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"not a readable TIFF file ({type(exc).__name__}: {exc})", source=str(path)) from None
        finally:
            logger.removeHandler(log)
        damage = [m for m in log.messages if "invalid" in m.lower() or "corrupt" in m.lower()
                  or "failed" in m.lower() or "truncat" in m.lower()]
        if damage:
            self.close()
            raise InputError(f"truncated or damaged TIFF ({damage[0].split('>')[-1].strip()})", source=str(path))
        if "S" in axes and shape[axes.index("S")] > 1:
            self.close()
            raise InputError(f"colour TIFF (axes {axes}, {shape[axes.index('S')]} samples per pixel): EM volumes "
                             f"are grey; save one channel", source=str(path))
        note = self._emseg_attrs(self._tif)
        layout = note.pop("_layout", None) if isinstance(note.get("_layout"), dict) else None
        keep = [i for i, s in enumerate(shape) if s > 1 or axes[i] in "YX"]
        channel = next((i for i in keep if axes[i] == "C"), None)
        if len(keep) > 3 + (channel is not None):
            self.close()
            raise InputError(f"TIFF of shape {shape} (axes {axes}): emseg reads 2D or 3D grey volumes",
                             source=str(path))
        self.dtype = np.dtype(series.dtype)
        end = self._data_end(series)
        if end is not None and end > path.stat().st_size:
            self.close()
            raise InputError(f"truncated TIFF: the image data end at byte {end}, the file has "
                             f"{path.stat().st_size}", source=str(path))
        if series.dataoffset is not None:
            order = np.dtype(self._tif.byteorder + series.dtype.char)
            emseg_shape = self._emseg_shape(layout, int(np.prod(shape)))
            if emseg_shape is not None:  # emseg's own output: every axis it wrote, channels first
                stored = emseg_shape if len(emseg_shape) != 4 else (emseg_shape[1], emseg_shape[0]) + emseg_shape[2:]
                mapped = np.memmap(path, dtype=order, mode="r", offset=series.dataoffset, shape=stored)
                mapped = np.moveaxis(mapped, 1, 0) if len(emseg_shape) == 4 else mapped
                channel = 0 if layout.get("channels") else None
            else:
                mapped = np.memmap(path, dtype=order, mode="r", offset=series.dataoffset,
                                   shape=tuple(shape[i] for i in keep))
                if channel is not None:  # ImageJ keeps channels after z: emseg puts them first
                    mapped = np.moveaxis(mapped, keep.index(channel), 0)
            self._array, self.chunks = mapped, None
        elif channel is not None:
            self.close()
            raise InputError("a TIFF with channels is read only when it is uncompressed and contiguous "
                             "(as emseg writes it)", source=str(path))
        else:
            self._array = zarr.open_array(series.aszarr(), mode="r")
            if self._array.shape != tuple(shape):
                self.close()
                raise InputError(f"TIFF pages do not form one array (shape {self._array.shape})", source=str(path))
            self._array = _Squeezed(self._array, [i for i in range(len(shape)) if i not in keep])
            self.chunks = tuple(c for i, c in enumerate(self._array.base.chunks) if i in keep)
        self.shape = tuple(int(s) for s in self._array.shape) if isinstance(self._array, np.ndarray) \
            else tuple(shape[i] for i in keep)
        voxel = _tiff_voxel_size(self._tif, page, len(self.shape) - (channel is not None))
        self.attrs = note
        if voxel:
            self.attrs["voxel_size_nm"] = list(voxel)
        self.attrs["format"] = "tiff"

    @staticmethod
    def _emseg_shape(layout: dict | None, size: int) -> tuple[int, ...] | None:
        """The shape emseg recorded for its own output, when it fits the file's pixel count."""
        if layout is None:
            return None
        try:
            shape = tuple(int(s) for s in layout.get("shape", ()))
        except (TypeError, ValueError):
            return None
        ok = 2 <= len(shape) <= 4 and all(s > 0 for s in shape) and int(np.prod(shape)) == size
        return shape if ok else None

    @staticmethod
    def _emseg_attrs(tif: Any) -> dict:
        """The attributes emseg stored in the ImageJ description of its own output (else none)."""
        note = (tif.imagej_metadata or {}).get("emseg") or (tif.shaped_metadata or [{}])[0].get("emseg")
        if not isinstance(note, str):
            return {}
        try:
            attrs = json.loads(note)
        except ValueError:
            return {}
        return attrs if isinstance(attrs, dict) else {}

    @staticmethod
    def _data_end(series: Any) -> int | None:
        if series.dataoffset is not None:
            return int(series.dataoffset) + int(series.nbytes)
        last = series.pages[-1] if len(series.pages) else None
        if last is None or not getattr(last, "dataoffsets", None):
            return None
        return max(int(o) + int(n) for o, n in zip(last.dataoffsets, last.databytecounts))

    def _read(self, index):
        out = self._array[index]
        # a memory map's slice is a view of the file: copy it (native byte order), so that what a
        # caller holds stays valid after close(), as h5py's reads do
        return np.array(out, dtype=self.dtype) if isinstance(self._array, np.ndarray) else out

    def close(self) -> None:
        tif, self._tif = getattr(self, "_tif", None), None
        if tif is not None:
            tif.close()
        array, self._array = getattr(self, "_array", None), None
        _close_map(array)


class _Squeezed:
    """``base`` with the axes ``drop`` (all of length 1) hidden from indexing."""

    def __init__(self, base: Any, drop: list[int]):
        self.base, self.drop = base, drop

    def __getitem__(self, index):
        if not self.drop:
            return self.base[index]
        it = iter(full_index(index, len(self.base.shape) - len(self.drop)))
        full = [0 if axis in self.drop else next(it) for axis in range(len(self.base.shape))]
        return self.base[tuple(full)]


# ------------------------------------------------------------------------------ slice folders


def slice_files(spec_path: str) -> list[Path]:
    """The 2D image files a folder (``DIR/``) or a glob (``"DIR/*.png"``) names, in natural order.

    A folder contributes its ``.tif``/``.tiff``/``.png`` files (hidden files skipped); a glob
    contributes what it matches.
    """
    text = str(spec_path)
    if any(c in text for c in GLOB_CHARS):
        files = [Path(p) for p in globlib.glob(text) if Path(p).is_file()]
        if not files:
            raise InputError("the pattern matches no file", source=text)
    else:
        folder = Path(text)
        if not folder.is_dir():
            raise InputError("no such folder", source=text)
        with os.scandir(folder) as entries:  # the entries' types come with the listing: no stat per file
            files = [Path(e.path) for e in entries if not e.name.startswith(".")
                     and os.path.splitext(e.name)[1].lower() in SLICE_SUFFIXES and e.is_file()]
        if not files:
            raise InputError("the folder holds no .tif, .tiff or .png slice", source=text)
    return sorted(files, key=lambda p: natural_key(str(p)))


def _slice_header(path: Path) -> tuple[tuple[int, ...], np.dtype, tuple[int, str] | None]:
    """Shape, dtype and (for an uncompressed, contiguous TIFF) the data offset and byte order of one
    2D slice, from its header only."""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            plain = plain_tiff_layout(path)
            if plain is not None:
                return plain

            with tifffile.TiffFile(str(path)) as tif:
                page = tif.pages.first
                where = (int(page.dataoffsets[0]), tif.byteorder) if page.is_memmappable and len(tif.pages) == 1 \
                    else None
                return tuple(page.shape), np.dtype(page.dtype), where

        with Image.open(path) as img:
            mode, size = img.mode, img.size
        dtype = {"1": np.bool_, "L": np.uint8, "I;16": np.uint16, "I;16B": np.uint16, "I": np.int32,
                 "F": np.float32}.get(mode)
        if dtype is None:
            raise InputError(f"image mode {mode} is not grey: EM slices must be single-channel", source=str(path))
        return (size[1], size[0]), np.dtype(dtype), None
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"not a readable image ({type(exc).__name__}: {exc})", source=str(path)) from None


def _read_slice(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            return tifffile.imread(str(path))

        with Image.open(path) as img:
            return np.asarray(img)
    except Exception as exc:
        raise InputError(f"cannot read the slice ({type(exc).__name__}: {exc})", source=str(path)) from None


#: Decoded (PNG, compressed TIFF) slices kept for the next reads of the same sections.
DECODED_CACHE_BYTES = 128 << 20
#: Memory maps of uncompressed slices kept open (each holds a file descriptor).
OPEN_MAPS = 64


def _descriptor_budget() -> int:
    """Descriptors of plain slices kept open for reads: an eighth of the process's soft limit, 64 to
    512 (a 100-section folder read patch by patch no longer reopens files at the usual limit of 1024)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # no resource module (Windows): the old bound
        return 64
    return 512 if soft == resource.RLIM_INFINITY else min(512, max(64, soft // 8))


#: Descriptors of plain slices kept open (least recently used closed first).
OPEN_FDS = _descriptor_budget()


def _whole(rest: tuple) -> bool:
    """Whether the in-plane index ``rest`` selects the whole section."""
    return all(isinstance(r, slice) and r == slice(None) for r in rest)


class SliceStack(_ArrayReader):
    """2D slices (TIFF or PNG files) stacked along z in natural order; only the sections asked for are read.

    Every slice must have the first one's shape and dtype (checked from the headers on opening).
    Uncompressed TIFF slices are memory-mapped, so a patch reads only its rows; slices that must be
    decoded (PNG, compressed TIFF) are kept in a least-recently-used cache of
    :data:`DECODED_CACHE_BYTES`, so that patches of the same sections decode them once.
    """

    def __init__(self, spec_path: str):
        self.files = slice_files(spec_path)
        shape, dtype, where = _slice_header(self.files[0])
        if len(shape) != 2:
            raise InputError(f"slice of shape {shape}: slices must be 2D grey images", source=str(self.files[0]))
        self._where = [where]  # where each uncompressed slice's pixels start: mapped without parsing again
        self._maps: OrderedDict[int, Any] = OrderedDict()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._decoded: OrderedDict[int, np.ndarray] = OrderedDict()
        # slices of the first one's size that begin with the bytes its directory was read from (one
        # writer, one shape) share its layout: one short read per slice instead of a parse, through a
        # descriptor that is kept for the reads that follow
        first_where = where
        try:
            known = head_layout(self.files[0]) if where is not None else None
            first = self._head(0, known[1]) if known is not None else None
            for z, f in enumerate(self.files[1:], start=1):
                if first is not None and self._head(z, len(first[1])) == first:
                    self._where.append(first_where)
                    continue
                s, d, where = _slice_header(f)
                if s != shape or d != dtype:
                    raise InputError(f"slice of shape {s} and dtype {d} differs from the first slice "
                                     f"({self.files[0].name}: {shape}, {dtype})", source=str(f))
                self._where.append(where)
        except BaseException:
            self.close()
            raise
        self.shape = (len(self.files),) + shape
        self.dtype = dtype
        self.chunks = (1,) + shape
        self.attrs = {"format": "slices", "files": len(self.files)}
        if self.files[0].suffix.lower() in TIFF_SUFFIXES:
            voxel = self._plane_voxel_size(self.files[0])
            if voxel:
                self.attrs["voxel_size_nm"] = list(voxel)

    @staticmethod
    def _plane_voxel_size(path: Path) -> tuple[float, ...] | None:
        with tifffile.TiffFile(str(path)) as tif:
            return _tiff_voxel_size(tif, tif.pages.first, 2)

    def _plane(self, z: int):
        """Section ``z`` as a memory map (uncompressed TIFF) or a decoded array."""
        plane = self._maps.get(z)
        if plane is not None:
            self._maps.move_to_end(z)
            return plane
        path, where = self.files[z], self._where[z]
        plane = None
        if where is not None:
            offset, order = where
            try:
                plane = np.memmap(path, dtype=self.dtype.newbyteorder(order), mode="r", offset=offset,
                                  shape=self.shape[1:])
            except (OSError, ValueError):  # the file changed or is shorter than its header says
                plane = None
        if plane is None:
            plane = self._decoded.pop(z, None)
            if plane is None:
                plane = _read_slice(path)
                if plane.shape != self.shape[1:] or plane.dtype != self.dtype:
                    raise InputError(f"slice of shape {plane.shape}, {plane.dtype} differs from the first slice",
                                     source=str(path))
            self._decoded[z] = plane  # most recently used last
            while sum(p.nbytes for p in self._decoded.values()) > DECODED_CACHE_BYTES and len(self._decoded) > 1:
                self._decoded.popitem(last=False)
            return plane
        self._maps[z] = plane  # a bounded set of open maps: each holds a file descriptor
        while len(self._maps) > OPEN_MAPS:
            _close_map(self._maps.popitem(last=False)[1])
        return plane

    def _read(self, index):
        first, *rest = full_index(index, 3)
        rest = tuple(rest)
        if isinstance(first, (int, np.integer)):
            z = int(first) + (self.shape[0] if first < 0 else 0)
            if not 0 <= z < self.shape[0]:
                raise IndexError(f"section {first} out of range for {self.shape[0]} sections")
            return self._section(z, rest)
        if isinstance(first, slice):
            zs = range(self.shape[0])[first]
        else:
            picks = np.asarray(first)
            picks = np.flatnonzero(picks) if picks.dtype == bool else picks.astype(np.int64).ravel()
            zs = [int(z) + (self.shape[0] if z < 0 else 0) for z in picks]
            if any(not 0 <= z < self.shape[0] for z in zs):
                raise IndexError(f"section index out of range for {self.shape[0]} sections")
        if not zs:
            return np.zeros((1,) + self.shape[1:], self.dtype)[(slice(0, 0),) + rest]
        if _whole(rest):  # whole sections: each read straight into its place in the result
            out = np.empty((len(zs),) + self.shape[1:], self.dtype)
            for i, z in enumerate(zs):
                if not self._read_plain(z, out[i]):
                    out[i] = self._plane(z)
            return out
        return np.stack([self._section(z, rest) for z in zs])

    def _section(self, z: int, rest: tuple) -> np.ndarray:
        """``rest`` of section ``z`` as a new array: the rows of a plain slice that ``rest`` spans
        are read with one call (no map), anything else is cut from the section's map or its
        decoded pixels (then copied, since maps are closed later)."""
        ry, rx = rest
        rows = (ry, ry + 1) if isinstance(ry, (int, np.integer)) else (
            ry.indices(self.shape[1])[:2] if isinstance(ry, slice) and ry.step in (None, 1) else None)
        if rows is not None and 0 <= rows[0] < rows[1] <= self.shape[1]:
            out = np.empty((rows[1] - rows[0], self.shape[2]), self.dtype)
            if self._read_plain(z, out, rows[0]):
                picked = out[0 if isinstance(ry, (int, np.integer)) else slice(None), rx]
                return picked if _whole((rx,)) else np.array(picked)
        return np.array(self._plane(z)[rest], dtype=self.dtype)

    def _head(self, z: int, size: int) -> tuple[int, bytes]:
        """The size of slice ``z``'s file and its first ``size`` bytes, read through the slice's kept
        descriptor (see :func:`~emseg.io._tiff_layout.head_layout`)."""
        try:
            fd = self._fd(z)
            return os.fstat(fd).st_size, os.pread(fd, size, 0)
        except OSError as exc:
            raise InputError(f"cannot read the slice ({exc.strerror})", source=str(self.files[z])) from None

    def _fd(self, z: int) -> int:
        """An open descriptor of slice ``z``: at most :data:`OPEN_FDS` are kept, least recently used out."""
        fd = self._fds.pop(z, None)
        if fd is None:
            fd = os.open(self.files[z], os.O_RDONLY)
            while len(self._fds) >= OPEN_FDS:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[z] = fd  # most recently used last
        return fd

    def _read_plain(self, z: int, dest: np.ndarray, first_row: int = 0) -> bool:
        """Read rows ``first_row ..`` of plain slice ``z`` into ``dest`` (C-contiguous, whole rows)
        with one read call; False where the slice is not plain or is shorter than its header says."""
        where = self._where[z]
        if where is None or z in self._maps:
            return False
        offset, order = where
        offset += first_row * self.shape[2] * self.dtype.itemsize
        view = memoryview(dest).cast("B")
        try:
            fd = self._fd(z)
            got = 0
            while got < view.nbytes:
                n = os.preadv(fd, [view[got:]], offset + got)
                if not n:
                    return False
                got += n
        except OSError:
            return False
        if dest.dtype.itemsize > 1 and np.dtype(dest.dtype).newbyteorder(order) != dest.dtype:
            dest.byteswap(inplace=True)
        return True

    def close(self) -> None:
        for plane in self._maps.values():
            _close_map(plane)
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._decoded.clear()
