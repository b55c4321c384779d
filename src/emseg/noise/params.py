"""The parameters of each noise mode: checked, resolved against the data, and what they imply.

:func:`check_params` validates a mode's parameters and fills the defaults;
:func:`resolve_params` fills those that depend on the data (the number of classes, the
skeleton halo from the widest object, :func:`estimate_max_width`); :func:`halo_shape` and
:func:`output_dtype` give the halo a block is read with and the dtype of the noisy labels;
:func:`default_block_shape` is the block grid of a run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from emseg.engine.blocks import plan_blocks
from emseg.noise.checks import (
    as_labels,
    check_fraction,
    check_int,
    check_per_section,
    check_radius,
    fit_dtype,
)
from emseg.noise.morphology import class_boxes
from emseg.noise.synthesis import required_halo
from emseg.metrics import MAX_CLASSES
from emseg.noise.transition import flip_matrix

__all__ = [
    "MODES",
    "RANDOM_MODES",
    "SELECTION_MODES",
    "REGISTRY",
    "NoiseMode",
    "WIDTH_SCAN_MARGIN",
    "check_block_shape",
    "check_mode",
    "check_params",
    "default_block_shape",
    "estimate_max_width",
    "halo_shape",
    "max_object_width",
    "output_dtype",
    "require_resolved",
    "resolve_params",
]

def _check_flip(out: dict[str, Any]) -> None:
    if out["p"] is None and out["p_fg"] is None and out["p_bg"] is None:
        raise ValueError("needs p, or p_fg/p_bg for binary labels")
    for key in ("p", "p_fg", "p_bg"):
        if out[key] is not None:
            out[key] = check_fraction(out[key], key)
    if out["n_classes"] is not None:
        out["n_classes"] = check_int(out["n_classes"], "n_classes", minimum=2, maximum=MAX_CLASSES)
        flip_matrix(out["p"], out["n_classes"], p_fg=out["p_fg"], p_bg=out["p_bg"])


def _check_sample(out: dict[str, Any]) -> None:
    if out["p"] is None:
        raise ValueError("needs p")
    out["p"] = check_fraction(out["p"], "p")
    u = out["unsampled"]
    if isinstance(u, (bool, np.bool_)) or u not in (-1, 0):
        raise ValueError(f"unsampled must be -1 (ignore) or 0 (background), got {u!r}")
    out["unsampled"] = int(u)


def _check_random(out: dict[str, Any]) -> None:
    if out["p"] is None:
        raise ValueError("needs p")
    out["p"] = check_fraction(out["p"], "p")
    if out["n_classes"] is not None:
        out["n_classes"] = check_int(out["n_classes"], "n_classes", minimum=2, maximum=MAX_CLASSES)


def _check_radius_mode(out: dict[str, Any]) -> None:
    if out["radius"] is None:
        raise ValueError("needs radius")
    out["radius"] = check_radius(out["radius"])
    out["per_section"] = check_per_section(out["per_section"])


def _check_skeleton(out: dict[str, Any]) -> None:
    out["per_section"] = check_per_section(out["per_section"])
    if out["halo"] is not None:
        out["halo"] = check_int(out["halo"], "halo", minimum=0)


@dataclass(frozen=True)
class NoiseMode:
    """One perturbation as the blockwise runner sees it (the array function is in
    :data:`emseg.noise.process.APPLY`).

    ``defaults``: its parameters (``None``: required, or resolved from the data); ``check``
    normalises a complete parameter dict in place and raises ``ValueError``; ``random``: it draws
    counter-based random numbers; ``selection``: it changes an exact number of voxels per class
    (:func:`~emseg.noise.process.selection_for`); ``classes``: its ``n_classes`` defaults to the
    data's largest label + 1; ``values``: the labels it can write besides the input's (for the
    output dtype).
    """

    name: str
    defaults: Mapping[str, Any]
    check: Callable[[dict[str, Any]], None]
    random: bool = False
    selection: bool = False
    classes: bool = False
    values: Callable[[Mapping[str, Any]], tuple[int, int]] = lambda params: (0, 0)


#: The perturbations :func:`~emseg.noise.process.process_block` applies, by name.
REGISTRY: dict[str, NoiseMode] = {m.name: m for m in (
    NoiseMode("flip", {"p": None, "p_fg": None, "p_bg": None, "n_classes": None}, _check_flip,
              random=True, selection=True, classes=True, values=lambda p: (0, int(p["n_classes"]) - 1)),
    NoiseMode("sample", {"p": None, "unsampled": -1}, _check_sample, random=True, selection=True,
              values=lambda p: (int(p.get("unsampled", -1)), 0)),
    NoiseMode("dilate", {"radius": None, "per_section": False}, _check_radius_mode),
    NoiseMode("erode", {"radius": None, "per_section": False}, _check_radius_mode),
    NoiseMode("skeleton", {"per_section": True, "halo": None}, _check_skeleton),
    NoiseMode("random", {"p": None, "n_classes": None}, _check_random, random=True, classes=True,
              values=lambda p: (0, int(p["n_classes"]) - 1)),
    NoiseMode("shift", {"radius": None, "per_section": False}, _check_radius_mode, random=True),
)}

#: The mode names, in the order the command line lists them.
MODES = tuple(REGISTRY)

#: Modes drawing random numbers (counter-based streams keyed by the seed and the voxel).
RANDOM_MODES = tuple(m.name for m in REGISTRY.values() if m.random)

#: Modes choosing an exact number of voxels per class (they need :func:`~emseg.noise.process.selection_for`).
SELECTION_MODES = tuple(m.name for m in REGISTRY.values() if m.selection)

#: Radius margin (voxels) of the scan that estimates the widest object for the
#: skeleton halo: widths up to ``2 * WIDTH_SCAN_MARGIN`` are measured exactly.
WIDTH_SCAN_MARGIN = 64


# --------------------------------------------------------------------------- #
def check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def check_params(mode: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate the parameters of ``mode`` and fill in the defaults.

    Parameters
    ----------
    mode : str
        One of :data:`MODES`.
    params : mapping, optional
        ``flip``: ``p``, ``p_fg``, ``p_bg`` (fractions in [0, 1]; at least one),
        ``n_classes``; ``sample``: ``p``, ``unsampled`` (-1 or 0); ``dilate``,
        ``erode``, ``shift``: ``radius`` (int >= 0), ``per_section`` (default
        False); ``skeleton``: ``per_section`` (default True), ``halo`` (int >= 0,
        default estimated from the data); ``random``: ``p``, ``n_classes``.
        ``None`` values mean "default".

    Returns
    -------
    dict
        A new dict with every parameter of the mode.

    Raises
    ------
    ValueError
        One line naming the mode and the parameter.

    Examples
    --------
    >>> check_params("dilate", {"radius": 2})
    {'radius': 2, 'per_section': False}
    >>> check_params("sample", {"p": 0.1})
    {'p': 0.1, 'unsampled': -1}
    """
    spec = REGISTRY[check_mode(mode)]
    given = {k: v for k, v in dict(params or {}).items() if v is not None}
    unknown = sorted(set(given) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"{mode}: unknown parameter(s) {', '.join(unknown)} "
            f"(known: {', '.join(spec.defaults)})"
        )
    out = {**spec.defaults, **given}
    try:
        spec.check(out)
    except ValueError as exc:
        raise ValueError(f"{mode}: {exc}") from None
    return out


