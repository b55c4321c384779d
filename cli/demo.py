"""``emseg demo``: the embedded default job on synthetic EM-like data."""
from __future__ import annotations

import click

from emseg.cli._ui import common_options, device_seed_options, emit, progress_bar, scores_table, state
from emseg.semantic.demo import run_demo


@click.command("demo")
@click.option("--out", "out_dir", default="demo-out", type=click.Path(file_okay=False),
              help="Folder for the generated data, the run and the prediction.")
@click.option("--steps", type=int, default=250, help="Training steps (about a minute on 2 CPU cores).")
@common_options
@device_seed_options
def command(out_dir, steps):
    """Generate a synthetic EM volume, train a small U-Net, predict held-out sections, score them.

    \b
    Example:
      emseg demo --out demo-out
    """
    app = state()
    with progress_bar("train") as t_update, progress_bar("predict") as p_update:
        result = run_demo(out_dir, steps=steps, runtime=app.runtime,
                          train_progress=lambda i: t_update(i["step"], i["total"], f"loss {i['loss']:.4f}"),
                          predict_progress=lambda d, t: p_update(d, t))
    payload = result.to_dict()

    def render(console):
        tr = result.train
        console.print(f"trained {tr.final_step} steps in {tr.seconds:.1f} s ({tr.patches_per_s:.1f} patches/s), "
                      f"final loss {tr.losses[-1]:.4f}")
        console.print(f"predicted held-out sections at {result.predict.stats.voxels_per_s:,.0f} voxels/s")
        console.print(scores_table(payload["test_scores"], "test Jaccard per class (held-out sections 8-11)",
                                   list(result.classes)))

    emit(payload, render)
