"""Contact sheet of query results: each chosen patch beside its pixel uncertainty map (PNG).

The map is the pixel score behind the strategy: entropy for ``entropy`` and ``hybrid`` (and for
the strategies without a pixel score: ``random``, ``kmeans``, ``coreset``), ``1 - max p`` for
``least_confidence``, the BALD mutual information over ``mc_samples`` dropout passes for ``bald``.
For 3D patches the middle section is shown. Needs matplotlib (the ``plot`` extra).
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emseg.active.scoring.criteria import BaldAccumulator, entropy, least_confidence
from emseg.models.checkpoint import load_model
from emseg.data.values import to_float
from emseg.runtime.device import fork_rng, resolve_device
from emseg.errors import InputError
from emseg.io import check_output_location, check_overwrite, open_volume, save_figure
from emseg.models.unet import set_mc_dropout

__all__ = ["MAP_OF_STRATEGY", "check_sheet_output", "pixel_maps", "write_query_sheet", "write_sheet"]

#: Pixel map drawn for each strategy.
MAP_OF_STRATEGY = {"least_confidence": "least_confidence", "bald": "bald"}


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def check_sheet_output(path: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse a sheet before any work: matplotlib missing, or a folder that does not exist."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("`sheet` needs matplotlib (pip install 'emseg[plot]')", source=str(path)) from None
    path = Path(path)
    check_output_location(path)
    check_overwrite(path, overwrite=overwrite, kind="file")
    return path


@torch.no_grad()
def pixel_maps(model: torch.nn.Module, patches: Sequence[np.ndarray], strategy: str, *,
               mc_samples: int = 10, device: str | torch.device = "cpu", seed: int = 0) -> list[np.ndarray]:
    """Pixel uncertainty map of each patch (float raw of the network's spatial shape, one forward each).

    Returns arrays of the patches' shapes (a leading 1 kept when the patch has one and the network
    is 2D). ``mean`` of an entropy map equals the ``entropy`` score with ``reduction="mean"``.
    """
    kind = MAP_OF_STRATEGY.get(strategy, "entropy")
    out = []
    with fork_rng(device):
        torch.manual_seed(seed)
        for patch in patches:
            arr = np.asarray(patch, dtype=np.float32)
            squeeze = arr.ndim == model.ndim + 1
            x = torch.from_numpy(arr[0] if squeeze else arr)[None, None].to(device)
            if kind == "bald":
                acc = BaldAccumulator()
                set_mc_dropout(model, True)
                try:
                    for _ in range(mc_samples):
                        acc.update(_probabilities(model(x)))
                finally:
                    model.eval()
                m = acc.result(reduction="none")
            elif kind == "least_confidence":
                m = least_confidence(_probabilities(model(x)), reduction="none")
            else:
                m = entropy(_probabilities(model(x)), reduction="none")
            m = m[0].cpu().numpy().astype(np.float32)
            out.append(m[None] if squeeze else m)
    return out


def _section(a: np.ndarray) -> np.ndarray:
    return a[a.shape[0] // 2] if a.ndim == 3 else a


def write_sheet(path: str | Path, raws: Sequence[np.ndarray], maps: Sequence[np.ndarray],
                titles: Sequence[str], *, map_name: str = "entropy", columns: int = 4) -> Path:
    """Draw ``raw | map`` tiles in a grid (``columns`` pairs per row) to a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    n = len(raws)
    if n == 0:
        raise InputError("no query to draw")
    cols = max(1, min(columns, n))
    rows = -(-n // cols)
    # one colour scale for every map, spanning the values shown (so that differences stay visible)
    vmin = min(float(np.nanmin(m)) for m in maps)
    vmax = max(float(np.nanmax(m)) for m in maps)
    if not vmax > vmin:
        vmin, vmax = min(0.0, vmin), max(vmax, vmin + 1e-6)
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2.2 * 2 * cols, 2.4 * rows), squeeze=False,
                             constrained_layout=True)
    image = None
    for ax in axes.ravel():
        ax.axis("off")
    for i, (raw, m, title) in enumerate(zip(raws, maps, titles)):
        r, c = divmod(i, cols)
        axes[r, 2 * c].imshow(_section(raw), cmap="gray")
        axes[r, 2 * c].set_title(title, fontsize=8)
        image = axes[r, 2 * c + 1].imshow(_section(m), cmap="magma", vmin=vmin, vmax=vmax)
        axes[r, 2 * c + 1].set_title(map_name, fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label=map_name)
    return save_figure(fig, path, dpi=80)


def write_query_sheet(path: str | Path, result: Any, *, mc_samples: int = 10, device: str = "auto",
                      seed: int = 0) -> Path:
    """Contact sheet of a :class:`~emseg.active.query.QueryResult`: its patches and their maps.

    Examples
    --------
    >>> write_query_sheet("queries.png", result)  # doctest: +SKIP
    """
    path = check_sheet_output(path)
    dev = resolve_device(device)
    model, _ = load_model(result.model, dev)
    with ExitStack() as stack:
        volumes = [stack.enter_context(open_volume(v)) for v in result.volumes]
        raws = [to_float(volumes[q.box.volume][q.box.slices()], volumes[q.box.volume].dtype) for q in result.queries]
    maps = pixel_maps(model, raws, result.strategy, mc_samples=mc_samples, device=dev, seed=seed)
    titles = [f"#{q.rank} {','.join(map(str, q.box.offset))}" + ("" if q.score is None else f" s={q.score:.3g}")
              for q in result.queries]
    name = {"least_confidence": "1 - max p", "bald": "BALD"}.get(MAP_OF_STRATEGY.get(result.strategy, ""), "entropy")
    return write_sheet(path, raws, maps, titles, map_name=name)
