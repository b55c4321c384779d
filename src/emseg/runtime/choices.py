"""The run-time choices a user can name, spelled once, and the checks of a config table's keys and
numbers (no torch needed to read them)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from emseg.errors import InputError

#: The device names the command line offers (a library caller may also name ``cuda:1`` and the like).
#: ``auto`` picks CUDA, then Apple's MPS, then the CPU; ``mps`` is the GPU of an Apple silicon Mac.
DEVICES = ("auto", "cpu", "cuda", "mps")

#: The network arithmetic a user can choose; the one place these names are spelled.
PRECISIONS = ("auto", "fp32", "bf16")
#: The default of every config and command: bf16 where the hardware computes it natively (CUDA, CPU),
#: else fp32 (also on MPS, see :mod:`emseg.runtime.precision`).
DEFAULT_PRECISION = "auto"


def check_precision(name: Any, key: str = "precision") -> str:
    """``name`` if it is one of :data:`PRECISIONS`, else an :class:`InputError` naming ``key``."""
    if not isinstance(name, str) or name not in PRECISIONS:
        words = ", ".join(PRECISIONS[:-1]) + f" or {PRECISIONS[-1]}"
        raise InputError(f"{key} must be {words}, got {name!r}")
    return name


def check_number(value: Any, name: str) -> float:
    """A number of a config table (an int or float, numpy's too, not a boolean) as a float; else an
    :class:`InputError` "NAME must be a number"."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_integer(value: Any, name: str) -> int:
    """An integer of a config table (or one entry of a list of them; numpy's too, not a boolean);
    else an :class:`InputError` "NAME must hold integers"."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must hold integers, got {value!r}")
    return int(value)


def check_table_keys(data: Mapping[str, Any], cls: type, table: str, *, source: str | None = None) -> None:
    """An :class:`InputError` "unknown key(s) ... in [TABLE] (known: ...)" where the config table
    ``data`` has a key that is not a field of the dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(unknown)} in [{table}] (known: {', '.join(sorted(names))})",
                         source=source)
