"""Shared rendering helpers of the command-line layer: progress bars, JSON, tables, errors."""
from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from emseg.runtime import Runtime
from emseg.runtime.choices import DEFAULT_PRECISION, DEVICES, PRECISIONS


@dataclass
class AppState:
    verbose: bool = False
    quiet: bool = False
    json: bool = False
    device: str = "auto"
    seed: int = 0
    #: ``--precision``; ``None`` keeps what the command's config says (``auto`` when it says nothing).
    precision: str | None = None

    @property
    def runtime(self) -> Runtime:
        """The run-time choices of the global flags, as every core takes them."""
        return Runtime(device=self.device, seed=self.seed, precision=self.precision)

    @property
    def precision_choice(self) -> str:
        """``--precision``, else the default (for cores whose config has no precision of its own)."""
        return self.precision or DEFAULT_PRECISION

    @property
    def console(self) -> Console:
        return Console(stderr=True)

    @property
    def show_progress(self) -> bool:
        return not (self.quiet or self.json) and sys.stderr.isatty()


def state(ctx: click.Context | None = None) -> AppState:
    ctx = ctx or click.get_current_context()
    obj = ctx.find_object(AppState)
    return obj if obj is not None else AppState()


@contextlib.contextmanager
def progress_bar(description: str, *, unit: str = "", enabled: bool | None = None) -> Iterator[Callable]:
    """Yields ``update(done, total, **fields)``; a transient rich bar on stderr when enabled."""
    app = state()
    if enabled is None:
        enabled = app.show_progress
    if not enabled:
        yield lambda *a, **k: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=app.console, transient=True) as bar:
        task = bar.add_task(description, total=None, info="")

        def update(done: int, total: int, info: str = "") -> None:
            bar.update(task, completed=done, total=total, info=info)

        yield update


def emit(payload: dict[str, Any], render: Callable[[Console], None]) -> None:
    """Print exactly one JSON document on stdout with ``--json``, otherwise the human rendering."""
    app = state()
    if app.json:
        click.echo(json.dumps(_jsonable(payload), indent=2, allow_nan=False))
    elif not app.quiet:
        render(Console())


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):
        return _jsonable(obj.item())
    return obj


#: Core parameter names set by a click parameter of another name (``block_shape`` by ``--block``).
#: Names equal to a click parameter's name, or to one of its flags without ``--`` (``out`` for
#: ``--out``, whatever the parameter is called), need no entry.
PARAM_ALIASES = {"block_shape": "block", "patch_shape": "patch", "exclude_labels": "exclude"}

#: A parameter name in backticks, as core error messages write it: `workers`, `block_shape`.
_NAMED = re.compile(r"(?<![\w`])`([A-Za-z_][A-Za-z0-9_]*)`(?![\w`])")


def command_options(ctx: click.Context | None) -> dict[str, str]:
    """Core parameter name -> the flag that sets it in the running command (``ctx``) or above it.

    The command's own options win over those of the groups around it; each option is reached by
    its parameter name and by its ``--`` flags spelled with underscores, and shown as its longest
    ``--`` flag. Arguments and ``-x`` short options are left out.
    """
    options: dict[str, str] = {}
    while ctx is not None:
        named = [(param, [opt for opt in param.opts if opt.startswith("--")]) for param in ctx.command.params
                 if isinstance(param, click.Option)]
        named = [(param, flags) for param, flags in named if flags]
        for param, flags in named:  # parameter names first: they win over a flag spelled alike
            if param.name:
                options.setdefault(param.name, max(flags, key=len))
        for param, flags in named:
            for opt in flags:
                options.setdefault(opt[2:].replace("-", "_"), max(flags, key=len))
        ctx = ctx.parent
    return options


