"""Lazy volume access and atomic output for HDF5 and zarr."""
from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np
import zarr

from emseg.errors import InputError
from emseg.io._files import check_output_location
from emseg.locks import clean_stale_temps

H5_SUFFIXES = (".h5", ".hdf5", ".hdf")
ZARR_SUFFIX = ".zarr"


@dataclass(frozen=True)
class VolumeSpec:
    """Where a volume lives: a container file/directory and a key inside it.

    ``fmt`` is ``"h5"`` or ``"zarr"``; ``key`` is the dataset path (``""`` for a zarr root array).
    """

    path: Path
    key: str
    fmt: str

    def __str__(self) -> str:
        if self.fmt == "h5":
            return f"{self.path}:{self.key}"
        return f"{self.path}/{self.key}" if self.key else str(self.path)

    def sibling(self, name: str) -> "VolumeSpec":
        """The spec of a dataset called ``name`` in the same file and group."""
        parent = self.key.rsplit("/", 1)[0] if "/" in self.key else ""
        key = f"{parent}/{name}" if parent else name
        return VolumeSpec(self.path, key, self.fmt)


def parse_spec(spec: str | VolumeSpec) -> VolumeSpec:
    """Parse ``PATH.h5:DATASET`` or ``PATH.zarr[/ARRAY]`` into a :class:`VolumeSpec`.

    Examples
    --------
    >>> parse_spec("data.h5:raw").key
    'raw'
    >>> parse_spec("out.zarr/pred/probs").key
    'pred/probs'
    """
    if isinstance(spec, VolumeSpec):
        return spec
    text = str(spec)
    for suffix in H5_SUFFIXES:
        marker = suffix + ":"
        idx = text.lower().rfind(marker)
        if idx >= 0:
            path, key = text[: idx + len(suffix)], text[idx + len(marker):].strip("/")
            if not key:
                raise InputError("no dataset given (write FILE.h5:DATASET)", source=text)
            return VolumeSpec(Path(path), key, "h5")
        if text.lower().endswith(suffix):
            raise InputError("no dataset given (write FILE.h5:DATASET)", source=text)
    idx = text.lower().find(ZARR_SUFFIX)
    while idx >= 0:
        end = idx + len(ZARR_SUFFIX)
        if end == len(text) or text[end] == "/":
            return VolumeSpec(Path(text[:end]), text[end:].strip("/"), "zarr")
        idx = text.lower().find(ZARR_SUFFIX, end)
    raise InputError(
        "unknown volume format: use FILE.h5:DATASET (.hdf5/.hdf too) or FILE.zarr[/ARRAY]",
        source=text,
    )


def check_distinct(input_spec: str | VolumeSpec, output_spec: str | VolumeSpec) -> None:
    """Raise :class:`InputError` when writing ``output_spec`` would replace ``input_spec``.

    That is the case when both name the same container and the output key equals the input key
    or is a group (or zarr root) holding it.

    Examples
    --------
    >>> check_distinct("a.h5:raw", "a.h5:pred")
    >>> check_distinct("a.zarr/raw", "a.zarr")
    Traceback (most recent call last):
    ...
    emseg.errors.InputError: a.zarr: the output would overwrite the input a.zarr/raw
    """
    src, dst = parse_spec(input_spec), parse_spec(output_spec)
    if src.fmt != dst.fmt or src.path.resolve() != dst.path.resolve():
        return
    if not dst.key or src.key == dst.key or src.key.startswith(dst.key + "/"):
        raise InputError(f"the output would overwrite the input {src}", source=str(dst))


class Volume:
    """A lazily read volume: slicing reads only the requested region from disk.

    Use as a context manager or call :meth:`close`. ``array`` is the underlying h5py dataset or
    zarr array.
    """

    def __init__(self, spec: VolumeSpec, array: Any, handle: Any = None):
        self.spec = spec
        self.array = array
        self._handle = handle

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def chunks(self) -> tuple[int, ...] | None:
        chunks = getattr(self.array, "chunks", None)
        return tuple(chunks) if chunks else None

    @property
    def attrs(self) -> dict:
        return dict(self.array.attrs)

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self.array[index])

    def __array__(self, dtype=None, copy=None):
        data = np.asarray(self.array[...])
        return data.astype(dtype) if dtype is not None else data

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Volume({str(self.spec)!r}, shape={self.shape}, dtype={self.dtype})"


