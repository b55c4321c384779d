"""The ``emseg`` console script: imports the command line inside a guard against Ctrl-C.

Importing the command group pulls in torch, zarr and h5py, which takes a second or more; a
Ctrl-C then would print a traceback from deep inside an import. This module imports nothing
heavy itself, so the interrupt is caught wherever it lands: one line ``error: interrupted``
(with ``--json`` also one JSON document on stdout) and exit status 130.
"""
from __future__ import annotations

import json
import sys

#: Exit status of a run stopped by Ctrl-C (128 + SIGINT), as the command group uses.
INTERRUPTED = 130


def interrupted(argv: list[str] | None = None) -> int:
    """Report an interrupt outside the command group's own handling; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if "--json" in argv:
            sys.stdout.write(json.dumps({"error": "interrupted", "exit_code": INTERRUPTED}) + "\n")
            sys.stdout.flush()
        sys.stderr.write("error: interrupted\n")
        sys.stderr.flush()
    except (OSError, KeyboardInterrupt):  # a closed pipe or a second Ctrl-C: the status still says it
        pass
    return INTERRUPTED


def main() -> None:
    """Entry point of the ``emseg`` script (see :func:`emseg.cli.main.main`)."""
    try:
        from emseg.cli.main import main as run

        run()
    except KeyboardInterrupt:
        raise SystemExit(interrupted()) from None


if __name__ == "__main__":
    main()
