"""Apply one label perturbation to a volume on disk, block by block.

This is the core of ``emseg noise INPUT OUTPUT``. A volume is tiled into blocks
(:func:`emseg.blocks.plan_blocks`); each block is read with the halo its mode
needs (:func:`halo_shape`), perturbed by the functions of
:mod:`emseg.noise.synthesis`, cropped back to its core and written, so memory is
bounded by the block, not the volume.

The work per block is the pure function :func:`process_block` (a source, a block,
the mode, its parameters and the seed in, the block's noisy labels out), so any
executor can run blocks in any order or in parallel and get the same output as
the sequential loop of :func:`apply_noise`. :func:`noise_file` adds what a run on
disk needs: parameter checks, data-dependent parameters (number of classes,
skeleton halo), an atomically written, chunked and compressed output carrying
provenance attributes, and an optional streamed transition report.

Random modes (``flip``, ``sample``, ``random``, ``shift``) draw each voxel's
random numbers from a counter-based stream keyed by the seed and the voxel's
coordinate in the whole volume (see :mod:`emseg.noise.synthesis`), so the output
is fixed by the seed alone: every block grid, and the whole-array functions of
:mod:`emseg.noise.synthesis` called with ``rng=seed``, give the same labels. The
exact per-class counts of ``flip``/``sample`` hold for the whole volume: their
per-class thresholds (:class:`~emseg.noise.synthesis.Selection`) come from a
counting scan of the input (:func:`selection_for`) before the blocks run.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emseg import __version__
from emseg.blocks import plan_blocks
from emseg.cluster import (
    FAIL_BLOCKS_ENV,
    fit_chunks,
    injected_failures,
    require_distributed,
    resumable_zarr,
    run_blocks,
)
from emseg.errors import InputError
from emseg.io import (
    auto_chunks,
    check_distinct,
    check_not_empty,
    check_output_location,
    check_output_volume,
    create_volume,
    open_volume,
    parse_spec,
)
from emseg.noise.synthesis import (
    Selection,
    _as_labels,
    _check_fraction,
    _check_int,
    class_boxes,
    _check_per_section,
    _check_radius,
    _fit_dtype,
    _flip_at,
    _linear_index,
    _random_at,
    _sample_at,
    _selection_from_chunks,
    _shift_at,
    dilate,
    erode,
    required_halo,
    skeleton,
    stream_key,
)
from emseg.noise.transition import TransitionCounter, flip_matrix

__all__ = [
    "MODES",
    "NoiseResult",
    "apply_noise",
    "block_chunks",
    "check_params",
    "default_block_shape",
    "estimate_max_width",
    "halo_shape",
    "max_object_width",
    "noise_file",
    "output_dtype",
    "plan_noise_blocks",
    "process_block",
    "provenance",
    "resolve_params",
    "selection_for",
]

#: The perturbations :func:`process_block` applies.
MODES = ("flip", "sample", "dilate", "erode", "skeleton", "random", "shift")

#: Modes drawing random numbers (counter-based streams keyed by the seed and the voxel).
RANDOM_MODES = ("flip", "sample", "random", "shift")

#: Modes choosing an exact number of voxels per class (they need :func:`selection_for`).
SELECTION_MODES = ("flip", "sample")

# Parameters of each mode and their defaults (None: required or data-dependent).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "flip": {"p": None, "p_fg": None, "p_bg": None, "n_classes": None},
    "sample": {"p": None, "unsampled": -1},
    "dilate": {"radius": None, "per_section": False},
    "erode": {"radius": None, "per_section": False},
    "skeleton": {"per_section": True, "halo": None},
    "random": {"p": None, "n_classes": None},
    "shift": {"radius": None, "per_section": False},
}

#: Radius margin (voxels) of the scan that estimates the widest object for the
#: skeleton halo: widths up to ``2 * WIDTH_SCAN_MARGIN`` are measured exactly.
WIDTH_SCAN_MARGIN = 64


# --------------------------------------------------------------------------- #
# parameters
# --------------------------------------------------------------------------- #
def _check_mode(mode: Any) -> str:
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
    mode = _check_mode(mode)
    given = {k: v for k, v in dict(params or {}).items() if v is not None}
    unknown = sorted(set(given) - set(_DEFAULTS[mode]))
    if unknown:
        raise ValueError(
            f"{mode}: unknown parameter(s) {', '.join(unknown)} "
            f"(known: {', '.join(_DEFAULTS[mode])})"
        )
    out = {**_DEFAULTS[mode], **given}
    try:
        if mode == "flip":
            if out["p"] is None and out["p_fg"] is None and out["p_bg"] is None:
                raise ValueError("needs p, or p_fg/p_bg for binary labels")
            for key in ("p", "p_fg", "p_bg"):
                if out[key] is not None:
                    out[key] = _check_fraction(out[key], key)
            if out["n_classes"] is not None:
                out["n_classes"] = _check_int(out["n_classes"], "n_classes", minimum=2)
                flip_matrix(out["p"], out["n_classes"], p_fg=out["p_fg"], p_bg=out["p_bg"])
        elif mode in ("sample", "random"):
            if out["p"] is None:
                raise ValueError("needs p")
            out["p"] = _check_fraction(out["p"], "p")
            if mode == "sample":
                u = out["unsampled"]
                if isinstance(u, (bool, np.bool_)) or u not in (-1, 0):
                    raise ValueError(f"unsampled must be -1 (ignore) or 0 (background), got {u!r}")
                out["unsampled"] = int(u)
            elif out["n_classes"] is not None:
                out["n_classes"] = _check_int(out["n_classes"], "n_classes", minimum=2)
        elif mode in ("dilate", "erode", "shift"):
            if out["radius"] is None:
                raise ValueError("needs radius")
            out["radius"] = _check_radius(out["radius"])
            out["per_section"] = _check_per_section(out["per_section"])
        else:  # skeleton
            out["per_section"] = _check_per_section(out["per_section"])
            if out["halo"] is not None:
                out["halo"] = _check_int(out["halo"], "halo", minimum=0)
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
        Complete parameters, accepted by :func:`process_block`.

    Examples
    --------
    >>> import numpy as np
    >>> resolve_params(np.array([[0, 2], [1, 0]]), "flip", {"p": 0.2})["n_classes"]
    3
    """
    out = check_params(mode, params)
    shape = tuple(int(s) for s in source.shape)
    blocks = _check_block_shape(block_shape, shape)
    if mode in ("flip", "random") and out["n_classes"] is None:
        lo, hi = _scan_labels(source, blocks)
        if lo < -1:
            raise ValueError(f"labels must be >= -1 (-1 = ignore), got minimum {lo}")
        out["n_classes"] = max(hi + 1, 2)
    if mode == "flip":
        try:
            flip_matrix(out["p"], out["n_classes"], p_fg=out["p_fg"], p_bg=out["p_bg"])
        except ValueError as exc:
            raise ValueError(f"flip: {exc}") from None
    if mode == "skeleton" and out["halo"] is None:
        width = estimate_max_width(source, per_section=out["per_section"], block_shape=blocks)
        out["halo"] = required_halo("skeleton", max_width=width)
    return out


