"""``emseg info``: what emseg sees in volumes, before a long run."""
from __future__ import annotations

import click
from rich.table import Table

from emseg.cli._ui import common_options, emit, progress_bar
from emseg.io import describe_volume


def _text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


@click.command("info")
@click.argument("volumes", nargs=-1, required=True)
@click.option("--no-range", is_flag=True, help="Skip the value range (it reads every voxel once).")
@common_options
def command(volumes, no_range):
    """Format, shape, dtype, chunks, voxel size and value range of each VOLUME.

    \b
    VOLUME is any spec emseg reads: FILE.h5:DATASET, FILE.zarr[/ARRAY], FILE.n5/DATASET, FILE.tif,
    FILE.mrc, a folder of 2D slices (DIR/) or a glob ("DIR/*.png").

    \b
    Example:
      emseg info stack.tif "sections/*.png" cells.mrc --json
    """
    infos = []
    for spec in volumes:
        with progress_bar(f"scan {spec}", enabled=None if not no_range else False) as update:
            infos.append(describe_volume(spec, scan=not no_range, progress=update).to_dict())

    def render(console):
        table = Table(title="volumes")
        for name in ("volume", "format", "shape", "dtype", "chunks", "voxel size (nm)", "min", "max"):
            table.add_column(name)
        for info in infos:
            table.add_row(info["spec"], info["format"], _text(info["shape"]), info["dtype"], _text(info["chunks"]),
                          _text(info["voxel_size_nm"]), _text(info["min"]), _text(info["max"]))
        console.print(table)
        for info in infos:
            if info["nonfinite"]:
                console.print(f"[yellow]{info['spec']}: {info['nonfinite']} values are NaN or infinite[/]")

    emit({"volumes": infos}, render)