def _scan_labels(source: Any, block_shape: Sequence[int]) -> tuple[int, int]:
    """(min, max) label of ``source``, read block by block."""
    lo, hi = 0, 0
    for block in plan_blocks(source.shape, block_shape, [0] * len(source.shape)):
        data = np.asarray(source[block.inner])
        if data.size:
            lo, hi = min(lo, int(data.min())), max(hi, int(data.max()))
    return lo, hi


def resolve_params(
    source: Any,
    mode: str,
    params: Mapping[str, Any] | None = None,
    *,
    block_shape: Sequence[int] | None = None,
) -> dict[str, Any]:
    """:func:`check_params`, then fill the parameters that depend on the data.

    ``n_classes`` of ``flip`` and ``random`` defaults to the largest label of
    ``source`` + 1 (at least 2), found by one blockwise scan, so that every block
    draws from the same classes. The ``halo`` of ``skeleton`` defaults to
    ``required_halo("skeleton", max_width=estimate_max_width(...))``.

    Parameters
    ----------
    source : array-like
        The clean labels (an :class:`emseg.io.Volume` or a numpy array).
    mode, params
        As in :func:`check_params`.
    block_shape : sequence of int, optional
        Blocks of the scans (default :func:`default_block_shape`).

    Returns
    -------
    dict
        Complete parameters, accepted by :func:`~emseg.noise.process.process_block`.

    Examples
    --------
    >>> import numpy as np
    >>> resolve_params(np.array([[0, 2], [1, 0]]), "flip", {"p": 0.2})["n_classes"]
    3
    """
    out = check_params(mode, params)
    spec = REGISTRY[mode]
    shape = tuple(int(s) for s in source.shape)
    blocks = check_block_shape(block_shape, shape)
    if spec.classes and out["n_classes"] is None:
        lo, hi = _scan_labels(source, blocks)
        if lo < -1:
            raise ValueError(f"labels must be >= -1 (-1 = ignore), got minimum {lo}")
        out["n_classes"] = max(hi + 1, 2)
        try:
            spec.check(out)  # the parameters checked again with the classes of the data
        except ValueError as exc:
            raise ValueError(f"{mode}: {exc}") from None
    if "halo" in spec.defaults and out["halo"] is None:  # a halo from the widest object
        width = estimate_max_width(source, per_section=out["per_section"], block_shape=blocks)
        out["halo"] = required_halo(mode, max_width=width)
    return out


