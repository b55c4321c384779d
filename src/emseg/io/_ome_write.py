"""Writing OME-Zarr 0.5 stores atomically: one image (or label image), its labels, their pyramids."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import zarr

from emseg.errors import InputError
from emseg.io._ome import (
    OME_VERSION,
    _axes,
    _blocks,
    _create,
    build_multiscale,
    factors_of,
    multiscales_of,
    voxel_size_of,
)
from emseg.io._files import check_output_location, json_safe
from emseg.io._store import StagedArray, StagedOutput, auto_chunks, replace_output, staging_tag
from emseg.io._volume import voxel_size_from_source



class OmeStore(StagedOutput):
    """An OME-Zarr store built under a hidden temporary name and renamed into place on commit.

    ``image()`` makes level 0 of the root image (``channel``: the first axis is ``c``);
    ``channel()`` adds one channel of it at a time (stacked on commit); ``label()`` adds a label
    image under ``labels/`` (or, with ``root=True`` and no image, the root is the label image).
    :meth:`commit` computes the pyramids and the metadata, then publishes the store at once.
    """

    def __init__(self, final: Path, *, voxel_size: Sequence[float] | None = None):
        self.final = Path(final)
        self.tmp = self.final.with_name(f".{self.final.name}.{staging_tag()}")
        self.voxel_size = tuple(voxel_size) if voxel_size else None
        zarr.open_group(store=str(self.tmp), mode="w", zarr_format=3)
        self._image: tuple[Any, bool] | None = None  # (level-0 array, channel axis)
        self._channels: list[tuple[str, Any]] = []
        self._labels: list[tuple[str, Any]] = []
        self._root_label: Any = None

    def image(self, shape, dtype, *, channel: bool, chunks=None, attrs: dict | None = None):

        dtype = np.dtype(dtype)
        chunks = chunks or auto_chunks(shape, dtype.itemsize)
        names = [a["name"] for a in _axes(len(shape), channel, False)]
        arr = _create(self.tmp, "0", shape, dtype, chunks, names)
        arr.attrs.update(_flat(attrs))
        self._image = (arr, channel)
        return arr

    def channel(self, name: str, shape, dtype, attrs: dict | None = None):
        """A spatial array that becomes channel ``len(channels)`` of the image on commit."""

        dtype = np.dtype(dtype)
        arr = _create(self.tmp, f".channel-{len(self._channels)}", shape, dtype,
                      auto_chunks(shape, dtype.itemsize), ["z", "y", "x"][3 - len(shape):])
        arr.attrs.update(_flat(attrs))
        self._channels.append((name, arr))
        return arr

    def label(self, name: str, shape, dtype, *, root: bool = False, chunks=None, attrs: dict | None = None):

        dtype = np.dtype(dtype)
        if dtype.kind not in "biu":
            raise InputError(f"OME-Zarr labels must be integers, got {dtype}", source=str(self.final))
        chunks = chunks or auto_chunks(shape, dtype.itemsize)
        names = [a["name"] for a in _axes(len(shape), False, False)]
        where = self.tmp if root else self.tmp / "labels" / name
        if not root:
            zarr.open_group(store=str(where), mode="w", zarr_format=3)
        arr = _create(where, "0", shape, dtype, chunks, names)
        arr.attrs.update(_flat(attrs))
        if root:
            self._root_label = arr
        else:
            self._labels.append((name, arr))
        return arr

    def _stack_channels(self) -> None:
        first = self._channels[0][1]
        shape = (len(self._channels),) + tuple(first.shape)
        attrs = dict(first.attrs, channels=[n for n, _ in self._channels])
        image = self.image(shape, first.dtype, channel=True, chunks=(1,) + tuple(first.chunks), attrs=attrs)
        for c, (_, arr) in enumerate(self._channels):
            for box in _blocks(arr.shape, arr.chunks):
                image[(c,) + box] = np.asarray(arr[box])
            shutil.rmtree(self.tmp / f".channel-{c}", ignore_errors=True)

    def commit(self) -> None:

        if self._channels:
            self._stack_channels()
        factors = None
        if self._root_label is not None:
            build_multiscale(self.tmp, self._root_label, channel=False, labels=True, voxel_size=self.voxel_size,
                             name=self.final.name)
        elif self._image is not None:
            arr, channel = self._image
            ome = build_multiscale(self.tmp, arr, channel=channel, labels=False, voxel_size=self.voxel_size,
                                   name=self.final.name)
            factors = factors_of_attrs(ome)
        for name, arr in self._labels:
            build_multiscale(self.tmp / "labels" / name, arr, channel=False, labels=True,
                             voxel_size=self.voxel_size, factors=factors, name=name)
            _add_image_source(self.tmp / "labels" / name)
        if self._labels:
            write_labels_list(self.tmp / "labels", [n for n, _ in self._labels])
        replace_output(self.tmp, self.final)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _flat(attrs: dict | None) -> dict:
    return json_safe({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in (attrs or {}).items()})


def factors_of_attrs(ome: dict) -> list[tuple[int, ...]]:
    """Spatial level-to-level factors from ``ome`` attributes (see :func:`factors_of`)."""
    class _G:
        attrs = {"ome": ome}
    return factors_of(_G(), source="")


def _add_image_source(label_group: Path) -> None:
    group = zarr.open_group(store=str(label_group), mode="a", zarr_format=3)
    attrs = dict(group.attrs)
    attrs["ome"]["image-label"]["source"] = {"image": "../../"}
    group.attrs.update(attrs)


def write_labels_list(labels_group: Path, names: Iterable[str]) -> None:
    """Add ``names`` to the ``labels`` list of the ``labels/`` group (created when missing)."""
    group = zarr.open_group(store=str(labels_group), mode="a", zarr_format=3)
    attrs = dict(group.attrs)
    ome = dict(attrs.get("ome") or {"version": OME_VERSION})
    ome["labels"] = list(dict.fromkeys(list(ome.get("labels", [])) + list(names)))
    attrs["ome"] = ome
    group.attrs.update(attrs)


def is_channel_first(shape: Sequence[int], dtype: np.dtype, attrs: dict | None) -> bool:
    """Whether an output's first axis is channels: probabilities (float, or uint8 scaled to 0-255)."""
    attrs = attrs or {}
    if attrs.get("output_type") == "probabilities":
        return True
    if np.dtype(dtype).kind in "biu":
        return False
    return len(shape) == 4 or "n_classes" in attrs


