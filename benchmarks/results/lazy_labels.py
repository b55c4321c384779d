"""Lazy labels on VNC under the protocol: a small dense set + "no mitochondria here" cubes, and dense at equal cost.

Split (docs/results.md): dense windows and lazy cubes come from VNC stack 1 sections 0-11 only; the
checkpoint (``best.pt``) is chosen on the mitochondria Jaccard of the validation sections 12-14
(a ``[[valid]]`` cube, ``--valid-every``); the test sections 15-19 are scored once per run.

Arms, per seed (seeds fixed in advance, default 0-4) and dense size n (``--dense-sizes``):

- ``dense``: n random 128^2 windows of sections 0-11 with their mitochondria labels (binary). The
  windows are drawn uniformly (seeded), NOT required to hold mitochondria; the sets are nested: the
  first n of one list per seed.
- ``dense+lazy``: the same n windows, with m lazy cubes ADDED (``--lazy-counts``): 128^2 windows whose
  labels are all -1 with ``info = [[0, 0], [0, 1]]`` (mask_class_not_present for mitochondria). Dense
  windows keep ``prio`` 1 each, each lazy cube gets the lower ``--lazy-prio`` (default 0.25), as
  ELEKTRONN adds lazy cubes at a lower priority; no dense draw is replaced.
- ``dense at equal cost``: n + round(m x lazy_cost) dense windows (the next ones of the same list).

Cost model (an assumption, not a measurement): one dense 128^2 window costs 1 unit (delineating
every mitochondrion in it); one lazy cube costs ``--lazy-cost`` units (default 0.1: a glance and one
click saying "no mitochondria here"). The ratio is taken from the cost model of ``emseg query --costs``
(docs/query.md, itself assumed): a presence answer 5 s against 164 s for a dense 128^2 patch, about
0.03, rounded up to 0.1 to include finding and placing the cube - a ratio against the lazy arm.

Lazy cubes: the absence of mitochondria in a lazy cube is taken from the ground truth, as a
stand-in for the annotator's glance (that claim is the annotation the arm buys). Among those
mitochondria-free windows (a half-overlapping grid of sections 0-11, not overlapping any dense
window of the seed's list), the "monotonic" ones - nothing to delineate - are chosen from the raw
image alone, as a user could: the gradient energy (mean squared Gaussian gradient magnitude,
sigma 2 px, of the raw image) of the window; the ``--monotonic-share`` (default a quarter) with the
lowest energy are the candidates, and m of them are drawn at random (seeded, nested over m). No
other class's ground truth is used.

Metrics, fixed before the runs: the test Jaccard of mitochondria (sections 15-19, ``best.pt``), and
the false positives: predicted mitochondria voxels outside any true mitochondrion on the test
sections, per section and summed. Paired differences (lazy - dense, lazy - equal-cost dense) by seed
with 95% t-intervals.

Runs are keyed by (seed, dense windows, lazy cubes), so an equal-cost arm that coincides with a
larger dense arm is trained once. Stored in ``--out`` as each run ends (resumable);
``--markdown`` prints one table per dense size; a PNG beside the JSON plots both metrics against n.

    python benchmarks/results/lazy_labels.py --out benchmarks/results/lazy_labels_protocol.json
    python benchmarks/results/lazy_labels.py --out benchmarks/results/lazy_labels_protocol.json --markdown
    python benchmarks/results/lazy_labels.py --out /tmp/lazy_quick.json --quick
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _campaign import SPLIT, Campaign, ci_cell, finished, mean_std, merged_runs, no_data, paired_interval, pyplot  # noqa: E402
from _common import data_dir  # noqa: E402

WINDOW = 128
#: Settings of ``--quick``: the whole script end to end in about a minute.
QUICK = {"seeds": "0,1", "dense_sizes": "2,4", "lazy_counts": "20", "steps": 10, "valid_every": 5,
         "base_width": 4, "batch_size": 2, "crop": 256}


# -- the windows ---------------------------------------------------------------------------------

def dense_list(shape: tuple[int, int, int], count: int, seed: int) -> list[tuple[int, int, int]]:
    """``count`` random (z, y, x) corners of WINDOW^2 windows in the training sections (any content)."""
    rng = np.random.default_rng(10_000 + seed)
    z0, z1 = SPLIT["train"]
    return [(int(rng.integers(z0, z1)), int(rng.integers(shape[1] - WINDOW + 1)),
             int(rng.integers(shape[2] - WINDOW + 1))) for _ in range(count)]


def gradient_energy(raw: np.ndarray) -> np.ndarray:
    """Per section, the squared Gaussian gradient magnitude (sigma 2 px) of the raw image."""
    from scipy.ndimage import gaussian_gradient_magnitude

    return np.stack([gaussian_gradient_magnitude(s.astype(np.float32), 2.0) ** 2 for s in raw])


def overlaps(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Whether two WINDOW^2 windows of the same section overlap."""
    return a[0] == b[0] and abs(a[1] - b[1]) < WINDOW and abs(a[2] - b[2]) < WINDOW


