"""Objects from VNC: `emseg segment` against connected components of the semantic prediction.

Protocol, fixed before any run: VNC stack 1 (20 sections of 1024^2, classes of its README),
sections 0-11 train, 12-14 validation, 15-19 test; seeds 0-4. Objects are 2D, per section (the
stack is anisotropic ssTEM): **mitochondria** are the connected components of class 1,
**cells** the connected components of the voxels that are not membrane, synapse or glia
(classes 2, 3, 4: the regions those enclose). Both are compared with the ground truth's
background ignored (the adapted Rand error and variation of information of the CREMI / ISBI
form, F1 of one-to-one matches at IoU 0.5 and 0.75, AP over IoU 0.5:0.95; ``emseg evaluate
--instances --per-section``, means over the sections).

Networks per seed (the default U-Net: depth 4, width 16, batches of 8 x 128^2, ``--steps`` steps,
validation every ``--valid-every`` on 12-14 and the best checkpoint kept):

* ``semantic``: the five classes;
* ``mito-targets`` and ``cells-targets``: the background / interior / boundary classes of
  ``emseg targets`` (``--from-classes 1`` and ``--enclosed-by 2,3,4``).

Arms (each network predicts the validation and test sections once; objects by ``emseg segment``
from those probabilities):

==================  ===========================================================================
mito cc             components of argmax = 1 (the baseline)
mito ws-semantic    watershed of 1 - p(mito), flooding where it is under ``mask_threshold``
mito ws-targets     watershed of 1 - p(interior) of mito-targets, inside p(background) < ``mask_threshold``
cells cc            components of argmax not in 2, 3, 4, boundary voxels given to the nearest (the baseline)
cells ws-semantic   watershed of p(membrane) + p(synapse) + p(glia)
cells ws-targets    watershed of 1 - p(interior) of cells-targets
==================  ===========================================================================

The cells baseline gives every voxel it leaves at 0 (predicted membrane, synapse, glia) to the
nearest component, as the watershed arms flood the whole section: a predicted 0 inside a true
cell would otherwise count as one object spanning every cell, and the comparison would measure
how thick the predicted boundaries are rather than whether they separate the cells.

Every parameter of an arm (``min_size``; for the watershed also ``seed_threshold``,
``seed_erosion`` and, for mitochondria, ``mask_threshold``) is chosen on the validation sections
from the grids below, fixed in advance: cells by the lowest adapted Rand error, mitochondria by
the highest F1 at IoU 0.5. The chosen configuration of each arm is scored once on the test
sections. Results (resumable per run) in ``--out``; the figure beside it; ``--markdown`` prints
the tables with the paired differences against ``cc``.

    python benchmarks/results/instances.py --out benchmarks/results/instances/seed0.json --seeds 0
    python benchmarks/results/instances.py --markdown --out a.json,b.json,...
    python benchmarks/results/instances.py --quick --out /tmp/inst.json   # tiny, about a minute
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _campaign import Campaign, ci_cell, finished, mean_std, merged_runs, no_data, paired_interval, pyplot  # noqa: E402
from _common import data_dir  # noqa: E402
from emseg.runtime import Runtime  # noqa: E402

TRAIN, VALID, TEST = (0, 12), (12, 15), (15, 20)
BOUNDARY = (2, 3, 4)  # membrane, synapse, glia: what encloses a cell
NETWORKS = {"semantic": 5, "mito-targets": 3, "cells-targets": 3}
ARMS = {"mito": ("cc", "ws-semantic", "ws-targets"), "cells": ("cc", "ws-semantic", "ws-targets")}
#: The validation grids (fixed before any run).
MIN_SIZES = (0, 32, 128)
SEED_THRESHOLDS = (0.1, 0.3, 0.5)
SEED_EROSIONS = (0, 2)
MASK_THRESHOLDS = (0.5, 0.8)
QUICK = dict(seeds="0", patch=32, depth=1, base_width=4, batch_size=2, steps=2, valid_every=1, crop=64)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="Campaign JSON (or, with --markdown, a comma-separated list).")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--base-width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--valid-every", type=int, default=150)
    ap.add_argument("--crop", type=int, default=None, help="Centre crop of every section (a quick run).")
    ap.add_argument("--quick", action="store_true", help="A tiny run (synthetic-size settings) to check the script.")
    ap.add_argument("--markdown", action="store_true", help="Print the tables of the JSONs in --out and draw.")
    ap.add_argument("--figure", default=None, help="With --markdown: where the figure goes.")
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def settings(args) -> dict:
    keys = ("patch", "depth", "base_width", "batch_size", "steps", "valid_every", "crop")
    grids = {"min_size": MIN_SIZES, "seed_threshold": SEED_THRESHOLDS, "seed_erosion": SEED_EROSIONS,
             "mask_threshold": MASK_THRESHOLDS}
    return {k: getattr(args, k) for k in keys} | {"grids": {k: list(v) for k, v in grids.items()}}


# ----------------------------------------------------------------------------- data

def load(sections: tuple[int, int], crop: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Raw and class labels of stack-1 sections, optionally centre-cropped."""
    from emseg.io import open_volume

    path = data_dir() / "vnc_stack1.h5"
    with open_volume(f"{path}:raw") as r, open_volume(f"{path}:label") as lab:
        h, w = r.shape[1:]
        c = min(crop or h, h, w)
        box = (slice(*sections), slice((h - c) // 2, (h - c) // 2 + c), slice((w - c) // 2, (w - c) // 2 + c))
        return np.asarray(r[box]), np.asarray(lab[box]).astype(np.int64)


def objects(labels: np.ndarray, task: str) -> np.ndarray:
    """Ground-truth objects per section (4-connected): mitochondria, or the cells between boundaries."""
    mask = labels == 1 if task == "mito" else ~np.isin(labels, BOUNDARY)
    out = np.zeros(labels.shape, np.int64)
    for z in range(len(labels)):
        out[z] = ndimage.label(mask[z])[0]
    return out


def network_labels(labels: np.ndarray, network: str) -> np.ndarray:
    """What a network learns: the classes, or the interior / boundary targets of a task."""
    from emseg.instances.targets import boundary_targets

    if network == "semantic":
        return labels
    if network == "mito-targets":
        return boundary_targets(labels, source="classes", classes=(1,)).astype(np.int64)
    return boundary_targets(labels, source="classes", enclosed_by=BOUNDARY).astype(np.int64)


def cube(raw, label, n_classes: int, name: str):
    from emseg.data import Cube

    info = np.zeros((2, n_classes), np.uint8)
    info[0] = 1  # every class annotated
    return Cube(raw, label, info, 1.0, name)


# ----------------------------------------------------------------------------- networks

def train_network(args, root: Path, network: str, seed: int, data: dict) -> dict:
    """Train one network (best validation checkpoint kept in ``root``) and predict the
    validation and test sections with it (probabilities saved beside it)."""
    from emseg.engine.config import config_from_dict
    from emseg.engine.training import run_training
    from emseg.models.checkpoint import load_model
    from emseg.semantic.train import SegmentationTask

    k = NETWORKS[network]
    folder = root / f"{network}_seed{seed}"
    config = config_from_dict({
        "n_classes": k, "patch_shape": [1, args.patch, args.patch], "batch_size": args.batch_size,
        "steps": args.steps, "valid_every": args.valid_every, "checkpoint_every": args.valid_every,
        "train": [{"raw": "in-memory.h5:raw"}], "model": {"depth": args.depth, "base_width": args.base_width}})
    t0 = time.perf_counter()
    train = cube(data["train"][0], network_labels(data["train"][1], network), k, "train")
    valid = cube(data["valid"][0], network_labels(data["valid"][1], network), k, "valid")
    # a run killed before its row was stored continues from its last.pt (or returns at once, finished)
    result = run_training(SegmentationTask(config, cubes=[train], valid_cubes=[valid]), config, folder,
                          runtime=Runtime(device="auto", seed=seed), resume=(folder / "last.pt").exists())
    finished(result, args.steps, str(folder))
    best = folder / "best.pt"
    model, _ = load_model(best if best.exists() else folder / "last.pt", "cpu")
    for split in ("valid", "test"):
        np.save(folder / f"probs_{split}.npy", probabilities(model, data[split][0], config.patch_shape))
    return {"network": network, "valid_best": result.best_metric, "steps": result.final_step,
            "folder": str(folder), "seconds": time.perf_counter() - t0}


def probabilities(model, raw: np.ndarray, patch_shape) -> np.ndarray:
    """Class probabilities (C, z, y, x) float32 of ``raw`` by sliding windows (as `emseg predict`)."""
    from emseg.engine.inference import WindowOptions, make_predictor, predict_array

    predictor = make_predictor(model, patch_shape, WindowOptions(), "cpu")
    out = None
    for block, probs in predict_array(predictor, raw, patch_shape):
        if out is None:
            out = np.zeros((probs.shape[0],) + raw.shape, np.float32)
        out[(slice(None),) + tuple(block.inner)] = probs
    return out


# ----------------------------------------------------------------------------- objects and scores

def arm_network(task: str, arm: str) -> str:
    return f"{task}-targets" if arm == "ws-targets" else "semantic"


def candidates(task: str, arm: str) -> list[dict]:
    """The configurations an arm chooses among on validation (``emseg segment`` parameters)."""
    if arm == "cc":
        classes = [1] if task == "mito" else [0, 1]  # argmax outside the boundary classes: cytoplasm or mito
        return [dict(mode="components", classes=classes, min_size=m, **({"fill": True} if task == "cells" else {}))
                for m in MIN_SIZES]
    if task == "cells":
        boundary = list(BOUNDARY) if arm == "ws-semantic" else [0, 2]  # targets: 1 - p(interior)
        masks = [None]
    else:
        boundary = [0, 2, 3, 4] if arm == "ws-semantic" else [0, 2]  # 1 - p(mito), 1 - p(interior)
        masks = list(MASK_THRESHOLDS)
    # the targets network floods inside p(background) < mask (its objects keep their boundary voxels)
    mask_classes = [0] if task == "mito" and arm == "ws-targets" else None
    return [dict(mode="watershed", boundary_classes=boundary, seed_threshold=t, seed_erosion=e, min_size=m,
                 mask_threshold=mask, mask_classes=mask_classes)
            for t, e, m, mask in itertools.product(SEED_THRESHOLDS, SEED_EROSIONS, MIN_SIZES, masks)]


def segment(probs: np.ndarray, params: dict) -> np.ndarray:
    """``emseg segment``'s objects of ``params``; with ``fill`` every voxel left at 0 then goes to
    the nearest object of its section (the cells baseline, see the docstring)."""
    from skimage.segmentation import expand_labels

    from emseg.instances.config import SegmentConfig
    from emseg.instances.segment import segment_probabilities

    params = dict(params)
    fill = params.pop("fill", False)
    out = np.zeros(probs.shape[1:], np.uint64)
    segment_probabilities(probs, SegmentConfig(per_section=True, **params), out)
    if fill:
        for z in range(len(out)):
            out[z] = expand_labels(out[z].astype(np.int64), distance=sum(out.shape[1:])).astype(np.uint64)
    return out


def scores(pred: np.ndarray, gt: np.ndarray) -> dict:
    from emseg.instances.metrics import evaluate_instances

    s = evaluate_instances(pred.astype(np.int64), gt, per_section=True).scores
    return {"adapted_rand_error": s.adapted_rand_error, "voi_split": s.voi_split, "voi_merge": s.voi_merge,
            "voi": s.voi_split + s.voi_merge, "f1_50": s.f1_50, "f1_75": s.f1_75, "ap": s.ap,
            "n_pred": s.n_pred, "n_gt": s.n_gt}


def criterion(task: str, s: dict) -> float:
    """Higher is better: F1 at IoU 0.5 for mitochondria, minus the adapted Rand error for cells."""
    return s["f1_50"] if task == "mito" else -s["adapted_rand_error"]


def choose_and_test(task: str, arm: str, folder: Path, gt: dict) -> dict:
    """The arm's configuration with the best validation score, then its one test score."""
    t0 = time.perf_counter()
    probs = np.load(folder / "probs_valid.npy")
    tried = []
    for params in candidates(task, arm):
        tried.append((criterion(task, scores(segment(probs, params), gt["valid"])), params))
    best_value, best = max(tried, key=lambda t: -np.inf if np.isnan(t[0]) else t[0])
    test = scores(segment(np.load(folder / "probs_test.npy"), best), gt["test"])
    return {"params": best, "valid_value": best_value, "tried": len(tried), "test": test,
            "seconds": time.perf_counter() - t0}


def run(args, campaign: Campaign, root: Path) -> None:
    data = {name: load(sections, args.crop) for name, sections in
            (("train", TRAIN), ("valid", VALID), ("test", TEST))}
    gt = {task: {split: objects(data[split][1], task) for split in ("valid", "test")} for task in ARMS}
    for seed in (int(s) for s in args.seeds.split(",")):
        nets = {}
        for network in NETWORKS:
            nets[network] = campaign.run({"kind": "train", "network": network, "seed": seed},
                                         lambda: train_network(args, root, network, seed, data))
        for task, arms in ARMS.items():
            for arm in arms:
                folder = Path(nets[arm_network(task, arm)]["folder"])
                row = campaign.run({"kind": "objects", "task": task, "arm": arm, "seed": seed},
                                   lambda: choose_and_test(task, arm, folder, gt[task]))
                print(f"  seed {seed} {task} {arm}: test {key_metric(task)} {row['test'][key_metric(task)]}",
                      flush=True)


# ----------------------------------------------------------------------------- report

def key_metric(task: str) -> str:
    return "f1_50" if task == "mito" else "adapted_rand_error"


METRICS = {"mito": ("f1_50", "f1_75", "ap"), "cells": ("adapted_rand_error", "voi", "voi_split", "voi_merge")}


def table(runs: list[dict]) -> str:
    rows = [r for r in runs if r.get("kind") == "objects"]
    lines = []
    for task, arms in ARMS.items():
        seeds = sorted({r["seed"] for r in rows if r["task"] == task})
        if not seeds:
            continue
        lines += [f"\n{task} (test sections {TEST[0]}-{TEST[1] - 1}, mean +- sd over seeds "
                  f"{','.join(map(str, seeds))}; paired difference against cc with 95% CI)\n",
                  "| arm | " + " | ".join(METRICS[task]) + " | - cc: " + key_metric(task)
                  + (" (lower is better)" if task == "cells" else " (higher is better)") + " | chosen (validation) |",
                  "|---" * (len(METRICS[task]) + 3) + "|"]
        by = {(r["arm"], r["seed"]): r for r in rows if r["task"] == task}
        for arm in arms:
            mine = [by[(arm, s)] for s in seeds if (arm, s) in by]
            if not mine:
                continue
            cells = [mean_std([r["test"][m] for r in mine]) for m in METRICS[task]]
            pairs = [by[(arm, s)]["test"][key_metric(task)] - by[("cc", s)]["test"][key_metric(task)]
                     for s in seeds if (arm, s) in by and ("cc", s) in by]
            diff = "-" if arm == "cc" else ci_cell(paired_interval(pairs))
            chosen = "; ".join(_short(r["params"]) for r in mine)
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {diff} | {chosen} |")
    return "\n".join(lines)


def _short(params: dict) -> str:
    keys = ("seed_threshold", "seed_erosion", "mask_threshold", "min_size")
    return ",".join(f"{k.split('_')[0][0]}{k.split('_')[1][0] if '_' in k else ''}={params[k]}" for k in keys
                    if params.get(k) is not None)


def plot(runs: list[dict], path: Path) -> None:
    """Test scores per arm: a dot per seed, the mean with its 95% t-interval."""
    from scipy import stats

    plt = pyplot()
    rows = [r for r in runs if r.get("kind") == "objects"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, task in zip(axes, ARMS):
        metric = key_metric(task)
        for i, arm in enumerate(ARMS[task]):
            values = np.array([r["test"][metric] for r in rows if r["task"] == task and r["arm"] == arm])
            if not len(values):
                continue
            ax.scatter(np.full(len(values), i), values, s=14, alpha=0.6)
            half = (stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
                    if len(values) > 1 else 0.0)
            ax.errorbar(i + 0.15, values.mean(), yerr=half, fmt="o", color="black", capsize=3)
        ax.set_xticks(range(len(ARMS[task])), ARMS[task])
        ax.set(title=f"{task}", ylabel=f"test {metric}" + (" (lower is better)" if task == "cells" else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown:
        runs, _ = merged_runs(args.out, lambda r: (r["kind"], r.get("network"), r.get("task"), r.get("arm"), r["seed"]))
        print(table(runs))
        plot(runs, Path(args.figure) if args.figure else Path(args.out.split(",")[0]).with_suffix(".png"))
        return 0
    if data_dir() is None:
        return no_data()
    out = Path(args.out)
    campaign = Campaign(out, settings(args))
    root = out.with_suffix("")
    root.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    run(args, campaign, root)
    campaign.doc["seconds"] = time.perf_counter() - t0
    campaign.save()
    print(table(campaign.runs))
    plot(campaign.runs, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
