"""Does active learning save labels on VNC? Strategies against random, paired by seed (Roels & Saeys).

Runs ``benchmarks/active_vnc.py``'s simulation (the core of ``emseg query simulate``: pool VNC
sections 0-14, test 15-19, patches 128^2, ``--initial`` random patches then ``--per-iteration``
per iteration, the same initial set and network for every strategy of a seed) into ``--out``,
which resumes where a killed run stopped. Then, per seed, a fully supervised reference: the same
network trained on the whole pool for as many steps as the loop used in total.

Reported (``--markdown``): test Jaccard per strategy and iteration (mean +- std over seeds); the
paired difference strategy - random, averaged over iterations 1..N, with its 95% t-interval over
seeds; the labelled patches each strategy needs to reach 95% of the fully supervised Jaccard.
``curves`` figure: ``--out``/results.png.

    python benchmarks/results/active_learning.py --out /tmp/al_mito --task mito --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _campaign import Campaign, ci_cell, mean_std, no_data, paired_interval, pyplot  # noqa: E402

import active_vnc  # noqa: E402
from emseg.runtime import Runtime

TASKS = ("mito", "5class")


def simulation_args(args) -> argparse.Namespace:
    """The namespace ``active_vnc.build_config`` reads."""
    return argparse.Namespace(
        seeds=args.seeds, strategies=args.strategies, iterations=args.iterations, initial=args.initial,
        per_iteration=args.per_iteration, steps_initial=args.steps_initial, steps_finetune=args.steps_finetune,
        batch_size=args.batch_size, lr=args.lr, lr_finetune=args.lr_finetune, class_weights=args.class_weights,
        mc_samples=args.mc_samples, candidates=args.candidates, pool_sections=getattr(args, "pool", "0:15"),
        test_sections="15:20", test_crop=0, depth=args.depth, base_width=args.base_width, dropout=args.dropout,
        task=args.task, warmup=args.warmup, init=getattr(args, "init", None), finetune=getattr(args, "finetune", None))


def add_simulation_arguments(ap: argparse.ArgumentParser) -> None:
    """The simulation's options (loop, network, training), shared with ``questions.py``."""
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--initial", type=int, default=20)
    ap.add_argument("--per-iteration", type=int, default=20)
    ap.add_argument("--steps-initial", type=int, default=600)
    ap.add_argument("--steps-finetune", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20, help="Warm-up steps of every (fine-)tuning run.")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr-finetune", type=float, default=5e-4)
    ap.add_argument("--class-weights", default=None)
    ap.add_argument("--mc-samples", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=300)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--base-width", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--no-full", action="store_true", help="Skip the fully supervised reference runs.")
    ap.add_argument("--pool", default="0:15",
                    help="Pool sections START:STOP of VNC stack 1 (0:12 under the protocol of docs/results.md; "
                         "0:15 reproduces the campaigns run before it).")
    ap.add_argument("--init", default=None,
                    help="Start every seed's initial network from this checkpoint (an `emseg pretrain` run's "
                         "last.pt; the network options must match it).")
    ap.add_argument("--finetune", default=None, choices=("previous", "init", "scratch"),
                    help="Where each round starts (default: emseg's).")


def campaign_settings(args, leave_out: tuple[str, ...]) -> dict:
    """The settings a campaign JSON records: every option but the output ones and ``leave_out``; the
    options added later (``pool``, ``init``, ``finetune``) only when they differ from their defaults,
    so that campaigns run before them still resume."""
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "markdown", "no_full", "seeds") + leave_out}
    for key, default in (("pool", "0:15"), ("init", None), ("finetune", None)):
        if settings.get(key) == default:
            settings.pop(key, None)
    return settings


def build(args):
    return active_vnc.build_config(simulation_args(args))


