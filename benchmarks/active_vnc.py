"""Simulated active learning on the Drosophila VNC stack (mitochondria), after Roels & Saeys.

Binary task: ``label == 1`` (mitochondria) against everything else. The pool is sections 0-14 of
``vnc_stack1.h5`` cut into a grid of 128 x 128 patches; the test region is sections 15-19. For
each seed a U-Net is trained on 20 random pool patches; then every strategy picks 20 patches per
iteration from the remaining pool with the current network, the network is fine-tuned from its
previous weights on all labelled patches, and test Jaccard is measured. It runs through
:func:`emseg.active.simulation.loop.run_simulation` (the core of ``emseg query simulate``), so an
interrupted run continues where it stopped when started again with the same ``--out``.

The defaults follow the paper's protocol (3 seeds, 7 strategies, 5 iterations, a U-Net with
16 base feature maps). On a small CPU scale it down, e.g.::

    python benchmarks/active_vnc.py --seeds 0 --steps-initial 150 --steps-finetune 30 \\
        --candidates 240 --mc-samples 4 --test-sections 15:17 --test-crop 512 --depth 3 --base-width 8

Data: ``$EMSEG_DATA`` or ``../shared/data/drosophila_vnc`` beside the repository.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from emseg.runtime import Runtime

ALL_STRATEGIES = ("random", "entropy", "least_confidence", "bald", "kmeans", "coreset", "hybrid")


def data_dir() -> Path:
    env = os.environ.get("EMSEG_DATA")
    if env:
        path = Path(env)
        return path / "drosophila_vnc" if (path / "drosophila_vnc").is_dir() else path
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "drosophila_vnc"


def _range(text: str, name: str) -> list[int]:
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise SystemExit(f"{name} must look like START:STOP, got {text!r}") from None
    return [lo, hi]


def build_config(args: argparse.Namespace):
    from emseg.active.simulation.loop import simulate_config_from_dict

    h5 = data_dir() / "vnc_stack1.h5"
    if not h5.exists():
        raise SystemExit(f"VNC data not found at {h5} (set EMSEG_DATA)")
    test_region = [_range(args.test_sections, "--test-sections")]
    if args.test_crop:
        test_region += [[0, args.test_crop], [0, args.test_crop]]
    data = {
        "n_classes": 2, "label_map": [0, 1, 0, 0, 0], "patch": [1, 128, 128],
        "initial": args.initial, "per_iteration": args.per_iteration, "iterations": args.iterations,
        "seeds": [int(s) for s in args.seeds.split(",")], "strategies": args.strategies.split(","),
        "steps_initial": args.steps_initial, "steps_finetune": args.steps_finetune,
        "lr_finetune": args.lr_finetune, "batch_size": args.batch_size, "mc_samples": args.mc_samples,
        "candidates": args.candidates, "score_batch_size": 16,
        "pool": {"raw": f"{h5}:raw", "label": f"{h5}:label", "region": [_range(args.pool_sections, "--pool-sections")]},
        "test": {"raw": f"{h5}:raw", "label": f"{h5}:label", "region": test_region},
        "model": {"depth": args.depth, "base_width": args.base_width, "norm": "batch", "dropout": args.dropout},
        "optim": {"lr": args.lr, "warmup_steps": getattr(args, "warmup", 50)},
    }
    if getattr(args, "init", None):
        data["init"] = str(args.init)
    if getattr(args, "finetune", None):
        data["finetune"] = args.finetune
    if getattr(args, "task", "mito") == "5class":  # background, mitochondria, membrane, synapse, glia
        data["n_classes"] = 5
        del data["label_map"]
    if args.class_weights:
        data["class_weights"] = [float(w) for w in args.class_weights.split(",")]
    return simulate_config_from_dict(data, source="active_vnc")


def report(result, strategies: list[str]) -> dict:
    summary = result.summary
    iterations = sorted({p["iteration"] for pts in summary.values() for p in pts})
    n_lab = {p["iteration"]: p["n_labelled"] for pts in summary.values() for p in pts}
    random_mean = {p["iteration"]: p["mean"] for p in summary.get("random", [])}
    print("\nmean test Jaccard (mitochondria), mean over seeds [std]; (+/- vs random)")
    print(f"{'strategy':17s}" + "".join(f"{f'it{it} n={n_lab[it]}':>26s}" for it in iterations) + f"{'mean it1..':>12s}")
    table = {}
    for name in strategies:
        by_it = {p["iteration"]: p for p in summary.get(name, [])}
        cells = []
        later = []
        for it in iterations:
            p = by_it.get(it)
            if p is None:
                cells.append(f"{'-':>26s}")
                continue
            delta = ""
            if name != "random" and it in random_mean and math.isfinite(random_mean[it]):
                delta = f" ({p['mean'] - random_mean[it]:+.3f})"
            cells.append(f"{p['mean']:.3f} [{p['std']:.3f}]{delta}".rjust(26))
            if it > 0:
                later.append(p["mean"])
        avg = sum(later) / len(later) if later else float("nan")
        table[name] = {"per_iteration": [by_it[it] for it in iterations if it in by_it], "mean_after_initial": avg}
        print(f"{name:17s}" + "".join(cells) + f"{avg:12.3f}")
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/emseg_active_vnc", help="experiment folder (resumable)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--strategies", default=",".join(ALL_STRATEGIES))
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--initial", type=int, default=20)
    p.add_argument("--per-iteration", type=int, default=20)
    p.add_argument("--steps-initial", type=int, default=500)
    p.add_argument("--steps-finetune", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-finetune", type=float, default=5e-4)
    p.add_argument("--class-weights", default=None, help="loss weights background,mito, e.g. 1,3")
    p.add_argument("--mc-samples", type=int, default=10)
    p.add_argument("--candidates", type=int, default=0, help="random subset of the pool grid (0 = all 960)")
    p.add_argument("--pool-sections", default="0:15")
    p.add_argument("--test-sections", default="15:20")
    p.add_argument("--test-crop", type=int, default=0, help="test on the top-left CROP x CROP of each section")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--base-width", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from emseg.active.simulation.loop import run_simulation

    config = build_config(args)
    print(f"config: seeds {list(config.seeds)}, strategies {list(config.strategies)}, iterations {config.iterations}, "
          f"initial {config.initial} + {config.per_iteration}/iteration, steps {config.steps_initial}/"
          f"{config.steps_finetune}, lr {config.train.optim.lr}/{config.lr_finetune}, class weights "
          f"{config.train.class_weights}, batch {config.train.batch_size}, U-Net depth {config.train.model.depth} "
          f"width {config.train.model.base_width} dropout {config.train.model.dropout}, candidates "
          f"{config.candidates or 'all'}, mc_samples {config.mc_samples}, test region {list(config.test.region)}, "
          f"{args.threads} thread(s)")
    t0 = time.perf_counter()
    last = {"t": t0}

    def progress(event):
        if event["event"] == "row" and event["computed"]:
            r = event["row"]
            now = time.perf_counter()
            print(f"  [{event['done']}/{event['total']}] {r['strategy']:16s} seed {r['seed']} it {r['iteration']} "
                  f"n={r['n_labelled']:3d} jaccard {r['mean_fg_jaccard']:.3f}  ({now - last['t']:.0f} s)", flush=True)
            last["t"] = now

    result = run_simulation(config, args.out, runtime=Runtime(device=args.device), progress=progress)
    print(f"\n{result.computed} of {result.total} rows computed in {time.perf_counter() - t0:.0f} s; "
          f"{result.curves_csv}" + (f", {result.curves_png}" if result.curves_png else f" ({result.plot_note})"))
    table = report(result, [s for s in ALL_STRATEGIES if s in config.strategies] +
                   [s for s in config.strategies if s not in ALL_STRATEGIES])
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"args": vars(args), "summary": table, "rows": result.rows}, fh, indent=2)


if __name__ == "__main__":
    main()