class VolumeRegion:
    """A box inside a volume, sliced like a volume of the box's shape (reads stay lazy).

    ``region`` gives (start, stop) per leading axis; missing axes are taken whole.

    Examples
    --------
    >>> import numpy as np
    >>> view = VolumeRegion(np.arange(20).reshape(4, 5), [(1, 3)])
    >>> view.shape, view[0, :2].tolist()
    ((2, 5), [5, 6])
    """

    def __init__(self, volume: Any, region: Iterable[Iterable[int]], source: str = ""):
        full = tuple(int(s) for s in volume.shape)
        box = [tuple(int(v) for v in r) for r in region]
        if len(box) > len(full):
            raise InputError(f"region has {len(box)} axes, the volume {len(full)}", source=source)
        box += [(0, s) for s in full[len(box):]]
        for (a, b), s in zip(box, full):
            if not 0 <= a < b <= s:
                raise InputError(f"region {box} does not fit the volume shape {full}", source=source)
        self.volume = volume
        self.box = tuple(box)
        self.spec = getattr(volume, "spec", source)
        self.dtype = np.dtype(volume.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.box)

    @property
    def ndim(self) -> int:
        return len(self.box)

    def __getitem__(self, index) -> np.ndarray:
        if not isinstance(index, tuple):
            index = (index,)
        if any(i is Ellipsis for i in index):
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (len(self.box) - len(index) + 1) + index[at + 1:]
        index = index + (slice(None),) * (len(self.box) - len(index))
        mapped = []
        for i, (a, b) in zip(index, self.box):
            if isinstance(i, slice):
                start, stop, step = i.indices(b - a)
                mapped.append(slice(a + start, a + stop, step))
            else:
                i = int(i)
                mapped.append(a + (i if i >= 0 else (b - a) + i))
        return np.asarray(self.volume[tuple(mapped)])

    def close(self) -> None:
        if hasattr(self.volume, "close"):
            self.volume.close()


def _h5_keys(group: h5py.Group) -> list[str]:
    names: list[str] = []
    group.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


def open_volume(spec: str | VolumeSpec, *, allow_missing_key: bool = False) -> Volume | None:
    """Open a volume lazily for reading.

    Raises :class:`~emseg.errors.InputError` naming the file and dataset when either is missing.
    With ``allow_missing_key`` a missing dataset returns ``None`` instead (the file must exist).

    Examples
    --------
    >>> with open_volume("data.h5:raw") as vol:  # doctest: +SKIP
    ...     block = vol[0:1, :256, :256]
    """
    spec = parse_spec(spec)
    if not spec.path.exists():
        raise InputError("no such file", source=str(spec.path))
    if spec.fmt == "h5":
        try:
            handle = h5py.File(spec.path, "r")
        except OSError as exc:
            raise InputError(f"not a readable HDF5 file ({exc})", source=str(spec.path)) from None
        obj = handle.get(spec.key)
        if not isinstance(obj, h5py.Dataset):
            names = _h5_keys(handle)
            handle.close()
            if allow_missing_key:
                return None
            listing = ", ".join(names[:10]) or "none"
            raise InputError(f"no dataset '{spec.key}' (datasets: {listing})", source=str(spec.path))
        return Volume(spec, obj, handle)
    try:
        array = zarr.open_array(store=str(spec.path), path=spec.key or None, mode="r")
    except Exception as exc:  # zarr raises several types for a missing node
        from emseg.io.ome import open_ome  # an OME-Zarr image (or one of its levels)

        found = open_ome(spec.path, spec.key)
        if found is not None:
            return Volume(VolumeSpec(spec.path, found[1], "zarr"), found[0])
        if allow_missing_key:
            return None
        where = f"no zarr array '{spec.key}'" if spec.key else "no zarr array at the root"
        raise InputError(f"{where} ({type(exc).__name__})", source=str(spec.path)) from None
    return Volume(spec, array)


