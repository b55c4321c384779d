"""``emseg lcs``: label-conditioned segmentation (train, infer)."""
from __future__ import annotations

from pathlib import Path

import click

from emseg.cli._ui import (common_options, device_seed_options, emit, fmt, steps_word, training_progress,
                           overwrite_option, parse_ints, parse_shape,
                           precision_overrides, progress_bar, state)
from emseg.lcs import InferConfig, infer_file, load_lcs_config, train_lcs
from emseg.lcs.merge import MERGES


@click.group("lcs")
@common_options
def command():
    """Label-conditioned segmentation: one single-output network for any number of classes.

    The network is conditioned on an atlas image and the atlas mask of the class to segment
    (by default through class prototypes of the atlas, applied by FiLM); inference runs one
    conditioned pass per requested label. See docs/lcs.md.

    \b
    Examples:
      emseg lcs train lcs.toml --out runs/lcs --steps 2000
      emseg lcs infer runs/lcs/best.pt stack2.h5:raw pred.zarr --labels 1,3
    """


@command.command("train")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder: last.pt, best.pt and metrics.csv go here.")
@click.option("--baseline", is_flag=True,
              help="Train the multi-channel baseline (K+1 softmax outputs, no conditioning) instead.")
@click.option("--steps", type=int, default=None, help="Training steps (overrides the config's `steps`).")
@click.option("--batch-size", type=int, default=None, help="Patches per step (overrides `batch_size`).")
@click.option("--lr", type=float, default=None, help="Learning rate (overrides `optim.lr`).")
@click.option("--patch", default=None, help="Patch shape z,y,x or y,x (overrides `patch_shape`; the atlas "
                                            "patch has this shape).")
@click.option("--valid-every", type=int, default=None, help="Validate every N steps (overrides `valid_every`).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@common_options
@device_seed_options
def train_command(config, out_dir, baseline, steps, batch_size, lr, patch, valid_every, resume):
    """Train a label-conditioned U-Net on the cubes of CONFIG (TOML with an [lcs] table).

    \b
    [lcs] keys: classes = [1,2,3,4], atlas_raw = "f.h5:raw", atlas_label = "f.h5:label",
    atlas_offset = [z,y,x] (optional), conditioning = "prototype" | "atlas", merge_prob = 0.5,
    split_prob = 0.0, negative_prob = 0.3, bce_weight = 1.0, dice = "class",
    merge = "calibrated" | "max".

    \b
    Example:
      emseg lcs train lcs.toml --out runs/lcs --steps 2000
      emseg lcs train lcs.toml --out runs/base --steps 2000 --baseline
    """
    app = state()
    cfg, lcs = load_lcs_config(config, overrides={
        "steps": steps, "batch_size": batch_size, "optim.lr": lr, "patch_shape": parse_shape(patch),
        "valid_every": valid_every, **precision_overrides(app)}, baseline=baseline or None)
    with progress_bar("lcs train" if not lcs.baseline else "baseline train") as update:
        progress = training_progress(update)

        result = train_lcs(cfg, lcs, out_dir, runtime=app.runtime, resume=resume, progress=progress)

    payload = dict(result.to_dict(), kind="baseline" if lcs.baseline else "lcs", classes=list(lcs.classes))

    def render(console):
        word = "interrupted" if result.interrupted else "finished"
        kind = "baseline" if lcs.baseline else "label-conditioned"
        console.print(f"{kind} training {word} at step {result.final_step}/{steps_word(cfg)} "
                      f"({result.patches_per_s:.1f} patches/s); checkpoints in {Path(out_dir)}")
        if result.losses:
            console.print(f"last loss {result.losses[-1]:.4f}")
        if result.last_valid:
            dice = [f"{c}: {fmt(result.last_valid.get(f'valid_dice_{c}'))}" for c in lcs.classes]
            console.print(f"validation Dice per class: {', '.join(dice)}  (best mean {fmt(result.best_metric)})")

    emit(payload, render)
    if result.interrupted:
        raise SystemExit(130)


@command.command("infer")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("input_spec", metavar="INPUT")
@click.argument("output_spec", metavar="OUTPUT")
@click.option("--labels", default=None, help="Labels to segment, e.g. 1,3,4 [default: the trained classes].")
@click.option("--atlas-labels", default=None, metavar="FILE:DS",
              help="Another label image on the atlas (patch or whole atlas volume), e.g. finer labels "
                   "never seen in training.")
@click.option("--overlap", type=float, default=InferConfig.overlap,
              help="Fraction of a window shared with its neighbours.")
@click.option("--blend", type=click.Choice(["gaussian", "constant"]), default=InferConfig.blend,
              help="How overlapping windows are weighted.")
@click.option("--batch-size", type=int, default=InferConfig.batch_size,
              help="Windows per forward pass (encoded once, decoded once per label of a label batch).")
@click.option("--label-batch", type=int, default=InferConfig.label_batch,
              help="Labels predicted together over a block (each holds one float32 map of the block: memory "
                   "grows with this, not with the number of labels).")
@click.option("--block", default=None, help="Block shape read at once [default: about 16x512x512].")
@click.option("--merge", type=click.Choice(list(MERGES)), default=None,
              help="How the label maps are merged: a softmax over logits calibrated on the atlas, or the "
                   "largest probability above 0.5 [default: the checkpoint's [lcs] merge].")
@overwrite_option("an existing OUTPUT group (the whole file or store without a group)")
@common_options
@device_seed_options
def infer_command(model, input_spec, output_spec, labels, atlas_labels, overlap, blend, batch_size,
                  label_batch, block, merge, overwrite):
    """Segment INPUT with the checkpoint MODEL into the container OUTPUT.

    OUTPUT is FILE.zarr[/GROUP] or FILE.h5[:GROUP]; it receives float32 `prob_<label>` per label
    and the merged uint8 `labels` map (calibrated: the argmax of a softmax over background and the
    labels' logits, each scaled and shifted to fit the atlas; max: the label with the largest
    probability if above 0.5, else 0). Everything appears at once when complete.

    \b
    Example:
      emseg lcs infer runs/lcs/best.pt stack2.h5:raw pred.zarr --labels 1,3
      emseg lcs infer runs/lcs/best.pt stack2.h5:raw pred.h5:fine --atlas-labels atlas.h5:fine --labels 2,5
    """
    app = state()
    cfg = InferConfig(model=model, input=input_spec, output=output_spec, labels=parse_ints(labels, "--labels"),
                      atlas_labels=atlas_labels, overlap=overlap, blend=blend, batch_size=batch_size,
                      label_batch=label_batch, block_shape=parse_shape(block, "--block"), merge=merge,
                      device=app.device,
                      precision=app.precision_choice, overwrite=overwrite)
    with progress_bar("lcs infer") as update:
        result = infer_file(cfg, progress=lambda done, total: update(done, total, "voxels"))
    emit(result.to_dict(), lambda c: c.print(
        f"wrote {len(result.arrays)} arrays of shape {tuple(result.shape)} into {result.output} "
        f"(labels {', '.join(map(str, result.labels))}; {result.voxels / max(result.seconds, 1e-9):,.0f} voxels/s)"))

