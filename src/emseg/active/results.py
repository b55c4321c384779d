"""Writing query results: the ranked list (JSON + CSV) and the chosen crops (HDF5).

The JSON document lists the queries best first with ``offset`` (minimum corner) and ``shape``
in voxel units and ``axes`` (``"zyx"`` or ``"yx"``); the CSV beside it (same stem) holds the
same rows. The crops file has one group per query, ``crop_000`` for rank 1, with

* ``raw``: the raw crop, dtype of the source;
* ``label``: int16, all -1 (unlabelled) until someone annotates it;
* ``info``: ``(2, n_classes)`` uint8, row 0 ``mask_class_labeled`` all 1, row 1
  ``mask_class_not_present`` all 0,

so ``FILE.h5:crop_000/raw`` / ``FILE.h5:crop_000/label`` can be listed as a ``[[train]]`` cube
of ``emseg train`` once labels are drawn. Every file is written under a temporary name and
renamed into place.
"""
from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from emseg.errors import InputError
from emseg.io import atomic_write_text, json_objects, json_safe, read_json_file, replace_output

__all__ = [
    "QUERY_FORMAT",
    "QUERY_FORMAT_VERSION",
    "crop_name",
    "export_crops",
    "napari_note",
    "query_paths",
    "read_query_boxes",
    "write_queries",
]

#: ``format`` key of the query JSON document.
QUERY_FORMAT = "emseg-queries"
#: ``version`` key of the query JSON document.
QUERY_FORMAT_VERSION = 1


def crop_name(rank: int) -> str:
    """Group name of the crop of the query with 1-based ``rank`` (``crop_000`` for rank 1)."""
    return f"crop_{rank - 1:03d}"


def napari_note(axes: str) -> str:
    """How to read offsets and shapes (as stored in the JSON ``convention`` key)."""
    return (f"offset = minimum corner and shape in voxels, axes {axes}; a box covers "
            "offset <= v < offset + shape. napari: Points layer from `center` "
            "(data = [q['center'] for q in queries]); Shapes rectangle per query from the corners "
            "offset and offset + shape - 1 of its last two axes (plus the section index for zyx).")


def query_paths(out: str | Path) -> tuple[Path, Path]:
    """The JSON path (``.json`` added when missing) and the CSV path with the same stem."""
    path = Path(out)
    if path.suffix.lower() != ".json":
        path = path.with_name(path.name + ".json")
    return path, path.with_suffix(".csv")