def _require_resolved(mode: str, params: Mapping[str, Any]) -> None:
    missing = [k for k in _DEFAULTS[mode] if k not in params]
    if mode in ("flip", "random") and params.get("n_classes") is None:
        missing.append("n_classes")
    if mode == "skeleton" and params.get("halo") is None:
        missing.append("halo")
    if missing:
        raise ValueError(
            f"{mode}: parameters not resolved ({', '.join(missing)}); pass them through "
            "resolve_params first"
        )


# --------------------------------------------------------------------------- #
# block grid
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


def _check_block_shape(block_shape: Sequence[int] | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) not in (2, 3):
        raise ValueError(f"labels must be 2D (y, x) or 3D (z, y, x), got shape {shape}")
    if block_shape is None:
        return default_block_shape(shape)
    try:
        blocks = tuple(_check_int(b, "block sides", minimum=1) for b in block_shape)
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
    mode = _check_mode(mode)
    if mode == "skeleton":
        if params.get("halo") is None:
            raise ValueError("skeleton: parameters not resolved (halo); pass them through resolve_params first")
        h = _check_int(params["halo"], "halo", minimum=0)
    else:
        h = required_halo(mode, params.get("radius") or 0)
    halo = [h] * ndim
    if ndim == 3 and params.get("per_section"):
        halo[0] = 0
    return tuple(halo)


