"""The run folder of a training: checked, created, locked to one writer, cleaned of dead runs' temp files.

:func:`in_run_folder` wraps a training entry point whose third argument (or ``out_dir``) is the
folder. Before the run: the path must be usable (not a file, no file among its parents), the
folder is created, :class:`~emseg.runtime.locks.WriterLock` ``.emseg.lock`` is taken (a second run into
the same folder fails at once naming the first one's pid) and temp files of dead runs are
removed. After a failed run, a folder this run created and left without a checkpoint is removed.
Under ``torchrun`` only rank 0 locks and cleans.
"""
from __future__ import annotations

import csv
import functools
import inspect
import io
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from emseg.io._files import atomic_write_text, check_output_location
from emseg.runtime.locks import clean_stale_temps, lock_folder


def _is_main() -> bool:
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def in_run_folder(func: Callable) -> Callable:
    """Decorate ``func(task, config, out_dir, ...)`` to run inside its locked run folder."""
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> Any:
        out = Path(signature.bind(*args, **kwargs).arguments["out_dir"])
        check_output_location(out, folder=True, must_exist_parent=False)
        created = not out.exists()
        main = _is_main()
        out.mkdir(parents=True, exist_ok=True)
        lock = lock_folder(out) if main else None
        try:
            if main:
                clean_stale_temps(out)
            return func(*args, **kwargs)
        except BaseException:
            if created and main and not any(out.glob("*.pt")):
                shutil.rmtree(out, ignore_errors=True)
            raise
        finally:
            if lock is not None:
                lock.release()

    return wrapper


class MetricsLog:
    """``metrics.csv`` with fixed columns; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, columns: Sequence[str], *, resume_step: int | None):
        self.path = path
        self.columns = list(columns)
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.exists():
            with path.open(newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("step") and int(r["step"]) <= resume_step]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buf.getvalue())

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, self.columns, extrasaction="ignore").writerow(
                {k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in row.items()})


def snapshot_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of the network's buffers (normalisation running statistics), cheap beside the weights."""
    return [b.detach().clone() for b in model.buffers()]


def restore_buffers(model: torch.nn.Module, saved: list[torch.Tensor]) -> None:
    """Put back the buffers of :func:`snapshot_buffers` (undoing a failed forward pass's updates)."""
    with torch.no_grad():
        for buffer, old in zip(model.buffers(), saved):
            buffer.copy_(old)


def non_finite_state(model: torch.nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN or infinity, or None."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None
