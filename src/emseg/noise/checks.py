"""Checks and small helpers shared by the noise modules.

Every check returns the validated value or raises :class:`ValueError` with one line naming the
parameter; the callers (:mod:`emseg.noise.synthesis`, :mod:`emseg.noise.morphology`,
:mod:`emseg.noise.params`, :mod:`emseg.noise.transition`, :mod:`emseg.noise.report`) prefix the
mode where it helps.
"""

from __future__ import annotations

import operator
from numbers import Real
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "as_labels",
    "check_fraction",
    "check_int",
    "check_per_section",
    "check_radius",
    "checked_labels_radius",
    "class_fractions",
    "fit_dtype",
    "max_label",
    "present_classes",
    "resolve_n_classes",
    "round_count",
]


def as_labels(labels: ArrayLike, name: str = "labels", *, spatial: bool = True) -> np.ndarray:
    """Return ``labels`` as an integer ndarray, validated (no copy)."""
    arr = np.asarray(labels)
    if arr.dtype.kind not in "biu":
        raise ValueError(f"{name} must have an integer dtype, got {arr.dtype}")
    if spatial and arr.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be 2D (y, x) or 3D (z, y, x), got {arr.ndim}D with shape {arr.shape}"
        )
    if arr.dtype.kind == "i" and arr.size:
        lo = int(arr.min())
        if lo < -1:
            raise ValueError(f"{name} must be >= -1 (-1 = ignore), got minimum {lo}")
    return arr


def check_fraction(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    v = float(value)
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def check_int(value: Any, name: str, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be an integer <= {maximum}, got {v}")
    return v


def check_radius(radius: Any) -> int:
    return check_int(radius, "radius", minimum=0)


def max_label(arr: np.ndarray) -> int:
    return int(arr.max()) if arr.size else 0


def resolve_n_classes(arr: np.ndarray, n_classes: Any, name: str = "labels") -> int:
    """Default ``max label + 1`` (at least 2); check labels fit an explicit value."""
    top = max_label(arr)
    if n_classes is None:
        return max(top + 1, 2)
    k = check_int(n_classes, "n_classes", minimum=2)
    if top >= k:
        raise ValueError(f"{name} contain class {top} but n_classes={k}")
    return k


def fit_dtype(dtype: np.dtype, lo: int, hi: int) -> np.dtype:
    """``dtype`` if it can hold ``[lo, hi]``, else the smallest promotion that can.

    Boolean input is treated as ``uint8``.
    """
    dt = np.dtype(np.uint8) if dtype.kind == "b" else np.dtype(dtype)
    info = np.iinfo(dt)
    if info.min <= lo and hi <= info.max:
        return dt
    need = np.promote_types(np.min_scalar_type(lo), np.min_scalar_type(hi))
    out = np.promote_types(dt, need)
    return out if out.kind in "iu" else np.dtype(np.int64)


def present_classes(flat: np.ndarray, top: int) -> list[int]:
    """Labels ``0..top`` that may occur in ``flat``: all of them for few classes,
    else those that do occur."""
    if top < 64:
        return list(range(top + 1))
    valid = flat[flat >= 0] if flat.dtype.kind == "i" else flat
    if top > 1 << 20:
        return np.unique(valid).tolist()
    return np.flatnonzero(np.bincount(valid.astype(np.intp, copy=False))).tolist()


def round_count(p: float, n: int) -> int:
    """``round(p * n)`` (halves to even, as Python's :func:`round`)."""
    return int(round(p * n))



def check_per_section(per_section: Any) -> bool:
    if not isinstance(per_section, (bool, np.bool_)):
        raise ValueError(f"per_section must be True or False, got {per_section!r}")
    return bool(per_section)


def checked_labels_radius(labels: ArrayLike, radius: Any, per_section: Any) -> tuple[np.ndarray, int, bool]:
    """The labels, radius and per-section flag of a mode that works within a radius (dilate,
    erode, shift), checked in that order; the flag is False for 2D labels."""
    arr = as_labels(labels)
    r = check_radius(radius)
    return arr, r, check_per_section(per_section) and arr.ndim == 3


def class_fractions(p: Any, k: int, p_fg: Any = None, p_bg: Any = None) -> list[float]:
    """Per-class fractions of ``k`` classes: ``p`` for every class, ``p_bg``/``p_fg`` (binary
    labels only) for class 0 / 1. At least one of them must be given (the caller says so)."""
    fractions = [0.0 if p is None else check_fraction(p, "p")] * k
    if p_fg is not None or p_bg is not None:
        if k != 2:
            raise ValueError(f"p_fg/p_bg apply to binary labels only (n_classes=2), got n_classes={k}")
        if p_bg is not None:
            fractions[0] = check_fraction(p_bg, "p_bg")
        if p_fg is not None:
            fractions[1] = check_fraction(p_fg, "p_fg")
    return fractions
