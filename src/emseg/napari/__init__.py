"""napari plugin: open emseg outputs, queries and crops; save painted crop labels for ``emseg train``.

The readers and the writer are plain functions (:mod:`emseg.napari._layers`,
:mod:`emseg.napari._crops`) that need neither napari nor Qt; :mod:`emseg.napari._plugin` is the
thin npe2 glue that ``napari.yaml`` names. Install with ``pip install 'emseg[napari]'``.
"""
from __future__ import annotations

from emseg.napari._crops import (
    CROPS_FORMAT,
    crop_names,
    from_layer_labels,
    read_crops,
    to_layer_labels,
    write_crop_labels,
)
from emseg.napari._layers import crops_layers, file_kind, output_layers, queries_layers, read_layers
from emseg.napari._plugin import labels_from_layer, parse_classes

__all__ = [
    "CROPS_FORMAT", "crop_names", "crops_layers", "file_kind", "from_layer_labels", "labels_from_layer",
    "output_layers", "parse_classes", "queries_layers", "read_crops", "read_layers", "to_layer_labels",
    "write_crop_labels",
]
