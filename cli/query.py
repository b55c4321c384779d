"""``emseg query``: choose the patches to label next (active learning), or simulate the loop.

``emseg query MODEL POOL...`` runs the default ``select`` subcommand;
``emseg query simulate CONFIG --out DIR`` runs the simulated experiment.
"""
from __future__ import annotations

import math
from pathlib import Path

import click
from rich.table import Table

from emseg.active import STRATEGIES, get_strategy
from emseg.active.questions.answers import answers_to_cubes
from emseg.active.results import crop_name, read_query_boxes
from emseg.active.query import QueryConfig, query_files
from emseg.active.questions.types import CostModel, parse_costs
from emseg.active.sheet import check_sheet_output, write_query_sheet
from emseg.active.simulation.config import FINETUNE
from emseg.active.simulation.loop import load_simulate_config, run_simulation
from emseg.cli._ui import (
    DefaultCommandGroup,
    common_options,
    device_seed_options,
    emit,
    fmt,
    overwrite_option,
    parse_ints,
    parse_shape,
    progress_bar,
    scheduler_options,
    state,
)
from emseg.io import parse_spec




@click.group("query", cls=DefaultCommandGroup)
def command() -> None:
    """Choose patches to label next with active learning, or simulate the active-learning loop.

    \b
    emseg query MODEL POOL... [OPTIONS]     rank candidate patches (the `select` subcommand)
    emseg query simulate CONFIG --out DIR   simulated experiment with ground truth as oracle
    emseg query answers ANSWERS --out H5    answered presence questions -> lazy training cubes

    \b
    Examples:
      emseg query runs/mito/best.pt stack2.h5:raw --strategy entropy --n 20 --out queries.json
      emseg query simulate active.toml --out runs/al
    """


def _strategy(ctx, param, value: str) -> str:
    try:
        return get_strategy(value).name
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _exclude_map(values: tuple[str, ...], pool: tuple[str, ...]) -> dict[int, tuple[str, ...]]:
    """``[I=]LABELS`` -> {pool index: (label specs)}; without ``I=`` the pool volume is the one in
    the same file, or the only pool volume."""
    out: dict[int, list[str]] = {}
    for value in values:
        head, sep, rest = value.partition("=")
        if sep and head.isdigit():
            index, spec = int(head), rest
            if index >= len(pool):
                raise click.BadParameter(f"{value!r}: there are only {len(pool)} pool volumes (0-based index)",
                                         param_hint="--exclude")
        else:
            spec = value
            same_file = [i for i, p in enumerate(pool) if parse_spec(p).path == parse_spec(spec).path]
            if len(same_file) == 1:
                index = same_file[0]
            elif len(pool) == 1:
                index = 0
            else:
                raise click.BadParameter(f"{value!r}: cannot tell which pool volume it belongs to; write "
                                         "INDEX=LABELS (0-based pool index)", param_hint="--exclude")
        out.setdefault(index, []).append(spec)
    return {k: tuple(v) for k, v in out.items()}


@command.command("select")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("pool", nargs=-1, required=True)
@click.option("--strategy", default=QueryConfig.strategy, callback=_strategy,
              help=f"Selection rule: {', '.join(STRATEGIES)}.")
@click.option("--n", "n", type=int, default=QueryConfig.n, help="Number of patches to choose.")
@click.option("--patch", default=None, help="Patch shape z,y,x or y,x [default: the training patch].")
@click.option("--out", default=None, help="Ranked list as JSON (and CSV with the same stem).")
@click.option("--mc-samples", type=int, default=QueryConfig.mc_samples, help="Dropout passes for bald.")
@click.option("--candidates", type=int, default=None,
              help="Score this many random positions [default: a regular grid of patches].")
@click.option("--reduction", type=click.Choice(["mean", "sum"]), default=QueryConfig.reduction,
              help="Pixel scores to patch score: mean or sum.")
@click.option("--exclude", multiple=True, metavar="[I=]LABELS",
              help="Label volume (-1 = unlabelled) of pool volume I; patches touching labels >= 0 are "
                   "skipped. Repeatable.")
@click.option("--exclude-boxes", multiple=True, type=click.Path(dir_okay=False),
              help="JSON of an earlier query: its boxes are skipped (and serve as labelled centres). "
                   "Repeatable.")
@click.option("--batch-size", type=int, default=QueryConfig.batch_size, help="Patches per forward pass.")
@click.option("--export", default=None, type=click.Path(dir_okay=False),
              help="HDF5 file for the chosen crops (crop_000/raw, label filled with -1, info).")
@click.option("--sheet", default=None, type=click.Path(dir_okay=False),
              help="PNG contact sheet of the chosen patches beside their uncertainty maps (needs matplotlib).")
@click.option("--ask", default="dense", show_default=True, metavar="TYPES",
              help="Question types: dense (label patches, ranked by --strategy), partial (one class of a "
                   "patch), presence (is class k in this box?), auto (all three by value/cost within "
                   "--budget), A+B, or a fixed mix A=0.7+B=0.3. Presence questions come with an answers "
                   "file beside --out (STEM.answers.json).")
