"""Numerical precision of network computations: ``auto | fp32 | bf16`` resolved in one place.

``bf16`` runs convolutions under :func:`torch.autocast` with ``torch.bfloat16`` and the
channels-last memory format; weights, optimiser state, checkpoints, losses and metrics stay
float32 (callers cast logits up before a loss). ``auto`` is ``bf16`` where the hardware
computes bfloat16 natively and ``fp32`` everywhere else:

* CUDA: compute capability >= 8.0 (Ampere and newer);
* CPU: AVX512-BF16 or AMX tiles, as reported by torch's own CPU capability probe (the same
  one its oneDNN kernels dispatch on), with ``/proc/cpuinfo`` flags as a fallback.

On Apple's MPS ``auto`` is always ``fp32``: whether bfloat16 runs there, and how fast, depends
on the Mac's GPU, its macOS and the torch version, and none of it was measured for this project.
An explicit ``bf16`` on MPS is accepted where torch autocasts on MPS and macOS is 14 or newer
(torch's own condition for bfloat16 on MPS), else refused like ``bf16`` on other hardware.

Channels-last (``channels_last`` for 2D, ``channels_last_3d`` for 3D networks) is used in both
precisions on CPU and CUDA: on this project's U-Nets it was measured faster for 2D and for
anisotropic 3D networks, in fp32 and in bf16 (``benchmarks/speed.py``, docs/benchmarks.md).
On MPS, where it was not measured, tensors keep the default (contiguous) layout.

Examples
--------
>>> p = resolve_precision("fp32", "cpu", ndim=2)
>>> p.name, p.channels_last
('fp32', True)
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from emseg.errors import InputError
from emseg.runtime.choices import DEFAULT_PRECISION, PRECISIONS, check_precision  # noqa: F401 (re-exported)



@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 natively, and the name of the feature found (or missing)."""
    probe = getattr(torch, "cpu", None)
    try:
        amx = bool(probe._is_amx_tile_supported())
        avx = bool(probe._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):
        flags = _cpu_flags()
        amx, avx = "amx_bf16" in flags, "avx512_bf16" in flags
    if amx:
        return True, "AMX-BF16"
    if avx:
        return True, "AVX512-BF16"
    return False, "a CPU without AVX512-BF16 or AMX"


def cuda_bf16_support(device: torch.device) -> tuple[bool, str]:
    """Whether a CUDA device has native bf16 tensor cores (compute capability >= 8.0)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    return major >= 8, f"{name} (compute capability {major}.{minor})"


def _autocast_available(device_type: str) -> bool:
    check = getattr(getattr(torch.amp, "autocast_mode", None), "is_autocast_available", None)
    if check is None:  # an older torch: autocast on MPS came with the function that says so
        return device_type in ("cuda", "cpu")
    try:
        return bool(check(device_type))
    except RuntimeError:
        return False


def mps_bf16_support() -> tuple[bool, str]:
    """Whether torch runs bfloat16 autocast on Apple's MPS here (macOS 14 or newer), and a description."""
    mps = torch.backends.mps
    try:
        name = str(mps.get_name())
    except (AttributeError, RuntimeError):
        name = ""
    hardware = f"Apple MPS ({name})" if name else "Apple MPS"
    try:
        macos14 = bool(mps.is_macos_or_newer(14, 0))
    except (AttributeError, RuntimeError):
        macos14 = False
    if not _autocast_available("mps"):
        return False, f"{hardware} with a torch without autocast on MPS"
    if not macos14:
        return False, f"{hardware} before macOS 14"
    return True, hardware


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """``(supported, hardware description)`` for bfloat16 on ``device`` (native on CUDA and CPU;
    on MPS what torch supports there, see the module notes)."""
    if device.type == "cuda":
        return cuda_bf16_support(device)
    if device.type == "cpu":
        return cpu_bf16_support()
    if device.type == "mps":
        return mps_bf16_support()
    return False, f"device type {device.type!r}"


