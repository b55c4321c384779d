"""Reading and writing the crops file of ``emseg query --export`` (plain functions, no Qt).

In napari a labels layer shows value ``v`` for the emseg label ``v - 1``: 0 (transparent, the
eraser) is an unlabelled voxel (-1), 1 is background (class 0), 2 is class 1, and so on. The
functions here convert in both directions so that painted layers go back into the file as the
lazy labels ``emseg train`` reads.
"""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from emseg.errors import InputError
from emseg.io import replace_output

__all__ = [
    "CROPS_FORMAT",
    "LABEL_OFFSET",
    "crop_names",
    "from_layer_labels",
    "read_crops",
    "to_layer_labels",
    "write_crop_labels",
]

#: ``format`` attribute of a crops file written by ``emseg query --export``.
CROPS_FORMAT = "emseg-query-crops"
#: napari value = emseg label + LABEL_OFFSET (napari's 0 is the unlabelled -1).
LABEL_OFFSET = 1


def to_layer_labels(label: np.ndarray) -> np.ndarray:
    """emseg labels (-1 unlabelled, 0.. classes) -> napari labels layer values (0 unlabelled)."""
    return (np.asarray(label).astype(np.int32) + LABEL_OFFSET).astype(np.int32)


def from_layer_labels(values: np.ndarray) -> np.ndarray:
    """napari labels layer values -> emseg int16 labels (the inverse of :func:`to_layer_labels`)."""
    values = np.asarray(values)
    if values.size and int(values.min()) < 0:
        raise InputError(f"labels layer holds a negative value ({int(values.min())}); 0 means unlabelled")
    return (values.astype(np.int64) - LABEL_OFFSET).astype(np.int16)


def _open_crops(path: Path, mode: str) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", source=str(path))
    try:
        fh = h5py.File(path, mode)
    except OSError as exc:
        raise InputError(f"not a readable HDF5 file ({str(exc).splitlines()[0]})", source=str(path)) from None
    fmt = fh.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != CROPS_FORMAT:
        fh.close()
        raise InputError(f"not an emseg crops file (no format={CROPS_FORMAT!r} attribute; write one with "
                         "`emseg query ... --export FILE.h5`)", source=str(path))
    return fh


def crop_names(path: str | Path) -> list[str]:
    """The crop groups of an emseg crops file, in rank order."""
    with _open_crops(Path(path), "r") as fh:
        return sorted(name for name in fh if isinstance(fh[name], h5py.Group) and "raw" in fh[name])


def read_crops(path: str | Path, crops: Sequence[str] | None = None) -> dict[str, Any]:
    """Raw crops, labels (emseg values) and ``info`` of an emseg crops file.

    Parameters
    ----------
    path : str or Path
        File written by ``emseg query --export``.
    crops : sequence of str, optional
        Group names to read (default: every crop).

    Returns
    -------
    dict
        ``n_classes``, ``names``, and per crop name: ``raw``, ``label``, ``info`` arrays and ``attrs``.

    Examples
    --------
    >>> doc = read_crops("crops.h5")  # doctest: +SKIP
    >>> doc["crop_000"]["raw"].shape  # doctest: +SKIP
    (1, 64, 64)
    """
    path = Path(path)
    with _open_crops(path, "r") as fh:
        names = sorted(n for n in fh if isinstance(fh[n], h5py.Group) and "raw" in fh[n])
        if crops is not None:
            missing = [c for c in crops if c not in names]
            if missing:
                raise InputError(f"no crop {missing[0]!r} (the file has {', '.join(names) or 'none'})",
                                 source=str(path))
            names = list(crops)
        if not names:
            raise InputError("the crops file holds no crop", source=str(path))
        n_classes = int(fh.attrs.get("n_classes", 0))
        out: dict[str, Any] = {"n_classes": n_classes, "names": names}
        for name in names:
            group = fh[name]
            for key in ("label", "info"):
                if key not in group:
                    raise InputError(f"crop {name!r} has no {key!r} dataset", source=str(path))
            raw, label, info = group["raw"][...], group["label"][...], group["info"][...]
            if label.shape != raw.shape:
                raise InputError(f"{name}/label has shape {label.shape}, raw {raw.shape}", source=str(path))
            if info.shape != (2, n_classes):
                raise InputError(f"{name}/info has shape {info.shape}, expected (2, {n_classes})",
                                 source=str(path))
            out[name] = {"raw": raw, "label": label, "info": info, "attrs": dict(group.attrs)}
    return out


