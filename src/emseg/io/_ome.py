"""OME-Zarr 0.5 metadata, reading a level lazily, and the blockwise down-sampled pyramid (see
:mod:`emseg.io.ome`)."""
from __future__ import annotations

import itertools
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import h5py
import numpy as np
import zarr

from emseg.errors import InputError
from emseg.io._store import zarr_compressors

OME_VERSION = "0.5"
OME_SUFFIX = ".ome.zarr"
#: Pyramid levels are added while every down-sampled in-plane side stays at least this long.
MIN_LEVEL_SIDE = 32
MAX_LEVELS = 6
#: Voxels of the output block computed at once when building a level.
BLOCK_VOXELS = 1 << 22
_UNITS_NM = {"nanometer": 1.0, "micrometer": 1e3, "angstrom": 0.1, "millimeter": 1e6}


def is_ome_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an OME-Zarr store (``*.ome.zarr``)."""
    return str(path).lower().rstrip("/").endswith(OME_SUFFIX)


def _ome_attrs(node: Any) -> dict:
    attrs = dict(node.attrs)
    return dict(attrs.get("ome") or {}) if "ome" in attrs else attrs  # 0.4 kept it at the top level


# --------------------------------------------------------------------------- reading


#: Bounds of what an OME-Zarr ``multiscales`` entry may list (levels of a pyramid, axes).
MAX_LEVELS = 64
MAX_AXES = 5
_SAFE_PART = re.compile(r"^[A-Za-z0-9_.-]+$")


def _safe_level_path(path: Any) -> bool:
    """A dataset path inside the store: relative parts of safe characters, no ``.`` or ``..``."""
    if not isinstance(path, str) or not path or len(path) > 255:
        return False
    parts = path.split("/")
    return all(_SAFE_PART.match(p) and p not in (".", "..") for p in parts)


def multiscales_of(group: Any, *, source: str) -> dict:
    """The first ``multiscales`` entry of an OME-Zarr group, checked; :class:`InputError` otherwise.

    Each dataset path must stay inside the store (no ``..``, no absolute path), there are at most
    :data:`MAX_LEVELS` levels, and ``axes`` (when given) lists at most :data:`MAX_AXES` distinct
    names.
    """
    entries = _ome_attrs(group).get("multiscales")
    if not entries or not isinstance(entries, list) or not isinstance(entries[0], dict) \
            or not entries[0].get("datasets"):
        raise InputError("not an OME-Zarr image: no 'multiscales' in its ome attributes", source=source)
    entry = entries[0]
    datasets = entry["datasets"]
    if not isinstance(datasets, list) or not 1 <= len(datasets) <= MAX_LEVELS:
        raise InputError(f"multiscales 'datasets' must be a list of 1 to {MAX_LEVELS} levels", source=source)
    for i, d in enumerate(datasets):
        if not isinstance(d, dict) or not _safe_level_path(d.get("path")):
            shown = repr(d.get("path") if isinstance(d, dict) else d)[:80]
            raise InputError(f"multiscales dataset {i} has path {shown}: a level must be a relative path inside "
                             f"the store", source=source)
    axes = entry.get("axes")
    if axes is not None:
        names = [a.get("name") if isinstance(a, dict) else None for a in axes] if isinstance(axes, list) else None
        if names is None or not 1 <= len(names) <= MAX_AXES or not all(isinstance(n, str) for n in names) \
                or len(set(names)) != len(names):
            raise InputError(f"multiscales 'axes' must list 1 to {MAX_AXES} distinct named axes", source=source)
    return entry


def open_ome(path: Path, key: str) -> tuple[Any, str] | None:
    """The zarr array of the OME-Zarr image level that ``path``/``key`` names, and its key.

    ``key`` is ``""`` or a group with multiscales (level 0), or such a group followed by a level
    (``0``, ``labels/seg/1``). Returns ``None`` when ``path`` is not an OME-Zarr store and the key
    is not inside a multiscales group (the caller reports a missing array).
    """
    source = str(path)
    try:
        root = zarr.open_group(store=str(path), mode="r")
    except Exception:
        return None
    parts = [p for p in key.split("/") if p]
    node, at = root, []
    for part in parts:
        child = node.get(part) if hasattr(node, "get") else None
        if not isinstance(child, zarr.Group):
            break
        node, at = child, at + [part]
    rest = parts[len(at):]
    attrs = _ome_attrs(node)
    if "multiscales" not in attrs and not is_ome_path(path):
        return None
    where = f"{source}/{'/'.join(at)}" if at else source
    ms = multiscales_of(node, source=where)
    levels = [str(d["path"]) for d in ms["datasets"]]
    if not rest:
        level = levels[0]
    elif len(rest) == 1 and rest[0] in levels:
        level = rest[0]
    else:
        raise InputError(f"no level '{'/'.join(rest)}' (levels: {', '.join(levels)})", source=where)
    try:
        array = node[level]
    except (KeyError, ValueError):
        raise InputError(f"level {level} is listed but missing", source=where) from None
    if not isinstance(array, zarr.Array):
        raise InputError(f"level {level} is not an array", source=where)
    if ms.get("axes") is not None and len(ms["axes"]) != array.ndim:
        raise InputError(f"multiscales 'axes' lists {len(ms['axes'])} axes, level {level} has {array.ndim}",
                         source=where)
    return array, "/".join(at + [level])


def _scale_nm(transforms: Iterable[dict], axes: Sequence[dict]) -> list[float | None]:
    scale = [1.0] * len(axes)
    for t in transforms or []:
        if t.get("type") == "scale":
            scale = [a * b for a, b in zip(scale, t["scale"])]
    out: list[float | None] = []
    for s, ax in zip(scale, axes):
        factor = _UNITS_NM.get(str(ax.get("unit", "")).lower())
        out.append(s * factor if factor is not None else None)
    return out


def voxel_size_of(volume: Any) -> tuple[float, ...] | None:
    """Voxel size in nm of the spatial axes of ``volume`` (an :class:`~emseg.io.Volume`), or None.

    Looks at ``voxel_size_nm`` on the array and then on the groups above it (the VNC files carry it
    on the file), ``element_size_um`` likewise, and the scale of an OME-Zarr level with a length unit.
    """
    array = getattr(volume, "array", None)
    spec = getattr(volume, "spec", None)
    nodes: list[Any] = [array] if array is not None else []
    if isinstance(array, h5py.Dataset):
        group = array.parent
        while True:
            nodes.append(group)
            if group.name == "/":
                break
            group = group.parent
    elif spec is not None and getattr(spec, "fmt", "") == "zarr":
        parts = [p for p in spec.key.split("/") if p]
        for i in range(len(parts) - 1, -1, -1):
            try:
                group = zarr.open_group(store=str(spec.path), path="/".join(parts[:i]) or None, mode="r")
            except Exception:
                continue
            ms = _ome_attrs(group).get("multiscales")
            if ms:
                for d in ms[0].get("datasets", []):
                    if str(d.get("path")) == parts[i]:
                        sizes = _scale_nm(d.get("coordinateTransformations"), ms[0]["axes"])
                        space = [s for s, ax in zip(sizes, ms[0]["axes"]) if ax.get("type") == "space"]
                        if space and all(s is not None for s in space):
                            return tuple(float(s) for s in space)
            nodes.append(group)
    for node in nodes:
        attrs = getattr(node, "attrs", {})
        for name, factor in (("voxel_size_nm", 1.0), ("element_size_um", 1e3)):
            if name in attrs:
                try:
                    values = [float(v) * factor for v in np.atleast_1d(np.asarray(attrs[name]))]
                except (TypeError, ValueError):
                    continue
                if values and all(v > 0 and math.isfinite(v) for v in values):
                    return tuple(values)
    return None


# --------------------------------------------------------------------------- writing


def label_colors(values: Iterable[int]) -> list[dict]:
    """One RGBA colour per label value (0 transparent), distinct for neighbouring values."""
    colors = []
    for v in sorted(int(x) for x in values):
        if v == 0:
            rgba = [0, 0, 0, 0]
        else:  # golden-angle hues: neighbouring values far apart on the colour wheel
            h = (v * 0.618033988749895) % 1.0
            r, g, b = (int(round(255 * (0.5 + 0.5 * math.cos(2 * math.pi * (h + k / 3))))) for k in range(3))
            rgba = [r, g, b, 255]
        colors.append({"label-value": v, "rgba": rgba})
    return colors


def _axes(ndim: int, channel: bool, unit: bool) -> list[dict]:
    names = ("z", "y", "x")[3 - (ndim - int(channel)):]
    axes = [{"name": "c", "type": "channel"}] if channel else []
    for n in names:
        axes.append({"name": n, "type": "space", **({"unit": "nanometer"} if unit else {})})
    return axes


def plan_factors(shape: Sequence[int], scale: Sequence[float], channel: bool,
                 levels: int | None = None) -> list[tuple[int, ...]]:
    """Down-sampling factor of each level relative to the one above (level 0 excluded).

    In-plane (y, x) axes halve at every level; z halves once its voxel is no longer the longest
    (so anisotropic EM sections are kept until the pyramid is near isotropic). Without ``levels``,
    levels are added while both in-plane sides stay >= :data:`MIN_LEVEL_SIDE`.
    """
    shape, scale = list(shape), list(scale)
    first = int(channel)
    factors: list[tuple[int, ...]] = []
    while len(factors) + 1 < (levels if levels is not None else MAX_LEVELS):
        f = [1] * len(shape)
        plane = range(max(first, len(shape) - 2), len(shape))
        nxt = [math.ceil(shape[a] / 2) for a in plane]
        if levels is None and min(nxt) < MIN_LEVEL_SIDE:
            break
        for a in plane:
            f[a] = 2 if shape[a] > 1 else 1
        if len(shape) - first == 3 and shape[first] > 1:
            if scale[first] < max(scale[a] * f[a] for a in plane):
                f[first] = 2
        factors.append(tuple(f))
        shape = [math.ceil(s / k) for s, k in zip(shape, f)]
        scale = [s * k for s, k in zip(scale, f)]
    return factors


def _blocks(shape: Sequence[int], chunks: Sequence[int]) -> Iterable[tuple[slice, ...]]:
    """Boxes of whole chunks covering ``shape``, each about :data:`BLOCK_VOXELS` voxels."""
    block = list(chunks)
    for ax in range(len(shape) - 1, -1, -1):  # grow from the trailing axes while under budget
        while block[ax] < shape[ax] and math.prod(block) * 2 <= BLOCK_VOXELS:
            block[ax] = min(shape[ax], block[ax] * 2)
    ranges = [range(0, s, b) for s, b in zip(shape, block)]
    for start in itertools.product(*ranges):
        yield tuple(slice(a, min(a + b, s)) for a, b, s in zip(start, block, shape))


def downsample_level(src: Any, dst: Any, factor: Sequence[int], *, labels: bool) -> None:
    """Fill ``dst`` (shape ``ceil(src.shape / factor)``) from ``src`` block by block.

    Images: the mean of each ``factor`` box (edge boxes padded by repeating the last voxel).
    Labels: the voxel at the box origin (nearest), so no value is invented.
    """
    for box in _blocks(dst.shape, dst.chunks):
        src_box = tuple(slice(b.start * f, min(b.stop * f, n)) for b, f, n in zip(box, factor, src.shape))
        data = np.asarray(src[src_box])
        if labels:
            out = data[tuple(slice(None, None, f) for f in factor)]
        else:
            want = [(b.stop - b.start) * f for b, f in zip(box, factor)]
            pad = [(0, w - s) for w, s in zip(want, data.shape)]
            if any(p for _, p in pad):
                data = np.pad(data, pad, mode="edge")
            split = []
            for n, f in zip([b.stop - b.start for b in box], factor):
                split += [n, f]
            out = data.astype(np.float64).reshape(split).mean(axis=tuple(range(1, 2 * len(factor), 2)))
        dst[box] = out.astype(dst.dtype)


def _create(group_path: Path, name: str, shape, dtype, chunks, dimension_names, fill_value=0):
    dtype = np.dtype(dtype)
    return zarr.create_array(store=str(group_path), name=name, shape=tuple(shape), dtype=dtype,
                             chunks=tuple(min(c, s) for c, s in zip(chunks, shape)),
                             compressors=zarr_compressors(dtype), fill_value=fill_value,
                             dimension_names=list(dimension_names), zarr_format=3)


def build_multiscale(group_path: Path, level0: Any, *, channel: bool, labels: bool,
                     voxel_size: Sequence[float] | None, factors: list[tuple[int, ...]] | None = None,
                     name: str = "", extra: dict | None = None) -> dict:
    """Compute levels 1.. of the image whose level 0 is array ``0`` of ``group_path`` and write the
    group's ``ome`` attributes; returns them. ``factors`` fixes the levels (labels of an image)."""
    ndim = len(level0.shape)
    n_space = ndim - int(channel)
    vs = list(voxel_size)[-n_space:] if voxel_size and len(voxel_size) >= n_space else None
    base = ([1.0] if channel else []) + [float(v) for v in (vs or [1.0] * n_space)]
    if factors is None:
        factors = plan_factors(level0.shape, base, channel)
    axes = _axes(ndim, channel, unit=vs is not None)
    names = [a["name"] for a in axes]
    scale, shift, prev = list(base), [0.0] * ndim, level0
    datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(scale)}]}]
    for i, f in enumerate(factors, start=1):
        shape = [math.ceil(s / k) for s, k in zip(prev.shape, f)]
        arr = _create(group_path, str(i), shape, level0.dtype, level0.chunks, names)
        downsample_level(prev, arr, f, labels=labels)
        if not labels:  # the centre of a mean-pooled voxel moves by half the pooled extent
            shift = [t + (k - 1) / 2 * s for t, k, s in zip(shift, f, scale)]
        scale = [s * k for s, k in zip(scale, f)]
        transforms: list[dict] = [{"type": "scale", "scale": list(scale)}]
        if any(shift):
            transforms.append({"type": "translation", "translation": list(shift)})
        datasets.append({"path": str(i), "coordinateTransformations": transforms})
        prev = arr
    multiscale = {"name": name or group_path.name, "axes": axes, "datasets": datasets,
                  "type": "nearest" if labels else "mean"}
    ome: dict[str, Any] = {"version": OME_VERSION, "multiscales": [multiscale]}
    if labels:
        values: set[int] = set()
        for box in _blocks(level0.shape, level0.chunks):
            values.update(int(v) for v in np.unique(np.asarray(level0[box])))
        ome["image-label"] = {"colors": label_colors(values)}
    ome.update(extra or {})
    group = zarr.open_group(store=str(group_path), mode="a", zarr_format=3)
    attrs = dict(group.attrs)
    attrs["ome"] = ome
    group.attrs.put(attrs) if hasattr(group.attrs, "put") else group.attrs.update(attrs)
    return ome


def factors_of(group: Any, *, source: str) -> list[tuple[int, ...]]:
    """The level-to-level factors of the OME-Zarr image ``group``, spatial axes only."""
    ms = multiscales_of(group, source=source)
    space = [i for i, ax in enumerate(ms["axes"]) if ax.get("type") == "space"]
    scales = [_scale_nm(d.get("coordinateTransformations"), [{"unit": "nanometer"}] * len(ms["axes"]))
              for d in ms["datasets"]]
    return [tuple(max(1, int(round(b[i] / a[i]))) for i in space) for a, b in zip(scales, scales[1:])]
