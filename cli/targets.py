"""``emseg targets``: class labels with object boundaries (0 background, 1 interior, 2 boundary)."""
from __future__ import annotations

import click

from emseg.cli._ui import common_options, emit, overwrite_option, parse_ints, progress_bar
from emseg.instances.targets import TargetsConfig, make_targets

D = TargetsConfig()


@click.command("targets")
@click.argument("labels")
@click.argument("out")
@click.option("--from-classes", "classes", default=None, metavar="CLASSES",
              help="LABELS are classes: the objects are the connected components of these classes, e.g. 1.")
@click.option("--enclosed-by", default=None, metavar="CLASSES",
              help="LABELS are classes: these boundary classes become the boundary, the regions they enclose "
                   "the interior, e.g. 2,3,4.")
@click.option("--width", type=click.IntRange(min=1), default=D.width,
              help="Boundary thickness in voxels inside each object (with --enclosed-by: grown into the regions "
                   "by width - 1).")
@click.option("--per-section/--3d", "per_section", default=D.per_section,
              help="Neighbours in-plane only, section by section (anisotropic ssTEM), or in 3D (the whole volume "
                   "in memory).")
@overwrite_option("an existing OUT dataset or array")
@common_options
def command(labels, out, classes, enclosed_by, width, per_section, overwrite):
    """Training targets from LABELS written to OUT: 0 background, 1 object interior, 2 boundary.

    \b
    LABELS are instance ids (0 background, -1 ignore) unless --from-classes or --enclosed-by says
    they are classes. An object voxel within --width of another id (another object or background)
    is a boundary voxel, so objects that touch are separated; -1 voxels stay -1. OUT (int8 when
    -1 occurs, uint8 otherwise, n_classes = 3) is a label volume for `emseg train`; a network
    trained on it gives `emseg segment --mode watershed --boundary-classes 2` its boundaries.

    \b
    Example:
      emseg targets stack.h5:mito_ids targets.h5:mito
      emseg targets stack.h5:labels targets.h5:mito --from-classes 1
      emseg targets stack.h5:labels targets.h5:cells --enclosed-by 2,3,4
    """
    if classes is not None and enclosed_by is not None:
        raise click.UsageError("give --from-classes or --enclosed-by, not both")
    class_ids = parse_ints(classes, "--from-classes") or ()
    boundary_ids = parse_ints(enclosed_by, "--enclosed-by") or ()
    config = TargetsConfig(labels=labels, output=out, source="classes" if class_ids or boundary_ids else "instances",
                           classes=class_ids, enclosed_by=boundary_ids, width=width, per_section=per_section,
                           overwrite=overwrite)
    with progress_bar("targets") as update:
        result = make_targets(config, progress=lambda done, total: update(done, total, "sections"))
    counts = result.counts
    emit(result.to_dict(), lambda c: c.print(
        f"wrote {result.output} {tuple(result.shape)} {result.dtype}: {result.n_objects:,} objects; voxels "
        f"background {counts['background']:,}, interior {counts['interior']:,}, boundary {counts['boundary']:,}, "
        f"ignored {counts['ignored']:,}"))
