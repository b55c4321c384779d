"""Lazy labels on VNC: dense mitochondria on three sections, with and without "no mitochondria here" cubes.

Each seed runs ``benchmarks/train_vnc.py --runs dense,lazy`` (same training time per arm): ``dense``
trains on sections 0, 7 and 14 only; ``lazy`` adds 24 background-only windows of other training
sections, labels -1 with ``info = [[0, 0], [0, 1]]``, drawn 25% of the time. Reported: test Jaccard of
mitochondria (sections 15-19) and false-positive voxels inside 40 held-out mitochondria-free test
windows; paired by seed. Stored in ``--out`` per seed (resumable); ``--markdown`` prints the table.
``--dense-windows N`` makes the dense set N windows of those sections instead (a small, expensive dense
set), ``--lazy-from monotonic`` draws the lazy cubes from the most monotonic mitochondria-free windows
and also scores false positives in held-out monotonic windows (see ``benchmarks/train_vnc.py``).

    python benchmarks/results/lazy_labels.py --seeds 0,1,2 --seconds 150
    python benchmarks/results/lazy_labels.py --seeds 0,1,2 --seconds 150 --dense-windows 8 \
        --lazy-from monotonic --out benchmarks/results/lazy_labels_windows.json
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
from _campaign import Campaign, ci_cell, mean_std, no_data, paired_interval, pyplot  # noqa: E402

TRAIN_VNC = Path(__file__).resolve().parents[1] / "train_vnc.py"


def one_seed(seed: int, seconds: float, extra: list[str]) -> dict:
    out = subprocess.run([sys.executable, str(TRAIN_VNC), "--runs", "dense,lazy", "--seed", str(seed),
                          "--seconds", str(seconds), "--threads", os.environ.get("OMP_NUM_THREADS", "1"), *extra],
                         capture_output=True, text=True, check=True).stdout
    rows: dict = {}
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows.setdefault(row["run"], {}).update(row)
    return {"arms": rows}


def table(runs: list[dict]) -> str:
    kinds = [("", "random")] + ([("monotonic_", "monotonic")]
                                if any("monotonic_bg_false_positive_voxels" in a for r in runs for a in r["arms"].values())
                                else [])
    lines = ["| arm | steps | test Jaccard mitochondria | " + " | ".join(
        f"FP voxels in 40 {name} mito-free windows | FP rate ({name})" for _, name in kinds) + " |",
        "|---|---|---|" + "---|---|" * len(kinds)]
    for arm in ("dense", "lazy"):
        rs = [r["arms"][arm] for r in runs if arm in r["arms"]]
        lines.append(f"| {arm} | {'/'.join(str(r['steps']) for r in rs)} | {mean_std([r['jaccard'][1] for r in rs])} | "
                     + " | ".join(f"{mean_std([r[p + 'bg_false_positive_voxels'] for r in rs])} | "
                                  f"{mean_std([r[p + 'bg_false_positive_rate'] for r in rs])}" for p, _ in kinds) + " |")
    pairs = [r["arms"] for r in runs if {"dense", "lazy"} <= set(r["arms"])]
    dj = [p["lazy"]["jaccard"][1] - p["dense"]["jaccard"][1] for p in pairs]
    lines += ["", f"lazy - dense test Jaccard: {ci_cell(paired_interval(dj))}."]
    for prefix, name in kinds:
        fp_d = np.array([p["dense"][prefix + "bg_false_positive_voxels"] for p in pairs], float)
        fp_l = np.array([p["lazy"][prefix + "bg_false_positive_voxels"] for p in pairs], float)
        lines.append(f"False positives in {name} windows, lazy / dense: {fp_l.sum() / max(fp_d.sum(), 1):.2f} "
                     f"(sum over seeds; per seed {', '.join(f'{l:.0f}/{d:.0f}' for l, d in zip(fp_l, fp_d))}).")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, dense_label: str = "dense (3 sections)") -> None:
    plt = pyplot()
    panels = [("test Jaccard, mitochondria", lambda r: r["jaccard"][1]),
              ("FP voxels, 40 random mito-free windows", lambda r: r["bg_false_positive_voxels"])]
    if all("monotonic_bg_false_positive_voxels" in a for r in runs for a in r["arms"].values()):
        panels.append(("FP voxels, 40 monotonic mito-free windows", lambda r: r["monotonic_bg_false_positive_voxels"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6))
    for i, arm in enumerate(("dense", "lazy")):
        rs = [r["arms"][arm] for r in runs if arm in r["arms"]]
        for ax, (_, key) in zip(axes, panels):
            vals = [key(r) for r in rs]
            ax.bar(i, np.mean(vals), color=f"C{i}", alpha=0.8)
            ax.plot([i] * len(vals), vals, "k.", ms=5)
    for ax, (label, _) in zip(axes, panels):
        ax.set_xticks([0, 1], [dense_label, "+ lazy cubes"])
        ax.set_ylabel(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/lazy_labels.json")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--seconds", type=float, default=150)
    ap.add_argument("--dense-windows", type=int, default=0)
    ap.add_argument("--lazy-from", choices=("random", "monotonic"), default="random")
    ap.add_argument("--lazy-share", type=float, default=0.25)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if args.markdown:
        print(table(json.loads(out.read_text())["runs"]))
        return 0
    settings = {"seconds": args.seconds}  # + the options that differ from the first campaign's set-up
    extra = []
    for key, default in (("dense_windows", 0), ("lazy_from", "random"), ("lazy_share", 0.25)):
        if getattr(args, key) != default:
            settings[key] = getattr(args, key)
            extra += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    out.parent.mkdir(parents=True, exist_ok=True)
    campaign = Campaign(out, settings)
    for seed in (int(s) for s in args.seeds.split(",")):
        run = campaign.run({"seed": seed}, lambda: one_seed(seed, args.seconds, extra))
        if not run["arms"]:
            campaign.runs.remove(run)
            campaign.save()
            return no_data()
        print(f"seed {seed}: " + ", ".join(f"{a} J={r['jaccard'][1]:.3f} FP={r['bg_false_positive_voxels']}"
                                           for a, r in run["arms"].items()), flush=True)
    plot(campaign.runs, out.with_suffix(".png"),
         f"dense ({args.dense_windows} windows)" if args.dense_windows else "dense (3 sections)")
    print(table(campaign.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
