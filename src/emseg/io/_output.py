"""Output containers: one array (:func:`create_volume`) or a group of arrays (:func:`open_output_group`).

Both follow the protocol of :class:`emseg.io._store.StagedOutput`: written under a temporary
name, published by one rename on ``commit()`` (or on leaving a ``with`` block normally), thrown
away by ``discard()``. HDF5, zarr and OME-Zarr (``.ome.zarr``, :mod:`emseg.io.ome`) alike.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import h5py
import numpy as np
import zarr

from emseg.errors import InputError
from emseg.io._claim import claim_output
from emseg.io._ome import is_ome_path, voxel_size_of
from emseg.io._ome_write import OmeOutputGroup, OmeOutputVolume, is_channel_first
from emseg.io._tiff_write import TiffOutputVolume
from emseg.io._store import StagedArray, StagedOutput, auto_chunks, replace_output, staging_tag, zarr_compressors
from emseg.io._volume import (VolumeSpec, check_output_volume, clean_output_temps, parse_group_spec, parse_spec,
                              voxel_size_from_source)

__all__ = ["OutputGroup", "OutputVolume", "create_volume", "open_output_group", "parse_group_spec"]


class OutputVolume(StagedArray):
    """One HDF5 or zarr array being written under a temporary name; renamed into place by :meth:`commit`.

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

    def commit(self) -> None:
        if self.committed:
            return
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        replace_output(self._tmp, self._final)
        self.committed = True
        self.release_claim()

    def discard(self) -> None:
        try:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
        finally:
            if self._tmp.is_dir():
                shutil.rmtree(self._tmp, ignore_errors=True)
            else:
                self._tmp.unlink(missing_ok=True)
            if self._created_root is not None:
                shutil.rmtree(self._created_root, ignore_errors=True)
            self.release_claim()


def create_volume(
    spec: str | VolumeSpec,
    shape: Iterable[int],
    dtype,
    *,
    chunks: Iterable[int] | None = None,
    attrs: dict | None = None,
    fill_value=0,
    overwrite: bool = False,
    claim: bool = True,
) -> OutputVolume:
    """Create a chunked, compressed output volume under a temporary name.

    The data become visible at ``spec`` only on :meth:`OutputVolume.commit` (or on leaving the
    ``with`` block without an exception). For HDF5 the other datasets of an existing file are kept.
    A path ending in ``.ome.zarr`` is written as OME-Zarr 0.5 with a pyramid (:mod:`emseg.io.ome`),
    one ending in ``.tif`` as an uncompressed ImageJ hyperstack (:mod:`emseg.io._tiff_write`; no
    chunks, no compression). Channel-first data (probabilities) are recognised from ``attrs``
    (``output_type = "probabilities"``) or a 4D float shape.

    The output's container is locked to this writer until commit or discard
    (:func:`emseg.io.claim_output`), and an existing dataset or array at ``spec`` is refused unless
    ``overwrite``. ``claim=False`` neither locks nor checks (for arrays inside a staged group).
    """
    spec = parse_spec(spec)
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    chunks = tuple(chunks) if chunks is not None else auto_chunks(shape, dtype.itemsize)
    chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
    if any(s < 1 for s in shape):
        raise InputError(f"cannot write an empty volume of shape {shape}", source=str(spec))
    check_output_volume(spec)
    lock = claim_output(spec, overwrite=overwrite) if claim else None
    tag, had_store = staging_tag(), spec.path.exists()
    try:
        volume = _create(spec, shape, dtype, chunks, attrs, fill_value, tag)
    except BaseException:  # also Ctrl-C while the temporary copy is made: no temp is left behind
        _remove_temps(spec, tag, had_store)
        if lock is not None:
            lock.release()
        raise
    volume.claim = lock
    return volume


def _remove_temps(spec: VolumeSpec, tag: str, had_store: bool) -> None:
    """Remove what :func:`_create` made under ``tag`` (and a zarr store it created) after a failure."""
    parent_key, _, name = spec.key.rpartition("/")
    temps = [spec.path.with_name(f".{spec.path.name}.{tag}")]
    if spec.fmt == "zarr" and spec.key:
        temps.append((spec.path / parent_key if parent_key else spec.path) / f".{name}.{tag}")
    if spec.fmt == "zarr" and not had_store:
        temps.append(spec.path)
    for tmp in temps:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _create(spec: VolumeSpec, shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...],
            attrs: dict | None, fill_value, tag: str) -> Any:
    clean_output_temps(spec)
    if spec.fmt == "zarr" and is_ome_path(spec.path):
        return OmeOutputVolume(spec, shape, dtype, chunks=chunks, attrs=attrs)
    if spec.fmt == "tif":
        attrs = dict(attrs or {})
        voxel = attrs.get("voxel_size_nm") or voxel_size_from_source(attrs.get("source") or attrs.get("noise_source"))
        return TiffOutputVolume(spec.path, spec.path.with_name(f".{spec.path.name}.{tag}"), shape, dtype,
                                channels=is_channel_first(shape, dtype, attrs), voxel_size=voxel, attrs=attrs)
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


