"""``emseg noise``: synthesise noisy labels from clean ones (``emseg noise igtt`` is ``emseg igtt``)."""
from __future__ import annotations

import click

from emseg.cli._ui import (
    DefaultCommandGroup,
    common_options,
    emit,
    fmt,
    overwrite_option,
    parse_shape,
    progress_bar,
    scheduler_options,
    state,
)
from emseg.errors import InputError
from emseg.io import is_ome_path, parse_spec
from emseg.noise.blockwise import NoiseConfig, noise_file

#: Mode options, in the order they are listed in messages.
MODE_OPTIONS = ("--flip", "--sample", "--dilate", "--erode", "--skeleton", "--random", "--shift")

#: Name of the synthesis command that runs when the first argument is not a subcommand.
DEFAULT_COMMAND = "synth"

#: Subcommands, imported lazily (they may not be part of this installation).
SUBCOMMANDS = {"igtt": "emseg.cli.igtt"}

HELP = """Write a noisy copy of the label volume INPUT to OUTPUT (label-noise studies).

\b
Exactly one mode:
  --flip P       RCL: flip exactly round(P*n_k) voxels of each class k to another class
                 (--flip-fg/--flip-bg: separate fractions for binary labels)
  --sample P     RCL: keep round(P*n_k) voxels of each class, the rest -> --unsampled
  --dilate R     PCL: grow every class into background by radius R
  --erode R      PCL: shrink every class by radius R
  --skeleton     PCL: one-voxel-wide skeleton of every class
  --random P     RL: labels independent of INPUT, foreground with probability P
  --shift R      move every foreground voxel by a random offset within radius R
                 (disc, or ball in 3D); voxels leaving the volume are dropped
Voxels labelled -1 (ignore) stay -1. Blocks are read with the halo their mode needs;
random modes draw each voxel's numbers from (--seed, voxel coordinate), so the seed
alone fixes the output, whatever --block. OUTPUT is written atomically and records
mode, parameters, seed and source.

\b
Examples:
  emseg noise stack.h5:label noisy.h5:flip45 --flip 0.45 --report
  emseg noise stack.h5:label noisy.zarr/skel --skeleton
  emseg noise stack.h5:label noisy.zarr/flip45 --flip 0.45 --scheduler local --workers 4
  emseg noise igtt RAW --out DIR          (the same as `emseg igtt`, see its --help)
"""


class NoiseGroup(DefaultCommandGroup):
    """Runs the synthesis command unless the first argument names a subcommand (``igtt``)."""

    default_command = DEFAULT_COMMAND

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == DEFAULT_COMMAND:
            return synth
        if name in SUBCOMMANDS:
            return _load(name)
        return None

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "INPUT OUTPUT (--flip P | --sample P | ...) [OPTIONS]")
        formatter.write_usage(ctx.command_path, "igtt RAW --out DIR [OPTIONS]", prefix="   or: ")

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sub = click.Context(synth, info_name=DEFAULT_COMMAND, parent=ctx)
        synth.format_options(sub, formatter)
        self.format_commands(ctx, formatter)


def _load(name: str) -> click.Command:
    """Import a subcommand lazily; a stand-in that explains itself when it is missing."""
    import importlib

    try:
        return importlib.import_module(SUBCOMMANDS[name]).command
    except ImportError as exc:
        reason = str(exc)

    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                           "help_option_names": []},
                   help="Not available in this installation.")
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def unavailable(args):
        raise InputError(f"`emseg noise {name}` is not available in this installation ({reason})")

    return unavailable


class _DefaultCommand(click.Command):
    """The synthesis command; its usage line omits its own name, which is never typed."""

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        path = ctx.parent.command_path if ctx.parent is not None else ctx.command_path
        formatter.write_usage(path, "INPUT OUTPUT (--flip P | --sample P | ...) [OPTIONS]")


@click.command(DEFAULT_COMMAND, cls=_DefaultCommand, hidden=True, help=HELP)
@click.argument("input_spec", metavar="INPUT")
@click.argument("output_spec", metavar="OUTPUT")
@click.option("--flip", "flip_p", type=float, default=None, metavar="P",
              help="RCL: flip a fraction P of every class to a uniformly drawn other class.")
@click.option("--flip-fg", type=float, default=None, metavar="P",
              help="Binary flip: fraction of class 1 flipped [default: --flip P].")
@click.option("--flip-bg", type=float, default=None, metavar="P",
              help="Binary flip: fraction of class 0 flipped [default: --flip P].")
@click.option("--sample", "sample_p", type=float, default=None, metavar="P",
              help="RCL: keep a fraction P of every class.")
@click.option("--unsampled", type=click.Choice(["-1", "0"]), default=None,
              help="With --sample: label of the voxels not kept, -1 ignore or 0 background [default: -1].")
@click.option("--dilate", "dilate_r", type=int, default=None, metavar="R", help="PCL: dilate by radius R.")
@click.option("--erode", "erode_r", type=int, default=None, metavar="R", help="PCL: erode by radius R.")
@click.option("--skeleton", "skeleton_on", is_flag=True, default=False, help="PCL: skeletonise every class.")
@click.option("--random", "random_p", type=float, default=None, metavar="P",
              help="RL: random labels, foreground with probability P.")
@click.option("--shift", "shift_r", type=int, default=None, metavar="R",
              help="Displace every foreground voxel within radius R (voxels leaving the volume are dropped).")
@click.option("--seed", type=int, default=None, help="Seed of the random modes [default: the global --seed, 0].")
@click.option("--n-classes", type=int, default=None,
              help="Classes of --flip/--random and of the report [default: largest INPUT label + 1].")