def write_queries(result: Any, out: str | Path) -> tuple[Path, Path]:
    """Write a :class:`~emseg.active.pool.QueryResult` as JSON and CSV (atomically).

    Parameters
    ----------
    result : QueryResult
    out : str or Path
        JSON path; the CSV gets the same stem.

    Returns
    -------
    tuple of Path
        ``(json_path, csv_path)``.

    Examples
    --------
    >>> write_queries(result, "queries.json")  # doctest: +SKIP
    (PosixPath('queries.json'), PosixPath('queries.csv'))
    """
    json_path, csv_path = query_paths(out)
    doc = json_safe(result.to_dict())
    axes = doc["axes"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    extra = ["question", "class", "cost"] if "ask" in doc else []  # the columns of --ask questions
    writer.writerow(["rank", "volume", "volume_index", *axes, *(f"size_{a}" for a in axes),
                     "score", "strategy", *extra])
    for q in doc["queries"]:
        writer.writerow([q["rank"], q["volume"], q["volume_index"], *q["offset"], *q["shape"],
                         "" if q["score"] is None else repr(q["score"]), q["strategy"],
                         *("" if q[c] is None else q[c] for c in extra)])
    atomic_write_text(json_path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    atomic_write_text(csv_path, buf.getvalue())
    return json_path, csv_path


def read_query_boxes(path: str | Path) -> list[dict[str, Any]]:
    """Boxes (``volume``, ``volume_index``, ``offset``, ``shape``) of an earlier query JSON.

    Examples
    --------
    >>> boxes = read_query_boxes("queries.json")  # doctest: +SKIP
    """
    src = str(path)
    doc = read_json_file(path, what="an emseg query file", max_bytes=MAX_QUERY_BYTES)
    if not isinstance(doc, dict) or not isinstance(doc.get("queries"), list):
        raise InputError("not an emseg query file (no 'queries' list)", source=src)
    boxes = []
    for _, where, q in json_objects(doc["queries"], "query", "offset and shape", src):
        volume, index = q.get("volume"), q.get("volume_index")
        if volume is not None and not isinstance(volume, str):
            raise InputError(f"{where}: 'volume' must be a string", source=src)
        if index is not None and (not _is_int(index) or not 0 <= index < (1 << 20)):
            raise InputError(f"{where}: 'volume_index' must be an integer >= 0, got {json.dumps(index)[:40]}",
                             source=src)
        offset, shape = q.get("offset"), q.get("shape")
        for name, value, low in (("offset", offset, 0), ("shape", shape, 1)):
            if not isinstance(value, list) or not 1 <= len(value) <= 3 or not all(
                    _is_int(v) and low <= v <= MAX_COORDINATE for v in value):
                raise InputError(f"{where}: '{name}' must be 1 to 3 integers in [{low}, {MAX_COORDINATE}], got "
                                 f"{json.dumps(value)[:60]}", source=src)
        if len(offset) != len(shape):
            raise InputError(f"{where}: 'offset' and 'shape' differ in length", source=src)
        boxes.append({"volume": volume, "volume_index": index, "offset": list(offset), "shape": list(shape)})
    return boxes


#: Bounds of a query JSON read back (``--exclude-boxes``): file size and box coordinates.
MAX_QUERY_BYTES = 64 << 20
MAX_COORDINATE = 1 << 40


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def export_crops(
    path: str | Path,
    sources: Sequence[Any],
    queries: Sequence[Any],
    *,
    n_classes: int,
    infos: Sequence[np.ndarray] | None = None,
) -> Path:
    """Write each query's raw crop, an all -1 label and a default ``info`` to an HDF5 file.

    An existing file at ``path`` is replaced (atomically, when the new one is complete).

    Parameters
    ----------
    path : str or Path
        Output ``.h5`` file.
    sources : sequence of array-like
        Raw volumes indexed by the queries' ``box.volume``.
    queries : sequence of Query
        Ranked queries (:func:`~emseg.active.pool.rank_queries`).
    n_classes : int
        Number of classes of the ``info`` dataset.
    infos : sequence of numpy.ndarray, optional
        ``(2, n_classes)`` ``info`` of each query (default: every class labelled, none absent), e.g.
        ``mask_class_labeled`` = one class for a partial question.

    Returns
    -------
    Path

    Examples
    --------
    >>> export_crops("crops.h5", [raw], queries, n_classes=2)  # doctest: +SKIP
    """
    path = Path(path)
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if not path.parent.exists():
        raise InputError("output folder does not exist", source=str(path.parent))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    info = np.zeros((2, n_classes), dtype=np.uint8)
    info[0] = 1
    try:
        with h5py.File(tmp, "w") as fh:
            fh.attrs["format"] = "emseg-query-crops"
            fh.attrs["n_classes"] = n_classes
            for j, q in enumerate(queries):
                box = q.box
                raw = np.asarray(sources[box.volume][box.slices()])
                group = fh.create_group(crop_name(q.rank))
                group.create_dataset("raw", data=raw, chunks=True, compression="gzip", compression_opts=4)
                group.create_dataset("label", shape=raw.shape, dtype=np.int16, fillvalue=-1,
                                     chunks=True, compression="gzip", compression_opts=4)
                group["label"][...] = -1
                group.create_dataset("info", data=info if infos is None else np.asarray(infos[j], dtype=np.uint8))
                if getattr(q, "kind", None) is not None:  # a question of --ask
                    group.attrs["question"] = q.kind
                    group.attrs["class"] = -1 if q.klass is None else int(q.klass)
                group.attrs["rank"] = q.rank
                group.attrs["volume"] = str(q.volume)
                group.attrs["offset"] = list(box.offset)
                group.attrs["shape"] = list(box.shape)
                group.attrs["axes"] = "zyx"[-len(box.shape):]
                group.attrs["strategy"] = q.strategy
                group.attrs["score"] = np.nan if q.score is None else float(q.score)
        replace_output(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
