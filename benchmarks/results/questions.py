"""Do cheap questions save annotation time on VNC? Dense + presence (+ partial) against dense-only
active learning at equal annotation cost.

Runs the simulation of ``emseg query simulate`` (pool VNC sections 0-14, test 15-19, patches
128^2, the settings of ``active_learning.py``: U-Net width 8, 600 initial + 200 fine-tuning steps,
300 random candidates per seed, 20 random initial patches shared by every arm of a seed) into
``--out``/simulation, which resumes where a killed run stopped, and per seed the fully supervised
reference of ``active_learning.py`` (the whole pool, the loop's total steps).

The arms, every round spending the annotation time of ``--budget-patches`` (20) dense patches
under the cost model (default: dense 0.01 s/voxel, so 163.84 s a patch and 3,276.8 s a round;
partial 0.0025 s/voxel; presence 5 s a question):

``random``, ``entropy``
    dense-only strategies: 20 patches a round, random or by summed entropy (MC-free).
``dense=0.8+presence=0.2``
    a fixed mix: each round spends 80 % of the budget on dense questions (the boxes of largest
    ``sum_k u_k`` below: 16 patches) and 20 % (655 s) on presence questions (131 of them, the
    largest ``(1 - peak_k) u_k``), so it spends the whole budget, like the dense arms.
``dense+presence``, ``dense+partial+presence``
    greedy question arms (:mod:`emseg.active.simulation.ask`): one forward pass over the candidates gives
    each box's per-class mass, uncertain mass ``u_k`` and peak; a dense question is worth
    ``sum_k u_k``, a partial one ``u_k``, a presence one ``(1 - peak_k) u_k`` (partial and
    presence for the foreground classes only). The round is sized by the budget, not by a
    number of patches: questions are taken greedily by value / cost while they fit, at most one
    question per class and box and a dense question only on a box asked nothing else; questions
    of value 0 are never asked, so a round may spend less than the budget (hence the cost grid
    below). The ground truth answers. A "no" to a presence question becomes a lazy cube: labels
    all -1, ``mask_class_labeled`` all 0, ``mask_class_not_present[k] = 1`` (the lazy-label loss
    then penalises predicting ``k`` anywhere in the box); a "yes" teaches nothing by itself (the
    box stays a candidate for a later partial or dense question). A partial answer labels class
    ``k`` only (``mask_class_labeled[k] = 1``, the rest -1). Fine-tuning samples a box in
    proportion to the time spent on it relative to a dense patch (a lone presence answer: 5 /
    163.84 = 0.03), a dense box counting 1.

    What that does here: presence questions are worth more per second than dense ones on almost
    every box, so the first round asks one of nearly every free candidate (mitochondria, seed 0:
    279 presence questions and 1 dense on the 280 free candidates, 1,559 s of the 3,277 s budget;
    with 4 foreground classes the budget binds first). A box answered "no" for every class is
    resolved and never asked again; later rounds ask dense (or partial) questions of the boxes
    answered "yes". A question arm therefore spends less per round than a dense arm, and its
    last round lies below the dense arms' last cost (the table holds its last value there).

Reported (``--markdown``), at matched cost: the costs of the dense arms' iterations (initial +
20 x it patches) form the grid; each arm's curve of test Jaccard and of the false-positive rate
in held-out class-free windows (per class, the fraction of the voxels of test-grid windows
without that class predicted as it; mean over classes) is interpolated linearly onto it per seed,
and held at its last value beyond the arm's last round (an arm that spent less than a grid cost
is scored by what it had). Then, per question arm: the paired difference arm - entropy (per
seed, the mean over grid points 1..N; 95% t-interval over seeds) of Jaccard and of the FP rate,
the FP rate relative to entropy at the last grid point, and the annotation cost (per seed, linear
between rounds) to reach 95% of the fully supervised Jaccard, with the ratio entropy / arm.
Figure (``--out``/results.png): Jaccard and FP rate at the rounds of each arm (mean over seeds; band: std
over seeds at the matched costs), and the paired Jaccard difference to entropy.

    python benchmarks/results/questions.py --out /tmp/ask_mito --task mito --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _campaign import Campaign, ci_cell, mean_std, no_data, paired_interval, pyplot  # noqa: E402

import active_learning  # noqa: E402
from emseg.runtime import Runtime

TASKS = ("mito", "5class")
DENSE_ARMS = ("random", "entropy")
#: A fixed mix (80 % of each round's budget on dense patches by entropy, 20 % on presence questions),
#: which spends the whole budget, and the two greedy value-per-cost arms, which may not.
QUESTION_ARMS = ("dense=0.8+presence=0.2", "dense+presence", "dense+partial+presence")
#: The reference every question arm is paired with (the best dense-only strategy on VNC).
REFERENCE = "entropy"


def build(args):
    """The simulate config: ``active_learning.py``'s, plus the question arms, budget and costs."""
    from emseg.active.questions.types import parse_costs

    ns = argparse.Namespace(**{**vars(args), "strategies": ",".join(args.dense_arms)})
    config = active_learning.build(ns)
    costs = parse_costs(args.costs)
    budget = args.budget_patches * costs.cost("dense", int(np.prod(config.patch)))
    return config.replace(questions=tuple(args.question_arms), budget=float(budget), costs=costs)