def plan_noise_blocks(
    shape: Sequence[int],
    mode: str,
    params: Mapping[str, Any],
    block_shape: Sequence[int] | None = None,
):
    """The blocks (:class:`emseg.inference.Block`) of a run: grid plus mode halo.

    Examples
    --------
    >>> blocks = plan_noise_blocks((4, 10, 10), "erode", {"radius": 1}, (4, 5, 5))
    >>> len(blocks), blocks[0].outer
    (4, (slice(0, 4, None), slice(0, 6, None), slice(0, 6, None)))
    """
    shape = tuple(int(s) for s in shape)
    blocks = _check_block_shape(block_shape, shape)
    return plan_blocks(shape, blocks, halo_shape(mode, params, len(shape)))


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
    if mode in ("flip", "random"):
        return _fit_dtype(dt, 0, int(params["n_classes"]) - 1)
    if mode == "sample":
        return _fit_dtype(dt, int(params.get("unsampled", -1)), 0)
    return _fit_dtype(dt, 0, 0)


# --------------------------------------------------------------------------- #
# skeleton halo: widest object
# --------------------------------------------------------------------------- #
def _widest_radius(region: np.ndarray, inner: tuple[slice, ...] | None, per_section: bool) -> float:
    """Largest distance from a voxel of class k >= 1 (inside ``inner``) to the nearest
    voxel of ``region`` that is not class k; ``inf`` if some class fills a whole
    region (section) so no such voxel exists."""
    from scipy import ndimage as ndi

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
    arr = _as_labels(labels)
    section = _check_per_section(per_section) and arr.ndim == 3
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
    blocks = _check_block_shape(block_shape, shape)
    m = _check_int(margin, "margin", minimum=1)
    section = _check_per_section(per_section) and len(shape) == 3
    halo = [m] * len(shape)
    if section:
        halo[0] = 0
    best = 0.0
    for block in plan_blocks(shape, blocks, halo):
        region = _as_labels(np.asarray(source[block.outer]))
        best = max(best, _widest_radius(region, block.inner_in_outer, section))
        if best > m:
            raise ValueError(
                f"objects are wider than {2 * m} voxels, beyond what the width scan measures; "
                "give the skeleton halo explicitly (emseg noise --halo)"
            )
    return int(np.ceil(2 * best))


# --------------------------------------------------------------------------- #
# per block
# --------------------------------------------------------------------------- #
def _flip_fractions(params: Mapping[str, Any]) -> list[float]:
    """Per-class flip fractions, as :func:`~emseg.noise.synthesis.flip` derives them."""
    k = int(params["n_classes"])
    fractions = [0.0 if params.get("p") is None else float(params["p"])] * k
    if params.get("p_bg") is not None:
        fractions[0] = float(params["p_bg"])
    if params.get("p_fg") is not None:
        fractions[1] = float(params["p_fg"])
    return fractions


def _mode_fractions(mode: str, params: Mapping[str, Any]) -> float | list[float]:
    return _flip_fractions(params) if mode == "flip" else float(params["p"])


def selection_for(
    source: Any,
    mode: str,
    params: Mapping[str, Any],
    seed: int,
    *,
    block_shape: Sequence[int] | None = None,
) -> Selection | None:
    """Per-class thresholds of ``flip``/``sample`` over the whole of ``source`` (None otherwise).

    Voxel ``v`` of class ``k`` is flipped (``flip``) or kept (``sample``) iff its selection hash
    is among the ``m_k = round(p_k n_k)`` smallest of class ``k`` in the whole volume; this
    function finds those thresholds with two or three scans of ``source`` (class counts, then
    the hashes near each expected quantile; see :class:`~emseg.noise.synthesis.Selection`).
    The result does not depend on ``block_shape``, which only bounds the memory.

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((6, 6), dtype=np.int64); lab[:3] = 1
    >>> sel = selection_for(lab, "flip", {"p": 0.5, "n_classes": 2}, seed=0, block_shape=(2, 2))
    >>> sel.classes.tolist(), sel.chosen.tolist()
    ([0, 1], [True, True])
    """
    if mode not in SELECTION_MODES:
        return None
    shape = tuple(int(v) for v in source.shape)
    blocks = plan_blocks(shape, _check_block_shape(block_shape, shape), [0] * len(shape))

    def chunks():
        for block in blocks:
            data = np.asarray(source[block.inner])
            origin = tuple(sl.start for sl in block.inner)
            yield data.reshape(-1), _linear_index(data.shape, origin, shape).reshape(-1)

    return _selection_from_chunks(stream_key(seed), chunks, _mode_fractions(mode, params))