class _OmeStagedOutput(StagedOutput):
    """An output written through one :class:`OmeStore` (``self.store``): commit publishes it
    (:meth:`_publish`), discard removes its temporary tree; both release the writer lock."""

    store: OmeStore

    def _publish(self) -> None:
        self.store.commit()

    def commit(self) -> None:
        self._publish()
        self.release_claim()

    def discard(self) -> None:
        try:
            self.store.discard()
        finally:
            self.release_claim()


class OmeOutputVolume(_OmeStagedOutput, StagedArray):
    """What :func:`emseg.io.create_volume` returns for an ``.ome.zarr`` output: one image or label
    image (root), or one label image added to an existing image (``OUT.ome.zarr/labels/NAME``)."""

    def __init__(self, spec: Any, shape, dtype, *, chunks=None, attrs: dict | None = None):
        self.spec = spec
        attrs = dict(attrs or {})
        dtype = np.dtype(dtype)
        voxel = attrs.get("voxel_size_nm")
        voxel = tuple(float(v) for v in np.atleast_1d(voxel)) if voxel is not None else voxel_size_from_source(
            attrs.get("source") or attrs.get("noise_source"))
        self.committed = False
        self._label_target: tuple[Path, str, list] | None = None
        parts = [p for p in spec.key.split("/") if p]
        if not parts:
            self.store = OmeStore(spec.path, voxel_size=voxel)
            channel = is_channel_first(shape, dtype, attrs)
            if dtype.kind in "biu" and not channel:
                self.array = self.store.label(spec.path.name, shape, dtype, root=True, chunks=chunks, attrs=attrs)
            else:
                self.array = self.store.image(shape, dtype, channel=channel,
                                               chunks=chunks, attrs=attrs)
            return
        if len(parts) != 2 or parts[0] != "labels":
            raise InputError("an OME-Zarr output is OUT.ome.zarr or OUT.ome.zarr/labels/NAME", source=str(spec))
        if dtype.kind not in "biu":
            raise InputError(f"OME-Zarr labels must be integers, got {dtype}", source=str(spec))
        try:
            image = zarr.open_group(store=str(spec.path), mode="r")
        except Exception:
            raise InputError("labels/NAME needs an existing OME-Zarr image to attach to", source=str(spec.path)) \
                from None
        ms = multiscales_of(image, source=str(spec.path))
        level0 = image[str(ms["datasets"][0]["path"])]
        space = [i for i, ax in enumerate(ms["axes"]) if ax.get("type") == "space"]
        want = tuple(level0.shape[i] for i in space)
        if tuple(shape) != want:
            raise InputError(f"labels of shape {tuple(shape)} do not fit the image's spatial shape {want}",
                             source=str(spec))
        image_voxel = voxel_size_of(type("V", (), {"array": level0, "spec": type(spec)(
            spec.path, str(ms["datasets"][0]["path"]), "zarr")})())
        labels_dir = spec.path / "labels"
        zarr.open_group(store=str(labels_dir), mode="a", zarr_format=3)
        self.store = OmeStore(labels_dir / parts[1], voxel_size=image_voxel or voxel)
        self.array = self.store.label(parts[1], shape, dtype, root=True, chunks=chunks, attrs=attrs)
        self._label_target = (labels_dir, parts[1], factors_of(image, source=str(spec.path)))

    def _publish(self) -> None:
        if self.committed:
            return
        store = self.store
        if self._label_target is None:
            store.commit()
        else:
            labels_dir, name, factors = self._label_target
            build_multiscale(store.tmp, self.array, channel=False, labels=True, voxel_size=store.voxel_size,
                             factors=factors, name=name)
            _add_image_source(store.tmp)
            replace_output(store.tmp, store.final)
            write_labels_list(labels_dir, [name])
        self.committed = True