def _classes(values: Iterable[int] | None, n_classes: int, what: str, source: str) -> list[int] | None:
    if values is None:
        return None
    out = sorted({int(v) for v in values})
    bad = [v for v in out if not 0 <= v < n_classes]
    if bad:
        raise InputError(f"{what} class {bad[0]} is outside 0..{n_classes - 1}", source=source)
    return out


def write_crop_labels(
    path: str | Path,
    labels: Mapping[str, np.ndarray],
    *,
    not_present: Mapping[str, Iterable[int]] | None = None,
    unlabelled: Mapping[str, Iterable[int]] | None = None,
) -> Path:
    """Store labels (emseg values) into the crops of an emseg crops file, with their ``info``.

    Every crop is checked before anything is written; the file is rewritten under a temporary name
    beside it and renamed into place, so a failure leaves it as it was.

    Parameters
    ----------
    path : str or Path
        File written by ``emseg query --export``.
    labels : mapping of str to ndarray
        Crop name -> labels of the crop's shape: -1 unlabelled, 0.. classes.
    not_present : mapping, optional
        Crop name -> classes that occur nowhere in that crop (``info`` row 1). Crops not listed
        keep their row.
    unlabelled : mapping, optional
        Crop name -> classes that were not labelled in that crop (``info`` row 0 = 0 for them,
        1 for the others). Crops not listed keep their row.

    Returns
    -------
    Path

    Examples
    --------
    >>> write_crop_labels("crops.h5", {"crop_000": label}, not_present={"crop_000": [2]})  # doctest: +SKIP
    """
    path = Path(path)
    source = str(path)
    not_present, unlabelled = dict(not_present or {}), dict(unlabelled or {})
    with _open_crops(path, "r") as fh:
        n_classes = int(fh.attrs.get("n_classes", 0))
        planned: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in sorted(set(labels) | set(not_present) | set(unlabelled)):
            if name not in fh or "raw" not in fh[name]:
                raise InputError(f"no crop {name!r} in the file", source=source)
            group = fh[name]
            info = np.array(group["info"][...], dtype=np.uint8) if "info" in group else \
                np.stack([np.ones(n_classes, np.uint8), np.zeros(n_classes, np.uint8)])
            if name in labels:
                label = np.asarray(labels[name])
                if label.shape != group["raw"].shape:
                    raise InputError(f"labels for {name} have shape {label.shape}, the crop "
                                     f"{group['raw'].shape}", source=source)
                if label.size and (int(label.min()) < -1 or int(label.max()) >= n_classes):
                    raise InputError(f"labels for {name} hold values {int(label.min())}..{int(label.max())}, "
                                     f"expected -1..{n_classes - 1}", source=source)
                label = label.astype(np.int16)
            else:
                label = np.asarray(group["label"][...], dtype=np.int16)
            absent = _classes(not_present.get(name), n_classes, "not-present", source)
            if absent is not None:
                info[1] = 0
                info[1, absent] = 1
            skipped = _classes(unlabelled.get(name), n_classes, "unlabelled", source)
            if skipped is not None:
                info[0] = 1
                info[0, skipped] = 0
            counts = np.bincount(label[label >= 0].ravel().astype(np.int64), minlength=n_classes)
            clash = np.flatnonzero((info[1] == 1) & (counts > 0))
            if clash.size:
                raise InputError(f"{name}: class {int(clash[0])} is marked not present but is painted "
                                 f"({int(counts[clash[0]])} voxels)", source=source)
            planned[name] = (label, info)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a") as fh:
            for name, (label, info) in planned.items():
                group = fh[name]
                if "label" in group and group["label"].shape == label.shape and group["label"].dtype == np.int16:
                    group["label"][...] = label
                else:
                    if "label" in group:
                        del group["label"]
                    group.create_dataset("label", data=label, chunks=True, compression="gzip",
                                         compression_opts=4)
                if "info" in group:
                    del group["info"]
                group.create_dataset("info", data=info)
        replace_output(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
