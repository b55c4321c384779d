"""emseg files as napari layer data: ``(data, kwargs, layer_type)`` tuples, built without Qt.

* prediction outputs (``.h5``, ``.zarr``, ``.ome.zarr``, emseg's ``.tif``): float arrays ``(C, *S)`` become an image
  layer per class (``channel_axis=0``), integer arrays a labels layer; the scale is the voxel size
  (nm) of the output or of the raw volume it was predicted from, as in the OME-Zarr outputs;
* ``queries.json`` (``emseg query --out``): a points layer at the query centres coloured by score
  (by rank when the strategy has no score) and a shapes layer with one rectangle per query section;
* ``crops.h5`` (``emseg query --export``): an image and a labels layer, stacked along a new first
  axis when every crop has the same shape, otherwise one pair per crop;
* raw volumes napari has no reader for, MRC files and N5 datasets: one image layer, read lazily,
  scaled by the voxel size of the header or attributes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import zarr

from emseg.errors import InputError
from emseg.io import open_volume, voxel_size_of
from emseg.io._formats import MRC_SUFFIXES, TIFF_SUFFIXES
from emseg.io._tiff_read import TiffStack
from emseg.io.ome import multiscales_of, voxel_size_from_source
from emseg.napari._crops import CROPS_FORMAT, read_crops, to_layer_labels

#: Object ids up to this size open in memory, so that corrections can be painted into them (larger
#: ones stay lazy and read-only: cut a crop to correct).
PAINTABLE_BYTES = 1 << 30

__all__ = ["crops_layers", "file_kind", "output_layers", "queries_layers", "read_layers"]

LayerData = tuple[Any, dict[str, Any], str]


def _attr(obj: Any, key: str) -> Any:
    value = obj.attrs.get(key)
    return value.decode() if isinstance(value, bytes) else value


def file_kind(path: str | Path) -> str | None:
    """``"queries"``, ``"crops"``, ``"output"``, ``"volume"`` (MRC, N5) or ``None`` (not a file emseg
    reads into napari; TIFFs that emseg did not write are left to napari's own reader)."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith(MRC_SUFFIXES) and path.is_file():
            return "volume"
        if path.is_dir() and (path / "attributes.json").is_file() and ".n5" in str(path).lower():
            meta = json.loads((path / "attributes.json").read_text())
            return "volume" if isinstance(meta, dict) and "dimensions" in meta else None
        if name.endswith(TIFF_SUFFIXES) and path.is_file():
            stack = TiffStack(path)
            stack.close()
            return "output" if _is_output(stack.attrs) else None
        if name.endswith(".json") and path.is_file():
            doc = json.loads(path.read_text())
            return "queries" if isinstance(doc, dict) and doc.get("format") == "emseg-queries" else None
        if name.endswith((".h5", ".hdf5", ".hdf")) and path.is_file():
            with h5py.File(path, "r") as fh:
                if _attr(fh, "format") == CROPS_FORMAT:
                    return "crops"
                return "output" if _h5_outputs(fh) else None
        if name.endswith(".zarr") and path.is_dir():
            node = zarr.open(store=str(path), mode="r")
            if isinstance(node, zarr.Array):
                return "output"
            attrs = dict(node.attrs)
            if "ome" in attrs or "multiscales" in attrs or _zarr_outputs(node):
                return "output"
    except (OSError, ValueError, KeyError, TypeError):
        return None
    except Exception:  # zarr raises its own errors for stores it cannot read
        return None
    return None


def _is_output(attrs: Any) -> bool:
    return "output_type" in attrs or "n_classes" in attrs


def _h5_outputs(fh: h5py.File) -> list[str]:
    found: list[str] = []
    fh.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) and _is_output(obj.attrs)
                  else None)
    return found


def _zarr_outputs(group: Any) -> list[str]:
    return [name for name, arr in group.arrays() if _is_output(arr.attrs)]


def _scale(voxel: tuple[float, ...] | None, ndim: int) -> tuple[float, ...]:
    if voxel is None or len(voxel) < ndim:
        return (1.0,) * ndim
    return tuple(float(v) for v in voxel[-ndim:])


def _layer(data: Any, attrs: dict, name: str, voxel: tuple[float, ...] | None, *, labels: bool | None = None,
           multiscale: bool = False) -> LayerData:
    """An image or labels layer tuple for one output array (or a list of levels when multiscale)."""
    first = data[0] if multiscale else data
    integer = np.issubdtype(np.dtype(first.dtype), np.integer)
    labels = integer if labels is None else labels
    probabilities = not labels and (len(first.shape) == 4 or attrs.get("output_type") == "probabilities")
    ndim = len(first.shape) - int(probabilities)
    meta: dict[str, Any] = {"scale": _scale(voxel, ndim), "metadata": {"emseg": {"attrs": dict(attrs)}}}
    if voxel is not None:
        meta["units"] = ("nm",) * ndim
    if multiscale:
        meta["multiscale"] = True
    if labels:
        meta["name"] = name
        return data, meta, "labels"
    if probabilities:
        channels = attrs.get("channels") or [f"class {k}" for k in range(int(first.shape[0]))]
        meta.update(channel_axis=0, name=[f"{name} {c}" for c in channels], contrast_limits=[0.0, 1.0],
                    blending="additive")
    else:
        meta["name"] = name
    return data, meta, "image"


