"""Do segmentation networks learn meta-structures from noisy labels? (drosophila VNC)

Reproduces the comparison of Luo et al. (AAAI 2022) on real EM: the same U-Net, trained with the
same budget on differently corrupted labels, scored on clean held-out labels. The paper finds
test Dice CL ~ RCL > PCL > RL.

Task: binary mitochondria (label == 1). Mitochondria are compact objects tens of voxels wide,
like the organelles of the paper's binary experiments, so dilation and skeletonisation change
their shape (width) substantially without destroying them. Membranes (label == 2) are already
only a few voxels wide: their skeleton is nearly the label itself and erosion wipes them out,
so PCL would not be a graded perturbation there.

Sections 0-14 train, 15-19 test (written to temporary HDF5 files under /tmp). By default the
stack is down-sampled 4x in-plane (18.4 nm pixels; mitochondria 5-28 pixels wide) and a small
U-Net (depth 3, width 8, 64x64 patches) is trained, so that a one-minute CPU budget per run
already learns mitochondria (Dice ~0.8 with clean labels); `--downsample 1 --patch 128 --depth 4`
is the full-resolution set-up, which needs far longer budgets on a CPU. Labels:
  CL        clean mitochondria labels
  RCL-flip  `--flip 0.45` (45 % of each class flipped to the other class)
  RCL-samp  `--sample 0.1` (10 % of each class kept, the rest -1 = excluded from the loss)
  PCL-dil   `--dilate R --per-section` (R = 1: the paper's 3x3 template)
  PCL-skel  `--skeleton` (per section)
  RL        `--random 0.1` (foreground with probability 0.1, independent of the image)
each made with the blockwise `emseg noise` core (noise_file), with its transition report.

    python benchmarks/noise_vnc.py --seconds 60 --base-width 8      # ~7 min on 2 CPU cores
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import data_dir, machine  # noqa: E402

from emseg.engine.config import config_from_dict  # noqa: E402
from emseg.semantic.evaluation import evaluate_volumes  # noqa: E402
from emseg.io import open_volume  # noqa: E402
from emseg.noise.blockwise import NoiseConfig, noise_file  # noqa: E402
from emseg.semantic.predict import PredictConfig, predict_file  # noqa: E402
from emseg.semantic.train import train  # noqa: E402
from emseg.runtime import Runtime

RUNS = {  # name: (label type, mode, params)
    "CL": ("CL", None, None),
    "RCL-flip": ("RCL", "flip", {"p": 0.45}),
    "RCL-samp": ("RCL", "sample", {"p": 0.1, "unsampled": -1}),
    "PCL-dil": ("PCL", "dilate", {"radius": None, "per_section": True}),
    "PCL-skel": ("PCL", "skeleton", {"per_section": True}),
    "RL": ("RL", "random", {"p": 0.1}),
    # the rest of the seed's conditions (Luo et al.): a harder flip, erosion, a denser random map
    "RCL-flip49": ("RCL", "flip", {"p": 0.49}),
    "PCL-ero": ("PCL", "erode", {"radius": None, "per_section": True}),
    "RL-50": ("RL", "random", {"p": 0.5}),
}
DEFAULT_RUNS = ("CL", "RCL-flip", "RCL-samp", "PCL-dil", "PCL-skel", "RL")


def make_labels(name, mode, params, train_h5: Path, seed: int) -> dict:
    """Write the noisy labels of one run into train_h5 and return its noise report."""
    if mode is None:
        return {"agreement": 1.0, "kept_fraction": [1.0, 1.0], "labelled_fraction": [1.0, 1.0], "seconds": 0.0}
    t = time.perf_counter()
    result = noise_file(NoiseConfig(f"{train_h5}:clean", f"{train_h5}:{name}", mode, params, seed=seed, report=True))
    rep = dict(result.report)
    rep["seconds"] = time.perf_counter() - t
    rep["params"] = result.params
    return rep


def valid_curve(run_dir: Path) -> list[list[float]]:
    """(step, Dice of class 1) of every validation row of a run's metrics.csv (Dice = 2J / (1 + J))."""
    import csv

    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("valid_jaccard_1")]
    return [[int(r["step"]), 2 * float(r["valid_jaccard_1"]) / (1 + float(r["valid_jaccard_1"]))] for r in rows]


