"""Figure of a noise report: the clean -> noisy transition matrix and one example section.

``emseg noise ... --report`` writes it as ``<output stem>[_<dataset>]_report.png`` beside the output
file or store when matplotlib is installed (the ``plot`` extra). The example is the middle section
of a 3D volume (the whole plane of a 2D one), cut to its central 512 x 512 voxels, clean beside noisy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from emseg.io import open_volume, parse_spec, save_figure

__all__ = ["EXAMPLE_SIDE", "example_section", "noise_figure", "report_figure_path", "write_noise_figure"]

#: Largest side of the example section drawn (the centre of the section is kept).
EXAMPLE_SIDE = 512


def report_figure_path(output_spec: str) -> Path:
    """``noisy.h5:flip45`` -> ``noisy_flip45_report.png`` beside ``noisy.h5`` (zarr stores likewise)."""
    spec = parse_spec(output_spec)
    stem = spec.path.name
    for suffix in (".ome.zarr", ".zarr", ".hdf5", ".hdf", ".h5"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    key = "_".join(p for p in str(spec.key or "").replace(":", "/").split("/") if p)
    return spec.path.with_name(f"{stem}_{key}_report.png" if key else f"{stem}_report.png")


def example_section(volume: Any) -> tuple[np.ndarray, tuple[slice, ...]]:
    """The central ``EXAMPLE_SIDE``-square window of the middle section, and the slices that cut it."""
    shape = tuple(volume.shape)
    lead = (slice(shape[0] // 2, shape[0] // 2 + 1),) if len(shape) == 3 else ()
    plane = []
    for s in shape[-2:]:
        start = max(0, (s - EXAMPLE_SIDE) // 2)
        plane.append(slice(start, min(s, start + EXAMPLE_SIDE)))
    index = lead + tuple(plane)
    section = np.asarray(volume[index])
    return (section[0] if lead else section), index


def write_noise_figure(path: str | Path, report: dict, clean: np.ndarray, noisy: np.ndarray, *,
                       title: str = "") -> Path:
    """Draw the transition matrix and the clean and noisy sections to a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    path = Path(path)
    matrix = np.asarray(report["matrix"], dtype=float)
    k = matrix.shape[0]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), constrained_layout=True)
    im = axes[0].imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0)
    axes[0].set(title=f"P(noisy | clean), rank {report.get('rank')}", xlabel="noisy class", ylabel="clean class",
                xticks=range(k), yticks=range(k))
    if k <= 10:
        for i in range(k):
            for j in range(k):
                if np.isfinite(matrix[i, j]):
                    axes[0].text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                                 color="black" if matrix[i, j] > 0.5 else "white")
    fig.colorbar(im, ax=axes[0], shrink=0.8)
    # value v drawn with colour v + 1: -1 (ignore) white, 0 background light grey, classes tab10
    top = int(max(k - 1, clean.max(initial=0), noisy.max(initial=0)))
    colours = ["white", "#dddddd"] + [plt.get_cmap("tab10")(i % 10) for i in range(top)]
    cmap = ListedColormap(colours)
    for ax, data, name in ((axes[1], clean, "clean"), (axes[2], noisy, "noisy")):
        ax.imshow(np.asarray(data, dtype=np.int64) + 1, cmap=cmap, vmin=0, vmax=len(colours) - 1,
                  interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    agreement = report.get("agreement")
    fig.suptitle(title + (f"  agreement {agreement:.3f}" if isinstance(agreement, (int, float)) else ""))
    return save_figure(fig, path, dpi=80)


def noise_figure(input_spec: str, output_spec: str, report: dict, *, title: str = "",
                 path: str | Path | None = None) -> Path | None:
    """The report figure of a finished ``emseg noise`` run, or None when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    with open_volume(input_spec) as clean_vol, open_volume(output_spec) as noisy_vol:
        clean, index = example_section(clean_vol)
        noisy = np.asarray(noisy_vol[index])
        noisy = noisy[0] if clean_vol.ndim == 3 else noisy
    return write_noise_figure(path or report_figure_path(output_spec), report, clean, noisy, title=title)