def _ome_layers(path: Path) -> list[LayerData]:
    root = zarr.open_group(store=str(path), mode="r")
    out: list[LayerData] = []

    def image(group: Any, key: str, name: str, labels: bool) -> None:
        ms = multiscales_of(group, source=f"{path}/{key}" if key else str(path))
        levels = [group[str(d["path"])] for d in ms["datasets"]]
        with open_volume(f"{path}/{key}/0" if key else f"{path}/0") as vol:
            voxel = voxel_size_of(vol)
            attrs = vol.attrs
        out.append(_layer(levels if len(levels) > 1 else levels[0], attrs, name, voxel, labels=labels,
                          multiscale=len(levels) > 1))

    ome = dict(root.attrs).get("ome", dict(root.attrs))
    image(root, "", path.name.removesuffix(".ome.zarr"), labels="image-label" in ome)
    labels_group = root.get("labels")
    if isinstance(labels_group, zarr.Group):
        names = dict(labels_group.attrs).get("ome", dict(labels_group.attrs)).get("labels", [])
        for name in names:
            image(labels_group[name], f"labels/{name}", name, labels=True)
    return out


def output_layers(path: str | Path) -> list[LayerData]:
    """Layers of an emseg prediction/label output (``.h5``, ``.zarr`` or ``.ome.zarr``).

    Examples
    --------
    >>> layers = output_layers("pred.ome.zarr")  # doctest: +SKIP
    >>> [t[2] for t in layers]  # doctest: +SKIP
    ['image', 'labels']
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file", source=str(path))
    if path.name.lower().endswith(TIFF_SUFFIXES):
        specs = [str(path)]
    elif path.name.lower().endswith(".zarr"):
        node = zarr.open(store=str(path), mode="r")
        if isinstance(node, zarr.Group) and ("ome" in node.attrs or "multiscales" in node.attrs):
            return _ome_layers(path)
        specs = [str(path)] if isinstance(node, zarr.Array) else [f"{path}/{k}" for k in _zarr_outputs(node)]
    else:
        with h5py.File(path, "r") as fh:
            specs = [f"{path}:{k}" for k in _h5_outputs(fh)]
    if not specs:
        raise InputError("no emseg output array in it (arrays carry an 'n_classes' attribute)", source=str(path))
    out = []
    for spec in specs:
        vol = open_volume(spec)  # kept open: napari reads slices lazily from the dataset
        voxel = voxel_size_of(vol) or voxel_size_from_source(vol.attrs.get("source"))
        name = spec.split(":", 1)[1] if ":" in spec else Path(spec).name.removesuffix(".zarr")
        name = name.removesuffix(".tiff").removesuffix(".tif")
        data = vol.array
        if vol.attrs.get("output_type") in ("instances", "instance_labels") and \
                math.prod(vol.shape) * np.dtype(vol.dtype).itemsize <= PAINTABLE_BYTES:
            data = np.asarray(vol[...])  # in memory: napari paints corrections into it
            vol.close()
        out.append(_layer(data, vol.attrs, name, voxel))
    return out


def volume_layers(path: str | Path) -> list[LayerData]:
    """One image layer of a raw MRC file or N5 dataset, read lazily, scaled by its voxel size."""
    path = Path(path)
    spec = str(path) if path.suffix.lower() in MRC_SUFFIXES else _n5_spec(path)
    vol = open_volume(spec)  # kept open: napari reads slices lazily
    return [_layer(vol, vol.attrs, path.name, voxel_size_of(vol), labels=False)]


def _n5_spec(path: Path) -> str:
    """``ROOT.n5/KEY`` for a dataset folder inside an N5 container."""
    parts = path.resolve().parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].lower().endswith(".n5"):
            return str(Path(*parts[: i + 1])) + ("/" + "/".join(parts[i + 1:]) if i + 1 < len(parts) else "")
    return str(path)


def _query_voxel(doc: dict, folder: Path) -> tuple[float, ...] | None:
    for volume in doc.get("volumes", [])[:1]:
        for candidate in (str(volume), str(folder / str(volume))):
            voxel = voxel_size_from_source(candidate)
            if voxel is not None:
                return voxel
    return None


def queries_layers(path: str | Path) -> list[LayerData]:
    """A points layer (query centres, coloured by score) and a shapes layer (one rectangle per section).

    Boxes of all pool volumes are drawn in the same space; ``features`` hold ``rank``, ``score``
    and ``volume_index``. The scale is the first pool volume's voxel size when it can be read.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != "emseg-queries":
            raise KeyError("format")
        queries = doc["queries"]
        axes = str(doc["axes"])
        centers = np.array([[float(v) for v in q["center"]] for q in queries], dtype=float).reshape(-1, len(axes))
        offsets = [[int(v) for v in q["offset"]] for q in queries]
        shapes = [[int(v) for v in q["shape"]] for q in queries]
    except FileNotFoundError:
        raise InputError("no such file", source=str(path)) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"not an emseg query file ({type(exc).__name__}: {exc})".splitlines()[0],
                         source=str(path)) from None
    ranks = np.array([int(q.get("rank", i + 1)) for i, q in enumerate(queries)])
    raw_scores = [q.get("score") for q in queries]
    scored = all(s is not None for s in raw_scores) and len(raw_scores) > 0
    scores = np.array([np.nan if s is None else float(s) for s in raw_scores], dtype=float)
    ndim = len(axes)
    scale = _scale(_query_voxel(doc, path.parent), ndim)
    features = {"rank": ranks, "score": scores, "volume_index": [int(q.get("volume_index", 0)) for q in queries]}
    points_meta = {"name": f"{path.stem} centres", "scale": scale, "features": features, "size": 8,
                   "face_color": "score" if scored else "rank", "face_colormap": "viridis",
                   "metadata": {"emseg": {"strategy": doc.get("strategy"), "queries": str(path)}}}
    rects, rect_rank = [], []
    for offset, shape, rank in zip(offsets, shapes, ranks):
        y0, x0 = offset[-2:]
        y1, x1 = y0 + shape[-2] - 1, x0 + shape[-1] - 1
        sections = range(offset[0], offset[0] + shape[0]) if ndim == 3 else [None]
        for z in sections:
            lead = [] if z is None else [z]
            rects.append(np.array([[*lead, y0, x0], [*lead, y0, x1], [*lead, y1, x1], [*lead, y1, x0]], float))
            rect_rank.append(int(rank))
    shapes_meta = {"name": f"{path.stem} boxes", "scale": scale, "shape_type": "rectangle",
                   "edge_color": "yellow", "face_color": "transparent", "edge_width": 2,
                   "features": {"rank": np.array(rect_rank, dtype=int)}}
    return [(centers, points_meta, "points"), (rects, shapes_meta, "shapes")]


