"""Checks and conversions shared by the losses: integer targets, float casts, masks, the ignore label."""
from __future__ import annotations

import torch

__all__ = ["IGNORE", "as_float", "as_float64", "check_mask_values", "check_target_range", "check_tensor",
           "is_integer_tensor"]

#: The target value of ignored voxels.
IGNORE = -1


def is_integer_tensor(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def as_float(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``x`` as a floating tensor with the dtype and device of ``like``."""
    return x.to(device=like.device, dtype=like.dtype)


def as_float64(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float64 (gradients flow through), moved to the CPU from a device without float64 (MPS)."""
    if x.device.type == "mps":
        x = x.cpu()
    return x.double()


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_mask_values(name: str, m: torch.Tensor) -> None:
    if m.is_floating_point() and not bool(torch.isfinite(m).all()):
        raise ValueError(f"{name} must be finite")
    if m.dtype != torch.bool and bool((m < 0).any()):
        raise ValueError(f"{name} must be non-negative (0/1 flags)")


def check_target_range(target: torch.Tensor, k: int, prefix: str = "") -> None:
    """Target values must lie in ``-1 .. k-1`` (-1 = ignore)."""
    if target.numel() > 0:
        tmin, tmax = int(target.min()), int(target.max())
        if tmin < IGNORE or tmax > k - 1:
            raise ValueError(
                f"{prefix}target values must lie in -1..{k - 1} (-1 = ignore), found range {tmin}..{tmax}"
            )