# ----------------------------------------------------------------------------- statistics
def _curves(rows: list[dict]) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """Per (arm, seed): cost, Jaccard and FP rate by iteration."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((str(r["strategy"]), int(r["seed"])), []).append(r)
    out = {}
    for key, members in groups.items():
        members.sort(key=lambda r: int(r["iteration"]))
        out[key] = {c: np.array([_float(r.get(f)) for r in members]) for c, f in
                    (("cost", "cost_s"), ("j", "mean_fg_jaccard"), ("fp", "fp_rate"), ("it", "iteration"))}
    return out


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def at_costs(cost: np.ndarray, value: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``value`` (by round, at cumulative ``cost``) at the ``grid`` costs: linear between rounds,
    held at the last round's value beyond it, NaN before the first round.

    Examples
    --------
    >>> at_costs(np.array([1.0, 3.0]), np.array([0.2, 0.6]), np.array([0.5, 2.0, 9.0])).tolist()
    [nan, 0.4, 0.6]
    """
    ok = np.isfinite(cost) & np.isfinite(value)
    cost, value = cost[ok], value[ok]
    if not len(cost):
        return np.full(len(grid), np.nan)
    out = np.interp(grid, cost, value)
    out[grid < cost[0]] = np.nan
    return out


def cost_to_reach(cost: np.ndarray, value: np.ndarray, target: float) -> float | None:
    """The first cost at which ``value`` reaches ``target``, linear between rounds (None: never).

    Examples
    --------
    >>> cost_to_reach(np.array([10.0, 20.0, 30.0]), np.array([0.2, 0.4, 0.8]), 0.6)
    25.0
    """
    for i in range(len(cost)):
        if np.isfinite(value[i]) and value[i] >= target:
            if i == 0 or not np.isfinite(value[i - 1]):
                return float(cost[i])
            c0, c1, v0, v1 = cost[i - 1], cost[i], value[i - 1], value[i]
            return float(c0 + (target - v0) / (v1 - v0) * (c1 - c0))
    return None


