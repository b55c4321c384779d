"""Unsupervised iGTT on VNC against Otsu, adaptive thresholding and a supervised U-Net (the iGTT paper, Table 3).

For each target (``membrane``: ``label >= 2``; ``mito``: ``label == 1``) and seed, runs
``benchmarks/igtt_vnc.py``'s protocol on the same held-out crops (sections 16-17, central crop):
``igtt`` (the reference settings: 30 thresholds, inversion of masks over 50 % foreground, EMS =
skeleton + shift within radius r + sample 10 %), ``igtt-noems`` (trains on the chosen mask itself),
and ``supervised`` (the same network and steps, trained on the true labels of sections 0-3). Otsu
and adaptive thresholding are deterministic and run once per target. For iGTT two diagnostics of the
final prediction: the best Dice among its candidate masks (the selection step with the labels as
judge) and the Dice of the mask at the true foreground fraction. Every epoch's Dice, chosen
foreground fraction and IoU of the chosen mask with the previous epoch's (``mask_iou_prev``: the
pseudo-labels have stopped changing when it stays near 1) are kept. Stored in ``--out`` per run
(resumable); ``--markdown`` prints the table, the PNG shows Dice per method and the per-epoch curves.

    python benchmarks/results/igtt.py --seeds 0,1,2 --epochs 15 --steps-per-epoch 50
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _campaign import Campaign, ci_cell, mean_std, no_data, paired_interval, pyplot  # noqa: E402
from _common import data_dir  # noqa: E402

import igtt_vnc  # noqa: E402

from emseg.igtt import binary_metrics, threshold_baselines  # noqa: E402

METHODS = ("supervised", "otsu", "adaptive", "igtt", "igtt-noems")
TARGETS = ("membrane", "mito")


def bench_args(args) -> argparse.Namespace:
    """The namespace ``igtt_vnc``'s run functions read."""
    return argparse.Namespace(
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, patch=args.patch,
        depth=args.depth, base_width=args.base_width, thresholds=args.thresholds, shift_radius=args.shift_radius,
        sample_fraction=args.sample_fraction, predict_window=args.predict_window, device="cpu")


def one_igtt(raw, truth, args, seed: int, ems: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="emseg_igtt_") as d:
        row = igtt_vnc.bench_igtt(raw, truth, bench_args(args), Path(d), seed, ems)
    return row


def one_supervised(train_raw, train_truth, raw, truth, args, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="emseg_igtt_sup_") as d:
        return igtt_vnc.run_supervised(train_raw, train_truth, raw, truth, bench_args(args), Path(d), seed)


def by(runs, target, method):
    return sorted((r for r in runs if r["target"] == target and r["method"] == method), key=lambda r: r["seed"])


