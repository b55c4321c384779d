"""The training loop shared by ``emseg train`` and the other subcommands that train networks.

A *task* supplies the network configuration, batches, the loss and validation; :func:`run_training`
does the rest: Adam with a learning-rate schedule, the ``precision`` setting (bf16 autocast and
channels-last where the hardware has native bf16; losses in float32), the next batch prepared
in a background thread while the current step runs, ``metrics.csv``,
``last.pt``/``best.pt`` written atomically, exact resume, a clean stop on SIGINT and a stop with
the last good checkpoint kept when the loss becomes NaN or infinite.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch

from emseg.models.checkpoint import load_checkpoint, save_checkpoint
from emseg.models.transfer import init_from_checkpoint
from emseg.engine.config import OptimConfig, TrainConfig, learning_rate
from emseg.data.prefetch import Prefetcher, step_rng
from emseg.runtime.device import (configure_threads, device_rng_state, resolve_device, restore_device_rng,
                                  seed_everything)
from emseg.runtime.ddp import ProcessGroup
from emseg.errors import InputError, TrainingDiverged
from emseg.runtime.locks import temp_name
from emseg.models import build_model
from emseg.models.unet import encoder_parameters
from emseg.runtime.precision import Precision, resolve_precision
from emseg.engine.runfolder import MetricsLog, in_run_folder, non_finite_state, restore_buffers, snapshot_buffers
from emseg.runtime import Runtime

BASE_COLUMNS = ("step", "loss", "lr", "patches_per_s", "elapsed_s")


class Task(Protocol):
    """What a kind of training supplies to :func:`run_training`."""

    name: str
    metric_columns: Sequence[str]

    def model_config(self) -> dict[str, Any]: ...

    def batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def validate(self, model: torch.nn.Module, device: torch.device,
                 precision: str | Precision) -> dict[str, float] | None: ...

    def extra_state(self) -> dict[str, Any]:
        """Checkpoint entries beyond the network (settings a resume or a prediction needs)."""

    def check_resume(self, state: Mapping[str, Any], source: str) -> None:
        """Refuse (:class:`InputError` naming ``source``) a ``last.pt`` this task cannot continue."""

    def close(self) -> None:
        """Release the task's open volumes."""


@dataclass
class TrainResult:
    """What a training run did. ``losses`` holds one value per step run in this call."""

    out_dir: Path
    start_step: int
    final_step: int
    losses: list[float] = field(default_factory=list)
    best_metric: float | None = None
    last_valid: dict[str, float] | None = None
    interrupted: bool = False
    budget_exhausted: bool = False
    seconds: float = 0.0
    patches: int = 0
    precision: str = "fp32"
    #: What ``config.init`` loaded (:func:`~emseg.models.transfer.init_from_checkpoint`), else None.
    init: dict[str, Any] | None = None

    @property
    def patches_per_s(self) -> float:
        return self.patches / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir), "start_step": self.start_step, "final_step": self.final_step,
            "final_loss": self.losses[-1] if self.losses else None, "best_metric": self.best_metric,
            "last_valid": self.last_valid, "interrupted": self.interrupted,
            "budget_exhausted": self.budget_exhausted,
            "seconds": round(self.seconds, 3), "patches_per_s": round(self.patches_per_s, 2),
            "precision": self.precision, "init": self.init,
        }


def check_divisible(patch_shape: Sequence[int], divisor: Sequence[int], source: str = "patch_shape") -> None:
    """Network inputs must be multiples of the U-Net's down-sampling factor."""
    spatial = tuple(patch_shape)[-len(divisor):]
    if any(p % d for p, d in zip(spatial, divisor)):
        raise InputError(f"patch {tuple(patch_shape)} must be a multiple of {tuple(divisor)} for this network depth",
                         source=source)




class _StopFlag:
    """Turns SIGINT into a flag checked between steps (only from the main thread)."""

    def __init__(self):
        self.stop = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop:  # a second Ctrl-C aborts at once
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    state = {"numpy": rng.bit_generator.state, "python": random.getstate(), "torch": torch.get_rng_state()}
    state.update(device_rng_state())
    return state