def train_and_score(name, label_key, args, tmp: Path) -> dict:
    train_h5, valid_h5, test_h5 = tmp / "train.h5", tmp / "valid.h5", tmp / "test.h5"
    every = getattr(args, "valid_every", 0)  # > 0: validation Dice (sections 12-14) every N steps: the plateau curve
    cfg = config_from_dict({
        "n_classes": 2, "patch_shape": [1, args.patch, args.patch], "batch_size": args.batch_size,
        "steps": args.steps or 10**6, "max_seconds": args.seconds, "log_every": 50, "checkpoint_every": 10**6,
        "valid_every": every or 10**6, "example_ignore_threshold": 1.0,
        "train": [{"raw": f"{train_h5}:raw", "label": f"{train_h5}:{label_key}"}],
        "valid": [{"raw": f"{valid_h5}:raw", "label": f"{valid_h5}:clean"}] if every else [],
        "model": {"depth": args.depth, "base_width": args.base_width, "norm": "batch"},
        "optim": {"lr": args.lr},
    }, source=name)
    out = tmp / name
    result = train(cfg, out, runtime=Runtime(seed=args.seed, device=args.device))
    if result.interrupted:  # a Ctrl-C returns a half-trained network: score nothing from it
        raise SystemExit(f"{name}: training stopped at step {result.final_step}; nothing stored for it")
    pred = tmp / f"{name}_pred.zarr"
    chosen = out / "best.pt" if every and (out / "best.pt").exists() else out / "last.pt"  # chosen on validation
    predict_file(PredictConfig(model=str(chosen), input=f"{test_h5}:raw", output=str(pred),
                               output_type="labels", batch_size=8, overlap=args.overlap,
                               device=args.device))
    with open_volume(str(pred)) as pv, open_volume(f"{test_h5}:clean") as gv:
        scores = evaluate_volumes(pv, gv, n_classes=2)
    losses = np.asarray(result.losses, dtype=float)
    every = max(1, len(losses) // 100)  # about 100 points of the training-loss curve
    curve = [float(losses[i:i + every].mean()) for i in range(0, len(losses), every)]
    return {"steps": result.final_step, "train_s": result.seconds, "loss_curve": curve, "loss_every": every,
            "final_loss": float(np.mean(result.losses[-20:])) if result.losses else None,
            "dice_mito": float(scores.dice[1]), "jaccard_mito": float(scores.jaccard[1]),
            "valid_curve": valid_curve(out) if every else None}


#: Binary targets: mitochondria, or membranes as every dark boundary structure (membrane, synapse, glia).
TARGETS = {"mito": (1,), "membrane": (2, 3, 4)}


def prepare(root: Path, f: int, tmp: Path, target: str = "mito") -> None:
    """A binary target of VNC stack 1 (``TARGETS``), down-sampled ``f`` x in-plane: tmp/train.h5
    (sections 0-11), tmp/valid.h5 (12-14) and tmp/test.h5 (15-19), datasets ``raw`` and ``clean``."""
    with h5py.File(root / "vnc_stack1.h5", "r") as fh:
        raw, label = fh["raw"][:], fh["label"][:]
    mito = np.isin(label, TARGETS[target]).astype(np.uint8)
    if f > 1:
        z, y, x = raw.shape
        y, x = y // f * f, x // f * f
        raw = raw[:, :y, :x].reshape(z, y // f, f, x // f, f).mean(axis=(2, 4)).round().astype(np.uint8)
        mito = (mito[:, :y, :x].reshape(z, y // f, f, x // f, f).mean(axis=(2, 4)) >= 0.5).astype(np.uint8)
        print(f"downsampled {f}x in-plane to {raw.shape}")
    print(f"{target}: {mito[:12].mean():.4f} of training voxels, {mito[15:].mean():.4f} of test voxels")
    for name, sl in (("train.h5", slice(0, 12)), ("valid.h5", slice(12, 15)), ("test.h5", slice(15, 20))):
        with h5py.File(tmp / name, "w") as fh:
            fh.create_dataset("raw", data=raw[sl], chunks=(1, 256, 256))
            fh.create_dataset("clean", data=mito[sl], chunks=(1, 256, 256))


def one_run(name: str, args, tmp: Path) -> dict:
    """Noisy labels of condition ``name`` (seed ``args.seed``), a network trained on them, clean test scores."""
    kind, mode, params = RUNS[name]
    if mode in ("dilate", "erode"):
        params = {**params, "radius": args.dilate_radius}
    key = f"{name}_s{args.seed}"  # one dataset and run folder per condition and seed
    rep = make_labels(key, mode, params, tmp / "train.h5", args.seed)
    row = {"run": name, "type": kind, "mode": mode, "params": rep.get("params", params),
           "label_agreement": rep["agreement"], "kept": rep["kept_fraction"],
           "labelled": rep["labelled_fraction"], "noise_s": round(rep["seconds"], 2)}
    row.update(train_and_score(key, "clean" if mode is None else key, args, tmp))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60, help="training budget per run (config max_seconds)")
    ap.add_argument("--steps", type=int, default=None,
                    help="fixed number of training steps per run (--seconds then only caps it); "
                         "the same steps for every run compare labels fairly on a machine whose load varies")
    ap.add_argument("--base-width", type=int, default=8, help="U-Net base width")
    ap.add_argument("--depth", type=int, default=3, help="U-Net depth")
    ap.add_argument("--patch", type=int, default=64, help="square training patch side (voxels)")
    ap.add_argument("--downsample", type=int, default=4,
                    help="average-pool raw and take the majority label over f x f in-plane "
                         "(f=4: 18.4 nm pixels, so a short CPU budget still trains)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dilate-radius", type=int, default=1,
                    help="PCL dilation radius in voxels (1: the paper's 3x3 template; at full "
                         "resolution, mitochondria are ~4x wider in voxels, so consider 3-4)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the label noise and of training")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest on a small machine shared with other work)")
    ap.add_argument("--overlap", type=float, default=0.125, help="sliding-window overlap of the test prediction")
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file (e.g. under /tmp)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = data_dir()
    if root is None:
        print("drosophila_vnc data not found (set EMSEG_DATA); nothing to do")
        return 0
    names = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
    print("machine:", machine())
    steps = f"{args.steps} steps (capped at {args.seconds:g} s)" if args.steps else f"{args.seconds:g} s"
    print(f"budget: {steps} training per run, base width {args.base_width}, patch {args.patch}, "
          f"batch {args.batch_size}, lr {args.lr}, seed {args.seed}, {args.threads} torch thread(s), "
          f"test overlap {args.overlap}, dilation radius {args.dilate_radius}, depth {args.depth}, "
          f"downsample {args.downsample}")
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="emseg_noise_vnc_") as d:
        tmp = Path(d)
        prepare(root, args.downsample, tmp)
        for name in names:
            row = one_run(name, args, tmp)
            rows.append(row)
            print(json.dumps(row), flush=True)
    total = time.perf_counter() - start
    print(f"\n{'run':<9} {'type':<4} {'label err':>9} {'fg kept':>7} {'labelled':>8} {'steps':>5} "
          f"{'loss':>6} {'test Dice':>9} {'Jaccard':>7}")
    for r in rows:
        err = 1 - r["label_agreement"] if r["label_agreement"] is not None else float("nan")
        print(f"{r['run']:<9} {r['type']:<4} {err:>9.3f} {r['kept'][1]:>7.3f} {r['labelled'][1]:>8.3f} "
              f"{r['steps']:>5} {r['final_loss']:>6.3f} {r['dice_mito']:>9.4f} {r['jaccard_mito']:>7.4f}")
    print("label err: fraction of voxels labelled in both whose noisy label differs from CL (training "
          "sections); fg kept / labelled: of clean mitochondria voxels, still 1 / not -1; "
          f"loss: mean of the last 20 steps. Total {total:.0f} s wall.")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
