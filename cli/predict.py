"""``emseg predict``: sliding-window inference over a volume."""
from __future__ import annotations

import click

from emseg.cli._ui import (common_options, device_seed_options, emit, overwrite_option, parse_shape, progress_bar,
                           scheduler_options, state)
from emseg.semantic.predict import PredictConfig, predict_file


@click.command("predict")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("input_spec", metavar="INPUT")
@click.argument("output_spec", metavar="OUTPUT")
@click.option("--patch", default=None, help="Window shape z,y,x or y,x [default: the training patch].")
@click.option("--overlap", type=float, default=PredictConfig.overlap,
              help="Fraction of a window shared with its neighbours.")
@click.option("--blend", type=click.Choice(["gaussian", "constant"]), default=PredictConfig.blend,
              help="How overlapping windows are weighted.")
@click.option("--batch-size", type=int, default=PredictConfig.batch_size,
              help="Windows per forward pass [default: 1 on a CPU, 4 on a GPU].")
@click.option("--output-type", type=click.Choice(["probabilities", "labels"]), default=PredictConfig.output_type,
              help="Write class probabilities (C,*S) or argmax labels uint8.")
@click.option("--dtype", type=click.Choice(["float32", "uint8"]), default=PredictConfig.dtype,
              help="Sample type of probabilities: float32, or uint8 scaled to 0-255 (p = value/255, 4x less to "
                   "write).")
@click.option("--compile", "compile_", is_flag=True,
              help="Run the network through torch.compile: a one-off compile (a minute or more on a CPU), then "
                   "faster windows; pays off on large volumes.")
@click.option("--block", default=None, help="Block shape read at once [default: about 16x512x512].")
@scheduler_options("One task per block; needs a zarr OUTPUT; implies --resume.", retries=PredictConfig.retries)
@click.option("--resume", is_flag=True,
              help="Write OUTPUT.partial (zarr) and, on a rerun, compute only the blocks not yet done.")
@overwrite_option("an existing OUTPUT dataset or array")
@common_options
@device_seed_options
def command(model, input_spec, output_spec, patch, overlap, blend, batch_size, output_type, dtype, compile_, block,
            scheduler, workers, resume, retries, overwrite):
    """Predict INPUT with the checkpoint MODEL and write OUTPUT, block by block.

    Memory is bounded by the block, not the volume. OUTPUT is written under a temporary name and
    renamed when complete. With --scheduler or --resume, a crashed run rerun with the same command
    computes only the missing blocks (see docs/scaling.md).

    \b
    Example:
      emseg predict runs/mito/best.pt stack2.h5:raw pred.zarr/probs --output-type probabilities
      emseg predict runs/mito/best.pt stack2.h5:raw pred.zarr/probs --scheduler local --workers 4
      emseg predict runs/mito/best.pt stack2.h5:raw pred.ome.zarr   (OME-Zarr 0.5 with a pyramid)
      emseg predict runs/mito/best.pt "sections/*.tif" labels.tif --output-type labels   (for Fiji)
    """
    app = state()
    cfg = PredictConfig(model=model, input=input_spec, output=output_spec, patch_shape=parse_shape(patch),
                        overlap=overlap, blend=blend, batch_size=batch_size, output_type=output_type,
                        dtype=dtype, block_shape=parse_shape(block, "--block"), device=app.device,
                        precision=app.precision_choice, compile=compile_, scheduler=scheduler,
                        workers=workers, resume=resume, retries=retries, overwrite=overwrite)
    with progress_bar("predict") as update:
        result = predict_file(cfg, progress=lambda done, total: update(done, total, "voxels"))
    emit(result.to_dict(), lambda c: c.print(
        f"wrote {result.output} {tuple(result.shape)} ({result.stats.voxels_per_s:,.0f} voxels/s, {result.precision}, "
        f"{result.stats.blocks} blocks" + (f", {result.blocks_skipped} already done"
                                           if result.blocks_skipped else "") + ")"))