def _restore_rng(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state["numpy"]
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    restore_device_rng(state)


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Adam:
    """Adam over ``model``'s parameters. With ``optim.encoder_lr_scale`` other than 1 the encoder
    (:func:`~emseg.models.unet.encoder_parameters`) is a group of its own whose learning rate is
    the schedule's times the scale (the group's ``lr_scale``); at 0 its weights are frozen
    (``requires_grad`` off, so no gradient is computed for them)."""
    scale = optim.encoder_lr_scale
    if scale == 1:
        return torch.optim.Adam(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    encoder = encoder_parameters(model)
    if not encoder:
        raise InputError("optim.encoder_lr_scale is set but this network has no encoder")
    ids = {id(p) for p in encoder}
    if scale == 0:
        for p in encoder:
            p.requires_grad_(False)
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr_scale": 1.0},
              {"params": encoder, "lr": optim.lr * scale, "lr_scale": scale}]
    return torch.optim.Adam(groups, lr=optim.lr, weight_decay=optim.weight_decay)


@in_run_folder
def run_training(
    task: Task,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    runtime: Runtime = Runtime(),
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``task`` for ``config.total_steps`` steps (or until ``max_seconds``), writing into ``out_dir``.

    ``stop_after`` ends this call after that many steps (as if interrupted), which tests use to
    check that resuming continues exactly. ``task.extra_state()`` adds task data to checkpoints, and
    ``task.check_resume`` says whether a ``last.pt`` can be continued.
    ``config.init`` names a checkpoint whose weights start a new run (:mod:`emseg.models.transfer`).

    Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) each process trains a
    DistributedDataParallel replica on its own batches (``config.batch_size`` each; the batch of
    step s on rank r is drawn from :func:`~emseg.data.prefetch.step_rng` ``(seed, s, r)``); losses are averaged over processes, rank 0 validates and writes
    ``metrics.csv`` and checkpoints, which hold every rank's random state (``rng_ranks``) so a
    resume with the same N continues exactly. A task may set ``find_unused_parameters = True``.

    ``out_dir`` is locked to this run (see :mod:`emseg.engine.runfolder`). Checkpoints hold only finite
    weights and buffers, and the logging window, so ``metrics.csv`` rows after a resume equal
    those of an uninterrupted run.
    """
    if config.optim.encoder_lr_scale != 1 and config.init is None and not resume:
        raise InputError("optim.encoder_lr_scale slows or freezes a pretrained encoder: a new run needs "
                         "a checkpoint to start from (the `init` key or --init)")
    pg = ProcessGroup.from_env()
    out = Path(out_dir)
    if runtime.threads is not None:
        configure_threads(runtime.threads)
    dev = pg.place(resolve_device(runtime.device))
    if not pg.is_main:
        progress = None
    rng = seed_everything(runtime.seed + pg.rank)
    model_config = task.model_config()
    model = build_model(model_config)
    check_divisible(config.patch_shape, model.divisor)
    # init seeds a new run only; a resumed one continues from last.pt (which keeps the report)
    init = init_from_checkpoint(model, model_config, config.init) if config.init and not resume else None
    model.to(dev)
    precision = resolve_precision(runtime.precision_or(config.effective_precision), dev, ndim=model.ndim,
                                  channels_last=False if pg.active else None)
    precision.prepare_model(model)
    optimizer = build_optimizer(model, config.optim)  # before the wrap: a frozen encoder takes no gradient
    net = pg.wrap(model, find_unused_parameters=bool(getattr(task, "find_unused_parameters", False)))
    last_path, best_path = out / "last.pt", out / "best.pt"
    step, best, elapsed0 = 0, None, 0.0
    window0: dict[str, Any] = {}
    if resume:
        if not last_path.exists():
            raise InputError("nothing to resume: no last.pt", source=str(out))
        state = load_checkpoint(last_path)
        task.check_resume(state, str(last_path))
        if state["model_config"] != model_config:
            raise InputError("checkpoint was trained with a different network configuration", source=str(last_path))
        stored_optim = state.get("config", {}).get("optim") if isinstance(state.get("config"), dict) else None
        stored_scale = stored_optim.get("encoder_lr_scale", 1.0) if isinstance(stored_optim, dict) else 1.0
        if stored_scale != config.optim.encoder_lr_scale:
            raise InputError(f"checkpoint was trained with optim.encoder_lr_scale = {stored_scale}, not "
                             f"{config.optim.encoder_lr_scale}: resume with the scale it started with "
                             f"(--encoder-lr-scale {stored_scale:g} or optim.encoder_lr_scale = {stored_scale:g})",
                             source=str(last_path))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best, elapsed0 = int(state["step"]), state.get("best_metric"), float(state.get("elapsed_s", 0.0))
        _restore_rng(rng, pg.rng_state(state, str(last_path)))
        window0, init = state.get("log_window") or {}, state.get("init")
    elif last_path.exists():
        raise InputError("already holds a training run (last.pt): pass `resume` to continue it or choose "
                         "another `out_dir`", source=str(out))
    log = MetricsLog(out / "metrics.csv", BASE_COLUMNS + tuple(task.metric_columns),
                     resume_step=step if resume else None) if pg.is_main else None
    total = config.total_steps
    result = TrainResult(out, start_step=step, final_step=step, best_metric=best, precision=precision.name,
                         init=init)
    forward = precision.wrap(compile_network(net) if config.compile else net)
    plain_config = config.to_dict()

    def checkpoint(path: Path) -> None:
        bad = non_finite_state(model)
        if bad is not None:  # never write a broken checkpoint: the previous file stays
            raise TrainingDiverged(step, float("nan"), tensor=bad)
        rng_ranks = pg.gather(_rng_state(rng)) if pg.active else None
        if not pg.is_main:
            return
        state = {
            "model": model.state_dict(), "model_config": model_config, "optimizer": optimizer.state_dict(),
            "step": step, "best_metric": best, "rng": _rng_state(rng), "config": plain_config,
            "task": task.name, "elapsed_s": elapsed0 + (time.perf_counter() - t0),
            "precision": precision.name, "init": init,
            "log_window": {"losses": list(window_losses), "patches": window_patches,
                           "seconds": time.perf_counter() - window_t},
        }
        if pg.active:
            state.update(rng_ranks=rng_ranks, world_size=pg.world_size)
        state.update(task.extra_state())
        save_checkpoint(path, state)

    t0 = time.perf_counter()
    window_losses: list[float] = [float(v) for v in window0.get("losses", [])]
    window_t = t0 - float(window0.get("seconds", 0.0))
    window_patches = int(window0.get("patches", 0))

    def make_batch(i: int) -> dict[str, torch.Tensor]:
        # Each batch depends on its step only, so prefetching and resuming change nothing.
        return task.batch(step_rng(runtime.seed, i, pg.rank))

    def validate_and_log(final: bool) -> dict[str, Any] | None:
        """Validation and the metrics row due at ``step`` (both at the run's end, ``final``)."""
        nonlocal best, window_losses, window_patches, window_t
        valid = None
        if task_has_validation(task) and (step % config.valid_every == 0 or final):
            valid = pg.broadcast(_validate(task, model, dev, precision) if pg.is_main else None)
            if valid is not None:
                result.last_valid = valid
                score = valid.get("valid_score")
                if score is not None and math.isfinite(score) and (best is None or score > best):
                    best = score
                    result.best_metric = best
                    checkpoint(best_path)
        if step % config.log_every == 0 or final or valid is not None:
            now = time.perf_counter()
            rate = window_patches / max(now - window_t, 1e-9)
            row = {"step": step, "loss": float(np.mean(window_losses)), "lr": lr, "patches_per_s": rate,
                   "elapsed_s": elapsed0 + now - t0}
            row.update(valid or {})
            if log is not None:
                log.write(row)
            window_losses, window_patches, window_t = [], 0, now
        return valid

    # the rate of the step to come; set here too for a resumed run whose budget is already spent
    lr = learning_rate(config.optim, step, total, None if config.max_seconds is None else elapsed0 / config.max_seconds)
    prefetch = Prefetcher(make_batch, start=step, enabled=config.prefetch and step < total)
    with _StopFlag() as flag, prefetch:
        while step < total:
            if pg.any(flag.stop or (stop_after is not None and step - result.start_step >= stop_after)):
                result.interrupted = True
                break
            spent = elapsed0 + time.perf_counter() - t0  # a resumed run continues the budget it had spent
            if pg.any(config.max_seconds is not None and spent >= config.max_seconds):
                result.budget_exhausted = True
                break
            used = None if config.max_seconds is None else spent / config.max_seconds
            lr = learning_rate(config.optim, step, total, used)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            batch = {k: v.to(dev, non_blocking=True) for k, v in prefetch.get(step).items()}
            model.train()
            buffers = snapshot_buffers(model)  # the forward pass updates normalisation statistics
            loss = task.loss(forward, batch)
            value = pg.mean(float(loss.detach()))
            if not math.isfinite(value):
                # The state before this step is the last good one: undo the failed forward pass's
                # buffer updates and keep it, unless it is itself broken (then last.pt stays).
                restore_buffers(model, buffers)
                if non_finite_state(model) is None:
                    checkpoint(last_path)
                raise TrainingDiverged(step + 1, value)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            n = int(next(iter(batch.values())).shape[0]) * pg.world_size
            result.losses.append(value)
            result.patches += n
            window_losses.append(value)
            window_patches += n
            valid = validate_and_log(final=step == total)
            if step % config.checkpoint_every == 0 or step == total:
                checkpoint(last_path)
            if progress is not None:
                progress({"step": step, "total": None if config.steps is None and used is not None else total,
                          "budget_used": used, "loss": value, "lr": lr,
                          "patches_per_s": result.patches / max(time.perf_counter() - t0, 1e-9),
                          "valid": valid, "model": model})
    if result.budget_exhausted and window_losses:  # a budget stop ends the run as its last step would
        valid = validate_and_log(final=True)
        if progress is not None and valid is not None:
            progress({"step": step, "total": total, "budget_used": 1.0, "loss": window_losses[-1], "lr": lr,
                      "patches_per_s": result.patches / max(time.perf_counter() - t0, 1e-9), "valid": valid,
                      "model": model})
    if pg.broadcast(result.interrupted or result.budget_exhausted or (step == total and not last_path.exists())):
        checkpoint(last_path)
    if pg.is_main and not task_has_validation(task):
        # Without validation the newest weights are the best we know of.
        tmp = temp_name(best_path)
        shutil.copyfile(last_path, tmp)
        os.replace(tmp, best_path)
    result.final_step = step
    result.best_metric = best
    result.seconds = time.perf_counter() - t0
    pg.barrier()  # rank 0's checkpoints are complete when any rank returns
    return result


def fit(task: Task, config: TrainConfig, out_dir: str | Path, **options: Any) -> TrainResult:
    """:func:`run_training` of ``task`` (``options``: ``runtime``, ``resume``, ``progress``,
    ``stop_after``), then the task's volumes closed: the body of every training command's core."""
    try:
        return run_training(task, config, out_dir, **options)
    finally:
        task.close()


def compile_network(net: torch.nn.Module) -> Callable:
    """``torch.compile`` of ``net`` (inductor, static shapes); the caller keeps ``net`` for its state."""
    return torch.compile(net, dynamic=False)


def _validate(task: Task, model: torch.nn.Module, device: torch.device, precision: Precision):
    """``task.validate`` at the run's precision."""
    return task.validate(model, device, precision)


def task_has_validation(task: Task) -> bool:
    return bool(getattr(task, "valid_cubes", None)) or bool(getattr(task, "has_validation", False))
