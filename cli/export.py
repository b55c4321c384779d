"""``emseg export``: a trained checkpoint as a bioimage.io model package."""
from __future__ import annotations

import click

from emseg.cli._ui import common_options, emit, overwrite_option, parse_shape
from emseg.semantic.export import export_model


@click.command("export")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("output", metavar="OUT.zip")
@click.option("--test-input", default=None,
              help="Volume whose central patch becomes the test tensor [default: a synthetic EM patch].")
@click.option("--name", default=None, help="Model name [default: the run folder's name].")
@click.option("--license", "license_", default="MIT", show_default=True, help="SPDX licence of the weights.")
@click.option("--author", "authors", multiple=True, help="An author (repeatable) [default: emseg user].")
@click.option("--halo", default=None, help="Output halo per spatial axis [default: a quarter of the patch].")
@overwrite_option("an existing OUT.zip")
@common_options
def command(model, output, test_input, name, license_, authors, halo, overwrite):
    """Write MODEL (a checkpoint of `emseg train`) as a bioimage.io model package (spec 0.5).

    The zip holds rdf.yaml, the U-Net source and kwargs, pytorch_state_dict and TorchScript weights,
    test tensors computed by emseg, a cover image, a README on the training data, licence and
    citations (the training files' own included).

    \b
    Example:
      emseg export runs/mito/best.pt mito.zip --test-input vnc.h5:raw --author "A. Person"
    """
    result = export_model(model, output, test_input=test_input, name=name, license=license_,
                          authors=authors or ("emseg user",), halo=parse_shape(halo, "--halo"),
                          overwrite=overwrite)
    emit(result.to_dict(), lambda c: c.print(
        f"wrote {result.output}: axes {result.axes}, patch {result.patch_shape}, halo {result.halo}, "
        f"{result.n_classes} classes"))
