"""``emseg segment``: objects (uint64 instance labels) from a semantic network, block by block."""
from __future__ import annotations

import click

from emseg.cli._ui import (common_options, device_seed_options, emit, overwrite_option, parse_ints, parse_shape,
                           progress_bar, scheduler_options, state)
from emseg.instances.config import MODES, SegmentConfig, load_segment_config
from emseg.instances.segment import SegmentFileConfig, segment_file

D = SegmentConfig()


def _ints(values) -> str:
    return ",".join(str(v) for v in values)


@click.command("segment")
@click.argument("paths", nargs=-1, metavar="MODEL RAW OUT")
@click.option("--from-probabilities", "probabilities", default=None, metavar="PROBS",
              help="Segment class probabilities (C,*S) written by `emseg predict`; then the only argument is OUT.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="A TOML file whose [segment] table sets any parameter (docs/instances.md); options override it.")
@click.option("--mode", type=click.Choice(MODES), default=None,
              help=f"components: connected components of --classes; watershed: cells between --boundary-classes "
                   f"[default: {D.mode}].")
@click.option("--classes", default=None, help=f"Object classes of components, e.g. 1 [default: {_ints(D.classes)}].")
@click.option("--boundary-classes", default=None,
              help=f"Boundary classes of watershed, e.g. 2,3,4 [default: {_ints(D.boundary_classes)}].")
@click.option("--threshold", type=float, default=None,
              help="components: foreground = summed probability of --classes > this [default: the argmax is one "
                   "of --classes].")
@click.option("--seed-threshold", type=float, default=None,
              help=f"watershed: seeds are the components of boundary probability < this, eroded "
                   f"[default: {D.seed_threshold}].")
@click.option("--min-size", type=click.IntRange(min=0), default=None,
              help=f"Remove objects with fewer voxels, counted over the whole volume [default: {D.min_size}].")
@click.option("--per-section/--3d", "per_section", default=None,
              help="2D objects section by section (anisotropic ssTEM), or 3D objects [default: per-section].")
@click.option("--halo", default=None,
              help=f"watershed: context read around each block, z,y,x or one value [default: {_ints(D.halo)}].")
@click.option("--block", default=None, help="Block shape labelled at once [default: the prediction's blocks].")
@click.option("--patch", default=None, help="Window shape z,y,x or y,x [default: the training patch].")
@click.option("--overlap", type=float, default=None,
              help=f"Fraction of a window shared with its neighbours [default: {SegmentFileConfig.overlap}].")
@click.option("--batch-size", type=int, default=None,
              help="Windows per forward pass [default: 1 on a CPU, 4 on a GPU].")
@scheduler_options("One task per block and pass; needs a zarr OUT; implies --resume.",
                   retries=SegmentFileConfig.retries)
@click.option("--resume", is_flag=True,
              help="Write OUT.partial (zarr) with every pass's finished blocks and, on a rerun, compute only what "
                   "is missing.")
@overwrite_option("an existing OUT dataset or array")
@common_options
@device_seed_options
def command(paths, probabilities, config_path, mode, classes, boundary_classes, threshold, seed_threshold, min_size,
            per_section, halo, block, patch, overlap, batch_size, scheduler, workers, resume, retries, overwrite):
    """Objects of RAW by the network of MODEL, written to OUT as uint64 ids, block by block.

    Memory is bounded by a block and its halo. Ids are consistent across blocks: components are
    exactly those of the whole volume; watershed seeds are merged across blocks, so every object
    keeps one id (docs/instances.md). OUT (zarr, .ome.zarr label image, HDF5 or .tif) is written
    under a temporary name and renamed when complete. With --scheduler or --resume (zarr OUT), a
    crashed run rerun with the same command computes only the blocks not yet done.

    \b
    Example:
      emseg segment runs/vnc/best.pt stack.h5:raw mito.zarr/objects --classes 1 --3d
      emseg segment runs/vnc/best.pt stack.h5:raw cells.ome.zarr --mode watershed --boundary-classes 2,3,4
      emseg segment --from-probabilities pred.zarr/probs cells.h5:cells --mode watershed
      emseg segment runs/vnc/best.pt big.zarr/raw cells.zarr/ids --mode watershed --scheduler local --workers 4
    """
    if probabilities is not None:
        if len(paths) != 1:
            raise click.UsageError("with --from-probabilities give only OUT")
        network = {"--patch": patch, "--overlap": overlap, "--batch-size": batch_size}
        given = [flag for flag, value in network.items() if value is not None]
        if given:
            raise click.UsageError(f"{given[0]} applies to the network form (MODEL RAW OUT), not to "
                                   f"--from-probabilities")
        model = raw = None
        (out,) = paths
    elif len(paths) != 3:
        raise click.UsageError("expected MODEL RAW OUT (or --from-probabilities PROBS OUT)")
    else:
        model, raw, out = paths
    overrides = dict(mode=mode, classes=parse_ints(classes, "--classes"),
                     boundary_classes=parse_ints(boundary_classes, "--boundary-classes"), threshold=threshold,
                     seed_threshold=seed_threshold, min_size=min_size, per_section=per_section,
                     halo=parse_ints(halo, "--halo"), block_shape=parse_shape(block, "--block"))
    seg = load_segment_config(config_path, overrides=overrides) if config_path else SegmentConfig().replace(**overrides)
    app = state()
    network = {k: v for k, v in dict(overlap=overlap, batch_size=batch_size).items() if v is not None}
    cfg = SegmentFileConfig(output=out, model=model, input=raw, probabilities=probabilities, segment=seg,
                            patch_shape=parse_shape(patch), device=app.device, precision=app.precision_choice,
                            overwrite=overwrite, scheduler=scheduler, workers=workers, resume=resume, retries=retries,
                            **network)
    with progress_bar("segment") as update:
        result = segment_file(cfg, progress=lambda done, total: update(done, total, "voxels"))
    emit(result.to_dict(), lambda c: c.print(
        f"wrote {result.output} {tuple(result.shape)}: {result.n_objects:,} objects ({result.mode}, "
        f"{result.blocks} blocks of {tuple(result.block_shape)}, {result.voxels_per_s:,.0f} voxels/s)"))
