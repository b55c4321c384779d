"""Run-time infrastructure shared by every command: device, precision, threads, seeding, locks, DDP.

:class:`Runtime` is the one value that carries the run-time choices of a command (where to compute,
the seed, the network arithmetic, the CPU threads) into a core: the command line builds it once
from the global flags, a library caller passes one (or takes the default).
"""
from __future__ import annotations

from dataclasses import dataclass

from emseg.errors import InputError
from emseg.runtime.choices import DEVICES, check_precision


@dataclass(frozen=True)
class Runtime:
    """Where and how a core computes.

    Parameters
    ----------
    device : str
        ``auto`` (CUDA when available, else Apple's MPS when available, else CPU), ``cpu``, ``cuda``,
        ``cuda:N`` or ``mps``.
    seed : int
        Seeds python, numpy and torch (and every random stream derived from them).
    precision : {"auto", "fp32", "bf16"} or None
        Network arithmetic; ``None`` keeps what the command's config says.
    threads : int or None
        CPU threads of this process; ``None`` keeps the process's setting.

    Examples
    --------
    >>> Runtime(device="cpu", seed=3)
    Runtime(device='cpu', seed=3, precision=None, threads=None)
    """

    device: str = "auto"
    seed: int = 0
    precision: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise InputError(f"`device` must be one of {', '.join(DEVICES)} (or cuda:N), got {self.device!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise InputError(f"`seed` must be an integer in [0, 2**63), got {self.seed!r}")
        if self.precision is not None:
            check_precision(self.precision)
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise InputError(f"`threads` must be an integer >= 1, got {self.threads!r}")

    def precision_or(self, configured: str) -> str:
        """The precision to run: this runtime's choice, else the config's ``configured`` one."""
        return configured if self.precision is None else self.precision


__all__ = ["Runtime"]