def region_cube(config, spec):
    """A fully labelled in-memory cube of a simulation region (``config.pool`` or ``config.test``)."""
    from emseg.data import Cube
    from emseg.io import open_volume

    with open_volume(spec.raw) as r, open_volume(spec.label) as lab:
        sl = spec.slices(r.shape)
        raw, label = r[sl], lab[sl].astype(np.int64)
    if config.label_map:
        label = np.asarray(config.label_map, dtype=np.int64)[label]
    info = np.zeros((2, config.n_classes), np.uint8)
    info[0] = 1
    return Cube(raw, label, info, 1.0, spec.raw)


def fully_supervised(config, seed: int, steps: int) -> dict:
    """The simulation's network trained on every pool voxel for ``steps`` steps; test scores."""
    import tempfile

    from emseg.engine.training import run_training
    from emseg.semantic.train import SegmentationTask, evaluate_cubes

    def cube(spec):
        return region_cube(config, spec)

    train_cfg = config.train.replace(steps=steps, valid_every=10**9, checkpoint_every=10**9)
    task = SegmentationTask(train_cfg, cubes=[cube(config.pool)], valid_cubes=[])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_training(task, train_cfg, tmp, runtime=Runtime(device="cpu", seed=seed))
        from emseg.models.checkpoint import load_model

        model, _ = load_model(Path(tmp) / "last.pt", "cpu")
        res = evaluate_cubes(model, [cube(config.test)], train_cfg.patch_shape, config.n_classes, "cpu",
                             precision=train_cfg.effective_precision)
    return {"mean_fg_jaccard": float(res["valid_score"]), "steps": steps, "seconds": time.perf_counter() - t0,
            "jaccard": [float(res[f"valid_jaccard_{c}"]) for c in range(config.n_classes)]}


def summary(rows: list[dict], full: list[dict], iterations: int) -> dict:
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    seeds = sorted({int(r["seed"]) for r in rows})
    J = {(r["strategy"], int(r["seed"]), int(r["iteration"])): float(r["mean_fg_jaccard"]) for r in rows}
    n_lab = {int(r["iteration"]): int(r["n_labelled"]) for r in rows}
    later = range(1, iterations + 1)
    out: dict = {"seeds": seeds, "strategies": {}, "full": {}}
    full_by_seed = {f["seed"]: f["mean_fg_jaccard"] for f in full}
    for s in strategies:
        per_it = {it: [J[(s, sd, it)] for sd in seeds if (s, sd, it) in J] for it in range(0, iterations + 1)}
        entry = {"per_iteration": {it: v for it, v in per_it.items() if v}}
        if s != "random":
            d = [np.mean([J[(s, sd, it)] - J[("random", sd, it)] for it in later])
                 for sd in seeds if all((s, sd, it) in J and ("random", sd, it) in J for it in later)]
            entry["diff_vs_random"] = paired_interval(d)
            entry["n_pairs"] = len(d)
        # labelled patches to reach 95% of the fully supervised Jaccard (mean over seeds)
        if full_by_seed:
            target = 0.95 * float(np.mean(list(full_by_seed.values())))
            reached = [n_lab[it] for it in sorted(per_it) if per_it[it] and np.mean(per_it[it]) >= target]
            entry["patches_to_95pct_full"] = reached[0] if reached else None
        out["strategies"][s] = entry
    if full_by_seed:
        out["full"] = {"mean_fg_jaccard": list(full_by_seed.values()), "target_95pct": 0.95 * float(
            np.mean(list(full_by_seed.values())))}
    out["n_labelled"] = n_lab
    return out