def flag_wording(message: str, options: Mapping[str, str]) -> str:
    """A core message in the words of the command line: each `name` becomes its flag.

    ``options`` maps parameter names to flags (:func:`command_options`); a name it does not know
    (also under its :data:`PARAM_ALIASES` entry) loses its backticks. Only a whole identifier in
    single backticks is a name: a quoted command (`emseg lcs infer` in backticks), a name inside a
    longer word and plain words stay as they are.

    Examples
    --------
    >>> flag_wording("`workers` applies only when `scheduler` is 'local'",
    ...              {"workers": "--workers", "scheduler": "--scheduler"})
    "--workers applies only when --scheduler is 'local'"
    >>> flag_wording("`block_shape` (4, 4) does not fit", {"block": "--block"})
    '--block (4, 4) does not fit'
    >>> flag_wording("`rank_tol` needs `report`", {})
    'rank_tol needs report'
    """

    def word(match: re.Match) -> str:
        name = match.group(1)
        for candidate in (name, PARAM_ALIASES.get(name)):
            if candidate in options:
                return options[candidate]
        return name

    return _NAMED.sub(word, message)


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def scores_table(scores: dict[str, Any], title: str, class_names: list[str] | None = None) -> Table:
    """Per-class Jaccard/Dice/precision/recall table from ``SegmentationScores.to_dict()``."""
    table = Table(title=title)
    for col in ("class", "jaccard", "dice", "precision", "recall", "support"):
        table.add_column(col, justify="right" if col != "class" else "left")
    k = len(scores["jaccard"])
    for c in range(k):
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        table.add_row(name, *(fmt(scores[m][c]) for m in ("jaccard", "dice", "precision", "recall")),
                      str(scores["support"][c]))
    table.add_row("mean", *(fmt(scores[f"mean_{m}"]) for m in ("jaccard", "dice", "precision", "recall")), "",
                  style="bold")
    return table


def parse_ints(text: str | None, name: str) -> tuple[int, ...] | None:
    """``"1,3,4"`` -> (1, 3, 4); ``None`` stays None; a usage error for bad or empty lists."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=name) from None
    if not values:
        raise click.BadParameter("expected at least one integer", param_hint=name)
    return values


class DefaultCommandGroup(click.Group):
    """A group that runs ``default_command`` when the first argument names no subcommand.

    Flags without a value (``--json``, ``-q``, ``-v``) may come before the subcommand name, as in
    ``emseg query --json simulate ...``.
    """

    default_command = "select"
    leading_flags = ("--json", "-q", "--quiet", "-v", "--verbose")

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        args = list(args)
        names = set(self.list_commands(ctx)) | {self.default_command}
        i = 0
        while i < len(args) and args[i] in self.leading_flags:
            i += 1
        if i < len(args) and args[i] in names:
            args = [args[i], *args[:i], *args[i + 1:]]
        elif args and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def parse_shape(text: str | None, name: str = "--patch") -> tuple[int, ...] | None:
    """``"1,256,256"`` -> (1, 256, 256); a usage error otherwise."""
    if text is None:
        return None
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=name) from None
    if not shape or any(s < 1 for s in shape):
        raise click.BadParameter(f"sides must be positive integers, got {text!r}", param_hint=name)
    return shape


def _setter(field: str):
    def callback(ctx: click.Context, param: click.Parameter, value):
        if value is not None and value is not False:
            setattr(state(ctx), field, value)
        return value

    return callback


class BoundedInt(click.types.IntParamType):
    """click's ``integer`` that refuses, as a usage error, a value numpy and torch cannot take
    (outside int64, or outside ``[low, high]``): a number from the command line never reaches a
    core as an overflow."""

    name = "integer"

    def __init__(self, low: int = -(1 << 63), high: int = (1 << 63) - 1):
        self.low, self.high = low, high

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not self.low <= number <= self.high:
            self.fail(f"{number} is outside [{self.low}, {self.high}]", param, ctx)
        return number


def bound_integers(command: click.Command) -> None:
    """Give every plain ``int`` option and argument of ``command`` the int64 bounds of :class:`BoundedInt`."""
    for param in command.params:
        if type(param.type) is click.types.IntParamType:
            param.type = BoundedInt()


#: The global flags, declared once: on the ``emseg`` group (with its defaults) and again after each
#: subcommand (``emseg evaluate A B --json``), where an unset flag keeps what the group said.
#: name -> (flags, click keyword arguments, help).
GLOBAL_FLAGS: dict[str, tuple[tuple[str, ...], dict[str, Any], str]] = {
    "verbose": (("-v", "--verbose"), {"is_flag": True}, "Show tracebacks on errors."),
    "quiet": (("-q", "--quiet"), {"is_flag": True}, "No progress bars and no human-readable summary."),
    "json": (("--json",), {"is_flag": True}, "Print exactly one JSON document on stdout."),
    "device": (("--device",), {"type": click.Choice(DEVICES), "default": "auto"},
               "Where to compute: auto = CUDA, else MPS, else CPU."),
    "seed": (("--seed",), {"type": BoundedInt(0), "default": 0}, "Seeds python, numpy and torch."),
    "precision": (("--precision",), {"type": click.Choice(PRECISIONS), "default": None},
                  "Network arithmetic: bf16 autocast + channels-last where the hardware computes bf16 natively "
                  f"({DEFAULT_PRECISION}), or fp32 [default: the config's, else {DEFAULT_PRECISION}]."),
}
#: Flags of every command (output and errors), and of the commands that run a network.
_OUTPUT_FLAGS = ("verbose", "quiet", "json")
_NETWORK_FLAGS = ("device", "seed", "precision")


def global_flag(name: str, *, on_group: bool):
    """The ``click.option`` of global flag ``name``: on the group with its default, or on a
    subcommand where it only overrides the group's value when given."""
    flags, kwargs, help_ = GLOBAL_FLAGS[name]
    kwargs = dict(kwargs)
    dest = "as_json" if name == "json" else name
    if on_group:
        return click.option(*flags, dest, help=help_, **kwargs)
    default = kwargs.pop("default", None)
    if default is not None and not kwargs.get("is_flag"):
        help_ = f"{help_.split(' [default')[0].rstrip('.')} [default: {default}]."
    kwargs["default"] = None
    return click.option(*flags, f"{dest}_", expose_value=False, callback=_setter(name), help=help_, **kwargs)


