"""Were the active-learning runs trained enough? Fine-tuning steps and the fully supervised reference on VNC.

Two checks of the set-up of ``active_learning.py`` (same network, data and loss; mitochondria):

``finetune``: per seed, the simulation's first iteration of random sampling (20 initial random
    patches, 600 steps; then 20 more, fine-tuned from the initial weights) with ``S`` fine-tuning
    steps for S in ``--finetune-steps``; test Jaccard against S. If it flattens by the 200 steps
    the campaign uses, one fine-tuning per iteration was enough. Each S is a separate simulation
    (``emseg.active.simulation.loop.run_simulation``) with the same seed, hence the same initial patches and
    the same initial network (trained once and copied into the other folders).
``full``: per seed, the network trained on the whole pool (960 patches) for ``--full-steps`` steps,
    tested every ``--full-every`` steps: is the 1,600-step reference of ``active_learning.py``
    converged, and what does the label-cost ratio look like against a longer one?

Stored in ``--out``/budget.json (resumable per run), figure ``--out``/budget.png, ``--markdown``.

    python benchmarks/results/al_budget.py --out benchmarks/results/active_budget --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _campaign import Campaign, mean_std, no_data, pyplot  # noqa: E402

import active_learning  # noqa: E402
import active_vnc  # noqa: E402
from emseg.runtime import Runtime


def campaign_args(args, **over) -> argparse.Namespace:
    """``active_learning.py``'s defaults (its campaign's settings), with ``over`` replaced."""
    base = dict(seeds=args.seeds, strategies="random", iterations=1, initial=20, per_iteration=20,
                steps_initial=600, steps_finetune=200, warmup=20, batch_size=4, lr=2e-3, lr_finetune=5e-4,
                class_weights=None, mc_samples=8, candidates=300, depth=4, base_width=8, dropout=0.2, task="mito")
    base.update(over)
    return argparse.Namespace(**base)


def finetune_run(args, seed: int, steps: int, sims: Path) -> dict:
    from emseg.active.simulation.loop import run_simulation

    config = active_learning.build(campaign_args(args, seeds=str(seed), steps_finetune=steps,
                                                 steps_initial=args.steps_initial))
    folder = sims / f"ft{steps}"
    first = sims / f"ft{args.finetune_steps.split(',')[0]}" / "runs" / f"seed_{seed}"
    mine = folder / "runs" / f"seed_{seed}"
    if first.parent.parent != folder and (first / "initial.json").exists() and not mine.exists():
        mine.mkdir(parents=True)  # the same initial network for every S of this seed
        shutil.copy(first / "initial.json", mine / "initial.json")
        shutil.copytree(first / "initial", mine / "initial")
    t0 = time.perf_counter()
    result = run_simulation(config, folder, runtime=Runtime(device="cpu"), plot=False)
    rows = {int(r["iteration"]): float(r["mean_fg_jaccard"]) for r in result.rows if int(r["seed"]) == seed}
    return {"initial": rows[0], "jaccard": rows[1], "seconds": time.perf_counter() - t0}


def full_run(args, seed: int) -> dict:
    """The whole pool for ``--full-steps`` steps, the test Jaccard every ``--full-every`` steps."""
    from emseg.models.checkpoint import load_model
    from emseg.engine.training import run_training
    from emseg.semantic.train import SegmentationTask, evaluate_cubes

    config = active_learning.build(campaign_args(args, seeds=str(seed)))
    pool, test = active_learning.region_cube(config, config.pool), active_learning.region_cube(config, config.test)
    curve = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for step in range(args.full_every, args.full_steps + 1, args.full_every):
            cfg = config.train.replace(steps=args.full_steps, valid_every=10**9, checkpoint_every=10**9)
            task = SegmentationTask(cfg, cubes=[pool], valid_cubes=[])
            # one cosine schedule over --full-steps, stopped and tested every --full-every steps
            run_training(task, cfg, tmp, runtime=Runtime(device="cpu", seed=seed), resume=step > args.full_every,
                         stop_after=args.full_every)
            model, _ = load_model(Path(tmp) / "last.pt", "cpu")
            res = evaluate_cubes(model, [test], cfg.patch_shape, config.n_classes, "cpu",
                                 precision=cfg.effective_precision)
            curve.append([step, float(res["valid_score"])])
            print(f"  full seed {seed}: step {step} J={curve[-1][1]:.3f}", flush=True)
    return {"curve": curve, "seconds": time.perf_counter() - t0}


def table(runs: list[dict], steps: list[int]) -> str:
    lines = ["| fine-tuning steps | test Jaccard after the first iteration (n = 40) | gain over the initial network (n = 20) |",
             "|---|---|---|"]
    for s in steps:
        rs = [r for r in runs if r.get("kind") == "finetune" and r["steps"] == s]
        lines.append(f"| {s} | {mean_std([r['jaccard'] for r in rs])} | {mean_std([r['jaccard'] - r['initial'] for r in rs])} |")
    full = [r for r in runs if r.get("kind") == "full"]
    if full:
        points = [p[0] for p in full[0]["curve"]]
        lines += ["", "| whole pool, steps | " + " | ".join(str(p) for p in points) + " |",
                  "|---|" + "---|" * len(points),
                  "| test Jaccard | " + " | ".join(mean_std([r["curve"][i][1] for r in full if len(r["curve"]) > i])
                                                  for i in range(len(points))) + " |"]
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ft = [r for r in runs if r.get("kind") == "finetune"]
    for seed in sorted({r["seed"] for r in ft}):
        rs = sorted((r for r in ft if r["seed"] == seed), key=lambda r: r["steps"])
        axes[0].plot([r["steps"] for r in rs], [r["jaccard"] for r in rs], "-o", ms=3, label=f"seed {seed}")
        axes[0].axhline(rs[0]["initial"], color=axes[0].lines[-1].get_color(), ls=":", lw=0.8)
    axes[0].axvline(200, color="k", lw=0.8, ls="--")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("fine-tuning steps (dashed: the campaign's 200)")
    axes[0].set_ylabel("test Jaccard, random, 40 patches (dotted: initial)")
    axes[0].legend(fontsize=7)
    for r in (r for r in runs if r.get("kind") == "full"):
        steps, j = zip(*r["curve"])
        axes[1].plot(steps, j, "-o", ms=3, label=f"seed {r['seed']}")
    axes[1].axvline(1600, color="k", lw=0.8, ls="--")
    axes[1].set_xlabel("training steps on the whole pool (dashed: the campaign's reference)")
    axes[1].set_ylabel("test Jaccard, mitochondria")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--finetune-steps", default="50,100,200,400,800")
    ap.add_argument("--steps-initial", type=int, default=600, help="steps of the initial network")
    ap.add_argument("--full-steps", type=int, default=6400)
    ap.add_argument("--full-every", type=int, default=800)
    ap.add_argument("--parts", default="finetune,full")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    steps = [int(s) for s in args.finetune_steps.split(",")]
    if args.markdown:
        print(table(json.loads((out / "budget.json").read_text())["runs"], steps))
        return 0
    if not (active_vnc.data_dir() / "vnc_stack1.h5").exists():
        return no_data()
    out.mkdir(parents=True, exist_ok=True)
    campaign = Campaign(out / "budget.json", {k: getattr(args, k) for k in ("finetune_steps", "steps_initial",
                                                                      "full_steps", "full_every")})
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = args.parts.split(",")
    for seed in seeds:
        if "finetune" in parts:
            for s in steps:
                r = campaign.run({"kind": "finetune", "seed": seed, "steps": s},
                                 lambda: finetune_run(args, seed, s, out / "simulation"))
                print(f"finetune seed {seed} S={s}: J={r['jaccard']:.3f} (initial {r['initial']:.3f})", flush=True)
    for seed in seeds:
        if "full" in parts:
            campaign.run({"kind": "full", "seed": seed}, lambda: full_run(args, seed))
    plot(campaign.runs, out / "budget.png")
    print(table(campaign.runs, steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