def lazy_list(raw: np.ndarray, mito: np.ndarray, dense: list, count: int, seed: int,
              share: float) -> list[tuple[int, int, int]]:
    """``count`` monotonic, mitochondria-free windows of the training sections, drawn at random.

    ``mito`` (the ground truth) only answers "is there a mitochondrion here?" (the annotator's
    glance); monotony is judged on the raw image alone (:func:`gradient_energy`).
    """
    z0, z1 = SPLIT["train"]
    energy = gradient_energy(raw[z0:z1])
    step = WINDOW // 2
    grid = []
    for z in range(z0, z1):
        for y in range(0, raw.shape[1] - WINDOW + 1, step):
            for x in range(0, raw.shape[2] - WINDOW + 1, step):
                box = (z, y, x)
                if mito[z, y:y + WINDOW, x:x + WINDOW].any() or any(overlaps(box, d) for d in dense):
                    continue
                grid.append((float(energy[z - z0, y:y + WINDOW, x:x + WINDOW].mean()), box))
    grid.sort()
    top = [box for _, box in grid[:max(count, int(len(grid) * share))]]
    order = np.random.default_rng(20_000 + seed).permutation(len(top))
    return [top[i] for i in order[:count]]


# -- one run ---------------------------------------------------------------------------------------

def write_volumes(tmp: Path, raw: np.ndarray, mito: np.ndarray, crop: int) -> dict[str, str]:
    """The training, validation and test volumes (binary mitochondria labels) as HDF5 in ``tmp``."""
    import h5py

    paths = {}
    for role, (a, b) in SPLIT.items():
        path = tmp / f"{role}.h5"
        c = crop if role != "train" and crop else raw.shape[1]
        with h5py.File(path, "w") as fh:
            fh["raw"] = raw[a:b, :c, :c]
            fh["mito"] = mito[a:b, :c, :c].astype(np.int16)
        paths[role] = str(path)
    return paths


def lazy_cube(tmp: Path, raw: np.ndarray, box: tuple[int, int, int], i: int) -> dict:
    """A lazy cube file: the raw window, labels -1, and "no mitochondria" (info row 1)."""
    import h5py

    z, y, x = box
    path = tmp / f"lazy{i}.h5"
    if not path.exists():
        with h5py.File(path, "w") as fh:
            fh["raw"] = raw[z:z + 1, y:y + WINDOW, x:x + WINDOW]
            fh["label"] = np.full((1, WINDOW, WINDOW), -1, np.int16)
            fh["info"] = np.array([[0, 0], [0, 1]], np.uint8)
    return {"raw": f"{path}:raw", "label": f"{path}:label"}


def train_cubes(paths: dict, tmp: Path, raw: np.ndarray, dense: list, lazy: list, lazy_prio: float) -> list[dict]:
    """``[[train]]`` entries: dense windows at prio 1, lazy cubes added at ``lazy_prio``."""
    z0 = SPLIT["train"][0]
    cubes = [{"raw": f"{paths['train']}:raw", "label": f"{paths['train']}:mito", "prio": 1.0,
              "region": [[z - z0, z - z0 + 1], [y, y + WINDOW], [x, x + WINDOW]]} for z, y, x in dense]
    return cubes + [dict(lazy_cube(tmp, raw, box, i), prio=lazy_prio) for i, box in enumerate(lazy)]


def score(pred_path: str, test_path: str) -> dict:
    """Test Jaccard of mitochondria and false-positive voxels (predicted outside any true one)."""
    from emseg.io import open_volume
    from emseg.semantic.evaluation import evaluate_volumes

    with open_volume(pred_path) as pv, open_volume(f"{test_path}:mito") as gv:
        jaccard = float(evaluate_volumes(pv, gv, n_classes=2).jaccard[1])
        pred, gt = np.asarray(pv[:]) == 1, np.asarray(gv[:]) == 1
    fp = [int((p & ~g).sum()) for p, g in zip(pred, gt)]
    return {"jaccard": jaccard, "fp_per_section": fp, "fp": int(sum(fp)), "test_voxels": int(gt.size)}