def _with_flags(func, names):
    for name in reversed(names):
        func = global_flag(name, on_group=False)(func)
    return func


def common_options(func):
    """The output flags (-v, -q, --json), also accepted after the subcommand."""
    return _with_flags(func, _OUTPUT_FLAGS)


def scheduler_options(scheduler_help: str, *, retries: int | None = None):
    """``--scheduler``, ``--workers`` (and, given its default, ``--retries``) of commands that can run
    on dask.distributed."""

    def decorate(func):
        if retries is not None:
            func = click.option("--retries", type=click.IntRange(min=0), default=retries,
                                help="With --scheduler: extra attempts of a failing block before giving up.")(func)
        func = click.option("--workers", type=click.IntRange(min=1), default=None,
                            help="Worker processes of --scheduler local, one thread each "
                                 "[default: CPU cores, at most 8].")(func)
        return click.option("--scheduler", default=None, metavar="local|tcp://HOST:PORT",
                            help="Run on dask.distributed: 'local' starts --workers processes here, an address "
                                 f"uses a running scheduler. {scheduler_help}")(func)

    return decorate


def precision_overrides(app: AppState) -> dict[str, Any]:
    """Config overrides for ``--precision`` (an explicit choice also lifts an older ``amp = false``)."""
    return {"precision": app.precision, "amp": True} if app.precision is not None else {}


def overwrite_option(what: str = "OUTPUT"):
    """``--overwrite``: the permission to replace an output that exists (refused without it)."""
    return click.option("--overwrite", is_flag=True,
                        help=f"Replace {what} if it exists [default: an existing one is refused].")


def device_seed_options(func):
    """``--device``, ``--seed`` and ``--precision`` on commands that run a network."""
    return _with_flags(func, _NETWORK_FLAGS)


def steps_word(cfg) -> str:
    """The step limit of a training config as shown to the user ("1000", or the time budget)."""
    if cfg.steps is None and cfg.max_seconds is not None:
        return f"(time budget {cfg.max_seconds:g} s)"
    return str(cfg.total_steps)


def training_progress(update: Callable) -> Callable[[dict[str, Any]], None]:
    """A training ``progress`` callback drawing steps, or the spent time budget when steps are unbounded."""

    def progress(info: dict[str, Any]) -> None:
        text = f"loss {info['loss']:.4f}  {info['patches_per_s']:.1f} patches/s"
        if info.get("total") is None and info.get("budget_used") is not None:
            update(min(1000, round(1000 * info["budget_used"])), 1000, f"step {info['step']}  {text}")
        else:
            update(info["step"], info["total"], text)

    return progress
