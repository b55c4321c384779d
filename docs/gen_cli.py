"""Regenerate docs/cli.md from the commands' own --help texts: python docs/gen_cli.py"""
from __future__ import annotations

from pathlib import Path

import click

from emseg.cli.main import CONTEXT, cli


def walk(command: click.Command, path: list[str]):
    yield path, command
    if isinstance(command, click.Group):
        for name in sorted(command.list_commands(click.Context(command))):
            yield from walk(command.get_command(click.Context(command), name), path + [name])


def render() -> str:
    parts = ["# CLI reference\n", "Generated from `--help` by `python docs/gen_cli.py`; do not edit by hand.\n"]
    for path, command in walk(cli, ["emseg"]):
        settings = dict(CONTEXT, **(command.context_settings or {}))
        with click.Context(command, info_name=" ".join(path), terminal_width=100, **settings) as ctx:
            text = command.get_help(ctx)
        parts.append(f"## `{' '.join(path)}`\n\n```text\n{text}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    out = Path(__file__).with_name("cli.md")
    out.write_text(render())
    print(f"wrote {out}")