@click.option("--per-section/--3d", "per_section", default=None,
              help="3D volumes: morphology per z-section or in 3D "
                   "[default: per section for --skeleton, 3D for --dilate/--erode/--shift].")
@click.option("--halo", type=int, default=None,
              help="With --skeleton: halo in voxels [default: widest object + 4, measured].")
@click.option("--block", default=None,
              help="Block shape z,y,x (or y,x) [default: 16,512,512 in 3D, 2048,2048 in 2D].")
@click.option("--report", is_flag=True,
              help="Print the clean -> noisy transition matrix and its rank; with matplotlib also draw it "
                   "beside an example section (OUTSTEM[_DATASET]_report.png next to OUTPUT).")
@click.option("--rank-tol", type=float, default=None, metavar="TOL",
              help="With --report: singular values <= TOL count as zero in the rank "
                   "[default: 3 sampling errors, from the counts].")
@scheduler_options("One task per block; needs a zarr OUTPUT; a rerun computes only missing blocks.",
                   retries=NoiseConfig.retries)
@overwrite_option("an existing OUTPUT dataset or array")
@common_options
def synth(input_spec, output_spec, flip_p, flip_fg, flip_bg, sample_p, unsampled, dilate_r, erode_r,
          skeleton_on, random_p, shift_r, seed, n_classes, per_section, halo, block, report, rank_tol, scheduler,
          workers, retries, overwrite):
    app = state()
    chosen = [name for name, on in zip(MODE_OPTIONS, (
        flip_p is not None or flip_fg is not None or flip_bg is not None, sample_p is not None,
        dilate_r is not None, erode_r is not None, skeleton_on, random_p is not None, shift_r is not None)) if on]
    if len(chosen) != 1:
        what = "no mode given" if not chosen else f"{' and '.join(chosen)} given"
        raise InputError(f"give exactly one mode of {', '.join(MODE_OPTIONS)} ({what})")
    mode = chosen[0][2:]
    if unsampled is not None and mode != "sample":
        raise InputError("--unsampled applies to --sample only")
    if rank_tol is not None and not report:
        raise InputError("--rank-tol applies to --report only")
    if halo is not None and mode != "skeleton":
        raise InputError("--halo applies to --skeleton only (other modes need an exact, fixed halo)")
    params = {
        "flip": {"p": flip_p, "p_fg": flip_fg, "p_bg": flip_bg},
        "sample": {"p": sample_p, "unsampled": None if unsampled is None else int(unsampled)},
        "dilate": {"radius": dilate_r, "per_section": per_section},
        "erode": {"radius": erode_r, "per_section": per_section},
        "skeleton": {"per_section": per_section, "halo": halo},
        "random": {"p": random_p},
        "shift": {"radius": shift_r, "per_section": per_section},
    }[mode]
    if scheduler is not None and is_ome_path(parse_spec(output_spec).path):
        raise InputError("--scheduler writes plain zarr; drop it for an OME-Zarr OUTPUT", source=output_spec)
    cfg = NoiseConfig(input=input_spec, output=output_spec, mode=mode, params=params,
                      seed=app.seed if seed is None else seed, block_shape=parse_shape(block, "--block"),
                      n_classes=n_classes, report=report, rank_tol=rank_tol, scheduler=scheduler, workers=workers,
                      retries=retries, overwrite=overwrite)
    with progress_bar(f"noise --{mode}") as update:
        result = noise_file(cfg, progress=lambda done, total: update(done, total, "blocks"))
    doc = result.to_dict()
    if result.report is not None:
        from emseg.noise.figure import noise_figure

        figure = noise_figure(input_spec, output_spec, result.report, title=f"--{mode}")
        doc["report_figure"] = None if figure is None else str(figure)

    def render(console):
        shown = ", ".join(f"{k}={v}" for k, v in result.params.items() if v is not None)
        console.print(f"wrote {result.output} {tuple(result.shape)} {result.dtype}: --{mode} ({shown}), "
                      f"seed {result.seed}, {result.blocks} blocks of {tuple(result.block_shape)} "
                      f"halo {tuple(result.halo)} ({result.voxels_per_s:,.0f} voxels/s)")
        if result.report is not None:
            console.print(report_table(result.report))
        if doc.get("report_figure"):
            console.print(f"wrote {doc['report_figure']}")

    emit(doc, render)


def report_table(report: dict):
    """Rich table of a noise report: transition matrix rows (clean) by columns (noisy)."""
    from rich.table import Table

    k = report["n_classes"]
    agreement = fmt(report["agreement"])
    svals = ", ".join(fmt(v) for v in report.get("singular_values", []))
    table = Table(title=f"transition clean -> noisy: rank {report['rank']} of {len(report.get('rank_classes', []))} "
                        f"present classes, agreement {agreement}",
                  caption=f"rows: clean class; columns: P(noisy | clean) over voxels labelled in both\n"
                          f"singular values {svals}; zero at or below {fmt(report.get('rank_tol'))} "
                          f"(sampling error {fmt(report.get('rank_sampling_error'))})")
    table.add_column("clean", justify="right")
    for j in range(k):
        table.add_column(f"-> {j}", justify="right")
    for col in ("kept", "labelled", "voxels"):
        table.add_column(col, justify="right")
    for i in range(k):
        table.add_row(str(i), *(fmt(v) for v in report["matrix"][i]), fmt(report["kept_fraction"][i]),
                      fmt(report["labelled_fraction"][i]), str(report["clean_counts"][i]))
    return table


command = NoiseGroup("noise", help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
command.add_command(synth)