def summary(rows: list[dict], full: list[dict], *, initial: int, per_round: int, iterations: int,
            dense_cost: float, reference: str = REFERENCE) -> dict:
    """Everything the table and figure show (plain JSON types)."""
    curves = _curves(rows)
    arms = list(dict.fromkeys(str(r["strategy"]) for r in rows))
    seeds = sorted({int(r["seed"]) for r in rows})
    grid = np.array([(initial + per_round * it) * dense_cost for it in range(iterations + 1)])
    full_j = [float(f["mean_fg_jaccard"]) for f in full]
    target = 0.95 * float(np.mean(full_j)) if full_j else None
    out: dict = {"seeds": seeds, "grid_cost_s": grid.tolist(), "reference": reference, "arms": {},
                 "full": {"mean_fg_jaccard": full_j, "target_95pct": target} if full_j else {}}
    matched: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for (arm, seed), c in curves.items():
        matched[arm, seed] = {"j": at_costs(c["cost"], c["j"], grid), "fp": at_costs(c["cost"], c["fp"], grid)}
    later = slice(1, iterations + 1)
    for arm in arms:
        have = [s for s in seeds if (arm, s) in matched]
        entry: dict = {
            "jaccard": [[_json(matched[arm, s]["j"][g]) for s in have] for g in range(len(grid))],
            "fp_rate": [[_json(matched[arm, s]["fp"][g]) for s in have] for g in range(len(grid))],
            "seeds": have,
            "mean_round_cost_s": _json(np.mean(np.concatenate([np.diff(curves[arm, s]["cost"]) for s in have])))
            if any(len(curves[arm, s]["cost"]) > 1 for s in have) else None,
        }
        its = min(len(curves[arm, s]["cost"]) for s in have) if have else 0
        entry["rounds"] = {key: [_json(np.nanmean([curves[arm, s][col][i] for s in have])) for i in range(its)]
                           for key, col in (("cost_s", "cost"), ("jaccard", "j"), ("fp_rate", "fp"))}
        if target is not None:
            reach = [cost_to_reach(curves[arm, s]["cost"], curves[arm, s]["j"], target) for s in have]
            entry["cost_to_95pct_full_s"] = reach
        if arm != reference:
            pairs = [s for s in seeds if (arm, s) in matched and (reference, s) in matched]
            for metric in ("j", "fp"):
                d = [float(np.nanmean(matched[arm, s][metric][later] - matched[reference, s][metric][later]))
                     for s in pairs]
                d = [v for v in d if math.isfinite(v)]
                entry[f"diff_{metric}_vs_ref"] = paired_interval(d) if d else (float("nan"),) * 3
                last = [float(matched[arm, s][metric][-1] - matched[reference, s][metric][-1]) for s in pairs]
                last = [v for v in last if math.isfinite(v)]
                entry[f"diff_{metric}_last_vs_ref"] = paired_interval(last) if last else (float("nan"),) * 3
            ref_fp = np.nanmean([matched[reference, s]["fp"][-1] for s in pairs]) if pairs else np.nan
            arm_fp = np.nanmean([matched[arm, s]["fp"][-1] for s in pairs]) if pairs else np.nan
            entry["fp_ratio_last_vs_ref"] = _json(arm_fp / ref_fp) if ref_fp and np.isfinite(ref_fp) else None
            entry["n_pairs"] = len(pairs)
        out["arms"][arm] = entry
    if target is not None and reference in out["arms"]:
        ref = out["arms"][reference]["cost_to_95pct_full_s"]
        for arm, entry in out["arms"].items():
            mine = entry["cost_to_95pct_full_s"]
            ok = ref and mine and all(v is not None for v in ref + mine)
            entry["cost_ratio_ref_over_arm"] = float(np.mean(ref) / np.mean(mine)) if ok else None
    return out


