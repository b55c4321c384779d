"""npe2 glue named by ``napari.yaml``: reader, the two labels writers (crops, instance labels) and the
*Save crop labels* widget.

Everything of substance lives in :mod:`emseg.napari._layers` and :mod:`emseg.napari._crops`;
napari and magicgui are imported only inside the widget factory.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from emseg.errors import InputError
from emseg.instances.targets import save_instance_labels
from emseg.napari._crops import crop_names, from_layer_labels, write_crop_labels
from emseg.napari._layers import file_kind, read_layers

__all__ = ["get_reader", "labels_from_layer", "parse_classes", "save_crops_widget", "write_instances",
           "write_labels"]


def get_reader(path: str | list[str]) -> Callable[[Any], list] | None:
    """The npe2 reader: a function for files emseg wrote, ``None`` for anything else."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or any(file_kind(p) is None for p in paths):
        return None

    def reader(p: str | list[str]) -> list:
        items = [p] if isinstance(p, (str, Path)) else list(p)
        return [layer for item in items for layer in read_layers(item)]

    return reader


def labels_from_layer(data: Any, metadata: Mapping[str, Any] | None, path: str | Path) -> dict[str, np.ndarray]:
    """Crop name -> emseg labels from a labels layer's data and metadata.

    A layer opened from a crops file knows its crops (``metadata["emseg_crops"]["crops"]``); any
    other layer must have the shape of one crop, or of all crops stacked, of the file ``path``.
    """
    data = np.asarray(data)
    meta = dict((metadata or {}).get("emseg_crops") or {})
    names = list(meta.get("crops") or [])
    stacked = bool(meta.get("stacked"))
    if not names:
        names = crop_names(path)
        stacked = len(names) > 1
        if len(names) > 1 and data.shape[:1] != (len(names),):
            raise InputError(f"a labels layer of shape {data.shape} does not match the {len(names)} crops "
                             "(open the crops file in napari and paint its labels layer)", source=str(path))
    if stacked:
        if data.shape[0] != len(names):
            raise InputError(f"labels layer has {data.shape[0]} crops along its first axis, metadata "
                             f"lists {len(names)}", source=str(path))
        return {name: from_layer_labels(data[i]) for i, name in enumerate(names)}
    if len(names) != 1:
        raise InputError("an unstacked labels layer must belong to one crop", source=str(path))
    return {names[0]: from_layer_labels(data)}


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """The npe2 labels writer: paint into the crops file ``path`` (keeping every crop's ``info``)."""
    labels = labels_from_layer(data, meta.get("metadata"), path)
    info = ((meta.get("metadata") or {}).get("emseg_crops") or {}).get("info") or {}
    not_present = {n: [k for k, v in enumerate(info[n][1]) if v] for n in labels if n in info}
    unlabelled = {n: [k for k, v in enumerate(info[n][0]) if not v] for n in labels if n in info}
    write_crop_labels(path, labels, not_present=not_present, unlabelled=unlabelled)
    return [str(path)]


def write_instances(path: str, data: Any, meta: dict) -> list[str]:
    """The npe2 writer of object ids: a labels layer (an ``emseg segment`` output corrected by
    painting, or objects painted from scratch) saved as instance labels (``.zarr`` or ``.tif``) that
    ``emseg targets`` turns into training classes. The layer's scale in nm becomes the voxel size;
    what the layer was read from (its source and model) is recorded. napari has asked before
    replacing a file."""
    read_from = ((meta.get("metadata") or {}).get("emseg") or {}).get("attrs") or {}
    attrs = {k: read_from[k] for k in ("source", "model") if k in read_from}
    if read_from.get("output_type") == "instances":
        attrs["corrected_from"] = str(read_from.get("segment", "an emseg segment output"))
    scale, units = meta.get("scale"), meta.get("units")
    if scale is not None and units and all(str(u) in ("nm", "nanometer") for u in units):
        attrs["voxel_size_nm"] = [float(v) for v in scale]
    return [save_instance_labels(np.asarray(data), str(path), attrs=attrs, overwrite=True)]


def parse_classes(text: str) -> list[int]:
    """``"1, 2"`` -> ``[1, 2]`` (empty text: no class)."""
    out = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if not part.lstrip("-").isdigit():
            raise InputError(f"{part!r} is not a class number (write e.g. 1, 2)")
        out.append(int(part))
    return out


def save_crops_widget() -> Any:
    """The *Save crop labels* dock widget: saves a painted crops labels layer with its info masks.

    ``not present`` lists the classes that occur nowhere in the chosen crop (or in every crop of
    the layer when *crop* is -1), ``unlabelled`` those that were not painted where they occur.
    """
    from magicgui import magicgui
    from napari.layers import Labels

    def save_crop_labels(labels: Labels, crop: int = -1, not_present: str = "", unlabelled: str = "") -> str:
        meta = dict(labels.metadata.get("emseg_crops") or {})
        if not meta.get("path"):
            raise InputError(f"layer {labels.name!r} was not opened from an emseg crops file")
        names = list(meta["crops"])
        chosen = names if crop < 0 else [names[crop]] if crop < len(names) else []
        if not chosen:
            raise InputError(f"crop {crop} does not exist; the layer has {len(names)}")
        absent, skipped = parse_classes(not_present), parse_classes(unlabelled)
        info = {n: [list(r) for r in row] for n, row in (meta.get("info") or {}).items()}
        n_classes = int(meta.get("n_classes", 0))
        for name in chosen:
            info[name] = [[0 if k in skipped else 1 for k in range(n_classes)],
                          [1 if k in absent else 0 for k in range(n_classes)]]
        labels.metadata["emseg_crops"] = {**meta, "info": info}
        write_labels(meta["path"], labels.data, {"metadata": labels.metadata})
        return f"saved {len(names)} crops to {meta['path']}"

    # real types, not the postponed annotation strings, for magicgui to build the widgets from
    save_crop_labels.__annotations__ = {"labels": Labels, "crop": int, "not_present": str, "unlabelled": str,
                                        "return": str}
    return magicgui(save_crop_labels, call_button="Save labels", crop={"min": -1, "max": 9999},
                    not_present={"label": "not present"}, unlabelled={"label": "unlabelled"})
