"""The run-time choices a user can name, spelled once (no torch needed to read them)."""
from __future__ import annotations

from typing import Any

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