@click.option("--budget", type=float, default=None, metavar="SECONDS",
              help="Annotator seconds to spend (--ask auto or a mix; with partial/presence instead of --n).")
@click.option("--costs", default=None, metavar="NAME=SECONDS,...",
              help=f"Cost model: dense and partial in seconds per voxel, presence per question "
                   f"[default: dense={CostModel().dense_cost_per_voxel:g},partial="
                   f"{CostModel().partial_cost_per_voxel:g},presence={CostModel().presence_cost:g}].")
@scheduler_options("Scores the pool in tasks of 256 candidates.")
@overwrite_option("existing --out files (JSON, CSV, answers), --export and --sheet")
@common_options
@device_seed_options
def select_command(model, pool, strategy, n, patch, out, mc_samples, candidates, reduction, exclude,
                   exclude_boxes, batch_size, export, sheet, ask, budget, costs, scheduler, workers, overwrite):
    """Rank candidate patches of the POOL volumes by STRATEGY with the checkpoint MODEL.

    Writes the top --n patches (volume, offset z,y,x, shape, score, rank) to --out as JSON and
    CSV, and with --export their raw crops, ready to annotate and to list as [[train]] cubes.

    \b
    Example:
      emseg query runs/mito/best.pt stack2.h5:raw --strategy entropy --n 20 \\
          --patch 1,256,256 --exclude stack2.h5:label --out queries.json --export crops.h5
    """
    app = state()
    for name, value, low in (("--n", n, 1), ("--mc-samples", mc_samples, 1), ("--batch-size", batch_size, 1)):
        if value < low:
            raise click.BadParameter(f"must be >= {low}, got {value}", param_hint=name)
    if candidates is not None and candidates < 1:
        raise click.BadParameter(f"must be >= 1, got {candidates}", param_hint="--candidates")
    boxes = []
    for path in exclude_boxes:
        boxes += read_query_boxes(path)
    cfg = QueryConfig(model=model, pool=tuple(pool), strategy=strategy, n=n, patch_shape=parse_shape(patch),
                      candidates=candidates, mc_samples=mc_samples, reduction=reduction, batch_size=batch_size,
                      exclude_labels=_exclude_map(exclude, tuple(pool)), exclude_boxes=tuple(boxes), out=out,
                      export=export, seed=app.seed, device=app.device, precision=app.precision_choice,
                      scheduler=scheduler, workers=workers, ask=ask, budget=budget, costs=parse_costs(costs),
                      overwrite=overwrite)
    if sheet:
        check_sheet_output(sheet, overwrite=overwrite)
    with progress_bar(f"query {strategy}") as update:
        result = query_files(cfg, progress=lambda done, total: update(done, total, "patches"))
    if sheet:
        result.outputs["sheet"] = str(write_query_sheet(sheet, result, mc_samples=mc_samples, device=app.device,
                                                        seed=app.seed))

    def render(console):
        what = "questions" if result.questions else "patches"
        table = Table(title=f"{len(result.queries)} {what} by {result.strategy} "
                            f"(of {result.n_candidates} candidates, {result.n_excluded} excluded)")
        asked = result.questions is not None
        for col in ("rank", "volume", f"offset ({result.axes})", "shape", "score") + (
                ("question", "class", "cost s") if asked else ()):
            table.add_column(col, justify="right" if col in ("rank", "score", "class", "cost s") else "left")
        for q in result.queries:
            extra = (q.kind, "-" if q.klass is None else str(q.klass), fmt(q.cost, 1)) if asked else ()
            table.add_row(str(q.rank), q.volume, ",".join(map(str, q.box.offset)), ",".join(map(str, q.box.shape)),
                          fmt(q.score) if q.score is not None and math.isfinite(q.score) else "-", *extra)
        console.print(table)
        if asked:
            console.print(f"spent {result.questions['spent']:.1f} s of annotation"
                          + (f" of a {result.questions['budget']:g} s budget" if result.questions["budget"] else ""))
        if "answers" in result.outputs:
            console.print(f"wrote {result.outputs['answers']}: set each answer to true or false, then "
                          f"emseg query answers {result.outputs['answers']} --out cubes.h5")
        if "json" in result.outputs:
            console.print(f"wrote {result.outputs['json']} and {result.outputs['csv']}")
        if "sheet" in result.outputs:
            console.print(f"wrote {result.outputs['sheet']}")
        for note in result.notes:
            console.print(f"note: {note}", markup=False)
        if export:
            console.print(f"wrote {len(result.queries)} crops to {export}; after labelling, list them in a "
                          f"train config, e.g.:\n[[train]]\nraw = \"{Path(export).name}:{crop_name(1)}/raw\"\n"
                          f"label = \"{Path(export).name}:{crop_name(1)}/label\"", markup=False)

    emit(result.to_dict(), render)


