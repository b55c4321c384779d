"""Predict a volume on disk with a trained checkpoint (the core of ``emseg predict``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from emseg.checkpoint import check_model_config, load_checkpoint, model_from_state
from emseg.device import resolve_device
from emseg.errors import InputError
from emseg.inference import (
    PredictStats,
    SlidingWindow,
    default_block_shape,
    output_shape,
    plan_blocks,
    predict_volume,
    softmax_forward,
)
from emseg.models import fold_batchnorm
from emseg.precision import resolve_precision
from emseg.io import (
    auto_chunks,
    check_distinct,
    check_output_location,
    check_output_volume,
    check_raw,
    create_volume,
    is_ome_path,
    open_volume,
    parse_spec,
)


@dataclass(frozen=True)
class PredictConfig:
    model: str
    input: str
    output: str
    patch_shape: tuple[int, ...] | None = None  # default: the training patch
    overlap: float = 0.25
    blend: str = "gaussian"
    batch_size: int = 4
    output_type: str = "probabilities"
    block_shape: tuple[int, ...] | None = None
    device: str = "auto"
    #: ``auto | fp32 | bf16`` (see :mod:`emseg.precision`).
    precision: str = "auto"
    #: Run the network through ``torch.compile`` (a one-off compile cost per process).
    compile: bool = False
    #: ``None`` runs in this process; ``"local"`` a LocalCluster of ``workers`` processes;
    #: ``"tcp://HOST:PORT"`` a running dask scheduler (see :mod:`emseg.distributed`).
    scheduler: str | None = None
    workers: int | None = None
    #: Write into a fixed ``.partial`` zarr and skip the blocks already done (always on with a scheduler).
    resume: bool = False
    retries: int = 2


@dataclass(frozen=True)
class PredictResult:
    output: str
    shape: tuple[int, ...]
    n_classes: int
    patch_shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    stats: PredictStats
    precision: str = "fp32"
    #: Blocks computed in this call and blocks found already done (resumable runs only).
    blocks_computed: int | None = None
    blocks_skipped: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "output": self.output, "shape": list(self.shape), "n_classes": self.n_classes,
            "patch_shape": list(self.patch_shape), "block_shape": list(self.block_shape),
            "precision": self.precision,
            "voxels": self.stats.voxels, "blocks": self.stats.blocks,
            "seconds": round(self.stats.seconds, 3), "voxels_per_s": round(self.stats.voxels_per_s, 1),
        }
        if self.blocks_computed is not None:
            out.update(blocks_computed=self.blocks_computed, blocks_skipped=self.blocks_skipped)
        return out


def resolve_patch(patch: Sequence[int] | None, trained: Sequence[int] | None, volume_shape: Sequence[int],
                  model_ndim: int) -> tuple[int, ...]:
    """The window shape in volume axes: given, or the training patch adapted to the volume's axes."""
    patch = tuple(patch) if patch else tuple(trained or (256,) * model_ndim)
    if len(patch) == len(volume_shape) + 1 and patch[0] == 1:
        patch = patch[1:]
    if len(patch) == len(volume_shape) - 1 and model_ndim == 2:
        patch = (1,) + patch
    if len(patch) != len(volume_shape):
        raise InputError(f"--patch {patch} does not fit a {len(volume_shape)}D volume")
    if model_ndim == 3 and len(volume_shape) != 3:
        raise InputError("a 3D network needs a 3D volume")
    if any(p < 1 for p in patch):
        raise InputError(f"--patch sides must be positive, got {patch}")
    if model_ndim == 2 and len(patch) == 3 and patch[0] != 1:
        raise InputError(f"--patch {patch}: a 2D network on a 3D volume needs z = 1")
    return patch


def check_options(config: PredictConfig) -> None:
    """Prediction options that are user input: ranges checked with the option named."""
    if not 0 <= config.overlap < 1:
        raise InputError(f"--overlap must be in [0, 1), got {config.overlap}")
    if config.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {config.batch_size}")
    if config.blend not in ("gaussian", "constant"):
        raise InputError(f"--blend must be gaussian or constant, got {config.blend!r}")
    if config.output_type not in ("probabilities", "labels"):
        raise InputError(f"--output-type must be probabilities or labels, got {config.output_type!r}")


_PREPARED: dict[tuple, tuple] = {}


