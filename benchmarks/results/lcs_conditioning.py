"""LCS against the multi-channel baseline on VNC, and novel labels by coarse-to-fine: 3 seeds.

Each seed runs ``benchmarks/lcs_vnc.py``'s experiment (same data split, backbone, patch, batch,
steps and learning rate for every model; ``precision = "auto"``): LCS with each conditioning in
``--conditionings``, the 5-output softmax baseline, and the coarse model (membrane and glia merged)
conditioned on fine atlas labels at inference. LCS merged Dice is reported under both merges
(``calibrated``, the default, and ``max``) from the same per-label maps; ``--split-prob`` is the
coarse model's split augmentation, ``--lcs-split-prob`` that of the 4-class models. Each seed's figures are stored in ``--out`` as soon
as they are done; a killed campaign continues with the next seed. ``--markdown`` prints the
tables of docs/results.md, ``--plot`` draws ``--out`` with ``.png``.

    python benchmarks/results/lcs_conditioning.py --seeds 0,1,2 --steps 1000
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

import lcs_vnc  # noqa: E402
from emseg.lcs import LCSConfig  # noqa: E402

CLASSES = lcs_vnc.CLASSES


def one_seed(args, seed: int) -> dict:
    import h5py

    from emseg.lcs import choose_offset

    run_args = argparse.Namespace(**vars(args), seed=seed)
    with tempfile.TemporaryDirectory(prefix="lcs_vnc_") as tmp:
        work = Path(tmp)
        train, test = lcs_vnc.prepare(lcs_vnc.data_dir() / "vnc_stack1.h5", work, args.test_crop)
        with h5py.File(train, "r") as fh:
            offset = choose_offset(fh["label"][...], (1, args.patch, args.patch), list(CLASSES))
        with h5py.File(test, "r") as fh:
            gt = fh["label"][...]
        report = lcs_vnc.run_seed(run_args, work, train, test, offset, gt)
    report["atlas_offset"] = [int(o) for o in offset]
    return report


def summary(runs: list[dict], conditionings: list[str]) -> dict:
    out: dict = {"seeds": [r["seed"] for r in runs]}
    for kind in conditionings:
        name = f"lcs_{kind}"
        d = [r["mean"][f"{name}_merged"] - r["mean"]["baseline_merged"] for r in runs]
        out[f"{name}_minus_baseline_mean_dice"] = paired_interval(d)
        out[f"{name}_gap_ratio"] = [r["conditioning_gap"][name] / r["true_conditioning_gap"] for r in runs]
        if all(f"{name}_merged_max" in r["mean"] for r in runs):
            for m in ("max", "calibrated"):
                d = [r["mean"][f"{name}_merged_{m}"] - r["mean"]["baseline_merged"] for r in runs]
                out[f"{name}_{m}_minus_baseline_mean_dice"] = paired_interval(d)
            d = [r["mean"][f"{name}_merged_calibrated"] - r["mean"][f"{name}_merged_max"] for r in runs]
            out[f"{name}_calibrated_minus_max_mean_dice"] = paired_interval(d)
    if all("coarse_to_fine" in r for r in runs):
        for cls in ("membrane", "glia"):
            d = [r["coarse_to_fine"][cls]["fine"] - r["coarse_to_fine"][cls]["naive"] for r in runs]
            out[f"fine_minus_naive_{cls}"] = paired_interval(d)
    return out


def markdown(doc: dict) -> str:
    runs, kinds = doc["runs"], doc["settings"]["conditionings"].split(",")
    names = [f"lcs_{k}" for k in kinds] + ["baseline"]
    both = all(f"lcs_{k}_merged_max" in r["mean"] for r in runs for k in kinds)  # older runs: one merge
    cols = ([(f"{n}_merged_{m}", f"{n} merged Dice ({m})") for n in names[:-1] for m in ("calibrated", "max")]
            if both else [(f"{n}_merged", f"{n} merged Dice") for n in names[:-1]])
    cols.append(("baseline_merged", "baseline merged Dice"))
    lines = ["| class | " + " | ".join(title for _, title in cols) + " |", "|---|" + "---|" * len(cols)]
    for cls in list(CLASSES.values()) + ["mean"]:
        cells = []
        for key, _ in cols:
            vals = [(r["mean"] if cls == "mean" else r["per_class"][cls])[key] for r in runs]
            cells.append(mean_std(vals))
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    s = summary(runs, kinds)
    if both:
        lines += ["", "| model | calibrated - max, mean merged Dice (95% CI) |", "|---|---|"]
        lines += [f"| lcs_{k} | {ci_cell(s[f'lcs_{k}_calibrated_minus_max_mean_dice'])} |" for k in kinds]
    lines += ["", "| model | conditioning gap / true masks' gap | mean merged Dice - baseline (95% CI) |",
              "|---|---|---|"]
    for k in kinds:
        n = f"lcs_{k}"
        lines.append(f"| {n} | {mean_std(s[n + '_gap_ratio'])} | {ci_cell(s[n + '_minus_baseline_mean_dice'])} |")
    base_gap = [r["conditioning_gap"]["baseline"] / r["true_conditioning_gap"] for r in runs]
    lines.append(f"| baseline | {mean_std(base_gap)} | - |")
    if all("coarse_to_fine" in r for r in runs):
        lines += ["", "| fine class | naive Dice | fine Dice | fine - naive (95% CI) |", "|---|---|---|---|"]
        for cls in ("membrane", "glia"):
            naive = [r["coarse_to_fine"][cls]["naive"] for r in runs]
            fine = [r["coarse_to_fine"][cls]["fine"] for r in runs]
            lines.append(f"| {cls} | {mean_std(naive)} | {mean_std(fine)} | {ci_cell(s['fine_minus_naive_' + cls])} |")
    lines += ["", f"Seeds {s['seeds']}."]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    plt = pyplot()
    runs, kinds = doc["runs"], doc["settings"]["conditionings"].split(",")
    names = [f"lcs_{k}" for k in kinds] + ["baseline"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    cls_names = list(CLASSES.values()) + ["mean"]
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        for j, cls in enumerate(cls_names):
            vals = [(r["mean"] if cls == "mean" else r["per_class"][cls])[f"{n}_merged"] for r in runs]
            x = j + (i - (len(names) - 1) / 2) * width
            axes[0].bar(x, np.nanmean(vals), width, color=f"C{i}", label=n if j == 0 else None, alpha=0.8)
            axes[0].plot([x] * len(vals), vals, "k.", ms=4)
    axes[0].set_xticks(range(len(cls_names)), cls_names)
    axes[0].set_ylabel("test Dice of the merged label map")
    axes[0].legend(fontsize=8)
    axes[0].set_title("LCS vs multi-channel baseline (dots = seeds)")
    if all("coarse_to_fine" in r for r in runs):
        for j, cls in enumerate(("membrane", "glia")):
            for i, kind in enumerate(("naive", "fine")):
                vals = [r["coarse_to_fine"][cls][kind] for r in runs]
                x = j + (i - 0.5) * 0.35
                axes[1].bar(x, np.mean(vals), 0.35, color=f"C{i + 3}", label=kind if j == 0 else None, alpha=0.8)
                axes[1].plot([x] * len(vals), vals, "k.", ms=4)
        axes[1].set_xticks([0, 1], ["membrane", "glia"])
        axes[1].set_ylabel("test Dice (p > 0.5)")
        axes[1].legend(fontsize=8)
        axes[1].set_title("novel labels: coarse model, fine atlas masks")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/lcs_vnc.json")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--merge-prob", type=float, default=0.5)
    ap.add_argument("--bce-weight", type=float, default=1.0)
    ap.add_argument("--negative-prob", type=float, default=0.3)
    ap.add_argument("--conditionings", default="prototype")
    ap.add_argument("--coarse-conditioning", default="prototype")
    ap.add_argument("--split-prob", type=float, default=0.5,
                    help="split augmentation of the coarse model")
    ap.add_argument("--lcs-split-prob", type=float, default=LCSConfig.split_prob,
                    help="split augmentation of the 4-class LCS models")
    ap.add_argument("--test-crop", type=int, default=1024)
    ap.add_argument("--skip-coarse", action="store_true")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if args.markdown or args.plot:
        doc = json.loads(out.read_text())
        if args.markdown:
            print(markdown(doc))
        if args.plot:
            plot(doc, out.with_suffix(".png"))
        return 0
    if not (lcs_vnc.data_dir() / "vnc_stack1.h5").exists():
        return no_data()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "seeds", "markdown", "plot")}
    campaign = Campaign(out, settings)
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        campaign.run({"seed": seed}, lambda: one_seed(args, seed))
    campaign.doc["summary"] = summary(campaign.runs, args.conditionings.split(","))
    campaign.save()
    plot(campaign.doc, out.with_suffix(".png"))
    print(markdown(campaign.doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
