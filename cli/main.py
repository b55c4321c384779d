"""The ``emseg`` command group: global options and error handling."""
from __future__ import annotations

import sys
import traceback

import click

from emseg import __version__
from emseg.device import configure_threads
from emseg.errors import InputError, TrainingDiverged
from emseg.cli._ui import AppState

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100, "show_default": True}


class EmsegGroup(click.Group):
    """Maps emseg's errors to one-line messages and exit codes (2 bad input, 1 unexpected)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            self._usage_error(exc)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            self._usage_error(exc)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except TrainingDiverged as exc:
            self._fail(ctx, exc, 1)
        except (InputError, ValueError, FileNotFoundError) as exc:
            # Cores raise ValueError (InputError is one) for bad arguments: a usage problem, exit 2.
            self._fail(ctx, exc, 2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:  # unexpected failure
            self._fail(ctx, exc, 1, prefix="unexpected error: ")

    @staticmethod
    def _usage_error(exc: click.UsageError) -> None:
        """One line ``error: ...`` (with a pointer to --help) instead of click's usage block."""
        if isinstance(exc, click.exceptions.NoArgsIsHelpError):
            raise exc
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        raise click.exceptions.Exit(exc.exit_code)

    @staticmethod
    def _fail(ctx: click.Context, exc: BaseException, code: int, prefix: str = "") -> None:
        app = ctx.find_object(AppState)
        if app is not None and app.verbose:
            traceback.print_exception(exc, file=sys.stderr)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if prefix:
            message = f"{type(exc).__name__}: {message}"
        click.echo(f"error: {prefix}{message}", err=True)
        ctx.exit(code)


@click.group(cls=EmsegGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="emseg")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars and no human-readable summary.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where to compute: auto picks CUDA when available.")
@click.option("--seed", default=0, type=int, help="Seeds python, numpy and torch.")
@click.option("--precision", default=None, type=click.Choice(["auto", "fp32", "bf16"]),
              help="Network arithmetic: auto = bf16 where the hardware computes it natively, else fp32 "
                   "[default: the config's, else auto].")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool, as_json: bool, device: str, seed: int,
        precision: str | None) -> None:
    """Label-efficient segmentation of electron-microscopy volumes.

    \b
    Volumes are addressed as FILE.h5:DATASET or FILE.zarr[/ARRAY].
    Start with `emseg demo`, then see `emseg COMMAND --help`.
    """
    configure_threads()
    ctx.obj = AppState(verbose=verbose, quiet=quiet, json=as_json, device=device, seed=seed, precision=precision)


def _register() -> None:
    from emseg.cli import demo, evaluate, lcs, noise, predict, query, train

    for module in (train, predict, evaluate, query, noise, lcs, demo):
        cli.add_command(module.command)


_register()


def main() -> None:
    cli(prog_name="emseg")


if __name__ == "__main__":
    main()
