"""Volume input/output: lazy reading of every supported format, staged outputs (one array or a
group, renamed into place when complete), lazy-label info.

A volume is addressed as ``PATH.h5:DATASET`` (also ``.hdf5``/``.hdf``), ``PATH.zarr[/ARRAY]``,
``PATH.n5/DATASET``, ``PATH.tif`` (multi-page), ``PATH.mrc``, ``DIR/`` or ``"DIR/*.png"`` (2D
slices); ``PATH.ome.zarr`` is read and written as OME-Zarr 0.5 (level ``/N``, labels
``/labels/NAME``). Outputs are HDF5, zarr, OME-Zarr or TIFF. See docs/formats.md.
"""
from __future__ import annotations

from emseg.io._describe import VolumeInfo, describe_volume
from emseg.io._claim import check_overwrite, claim_output, claim_outputs
from emseg.io._files import (atomic_write_json, atomic_write_text, check_output_location, json_objects, json_safe,
                             read_json_file, read_toml, save_figure)
from emseg.io._output import OutputGroup, OutputVolume, create_volume, open_output_group, parse_group_spec
from emseg.io._store import StagedOutput, auto_chunks, replace_output, zarr_compressors
from emseg.io._volume import (
    Volume,
    VolumeRegion,
    VolumeSpec,
    check_distinct,
    check_output_volume,
    clean_output_temps,
    open_volume,
    parse_spec,
)
from emseg.io.ome import OmeOutputGroup, is_ome_path, voxel_size_of, write_ome
from emseg.io._validate import (
    check_not_empty,
    check_not_present,
    check_patch_fits,
    check_raw,
    read_info,
    validate_labels,
)

__all__ = [
    "OmeOutputGroup",
    "OutputGroup",
    "OutputVolume",
    "StagedOutput",
    "Volume",
    "VolumeInfo",
    "VolumeRegion",
    "VolumeSpec",
    "atomic_write_json",
    "atomic_write_text",
    "save_figure",
    "auto_chunks",
    "check_distinct",
    "check_not_empty",
    "check_output_location",
    "check_overwrite",
    "claim_output",
    "claim_outputs",
    "check_output_volume",
    "clean_output_temps",
    "check_not_present",
    "check_patch_fits",
    "check_raw",
    "create_volume",
    "describe_volume",
    "open_output_group",
    "open_volume",
    "is_ome_path",
    "json_objects",
    "json_safe",
    "parse_group_spec",
    "read_json_file",
    "read_toml",
    "parse_spec",
    "read_info",
    "replace_output",
    "validate_labels",
    "voxel_size_of",
    "write_ome",
    "zarr_compressors",
]
