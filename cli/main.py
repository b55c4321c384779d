"""The ``emseg`` command group: global options and error handling."""
from __future__ import annotations

import json
import sys
import traceback
import warnings

import click

from emseg import __version__
from emseg.runtime.device import configure_threads
from emseg.errors import InputError, TrainingDiverged
from emseg.cli._ui import AppState, bound_integers, command_options, flag_wording, global_flag

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100, "show_default": True}

#: ``ctx.meta`` key (meta is shared by every context of a run) of the innermost running command.
RUNNING = "emseg.running"


class EmsegContext(click.Context):
    """A context that records itself as the running one when its command's callback starts.

    The last recorded is the innermost command (``query select``, say), whose options an error
    message is worded in, after its own context is gone.
    """

    def invoke(self, callback, /, *args, **kwargs):
        self.meta[RUNNING] = self
        return super().invoke(callback, *args, **kwargs)


def _run_in_emseg_context(command: click.Command) -> None:
    """Give ``command`` and every subcommand below it an :class:`EmsegContext`."""
    command.context_class = EmsegContext
    bound_integers(command)
    for sub in getattr(command, "commands", {}).values():
        _run_in_emseg_context(sub)


class EmsegGroup(click.Group):
    """Maps emseg's errors to one-line messages and exit codes (2 bad input, 1 unexpected)."""

    context_class = EmsegContext

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["emseg.json"] = "--json" in args  # known before any option is parsed
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            self._usage_error(exc, as_json="--json" in args)

    def invoke(self, ctx: click.Context):
        # Warnings (a torch UserWarning, say) are collected: printed one line each after a
        # success, dropped after a failure, whose one error line stays the only one (-v shows all).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            try:
                result = super().invoke(ctx)
            except click.UsageError as exc:
                self._usage_error(exc, ctx=ctx)
            except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
                raise
            except TrainingDiverged as exc:
                self._fail(ctx, exc, 1, caught=caught)
            except (InputError, FileNotFoundError) as exc:
                # Bad input (cores raise InputError for it), a usage problem: exit 2.
                self._fail(ctx, exc, 2, caught=caught)
            except KeyboardInterrupt:
                self._fail(ctx, RuntimeError("interrupted"), 130, caught=caught)
            except Exception as exc:  # unexpected failure: a bug, never dressed as bad input
                self._fail(ctx, exc, 1, prefix="unexpected error: ", caught=caught)
            except SystemExit:
                self._show_warnings(ctx, caught)
                raise
            self._show_warnings(ctx, caught)
            return result

    @staticmethod
    def _show_warnings(ctx: click.Context, caught: list) -> None:
        app = ctx.find_object(AppState)
        if app is not None and (app.quiet or app.json) and not app.verbose:
            return
        seen = set()
        for item in caught:
            text = " ".join(str(item.message).split())
            if text not in seen:
                seen.add(text)
                click.echo(f"warning: {text}", err=True)

    @staticmethod
    def _usage_error(exc: click.UsageError, *, ctx: click.Context | None = None, as_json: bool = False) -> None:
        """One line ``error: ...`` (with a pointer to --help) instead of click's usage block."""
        if isinstance(exc, click.exceptions.NoArgsIsHelpError):
            raise exc
        where = exc.ctx
        while where is not None and where.command.hidden and where.parent is not None:
            where = where.parent  # a hidden default command: point at the command typed
        hint = f" (see '{where.command_path} --help')" if where is not None else ""
        message = f"{exc.format_message()}{hint}"
        app = ctx.find_object(AppState) if ctx is not None else None
        if as_json or (app is not None and app.json) or (ctx is not None and ctx.meta.get("emseg.json")):
            click.echo(json.dumps({"error": message, "exit_code": exc.exit_code}))
        click.echo(f"error: {message}", err=True)
        raise click.exceptions.Exit(exc.exit_code)

    @staticmethod
    def _fail(ctx: click.Context, exc: BaseException, code: int, prefix: str = "", caught: list | None = None) -> None:
        app = ctx.find_object(AppState)
        if app is not None and app.verbose:
            for item in caught or ():
                click.echo(f"warning: {item.message}", err=True)
            traceback.print_exception(exc, file=sys.stderr)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, InputError):  # cores name parameters (`workers`); say the flag (--workers)
            message = flag_wording(message, command_options(ctx.meta.get(RUNNING, ctx)))
        if prefix:
            message = f"{type(exc).__name__}: {message}"
        if app is not None and app.json:
            click.echo(json.dumps({"error": f"{prefix}{message}", "exit_code": code}))
        click.echo(f"error: {prefix}{message}", err=True)
        ctx.exit(code)


@click.group(cls=EmsegGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="emseg")
@global_flag("verbose", on_group=True)
@global_flag("quiet", on_group=True)
@global_flag("json", on_group=True)
@global_flag("device", on_group=True)
@global_flag("seed", on_group=True)
@global_flag("precision", on_group=True)
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool, as_json: bool, device: str, seed: int,
        precision: str | None) -> None:
    """Label-efficient segmentation of electron-microscopy volumes.

    \b
    Volumes are addressed as FILE.h5:DATASET, FILE.zarr[/ARRAY], FILE.n5/DATASET, FILE.tif, FILE.mrc
    or a folder (DIR/) or glob ("DIR/*.png") of 2D slices; `emseg info` shows what emseg sees.
    Start with `emseg demo`, then see `emseg COMMAND --help`.
    """
    ctx.obj = AppState(verbose=verbose, quiet=quiet, json=as_json, device=device, seed=seed, precision=precision)


def _register() -> None:
    from emseg.cli import (demo, evaluate, export, igtt, info, lcs, noise, predict, pretrain, query, segment, targets,
                           train)

    for module in (train, pretrain, predict, segment, targets, evaluate, query, noise, igtt, lcs, export, info, demo):
        cli.add_command(module.command)
        _run_in_emseg_context(module.command)


_register()


def main() -> None:
    # The process's own threads are set here, not in the group: code that invokes the group in
    # a running process (tests, notebooks) keeps its own torch thread count.
    configure_threads()
    cli(prog_name="emseg")


if __name__ == "__main__":
    main()