@command.command("answers")
@click.argument("answers", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="HDF5 file for the lazy cubes (cube_000/raw, label all -1, info).")
@overwrite_option("an existing --out file")
@common_options
def answers_command(answers, out, overwrite):
    """Turn the answered presence questions of ANSWERS (JSON) into lazy training cubes.

    Each box answered "no" for some classes becomes one cube: raw crop, labels all -1 and an
    info dataset flagging those classes not present. "Yes" answers flag nothing; unanswered
    (null) entries are skipped. A bad answers file is refused whole and nothing is written.

    \b
    Example:
      emseg query answers queries.answers.json --out cubes.h5
    """
    with progress_bar("cubes") as update:
        result = answers_to_cubes(answers, out, progress=lambda done, total: update(done, total, "cubes"),
                                  overwrite=overwrite)

    def render(console):
        console.print(f"{result.n_no} no, {result.n_yes} yes, {result.n_unanswered} unanswered of "
                      f"{result.n_questions} questions; wrote {len(result.cubes)} lazy cubes to {result.out}")
        if result.cubes:
            name = Path(result.out).name
            console.print(f"list them in a train config (a low prio suits lazy cubes), e.g.:\n[[train]]\n"
                          f"raw = \"{name}:{result.cubes[0]['name']}/raw\"\nlabel = \"{name}:"
                          f"{result.cubes[0]['name']}/label\"\nprio = 0.2", markup=False)

    emit(result.to_dict(), render)


@command.command("simulate")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Experiment folder: curves.csv, curves.png and per-run state (resumable).")
@click.option("--strategies", default=None, help="Comma-separated strategies (overrides the config).")
@click.option("--seeds", default=None, help="Comma-separated seeds (overrides the config).")
@click.option("--iterations", type=int, default=None, help="Query rounds (overrides the config).")
@click.option("--steps-initial", type=int, default=None, help="Training steps of the initial network.")
@click.option("--steps-finetune", type=int, default=None, help="Fine-tuning steps per round.")
@click.option("--init", "init", type=click.Path(dir_okay=False), default=None,
              help="Start the initial network from this checkpoint (of emseg pretrain or emseg train; overrides "
                   "the config's `init`).")
@click.option("--finetune", type=click.Choice(FINETUNE), default=None,
              help="Where each round starts: the previous round's weights, the --init weights, or random weights "
                   "(overrides `finetune`) [default: previous].")
@click.option("--no-plot", is_flag=True, help="Do not draw curves.png.")
@common_options
@device_seed_options
def simulate_command(config, out_dir, strategies, seeds, iterations, steps_initial, steps_finetune, init, finetune,
                     no_plot):
    """Simulated active learning on CONFIG (TOML) with the ground truth as oracle.

    For each seed: train on `initial` random pool patches, then for each strategy and round pick
    `per_iteration` patches, fine-tune and score the test region. Interrupted runs continue where
    they stopped when run again with the same --out. The --seed option is not used: seeds come
    from the config's `seeds` list.

    \b
    Example:
      emseg query simulate active.toml --out runs/al --strategies random,entropy,hybrid
    """
    app = state()
    overrides = {
        "strategies": tuple(s.strip() for s in strategies.split(",") if s.strip()) if strategies else None,
        "seeds": parse_ints(seeds, "--seeds"), "iterations": iterations,
        "steps_initial": steps_initial, "steps_finetune": steps_finetune, "precision": app.precision,
        "init": str(Path(init).resolve()) if init else None, "finetune": finetune,
    }
    cfg = load_simulate_config(config, overrides=overrides)
    with progress_bar("simulate") as update:
        info = {"text": ""}

        def progress(event):
            if event["event"] == "phase":
                info["text"] = f"{event['phase']} {event['strategy'] or 'initial'} seed {event['seed']} " \
                               f"iter {event['iteration']}"
            else:
                update(event["done"], event["total"], info["text"])

        result = run_simulation(cfg, out_dir, runtime=app.runtime, progress=progress, plot=not no_plot)

    def render(console):
        summary = result.summary
        iterations_ = sorted({p["iteration"] for pts in summary.values() for p in pts})
        table = Table(title="mean test Jaccard (foreground classes), mean over seeds")
        table.add_column("strategy")
        for it in iterations_:
            n_lab = next(p["n_labelled"] for pts in summary.values() for p in pts if p["iteration"] == it)
            table.add_column(f"it {it} ({n_lab})", justify="right")
        for name, points in summary.items():
            by_it = {p["iteration"]: p for p in points}
            table.add_row(name, *(fmt(by_it[it]["mean"], 3) if it in by_it else "-" for it in iterations_))
        console.print(table)
        console.print(f"computed {result.computed} of {result.total} rows in {result.seconds:.1f} s; "
                      f"{result.curves_csv}" + (f", {result.curves_png}" if result.curves_png else ""))
        if result.plot_note:
            console.print(f"note: {result.plot_note}")

    emit(result.to_dict(), render)