def _apply(data: np.ndarray, block: Any, mode: str, params: Mapping[str, Any], seed: int, *,
           volume_shape: Sequence[int], selection: Selection | None = None) -> np.ndarray:
    """Noisy labels of ``block.inner`` from ``data`` = the source at ``block.outer``."""
    arr = _as_labels(data)
    core = block.inner_in_outer
    key = stream_key(seed) if mode in RANDOM_MODES else 0
    where = {"origin": tuple(sl.start for sl in block.outer), "volume_shape": tuple(volume_shape)}
    if mode in SELECTION_MODES and selection is None:
        raise ValueError(f"{mode}: the volume's selection thresholds are missing (see selection_for)")
    if mode == "flip":
        out = _flip_at(arr, _flip_fractions(params), int(params["n_classes"]), key, selection=selection,
                       **where)
    elif mode == "sample":
        out = _sample_at(arr, float(params["p"]), int(params["unsampled"]), key, selection=selection, **where)
    elif mode == "random":
        inner = arr[core]
        dtype = output_dtype(mode, params, arr.dtype)
        out = _random_at(inner.shape, params["p"], int(params["n_classes"]), key, dtype,
                         origin=tuple(sl.start for sl in block.inner), volume_shape=tuple(volume_shape))
        if inner.dtype.kind == "i":
            out = np.where(inner < 0, np.array(-1, dtype=dtype), out)
        return out
    elif mode == "dilate":
        out = dilate(arr, params["radius"], per_section=params["per_section"])
    elif mode == "erode":
        out = erode(arr, params["radius"], per_section=params["per_section"])
    elif mode == "skeleton":
        out = skeleton(arr, per_section=params["per_section"])
    else:
        section = params["per_section"] and arr.ndim == 3
        out = _shift_at(arr, params["radius"], section, key, **where)
    return np.ascontiguousarray(out[core]).astype(output_dtype(mode, params, arr.dtype), copy=False)


def process_block(source: Any, block: Any, mode: str, params: Mapping[str, Any], seed: int, *,
                  selection: Selection | None = None) -> np.ndarray:
    """Noisy labels of one block: a pure function of its arguments.

    Reads ``source[block.outer]``, applies ``mode`` and returns the part at
    ``block.inner``. Random modes draw from streams keyed by ``seed`` and the global voxel
    coordinate, so a block's result depends neither on the other blocks nor on the grid:
    the blocks of any grid assemble the same volume.

    Parameters
    ----------
    source : array-like
        Clean labels, sliceable (:class:`emseg.io.Volume`, numpy array, ...).
    block : emseg.inference.Block
        One block of :func:`plan_noise_blocks` (its halo must be at least
        :func:`halo_shape` for the result to be exact).
    mode : str
        One of :data:`MODES`.
    params : mapping
        Complete parameters from :func:`resolve_params`.
    seed : int >= 0
        Run seed.
    selection : Selection, optional
        ``flip``/``sample``: :func:`selection_for` of the whole ``source`` (computed here when
        omitted, a scan of the whole volume: pass it when processing many blocks).

    Returns
    -------
    numpy.ndarray
        Shape of ``block.inner``, dtype :func:`output_dtype`.

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((8, 8), dtype=np.int64); lab[3, 3] = 1
    >>> params = resolve_params(lab, "dilate", {"radius": 1})
    >>> blocks = plan_noise_blocks(lab.shape, "dilate", params, (4, 4))
    >>> out = np.zeros_like(lab)
    >>> for b in blocks:
    ...     out[b.inner] = process_block(lab, b, "dilate", params, seed=0)
    >>> int(out.sum())
    9
    """
    mode = _check_mode(mode)
    _require_resolved(mode, params)
    if selection is None:
        selection = selection_for(source, mode, params, seed)
    return _apply(np.asarray(source[block.outer]), block, mode, params, seed, volume_shape=source.shape,
                  selection=selection)


