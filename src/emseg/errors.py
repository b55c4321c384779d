"""Exception types shared by every emseg core.

The command-line layer turns :class:`InputError` into a one-line message and exit code 2;
anything else is an unexpected failure (exit code 1).
"""
from __future__ import annotations


class EmsegError(Exception):
    """Base class of emseg's own errors."""


class InputError(EmsegError, ValueError):
    """Bad user input: a missing file or dataset, an inconsistent volume, a bad option.

    The message is one line naming the file, the dataset and the problem.
    """

    def __init__(self, message: str, *, source: str | None = None):
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class TrainingDiverged(EmsegError):
    """The loss (or a weight) became NaN or infinite; the last good checkpoint was kept."""

    def __init__(self, step: int, value: float, *, tensor: str | None = None):
        self.step = step
        self.value = value
        self.tensor = tensor
        what = f"weights became non-finite ({tensor})" if tensor else f"loss became {value}"
        super().__init__(f"{what} at step {step}; stopped and kept the last good checkpoint")
