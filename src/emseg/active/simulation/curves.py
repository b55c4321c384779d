"""What a simulation records: the class-free test windows and their false-positive rates, the rows of
``curves.csv`` and the ``curves.png`` figure (used by :mod:`emseg.active.simulation.loop`).

A window is a cell of the test region's patch grid (the grid of :func:`emseg.active.pool.build_pool`);
it is free of class ``k`` when its labels are fully known and hold no voxel of ``k``. The windows
depend on the test labels only, so every seed and arm is scored on the same ones.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emseg.active.simulation.ask import COST_COLUMNS
from emseg.io import atomic_write_text, save_figure

__all__ = ["class_free_windows", "curve_columns", "false_positive_rates", "fp_columns", "plot_curves",
           "summarise", "write_curves"]


def class_free_windows(label: np.ndarray, patch: Sequence[int], n_classes: int) -> np.ndarray:
    """Which windows of the test grid are free of each foreground class: ``(K, *grid)`` bool.

    The grid is the regular non-overlapping one of ``patch``-sized windows from the origin (the
    remainder at the far edge of an axis is left out). Window ``w`` is free of class ``k`` when its
    ground truth is known everywhere (no -1) and has no voxel of ``k``. Row 0 (background) is all
    False. It depends on the test labels only, so every seed and arm is scored on the same windows.

    Examples
    --------
    >>> lab = np.array([[0, 0, 1, 0]])
    >>> class_free_windows(lab, (1, 2), 2)[1].tolist()
    [[True, False]]
    """
    label = np.asarray(label)
    patch = tuple(int(p) for p in patch)
    grid = tuple(n // p for n, p in zip(label.shape, patch))
    free = np.zeros((n_classes, *grid), dtype=bool)
    if not all(grid):
        return free
    blocks = _windows(label, patch, grid)
    known = (blocks >= 0).all(axis=-1)
    for k in range(1, n_classes):
        free[k] = known & ~(blocks == k).any(axis=-1)
    return free


def _windows(volume: np.ndarray, patch: tuple[int, ...], grid: tuple[int, ...]) -> np.ndarray:
    """``(*grid, prod(patch))``: the voxels of each grid window, one row per window."""
    crop = volume[tuple(slice(0, g * p) for g, p in zip(grid, patch))]
    split = crop.reshape([v for g, p in zip(grid, patch) for v in (g, p)])
    n = len(grid)
    return split.transpose([*range(0, 2 * n, 2), *range(1, 2 * n, 2)]).reshape(*grid, -1)


def false_positive_rates(prediction: np.ndarray, free: np.ndarray, patch: Sequence[int]) -> dict[str, float]:
    """False positives in class-free windows: per foreground class ``k`` the fraction of the voxels
    of the windows free of ``k`` (:func:`class_free_windows`) that are predicted ``k``
    (``fp_rate_k``, NaN when no window is free of ``k``), and their mean over the classes that
    have such windows (``fp_rate``).

    Examples
    --------
    >>> free = class_free_windows(np.array([[0, 0, 1, 0]]), (1, 2), 2)
    >>> false_positive_rates(np.array([[1, 0, 1, 1]]), free, (1, 2))
    {'fp_rate': 0.5, 'fp_rate_1': 0.5}
    """
    patch = tuple(int(p) for p in patch)
    grid = free.shape[1:]
    out: dict[str, float] = {}
    rates = []
    blocks = _windows(np.asarray(prediction), patch, grid) if all(grid) else None
    for k in range(1, free.shape[0]):
        n = int(free[k].sum())
        if blocks is None or n == 0:
            rate = float("nan")
        else:
            rate = float((blocks[free[k]] == k).sum()) / (n * int(np.prod(patch)))
            rates.append(rate)
        out[f"fp_rate_{k}"] = rate
    return {"fp_rate": float(np.mean(rates)) if rates else float("nan"), **out}


def fp_columns(n_classes: int) -> list[str]:
    """The false-positive columns of ``curves.csv``: ``fp_rate`` and ``fp_rate_k`` per foreground class."""
    return ["fp_rate", *(f"fp_rate_{k}" for k in range(1, n_classes))]


def curve_columns(n_classes: int) -> list[str]:
    """Columns of ``curves.csv``."""
    return (["strategy", "seed", "iteration", "n_labelled"] + [f"jaccard_{c}" for c in range(n_classes)]
            + ["mean_fg_jaccard", *COST_COLUMNS, *fp_columns(n_classes)])


def write_curves(path: Path, rows: list[dict[str, Any]], n_classes: int) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, curve_columns(n_classes), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Mean and standard deviation over seeds of ``mean_fg_jaccard`` per strategy and iteration.

    Examples
    --------
    >>> summarise([{"strategy": "random", "seed": 0, "iteration": 0, "n_labelled": 20,
    ...             "mean_fg_jaccard": 0.5}])["random"][0]["mean"]
    0.5
    """
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((str(row["strategy"]), int(row["iteration"])), []).append(row)
    out: dict[str, list[dict[str, float]]] = {}
    for (strategy, iteration), members in sorted(groups.items(), key=lambda kv: kv[0][1]):
        values = np.array([float(r["mean_fg_jaccard"]) for r in members], dtype=float)
        finite = values[np.isfinite(values)]
        fp = np.array([_float(r.get("fp_rate")) for r in members], dtype=float)
        fp = fp[np.isfinite(fp)]
        out.setdefault(strategy, []).append({
            "iteration": iteration, "n_labelled": int(members[0]["n_labelled"]),
            "mean": float(finite.mean()) if finite.size else float("nan"),
            "std": float(finite.std()) if finite.size else float("nan"), "n": int(len(members)),
            "cost_s": float(np.mean([float(r.get("cost_s", np.nan)) for r in members])),
            "fp_mean": float(fp.mean()) if fp.size else float("nan"),
            "fp_std": float(fp.std()) if fp.size else float("nan"),
        })
    return out