def crops_layers(path: str | Path, *, crop: str | None = None, stack: bool | None = None) -> list[LayerData]:
    """Image and labels layers of an emseg crops file.

    Parameters
    ----------
    path : str or Path
    crop : str, optional
        One crop (``crop_003``) instead of all of them.
    stack : bool, optional
        Stack the crops along a new first axis (default: when they all have the same shape).

    Labels are shown as emseg label + 1 (0 = unlabelled); the labels layer's ``metadata["emseg_crops"]``
    records the file and the crop names, which the writer uses to put painted labels back.
    """
    path = Path(path)
    doc = read_crops(path, [crop] if crop else None)
    names = doc["names"]
    same = len({doc[n]["raw"].shape for n in names}) == 1
    if stack is None:
        stack = same and len(names) > 1
    if stack and not same:
        raise InputError("the crops have different shapes and cannot be stacked", source=str(path))
    groups = [names] if stack else [[n] for n in names]
    out: list[LayerData] = []
    for group in groups:
        raw = np.stack([doc[n]["raw"] for n in group]) if stack else doc[group[0]]["raw"]
        lab = np.stack([doc[n]["label"] for n in group]) if stack else doc[group[0]]["label"]
        title = f"{path.stem}" if stack else f"{path.stem} {group[0]}"
        info = {n: doc[n]["info"].tolist() for n in group}
        meta = {"path": str(path), "crops": list(group), "stacked": bool(stack), "n_classes": doc["n_classes"],
                "info": info}
        out.append((raw, {"name": f"{title} raw", "metadata": {"emseg_crops": dict(meta)}}, "image"))
        out.append((to_layer_labels(lab), {"name": f"{title} labels", "metadata": {"emseg_crops": meta}}, "labels"))
    return out


def read_layers(path: str | Path) -> list[LayerData]:
    """Every layer of an emseg file, whatever its kind (:func:`file_kind`)."""
    kind = file_kind(path)
    if kind == "queries":
        return queries_layers(path)
    if kind == "crops":
        return crops_layers(path)
    if kind == "output":
        return output_layers(path)
    if kind == "volume":
        return volume_layers(path)
    raise InputError("not a file emseg can open in napari (queries JSON, crops file, prediction output, MRC or N5)",
                     source=str(path))