def apply_noise(
    source: Any,
    dest: Any,
    mode: str,
    params: Mapping[str, Any],
    seed: int,
    *,
    blocks: Sequence[Any],
    counter: TransitionCounter | None = None,
    n_classes: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    selection: Selection | None = None,
) -> int:
    """Run :func:`process_block` over ``blocks``, writing ``dest[block.inner]``.

    Parameters
    ----------
    source, dest : array-like
        Clean labels to read and the output to write (same shape).
    mode, params, seed
        As in :func:`process_block`.
    blocks : sequence of emseg.inference.Block
        Usually :func:`plan_noise_blocks`.
    counter : TransitionCounter, optional
        Updated with (clean, noisy) of every block for a streamed report.
    n_classes : int, optional
        If given, clean labels must be below it.
    progress : callable, optional
        ``progress(done_blocks, total_blocks)`` after each block.
    selection : Selection, optional
        ``flip``/``sample``: :func:`selection_for` of ``source`` (computed once when omitted).

    Returns
    -------
    int
        Voxels written.

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((6, 6), dtype=np.int64); lab[1:5, 1:5] = 1
    >>> params = resolve_params(lab, "erode", {"radius": 1})
    >>> out = np.zeros_like(lab)
    >>> apply_noise(lab, out, "erode", params, 0, blocks=plan_noise_blocks(lab.shape, "erode", params, (3, 3)))
    36
    >>> int(out.sum())
    4
    """
    mode = _check_mode(mode)
    _require_resolved(mode, params)
    if selection is None:
        selection = selection_for(source, mode, params, seed)
    done = 0
    for i, block in enumerate(blocks):
        data = np.asarray(source[block.outer])
        if n_classes is not None and data.size and int(data.max()) >= n_classes:
            raise ValueError(f"labels contain class {int(data.max())} but n_classes={n_classes}")
        noisy = _apply(data, block, mode, params, seed, volume_shape=source.shape, selection=selection)
        dest[block.inner] = noisy
        if counter is not None:
            counter.update(data[block.inner_in_outer], noisy)
        done += noisy.size
        if progress is not None:
            progress(i + 1, len(blocks))
    return done


# --------------------------------------------------------------------------- #
# a run on disk
# --------------------------------------------------------------------------- #
def block_chunks(block_shape: Sequence[int], itemsize: int) -> tuple[int, ...]:
    """Output chunks of about 1 MiB that tile a block exactly where possible.

    Each side is the largest divisor of the block side not above the
    :func:`emseg.io.auto_chunks` side, so blocks write whole chunks.

    Examples
    --------
    >>> block_chunks((16, 512, 512), 1)
    (4, 512, 512)
    """
    out = []
    for b, a in zip(block_shape, auto_chunks(block_shape, itemsize)):
        d = max(c for c in range(1, a + 1) if b % c == 0)
        out.append(d if 2 * d >= a else a)
    return tuple(out)


def provenance(
    mode: str,
    params: Mapping[str, Any],
    seed: int,
    source: str,
    block_shape: Sequence[int],
    halo: Sequence[int],
) -> dict[str, Any]:
    """Attributes recording how a noisy volume was made.

    ``emseg_version``, ``noise_mode``, ``noise_params`` (JSON object string),
    ``noise_seed``, ``noise_source`` (the input volume), ``noise_block_shape``
    and ``noise_halo`` (the block grid; the output does not depend on it), and
    ``n_classes`` when the mode fixes it. Flat scalars and lists, so HDF5 and
    zarr store them alike.

    Examples
    --------
    >>> attrs = provenance("flip", {"p": 0.45, "n_classes": 2}, 7, "a.h5:label", (16, 64, 64), (0, 0, 0))
    >>> attrs["noise_mode"], attrs["noise_params"], attrs["n_classes"]
    ('flip', '{"n_classes": 2, "p": 0.45}', 2)
    """
    attrs = {
        "emseg_version": __version__,
        "noise_mode": mode,
        "noise_params": json.dumps(dict(params), sort_keys=True),
        "noise_seed": int(seed),
        "noise_source": str(source),
        "noise_block_shape": [int(b) for b in block_shape],
        "noise_halo": [int(h) for h in halo],
    }
    if params.get("n_classes") is not None:
        attrs["n_classes"] = int(params["n_classes"])
    return attrs


