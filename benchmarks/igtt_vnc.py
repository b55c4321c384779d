"""iGTT on the drosophila VNC stack against thresholding and a supervised U-Net (cf. the seed's Table 3).

Target: membranes as the upstream binary membrane mask, ``label >= 2`` (membrane, synapse,
glia/extracellular: the dark boundary structures, 20.6 % of stack 1), or ``--target mito``
(``label == 1``, 5.4 %). Membranes are the default because they are what an unsupervised binary
split of EM can find: thin, dark, connected structures like the ER network of the seed's Table 3,
whereas mitochondria share their darkness with membranes and no intensity- or structure-driven
unsupervised method can tell the two apart without labels.

Protocol (all methods scored on the same held-out crops, ``--eval-sections``):
  igtt        unsupervised, trained on the evaluation crops' raw only (transductive), with EMS
  igtt-noems  the same without the EMS module (trains on the chosen mask itself)
  otsu        skimage threshold_otsu over the crops, minority-foreground polarity
  adaptive    skimage threshold_local (gaussian) per section, minority-foreground polarity
  supervised  emseg.semantic.train.train on the true binary labels of ``--train-sections`` (other sections),
              same network, patch, batch and number of steps as one iGTT run
iGTT and the supervised U-Net run with ``--seeds`` seeds (mean and std). Dice and accuracy of the
binary output (iGTT: the DMI-chosen mask; supervised: probability >= 0.5); AUC of the foreground
score (iGTT / supervised: probability; thresholding: signed distance to the threshold).

    python benchmarks/igtt_vnc.py --epochs 4 --steps-per-epoch 25 --crop 384 --seeds 3
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import data_dir, dice, machine  # noqa: E402

from emseg.engine.config import config_from_dict  # noqa: E402
from emseg.igtt import IGTTConfig, binary_metrics, run_igtt, threshold_baselines  # noqa: E402
from emseg.igtt.thresholds import candidate_thresholds  # noqa: E402
from emseg.semantic.predict import PredictConfig, predict_file  # noqa: E402
from emseg.semantic.train import train  # noqa: E402
from emseg.runtime import Runtime

TARGETS = {"membrane": (2, 3, 4), "mito": (1,)}


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def load(path: Path, sections: list[int], crop: int, target: str) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as fh:
        h, w = fh["raw"].shape[1:]
        y0, x0 = (h - crop) // 2, (w - crop) // 2
        region = (sections, slice(y0, y0 + crop), slice(x0, x0 + crop))
        raw, label = fh["raw"][region], fh["label"][region]
    return raw, np.isin(label, TARGETS[target]).astype(np.int64)


def threshold_diagnostics(fg_prob: np.ndarray, truth: np.ndarray, n_thresholds: int) -> dict:
    """What the final prediction allows, against what the DMI choice took from it.

    ``oracle_dice``: the best Dice of the K candidate masks (either polarity), i.e. the selection
    step with the labels as judge; ``prior_dice``: the mask thresholded at the true foreground
    fraction (the selection step given only that one number).
    """
    t = truth.astype(bool)
    best = (-1.0, 0.0)
    for thr in candidate_thresholds(fg_prob, n_thresholds):
        for mask in (fg_prob >= thr, fg_prob < thr):
            best = max(best, (dice(mask, t), float(mask.mean())))
    prior = fg_prob >= np.quantile(fg_prob, 1 - t.mean())
    return {"oracle_dice": best[0], "oracle_fg": best[1], "prior_dice": dice(prior, t)}


def bench_igtt(raw, truth, args, tmp: Path, seed: int, use_ems: bool) -> dict:
    cfg = IGTTConfig(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                     patch_shape=(args.patch, args.patch), depth=args.depth, base_width=args.base_width,
                     n_thresholds=args.thresholds, shift_radius=args.shift_radius,
                     sample_fraction=args.sample_fraction, ems=use_ems, predict_window=args.predict_window,
                     baselines=False)
    t0 = time.perf_counter()
    res = run_igtt(raw, cfg, tmp / f"igtt_{'ems' if use_ems else 'noems'}_{seed}", label=truth, foreground=[1],
               runtime=Runtime(device=args.device, seed=seed))
    fg_prob = zarr.open_array(str(res.out_dir / "prediction.zarr"), mode="r")[...][0]
    row = dict(res.scores, seconds=time.perf_counter() - t0, fg_fraction=res.fg_fraction,
               **threshold_diagnostics(fg_prob, truth, args.thresholds),
               epochs=[{k: r.get(k) for k in ("epoch", "fg_fraction", "inverted", "dice", "auc", "mask_iou_prev",
                                          "train_loss", "threshold")} for r in res.rows])
    return row


def run_supervised(train_raw, train_truth, eval_raw, truth, args, tmp: Path, seed: int) -> dict:
    h5 = tmp / "supervised.h5"
    if not h5.exists():
        with h5py.File(h5, "w") as fh:
            fh["raw"], fh["label"], fh["eval"] = train_raw, train_truth.astype(np.uint8), eval_raw
    steps = args.epochs * args.steps_per_epoch
    cfg = config_from_dict({
        "n_classes": 2, "patch_shape": [1, args.patch, args.patch], "batch_size": args.batch_size,
        "steps": steps, "log_every": 10, "checkpoint_every": 10**6, "valid_every": 10**6,
        "train": [{"raw": f"{h5}:raw", "label": f"{h5}:label"}],
        "model": {"depth": args.depth, "base_width": args.base_width, "norm": "batch"}, "optim": {"lr": 1e-3},
    }, source="supervised")
    t0 = time.perf_counter()
    out = tmp / f"supervised_{seed}"
    train(cfg, out, runtime=Runtime(device=args.device, seed=seed))
    pred = tmp / f"supervised_{seed}.zarr"
    predict_file(PredictConfig(model=str(out / "last.pt"), input=f"{h5}:eval", output=str(pred),
                               patch_shape=(1, args.predict_window, args.predict_window), device=args.device))
    prob = zarr.open_array(str(pred), mode="r")[...][1]
    return dict(binary_metrics(prob, prob >= 0.5, truth), seconds=time.perf_counter() - t0,
                fg_fraction=float((prob >= 0.5).mean()))


def summary(rows: list[dict]) -> dict:
    out = {}
    for key in ("dice", "auc", "accuracy", "seconds", "fg_fraction"):
        vals = np.array([r[key] for r in rows], dtype=float)
        out[key] = (float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0)
    out["n"] = len(rows)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=sorted(TARGETS), default="membrane")
    ap.add_argument("--eval-sections", default="16,17")
    ap.add_argument("--train-sections", default="0,1,2,3", help="supervised baseline only")
    ap.add_argument("--crop", type=int, default=384, help="central in-plane crop of every section")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps-per-epoch", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--base-width", type=int, default=16)
    ap.add_argument("--thresholds", type=int, default=20)
    ap.add_argument("--shift-radius", type=int, default=2)
    ap.add_argument("--sample-fraction", type=float, default=0.5)
    ap.add_argument("--predict-window", type=int, default=256)
    ap.add_argument("--adaptive-block", type=int, default=51)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--supervised-seeds", type=int, default=None, help="default: --seeds")
    ap.add_argument("--skip", default="", help="comma list of runs to skip: igtt,igtt-noems,supervised")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json-out", default=None, help="also write the figures to this JSON file (e.g. /tmp/...)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = data_dir()
    if folder is None:
        print("drosophila VNC data not found (set EMSEG_DATA)", file=sys.stderr)
        return 2
    skip = set(args.skip.split(",")) - {""}
    eval_raw, truth = load(folder / "vnc_stack1.h5", ints(args.eval_sections), args.crop, args.target)
    train_raw, train_truth = load(folder / "vnc_stack1.h5", ints(args.train_sections), args.crop, args.target)
    print(f"# {machine()}")
    print(f"# target {args.target} (foreground {100 * truth.mean():.1f} % of the evaluation crops); eval sections "
          f"{args.eval_sections}, crop {args.crop}^2; {args.epochs} epochs x {args.steps_per_epoch} steps, batch "
          f"{args.batch_size}, patch {args.patch}^2, U-Net depth {args.depth} width {args.base_width}; "
          f"K={args.thresholds}, r={args.shift_radius}, sample {args.sample_fraction}", flush=True)
    results: dict[str, list[dict]] = {}
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    for name, b in threshold_baselines(eval_raw, block_size=args.adaptive_block).items():
        results[name] = [dict(binary_metrics(b.score, b.mask, truth), seconds=time.perf_counter() - t0,
                              fg_fraction=b.fg_fraction)]
        t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="igtt_vnc_") as tmpdir:
        tmp = Path(tmpdir)
        for seed in range(args.seeds):
            for name, use_ems in (("igtt", True), ("igtt-noems", False)):
                if name in skip:
                    continue
                row = bench_igtt(eval_raw, truth, args, tmp, seed, use_ems)
                results.setdefault(name, []).append(row)
                print(json.dumps({"run": name, "seed": seed, **{k: (round(v, 4) if isinstance(v, float) else v)
                                                                 for k, v in row.items() if k != "epochs"}}),
                      flush=True)
        if "supervised" not in skip:
            for seed in range(args.supervised_seeds if args.supervised_seeds is not None else args.seeds):
                row = run_supervised(train_raw, train_truth, eval_raw, truth, args, tmp, seed)
                results.setdefault("supervised", []).append(row)
                print(json.dumps({"run": "supervised", "seed": seed,
                                  **{k: round(v, 4) for k, v in row.items()}}), flush=True)
    table = {name: summary(rows) for name, rows in results.items()}
    print(f"\n{'method':<12} {'n':>2}  {'Dice %':>13}  {'AUC %':>13}  {'ACC %':>13}  {'fg %':>6}  {'s/run':>6}")
    for name in ("supervised", "otsu", "adaptive", "igtt", "igtt-noems"):
        if name not in table:
            continue
        s = table[name]
        cells = [f"{100 * s[k][0]:6.2f} ± {100 * s[k][1]:4.2f}" for k in ("dice", "auc", "accuracy")]
        print(f"{name:<12} {s['n']:>2}  {cells[0]:>13}  {cells[1]:>13}  {cells[2]:>13}  "
              f"{100 * s['fg_fraction'][0]:6.1f}  {s['seconds'][0]:6.1f}")
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "machine": machine(), "summary": table,
                                                   "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