def _json(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _hours(seconds) -> str:
    return f"{seconds / 3600:.2f} h"


def markdown(s: dict) -> str:
    grid = s["grid_cost_s"]
    head = " | ".join(f"{_hours(c)}" for c in grid)
    lines = ["Test Jaccard (mean over foreground classes) at matched annotation cost:", "",
             f"| arm | {head} |", "|---|" + "---|" * len(grid)]
    for arm, e in s["arms"].items():
        lines.append(f"| {arm} | " + " | ".join(mean_std(v) for v in e["jaccard"]) + " |")
    lines += ["", "False-positive rate in held-out class-free windows at matched cost:", "",
              f"| arm | {head} |", "|---|" + "---|" * len(grid)]
    for arm, e in s["arms"].items():
        lines.append(f"| {arm} | " + " | ".join(_fp_cell(v) for v in e["fp_rate"]) + " |")
    ref = s["reference"]
    lines += ["", f"Paired against {ref} (per seed, mean over the grid points after the initial one; 95% "
              "t-interval over seeds), and the cost to reach 95% of the fully supervised Jaccard:", "",
              f"| arm | Jaccard - {ref} | at the last point | FP rate - {ref} | FP rate / {ref} at the last point "
              f"| cost to 95% of full | {ref} / arm |", "|---|---|---|---|---|---|---|"]
    for arm, e in s["arms"].items():
        reach = e.get("cost_to_95pct_full_s")
        if reach is None:
            reach_cell = "-"
        elif reach and all(v is not None for v in reach):
            reach_cell = mean_std([v / 3600 for v in reach]) + " h"
        else:
            reach_cell = f"not reached ({sum(v is None for v in reach)}/{len(reach)} seeds)"
        ratio = e.get("cost_ratio_ref_over_arm")
        if arm == ref:
            lines.append(f"| {arm} | - | - | - | - | {reach_cell} | - |")
            continue
        fp_ratio = e.get("fp_ratio_last_vs_ref")
        lines.append(f"| {arm} | {_ci(e['diff_j_vs_ref'])} | {_ci(e['diff_j_last_vs_ref'])} | "
                     f"{_fp_ci(e['diff_fp_vs_ref'])} | {'-' if fp_ratio is None else f'{fp_ratio:.2f}'} | "
                     f"{reach_cell} | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    if s.get("full"):
        lines += ["", f"Fully supervised (whole pool, same total steps): {mean_std(s['full']['mean_fg_jaccard'])}; "
                  f"95% of it = {s['full']['target_95pct']:.3f}. Seeds {s['seeds']}."]
    return "\n".join(lines)


def _fp_cell(values) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return "-"
    return f"{v.mean():.4f} +- {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v.mean():.4f}"


def _finite(d) -> bool:
    return d is not None and d[0] is not None and math.isfinite(d[0])


def _ci(d) -> str:
    """A paired interval as a table cell, as read back from JSON (NaN stored as null)."""
    if not _finite(d):
        return "-"
    return ci_cell(tuple(float("nan") if v is None else v for v in d))


def _fp_ci(d) -> str:
    if not _finite(d):
        return "-"
    lo, hi = (float("nan") if v is None else v for v in d[1:])
    return f"{d[0]:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def plot(s: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    x = np.asarray(s["grid_cost_s"]) / 3600
    for i, (arm, e) in enumerate(s["arms"].items()):
        own = np.asarray([np.nan if v is None else v for v in e["rounds"]["cost_s"]], float) / 3600
        for ax, key in ((axes[0], "jaccard"), (axes[1], "fp_rate")):
            # the rounds where the arm stands (mean over seeds); the band: std over seeds at the matched costs
            y = np.asarray([np.nan if v is None else v for v in e["rounds"][key]], float)
            ax.plot(own, y, "-o", color=f"C{i}", label=arm, ms=3)
            vals = [np.asarray([v for v in g if v is not None], float) for g in e[key]]
            m = np.array([v.mean() if len(v) else np.nan for v in vals])
            sd = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals])
            keep = x <= np.nanmax(own) if np.isfinite(own).any() else np.zeros(len(x), bool)
            ax.fill_between(x[keep], (m - sd)[keep], (m + sd)[keep], color=f"C{i}", alpha=0.12)
        if "diff_j_vs_ref" in e:
            d = e["diff_j_vs_ref"]
            if _finite(d):
                err = [[d[0] - d[1]], [d[2] - d[0]]] if d[1] is not None and math.isfinite(d[1]) else None
                axes[2].errorbar([i], [d[0]], yerr=err, fmt="o", color=f"C{i}", capsize=4)
    if s.get("full"):
        axes[0].axhline(np.mean(s["full"]["mean_fg_jaccard"]), color="k", ls="--", lw=1, label="full pool")
        axes[0].axhline(s["full"]["target_95pct"], color="k", ls=":", lw=1, label="95% of full")
    axes[0].set_xlabel("annotation cost (annotator hours, cost model)")
    axes[0].set_ylabel("test Jaccard (mean over seeds, band = std)")
    axes[1].set_xlabel("annotation cost (annotator hours, cost model)")
    axes[1].set_ylabel("FP rate in class-free test windows")
    axes[0].legend(fontsize=7)
    names = list(s["arms"])
    axes[2].axhline(0, color="k", lw=0.8)
    axes[2].set_xticks(range(len(names)), names, rotation=25, ha="right")
    axes[2].set_ylabel(f"Jaccard, arm - {s['reference']} (95% CI)")
    axes[2].set_title("mean over matched costs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="campaign folder (resumable)")
    ap.add_argument("--task", choices=TASKS, default="mito")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--dense-arms", default=",".join(DENSE_ARMS), help="Dense-only strategies (must include entropy).")
    ap.add_argument("--question-arms", default=",".join(QUESTION_ARMS))
    ap.add_argument("--budget-patches", type=float, default=20.0,
                    help="Annotation budget per round of a question arm, in dense patches of the cost model.")
    ap.add_argument("--costs", default=None, help="Cost model, e.g. dense=0.01,partial=0.0025,presence=5.")
    active_learning.add_simulation_arguments(ap)
    ap.add_argument("--markdown", action="store_true", help="Print the tables of a finished --out and stop.")
    args = ap.parse_args()
    args.dense_arms = [a for a in args.dense_arms.split(",") if a]
    args.question_arms = [a for a in args.question_arms.split(",") if a]
    if REFERENCE not in args.dense_arms:
        raise SystemExit(f"--dense-arms must include {REFERENCE}, the arm the question arms are paired with")
    out = Path(args.out)
    if args.markdown:
        doc = json.loads((out / "results.json").read_text())
        print(markdown(doc["summary"]))
        return 0
    if not (active_learning.active_vnc.data_dir() / "vnc_stack1.h5").exists():
        return no_data()
    from emseg.active.simulation.loop import run_simulation

    config = build(args)
    t0 = time.perf_counter()

    def progress(event):
        if event["event"] == "row" and event["computed"]:
            r = event["row"]
            fp = r.get("fp_rate", float("nan"))
            print(f"[{event['done']}/{event['total']}] {r['strategy']} seed {r['seed']} it {r['iteration']} "
                  f"cost={r['cost_s'] / 3600:.2f} h J={r['mean_fg_jaccard']:.3f} fp={fp:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    result = run_simulation(config, out / "simulation", runtime=Runtime(device="cpu"), progress=progress)
    campaign = Campaign(out / "results.json", active_learning.campaign_settings(args, ("dense_arms", "question_arms")))
    if not args.no_full:
        total = args.steps_initial + args.iterations * args.steps_finetune
        for seed in config.seeds:
            campaign.run({"seed": seed, "kind": "full"},
                         lambda: active_learning.fully_supervised(config, seed, total))
    full = [r for r in campaign.runs if r.get("kind") == "full"]
    dense_cost = config.costs.cost("dense", int(np.prod(config.patch)))
    campaign.doc["summary"] = summary(result.rows, full, initial=config.initial, per_round=config.per_iteration,
                                      iterations=config.iterations, dense_cost=dense_cost)
    campaign.save()
    plot(campaign.doc["summary"], out / "results.png")
    print(markdown(campaign.doc["summary"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