def markdown(s: dict, iterations: int) -> str:
    its = list(range(0, iterations + 1))
    lines = ["| strategy | " + " | ".join(f"it{it} (n={s['n_labelled'].get(it, s['n_labelled'].get(str(it)))})"
                                          for it in its) + " | mean it1-N - random (95% CI) | patches to 95% of full |",
             "|---|" + "---|" * (len(its) + 2)]
    for name, e in s["strategies"].items():
        pi = {int(k): v for k, v in e["per_iteration"].items()}
        cells = [mean_std(pi.get(it, [])) for it in its]
        diff = ci_cell(e["diff_vs_random"]) if "diff_vs_random" in e else "-"
        reach = e.get("patches_to_95pct_full")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {diff} | {reach if reach else 'not reached'} |")
    if s.get("full"):
        lines += ["", f"Fully supervised (whole pool, same total steps): {mean_std(s['full']['mean_fg_jaccard'])}; "
                  f"95% of it = {s['full']['target_95pct']:.3f}. Seeds {s['seeds']}."]
    return "\n".join(lines)


def plot(rows: list[dict], s: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (name, e) in enumerate(s["strategies"].items()):
        pi = {int(k): v for k, v in e["per_iteration"].items()}
        its = sorted(pi)
        x = [s["n_labelled"].get(it, s["n_labelled"].get(str(it))) for it in its]
        m = np.array([np.mean(pi[it]) for it in its])
        sd = np.array([np.std(pi[it], ddof=1) if len(pi[it]) > 1 else 0 for it in its])
        axes[0].plot(x, m, "-o", color=f"C{i}", label=name, ms=3)
        axes[0].fill_between(x, m - sd, m + sd, color=f"C{i}", alpha=0.12)
        if "diff_vs_random" in e:
            d = e["diff_vs_random"]
            axes[1].errorbar([i], [d[0]], yerr=[[d[0] - d[1]], [d[2] - d[0]]], fmt="o", color=f"C{i}", capsize=4)
    if s.get("full"):
        axes[0].axhline(np.mean(s["full"]["mean_fg_jaccard"]), color="k", ls="--", lw=1, label="full pool")
        axes[0].axhline(s["full"]["target_95pct"], color="k", ls=":", lw=1, label="95% of full")
    axes[0].set_xlabel("labelled patches")
    axes[0].set_ylabel("test Jaccard (mean over seeds, band = std)")
    axes[0].legend(fontsize=7)
    names = list(s["strategies"])
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set_xticks(range(len(names)), names, rotation=25, ha="right")
    axes[1].set_ylabel("strategy - random, mean over iterations (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="simulation folder (resumable)")
    ap.add_argument("--task", choices=TASKS, default="mito")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--strategies", default=",".join(active_vnc.ALL_STRATEGIES))
    add_simulation_arguments(ap)
    ap.add_argument("--markdown", action="store_true", help="Print the tables of a finished --out and stop.")
    args = ap.parse_args()
    out = Path(args.out)
    if args.markdown:
        doc = json.loads((out / "results.json").read_text())
        print(markdown(doc["summary"], doc["settings"]["iterations"]))
        return 0
    if not (active_vnc.data_dir() / "vnc_stack1.h5").exists():
        return no_data()
    from emseg.active.simulation.loop import run_simulation

    config = build(args)
    t0 = time.perf_counter()

    def progress(event):
        if event["event"] == "row" and event["computed"]:
            r = event["row"]
            print(f"[{event['done']}/{event['total']}] {r['strategy']} seed {r['seed']} it {r['iteration']} "
                  f"n={r['n_labelled']} J={r['mean_fg_jaccard']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    result = run_simulation(config, out / "simulation", runtime=Runtime(device="cpu"), progress=progress)
    campaign = Campaign(out / "results.json", campaign_settings(args, ("strategies",)))
    if not args.no_full:
        total = args.steps_initial + args.iterations * args.steps_finetune
        for seed in (int(s) for s in args.seeds.split(",")):
            campaign.run({"seed": seed, "kind": "full"}, lambda: fully_supervised(config, seed, total))
    full = [r for r in campaign.runs if r.get("kind") == "full"]
    campaign.doc["summary"] = summary(result.rows, full, args.iterations)
    campaign.save()
    plot(result.rows, campaign.doc["summary"], out / "results.png")
    print(markdown(campaign.doc["summary"], args.iterations))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