#: Device types where ``auto`` picks bf16 when :func:`bf16_support` says yes (MPS: never, unmeasured).
AUTO_BF16_DEVICES = ("cuda", "cpu")
#: Device types whose tensors are channels-last by default (measured faster on the CPU,
#: ``benchmarks/speed.py``, and the layout cuDNN prefers; MPS stays contiguous, unmeasured).
CHANNELS_LAST_DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class Precision:
    """A resolved precision for one device: how to run the network and lay out its tensors."""

    name: str  # "fp32" or "bf16"
    device_type: str
    channels_last: bool
    hardware: str = ""

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of this precision (a no-op for fp32)."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    def memory_format(self, ndim: int) -> torch.memory_format:
        if not self.channels_last:
            return torch.contiguous_format
        return torch.channels_last if ndim == 2 else torch.channels_last_3d

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Put the model's weights in this precision's memory format (values unchanged, fp32)."""
        ndim = getattr(model, "ndim", 2)
        if self.channels_last:
            model.to(memory_format=self.memory_format(ndim))
        return model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Lay out an input batch (N, C, *S) in this precision's memory format."""
        if self.channels_last and x.dim() in (4, 5):
            return x.contiguous(memory_format=self.memory_format(x.dim() - 2))
        return x

    def wrap(self, net: Callable) -> "AutocastForward":
        """``net`` called under this precision's autocast, its floating outputs cast to float32,
        so a loss computed on them runs in float32 outside the autocast region."""
        return AutocastForward(net, self)

    def to_dict(self) -> dict[str, object]:
        return {"precision": self.name, "channels_last": self.channels_last, "hardware": self.hardware}


def _to_float(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple):
        return tuple(_to_float(o) for o in out)
    if isinstance(out, list):
        return [_to_float(o) for o in out]
    return out


class AutocastForward:
    """A network called under autocast, returning float32 outputs (see :meth:`Precision.wrap`).

    Attribute access falls through to the wrapped network (``divisor``, ``ndim``, ...).
    """

    def __init__(self, net: Callable, precision: Precision):
        self.net = net
        self.precision = precision

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(self.precision.prepare_input(a) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     else a for a in args)
        with self.precision.autocast():
            out = self.net(*args, **kwargs)
        return _to_float(out)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.net, name)


def _channels_last(name: str, ndim: int, device_type: str = "cpu") -> bool:
    # Measured in benchmarks/speed.py: faster for 2D and 3D networks, in fp32 and in bf16 (CPU).
    return ndim in (2, 3) and device_type in CHANNELS_LAST_DEVICES


def resolve_precision(name: str | Precision, device: str | torch.device, *, ndim: int = 2,
                      channels_last: bool | None = None) -> Precision:
    """Turn ``auto | fp32 | bf16`` into a :class:`Precision` for ``device`` and a ``ndim``-D network.

    ``bf16`` on hardware without native bfloat16 is an :class:`~emseg.errors.InputError` naming
    the hardware (emulated bf16 is slower than fp32 and less accurate). ``auto`` on MPS is
    ``fp32`` (see the module notes). ``channels_last``
    overrides the measured default (data-parallel training keeps replicas contiguous: with
    channels-last parameters, DistributedDataParallel on CPU was found to apply updates that
    differ from Adam on the averaged gradients).
    """
    if isinstance(name, Precision):
        return name
    check_precision(name)
    device = torch.device(device)
    ok, hardware = bf16_support(device) if name != "fp32" else (False, "")
    if name == "bf16" and not ok:
        raise InputError(f"precision bf16 needs native bfloat16 hardware; this is {hardware} (use fp32 or auto)")
    auto_bf16 = ok and device.type in AUTO_BF16_DEVICES
    chosen = "bf16" if name == "bf16" or (name == "auto" and auto_bf16) else "fp32"
    layout = _channels_last(chosen, ndim, device.type) if channels_last is None else bool(channels_last)
    return Precision(chosen, device.type, layout, hardware)
