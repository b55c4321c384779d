"""``emseg train``: U-Net training with lazy labels."""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import click

from emseg.cli._ui import (common_options, device_seed_options, emit, fmt, steps_word, training_progress,
                           parse_shape, precision_overrides,
                           progress_bar, state)
from emseg.engine.config import load_config
from emseg.io import open_volume
from emseg.engine.monitor import TrainingMonitor
from emseg.semantic.train import train


@click.command("train")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder: last.pt, best.pt and metrics.csv go here.")
@click.option("--steps", type=int, default=None, help="Training steps (overrides the config's `steps`).")
@click.option("--batch-size", type=int, default=None, help="Patches per step (overrides `batch_size`).")
@click.option("--lr", type=float, default=None, help="Learning rate (overrides `optim.lr`).")
@click.option("--patch", default=None, help="Patch shape z,y,x or y,x (overrides `patch_shape`).")
@click.option("--valid-every", type=int, default=None, help="Validate every N steps (overrides `valid_every`).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--init", "init", default=None, type=click.Path(dir_okay=False),
              help="Start from the weights of this checkpoint (of `emseg pretrain` or `emseg train`; same "
                   "architecture; the output head is re-initialised when the class count differs). "
                   "Overrides the config's `init`.")
@click.option("--encoder-lr-scale", type=click.FloatRange(0, 1), default=None,
              help="With --init (and again with --resume): the encoder's learning rate as a fraction of the "
                   "rest's; 0 freezes its weights, batch-norm statistics still adapt (overrides "
                   "`optim.encoder_lr_scale`).")
@click.option("--compile", "compile_", is_flag=True, default=None,
              help="Run the network through torch.compile (overrides `compile`): a one-off compile of a minute or "
                   "more on a CPU, then faster steps.")
@click.option("--tensorboard", is_flag=True,
              help="Also log loss, lr, validation scores and a validation image to OUT/tensorboard.")
@common_options
@device_seed_options
def command(config, out_dir, steps, batch_size, lr, patch, valid_every, resume, init, encoder_lr_scale, compile_,
            tensorboard):
    """Train a U-Net on the cubes listed in CONFIG (TOML), with lazy labels.

    Labels -1 are ignored; an `info` dataset beside a label dataset sets the lazy-label masks
    mask_class_labeled / mask_class_not_present. Ctrl-C saves last.pt and stops; --resume continues.
    With matplotlib installed, curves.png (loss, lr, validation Jaccard) is redrawn at each validation.

    \b
    Example:
      emseg train train.toml --out runs/mito --steps 2000
      emseg train train.toml --out runs/mito_ft --init runs/pretrain/last.pt
    """
    app = state()
    if init is not None and resume:
        raise click.UsageError("--init starts a new run; --resume continues one from its last.pt: pass one of them")
    cfg = load_config(config, overrides={"steps": steps, "batch_size": batch_size, "optim.lr": lr,
                                         "patch_shape": parse_shape(patch), "valid_every": valid_every,
                                         "compile": compile_, "optim.encoder_lr_scale": encoder_lr_scale,
                                         "init": None if init is None else str(Path(init).absolute()),
                                         **precision_overrides(app)})
    with progress_bar("train") as update, ExitStack() as stack:
        progress = training_progress(update)

        valid = None
        if tensorboard and cfg.valid:
            cube = cfg.valid[0]
            valid = tuple(stack.enter_context(open_volume(s)) for s in (cube.raw, cube.label))
        monitor = TrainingMonitor(out_dir, tensorboard=tensorboard, valid=valid, patch_shape=cfg.patch_shape,
                                  n_classes=cfg.n_classes, then=progress)
        stack.callback(monitor.close)
        result = train(cfg, out_dir, runtime=app.runtime, resume=resume, progress=monitor)

    def render(console):
        state_word = "interrupted" if result.interrupted else "finished"
        console.print(f"training {state_word} at step {result.final_step}/{steps_word(cfg)} "
                      f"({result.patches_per_s:.1f} patches/s, {result.precision}); checkpoints in {Path(out_dir)}")
        if result.init:
            console.print(init_summary(result.init))
        if result.losses:
            console.print(f"last loss {result.losses[-1]:.4f}")
        if result.last_valid:
            jac = [fmt(v) for k, v in result.last_valid.items() if k.startswith("valid_jaccard_")]
            console.print(f"validation Jaccard per class: {', '.join(jac)}  (best score {fmt(result.best_metric)})")

    emit(result.to_dict(), render)
    if result.interrupted:
        raise SystemExit(130)


def init_summary(init: dict) -> str:
    """One line saying which checkpoint started the run and what of it was loaded."""
    text = (f"started from {init['path']} (sha256 {init['sha256'][:12]}, task {init['task'] or '?'}): "
            f"{init['loaded']} tensors loaded")
    if init["reinitialised"]:
        text += f", re-initialised: {', '.join(init['reinitialised'])}"
    return text
