"""Sliding-window inference, block by block, over volumes of any size.

A volume is cut into *blocks* (:mod:`emseg.engine.blocks`, aligned with the output chunks); each block is
read with a *halo* of context, predicted by a sliding window of *patches* blended with Gaussian or
constant weights, and its inner part written out. Memory is bounded by the block, not the volume.
The per-block function :func:`predict_block` is what in-process loops and cluster tasks both call;
:func:`predictor_for` builds the sliding window of an opened checkpoint
(:mod:`emseg.models.loading`), :func:`make_predictor` that of a network in memory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import zarr

from emseg.engine.blocks import Block, default_block_shape, describe_block, plan_blocks
from emseg.data.values import to_float, to_output
from emseg.engine.cluster import FAIL_BLOCKS_ENV, injected_failures
from emseg.errors import InputError
from emseg.io import open_volume, parse_spec
from emseg.models.checkpoint import CheckpointFile
from emseg.models.loading import OpenNetwork, cached_open, prepare_network
from emseg.runtime.precision import DEFAULT_PRECISION, Precision, resolve_precision

Forward = Callable[[torch.Tensor], torch.Tensor]


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start positions of windows of ``window`` covering [0, size), the last one flush with the end."""
    if window >= size:
        return [0]
    starts = list(range(0, size - window + 1, max(1, stride)))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def blend_weights(shape: Sequence[int], blend: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """Per-voxel weights of one window: constant ones, or a Gaussian centred on the window
    with sigma = ``sigma_scale`` x side, floored at 1e-3 so no voxel has zero weight."""
    if blend == "constant":
        return np.ones(shape, dtype=np.float32)
    if blend != "gaussian":
        raise InputError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    weight = np.ones((), dtype=np.float64)
    for side in shape:
        x = np.arange(side) - (side - 1) / 2
        sigma = max(side * sigma_scale, 1e-6)
        weight = np.multiply.outer(weight, np.exp(-0.5 * (x / sigma) ** 2))
    weight = weight / weight.max()
    return np.maximum(weight, 1e-3).astype(np.float32)


def softmax_forward(model: torch.nn.Module) -> Forward:
    """Probabilities of a multi-class network: softmax over channels (sigmoid for one channel)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        logits = model(x).float()  # softmax in float32 also under bf16 autocast
        return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)

    return forward


class SlidingWindow:
    """Predicts a region (already in memory) with overlapping windows and blending.

    Parameters
    ----------
    forward : callable
        Maps a float tensor (B, 1, *P) on ``device`` to probabilities (B, C, *P).
    patch_shape : sequence of int
        Window shape in volume axes; a leading 1 on a 3D volume feeds a 2D network.
    divisor : sequence of int
        Per-axis multiple the network needs (windows smaller than the patch are rounded up to it).
    overlap : float
        Fraction of the window shared by neighbours, in [0, 1).
    precision : Precision, optional
        How the network runs, resolved for ``device`` (:func:`emseg.runtime.precision.resolve_precision`;
        default: fp32); probabilities are always blended in float32. The caller puts the model's
        weights in the matching memory format (:meth:`Precision.prepare_model`).
    """

    def __init__(
        self,
        forward: Forward,
        patch_shape: Sequence[int],
        *,
        divisor: Sequence[int] | None = None,
        overlap: float = 0.25,
        blend: str = "gaussian",
        batch_size: int = 4,
        device: str | torch.device = "cpu",
        precision: Precision | None = None,
    ):
        if not 0 <= overlap < 1:
            raise InputError(f"overlap must be in [0, 1), got {overlap}")
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        self.forward = forward
        self.patch_shape = tuple(int(p) for p in patch_shape)
        self.overlap = overlap
        self.blend = blend
        blend_weights((2,), blend)  # validates the name
        self.batch_size = batch_size
        self.device = torch.device(device)
        div = tuple(divisor) if divisor is not None else (1,) * len(self.patch_shape)
        if precision is not None and not isinstance(precision, Precision):
            raise TypeError(f"precision must be a resolved Precision (see resolve_precision), got {precision!r}")
        self.precision = precision or Precision("fp32", self.device.type, False)
        self.squeeze = len(div) == len(self.patch_shape) - 1
        if self.squeeze:
            if self.patch_shape[0] != 1:
                raise InputError(f"a 2D network on a 3D volume needs patch z = 1, got {self.patch_shape}")
            div = (1,) + div
        self.divisor = div

    def _window(self, region_shape: Sequence[int]) -> tuple[int, ...]:
        window = []
        for side, patch, div in zip(region_shape, self.patch_shape, self.divisor):
            w = min(patch, side)
            window.append(int(math.ceil(w / div) * div))
        return tuple(window)

    @torch.no_grad()
    def __call__(self, region: np.ndarray, *, labels: bool = False) -> np.ndarray:
        """Probabilities (C, *R) float32 for a float32 region (*R); with ``labels`` the uint8 class map (*R).

        Labels are the argmax of the summed, weighted probabilities: the per-voxel normalisation
        divides every channel by the same positive weight and cannot change the argmax, so it is
        skipped (as is the float32 map's copy to the host). One channel: probability > 0.5.
        Raises :class:`NonFiniteOutput` when the network's output is not finite.
        """
        region = np.asarray(region, dtype=np.float32)
        window = self._window(region.shape)
        pad = [(0, max(0, w - s)) for w, s in zip(window, region.shape)]
        if any(p[1] for p in pad):
            region = np.pad(region, pad, mode="reflect" if all(s > 1 for s in region.shape) else "edge")
        shape = region.shape
        stride = [max(1, int(round(w * (1 - self.overlap)))) for w in window]
        starts = list(itertools.product(*[window_starts(s, w, st) for s, w, st in zip(shape, window, stride)]))
        weight = torch.from_numpy(blend_weights(window, self.blend)).to(self.device)
        acc = norm = None
        source = torch.from_numpy(region).to(self.device)
        for i in range(0, len(starts), self.batch_size):
            chunk = starts[i: i + self.batch_size]
            slices = [tuple(slice(a, a + w) for a, w in zip(st, window)) for st in chunk]
            x = torch.stack([source[sl] for sl in slices])[:, None]
            if self.squeeze:
                x = x[:, :, 0]
            with self.precision.autocast():
                probs = self.forward(self.precision.prepare_input(x))
            probs = probs.float().contiguous()
            if self.squeeze:
                probs = probs[:, :, None]
            if acc is None:
                acc = torch.zeros((probs.shape[1],) + tuple(shape), dtype=torch.float32, device=self.device)
                if not labels or probs.shape[1] == 1:
                    norm = torch.zeros(shape, dtype=torch.float32, device=self.device)
            for p, sl in zip(probs, slices):
                acc[(slice(None),) + sl].addcmul_(p, weight)  # in place: no (C, *P) temporary
                if norm is not None:
                    norm[sl] += weight
        del source
        crop = tuple(slice(0, s - p[1]) for s, p in zip(shape, pad))
        acc = acc[(slice(None),) + crop]
        if not bool(torch.isfinite(acc).all()):
            raise NonFiniteOutput
        if labels:
            if acc.shape[0] == 1:
                return (acc[0] > 0.5 * norm[crop]).to(torch.uint8).cpu().numpy()
            return torch.argmax(acc, dim=0).to(torch.uint8).cpu().numpy()
        return acc.div_(norm[crop]).cpu().numpy()  # in place: no second (C, *R) buffer


class NonFiniteOutput(ArithmeticError):
    """The network produced NaN or infinity for a region (:func:`predict_block` names the block)."""


def read_block(source: Any, block: Block, raw_dtype=None) -> np.ndarray:
    """``block.outer`` of ``source`` as float32 in [0, 1] (see :func:`~emseg.data.values.to_float`)."""
    return to_float(np.asarray(source[block.outer]), raw_dtype if raw_dtype is not None else source.dtype)


def predict_block(predictor: SlidingWindow, source: Any, block: Block, *, raw_dtype=None,
                  raw: np.ndarray | None = None, output_type: str = "probabilities") -> np.ndarray:
    """Read ``block.outer`` from ``source`` (unless ``raw`` holds it already), predict it, return
    the probabilities of ``block.inner`` (C, *inner) float32, or its labels (*inner) uint8 with
    ``output_type = "labels"`` (the argmax computed without normalising, see :class:`SlidingWindow`)."""
    if raw is None:
        raw = read_block(source, block, raw_dtype)
    try:
        out = predictor(raw, labels=output_type == "labels")
    except NonFiniteOutput:
        where = getattr(source, "spec", None)
        raise InputError(f"the network output became non-finite in {describe_block(block)}: the checkpoint or the "
                         f"input values are unusable (nothing was written for this block)",
                         source=str(where) if where is not None else None) from None
    if output_type == "labels":
        return out[block.inner_in_outer]
    return out[(slice(None),) + block.inner_in_outer]


def output_shape(volume_shape: Sequence[int], n_channels: int, output_type: str) -> tuple[int, ...]:
    """Shape of the written volume: (C, *S) for probabilities, (*S) for labels."""
    return ((n_channels,) if output_type == "probabilities" else ()) + tuple(volume_shape)


@dataclass(frozen=True)
class PredictStats:
    voxels: int
    blocks: int
    seconds: float

    @property
    def voxels_per_s(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else float("nan")


def predict_volume(
    predictor: SlidingWindow,
    source: Any,
    dest: Any,
    *,
    blocks: Sequence[Block],
    output_type: str = "probabilities",
    dtype: str = "float32",
    raw_dtype=None,
    skip: Callable[[Block], bool] | None = None,
    on_block_done: Callable[[Block], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    overlap_io: bool = True,
) -> PredictStats:
    """Predict ``source`` block by block into ``dest`` (channel-first for probabilities, stored as
    ``dtype``, see :func:`to_output`).

    ``skip(block)`` lets a caller resume (blocks already done are not recomputed);
    ``on_block_done(block)`` is called after each block is written. With ``overlap_io`` the
    next block is read in a background thread while the current one is predicted, and each
    block is written (and ``on_block_done`` called) in another thread while the next one is
    predicted: at most one block is read ahead and one write is pending, so memory stays
    bounded by three blocks. A failed read or write is raised here, and nothing after it is
    marked done.
    """
    total = sum(b.size for b in blocks)
    todo = [b for b in blocks if skip is None or not skip(b)]
    todo_ids = {b.index for b in todo}
    start = time.perf_counter()

    def read(block: Block) -> np.ndarray:
        return read_block(source, block, raw_dtype)

    def write(block: Block, data: np.ndarray) -> None:
        index = block.inner if output_type == "labels" else (slice(None),) + block.inner
        dest[index] = data
        if on_block_done is not None:
            on_block_done(block)

    done = computed = 0
    with contextlib.ExitStack() as stack:
        if overlap_io:
            reader = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="emseg-read"))
            writer = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="emseg-write"))
        pending_read = pending_write = None
        it = iter(todo)
        nxt = next(it, None)
        if overlap_io and nxt is not None:
            pending_read = reader.submit(read, nxt)
        for block in blocks:
            if block.index in todo_ids:
                if overlap_io:
                    raw = pending_read.result()
                    nxt = next(it, None)
                    pending_read = reader.submit(read, nxt) if nxt is not None else None
                else:
                    raw = None
                probs = predict_block(predictor, source, block, raw_dtype=raw_dtype, raw=raw, output_type=output_type)
                data = to_output(probs, output_type, dtype)
                del probs, raw
                if overlap_io:
                    if pending_write is not None:
                        pending_write.result()
                    pending_write = writer.submit(write, block, data)
                else:
                    write(block, data)
                computed += block.size
            done += block.size
            if progress is not None:
                progress(done, total)
        if pending_write is not None:
            pending_write.result()
    return PredictStats(computed, len(blocks), time.perf_counter() - start)


def make_predictor(model: torch.nn.Module, patch: Sequence[int], window: WindowOptions,
                   device: torch.device) -> SlidingWindow:
    """The sliding window ``window`` describes for a network in memory (a validation or iGTT model):
    its precision resolved for ``device``, the network prepared for inference
    (:func:`~emseg.models.loading.prepare_network`: batch norm folded into a copy, the matching
    memory format). A checkpoint opened for a volume takes :func:`predictor_for` directly."""
    precision = resolve_precision(window.precision, device, ndim=model.ndim)
    opened = OpenNetwork(prepare_network(model, precision, window.compile), tuple(model.divisor),
                         torch.device(device), precision)
    return predictor_for(opened, patch, window)


def predictor_for(opened: OpenNetwork, patch: Sequence[int], window: WindowOptions) -> SlidingWindow:
    """The sliding window of an opened network (:func:`~emseg.models.loading.open_for_volume`): its
    probabilities (softmax, or sigmoid for one channel) over windows of ``patch``, as ``window`` says."""
    return SlidingWindow(softmax_forward(opened.net), patch, divisor=opened.divisor, overlap=window.overlap,
                         blend=window.blend, batch_size=window_batch(window.batch_size, opened.device),
                         device=opened.device,
                         precision=opened.precision)


@dataclass(frozen=True)
class WindowOptions:
    """How a sliding window runs, as :func:`make_predictor` reads it: the window part of
    :class:`emseg.semantic.predict.PredictConfig` (its ``window``), of a cluster job, of validation and iGTT."""

    precision: str | Precision = DEFAULT_PRECISION
    overlap: float = 0.25
    blend: str = "gaussian"
    #: Windows per forward pass; ``None``: :func:`window_batch` for the device.
    batch_size: int | None = None
    #: Run the network through ``torch.compile`` (a one-off compile cost per process).
    compile: bool = False


#: Windows per forward pass when none is given: batching windows keeps a GPU busy; on a CPU one
#: window of a U-Net is already a large enough computation, and a batch of 4 only adds memory
#: (docs/benchmarks.md: the same speed, about 100 MB more peak memory for 256^2 windows).
CPU_BATCH, GPU_BATCH = 1, 4


def window_batch(batch_size: int | None, device: torch.device) -> int:
    """``batch_size``, or the default for ``device`` (1 on a CPU, 4 on a GPU)."""
    if batch_size is not None:
        return batch_size
    return CPU_BATCH if torch.device(device).type == "cpu" else GPU_BATCH


@dataclass(frozen=True)
class PredictJob:
    """Everything a worker needs to predict one block (absolute paths, no open handles); ``store``
    and ``key`` name the array it writes, set by :meth:`task_for`."""

    checkpoint: CheckpointFile
    input: str
    volume_shape: tuple[int, ...]
    patch_shape: tuple[int, ...]
    window: WindowOptions
    output_type: str
    dtype: str = "float32"
    device: str = "auto"
    fail_blocks: tuple[int, ...] = ()
    store: str = ""
    key: str = ""

    @classmethod
    def for_run(cls, model: Any, input: Any, volume_shape: Sequence[int], patch_shape: Sequence[int],
                window: WindowOptions, output_type: str, dtype: str, device: str) -> PredictJob:
        """The job of one run: the checkpoint and input by absolute path, the checkpoint's time and
        size (a replaced file is noticed), the blocks to fail on purpose
        (:func:`~emseg.engine.cluster.injected_failures`)."""
        spec = parse_spec(input)
        return cls(CheckpointFile.of(Path(model).resolve()), str(type(spec)(spec.path.resolve(), spec.key, spec.fmt)),
                   tuple(volume_shape), tuple(patch_shape), window, output_type, dtype, device, injected_failures())

    def params(self) -> dict[str, Any]:
        """What makes a block's prediction what it is, as a resumable output records it."""
        return {"model": self.checkpoint.path, "model_mtime_ns": self.checkpoint.mtime_ns,
                "model_size": self.checkpoint.size,
                "input": self.input, "input_shape": list(self.volume_shape), "patch_shape": list(self.patch_shape),
                "overlap": self.window.overlap, "blend": self.window.blend, "batch_size": self.window.batch_size,
                "output_type": self.output_type}

    def task_for(self, partial: Any) -> Callable[[Block], int]:
        """The picklable task that writes into ``partial`` (:func:`emseg.engine.resumable.run_resumable`)."""
        return functools.partial(predict_block_task, job=dataclasses.replace(self, store=partial.store,
                                                                             key=partial.key))


    def predict(self, block: Block) -> np.ndarray:
        """Worker side: read ``block.outer`` and predict ``block.inner`` (the network opened once per
        process, :func:`~emseg.models.loading.cached_open`)."""
        if block.index in self.fail_blocks:
            raise RuntimeError(f"failure injected by {FAIL_BLOCKS_ENV}")
        opened = cached_open(self.checkpoint.path, self.volume_shape, patch_shape=self.patch_shape, device=self.device,
                             precision=self.window.precision, compile_=self.window.compile,
                             mtime_ns=self.checkpoint.mtime_ns, size=self.checkpoint.size)
        predictor = predictor_for(opened, self.patch_shape, self.window)
        with open_volume(self.input) as source:
            return predict_block(predictor, source, block, output_type=self.output_type)


def predict_block_task(block: Block, job: PredictJob) -> int:
    """Worker side of a prediction: read ``block.outer``, predict, write ``block.inner``; return its index."""
    data = to_output(job.predict(block), job.output_type, job.dtype)
    dest = zarr.open_array(store=job.store, path=job.key or None, mode="r+")
    index = block.inner if job.output_type == "labels" else (slice(None),) + tuple(block.inner)
    dest[index] = data
    return block.index


def predict_array(
    predictor: SlidingWindow | Callable[[np.ndarray, Block], Any],
    source: Any,
    patch_shape: Sequence[int],
    *,
    raw_dtype=None,
) -> Iterator[tuple[Block, Any]]:
    """Predict a cube held in memory (or read lazily) block by block: yield ``(block, prediction)``.

    The one loop behind validation (:func:`emseg.semantic.train.evaluate_cubes`), LCS validation and
    iGTT: blocks of :func:`~emseg.engine.blocks.default_block_shape` (one-voxel chunks) with a halo of half a
    patch, each read as float32 (:func:`read_block`). With a :class:`SlidingWindow` the prediction is
    the probabilities of ``block.inner`` (checked finite); any other ``predictor`` is called as
    ``predictor(raw, block)`` on the block's outer region and its result is yielded as is.

    Examples
    --------
    >>> out = np.empty(volume.shape, np.float32)  # doctest: +SKIP
    >>> for block, probs in predict_array(window, volume, (1, 128, 128)):  # doctest: +SKIP
    ...     out[block.inner] = probs[1]
    """
    shape = tuple(source.shape)
    blocks = plan_blocks(shape, default_block_shape(shape, patch_shape, (1,) * len(shape)),
                         [p // 2 for p in patch_shape])
    for block in blocks:
        raw = read_block(source, block, raw_dtype)
        if isinstance(predictor, SlidingWindow):
            yield block, predict_block(predictor, source, block, raw=raw)
        else:
            yield block, predictor(raw, block)
