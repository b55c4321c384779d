"""Prepare the next training batch in a background thread while the current step runs.

Each batch is a pure function of its step number (:func:`step_rng` seeds it), so the batches,
and therefore training and its resume, are the same with and without prefetching, whatever
the thread's timing. Patch reads from HDF5/zarr and augmentation release the GIL for most of
their work, so they overlap with the network step.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, TypeVar

import numpy as np

T = TypeVar("T")

__all__ = ["Prefetcher", "step_rng"]


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The generator of the batch of ``step`` in a run seeded ``seed`` (``stream``: e.g. the rank).

    Examples
    --------
    >>> step_rng(0, 5).integers(1000) == step_rng(0, 5).integers(1000)
    True
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, int(stream), int(step)]))


class Prefetcher(Generic[T]):
    """Calls ``make(step)`` for ``start, start + 1, ...`` ahead of :meth:`get` (at most ``depth`` ahead).

    With ``enabled=False`` :meth:`get` calls ``make`` itself. An exception raised by ``make`` is
    raised again by the :meth:`get` of that step. Use as a context manager (or call
    :meth:`close`) so the thread ends.

    Examples
    --------
    >>> with Prefetcher(lambda s: s * s, start=2) as pf:
    ...     [pf.get(2), pf.get(3)]
    [4, 9]
    """

    def __init__(self, make: Callable[[int], T], *, start: int = 0, depth: int = 1, enabled: bool = True):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._make = make
        self._next = start
        self._enabled = enabled
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(target=self._run, args=(start,), name="emseg-prefetch", daemon=True)
            self._thread.start()

    def _run(self, step: int) -> None:
        while not self._stop.is_set():
            try:
                item = (step, self._make(step), None)
            except BaseException as exc:  # handed to the consumer
                item = (step, None, exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def get(self, step: int) -> T:
        """The batch of ``step`` (steps must be asked for in order)."""
        if step != self._next:
            raise ValueError(f"batches are prefetched in order: expected step {self._next}, got {step}")
        self._next += 1
        if not self._enabled:
            return self._make(step)
        got, value, exc = self._queue.get()
        if exc is not None:
            raise exc
        assert got == step
        return value

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