class OmeOutputGroup(_OmeStagedOutput):
    """The ``emseg lcs infer`` output container as OME-Zarr: float arrays become the channels of
    the root image (in creation order), integer arrays label images under ``labels/``."""

    def __init__(self, path: Path, *, voxel_size: Sequence[float] | None = None):
        check_output_location(path)
        self.path = Path(path)
        self.store = OmeStore(self.path, voxel_size=voxel_size)
        self.arrays: dict[str, Any] = {}
        self._channel: dict[str, int] = {}

    def create(self, name: str, shape, dtype, attrs: dict | None = None):
        dtype = np.dtype(dtype)
        if dtype.kind in "biu":
            arr = self.store.label(name, shape, dtype, attrs=attrs)
        else:
            self._channel[name] = len(self._channel)
            arr = self.store.channel(name, shape, dtype, attrs=attrs)
        self.arrays[name] = arr
        return arr

    def spec(self, name: str) -> str:
        """Where ``name`` is readable after commit (a channel: the image level 0, channel index)."""
        if name in self._channel:
            return f"{self.path}/0 (channel {self._channel[name]})"
        return f"{self.path}/labels/{name}"


def write_ome(path: str | Path, *, image: Any = None, channel: bool = False, labels: dict[str, Any] | None = None,
              voxel_size: Sequence[float] | None = None, attrs: dict | None = None) -> Path:
    """Write arrays (numpy or lazy volumes) as an OME-Zarr store at ``path``, copying blockwise.

    Examples
    --------
    >>> write_ome("seg.ome.zarr", image=probs, channel=True, labels={"seg": mask})  # doctest: +SKIP
    """
    path = Path(path)
    store = OmeStore(path, voxel_size=voxel_size)
    try:
        pairs = []
        if image is not None:
            pairs.append((store.image(image.shape, image.dtype, channel=channel, attrs=attrs), image))
        for name, arr in (labels or {}).items():
            dtype = np.dtype(arr.dtype)
            dtype = np.dtype(np.uint8) if dtype.kind == "b" else dtype
            pairs.append((store.label(name, arr.shape, dtype, root=image is None, attrs=attrs), arr))
        for dst, src in pairs:
            for box in _blocks(dst.shape, dst.chunks):
                dst[box] = np.asarray(src[box]).astype(dst.dtype)
        store.commit()
    except BaseException:
        store.discard()
        raise
    return path
