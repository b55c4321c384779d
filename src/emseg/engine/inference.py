"""Sliding-window inference, block by block, over volumes of any size.

A volume is cut into *blocks* (:mod:`emseg.engine.blocks`, aligned with the output chunks); each block is
read with a *halo* of context, predicted by a sliding window of *patches* blended with Gaussian or
constant weights, and its inner part written out. Memory is bounded by the block, not the volume.
The per-block function :func:`predict_block` is what in-process loops and cluster tasks both call;
:func:`make_predictor` builds the sliding window of a checkpoint's network for given options and
:func:`resolve_patch` adapts a window shape to a volume's axes.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from emseg.engine.blocks import Block, default_block_shape, describe_block, plan_blocks
from emseg.data.sampling import to_float
from emseg.errors import InputError
from emseg.models import fold_batchnorm
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
    precision : {"fp32", "bf16", "auto"} or Precision
        How the network runs (:mod:`emseg.runtime.precision`); probabilities are always blended in float32.
        The caller puts the model's weights in the matching memory format
        (:meth:`Precision.prepare_model`). ``amp=True`` is the older spelling of ``"auto"`` on CUDA.
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
        precision: str | Precision = "fp32",
        amp: bool = False,
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
        if amp and precision == "fp32" and self.device.type == "cuda":
            precision = "auto"
        self.precision = resolve_precision(precision, self.device, ndim=len(div))
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
    """``block.outer`` of ``source`` as float32 in [0, 1] (see :func:`~emseg.data.sampling.to_float`)."""
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


#: Sample types of probability outputs: float32, or uint8 scaled to 0-255 (p ~ value / 255).
PROBABILITY_DTYPES = ("float32", "uint8")


def to_output(data: np.ndarray, output_type: str, dtype: str = "float32") -> np.ndarray:
    """What is written for a block: probabilities as float32 or uint8 (``round(255 p)``, computed in
    place); labels (already uint8 from :func:`predict_block`) as they are."""
    if output_type == "labels":
        return data.astype(np.uint8, copy=False)
    if output_type != "probabilities":
        raise InputError(f"output type must be 'probabilities' or 'labels', got {output_type!r}")
    if dtype == "uint8":
        data = np.multiply(data, 255.0, out=data if data.dtype == np.float32 and data.flags.writeable else None,
                           dtype=np.float32)
        return np.rint(data, out=data).astype(np.uint8)
    if dtype != "float32":
        raise InputError(f"probabilities are written as float32 or uint8, not {dtype!r}")
    return data.astype(np.float32, copy=False)


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


def resolve_patch(patch: Sequence[int] | None, trained: Sequence[int] | None, volume_shape: Sequence[int],
                  model_ndim: int) -> tuple[int, ...]:
    """The window shape in volume axes: given, or the training patch adapted to the volume's axes."""
    patch = tuple(patch) if patch else tuple(trained or (256,) * model_ndim)
    if len(patch) == len(volume_shape) + 1 and patch[0] == 1:
        patch = patch[1:]
    if len(patch) == len(volume_shape) - 1 and model_ndim == 2:
        patch = (1,) + patch
    if len(patch) != len(volume_shape):
        raise InputError(f"`patch_shape` {patch} does not fit a {len(volume_shape)}D volume")
    if model_ndim == 3 and len(volume_shape) != 3:
        raise InputError("a 3D network needs a 3D volume")
    if any(p < 1 for p in patch):
        raise InputError(f"`patch_shape` sides must be positive, got {patch}")
    if model_ndim == 2 and len(patch) == 3 and patch[0] != 1:
        raise InputError(f"`patch_shape` {patch}: a 2D network on a 3D volume needs z = 1")
    return patch


def make_predictor(model: torch.nn.Module, patch: Sequence[int], window: WindowOptions,
                   device: torch.device, *, reuse: bool = False) -> SlidingWindow:
    """The sliding window ``window`` describes: its precision resolved for ``device``, batch norm folded
    into the convolutions (:func:`~emseg.models.fold_batchnorm`), weights in the matching memory format.

    With ``reuse`` the folded (and compiled) network is kept per process for the next call with the
    same ``model`` object, whose weights must then not change (a cluster worker's cached checkpoint).
    """
    precision = resolve_precision(window.precision, device, ndim=model.ndim)
    net = _prepared(model, precision, window.compile, reuse)
    return SlidingWindow(softmax_forward(net), patch, divisor=model.divisor, overlap=window.overlap,
                         blend=window.blend, batch_size=window.batch_size, device=device, precision=precision)


_PREPARED: dict[tuple, tuple] = {}


def _prepared(model: torch.nn.Module, precision: Precision, compile_: bool, reuse: bool) -> torch.nn.Module:
    """``model`` folded, laid out and (optionally) compiled; with ``reuse`` once per process and
    model (cluster workers build a predictor per block, and a compiled network must not be
    compiled again)."""
    key = (id(model), precision, compile_)
    if reuse and key in _PREPARED:
        return _PREPARED[key][0]
    net = precision.prepare_model(fold_batchnorm(model.eval()))
    net = torch.compile(net, dynamic=False) if compile_ else net
    if reuse:
        _PREPARED.clear()
        _PREPARED[key] = (net, model)  # the model is kept so that its id is not reused
    return net


@dataclass(frozen=True)
class WindowOptions:
    """How a sliding window runs, as :func:`make_predictor` reads it: the window part of
    :class:`emseg.semantic.predict.PredictConfig` (its ``window``), of a cluster job, of validation and iGTT."""

    precision: str | Precision = DEFAULT_PRECISION
    overlap: float = 0.25
    blend: str = "gaussian"
    batch_size: int = 4
    #: Run the network through ``torch.compile`` (a one-off compile cost per process).
    compile: bool = False


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