def _float(value: Any) -> float:
    """A row value as float (rows read back from ``curves.csv`` hold strings, missing ones ``""``)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def plot_curves(rows: Sequence[Mapping[str, Any]], path: str | Path) -> str | None:
    """Plot mean test Jaccard (over seeds, +- one std) per strategy or question arm: against
    labelled patches (left) and against the cumulative annotation cost in annotator hours of the
    cost model (middle); and the false-positive rate in held-out class-free windows against the
    cost (right, when the rows have ``fp_rate``).

    Returns ``None`` on success, or a one-line note when matplotlib is not installed.

    Examples
    --------
    >>> plot_curves(rows, "curves.png")  # doctest: +SKIP
    """
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'emseg[plot]'): curves.png was not drawn"
    path = Path(path)
    fig, axes = plt.subplots(1, 3, figsize=(16.0, 4.2))
    axes[1].sharey(axes[0])
    for strategy, points in summarise(rows).items():
        y = np.array([p["mean"] for p in points])
        s = np.array([p["std"] for p in points])
        fp = np.array([p["fp_mean"] for p in points])
        fs = np.array([p["fp_std"] for p in points])
        for ax, key, scale, yy, ss in ((axes[0], "n_labelled", 1.0, y, s), (axes[1], "cost_s", 3600.0, y, s),
                                       (axes[2], "cost_s", 3600.0, fp, fs)):
            x = np.array([p.get(key, np.nan) for p in points], dtype=float) / scale
            (line,) = ax.plot(x, yy, marker="o", ms=3, label=strategy)
            if any(p["n"] > 1 for p in points):
                ax.fill_between(x, yy - ss, yy + ss, color=line.get_color(), alpha=0.15, lw=0)
    axes[0].set_xlabel("labelled patches (boxes with any annotation)")
    axes[1].set_xlabel("annotation cost (annotator hours, cost model)")
    axes[2].set_xlabel("annotation cost (annotator hours, cost model)")
    axes[0].set_ylabel("test Jaccard (mean over foreground classes)")
    axes[2].set_ylabel("false-positive rate in class-free test windows")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return None


# ----------------------------------------------------------------------------- the experiment
