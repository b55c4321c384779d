"""Train on the drosophila VNC stack and score held-out sections.

Sections 0-14 train, 15-19 test. Runs, each with the same CPU time budget:
  mito      binary mitochondria (label == 1), dense labels
  5class    all five classes, dense labels
  dense     mitochondria from a small dense set only: sections 0, 7 and 14, or with
            ``--dense-windows N`` only N patch-sized windows of those sections that hold mitochondria
  lazy      the same small dense set plus lazy cubes: background-only regions carrying only
            the flag "no mitochondria" (labels -1, info not_present[1] = 1), drawn at random among the
            mitochondria-free windows of the other training sections (``--lazy-from random``) or among
            their most monotonic quarter (``--lazy-from monotonic``: the windows with the least membrane
            and synapse, i.e. large uniform cytoplasm or glia areas)
and reports per-class test Jaccard, training patches/s, inference voxels/s, and for dense/lazy the
false-positive mitochondria voxels inside held-out regions that contain no mitochondria (random ones,
and with ``--lazy-from monotonic`` also the most monotonic ones).

    python benchmarks/train_vnc.py --seconds 120 --base-width 16
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import data_dir, machine  # noqa: E402

from emseg.engine.config import config_from_dict  # noqa: E402
from emseg.semantic.evaluation import evaluate_volumes  # noqa: E402
from emseg.io import open_volume  # noqa: E402
from emseg.semantic.predict import PredictConfig, predict_file  # noqa: E402
from emseg.semantic.train import train  # noqa: E402
from emseg.runtime import Runtime


def write(path: Path, **arrays) -> Path:
    with h5py.File(path, "w") as fh:
        for name, data in arrays.items():
            fh.create_dataset(name, data=data, chunks=(1,) + data.shape[1:] if data.ndim == 3 else None)
    return path


def monotonic_windows(label: np.ndarray, size: int, count: int, rng, sections) -> list[tuple[int, int, int]]:
    """``count`` mitochondria-free windows drawn from the most monotonic quarter of a half-overlapping grid.

    Monotonic: the smallest share of membrane and synapse voxels (labels 2 and 3), i.e. windows of
    large uniform cytoplasm or glia, the regions lazy labels are meant for (nothing to delineate).
    """
    grid = []
    for z in sections:
        for y in range(0, label.shape[1] - size + 1, size // 2):
            for x in range(0, label.shape[2] - size + 1, size // 2):
                w = label[z, y:y + size, x:x + size]
                if not (w == 1).any():
                    grid.append((float(np.isin(w, (2, 3)).mean()), z, y, x))
    grid.sort()
    top = grid[:max(count, len(grid) // 4)]
    pick = rng.choice(len(top), size=min(count, len(top)), replace=False)
    return [top[i][1:] for i in sorted(pick)]


def random_windows(label: np.ndarray, size: int, count: int, rng, sections, keep) -> list[tuple[int, int, int]]:
    """(z, y, x) corners of up to ``count`` random size x size windows of ``sections`` whose labels
    satisfy ``keep`` (20,000 draws at most)."""
    found = []
    sections = list(sections)
    for _ in range(20000):
        z = int(rng.choice(sections))
        y, x = (int(rng.integers(s - size + 1)) for s in label.shape[1:])
        if keep(label[z, y:y + size, x:x + size]):
            found.append((z, y, x))
            if len(found) == count:
                break
    return found


def dense_windows(label: np.ndarray, size: int, count: int, rng, sections) -> list[tuple[int, int, int]]:
    """``count`` random size x size windows of ``sections`` holding at least 1 % mitochondria."""
    return random_windows(label, size, count, rng, sections, lambda w: (w == 1).mean() >= 0.01)


def background_windows(label: np.ndarray, size: int, count: int, rng, sections=None) -> list[tuple[int, int, int]]:
    """(z, y, x) corners of size x size windows without mitochondria (in ``sections`` if given)."""
    return random_windows(label, size, count, rng, range(label.shape[0]) if sections is None else sections,
                          lambda w: not (w == 1).any())


def run(name, cubes, n_classes, args, tmp: Path, test_raw: str, test_label: str) -> dict:
    weights = args.class_weights if n_classes == 2 else None
    cfg = config_from_dict({
        "n_classes": n_classes, "patch_shape": [1, args.patch, args.patch], "batch_size": args.batch_size,
        "steps": 10**6, "max_seconds": args.seconds, "log_every": 20, "checkpoint_every": 10**6,
        "valid_every": 10**6, "train": cubes,
        "model": {"depth": 4, "base_width": args.base_width, "norm": "batch"},
        "optim": {"lr": 1e-3},
        "class_weights": [float(w) for w in weights.split(",")] if weights else None,
    }, source=name)
    out = tmp / name
    result = train(cfg, out, runtime=Runtime(seed=args.seed, device=args.device))
    pred = tmp / f"{name}_pred.zarr"
    p = predict_file(PredictConfig(model=str(out / "last.pt"), input=test_raw, output=str(pred),
                                   output_type="labels", batch_size=8, device=args.device))
    with open_volume(str(pred)) as pv, open_volume(test_label) as gv:
        scores = evaluate_volumes(pv, gv, n_classes=n_classes)
    row = {"run": name, "steps": result.final_step, "train_s": round(result.seconds, 1),
           "patches_per_s": round(result.patches_per_s, 2), "infer_voxels_per_s": round(p.stats.voxels_per_s),
           "jaccard": [None if np.isnan(j) else round(float(j), 4) for j in scores.jaccard]}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120, help="training budget per run")
    ap.add_argument("--base-width", type=int, default=16)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--runs", default="mito,5class,dense,lazy")
    ap.add_argument("--lazy-cubes", type=int, default=24)
    ap.add_argument("--lazy-share", type=float, default=0.25, help="fraction of patches drawn from lazy cubes")
    ap.add_argument("--lazy-from", choices=("random", "monotonic"), default="random",
                    help="where the lazy cubes come from (see above)")
    ap.add_argument("--dense-windows", type=int, default=0,
                    help="dense set: N patch-sized windows of sections 0, 7, 14 (0: the whole sections)")
    ap.add_argument("--class-weights", default=None, help="e.g. 1,3 (binary runs only)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = data_dir()
    if root is None:
        print("drosophila_vnc data not found (set EMSEG_DATA); nothing to do")
        return 0
    print("machine:", machine())
    with h5py.File(root / "vnc_stack1.h5", "r") as fh:
        raw, label = fh["raw"][:], fh["label"][:].astype(np.int16)
    mito = (label == 1).astype(np.int16)
    runs = args.runs.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        write(tmp / "test.h5", raw=raw[15:], label=label[15:], mito=mito[15:])
        write(tmp / "train.h5", raw=raw[:15], label=label[:15], mito=mito[:15])
        test_raw = f"{tmp / 'test.h5'}:raw"
        if "mito" in runs:
            rows.append(run("mito", [{"raw": f"{tmp/'train.h5'}:raw", "label": f"{tmp/'train.h5'}:mito"}], 2,
                            args, tmp, test_raw, f"{tmp/'test.h5'}:mito"))
        if "5class" in runs:
            rows.append(run("5class", [{"raw": f"{tmp/'train.h5'}:raw", "label": f"{tmp/'train.h5'}:label"}], 5,
                            args, tmp, test_raw, f"{tmp/'test.h5'}:label"))
        if "dense" in runs or "lazy" in runs:
            rng = np.random.default_rng(args.seed)
            # Small dense set: sections 0, 7 and 14 only, read through cube regions.
            if args.dense_windows:
                dense = [{"raw": f"{tmp/'train.h5'}:raw", "label": f"{tmp/'train.h5'}:mito", "prio": 1.0,
                          "region": [[z, z + 1], [y, y + args.patch], [x, x + args.patch]]}
                         for z, y, x in dense_windows(label, args.patch, args.dense_windows,
                                                      np.random.default_rng(2000 + args.seed), (0, 7, 14))]
            else:
                dense = [{"raw": f"{tmp/'train.h5'}:raw", "label": f"{tmp/'train.h5'}:mito", "prio": 1.0,
                          "region": [[z, z + 1]]} for z in (0, 7, 14)]
            # Held-out background regions: test windows of 128x128 without mitochondria.
            bg = background_windows(mito[15:], 128, 40, np.random.default_rng(1000 + args.seed))
            held_out = {"": bg}
            if args.lazy_from == "monotonic":
                held_out["monotonic_"] = monotonic_windows(label[15:], 128, 40,  # test coordinates (z 0-4)
                                                           np.random.default_rng(3000 + args.seed), range(5))
            others = [z for z in range(15) if z not in (0, 7, 14)]
            pick = monotonic_windows if args.lazy_from == "monotonic" else background_windows
            lazy = []
            for i, (z, y, x) in enumerate(pick(label[:15] if args.lazy_from == "monotonic" else mito[:15],
                                               args.patch, args.lazy_cubes, rng, others)):
                path = tmp / f"lazy{i}.h5"
                with h5py.File(path, "w") as fh:
                    fh["raw"] = raw[z:z + 1, y:y + args.patch, x:x + args.patch]
                    fh["label"] = np.full((1, args.patch, args.patch), -1, np.int16)
                    fh["info"] = np.array([[0, 0], [0, 1]], np.uint8)
                lazy.append({"raw": f"{path}:raw", "label": f"{path}:label"})
            # The lazy cubes together get --lazy-share of the draws (each dense crop has prio 1).
            for cube in lazy:
                cube["prio"] = args.lazy_share / (1 - args.lazy_share) * len(dense) / max(1, len(lazy))
            for name, cubes in (("dense", dense), ("lazy", dense + lazy)):
                if name not in runs:
                    continue
                row = run(name, cubes, 2, args, tmp, test_raw, f"{tmp/'test.h5'}:mito")
                for prefix, windows in held_out.items():
                    with open_volume(str(tmp / f"{name}_pred.zarr")) as pv:
                        fp = sum(int((pv[z, y:y + 128, x:x + 128] == 1).sum()) for z, y, x in windows)
                    row[f"{prefix}bg_regions"] = len(windows)
                    row[f"{prefix}bg_false_positive_voxels"] = fp
                    row[f"{prefix}bg_false_positive_rate"] = round(fp / (len(windows) * 128 * 128), 5)
                row["dense_cubes"], row["lazy_cubes"] = len(dense), len(lazy) if name == "lazy" else 0
                print(json.dumps({"run": name, **{k: v for k, v in row.items() if "false_positive" in k}}),
                      flush=True)
                rows.append(row)
    print("\nrun      steps  patches/s  infer vox/s  test Jaccard per class          bg FP rate")
    for r in rows:
        print(f"{r['run']:<8} {r['steps']:>5}  {r['patches_per_s']:>9}  {r['infer_voxels_per_s']:>11}  "
              f"{str(r['jaccard']):<32} {r.get('bg_false_positive_rate', '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
