"""``emseg igtt`` (also ``emseg noise igtt``): unsupervised binary segmentation by iterative ground-truth training."""
from __future__ import annotations

import click
from rich.table import Table

from emseg.cli._ui import common_options, device_seed_options, emit, fmt, parse_ints, parse_shape, progress_bar, state
from emseg.igtt import IGTTConfig, run_igtt

_D = IGTTConfig()


def igtt_to_ome(out_dir: str, raw: str):
    """prediction.zarr and segmentation.zarr of an iGTT run as one OME-Zarr store, scaled like RAW."""
    from pathlib import Path

    from emseg.io import open_volume, voxel_size_of, write_ome

    out = Path(out_dir)
    with open_volume(raw) as src, open_volume(str(out / "prediction.zarr")) as prob, \
            open_volume(str(out / "segmentation.zarr")) as seg:
        return write_ome(out / "prediction.ome.zarr", image=prob, channel=True, labels={"segmentation": seg},
                         voxel_size=voxel_size_of(src), attrs=prob.attrs)


def _cell(key: str, value) -> str:
    if key == "inverted":
        return "yes" if value else "no"
    if key == "seconds":
        return fmt(value, 1)
    return fmt(value, 3)


@click.command("igtt", context_settings={"show_default": True})
@click.argument("raw")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: model.pt, metrics.csv, prediction.zarr, segmentation.zarr, report.json.")
@click.option("--label", default=None, help="Ground truth (FILE.h5:DS / FILE.zarr/ARR), only for scores.")
@click.option("--foreground", default=None,
              help="Label values counted as foreground in --label, e.g. 2,3,4 [default: every value > 0].")
@click.option("--epochs", type=int, default=_D.epochs, help="Iterations: train, predict, select, EMS.")
@click.option("--thresholds", "n_thresholds", type=int, default=_D.n_thresholds,
              help="K thresholds evenly spaced between the prediction's min and max.")
@click.option("--ems/--no-ems", default=_D.ems, help="Extract meta-structures (skeleton, shift, sample) "
              "from the chosen mask, or train on the mask itself.")
@click.option("--shift-radius", type=int, default=_D.shift_radius, help="EMS: random shift radius r (voxels).")
@click.option("--sample-fraction", type=float, default=_D.sample_fraction,
              help="EMS: fraction of each class kept (the rest is ignored by the loss).")
@click.option("--dmi-weight", type=float, default=_D.dmi_weight, help="Weight of the DMI loss term.")
@click.option("--iou-weight", type=float, default=_D.iou_weight, help="Weight of the IoU loss term.")
@click.option("--steps-per-epoch", type=int, default=_D.steps_per_epoch, help="Training steps per epoch.")
@click.option("--batch-size", type=int, default=_D.batch_size, help="Patches per step.")
@click.option("--patch", default=",".join(map(str, _D.patch_shape)), help="Training patch y,x.")
@click.option("--depth", type=int, default=_D.depth, help="U-Net down-sampling steps.")
@click.option("--base-width", type=int, default=_D.base_width, help="U-Net feature maps at the first level.")
@click.option("--lr", type=float, default=_D.lr, help="Adam learning rate.")
@click.option("--predict-window", type=int, default=_D.predict_window, help="Sliding-window side for prediction.")
@click.option("--invert-large/--no-invert-large", default=_D.invert_large,
              help="Invert a chosen mask covering more than half of the image (foreground is the minority).")
@click.option("--adaptive-block", type=int, default=_D.adaptive_block_size,
              help="Adaptive-threshold baseline: odd neighbourhood size.")
@click.option("--adaptive-offset", type=float, default=_D.adaptive_offset,
              help="Adaptive-threshold baseline: offset subtracted from the local mean.")
@click.option("--baselines/--no-baselines", default=_D.baselines, help="Report Otsu and adaptive thresholding.")
@click.option("--save-pseudo-labels", is_flag=True, help="Write each epoch's labels to pseudo_labels.h5:epoch_NN.")
@click.option("--resume", is_flag=True, help="Continue the run in --out after its last completed epoch.")
@click.option("--ome-zarr", "ome_zarr", is_flag=True,
              help="Also write prediction.ome.zarr (OME-Zarr 0.5: the probability, labels/segmentation).")
