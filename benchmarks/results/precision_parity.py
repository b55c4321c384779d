"""Does bf16 training cost accuracy? fp32 against precision = "auto" on VNC, at equal steps and equal time.

VNC stack 1, 5 classes, sections 0-14 train, 15-19 test; the 2D U-Net of the fast-path benchmarks
(depth 4, width 16, batch norm), batches of 8 patches of 128 x 128, Adam at a constant 1e-3, the
shipped augmentation. For each seed, one fp32 run of ``--steps`` steps and one ``auto`` run of
``--auto-factor`` times as many (about the same wall time on a CPU with native bf16). Both are
scored on the test sections every ``--every`` steps with **fp32 inference**, so the comparison is
about training only. Then the last auto model predicts the test sections in bf16 and in fp32:
voxel agreement of the two label maps.

Every run is written to ``--out`` as JSON as soon as it is done; a killed campaign continues
where it stopped. ``--plot`` draws the test Jaccard per class against step and against time.

    python benchmarks/results/precision_parity.py --out benchmarks/results/precision_parity.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _campaign import ci_cell, finished, no_data, paired_interval  # noqa: E402
from _common import data_dir, machine  # noqa: E402

from emseg.engine.config import config_from_dict  # noqa: E402
from emseg.io import atomic_write_json  # noqa: E402
from emseg.engine.training import run_training  # noqa: E402
from emseg.semantic.train import SegmentationTask, evaluate_cubes
from emseg.runtime import Runtime

CLASSES = ("background", "mitochondria", "membrane", "synapse", "glia")


class FP32Validation(SegmentationTask):
    """Validation on the test sections with fp32 inference, whatever the training precision."""

    def validate(self, model, device, precision=None):  # fp32 whatever the loop passes
        return evaluate_cubes(model, self.valid_cubes, self.config.patch_shape, self.config.n_classes, device,
                              precision="fp32")


def train_config(vnc: Path, precision: str, steps: int, every: int, patch: int) -> dict:
    stack = f"{vnc}/vnc_stack1.h5"
    return {
        "n_classes": 5, "patch_shape": [1, patch, patch], "batch_size": 8, "steps": steps,
        "valid_every": every, "log_every": every, "checkpoint_every": 10**6, "precision": precision,
        "model": {"depth": 4, "base_width": 16, "norm": "batch"}, "optim": {"lr": 1e-3},
        "train": [{"raw": f"{stack}:raw", "label": f"{stack}:label", "region": [[0, 15]]}],
        "valid": [{"raw": f"{stack}:raw", "label": f"{stack}:label", "region": [[15, 20]]}],
    }


def one_run(vnc: Path, precision: str, steps: int, every: int, patch: int, seed: int) -> dict:
    import csv

    cfg = config_from_dict(train_config(vnc, precision, steps, every, patch))
    task = FP32Validation(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = run_training(task, cfg, tmp, runtime=Runtime(device="cpu", seed=seed))
        finally:
            task.close()
        finished(result, steps, f"{precision} seed {seed}")
        with open(Path(tmp) / "metrics.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("valid_score")]
        curve = [{"step": int(r["step"]), "elapsed_s": float(r["elapsed_s"]), "loss": float(r["loss"]),
                  "jaccard": [float(r[f"valid_jaccard_{c}"]) if r[f"valid_jaccard_{c}"] else None
                              for c in range(5)]} for r in rows]
        # bf16 against fp32 inference only where auto resolved to bf16 (a CPU with native bf16)
        agreement = (inference_agreement(Path(tmp) / "last.pt", vnc)
                     if precision == "auto" and result.precision == "bf16" else None)
    return {"precision": precision, "resolved": result.precision, "seed": seed, "steps": result.final_step,
            "seconds": result.seconds, "patches_per_s": result.patches_per_s, "curve": curve,
            "bf16_vs_fp32_inference_agreement": agreement}


def inference_agreement(ckpt: Path, vnc: Path) -> float:
    from emseg.io import open_volume
    from emseg.semantic.predict import PredictConfig, predict_file

    with tempfile.TemporaryDirectory() as tmp:
        import h5py

        with h5py.File(f"{vnc}/vnc_stack1.h5", "r") as fh, h5py.File(f"{tmp}/test.h5", "w") as out:
            out["raw"] = fh["raw"][15:20]
        maps = []
        for precision in ("fp32", "bf16"):
            predict_file(PredictConfig(model=str(ckpt), input=f"{tmp}/test.h5:raw", output=f"{tmp}/{precision}.zarr",
                                       output_type="labels", device="cpu", precision=precision))
            with open_volume(f"{tmp}/{precision}.zarr") as vol:
                maps.append(vol[...])
    return float((maps[0] == maps[1]).mean())


def at_step(run: dict, step: int) -> list[float] | None:
    for point in run["curve"]:
        if point["step"] == step:
            return point["jaccard"]
    return None


def at_time(run: dict, seconds: float) -> dict:
    """The last validation of ``run`` reached within ``seconds`` of training."""
    best = None
    for point in run["curve"]:
        if point["elapsed_s"] <= seconds * 1.02:
            best = point
    return best


def summarise(runs: list[dict], steps: int, speedup: float = 2.0) -> dict:
    """Paired comparisons at equal steps, at the fp32 run's measured time, and at ``speedup`` times
    the steps (equal time on a quiet machine, where benchmarks/speed.py measured auto at 2.0x fp32's
    steps/s for this network; the campaign's own timings are only as quiet as the machine was)."""
    seeds = sorted({r["seed"] for r in runs})
    by = {(r["precision"], r["seed"]): r for r in runs}
    out = {"equal_steps": {}, "equal_time": {}, "equal_time_quiet": {}, "seeds": seeds, "speedup": speedup}
    pairs = [(by[("fp32", s)], by[("auto", s)]) for s in seeds if ("fp32", s) in by and ("auto", s) in by]
    for c in range(1, 5):
        name = CLASSES[c]
        f = [at_step(a, steps)[c] for a, _ in pairs]
        b = [at_step(b, steps)[c] for _, b in pairs]
        t = [at_time(b, a["seconds"])["jaccard"][c] for a, b in pairs]
        out["equal_steps"][name] = {"fp32": f, "auto": b, "diff": paired_interval([y - x for x, y in zip(f, b)])}
        out["equal_time"][name] = {"fp32": f, "auto": t, "diff": paired_interval([y - x for x, y in zip(f, t)])}
        q = [(at_step(b, int(round(speedup * steps))) or [None] * 5)[c] for _, b in pairs]
        if all(v is not None for v in q):
            out["equal_time_quiet"][name] = {"fp32": f, "auto": q,
                                             "diff": paired_interval([y - x for x, y in zip(f, q)])}
    out["auto_steps_at_fp32_time"] = [at_time(b, a["seconds"])["step"] for a, b in pairs]
    out["agreement"] = [b["bf16_vs_fp32_inference_agreement"] for _, b in pairs]
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7), sharey="col")
    colours = {"fp32": "tab:blue", "auto": "tab:orange"}
    for run in runs:
        for c in range(1, 5):
            steps = [p["step"] for p in run["curve"]]
            secs = [p["elapsed_s"] for p in run["curve"]]
            jac = [p["jaccard"][c] for p in run["curve"]]
            label = f"{run['precision']} ({run['resolved']})" if run["seed"] == runs[0]["seed"] else None
            axes[0, c - 1].plot(steps, jac, color=colours[run["precision"]], alpha=0.7, label=label)
            axes[1, c - 1].plot(secs, jac, color=colours[run["precision"]], alpha=0.7, label=label)
            axes[0, c - 1].set_title(CLASSES[c])
    for ax in axes[0]:
        ax.set_xlabel("training step")
    for ax in axes[1]:
        ax.set_xlabel("training time (s)")
    axes[0, 0].set_ylabel("test Jaccard (fp32 inference)")
    axes[1, 0].set_ylabel("test Jaccard (fp32 inference)")
    axes[0, 0].legend()
    fig.suptitle("VNC 5 classes: fp32 vs auto (bf16 + channels-last), one line per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def markdown(doc: dict) -> str:
    """The tables of docs/results.md from a finished (or partial) campaign."""
    s = summarise(doc["runs"], doc["settings"]["steps"])
    lines = [f"Seeds {s['seeds']}; fp32 runs {doc['settings']['steps']} steps, auto runs "
             f"{doc['settings']['steps'] * doc['settings']['auto_factor']}.", "",
             "| class | fp32 at N steps | auto at N steps | auto - fp32 (95% CI) | auto at fp32's time | "
             "auto - fp32 at equal time (95% CI) | auto at 2N steps | auto - fp32 (95% CI) |",
             "|---|---|---|---|---|---|---|---|"]

    def ms(v):
        v = np.asarray(v, dtype=float)
        return f"{v.mean():.3f} +- {v.std(ddof=1) if len(v) > 1 else float('nan'):.3f}"

    for name in CLASSES[1:]:
        e, t = s["equal_steps"][name], s["equal_time"][name]
        q = s["equal_time_quiet"].get(name)
        lines.append(f"| {name} | {ms(e['fp32'])} | {ms(e['auto'])} | {ci_cell(e['diff'])} | {ms(t['auto'])} | "
                     f"{ci_cell(t['diff'])} | {ms(q['auto']) if q else '-'} | {ci_cell(q['diff']) if q else '-'} |")
    lines += ["", f"auto steps reached in fp32's training time: {s['auto_steps_at_fp32_time']}; "
              f"bf16 vs fp32 inference, voxels with the same label: "
              f"{', '.join('-' if a is None else f'{100 * a:.2f}%' for a in s['agreement'])}"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/precision_parity.json")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--auto-factor", type=int, default=3)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="Print the results tables of --out and stop.")
    args = ap.parse_args()
    out = Path(args.out)
    if args.markdown:
        print(markdown(json.loads(out.read_text())))
        return 0
    doc = json.loads(out.read_text()) if out.exists() else {"runs": []}
    doc.update(command=" ".join(["python"] + sys.argv), machine=machine(),
               settings={k: getattr(args, k) for k in ("steps", "auto_factor", "every", "patch")})
    vnc = data_dir()
    if vnc is None:
        return no_data()
    for seed in (int(s) for s in args.seeds.split(",")):
        for precision, steps in (("fp32", args.steps), ("auto", args.steps * args.auto_factor)):
            if any(r["seed"] == seed and r["precision"] == precision for r in doc["runs"]):
                continue
            t0 = time.perf_counter()
            run = one_run(vnc, precision, steps, args.every, args.patch, seed)
            doc["runs"].append(run)
            doc["summary"] = summarise(doc["runs"], args.steps)
            atomic_write_json(out, doc)
            last = run["curve"][-1]["jaccard"]
            print(f"seed {seed} {precision}: {run['steps']} steps in {time.perf_counter() - t0:.0f} s, "
                  f"test Jaccard {[round(j, 3) if j is not None else None for j in last]}", flush=True)
    doc["summary"] = summarise(doc["runs"], args.steps)
    atomic_write_json(out, doc)
    if args.plot:
        plot(doc["runs"], out.with_suffix(".png"))
    print(json.dumps(doc["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