def table(runs: list[dict]) -> str:
    lines = []
    for target in TARGETS:
        if not any(r["target"] == target for r in runs):
            continue
        otsu = by(runs, target, "otsu")
        otsu_dice = otsu[0]["dice"] if otsu else None
        ems = {r["seed"]: r["dice"] for r in by(runs, target, "igtt")}
        lines += [f"**{target}** (foreground {100 * runs[0]['truth_fg'][target]:.1f} % of the crops)", "",
                  "| method | runs | Dice | AUC | foreground fraction | Dice - Otsu (95% CI) | last-epoch mask IoU to previous "
                  "| best candidate mask's Dice | Dice at the true foreground fraction |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m in METHODS:
            rs = by(runs, target, m)
            if not rs:
                continue
            diff = "-"
            if m in ("igtt", "igtt-noems", "supervised") and otsu_dice is not None:
                diff = ci_cell(paired_interval([r["dice"] - otsu_dice for r in rs]))
            iou = mean_std([r["epochs"][-1].get("mask_iou_prev") for r in rs]) if "epochs" in rs[0] else "-"
            lines.append(f"| {m} | {len(rs)} | {mean_std([r['dice'] for r in rs])} | {mean_std([r['auc'] for r in rs])} "
                         f"| {mean_std([r['fg_fraction'] for r in rs])} | {diff} | {iou} "
                         f"| {mean_std([r.get('oracle_dice') for r in rs])} | {mean_std([r.get('prior_dice') for r in rs])} |")
        noems = {r["seed"]: r["dice"] for r in by(runs, target, "igtt-noems")}
        pairs = [ems[s] - noems[s] for s in ems if s in noems]
        if pairs:
            lines += ["", f"EMS - no EMS (paired by seed): {ci_cell(paired_interval(pairs))}"]
        lines.append("")
    return "\n".join(lines).rstrip()


def plot(runs: list[dict], path: Path) -> None:
    plt = pyplot()
    targets = [t for t in TARGETS if any(r["target"] == t for r in runs)]
    fig, axes = plt.subplots(len(targets), 3, figsize=(14, 3.6 * len(targets)), squeeze=False)
    for row, target in zip(axes, targets):
        names = [m for m in METHODS if by(runs, target, m)]
        for i, m in enumerate(names):
            vals = [r["dice"] for r in by(runs, target, m)]
            row[0].bar(i, np.mean(vals), color=f"C{i}", alpha=0.8)
            row[0].plot([i] * len(vals), vals, "k.", ms=5)
        row[0].set_xticks(range(len(names)), names, rotation=20)
        row[0].set_ylabel(f"Dice, {target}")
        for j, m in enumerate(("igtt", "igtt-noems")):
            for k, r in enumerate(by(runs, target, m)):
                ep = [e["epoch"] for e in r["epochs"]]
                row[1].plot(ep, [e["dice"] for e in r["epochs"]], color=f"C{3 + j}", lw=1,
                            label=m if k == 0 else None)
                row[2].plot(ep[1:], [e["mask_iou_prev"] for e in r["epochs"][1:]], color=f"C{3 + j}", lw=1,
                            label=m if k == 0 else None)
        otsu = by(runs, target, "otsu")
        if otsu:
            row[1].axhline(otsu[0]["dice"], color="C1", ls="--", lw=1, label="otsu")
        row[1].set_xlabel("epoch")
        row[1].set_ylabel("Dice of the chosen mask")
        row[2].set_xlabel("epoch")
        row[2].set_ylabel("IoU of the chosen mask to the previous epoch's")
        row[1].legend(fontsize=7)
        row[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/igtt.json")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--eval-sections", default="16,17")
    ap.add_argument("--train-sections", default="0,1,2,3")
    ap.add_argument("--crop", type=int, default=384)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--steps-per-epoch", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--base-width", type=int, default=16)
    ap.add_argument("--thresholds", type=int, default=30)
    ap.add_argument("--shift-radius", type=int, default=2)
    ap.add_argument("--sample-fraction", type=float, default=0.1)
    ap.add_argument("--predict-window", type=int, default=256)
    ap.add_argument("--adaptive-block", type=int, default=51)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if args.markdown:
        print(table(json.loads(out.read_text())["runs"]))
        return 0
    root = data_dir()
    if root is None:
        return no_data()
    keys = ("seeds", "targets", "methods", "out", "markdown")
    campaign = Campaign(out, {k: v for k, v in vars(args).items() if k not in keys})
    methods = args.methods.split(",")
    for target in args.targets.split(","):
        raw, truth = igtt_vnc.load(root / "vnc_stack1.h5", igtt_vnc.ints(args.eval_sections), args.crop, target)
        train_raw, train_truth = igtt_vnc.load(root / "vnc_stack1.h5", igtt_vnc.ints(args.train_sections),
                                               args.crop, target)
        extra = {"truth_fg": {target: float(truth.mean())}}
        baselines = threshold_baselines(raw, block_size=args.adaptive_block)
        for name in ("otsu", "adaptive"):
            if name in methods:
                b = baselines[name]
                campaign.run({"target": target, "method": name, "seed": 0},
                             lambda: dict(binary_metrics(b.score, b.mask, truth), fg_fraction=b.fg_fraction, **extra))
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in ("igtt", "igtt-noems", "supervised"):
                if name not in methods:
                    continue
                if name == "supervised":
                    fn = lambda: dict(one_supervised(train_raw, train_truth, raw, truth, args, seed), **extra)  # noqa: E731
                else:
                    fn = lambda: dict(one_igtt(raw, truth, args, seed, name == "igtt"), **extra)  # noqa: E731
                r = campaign.run({"target": target, "method": name, "seed": seed}, fn)
                print(f"{target} {name} seed {seed}: Dice {r['dice']:.3f} fg {r['fg_fraction']:.3f}", flush=True)
    for r in campaign.runs:  # every run carries the true foreground fraction of every target seen
        r["truth_fg"] = {**{t: v for x in campaign.runs for t, v in x["truth_fg"].items()}}
    campaign.save()
    plot(campaign.runs, out.with_suffix(".png"))
    print(table(campaign.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