@common_options
@device_seed_options
def command(raw, out_dir, label, foreground, epochs, n_thresholds, ems, shift_radius, sample_fraction,
            dmi_weight, iou_weight, steps_per_epoch, batch_size, patch, depth, base_width, lr, predict_window,
            invert_large, adaptive_block, adaptive_offset, baselines, save_pseudo_labels, resume, ome_zarr):
    """Segment RAW into foreground/background without labels (iGTT, Luo et al. 2022).

    Starting from all-background labels, each epoch trains a sigmoid U-Net (DMI + IoU loss),
    predicts RAW, keeps the thresholded prediction with the lowest DMI, and turns it into the next
    labels through skeleton, random shift and random sampling. Otsu and adaptive thresholding are
    reported alongside; --label adds Dice, AUC and accuracy (the labels are never trained on).

    \b
    Example:
      emseg igtt vnc.h5:raw --out runs/igtt --label vnc.h5:label --foreground 2,3,4 --epochs 10
    """
    app = state()
    cfg = IGTTConfig(
        epochs=epochs, n_thresholds=n_thresholds, ems=ems, shift_radius=shift_radius,
        sample_fraction=sample_fraction, invert_large=invert_large, dmi_weight=dmi_weight, iou_weight=iou_weight,
        steps_per_epoch=steps_per_epoch, batch_size=batch_size, patch_shape=parse_shape(patch), depth=depth,
        base_width=base_width, lr=lr, predict_window=predict_window, adaptive_block_size=adaptive_block,
        adaptive_offset=adaptive_offset, baselines=baselines, save_pseudo_labels=save_pseudo_labels,
        precision=app.precision_choice)
    with progress_bar("igtt") as update:
        def progress(info):
            if info["phase"] == "train":
                update(info["step"], info["total"], f"epoch {info['epoch']}/{info['epochs']}  loss {info['loss']:.4f}")

        result = run_igtt(raw, cfg, out_dir, label=label, foreground=parse_ints(foreground, "--foreground"),
                      runtime=app.runtime, progress=progress, resume=resume)

    if ome_zarr and result.complete:
        result.outputs["prediction.ome.zarr"] = str(igtt_to_ome(out_dir, raw))

    def render(console):
        table = Table(title="iGTT epochs")
        cols = [("epoch", "epoch"), ("threshold", "thr"), ("dmi", "DMI"), ("fg_fraction", "fg"),
                ("inverted", "inv"), ("train_loss", "loss")]
        if label is not None:
            cols += [("dice", "Dice"), ("auc", "AUC"), ("accuracy", "acc")]
        cols.append(("seconds", "s"))
        for _, head in cols:
            table.add_column(head, justify="right")
        for row in result.rows:
            table.add_row(*(_cell(key, row.get(key)) for key, _ in cols))
        console.print(table)
        if result.baselines or result.scores:
            comp = Table(title="iGTT vs thresholding")
            for col in ("method", "fg_fraction", "inverted", "dice", "auc", "accuracy"):
                comp.add_column(col, justify="left" if col == "method" else "right")
            if result.complete:
                s = result.scores or {}
                comp.add_row("igtt", fmt(result.fg_fraction), str(result.inverted), fmt(s.get("dice")),
                             fmt(s.get("auc")), fmt(s.get("accuracy")))
            for name, b in result.baselines.items():
                comp.add_row(name, fmt(b.get("fg_fraction")), str(b.get("inverted")), fmt(b.get("dice")),
                             fmt(b.get("auc")), fmt(b.get("accuracy")))
            console.print(comp)
        word = "finished" if result.complete else ("interrupted" if result.interrupted else "stopped")
        console.print(f"iGTT {word} at epoch {result.final_epoch}/{result.epochs} in {result.seconds:.1f} s; "
                      f"outputs in {out_dir}")

    emit(result.to_dict(), render)
    if result.interrupted:
        raise SystemExit(130)