@dataclass(frozen=True)
class NoiseResult:
    """What :func:`noise_file` did."""

    output: str
    shape: tuple[int, ...]
    dtype: str
    mode: str
    params: dict[str, Any]
    seed: int
    block_shape: tuple[int, ...]
    halo: tuple[int, ...]
    blocks: int
    seconds: float
    report: dict[str, Any] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def voxels_per_s(self) -> float:
        n = int(np.prod(self.shape))
        return n / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "output": self.output, "shape": list(self.shape), "dtype": self.dtype,
            "mode": self.mode, "params": dict(self.params), "seed": self.seed,
            "block_shape": list(self.block_shape), "halo": list(self.halo), "blocks": self.blocks,
            "seconds": round(self.seconds, 4), "voxels_per_s": self.voxels_per_s,
            "report": self.report,
        }


def _same_volume(a: Any, b: Any) -> bool:
    return a.fmt == b.fmt and a.key == b.key and Path(a.path).resolve() == Path(b.path).resolve()


def noise_file(
    input_spec: str,
    output_spec: str,
    mode: str,
    params: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    block_shape: Sequence[int] | None = None,
    n_classes: int | None = None,
    report: bool = False,
    rank_tol: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    retries: int = 2,
    client: Any = None,
) -> NoiseResult:
    """Write a noisy copy of the label volume ``input_spec`` to ``output_spec``.

    Parameters
    ----------
    input_spec, output_spec : str
        ``FILE.h5:DATASET`` or ``FILE.zarr[/ARRAY]``; they must differ.
    mode, params
        As in :func:`check_params`.
    seed : int >= 0
        Seed of the random modes (recorded for the others too).
    block_shape : sequence of int, optional
        Block grid (default :func:`default_block_shape`).
    n_classes : int >= 2, optional
        Number of classes: the default ``n_classes`` of ``flip``/``random`` and the
        size of the report; clean labels must be below it.
    report : bool
        Accumulate the clean -> noisy transition counts while writing and return
        :func:`~emseg.noise.noise_report` of the whole volume.
    rank_tol : float, optional
        Absolute singular-value tolerance of the report's ``rank`` (default: three sampling
        errors derived from the counts, :func:`~emseg.noise.rank_statistics`).
    progress : callable, optional
        ``progress(done_blocks, total_blocks)``.
    scheduler : str, optional
        ``"local"`` or ``"tcp://HOST:PORT"``: compute the blocks as tasks of a dask.distributed
        cluster (see :func:`emseg.cluster.run_blocks`), written in place into a resumable
        ``.partial`` zarr array; a rerun computes only the blocks not yet done. Zarr output only.
    workers : int, optional
        Worker processes of ``scheduler="local"``.
    retries : int
        Extra attempts of a failing block on a cluster.
    client : distributed.Client, optional
        An open client to use instead of ``scheduler``.

    Returns
    -------
    NoiseResult

    Raises
    ------
    emseg.errors.InputError
        Bad parameters, a missing or non-label input, or labels that do not fit
        ``n_classes``; nothing is written then.

    Notes
    -----
    Parameters are checked, and data-dependent ones resolved, before the output is
    created; it is written under a temporary name and renamed into place only when
    every block succeeded.

    Examples
    --------
    >>> noise_file("stack.h5:label", "noisy.h5:label", "flip", {"p": 0.45}, seed=1)  # doctest: +SKIP
    """
    try:
        checked = check_params(mode, params)
        if n_classes is not None:
            n_classes = _check_int(n_classes, "n_classes", minimum=2)
            if mode in ("flip", "random"):
                if checked["n_classes"] not in (None, n_classes):
                    raise ValueError(
                        f"n_classes given twice: {checked['n_classes']} and {n_classes}"
                    )
                checked = check_params(mode, {**checked, "n_classes": n_classes})
        seed = _check_int(seed, "seed", minimum=0)
        if rank_tol is not None and not (isinstance(rank_tol, (int, float)) and 0 <= rank_tol < float("inf")):
            raise ValueError(f"rank tolerance must be a finite number >= 0, got {rank_tol!r}")
    except ValueError as exc:
        raise InputError(str(exc)) from None
    in_spec, out_spec = parse_spec(input_spec), parse_spec(output_spec)
    if _same_volume(in_spec, out_spec):
        raise InputError("OUTPUT must differ from INPUT (the clean labels are kept)", source=str(out_spec))
    check_distinct(in_spec, out_spec)  # an OUTPUT group or zarr root holding INPUT
    on_cluster = scheduler is not None or client is not None
    if on_cluster and out_spec.fmt != "zarr":
        raise InputError("--scheduler needs a zarr output (e.g. noisy.zarr/flip45): blocks are written in place "
                         "by independent tasks, which HDF5 files do not allow", source=str(out_spec))
    if workers is not None and scheduler != "local":
        raise InputError("--workers applies to --scheduler local only")
    if on_cluster:
        check_output_location(out_spec.path)
    else:
        check_output_volume(out_spec)
    with open_volume(in_spec) as source:
        src = str(source.spec)
        if source.ndim not in (2, 3):
            raise InputError(f"labels must be 2D (y,x) or 3D (z,y,x), found {source.ndim}D {source.shape}",
                             source=src)
        check_not_empty(source, "labels")
        if source.dtype.kind not in "biu":
            raise InputError(f"labels must be integers, found {source.dtype}", source=src)
        try:
            blocks_shape = _check_block_shape(block_shape, source.shape)
            resolved = resolve_params(source, mode, checked, block_shape=blocks_shape)
            selection = selection_for(source, mode, resolved, seed, block_shape=blocks_shape)
        except ValueError as exc:
            raise InputError(str(exc), source=src) from None
        halo = halo_shape(mode, resolved, source.ndim)
        blocks = plan_noise_blocks(source.shape, mode, resolved, blocks_shape)
        dtype = output_dtype(mode, resolved, source.dtype)
        abs_source = f"{Path(in_spec.path).resolve()}" + (
            f":{in_spec.key}" if in_spec.fmt == "h5" else (f"/{in_spec.key}" if in_spec.key else ""))
        attrs = provenance(mode, resolved, seed, abs_source, blocks_shape, halo)
        k_min = n_classes if n_classes is not None else resolved.get("n_classes")
        counter = TransitionCounter(k_min) if report else None
        if on_cluster:
            job = NoiseJob(input=abs_source, mode=mode, params=dict(resolved), seed=seed, n_classes=n_classes,
                           selection=selection)
            shape, dtype, seconds = _noise_resumable(
                job, out_spec, source.shape, dtype, block_chunks(blocks_shape, dtype.itemsize), attrs, blocks,
                scheduler=scheduler, workers=workers, retries=retries, client=client, progress=progress)
            if counter is not None:
                _count_transitions(source, str(out_spec), blocks, counter)
            return NoiseResult(output=str(out_spec), shape=tuple(shape), dtype=str(dtype), mode=mode,
                               params=resolved, seed=seed, block_shape=blocks_shape, halo=halo,
                               blocks=len(blocks), seconds=seconds,
                               report=counter.report(tol=rank_tol) if counter is not None else None,
                               attrs=attrs)
        start = time.perf_counter()
        dest = create_volume(out_spec, source.shape, dtype, chunks=block_chunks(blocks_shape, dtype.itemsize),
                             attrs=attrs)
        try:
            apply_noise(source, dest, mode, resolved, seed, blocks=blocks, counter=counter,
                        n_classes=n_classes, progress=progress, selection=selection)
        except ValueError as exc:
            dest.discard()
            raise InputError(str(exc), source=src) from None
        except BaseException:
            dest.discard()
            raise
        shape = source.shape
    dest.commit()
    seconds = time.perf_counter() - start
    summary = counter.report(tol=rank_tol) if counter is not None else None
    return NoiseResult(output=str(out_spec), shape=tuple(shape), dtype=str(dtype), mode=mode,
                       params=resolved, seed=seed, block_shape=blocks_shape, halo=halo,
                       blocks=len(blocks), seconds=seconds, report=summary, attrs=attrs)


