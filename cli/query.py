"""``emseg query``: not built yet."""
from __future__ import annotations

import click


@click.command("query", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def command(args):
    """Not available yet in this version of emseg."""
    click.echo("error: `emseg query` is not available yet in this version", err=True)
    raise SystemExit(2)
