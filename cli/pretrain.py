"""``emseg pretrain``: self-supervised pretraining on raw volumes."""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import click

from emseg.cli._ui import (common_options, device_seed_options, emit, parse_shape, precision_overrides, progress_bar,
                           state, steps_word, training_progress)
from emseg.engine.monitor import TrainingMonitor
from emseg.pretrain import load_pretrain_config, pretrain
from emseg.pretrain.pretext import KINDS


@click.command("pretrain")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder: last.pt, metrics.csv and curves.png go here.")
@click.option("--kind", type=click.Choice(KINDS), default=None,
              help="Pretext task (overrides `pretext.kind`) [default: the config's, else masked].")
@click.option("--steps", type=int, default=None, help="Training steps (overrides the config's `steps`).")
@click.option("--max-seconds", type=float, default=None,
              help="Stop after this many seconds (overrides `max_seconds`).")
@click.option("--batch-size", type=int, default=None, help="Patches per step (overrides `batch_size`).")
@click.option("--lr", type=float, default=None, help="Learning rate (overrides `optim.lr`).")
@click.option("--patch", default=None, help="Patch shape z,y,x or y,x (overrides `patch_shape`).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--tensorboard", is_flag=True, help="Also log the loss and lr to OUT/tensorboard.")
@common_options
@device_seed_options
def command(config, out_dir, kind, steps, max_seconds, batch_size, lr, patch, resume, tensorboard):
    """Pretrain a U-Net on the raw volumes of CONFIG (TOML), without labels.

    The [pretext] table chooses the task: "masked" (hide 60% of 16x16 blocks, reconstruct them)
    or "denoise" (remove added Gaussian noise). The network is the [model] of `emseg train`, so
    `emseg train --init OUT/last.pt` starts from it (the output head is re-initialised).
    Ctrl-C saves last.pt and stops; --resume continues. See docs/pretrain.md.

    \b
    Example:
      emseg pretrain pretrain.toml --out runs/pre --max-seconds 3600
      emseg train train.toml --out runs/mito --init runs/pre/last.pt
    """
    app = state()
    cfg = load_pretrain_config(config, overrides={
        "steps": steps, "max_seconds": max_seconds, "batch_size": batch_size, "optim.lr": lr,
        "patch_shape": parse_shape(patch), "pretext.kind": kind, **precision_overrides(app)})
    with progress_bar("pretrain") as update, ExitStack() as stack:
        monitor = TrainingMonitor(out_dir, tensorboard=tensorboard, then=training_progress(update))
        stack.callback(monitor.close)
        result = pretrain(cfg, out_dir, runtime=app.runtime, resume=resume, progress=monitor)

    payload = dict(result.to_dict(), kind=cfg.pretext.kind, checkpoint=str(Path(out_dir) / "last.pt"))

    def render(console):
        word = "interrupted" if result.interrupted else "finished"
        console.print(f"pretraining ({cfg.pretext.kind}) {word} at step {result.final_step}/{steps_word(cfg.training)} "
                      f"({result.patches_per_s:.1f} patches/s, {result.precision}); checkpoint "
                      f"{Path(out_dir) / 'last.pt'}")
        if result.losses:
            console.print(f"last pretext loss {result.losses[-1]:.4f}")
        console.print(f"next: emseg train CONFIG --out RUN --init {Path(out_dir) / 'last.pt'}")

    emit(payload, render)
    if result.interrupted:
        raise SystemExit(130)