def auto_chunks(shape: Iterable[int], itemsize: int, target_bytes: int = 1 << 20) -> tuple[int, ...]:
    """Chunk shape of about ``target_bytes``: whole trailing (in-plane) axes first, then sections.

    Leading axes (channels, z) get chunk 1 until the trailing axes fill the budget.
    """
    shape = tuple(int(s) for s in shape)
    budget = max(1, target_bytes // max(1, itemsize))
    chunks = [1] * len(shape)
    # Fill from the last axis backwards, keeping in-plane chunks square-ish.
    if len(shape) >= 2:
        side = int(math.sqrt(budget))
        chunks[-1] = min(shape[-1], side)
        chunks[-2] = min(shape[-2], max(1, budget // chunks[-1]))
        remaining = budget // (chunks[-1] * chunks[-2])
        for ax in range(len(shape) - 3, -1, -1):
            chunks[ax] = max(1, min(shape[ax], remaining))
            remaining = max(1, remaining // chunks[ax])
    else:
        chunks[0] = min(shape[0], budget)
    return tuple(max(1, c) for c in chunks)


def replace_output(tmp: Path, final: Path) -> None:
    """Move ``tmp`` (file or directory) onto ``final``, replacing what was there.

    A file is replaced atomically. A directory is swapped with two renames, so a reader sees either
    the old or the new tree, never a half-written one.
    """
    tmp, final = Path(tmp), Path(final)
    if tmp.is_dir() and final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(tmp, final)


class OutputVolume:
    """A volume being written under a temporary name; renamed into place by :meth:`commit`.

    Use as a context manager: leaving the block normally commits, an exception discards the
    temporary data and leaves any previous output untouched.
    """

    def __init__(self, spec: VolumeSpec, array: Any, tmp: Path, final: Path, handle: Any = None,
                 created_root: Path | None = None):
        self.spec = spec
        self.array = array
        self._tmp = tmp
        self._final = final
        self._handle = handle
        self._created_root = created_root  # a zarr store made for this output, removed on discard
        self.committed = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def attrs(self):
        return self.array.attrs

    def __setitem__(self, index, value) -> None:
        self.array[index] = value

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self.array[index])

    def commit(self) -> None:
        if self.committed:
            return
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        replace_output(self._tmp, self._final)
        self.committed = True

    def discard(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._tmp.is_dir():
            shutil.rmtree(self._tmp, ignore_errors=True)
        else:
            self._tmp.unlink(missing_ok=True)
        if self._created_root is not None:
            shutil.rmtree(self._created_root, ignore_errors=True)

    def __enter__(self) -> "OutputVolume":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def zarr_compressors(dtype: np.dtype) -> list:
    """The codecs of every zarr output: blosc zstd, bit-shuffled for bytes, byte-shuffled otherwise."""
    shuffle = "bitshuffle" if dtype.itemsize == 1 else "shuffle"
    return [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle=shuffle)]


def check_output_volume(spec: str | VolumeSpec) -> VolumeSpec:
    """Raise :class:`InputError` when ``spec`` cannot be written, before any work starts.

    The folder must exist (and be a folder); an existing HDF5 file must be readable (a truncated
    file is refused, not copied); an existing zarr path must be a folder.
    """
    spec = parse_spec(spec)
    check_output_location(spec.path)
    if spec.path.exists():
        if spec.fmt == "h5":
            if spec.path.is_dir():
                raise InputError("is a folder, not an HDF5 file", source=str(spec.path))
            try:
                with h5py.File(spec.path, "r"):
                    pass
            except OSError as exc:
                reason = str(exc).split("(")[0].strip() or type(exc).__name__
                raise InputError(f"exists but is not a readable HDF5 file ({reason}); delete it or choose "
                                 f"another output", source=str(spec.path)) from None
        elif not spec.path.is_dir():
            raise InputError("exists and is not a zarr folder", source=str(spec.path))
    return spec


def clean_output_temps(spec: str | VolumeSpec) -> None:
    """Remove temp copies of ``spec`` left by dead runs (``.NAME.tmp-PID-*`` whose PID is gone)."""
    spec = parse_spec(spec)
    clean_stale_temps(spec.path.parent, [spec.path.name])
    if spec.fmt == "zarr" and spec.key and spec.path.is_dir():
        parent_key, _, name = spec.key.rpartition("/")
        clean_stale_temps(spec.path / parent_key if parent_key else spec.path, [name])


def create_volume(
    spec: str | VolumeSpec,
    shape: Iterable[int],
    dtype,
    *,
    chunks: Iterable[int] | None = None,
    attrs: dict | None = None,
    fill_value=0,
) -> OutputVolume:
    """Create a chunked, compressed output volume under a temporary name.

    The data become visible at ``spec`` only on :meth:`OutputVolume.commit` (or on leaving the
    ``with`` block without an exception). For HDF5 the other datasets of an existing file are kept.
    A path ending in ``.ome.zarr`` is written as OME-Zarr 0.5 with a pyramid (:mod:`emseg.io.ome`).
    """
    from emseg.io.ome import OmeOutputVolume, is_ome_path

    spec = parse_spec(spec)
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    chunks = tuple(chunks) if chunks is not None else auto_chunks(shape, dtype.itemsize)
    chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
    if any(s < 1 for s in shape):
        raise InputError(f"cannot write an empty volume of shape {shape}", source=str(spec))
    tag = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    check_output_volume(spec)
    clean_output_temps(spec)
    if spec.fmt == "zarr" and is_ome_path(spec.path):
        return OmeOutputVolume(spec, shape, dtype, chunks=chunks, attrs=attrs)
    if spec.fmt == "h5":
        final = spec.path
        tmp = final.with_name(f".{final.name}.{tag}")
        try:
            if final.exists():
                shutil.copyfile(final, tmp)
            handle = h5py.File(tmp, "a")
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise InputError(f"cannot write the HDF5 output ({exc})", source=str(final)) from None
        try:
            if spec.key in handle:
                del handle[spec.key]
            array = handle.create_dataset(
                spec.key, shape=shape, dtype=dtype, chunks=chunks, compression="gzip",
                compression_opts=4, shuffle=dtype.itemsize > 1, fillvalue=fill_value,
            )
            for k, v in (attrs or {}).items():
                array.attrs[k] = v
        except (OSError, ValueError, TypeError) as exc:
            handle.close()
            tmp.unlink(missing_ok=True)
            raise InputError(f"cannot create dataset '{spec.key}' ({exc})", source=str(final)) from None
        return OutputVolume(spec, array, tmp, final, handle)
    if spec.key:
        created_root = None if spec.path.exists() else spec.path
        root = zarr.open_group(store=str(spec.path), mode="a")
        parent_key, _, name = spec.key.rpartition("/")
        if parent_key:
            root.require_group(parent_key)
        final = spec.path / spec.key
        tmp_key = f"{parent_key}/.{name}.{tag}" if parent_key else f".{name}.{tag}"
        array = zarr.create_array(
            store=str(spec.path), name=tmp_key, shape=shape, dtype=dtype, chunks=chunks,
            compressors=zarr_compressors(dtype), fill_value=fill_value, attributes=attrs or {},
        )
        tmp = spec.path / tmp_key
        return OutputVolume(spec, array, tmp, final, created_root=created_root)
    else:
        final = spec.path
        tmp = final.with_name(f".{final.name}.{tag}")
        array = zarr.create_array(
            store=str(tmp), shape=shape, dtype=dtype, chunks=chunks,
            compressors=zarr_compressors(dtype), fill_value=fill_value, attributes=attrs or {},
        )
    return OutputVolume(spec, array, tmp, final)