# --------------------------------------------------------------------------- #
# on a dask.distributed cluster, resumable
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class NoiseJob:
    """What a worker needs to make one block noisy (paths, no open handles)."""

    input: str
    mode: str
    params: dict[str, Any]
    seed: int
    n_classes: int | None = None
    store: str = ""
    key: str = ""
    fail_blocks: tuple[int, ...] = ()
    selection: Selection | None = None


def noise_block_task(block: Any, job: NoiseJob) -> int:
    """Worker side of ``emseg noise --scheduler``: one block from the input into its own output chunks.

    Opens ``job.input`` lazily, runs :func:`process_block` and writes ``block.inner`` of the zarr
    array ``job.store``/``job.key``; returns the block index.

    Examples
    --------
    >>> noise_block_task(blocks[0], job)  # doctest: +SKIP
    0
    """
    if block.index in job.fail_blocks:
        raise RuntimeError(f"failure injected by {FAIL_BLOCKS_ENV}")
    with open_volume(job.input) as source:
        data = np.asarray(source[block.outer])
        shape = tuple(source.shape)
    if job.n_classes is not None and data.size and int(data.max()) >= job.n_classes:
        raise ValueError(f"labels contain class {int(data.max())} but n_classes={job.n_classes}")
    noisy = _apply(data, block, job.mode, job.params, job.seed, volume_shape=shape, selection=job.selection)
    dest = zarr.open_array(store=job.store, path=job.key or None, mode="r+")
    dest[block.inner] = noisy
    return int(block.index)


