"""OME-Zarr 0.5: images and labels with a down-sampled pyramid, written atomically; levels read lazily.

An output whose path ends in ``.ome.zarr`` is an OME-Zarr 0.5 store (zarr v3, metadata under the
``ome`` attribute): float data become a multiscale image (axes ``c`` for probability channels, then
``z``, ``y``, ``x``), integer data a multiscale label image (``image-label`` with a colour per
value), either at the root or, as ``OUT.ome.zarr/labels/NAME``, beside an image in ``labels/``
with the image's levels. Levels are computed blockwise from the level above, so memory is bounded
by a block, not the volume: mean pooling for images, nearest (every other voxel) for labels.
Scale and units (nanometer) come from the input's voxel size when it carries one.

Reading: ``FILE.ome.zarr`` (level 0), ``FILE.ome.zarr/N`` (level N), ``FILE.ome.zarr/labels/NAME[/N]``.
"""
from __future__ import annotations

from emseg.io._ome import (
    MIN_LEVEL_SIDE,
    OME_SUFFIX,
    OME_VERSION,
    build_multiscale,
    downsample_level,
    factors_of,
    is_ome_path,
    label_colors,
    multiscales_of,
    open_ome,
    plan_factors,
    voxel_size_of,
)
from emseg.io._ome_write import OmeOutputGroup, OmeOutputVolume, OmeStore, write_labels_list, write_ome
from emseg.io._volume import voxel_size_from_source

__all__ = [
    "MIN_LEVEL_SIDE", "OME_SUFFIX", "OME_VERSION", "OmeOutputGroup", "OmeOutputVolume", "OmeStore",
    "build_multiscale", "downsample_level", "factors_of", "is_ome_path", "label_colors", "multiscales_of",
    "open_ome", "plan_factors", "voxel_size_from_source", "voxel_size_of", "write_labels_list", "write_ome",
]
