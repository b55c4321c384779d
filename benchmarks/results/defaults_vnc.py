"""Which defaults should a new user get? The new-user run of VNC, arm by arm.

A new user writes a config with four keys only: ``n_classes = 5``, ``patch_shape = [1, 256, 256]``,
the training cube (VNC stack 1, sections 0-11: the protocol's training split) and ``max_seconds``;
everything else is emseg's default. Each arm overrides a few keys on top of those four (the arm
``shipped`` overrides nothing: it is what the installed emseg gives). After training, ``best.pt``
predicts the scored sections (as ``emseg predict`` does: default window, overlap and precision) and
the Jaccard per class is computed as ``emseg evaluate`` does.

``--stage screen`` (the default) scores the validation sections 12-14: the arms are compared, and
the defaults chosen, there. ``--stage test`` scores the test sections 15-19, once per reported
configuration (the shipped defaults, 5 seeds fixed in advance). Runs are stored in ``--out`` as soon
as each is done; a killed campaign continues where it stopped.

    python benchmarks/results/defaults_vnc.py --stage screen --arms shipped,old-w16 --seeds 0,1,2 --seconds 600 \
        --out benchmarks/results/defaults/screen.json
    python benchmarks/results/defaults_vnc.py --stage test --arms shipped --seeds 0,1,2,3,4 --seconds 600 \
        --out benchmarks/results/defaults/test.json
    python benchmarks/results/defaults_vnc.py --markdown --out benchmarks/results/defaults/test.json
    # seeds split over the two cores into a.json and b.json: --markdown --out a.json,b.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _campaign import Campaign, ci_cell, finished, mean_std, merged_runs, no_data, paired_interval, pyplot  # noqa: E402
from _common import data_dir  # noqa: E402
from emseg.runtime import Runtime

CLASSES = ("background", "mitochondria", "membrane", "synapse", "glia")
#: Sections of VNC stack 1 per role (the protocol of docs/results.md).
TRAIN, SCORED = (0, 12), {"screen": (12, 15), "test": (15, 20)}

#: Overrides per arm, on top of the four new-user keys. ``old`` is the defaults before they were
#: chosen by this campaign (width 32, constant lr 1e-3, NLL, no class weights: ``[]``, as the
#: shipped default is ``"auto"``).
OLD = {"model": {"base_width": 32}, "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0},
       "class_weights": [], "dice_weight": 0.0}
#: The screen's rule (fixed before its runs): an arm replaces the shipped defaults only if its mean
#: foreground Jaccard over the seeds beats theirs by more than this.
MARGIN = 0.03
#: The new-user targets, test Jaccard per class (mitochondria, membrane, synapse, glia).
TARGETS = {"mitochondria": 0.85, "membrane": 0.80, "synapse": 0.30, "glia": 0.60}
ARMS: dict[str, dict] = {
    "shipped": {},
    "old": OLD,
    "old-w16": {**OLD, "model": {"base_width": 16}},
    "w16-cosine": {**OLD, "model": {"base_width": 16},
                   "optim": {"lr": 2e-3, "schedule": "cosine", "warmup_steps": 50}},
    "w16-cosine-weights": {**OLD, "model": {"base_width": 16}, "class_weights": "auto",
                           "optim": {"lr": 2e-3, "schedule": "cosine", "warmup_steps": 50}},
    "w16-cosine-weights-dice": {**OLD, "model": {"base_width": 16}, "class_weights": "auto", "dice_weight": 1.0,
                                "optim": {"lr": 2e-3, "schedule": "cosine", "warmup_steps": 50}},
    "w16-cosine-dice": {**OLD, "model": {"base_width": 16}, "dice_weight": 1.0,
                        "optim": {"lr": 2e-3, "schedule": "cosine", "warmup_steps": 50}},
}


def new_user_config(vnc: Path, seconds: float, overrides: dict) -> dict:
    stack = f"{vnc}/vnc_stack1.h5"
    cfg = {"n_classes": 5, "patch_shape": [1, 256, 256], "max_seconds": seconds,
           "train": [{"raw": f"{stack}:raw", "label": f"{stack}:label", "region": [list(TRAIN)]}]}
    for key, value in overrides.items():
        cfg[key] = dict(value) if isinstance(value, dict) else value
    return cfg


def resolved(config) -> dict:
    """What an arm changes, as the training sees it (after emseg's defaults are filled in)."""
    d = config.to_dict()
    return {"class_weights": d["class_weights"], "dice_weight": d["dice_weight"], "optim": d["optim"],
            "base_width": d["model"]["base_width"]}


def one_run(vnc: Path, arm: str, seconds: float, seed: int, stage: str = "screen", threads: int | None = None) -> dict:
    import h5py

    from emseg.engine.config import config_from_dict
    from emseg.semantic.evaluation import evaluate_volumes
    from emseg.io import open_volume
    from emseg.semantic.predict import PredictConfig, predict_file
    from emseg.semantic.train import train

    cfg = config_from_dict(new_user_config(vnc, seconds, ARMS[arm]))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train(cfg, f"{tmp}/run", runtime=Runtime(device="cpu", seed=seed, threads=threads))
        finished(result, None, f"{arm} seed {seed}")
        first, last = SCORED[stage]
        with h5py.File(f"{vnc}/vnc_stack1.h5", "r") as fh, h5py.File(f"{tmp}/test.h5", "w") as out:
            out["raw"] = fh["raw"][first:last]
            out["label"] = fh["label"][first:last]
        t1 = time.perf_counter()
        predict_file(PredictConfig(model=f"{tmp}/run/best.pt", input=f"{tmp}/test.h5:raw",
                                   output=f"{tmp}/pred.zarr", output_type="labels", device="cpu"))
        t2 = time.perf_counter()
        with open_volume(f"{tmp}/pred.zarr") as pred, open_volume(f"{tmp}/test.h5:label") as gt:
            scores = evaluate_volumes(pred, gt, n_classes=5)
        curve = (Path(tmp) / "run" / "metrics.csv").read_text()
    return {"stage": stage, "sections": list(SCORED[stage]),
            "steps": result.final_step, "train_s": result.seconds, "patches_per_s": result.patches_per_s,
            "precision": result.precision, "predict_s": t2 - t1, "total_s": time.perf_counter() - t0,
            "jaccard": [float(j) for j in scores.jaccard], "dice": [float(d) for d in scores.dice],
            "overrides": ARMS[arm], "resolved": resolved(cfg), "metrics_csv": curve}


def table(runs: list[dict], baseline: str | None) -> str:
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    lines = ["| arm | seeds | steps | " + " | ".join(CLASSES[1:]) + " | mean fg |",
             "|---|---|---|" + "---|" * 5]
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        cells = [mean_std([r["jaccard"][c] for r in rs]) for c in range(1, 5)]
        fg = mean_std([float(np.mean(r["jaccard"][1:])) for r in rs])
        lines.append(f"| {arm} | {','.join(str(r['seed']) for r in rs)} | "
                     f"{'/'.join(str(r['steps']) for r in rs)} | " + " | ".join(cells) + f" | {fg} |")
    if baseline:
        base = {r["seed"]: r for r in runs if r["arm"] == baseline}
        lines += ["", f"Paired difference to `{baseline}` (same seed), mean foreground Jaccard, 95% interval:", ""]
        for arm in arms:
            if arm == baseline:
                continue
            d = [np.mean(r["jaccard"][1:]) - np.mean(base[r["seed"]]["jaccard"][1:])
                 for r in runs if r["arm"] == arm and r["seed"] in base]
            if d:
                verdict = (f"replaces `{baseline}` (mean > +{MARGIN})" if np.mean(d) > MARGIN
                           else f"does not replace `{baseline}` (mean <= +{MARGIN})")
                lines.append(f"- `{arm}`: {ci_cell(paired_interval(d))} ({len(d)} pairs): {verdict}")
    if runs and all(r.get("stage") == "test" for r in runs):
        lines += ["", "Targets (mean test Jaccard over the seeds):", ""]
        for arm in arms:
            means = {c: np.mean([r["jaccard"][CLASSES.index(c)] for r in runs if r["arm"] == arm]) for c in TARGETS}
            lines.append(f"- `{arm}`: " + ", ".join(f"{c} {means[c]:.3f} {'met' if means[c] >= t else 'missed'} "
                                                    f"(>= {t})" for c, t in TARGETS.items()))
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    plt = pyplot()
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(arms), 4))
    width = 0.8 / 4
    for c in range(1, 5):
        for i, arm in enumerate(arms):
            vals = [r["jaccard"][c] for r in runs if r["arm"] == arm]
            x = i + (c - 2.5) * width
            ax.bar(x, np.mean(vals), width, color=f"C{c}", label=CLASSES[c] if i == 0 else None, alpha=0.8)
            ax.plot([x] * len(vals), vals, "k.", ms=4)
    ax.set_xticks(range(len(arms)), arms, rotation=20, ha="right")
    stages = {r.get("stage", "test") for r in runs}
    ax.set_ylabel("validation Jaccard (sections 12-14)" if stages == {"screen"} else "test Jaccard (sections 15-19)")
    ax.axhline(0.85, color="C1", ls=":", lw=0.8)
    ax.legend(ncol=4, fontsize=8)
    ax.set_title("VNC new-user run: four keys + arm overrides (dots = seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/defaults/screen.json")
    ap.add_argument("--stage", choices=tuple(SCORED), default="screen",
                    help="screen: score validation sections 12-14; test: score test sections 15-19.")
    ap.add_argument("--arms", default="shipped")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per run (the screen: 1, one run per core; the test stage: 2, the whole machine)")
    ap.add_argument("--baseline", default=None, help="Arm for the paired differences of --markdown.")
    ap.add_argument("--markdown", action="store_true",
                    help="Print the table of --out (several JSONs: comma-separated), draw the figure and stop.")
    ap.add_argument("--figure", default=None, help="With --markdown: the figure's path (default: beside the first JSON).")
    args = ap.parse_args()
    if args.markdown:  # several JSONs (seeds run side by side, one per core): comma-separated
        runs, _ = merged_runs(args.out, lambda r: (r["arm"], r["seed"], r.get("stage")))
        print(table(runs, args.baseline))
        plot(runs, Path(args.figure) if args.figure else Path(args.out.split(",")[0]).with_suffix(".png"))
        return 0
    vnc = data_dir()
    if vnc is None:
        return no_data()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    for arm in args.arms.split(","):
        if arm not in ARMS:
            raise SystemExit(f"unknown arm {arm!r} (known: {', '.join(ARMS)})")
    campaign = Campaign(args.out, {"seconds": args.seconds, "threads": torch.get_num_threads(),
                                   "stage": args.stage})
    for seed in (int(s) for s in args.seeds.split(",")):
        for arm in args.arms.split(","):
            run = campaign.run({"arm": arm, "seed": seed, "stage": args.stage},
                               lambda: one_run(vnc, arm, args.seconds, seed, args.stage, args.threads))
            print(f"{arm} seed {seed}: {run['steps']} steps, {args.stage} Jaccard "
                  f"{[round(j, 3) for j in run['jaccard']]}", flush=True)
    plot(campaign.runs, campaign.path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
