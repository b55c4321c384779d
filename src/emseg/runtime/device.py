"""Device selection and seeding."""
from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from emseg.errors import InputError
from emseg.runtime.choices import DEVICES  # noqa: F401 (re-exported)


def mps_available() -> bool:
    """Whether this torch can compute on Apple's Metal GPU (MPS): an Apple silicon Mac, a torch built for it."""
    mps = getattr(torch.backends, "mps", None)
    try:
        return bool(mps is not None and mps.is_available())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else Apple's MPS when available, else the CPU.

    ``cuda`` without a CUDA GPU, or ``mps`` where torch offers no MPS, is an input error.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"`device` {name!r} was requested but no CUDA GPU is available")
    if name.startswith("mps") and not mps_available():
        raise InputError(f"`device` {name!r} was requested but Apple's MPS is not available (it needs an Apple "
                         f"silicon Mac and a torch built with MPS)")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device {name!r} ({exc})") from None


def _generator_of(device: torch.device) -> tuple[Any, Any] | None:
    """``(get_state, set_state)`` of the random generator of an accelerator ``device`` (None on the CPU)."""
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return (lambda: torch.cuda.get_rng_state(index)), (lambda s: torch.cuda.set_rng_state(s, index))
    if device.type == "mps" and mps_available():
        return torch.mps.get_rng_state, torch.mps.set_rng_state
    return None


@contextlib.contextmanager
def fork_rng(device: str | torch.device = "cpu") -> Iterator[None]:
    """Leave torch's random state as it was: the CPU generator's and that of ``device`` (CUDA, MPS)."""
    generator = _generator_of(torch.device(device))
    cpu = torch.get_rng_state()
    accelerator = generator[0]() if generator is not None else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if generator is not None:
            generator[1](accelerator)


def device_rng_state() -> dict[str, Any]:
    """The random state of the accelerators here (CUDA: every GPU's; MPS), for a checkpoint."""
    state: dict[str, Any] = {}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if mps_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_device_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`device_rng_state` saved, for the accelerators present here."""
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and mps_available():
        torch.mps.set_rng_state(state["mps"])


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
