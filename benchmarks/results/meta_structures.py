"""Do networks learn meta-structures from noisy labels? Luo et al.'s conditions on VNC mitochondria, 3 seeds.

Each (condition, seed) runs ``benchmarks/noise_vnc.py``'s experiment on one binary target (``--target
mito``: ``label == 1``; ``--target membrane``: ``label >= 2``): the labels of sections 0-11
corrupted by one ``emseg noise`` mode (seeded), a U-Net trained on them for a fixed number of
steps (with ``--valid-every N`` the checkpoint is chosen on the clean labels of the validation
sections 12-14, whose curve shows the plateau), test Dice on the clean labels of sections 15-19,
scored once. PCL dilation and erosion use the paper's 3 x 3 template (``--dilate-radius 1``). Conditions: CL (clean), RCL flip 0.45 and
0.49, sample 0.1, PCL dilate / erode / skeleton, RL p = 0.1 and 0.5. Every run is stored in
``--out`` as soon as it is done (resumable); ``--markdown`` prints the table (mean +- std over seeds,
paired difference to CL with its 95% interval) and every PCL condition against every RCL arm
(paired), the figure shows test Dice per condition and the
training-loss curves (the paper's Fig. 1C: RCL and RL losses flatten, CL and PCL keep falling) and, with
``--valid-every N``, the validation Dice every N steps (whether the budget reached the plateau:
the table's last column, the mean validation Dice over the last quarter of training minus the
mean over the quarter before it). ``--markdown --out a.json,b.json`` merges campaigns run side by
side (seeds split over cores) into one table and figure (``--figure``).

    python benchmarks/results/meta_structures.py --seeds 0,1,2,3,4 --steps 2000 --valid-every 100 \
        --out benchmarks/results/meta_structures/mito.json
    python benchmarks/results/meta_structures.py --target membrane --seeds 0,1,2,3,4 --steps 2000 \
        --valid-every 100 --out benchmarks/results/meta_structures/membrane.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _campaign import Campaign, ci_cell, mean_std, merged_runs, no_data, paired_interval, pyplot  # noqa: E402
from _common import data_dir  # noqa: E402

import noise_vnc  # noqa: E402

CONDITIONS = ("CL", "RCL-flip", "RCL-flip49", "RCL-samp", "PCL-dil", "PCL-ero", "PCL-skel", "RL", "RL-50")


def late_gain(curve: list[list[float]]) -> float:
    """Test Dice at the end minus the test Dice half-way through training (near 0: the plateau)."""
    steps = np.array([c[0] for c in curve], float)
    dice = np.array([c[1] for c in curve], float)
    return float(dice[-1] - np.interp(steps[-1] / 2, steps, dice))


def quarter_gain(curve: list[list[float]]) -> float:
    """Mean validation Dice over the last quarter of training minus the mean over the quarter before
    it (near 0: the plateau; averaging several points keeps one noisy validation from deciding)."""
    steps = np.array([c[0] for c in curve], float)
    dice = np.array([c[1] for c in curve], float)
    end = steps[-1]
    last = dice[steps > 0.75 * end]
    before = dice[(steps > 0.5 * end) & (steps <= 0.75 * end)]
    if not len(last) or not len(before):  # too few validations to tell
        return float("nan")
    return float(last.mean() - before.mean())


def table(runs: list[dict], protocol: bool = False) -> str:
    """Mean +- std per condition; ``protocol``: campaigns under the split (curves on validation)."""
    names = [c for c in CONDITIONS if any(r["run"] == c for r in runs)]
    cl = {r["seed"]: r["dice_mito"] for r in runs if r["run"] == "CL"}
    curves = any(r.get("valid_curve") for r in runs)
    last = (" validation Dice, last quarter - the quarter before |" if protocol
            else " test Dice gain over the last half of training |")
    lines = ["| condition | label error | test Dice | condition - CL (95% CI) | final loss |"
             + (last if curves else ""),
             "|---|---|---|---|---|" + ("---|" if curves else "")]
    for c in names:
        rs = [r for r in runs if r["run"] == c]
        err = mean_std([1 - r["label_agreement"] for r in rs if r["label_agreement"] is not None])
        d = [r["dice_mito"] - cl[r["seed"]] for r in rs if r["seed"] in cl]
        diff = ci_cell(paired_interval(d)) if c != "CL" and d else "-"
        cells = (f"| {c} | {err} | {mean_std([r['dice_mito'] for r in rs])} | {diff} | "
                 f"{mean_std([r['final_loss'] for r in rs])} |")
        if curves:
            gain = quarter_gain if protocol else late_gain
            gains = [gain(r["valid_curve"]) for r in rs if r.get("valid_curve")]
            cells += f" {mean_std([g for g in gains if not np.isnan(g)])} |"
        lines.append(cells)
    return "\n".join(lines)


def pcl_table(runs: list[dict]) -> str:
    """The paper's "PCL below RCL" claim: each PCL condition minus each RCL arm, paired by seed."""
    dice = {(r["run"], r["seed"]): r["dice_mito"] for r in runs}
    pcl = [c for c in CONDITIONS if c.startswith("PCL") and any(r["run"] == c for r in runs)]
    rcl = [c for c in CONDITIONS if c.startswith("RCL") and any(r["run"] == c for r in runs)]
    if not pcl or not rcl:
        return ""
    lines = ["| PCL condition | " + " | ".join(f"- {c} (95% CI)" for c in rcl) + " |",
             "|---|" + "---|" * len(rcl)]
    for p in pcl:
        cells = []
        for c in rcl:
            d = [dice[p, s] - dice[c, s] for run, s in dice if run == p and (c, s) in dice]
            cells.append(ci_cell(paired_interval(d)) if d else "-")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, protocol: bool = False) -> None:
    plt = pyplot()
    names = [c for c in CONDITIONS if any(r["run"] == c for r in runs)]
    curves = any(r.get("valid_curve") for r in runs)
    fig, axes = plt.subplots(1, 3 if curves else 2, figsize=(19 if curves else 13, 4.2))
    for i, c in enumerate(names):
        vals = [r["dice_mito"] for r in runs if r["run"] == c]
        axes[0].bar(i, np.mean(vals), color=f"C{i}", alpha=0.8)
        axes[0].plot([i] * len(vals), vals, "k.", ms=4)
        for j, r in enumerate(r for r in runs if r["run"] == c):
            x = np.arange(len(r["loss_curve"])) * r["loss_every"]
            axes[1].plot(x, r["loss_curve"], color=f"C{i}", alpha=0.7, lw=1, label=c if j == 0 else None)
            if r.get("valid_curve"):
                steps, dice = zip(*r["valid_curve"])
                axes[2].plot(steps, dice, color=f"C{i}", alpha=0.7, lw=1, label=c if j == 0 else None)
    axes[0].set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes[0].set_ylabel(f"test Dice ({runs[0].get('target', 'mito')}), clean labels (dots = seeds)")
    axes[1].set_xlabel("training step")
    axes[1].set_ylabel("training loss (on the noisy labels)")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=7, ncol=2)
    if curves:
        axes[2].set_xlabel("training step")
        axes[2].set_ylabel(f"{'validation' if protocol else 'test'} Dice, clean labels")
        axes[2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/meta_structures.json")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--target", default="mito", choices=sorted(noise_vnc.TARGETS))
    ap.add_argument("--valid-every", type=int, default=0,
                    help="validation Dice (sections 12-14) every N steps, checkpoint chosen on it (0: the last)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--downsample", type=int, default=2)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--base-width", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dilate-radius", type=int, default=1, help="PCL radius (1: the paper's 3 x 3 template)")
    ap.add_argument("--markdown", action="store_true",
                    help="print the table of --out (several JSONs: comma-separated) and draw --figure")
    ap.add_argument("--figure", default=None, help="with --markdown: the figure's path (default: beside the first JSON)")
    args = ap.parse_args()
    if args.markdown:
        names = args.out.split(",")
        runs, docs = merged_runs(args.out, lambda r: (r["run"], r["seed"]))
        protocol = all("split" in doc for doc in docs)
        print(table(runs, protocol))
        pcl = pcl_table(runs)
        if pcl:
            print("\n" + pcl)
        plot(runs, Path(args.figure) if args.figure else Path(names[0]).with_suffix(".png"), protocol)
        return 0
    out = Path(args.out)
    root = data_dir()
    if root is None:
        return no_data()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "seeds", "conditions", "markdown")}
    if args.target == "mito" and not args.valid_every:  # the settings of the campaigns run before both keys
        settings = {k: v for k, v in settings.items() if k not in ("target", "valid_every")}
    campaign = Campaign(out, settings)
    with tempfile.TemporaryDirectory(prefix="emseg_meta_") as d:
        tmp = Path(d)
        noise_vnc.prepare(root, args.downsample, tmp, args.target)
        for seed in (int(s) for s in args.seeds.split(",")):
            for c in args.conditions.split(","):
                run_args = argparse.Namespace(**vars(args), seed=seed, seconds=10**9, device="cpu", overlap=0.125)
                row = campaign.run({"run": c, "seed": seed}, lambda: dict(noise_vnc.one_run(c, run_args, tmp), target=args.target))
                print(f"{c} seed {seed}: Dice {row['dice_mito']:.3f} ({row['steps']} steps)", flush=True)
    plot(campaign.runs, out.with_suffix(".png"), protocol=True)
    print(table(campaign.runs, protocol=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