def _noise_resumable(job: NoiseJob, out_spec: Any, shape: tuple[int, ...], dtype: np.dtype,
                     chunks: Sequence[int], attrs: dict[str, Any], blocks: Sequence[Any], *,
                     scheduler: str | None, workers: int | None, retries: int, client: Any,
                     progress: Callable[[int, int], None] | None) -> tuple[tuple[int, ...], np.dtype, float]:
    """Write the blocks as cluster tasks into a resumable ``.partial`` zarr array, renamed when complete.

    One writer at a time: the partial is locked while it is written (:func:`emseg.cluster.resumable_zarr`).
    """
    if client is None:
        require_distributed()
    out_spec = type(out_spec)(Path(out_spec.path).resolve(), out_spec.key, out_spec.fmt)
    block_shape = tuple(int(b) for b in attrs["noise_block_shape"])
    chunks = fit_chunks(block_shape, tuple(min(int(c), int(s)) for c, s in zip(chunks, shape)))
    params = dict(attrs, emseg_version=None, shape=list(shape), dtype=str(dtype), chunks=list(chunks))
    with resumable_zarr(out_spec, shape, dtype, chunks, attrs=attrs, params=params) as part:
        job = NoiseJob(job.input, job.mode, job.params, job.seed, job.n_classes, part.store, part.key,
                       injected_failures(), job.selection)
        state = {"done": len(part.markers.done() & {b.index for b in blocks})}
        if progress is not None:
            progress(state["done"], len(blocks))

        def on_done(_block: Any, _result: Any) -> None:
            state["done"] += 1
            if progress is not None:
                progress(state["done"], len(blocks))

        run = run_blocks(functools.partial(noise_block_task, job=job), blocks, scheduler=scheduler,
                         workers=workers, client=client, retries=retries, done=part.markers, on_done=on_done,
                         failure_source=str(out_spec), failure_hint=part.hint)
    return tuple(shape), np.dtype(dtype), run.seconds


def _count_transitions(source: Any, output: str, blocks: Sequence[Any], counter: TransitionCounter) -> None:
    """Update ``counter`` with (clean, noisy) of every block, reading both volumes back."""
    with open_volume(output) as noisy:
        for block in blocks:
            counter.update(np.asarray(source[block.inner]), np.asarray(noisy[block.inner]))