def one_run(args, paths: dict, tmp: Path, raw: np.ndarray, dense: list, lazy: list, seed: int) -> dict:
    """Train on ``dense`` + ``lazy``, keep the best checkpoint on validation, score it on test."""
    from emseg.engine.config import config_from_dict
    from emseg.runtime import Runtime
    from emseg.semantic.predict import PredictConfig, predict_file
    from emseg.semantic.train import train

    name = f"s{seed}_d{len(dense)}_l{len(lazy)}"
    cfg = config_from_dict({
        "n_classes": 2, "patch_shape": [1, WINDOW, WINDOW], "batch_size": args.batch_size,
        "steps": args.steps, "log_every": max(1, args.valid_every), "checkpoint_every": 10**6,
        "valid_every": args.valid_every, "train": train_cubes(paths, tmp, raw, dense, lazy, args.lazy_prio),
        "valid": [{"raw": f"{paths['validation']}:raw", "label": f"{paths['validation']}:mito"}],
        "model": {"depth": 4, "base_width": args.base_width, "norm": "batch"}, "optim": {"lr": 1e-3},
    }, source=name)
    result = train(cfg, tmp / name, runtime=Runtime(seed=seed, device="cpu"))
    finished(result, args.steps, name)
    pred = tmp / f"{name}_pred.zarr"
    predict_file(PredictConfig(model=str(tmp / name / "best.pt"), input=f"{paths['test']}:raw",
                               output=str(pred), output_type="labels", batch_size=8, device="cpu"))
    d = cfg.to_dict()  # emseg's training defaults as this run used them, for the record
    row = {"steps": result.final_step, "train_s": round(result.seconds, 1),
           "valid_best": result.best_metric, "dense_boxes": dense, "lazy_boxes": lazy,
           "training": {"class_weights": d["class_weights"], "dice_weight": d["dice_weight"], "optim": d["optim"],
                        "augment": d["augment"], "precision": result.precision}}
    return dict(row, **score(str(pred), paths["test"]))


# -- the report ------------------------------------------------------------------------------------

def equal_cost(n: int, m: int, lazy_cost: float) -> int:
    """Dense windows costing as much as n windows + m lazy cubes."""
    return n + int(round(m * lazy_cost))


def arms(n: int, counts: list[int], lazy_cost: float) -> list[tuple[str, int, int]]:
    """(arm, dense windows, lazy cubes) reported for dense size n."""
    out = [("dense", n, 0)]
    for m in counts:
        out += [(f"dense+{m} lazy", n, m), (f"dense at equal cost ({m} lazy)", equal_cost(n, m, lazy_cost), 0)]
    return out


def trainings(s: dict) -> list[tuple[int, int]]:
    """The distinct (dense windows, lazy cubes) a seed trains, each once (arms can coincide)."""
    pairs = [(w, m) for n in s["dense_sizes"] for _, w, m in arms(n, s["lazy_counts"], s["lazy_cost"])]
    return list(dict.fromkeys(pairs))


def by_seed(runs: list[dict], windows: int, lazy: int) -> dict[int, dict]:
    return {r["seed"]: r for r in runs if r["windows"] == windows and r["lazy"] == lazy}


def count_cell(values) -> str:
    """Mean +- std of voxel counts, rounded to whole voxels."""
    v = np.asarray(values, dtype=float)
    if not len(v):
        return "-"
    return f"{v.mean():.0f} +- {v.std(ddof=1):.0f}" if len(v) > 1 else f"{v.mean():.0f}"


def table(doc: dict) -> str:
    """One markdown table per dense size, and the paired differences with 95% intervals."""
    s, runs = doc["settings"], doc["runs"]
    lines = [f"Cost: dense window 1, lazy cube {s['lazy_cost']}; lazy prio {s['lazy_prio']} (dense 1). "
             "FP: predicted mitochondria voxels outside true mitochondria, test sections 15-19 summed.", ""]
    for n in s["dense_sizes"]:
        lines += [f"**{n} dense windows**", "", "| arm | windows | lazy | cost | seeds | test Jaccard | FP voxels |",
                  "|---|---|---|---|---|---|---|"]
        for arm, w, m in arms(n, s["lazy_counts"], s["lazy_cost"]):
            rs = list(by_seed(runs, w, m).values())
            lines.append(f"| {arm} | {w} | {m} | {w + m * s['lazy_cost']:g} | {len(rs)} | "
                         f"{mean_std([r['jaccard'] for r in rs])} | {count_cell([r['fp'] for r in rs])} |")
        lines.append("")
        for m in s["lazy_counts"]:
            lazy = by_seed(runs, n, m)
            for other, w in (("dense", n), ("equal-cost dense", equal_cost(n, m, s["lazy_cost"]))):
                base = by_seed(runs, w, 0)
                seeds = sorted(set(lazy) & set(base))
                if not seeds:
                    continue
                dj = paired_interval([lazy[k]["jaccard"] - base[k]["jaccard"] for k in seeds])
                dfp = paired_interval([lazy[k]["fp"] - base[k]["fp"] for k in seeds])
                lines.append(f"- +{m} lazy - {other}: Jaccard {ci_cell(dj)}, FP voxels "
                             f"{dfp[0]:+.0f} [{dfp[1]:+.0f}, {dfp[2]:+.0f}] ({len(seeds)} pairs)")
        lines.append("")
    return "\n".join(lines).rstrip()


