"""Device selection and seeding."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from emseg.errors import InputError
from emseg.runtime.choices import DEVICES  # noqa: F401 (re-exported)



def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an input error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"`device` {name!r} was requested but no CUDA GPU is available")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device {name!r} ({exc})") from None


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy and torch; return a numpy Generator for the caller's own stream."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


#: Variables through which a user (or dask's worker nanny) fixes the thread count themselves.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's or taskset's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` or to the cores this process may use.

    Left alone when ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` is set (dask workers run with one
    thread each that way, so workers side by side never oversubscribe the machine). Returns
    the number of threads torch uses.
    """
    if threads is None:
        if any(os.environ.get(v) for v in THREAD_VARIABLES):
            return torch.get_num_threads()
        threads = available_cores()
    if threads != torch.get_num_threads():
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()