def require_resolved(mode: str, params: Mapping[str, Any]) -> None:
    missing = [k for k in REGISTRY[mode].defaults if k not in params]
    if REGISTRY[mode].classes and params.get("n_classes") is None:
        missing.append("n_classes")
    if "halo" in REGISTRY[mode].defaults and params.get("halo") is None:
        missing.append("halo")
    if missing:
        raise ValueError(
            f"{mode}: parameters not resolved ({', '.join(missing)}); pass them through "
            "resolve_params first"
        )


# --------------------------------------------------------------------------- #

def default_block_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Default blocks: 16 x 512 x 512 (3D) or 2048 x 2048 (2D), clipped to ``shape``.

    A function of the volume shape only, so the output of the random modes does
    not depend on how the input happens to be chunked on disk.

    Examples
    --------
    >>> default_block_shape((20, 1024, 1024)), default_block_shape((300, 400))
    ((16, 512, 512), (300, 400))
    """
    shape = tuple(int(s) for s in shape)
    target = (16, 512, 512) if len(shape) == 3 else (2048, 2048)
    return tuple(max(1, min(s, t)) for s, t in zip(shape, target))


def check_block_shape(block_shape: Sequence[int] | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) not in (2, 3):
        raise ValueError(f"labels must be 2D (y, x) or 3D (z, y, x), got shape {shape}")
    if block_shape is None:
        return default_block_shape(shape)
    try:
        blocks = tuple(check_int(b, "block sides", minimum=1) for b in block_shape)
    except TypeError:
        raise ValueError(f"block shape must be a sequence of ints, got {block_shape!r}") from None
    if len(blocks) != len(shape):
        raise ValueError(
            f"block shape {blocks} has {len(blocks)} axes but the volume {shape} has {len(shape)}"
        )
    return tuple(min(b, s) if s else b for b, s in zip(blocks, shape))

def halo_shape(mode: str, params: Mapping[str, Any], ndim: int) -> tuple[int, ...]:
    """Halo per axis a block of ``mode`` is read with.

    ``required_halo`` of the mode along every axis (the ``halo`` parameter for
    ``skeleton``), except 0 along z for 3D volumes processed per section.

    Examples
    --------
    >>> halo_shape("dilate", {"radius": 2, "per_section": True}, 3)
    (0, 2, 2)
    >>> halo_shape("flip", {"p": 0.4}, 2)
    (0, 0)
    """
    mode = check_mode(mode)
    if "halo" in REGISTRY[mode].defaults:
        if params.get("halo") is None:
            raise ValueError(f"{mode}: parameters not resolved (halo); pass them through resolve_params first")
        h = check_int(params["halo"], "halo", minimum=0)
    else:
        h = required_halo(mode, params.get("radius") or 0)
    halo = [h] * ndim
    if ndim == 3 and params.get("per_section"):
        halo[0] = 0
    return tuple(halo)

def output_dtype(mode: str, params: Mapping[str, Any], dtype: Any) -> np.dtype:
    """Dtype of the noisy labels for input labels of ``dtype``.

    The input dtype, promoted only when it cannot hold the new values: classes
    ``0..n_classes-1`` for ``flip``/``random``, the value of unsampled voxels for
    ``sample`` (so unsigned input becomes signed for -1). Booleans become uint8.

    Examples
    --------
    >>> output_dtype("sample", {"p": 0.1, "unsampled": -1}, np.uint8)
    dtype('int16')
    >>> output_dtype("dilate", {"radius": 1}, np.uint8)
    dtype('uint8')
    """
    dt = np.dtype(dtype)
    if dt.kind not in "biu":
        raise ValueError(f"labels must have an integer dtype, got {dt}")
    return fit_dtype(dt, *REGISTRY[check_mode(mode)].values(params))


# --------------------------------------------------------------------------- #

# skeleton halo: widest object
# --------------------------------------------------------------------------- #
def _widest_radius(region: np.ndarray, inner: tuple[slice, ...] | None, per_section: bool) -> float:
    """Largest distance from a voxel of class k >= 1 (inside ``inner``) to the nearest
    voxel of ``region`` that is not class k; ``inf`` if some class fills a whole
    region (section) so no such voxel exists."""
    if inner is None:
        inner = tuple(slice(0, s) for s in region.shape)
    best = 0.0
    # bounding box + 1: the nearest non-k voxel of any voxel inside the box
    # lies in the box or on its one-voxel ring (or nowhere in the region)
    for k, box in class_boxes(region):
        core = tuple(
            slice(max(i.start - b.start, 0), max(min(i.stop, b.stop) - b.start, 0))
            for i, b in zip(inner, box, strict=True)
        )
        mask = region[box] == k
        if not mask[core].any():
            continue
        if per_section:
            pairs = [(mask[z], core[1:]) for z in range(mask.shape[0])[core[0]]]
        else:
            pairs = [(mask, core)]
        for m, c in pairs:
            if not m[c].any():
                continue
            if m.all():
                return float("inf")
            best = max(best, float(ndi.distance_transform_edt(m)[c].max()))
    return best


def max_object_width(labels: Any, *, per_section: bool = True) -> int:
    """Width of the widest object: ``ceil(2 * max distance to another label)``.

    For every foreground class ``k`` the Euclidean distance (in voxels) from each
    class-``k`` voxel to the nearest voxel that is not class ``k`` is taken
    within the array (as :func:`scipy.ndimage.distance_transform_edt` of
    ``labels == k``); the width is twice the largest such distance, rounded up:
    the diameter of the largest disk/ball inscribed in an object. This is the
    ``max_width`` of :func:`~emseg.noise.required_halo`.

    Parameters
    ----------
    labels : array_like of int, 2D or 3D
    per_section : bool
        3D only: measure 2D distances within each z-section.

    Returns
    -------
    int
        0 without foreground.

    Raises
    ------
    ValueError
        If a class fills an entire array (section): its width is unbounded.

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((9, 9), dtype=np.int64); lab[2:7, 1:8] = 1
    >>> max_object_width(lab)
    6
    """
    arr = as_labels(labels)
    section = check_per_section(per_section) and arr.ndim == 3
    radius = _widest_radius(arr, None, section)
    if not np.isfinite(radius):
        raise ValueError("a class fills a whole section/volume: object width is unbounded")
    return int(np.ceil(2 * radius))


def estimate_max_width(
    source: Any,
    *,
    per_section: bool = True,
    block_shape: Sequence[int] | None = None,
    margin: int = WIDTH_SCAN_MARGIN,
) -> int:
    """:func:`max_object_width` of a volume on disk, read block by block.

    Each block is read with ``margin`` voxels on every side (in-plane only per
    section). A voxel's distance to the nearest other label is then exact
    whenever it is at most ``margin``, so the result equals
    :func:`max_object_width` of the whole volume when that is at most
    ``2 * margin``.

    Parameters
    ----------
    source : array-like, 2D or 3D
    per_section : bool
        3D only: measure within each z-section.
    block_shape : sequence of int, optional
        Default :func:`default_block_shape`.
    margin : int >= 1
        Largest radius measured exactly.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        If some object is wider than ``2 * margin``: give the halo explicitly.

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((40, 40), dtype=np.int64); lab[5:15, 5:35] = 1
    >>> estimate_max_width(lab, block_shape=(16, 16), margin=8)
    10
    """
    shape = tuple(int(s) for s in source.shape)
    blocks = check_block_shape(block_shape, shape)
    m = check_int(margin, "margin", minimum=1)
    section = check_per_section(per_section) and len(shape) == 3
    halo = [m] * len(shape)
    if section:
        halo[0] = 0
    best = 0.0
    for block in plan_blocks(shape, blocks, halo):
        region = as_labels(np.asarray(source[block.outer]))
        best = max(best, _widest_radius(region, block.inner_in_outer, section))
        if best > m:
            raise ValueError(
                f"objects are wider than {2 * m} voxels, beyond what the width scan measures; "
                "give the skeleton halo explicitly (`halo`)"
            )
    return int(np.ceil(2 * best))