def plot(doc: dict, path: Path) -> None:
    """Test Jaccard and false positives against the dense set size, one line per arm (mean +- std)."""
    plt = pyplot()
    s, runs = doc["settings"], doc["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    lines = [("dense", lambda n: (n, 0))]
    for m in s["lazy_counts"]:
        lines += [(f"dense + {m} lazy (prio {s['lazy_prio']})", lambda n, m=m: (n, m)),
                  (f"dense at equal cost ({m} lazy x {s['lazy_cost']})",
                   lambda n, m=m: (equal_cost(n, m, s["lazy_cost"]), 0))]
    for i, (label, key) in enumerate(lines):
        for ax, metric in zip(axes, ("jaccard", "fp")):
            xs, mean, std = [], [], []
            for n in s["dense_sizes"]:
                vals = [r[metric] for r in by_seed(runs, *key(n)).values()]
                if vals:  # arms side by side (log x), so equal values stay visible
                    xs.append(n * 2 ** (0.04 * (i - (len(lines) - 1) / 2)))
                    mean.append(np.mean(vals))
                    std.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
            ax.errorbar(xs, mean, yerr=std, color=f"C{i}", marker="o", ms=4, capsize=3, label=label)
    for ax, ylabel in zip(axes, ("test Jaccard, mitochondria (15-19)", "FP voxels, test sections 15-19")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(s["dense_sizes"], [str(n) for n in s["dense_sizes"]])
        ax.set_xlabel("dense 128^2 windows (sections 0-11)")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# -- main ------------------------------------------------------------------------------------------

def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/lazy_labels_protocol.json")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--dense-sizes", default="4,8,16,32", help="nested dense sets (windows)")
    ap.add_argument("--lazy-counts", default="40", help="lazy cubes added to each dense set")
    ap.add_argument("--lazy-prio", type=float, default=0.25, help="prio of each lazy cube (dense windows: 1)")
    ap.add_argument("--lazy-cost", type=float, default=0.1, help="cost of a lazy cube in dense windows")
    ap.add_argument("--monotonic-share", type=float, default=0.25,
                    help="share of mitochondria-free windows with the lowest gradient energy kept as candidates")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--valid-every", type=int, default=250)
    ap.add_argument("--base-width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=0, help="validation and test: top-left crop (0: whole sections)")
    ap.add_argument("--quick", action="store_true", help="tiny settings, end to end in about a minute")
    ap.add_argument("--markdown", action="store_true", help="print the tables of --out and stop")
    args = ap.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def settings(args) -> dict:
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    return {"dense_sizes": ints(args.dense_sizes), "lazy_counts": ints(args.lazy_counts),
            "lazy_prio": args.lazy_prio, "lazy_cost": args.lazy_cost, "monotonic_share": args.monotonic_share,
            "steps": args.steps, "valid_every": args.valid_every, "base_width": args.base_width,
            "batch_size": args.batch_size, "crop": args.crop, "window": WINDOW, "threads": 1}


def main() -> int:
    args = parse()
    out = Path(args.out)
    if args.markdown:  # several JSONs (comma-separated: seeds run side by side, one per core) merge
        runs, docs = merged_runs(args.out, lambda r: (r["seed"], r["windows"], r["lazy"]))
        doc = dict(docs[0], runs=runs)
        plot(doc, Path(args.out.split(",")[0]).with_suffix(".png"))
        print(table(doc))
        return 0
    vnc = data_dir()
    if vnc is None:
        return no_data()
    import h5py
    import torch

    torch.set_num_threads(1)
    s = settings(args)
    campaign = Campaign(out, s)
    with h5py.File(vnc / "vnc_stack1.h5", "r") as fh:
        raw, mito = fh["raw"][:], fh["label"][:] == 1
    most = max(w for w, _ in trainings(s))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = write_volumes(tmp, raw, mito, s["crop"])
        for seed in (int(v) for v in args.seeds.split(",")):
            dense = dense_list(raw.shape, most, seed)
            lazy = lazy_list(raw, mito, dense, max(s["lazy_counts"]), seed, s["monotonic_share"])
            sub = tmp / f"seed{seed}"
            sub.mkdir(exist_ok=True)
            for w, m in trainings(s):
                run = campaign.run({"seed": seed, "windows": w, "lazy": m},
                                   lambda: one_run(args, paths, sub, raw, dense[:w], lazy[:m], seed))
                print(f"seed {seed}, {w} dense + {m} lazy: {run['steps']} steps, test Jaccard "
                      f"{run['jaccard']:.3f}, FP {run['fp']}", flush=True)
    plot(campaign.doc, out.with_suffix(".png"))
    print(table(campaign.doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