def _prepared(model: torch.nn.Module, precision, compile_: bool) -> torch.nn.Module:
    """``model`` folded, laid out and (optionally) compiled, once per process and model: cluster
    workers build a predictor per block, and a compiled network must not be compiled again."""
    key = (id(model), precision, compile_)
    if key not in _PREPARED:
        net = precision.prepare_model(fold_batchnorm(model.eval()))
        _PREPARED.clear()
        _PREPARED[key] = (torch.compile(net, dynamic=False) if compile_ else net, model)
    return _PREPARED[key][0]


def make_predictor(model: torch.nn.Module, patch: Sequence[int], config: PredictConfig,
                   device: torch.device) -> SlidingWindow:
    """The sliding window of ``config``: its precision resolved for ``device``, batch norm folded into
    the convolutions (:func:`~emseg.models.fold_batchnorm`), weights in the matching memory format."""
    precision = resolve_precision(config.precision, device, ndim=model.ndim)
    net = _prepared(model, precision, bool(getattr(config, "compile", False)))
    return SlidingWindow(softmax_forward(net), patch, divisor=model.divisor, overlap=config.overlap,
                         blend=config.blend, batch_size=config.batch_size, device=device, precision=precision)


def predict_file(config: PredictConfig, *, progress: Callable[[int, int], None] | None = None,
                 client: Any = None) -> PredictResult:
    """Sliding-window prediction of ``config.input`` into ``config.output``, block by block.

    The output is written under a temporary name and renamed when complete. Probabilities are
    stored channel-first (C, *S) as float32; labels as uint8 argmax. With ``config.scheduler``
    (or ``client``, an open dask.distributed client) the blocks run on a dask cluster, and with
    ``config.resume`` (implied by a cluster) finished blocks survive a crash: see
    :func:`emseg.distributed.predict_resumable`.
    """
    if config.workers is not None and config.scheduler != "local" and client is None:
        raise InputError("--workers applies to --scheduler local only")
    check_distinct(config.input, config.output)
    check_options(config)
    if config.scheduler is not None or config.resume or client is not None:
        from emseg.distributed import predict_resumable

        if is_ome_path(parse_spec(config.output).path):
            raise InputError("--scheduler/--resume write plain zarr; predict in-process for an OME-Zarr output",
                             source=str(config.output))
        check_output_location(parse_spec(config.output).path)
        return predict_resumable(config, progress=progress, client=client)
    out_spec = check_output_volume(config.output)
    device = resolve_device(config.device)
    state = load_checkpoint(config.model)
    model_config = check_model_config(state["model_config"], source=str(config.model))
    if model_config.get("cond_channels"):
        raise InputError("this checkpoint is label-conditioned: use `emseg lcs infer`", source=config.model)
    trained_patch = (state.get("config") or {}).get("patch_shape")
    with open_volume(config.input) as source:
        check_raw(source)
        patch = resolve_patch(config.patch_shape, trained_patch, source.shape, int(model_config.get("ndim", 2)))
        window = tuple(min(p, s) for p, s in zip(patch, source.shape))  # what the network sees at most
        model = model_from_state(state, source=str(config.model), device=device, patch=window)
        n_classes = state["model_config"]["out_channels"]
        shape = output_shape(source.shape, n_classes, config.output_type)
        dtype = "float32" if config.output_type == "probabilities" else "uint8"
        chunks = auto_chunks(shape, 4 if dtype == "float32" else 1)
        spatial_chunks = chunks[1:] if config.output_type == "probabilities" else chunks
        if config.block_shape and len(config.block_shape) != len(source.shape):
            raise InputError(f"--block {tuple(config.block_shape)} does not fit a {len(source.shape)}D volume",
                             source=str(config.input))
        block_shape = tuple(config.block_shape) if config.block_shape else default_block_shape(
            source.shape, patch, spatial_chunks)
        blocks = plan_blocks(source.shape, block_shape, [p // 2 for p in patch])
        predictor = make_predictor(model, patch, config, device)
        attrs = {"n_classes": n_classes, "output_type": config.output_type, "source": str(config.input),
                 "model": str(Path(config.model)), "patch_shape": list(patch), "overlap": config.overlap,
                 "blend": config.blend, "precision": predictor.precision.name}
        with create_volume(out_spec, shape, dtype, chunks=chunks, attrs=attrs) as dest:
            stats = predict_volume(predictor, source, dest, blocks=blocks, output_type=config.output_type,
                                   progress=progress)
    return PredictResult(str(out_spec), shape, n_classes, patch, block_shape, stats,
                         precision=predictor.precision.name)
