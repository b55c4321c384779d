"""Lazy volume access for HDF5, zarr, OME-Zarr, TIFF, slice folders, MRC and N5; checks of an output's place."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np
import zarr

from emseg.errors import InputError
from emseg.io._files import check_output_location
from emseg.io._formats import GLOB_CHARS, MRC_SUFFIXES, TIFF_SUFFIXES, MrcVolume, N5Dataset, full_index
from emseg.io._tiff_read import SliceStack, TiffStack
from emseg.io._ome import open_ome, voxel_size_of
from emseg.runtime.locks import clean_stale_temps

H5_SUFFIXES = (".h5", ".hdf5", ".hdf")
ZARR_SUFFIX = ".zarr"
N5_SUFFIX = ".n5"
#: Formats that hold one volume per file (or folder of slices): no dataset key.
SINGLE_FORMATS = ("tif", "slices", "mrc")
#: What the formats are called in messages.
FORMAT_NAMES = {"h5": "HDF5", "zarr": "zarr", "n5": "N5", "tif": "TIFF", "slices": "slice folder", "mrc": "MRC"}


@dataclass(frozen=True)
class VolumeSpec:
    """Where a volume lives: a container file/directory and a key inside it.

    ``fmt`` is ``"h5"``, ``"zarr"``, ``"n5"`` (containers: ``key`` is the dataset path, ``""``
    for a root array), ``"tif"`` (one TIFF file), ``"slices"`` (a folder or a glob of 2D slices) or
    ``"mrc"``; the last three hold one volume and have no key.
    """

    path: Path
    key: str
    fmt: str

    def __str__(self) -> str:
        if self.fmt == "h5":
            return f"{self.path}:{self.key}"
        return f"{self.path}/{self.key}" if self.key else str(self.path)

    def sibling(self, name: str) -> "VolumeSpec":
        """The spec of a dataset called ``name`` in the same file and group.

        A single-volume format has no siblings: the spec returned names nothing that exists.
        """
        parent = self.key.rsplit("/", 1)[0] if "/" in self.key else ""
        key = f"{parent}/{name}" if parent else name
        return VolumeSpec(self.path, key, self.fmt)


def _container_split(text: str, suffix: str) -> tuple[str, str] | None:
    """``PATH{suffix}[/KEY]`` -> (PATH{suffix}, KEY), or None when ``suffix`` ends no path component."""
    idx = text.lower().find(suffix)
    while idx >= 0:
        end = idx + len(suffix)
        if end == len(text) or text[end] == "/":
            return text[:end], text[end:].strip("/")
        idx = text.lower().find(suffix, end)
    return None


def parse_spec(spec: str | VolumeSpec) -> VolumeSpec:
    """Parse a volume spec into a :class:`VolumeSpec`.

    ``PATH.h5:DATASET``, ``PATH.zarr[/ARRAY]``, ``PATH.n5/DATASET``, ``PATH.tif`` (one multi-page
    file), ``PATH.mrc``, a folder of 2D slices (``DIR/``) or a glob of them (``"DIR/*.png"``).

    Examples
    --------
    >>> parse_spec("data.h5:raw").key
    'raw'
    >>> parse_spec("out.zarr/pred/probs").key
    'pred/probs'
    >>> parse_spec("stack.n5/volumes/raw").fmt, parse_spec("stack.tif").fmt, parse_spec("s/*.png").fmt
    ('n5', 'tif', 'slices')
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
    for suffix, fmt in ((ZARR_SUFFIX, "zarr"), (N5_SUFFIX, "n5")):
        found = _container_split(text, suffix)
        if found is not None:
            return VolumeSpec(Path(found[0]), found[1], fmt)
    if any(c in text for c in GLOB_CHARS):
        return VolumeSpec(Path(text), "", "slices")
    low = text.lower().rstrip("/")
    if low.endswith(TIFF_SUFFIXES) and not Path(text).is_dir():
        return VolumeSpec(Path(text), "", "tif")
    if low.endswith(MRC_SUFFIXES) and not Path(text).is_dir():
        return VolumeSpec(Path(text), "", "mrc")
    if text.strip() and (text.endswith("/") or Path(text).is_dir()):
        return VolumeSpec(Path(text), "", "slices")
    raise InputError(
        "unknown volume format: use FILE.h5:DATASET (.hdf5/.hdf too), FILE.zarr[/ARRAY], FILE.n5/DATASET, "
        "FILE.tif, FILE.mrc, a folder of 2D slices (DIR/) or a glob (\"DIR/*.png\")",
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
        mapped = []
        for i, (a, b) in zip(full_index(index, len(self.box)), self.box):
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
    if spec.fmt in SINGLE_FORMATS and spec.key:
        if allow_missing_key:  # a sibling dataset of a one-volume file: there is none
            return None
        raise InputError(f"a {FORMAT_NAMES[spec.fmt]} volume has no datasets (got '{spec.key}')", source=str(spec.path))
    if spec.fmt == "slices":
        reader = SliceStack(str(spec.path))
        return Volume(spec, reader, reader)
    if not spec.path.exists():
        raise InputError("no such file", source=str(spec.path))
    if spec.fmt == "tif":
        reader = TiffStack(spec.path)
        return Volume(spec, reader, reader)
    if spec.fmt == "mrc":
        reader = MrcVolume(spec.path)
        return Volume(spec, reader, reader)
    if spec.fmt == "n5":
        attrs = spec.path / spec.key / "attributes.json"
        if allow_missing_key and spec.key and not attrs.is_file():
            return None
        reader = N5Dataset(spec.path, spec.key)
        return Volume(spec, reader, reader)
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
        found = open_ome(spec.path, spec.key)
        if found is not None:
            return Volume(VolumeSpec(spec.path, found[1], "zarr"), found[0])
        if allow_missing_key:
            return None
        where = f"no zarr array '{spec.key}'" if spec.key else "no zarr array at the root"
        raise InputError(f"{where} ({type(exc).__name__})", source=str(spec.path)) from None
    return Volume(spec, array)


def check_output_volume(spec: str | VolumeSpec) -> VolumeSpec:
    """Raise :class:`InputError` when ``spec`` cannot be written, before any work starts.

    The folder must exist (and be a folder); an existing HDF5 file must be readable (a truncated
    file is refused, not copied); an existing zarr path must be a folder, a TIFF path a file.
    Outputs are HDF5, zarr, OME-Zarr or TIFF.
    """
    spec = parse_spec(spec)
    if spec.fmt not in ("h5", "zarr", "tif"):
        raise InputError(f"emseg reads {FORMAT_NAMES[spec.fmt]} but writes HDF5, zarr, OME-Zarr or TIFF (.tif)",
                         source=str(spec.path))
    check_output_location(spec.path)
    if spec.path.exists():
        if spec.fmt == "tif":
            if spec.path.is_dir():
                raise InputError("is a folder, not a TIFF file", source=str(spec.path))
        elif spec.fmt == "h5":
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


def voxel_size_from_source(source: Any) -> tuple[float, ...] | None:
    """:func:`voxel_size_of` the volume spec ``source`` names, or None when it cannot be opened."""
    if not source:
        return None
    try:
        with open_volume(str(source)) as vol:
            return voxel_size_of(vol)
    except Exception:
        return None


def parse_group_spec(text: str) -> tuple[Path, str, str]:
    """``out.zarr[/GROUP]`` or ``out.h5[:GROUP]`` -> (path, group, fmt).

    Examples
    --------
    >>> parse_group_spec("pred.h5:lcs")
    (PosixPath('pred.h5'), 'lcs', 'h5')
    >>> parse_group_spec("pred.zarr")
    (PosixPath('pred.zarr'), '', 'zarr')
    """
    low = text.lower()
    for suffix in H5_SUFFIXES:
        i = low.rfind(suffix + ":")
        if i >= 0:
            return Path(text[:i + len(suffix)]), text[i + len(suffix) + 1:].strip("/"), "h5"
        if low.endswith(suffix):
            return Path(text), "", "h5"
    i = low.find(".zarr")
    while i >= 0:
        end = i + len(".zarr")
        if end == len(text) or text[end] == "/":
            return Path(text[:end]), text[end:].strip("/"), "zarr"
        i = low.find(".zarr", end)
    raise InputError("OUTPUT must be FILE.zarr[/GROUP] or FILE.h5[:GROUP]", source=text)
