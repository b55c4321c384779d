"""The resumable state of a simulated active-learning run: state files, stable ids, the iteration tail.

Every arm (a strategy or a question arm) of every seed keeps a JSON state file; an iteration ends
the same way in both kinds of arm (:func:`finish_iteration`): its row is appended, the state is
written atomically, and only the newest fine-tuned weights are kept.
"""
from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path
from typing import Any

from emseg.errors import InputError
from emseg.io import atomic_write_text


def read_state(path: Path) -> Any:
    """The JSON state file ``path``; an unreadable one is an :class:`InputError` naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable state file ({type(exc).__name__})", source=str(path)) from None


def write_state(path: Path, data: Any) -> None:
    """Write a state file atomically. Unlike :func:`emseg.io.atomic_write_json` (strict JSON), NaN
    scores stay ``NaN``, so a resumed run reads back exactly the rows it wrote."""
    atomic_write_text(path, json.dumps(data, indent=1, allow_nan=True) + "\n")


def stable_id(*parts: Any) -> int:
    """A 32-bit id of ``parts`` that is the same in every process and run (seeds of sub-streams)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def iteration_dir(arm_dir: Path, iteration: int) -> Path:
    return arm_dir / f"iter_{iteration:03d}"


def finish_iteration(state: dict[str, Any], state_path: Path, row: dict[str, Any], arm_dir: Path,
                     iteration: int) -> Path:
    """Append ``row``, save ``state`` and drop the previous iteration's weights; returns the weights
    the next iteration fine-tunes from."""
    state["rows"].append(row)
    write_state(state_path, state)
    if iteration > 1:  # only the newest fine-tuned weights are needed to continue
        shutil.rmtree(iteration_dir(arm_dir, iteration - 1), ignore_errors=True)
    return iteration_dir(arm_dir, iteration) / "last.pt"
