"""Helpers shared by the benchmark scripts (not part of the package or of `make test`)."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch


def data_dir() -> Path | None:
    """The drosophila VNC folder: $EMSEG_DATA, else ../shared/data/drosophila_vnc beside the repo."""
    env = os.environ.get("EMSEG_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "drosophila_vnc")
    for path in candidates:
        if (path / "vnc_stack1.h5").exists():
            return path
    return None


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """The machine a figure comes from: CPU model and its bf16 support (what ``precision = "auto"``
    resolves to on it), cores, torch, threads and the time."""
    from emseg.runtime.precision import cpu_bf16_support

    native, feature = cpu_bf16_support()
    bf16 = f"bf16 native ({feature})" if native else "no native bf16 (auto = fp32)"
    return (f"{cpu_model()}, {platform.machine()}, {bf16}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean masks (NaN when both are empty)."""
    denom = np.count_nonzero(pred) + np.count_nonzero(target)
    return float(2 * np.count_nonzero(pred & target) / denom) if denom else float("nan")
