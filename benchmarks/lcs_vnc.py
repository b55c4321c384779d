"""LCS vs the multi-channel baseline on the Drosophila VNC stack, and coarse-to-fine labels.

Data: ``vnc_stack1.h5`` (20 x 1024 x 1024, classes 0 background, 1 mitochondria, 2 membrane,
3 synapse, 4 glia). Sections 0-14 train, 15-19 test (the full sections by default; ``--test-crop N``
keeps a central N x N crop, but the central 512 x 512 crop holds no synapse). Everything derived
is written under ``--workdir`` (default a fresh folder in /tmp), nothing into the repository.

1. LCS (classes 1-4; one model per ``--conditionings`` entry: ``prototype``, ``atlas``) and the
   baseline (5 softmax outputs, lazy-label NLL + soft Dice: the LCS loss's family and weights, `[lcs]
   baseline_dice_weight = 1`) are trained with the same backbone, patch, batch,
   steps and learning rate (equal budget), through ``train_lcs`` (the core of ``emseg lcs train``);
   all are run through ``infer_file`` (``emseg lcs infer``) on the test sections. Reported:
   per-class Dice of the merged label map (LCS: under both merges, ``calibrated`` and ``max``,
   from the same per-label maps; ``<model>_merged`` is the shipped default, calibrated), of each
   label's own binary map (p > 0.5), and the conditioning gap (mean over class pairs of mean
   |p_a - p_b|) against the same gap of the true masks.
2. Coarse-to-fine (``--coarse-conditioning``): a second LCS model is trained with membrane (2) and glia (4) merged into one
   class 2 (training labels and atlas labels both coarse). At inference it is conditioned on the
   fine atlas labels (``--atlas-labels``: the original labels of the same atlas patch) to segment
   membrane and glia separately. "Naive" Dice uses the coarse prediction (conditioned on the
   coarse class 2) as the prediction of each fine class; "fine" Dice the prediction conditioned on
   the fine atlas label. Binary maps at p > 0.5 throughout. ``--split-prob`` sets the coarse
   model's split augmentation (``[lcs] split_prob``), ``--lcs-split-prob`` that of the 4-class models.

The atlas is one 2D patch of the training sections chosen by ``emseg.lcs.choose_offset`` on the
fine labels (most classes present, then the largest count of the rarest), shared by all models.

Usage::

    python benchmarks/lcs_vnc.py                 # 1200 steps per model: about 10 minutes on 2 shared cores
    python benchmarks/lcs_vnc.py --steps 2000    # a longer run
    python benchmarks/lcs_vnc.py --steps 100 --test-crop 256 --skip-coarse   # a quick check
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from _common import dice

from emseg.engine.config import config_from_dict
from emseg.io import open_volume
from emseg.lcs import InferConfig, LCSConfig, choose_offset, infer_file, lcs_config_from_dict, train_lcs
from emseg.lcs.calibrate import Calibration
from emseg.lcs.merge import calibrated_merge, merge_labels
from emseg.runtime import Runtime

CLASSES = {1: "mitochondria", 2: "membrane", 3: "synapse", 4: "glia"}


def data_dir() -> Path:
    env = os.environ.get("EMSEG_DATA")
    if env:
        return Path(env) / "drosophila_vnc" if (Path(env) / "drosophila_vnc").exists() else Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared/data/drosophila_vnc"


def conditioning_gap(probs: dict) -> float:
    """Mean absolute difference between the probability maps of every pair of labels (0: the
    network ignores its condition)."""
    keys = sorted(probs)
    pairs = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:]]
    return float(np.mean([np.mean(np.abs(probs[a] - probs[b])) for a, b in pairs]))


def prepare(src: Path, work: Path, test_crop: int) -> tuple[Path, Path]:
    with h5py.File(src, "r") as fh:
        raw, label = fh["raw"][...], fh["label"][...]
    coarse = label.copy()
    coarse[coarse == 4] = 2
    train = work / "train.h5"
    with h5py.File(train, "w") as fh:
        fh["raw"], fh["label"], fh["label_coarse"] = raw[:15], label[:15], coarse[:15]
    side = label.shape[-1]
    a = (side - test_crop) // 2
    test = work / "test.h5"
    with h5py.File(test, "w") as fh:
        fh["raw"] = raw[15:, a:a + test_crop, a:a + test_crop]
        fh["label"] = label[15:, a:a + test_crop, a:a + test_crop]
    return train, test


def train_model(name: str, work: Path, train: Path, args, offset, *, classes, label_ds="label", baseline=False,
                conditioning="prototype", split_prob=0.0):
    data = {
        "n_classes": 5, "patch_shape": [1, args.patch, args.patch], "batch_size": args.batch, "steps": args.steps,
        "log_every": 50, "checkpoint_every": args.steps, "valid_every": 10**9,
        "precision": getattr(args, "precision", "auto"),
        "train": [{"raw": f"{train}:raw", "label": f"{train}:{label_ds}"}],
        "model": {"depth": args.depth, "base_width": args.width, "norm": "batch"},
        "optim": {"lr": args.lr},
        "augment": {"flip": True, "rotate90": True, "brightness": 0.1, "contrast": 0.1},
    }
    config = config_from_dict(data)
    lcs = lcs_config_from_dict({"classes": classes, "atlas_raw": f"{train}:raw",
                                "atlas_label": f"{train}:{label_ds}", "atlas_offset": list(offset),
                                "merge_prob": args.merge_prob, "bce_weight": args.bce_weight,
                                "negative_prob": args.negative_prob, "conditioning": conditioning,
                                "split_prob": split_prob},
                               n_classes=5, baseline=baseline)
    t0 = time.perf_counter()
    result = train_lcs(config, lcs, work / name, runtime=Runtime(device="cpu", seed=args.seed))
    seconds = time.perf_counter() - t0
    losses = result.losses
    print(f"  {name:9s} {args.steps} steps in {seconds:6.1f} s, loss {np.mean(losses[:20]):.3f} -> "
          f"{np.mean(losses[-20:]):.3f}", flush=True)
    return work / name / "last.pt", seconds


def infer(model: Path, test: Path, out: Path, labels, atlas_labels=None, device: str = "cpu"):
    """(probabilities per label, merged label maps by merge, seconds, calibration or None).

    A conditioned model's maps are merged both ways (``calibrated`` and ``max``), a baseline's by
    its softmax (``max``)."""
    t0 = time.perf_counter()
    result = infer_file(InferConfig(str(model), f"{test}:raw", str(out), labels=tuple(labels),
                                    atlas_labels=atlas_labels, device=device, batch_size=4))
    probs = {}
    for l in labels:
        with open_volume(result.arrays[f"prob_{l}"]) as vol:
            probs[l] = vol[...]
    with open_volume(result.arrays["labels"]) as vol:
        merged = {result.merge: vol[...]}
    seconds = time.perf_counter() - t0
    if not result.baseline:  # the other merge from the same maps
        stack = np.stack([probs[l] for l in labels])
        merged["max"] = merge_labels(stack, labels, "sigmoid")
        if result.calibration is not None:
            # the stored calibration reproduces the written map (a check of the record)
            again = calibrated_merge(stack, Calibration.from_dict(result.calibration.to_dict()))
            assert np.array_equal(again, merged["calibrated"]), "recorded calibration does not reproduce labels"
    return probs, merged, seconds, result.calibration


def run_seed(args, work: Path, train: Path, test: Path, offset, gt: np.ndarray) -> dict:
    """Train and score every model for ``args.seed``; the figures as a dict (also printed)."""
    report: dict = {}
    print("training (equal budget):")
    labels = list(CLASSES)
    kinds = [c.strip() for c in args.conditionings.split(",") if c.strip()]
    models = {}
    for kind in kinds:
        models[f"lcs_{kind}"] = train_model(f"lcs_{kind}", work, train, args, offset, classes=labels,
                                            conditioning=kind, split_prob=args.lcs_split_prob)
    models["baseline"] = train_model("baseline", work, train, args, offset, classes=labels, baseline=True)
    preds = {name: infer(ckpt, test, work / f"pred_{name}.zarr", labels) for name, (ckpt, _) in models.items()}
    print("inference: " + ", ".join(f"{name} {pred[2]:.1f} s" for name, pred in preds.items()))
    rows = {}
    names = list(models)
    # columns: <model>_merged (the shipped merge), LCS also _merged_max and _merged_calibrated, _binary
    cols = [f"{n}_merged" for n in names] + [f"{n}_merged_{m}" for n in names if n != "baseline"
                                             for m in ("max", "calibrated")] + [f"{n}_binary" for n in names]
    print(f"{'class':14s} " + " ".join(f"{c:>26s}" for c in cols))
    for c, name in CLASSES.items():
        t = gt == c
        row = {}
        for n in names:
            probs, merged, _, _ = preds[n]
            row[f"{n}_merged"] = dice(merged[LCSConfig.merge if n != "baseline" else "max"] == c, t)
            if n != "baseline":
                for m in ("max", "calibrated"):
                    row[f"{n}_merged_{m}"] = dice(merged[m] == c, t)
            row[f"{n}_binary"] = dice(probs[c] > 0.5, t)
        rows[name] = row
        print(f"{c} {name:12s} " + " ".join(f"{row[k]:26.3f}" for k in cols))
    mean = {k: float(np.nanmean([r[k] for r in rows.values()])) for k in next(iter(rows.values()))}
    print(f"{'mean':14s} " + " ".join(f"{mean[k]:26.3f}" for k in cols))
    calibrations = {n: p[3].to_dict() for n, p in preds.items() if p[3] is not None}
    for n, cal in calibrations.items():
        print(f"{n} calibration (label: scale, offset): "
              + ", ".join(f"{l}: {a:.2f}, {b:+.2f}" for l, a, b in zip(cal["labels"], cal["scale"], cal["offset"]))
              + f"; atlas NLL {cal['nll_before']:.4f} -> {cal['nll_after']:.4f}")
    true_gap = conditioning_gap({c: (gt == c).astype(np.float32) for c in CLASSES})
    gaps = {n: conditioning_gap(preds[n][0]) for n in names}
    print(f"conditioning gap (mean |p_a - p_b| over class pairs and test voxels): true masks {true_gap:.4f}; "
          + ", ".join(f"{n} {g:.4f} ({g / true_gap:.2f}x)" for n, g in gaps.items()))
    report.update(per_class=rows, mean=mean, train_seconds={n: m[1] for n, m in models.items()},
                  infer_seconds={n: p[2] for n, p in preds.items()}, conditioning_gap=gaps,
                  true_conditioning_gap=true_gap, calibration=calibrations)

    if not args.skip_coarse:
        print(f"coarse-to-fine ({args.coarse_conditioning}): trained with membrane (2) + glia (4) merged into class 2")
        coarse_ckpt, t_coarse = train_model("coarse", work, train, args, offset, classes=[1, 2, 3],
                                            label_ds="label_coarse", conditioning=args.coarse_conditioning,
                                            split_prob=args.split_prob)
        print(f"  coarse model split_prob {args.split_prob}")
        p_coarse = infer(coarse_ckpt, test, work / "pred_coarse.zarr", [1, 2, 3])[0]
        p_fine = infer(coarse_ckpt, test, work / "pred_fine.zarr", [2, 4], atlas_labels=f"{train}:label")[0]
        coarse_pred = p_coarse[2] > 0.5
        coarse_dice = dice(coarse_pred, (gt == 2) | (gt == 4))
        fine = {}
        print(f"  coarse class (membrane+glia) Dice {coarse_dice:.3f}")
        print(f"  {'fine class':14s} {'naive Dice':>10s} {'fine Dice':>10s}")
        for c in (2, 4):
            t = gt == c
            fine[CLASSES[c]] = {"naive": dice(coarse_pred, t), "fine": dice(p_fine[c] > 0.5, t)}
            print(f"  {c} {CLASSES[c]:12s} {fine[CLASSES[c]]['naive']:10.3f} {fine[CLASSES[c]]['fine']:10.3f}")
        fine_gap = {CLASSES[c]: float(np.mean(np.abs(p_fine[c] - p_coarse[2]))) for c in (2, 4)}
        print("  mean |p(fine class) - p(coarse class)|: "
              + ", ".join(f"{name} {v:.4f}" for name, v in fine_gap.items()))
        report.update(coarse_dice=coarse_dice, coarse_to_fine=fine, train_seconds_coarse=t_coarse,
                      coarse_to_fine_gap=fine_gap)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200, help="Training steps per model (equal budget).")
    parser.add_argument("--batch", type=int, default=4, help="Patches per step.")
    parser.add_argument("--patch", type=int, default=128, help="2D patch side (also the atlas side).")
    parser.add_argument("--depth", type=int, default=4, help="U-Net depth.")
    parser.add_argument("--width", type=int, default=8, help="U-Net base width.")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate.")
    parser.add_argument("--merge-prob", type=float, default=0.5, help="LCS merged-label probability.")
    parser.add_argument("--bce-weight", type=float, default=1.0, help="LCS BCE weight added to soft Dice.")
    parser.add_argument("--negative-prob", type=float, default=0.3, help="LCS probability of an absent class.")
    parser.add_argument("--conditionings", default="prototype,atlas",
                        help="LCS conditionings to train (comma-separated: prototype, atlas).")
    parser.add_argument("--coarse-conditioning", default="prototype", help="Conditioning of the coarse model.")
    parser.add_argument("--split-prob", type=float, default=0.5,
                        help="Split augmentation probability of the coarse model ([lcs] split_prob).")
    parser.add_argument("--lcs-split-prob", type=float, default=LCSConfig.split_prob,
                        help="Split augmentation probability of the 4-class LCS models.")
    parser.add_argument("--test-crop", type=int, default=1024, help="Side of the central crop of test sections.")
    parser.add_argument("--skip-coarse", action="store_true", help="Skip the coarse-to-fine experiment.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a few shared cores).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="Training and inference arithmetic (see emseg.runtime.precision).")
    parser.add_argument("--workdir", default=None, help="Folder for derived data and runs [default: new in /tmp].")
    parser.add_argument("--json-out", default=None, help="Also write the figures as JSON here.")
    args = parser.parse_args(argv)
    src = data_dir() / "vnc_stack1.h5"
    if not src.exists():
        print(f"VNC data not found at {src} (set EMSEG_DATA)")
        return 1
    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lcs_vnc_"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    train, test = prepare(src, work, args.test_crop)
    with h5py.File(train, "r") as fh:
        offset = choose_offset(fh["label"][...], (1, args.patch, args.patch), list(CLASSES))
        atlas_counts = np.bincount(fh["label"][offset[0], offset[1]:offset[1] + args.patch,
                                               offset[2]:offset[2] + args.patch].ravel(), minlength=5)
    with h5py.File(test, "r") as fh:
        gt = fh["label"][...]
    print(f"VNC: train sections 0-14, test sections 15-19 (central {args.test_crop}^2 crop, {gt.size} voxels); "
          f"2D U-Net depth {args.depth} width {args.width}, patch {args.patch}^2, batch {args.batch}, "
          f"{args.steps} steps, lr {args.lr}, {args.threads} threads")
    print(f"atlas: section {offset[0]}, y {offset[1]}, x {offset[2]}; class voxel counts {atlas_counts.tolist()}")
    report: dict = {"args": vars(args), "atlas_offset": list(offset), "atlas_counts": atlas_counts.tolist()}

    report.update(run_seed(args, work, train, test, offset, gt))
    total = time.perf_counter() - t_all
    print(f"total wall time {total:.0f} s; runs and predictions in {work}")
    report["wall_seconds"] = total
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
