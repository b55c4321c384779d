"""One label perturbation on blocks of a volume: the pure per-block function and its loops.

:func:`process_block` (a source, a block, the mode, its parameters and the seed in, the block's
noisy labels out) reads the block with the halo its mode needs
(:func:`~emseg.noise.params.halo_shape`), perturbs it with the functions of
:mod:`emseg.noise.synthesis` and :mod:`emseg.noise.morphology` and crops it back to its core, so
memory is bounded by the block, not the volume, and any executor can run blocks in any order or
in parallel and get the same output as the sequential loop of :func:`apply_noise`;
:func:`noise_block_task` is the same on a cluster worker. The command around them is
:func:`emseg.noise.blockwise.noise_file`.

Random modes (``flip``, ``sample``, ``random``, ``shift``) draw each voxel's
random numbers from a counter-based stream keyed by the seed and the voxel's
coordinate in the whole volume (see :mod:`emseg.noise.streams`), so the output
is fixed by the seed alone: every block grid, and the whole-array functions of
:mod:`emseg.noise.synthesis` called with ``rng=seed``, give the same labels. The
exact per-class counts of ``flip``/``sample`` hold for the whole volume: their
per-class thresholds (:class:`~emseg.noise.counts.Selection`) come from a
counting scan of the input (:func:`selection_for`) before the blocks run.
"""


from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from emseg.engine.blocks import plan_blocks
from emseg.engine.cluster import FAIL_BLOCKS_ENV
from emseg.io import auto_chunks, open_volume
from emseg.noise.checks import as_labels
from emseg.noise.morphology import dilate, erode, skeleton
from emseg.noise.params import (
    REGISTRY,
    SELECTION_MODES,
    check_block_shape,
    check_mode,
    halo_shape,
    output_dtype,
    require_resolved,
)
from emseg.noise.report import TransitionCounter
from emseg.noise.counts import Selection, selection_from_chunks
from emseg.noise.streams import Box, stream_key
from emseg.noise.synthesis import flip_at, random_at, sample_at, shift_at

__all__ = [
    "NoiseJob",
    "apply_noise",
    "block_chunks",
    "noise_block_task",
    "plan_noise_blocks",
    "process_block",
    "selection_for",
]


# --------------------------------------------------------------------------- #
# block grid
# --------------------------------------------------------------------------- #
def plan_noise_blocks(
    shape: Sequence[int],
    mode: str,
    params: Mapping[str, Any],
    block_shape: Sequence[int] | None = None,
):
    """The blocks (:class:`emseg.engine.inference.Block`) of a run: grid plus mode halo.

    Examples
    --------
    >>> blocks = plan_noise_blocks((4, 10, 10), "erode", {"radius": 1}, (4, 5, 5))
    >>> len(blocks), blocks[0].outer
    (4, (slice(0, 4, None), slice(0, 6, None), slice(0, 6, None)))
    """
    shape = tuple(int(s) for s in shape)
    blocks = check_block_shape(block_shape, shape)
    return plan_blocks(shape, blocks, halo_shape(mode, params, len(shape)))

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
    """The fraction of each class a selection mode changes (``flip``: per class; ``sample``: one ``p``)."""
    return _flip_fractions(params) if "p_fg" in REGISTRY[mode].defaults else float(params["p"])


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
    the hashes near each expected quantile; see :class:`~emseg.noise.counts.Selection`).
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
    blocks = plan_blocks(shape, check_block_shape(block_shape, shape), [0] * len(shape))

    def chunks():
        for block in blocks:
            data = np.asarray(source[block.inner])
            origin = tuple(sl.start for sl in block.inner)
            yield data.reshape(-1), Box(data.shape, origin, shape)

    return selection_from_chunks(stream_key(seed), chunks, _mode_fractions(mode, params))


# One function per mode: (labels at block.outer, params, stream key, selection, where) -> labels at
# block.outer (or, for ``random``, already at block.inner); ``where`` = origin and volume_shape.
def _flip(arr, params, key, selection, where):
    return flip_at(arr, _flip_fractions(params), int(params["n_classes"]), key, selection=selection, **where)


def _sample(arr, params, key, selection, where):
    return sample_at(arr, float(params["p"]), int(params["unsampled"]), key, selection=selection, **where)


def _dilate(arr, params, key, selection, where):
    return dilate(arr, params["radius"], per_section=params["per_section"])


def _erode(arr, params, key, selection, where):
    return erode(arr, params["radius"], per_section=params["per_section"])


def _skeleton(arr, params, key, selection, where):
    return skeleton(arr, per_section=params["per_section"])


def _shift(arr, params, key, selection, where):
    return shift_at(arr, params["radius"], params["per_section"] and arr.ndim == 3, key, **where)


#: The array function of each mode of :data:`~emseg.noise.params.REGISTRY` (``random``, which
#: draws new labels and never reads the halo, is applied to the inner region by :func:`_apply`).
APPLY = {"flip": _flip, "sample": _sample, "dilate": _dilate, "erode": _erode, "skeleton": _skeleton,
         "shift": _shift}


def _apply(data: np.ndarray, block: Any, mode: str, params: Mapping[str, Any], seed: int, *,
           volume_shape: Sequence[int], selection: Selection | None = None) -> np.ndarray:
    """Noisy labels of ``block.inner`` from ``data`` = the source at ``block.outer``."""
    arr = as_labels(data)
    core = block.inner_in_outer
    spec = REGISTRY[mode]
    key = stream_key(seed) if spec.random else 0
    if spec.selection and selection is None:
        raise ValueError(f"{mode}: the volume's selection thresholds are missing (see selection_for)")
    dtype = output_dtype(mode, params, arr.dtype)
    if mode == "random":
        inner = arr[core]
        out = random_at(inner.shape, params["p"], int(params["n_classes"]), key, dtype,
                        origin=tuple(sl.start for sl in block.inner), volume_shape=tuple(volume_shape))
        return np.where(inner < 0, np.array(-1, dtype=dtype), out) if inner.dtype.kind == "i" else out
    where = {"origin": tuple(sl.start for sl in block.outer), "volume_shape": tuple(volume_shape)}
    out = APPLY[mode](arr, params, key, selection, where)
    return np.ascontiguousarray(out[core]).astype(dtype, copy=False)


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
    block : emseg.engine.inference.Block
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
    >>> from emseg.noise.params import resolve_params
    >>> lab = np.zeros((8, 8), dtype=np.int64); lab[3, 3] = 1
    >>> params = resolve_params(lab, "dilate", {"radius": 1})
    >>> blocks = plan_noise_blocks(lab.shape, "dilate", params, (4, 4))
    >>> out = np.zeros_like(lab)
    >>> for b in blocks:
    ...     out[b.inner] = process_block(lab, b, "dilate", params, seed=0)
    >>> int(out.sum())
    9
    """
    mode = check_mode(mode)
    require_resolved(mode, params)
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
    blocks : sequence of emseg.engine.inference.Block
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
    >>> from emseg.noise.params import resolve_params
    >>> lab = np.zeros((6, 6), dtype=np.int64); lab[1:5, 1:5] = 1
    >>> params = resolve_params(lab, "erode", {"radius": 1})
    >>> out = np.zeros_like(lab)
    >>> apply_noise(lab, out, "erode", params, 0, blocks=plan_noise_blocks(lab.shape, "erode", params, (3, 3)))
    36
    >>> int(out.sum())
    4
    """
    mode = check_mode(mode)
    require_resolved(mode, params)
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
