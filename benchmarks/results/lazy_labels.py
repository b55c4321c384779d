"""Lazy labels on VNC: dense mitochondria on three sections, with and without "no mitochondria here" cubes.

Each seed runs ``benchmarks/train_vnc.py --runs dense,lazy`` (same training time per arm): ``dense``
trains on sections 0, 7 and 14 only; ``lazy`` adds 24 background-only windows of other training
sections, labels -1 with ``info = [[0, 0], [0, 1]]``, drawn 25% of the time. Reported: test Jaccard of
mitochondria (sections 15-19) and false-positive voxels inside 40 held-out mitochondria-free test
windows; paired by seed. Stored in ``--out`` per seed (resumable); ``--markdown`` prints the table.

    python benchmarks/results/lazy_labels.py --seeds 0,1,2 --seconds 150
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _campaign import Campaign, ci_cell, mean_std, paired_interval, pyplot  # noqa: E402

TRAIN_VNC = Path(__file__).resolve().parents[1] / "train_vnc.py"


def one_seed(seed: int, seconds: float) -> dict:
    out = subprocess.run([sys.executable, str(TRAIN_VNC), "--runs", "dense,lazy", "--seed", str(seed),
                          "--seconds", str(seconds), "--threads", os.environ.get("OMP_NUM_THREADS", "1")],
                         capture_output=True, text=True, check=True).stdout
    rows: dict = {}
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows.setdefault(row["run"], {}).update(row)
    return {"arms": rows}


def table(runs: list[dict]) -> str:
    lines = ["| arm | steps | test Jaccard mitochondria | FP voxels in 40 mito-free windows | FP rate |",
             "|---|---|---|---|---|"]
    for arm in ("dense", "lazy"):
        rs = [r["arms"][arm] for r in runs if arm in r["arms"]]
        lines.append(f"| {arm} | {'/'.join(str(r['steps']) for r in rs)} | {mean_std([r['jaccard'][1] for r in rs])} | "
                     f"{mean_std([r['bg_false_positive_voxels'] for r in rs])} | "
                     f"{mean_std([r['bg_false_positive_rate'] for r in rs])} |")
    pairs = [r["arms"] for r in runs if {"dense", "lazy"} <= set(r["arms"])]
    dj = [p["lazy"]["jaccard"][1] - p["dense"]["jaccard"][1] for p in pairs]
    fp_d = np.array([p["dense"]["bg_false_positive_voxels"] for p in pairs], float)
    fp_l = np.array([p["lazy"]["bg_false_positive_voxels"] for p in pairs], float)
    lines += ["", f"lazy - dense test Jaccard: {ci_cell(paired_interval(dj))}; false positives lazy / dense: "
              f"{fp_l.sum() / max(fp_d.sum(), 1):.2f} (sum over seeds; per seed "
              f"{', '.join(f'{l:.0f}/{d:.0f}' for l, d in zip(fp_l, fp_d))})."]
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for i, arm in enumerate(("dense", "lazy")):
        rs = [r["arms"][arm] for r in runs if arm in r["arms"]]
        for ax, key in ((axes[0], lambda r: r["jaccard"][1]), (axes[1], lambda r: r["bg_false_positive_voxels"])):
            vals = [key(r) for r in rs]
            ax.bar(i, np.mean(vals), color=f"C{i}", alpha=0.8)
            ax.plot([i] * len(vals), vals, "k.", ms=5)
    for ax, label in ((axes[0], "test Jaccard, mitochondria"), (axes[1], "false-positive voxels, mito-free windows")):
        ax.set_xticks([0, 1], ["dense (3 sections)", "+ lazy cubes"])
        ax.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/lazy_labels.json")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--seconds", type=float, default=150)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if args.markdown:
        print(table(json.loads(out.read_text())["runs"]))
        return 0
    campaign = Campaign(out, {"seconds": args.seconds})
    for seed in (int(s) for s in args.seeds.split(",")):
        run = campaign.run({"seed": seed}, lambda: one_seed(seed, args.seconds))
        if not run["arms"]:
            print("drosophila_vnc data not found (set EMSEG_DATA); nothing to do")
            campaign.runs.remove(run)
            campaign.save()
            return 0
        print(f"seed {seed}: " + ", ".join(f"{a} J={r['jaccard'][1]:.3f} FP={r['bg_false_positive_voxels']}"
                                           for a, r in run["arms"].items()), flush=True)
    plot(campaign.runs, out.with_suffix(".png"))
    print(table(campaign.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