# --------------------------------------------------------------------------- groups of arrays


class OutputGroup(StagedOutput):
    """Several arrays written together and published at once (``OUT.zarr[/GROUP]``, ``OUT.h5[:GROUP]``).

    zarr: the group is built in a hidden sibling folder (arrays made with
    :func:`emseg.io.create_volume`) and renamed into place; ``out.zarr`` without a group is replaced
    whole. HDF5: the file is copied to a hidden temporary file, the datasets are (re)created there
    (gzip, chunked like :func:`emseg.io.create_volume`) and the file renamed into place; other
    datasets of the file are kept.
    """

    def __init__(self, output: str):
        self.path, self.group, self.fmt = parse_group_spec(output)
        if not self.path.parent.exists():
            raise InputError("output folder does not exist", source=str(self.path.parent))
        tag = staging_tag()
        self.arrays: dict[str, Any] = {}
        self._volumes: list[Any] = []
        if self.fmt == "zarr":
            if self.group:
                try:
                    root = zarr.open_group(store=str(self.path), mode="a")
                    parent, _, name = self.group.rpartition("/")
                    if parent:
                        root.require_group(parent)
                except Exception as exc:
                    raise InputError(f"cannot open as a zarr group ({type(exc).__name__})",
                                     source=str(self.path)) from None
                self.final = self.path / self.group
            else:
                self.final = self.path
            self.tmp = self.final.with_name(f".{self.final.name}.{tag}")
            zarr.open_group(store=str(self.tmp), mode="w")
        else:
            self.final = self.path
            self.tmp = self.path.with_name(f".{self.path.name}.{tag}")
            if self.path.exists():
                shutil.copyfile(self.path, self.tmp)
            try:
                self._h5 = h5py.File(self.tmp, "a")
            except OSError as exc:
                self.tmp.unlink(missing_ok=True)
                raise InputError(f"not a writable HDF5 file ({exc})", source=str(self.path)) from None
            try:
                self._root = self._h5.require_group(self.group) if self.group else self._h5
            except TypeError:  # a dataset of that name is in the way
                self._h5.close()
                self.tmp.unlink(missing_ok=True)
                raise InputError(f"'{self.group}' exists and is not a group", source=str(self.path)) from None

    def create(self, name: str, shape: Sequence[int], dtype, attrs: dict[str, Any] | None = None):
        """Create array ``name`` in the group; returns something sliceable for writing."""
        dtype = np.dtype(dtype)
        chunks = auto_chunks(shape, dtype.itemsize)
        if self.fmt == "zarr":
            vol = create_volume(VolumeSpec(self.tmp, name, "zarr"), shape, dtype, chunks=chunks, attrs=attrs,
                                claim=False)
            self._volumes.append(vol)
            self.arrays[name] = vol
            return vol
        if name in self._root:
            del self._root[name]
        ds = self._root.create_dataset(name, shape=tuple(shape), dtype=dtype, chunks=chunks, compression="gzip",
                                       compression_opts=4, shuffle=dtype.itemsize > 1)
        for k, v in (attrs or {}).items():
            ds.attrs[k] = v
        self.arrays[name] = ds
        return ds

    def spec(self, name: str) -> str:
        """Where array ``name`` will be readable after commit."""
        if self.fmt == "zarr":
            return f"{self.path}/{self.group}/{name}" if self.group else f"{self.path}/{name}"
        return f"{self.path}:{self.group}/{name}" if self.group else f"{self.path}:{name}"

    def commit(self) -> None:
        if self.fmt == "zarr":
            for vol in self._volumes:
                vol.commit()
        else:
            self._h5.close()
        replace_output(self.tmp, self.final)
        self.release_claim()

    def discard(self) -> None:
        try:
            if self.fmt == "zarr":
                for vol in self._volumes:
                    vol.discard()
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:
                try:
                    self._h5.close()
                finally:
                    self.tmp.unlink(missing_ok=True)
        finally:
            self.release_claim()


def open_output_group(output: str, source: Any = None, *, overwrite: bool = False) -> Any:
    """:class:`OutputGroup`, or for ``OUT.ome.zarr`` an OME-Zarr image of the probabilities (channels)
    with the label map under ``labels/`` (:class:`emseg.io.ome.OmeOutputGroup`), scaled like ``source``.

    The output is locked to this writer until commit or discard, and an existing group (or file or
    store, without a group) is refused unless ``overwrite`` (:func:`emseg.io.claim_output`).
    """
    path, group, fmt = parse_group_spec(output)
    if fmt == "zarr" and is_ome_path(path) and group:
        raise InputError("an OME-Zarr output is the whole store: write OUT.ome.zarr", source=output)
    if not path.parent.exists():
        raise InputError("output folder does not exist", source=str(path.parent))
    lock = claim_output(output, overwrite=overwrite, kind="group")
    try:
        if fmt == "zarr" and is_ome_path(path):
            out = OmeOutputGroup(path, voxel_size=voxel_size_of(source) if source is not None else None)
        else:
            out = OutputGroup(output)
    except BaseException:
        lock.release()
        raise
    out.claim = lock
    return out
