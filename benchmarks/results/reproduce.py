"""Run every experiment of docs/results.md in sequence (``make reproduce``; long), or with
``--quick`` each script end to end on tiny settings into a temporary folder (under 10 minutes).

Every experiment is resumable: rerunning continues where a killed run stopped. Full runs write
into benchmarks/results/ (the JSON and PNG files docs/results.md quotes); the active-learning
simulation folders hold checkpoints and stay out of git (``.gitignore``).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: (name, script, full arguments, quick arguments); ``{out}`` is the output folder.
EXPERIMENTS = [
    ("precision parity", "precision_parity.py",
     ["--out", "{out}/precision_parity.json", "--plot"],
     ["--out", "{out}/precision_parity.json", "--seeds", "0", "--steps", "4", "--every", "4",
      "--auto-factor", "1", "--patch", "64", "--plot"]),
    ("new-user defaults, the screen on validation (1 thread)", "defaults_vnc.py",
     ["--stage", "screen", "--out", "{out}/defaults_screen.json", "--seconds", "600", "--seeds", "0,1,2",
      "--arms", "shipped,old-w16,w16-cosine,w16-cosine-weights,w16-cosine-dice"],
     ["--stage", "screen", "--out", "{out}/defaults_screen.json", "--seconds", "5", "--seeds", "0",
      "--arms", "shipped,old"]),
    ("new-user defaults, the target run on test (2 threads)", "defaults_vnc.py",
     ["--stage", "test", "--out", "{out}/defaults_vnc.json", "--seconds", "600", "--seeds", "0,1,2,3,4",
      "--arms", "shipped"],
     ["--stage", "test", "--out", "{out}/defaults_vnc.json", "--seconds", "5", "--seeds", "0,1", "--arms", "shipped"]),
    ("active learning, mitochondria", "active_learning.py",
     ["--out", "{out}/active_mito", "--task", "mito", "--seeds", "0,1,2,3,4"],
     ["--out", "{out}/active_mito", "--task", "mito", "--seeds", "0,1", "--strategies", "random,entropy,bald",
      "--iterations", "1", "--initial", "4", "--per-iteration", "4", "--steps-initial", "4",
      "--steps-finetune", "2", "--candidates", "24", "--mc-samples", "2"]),
    ("active learning, 5 classes", "active_learning.py",
     ["--out", "{out}/active_5class", "--task", "5class", "--seeds", "0,1,2", "--strategies", "random,entropy,bald"],
     ["--out", "{out}/active_5class", "--task", "5class", "--seeds", "0,1", "--strategies", "random,entropy",
      "--iterations", "1", "--initial", "4", "--per-iteration", "4", "--steps-initial", "4",
      "--steps-finetune", "2", "--candidates", "24", "--no-full"]),
    ("cheap questions, mitochondria", "questions.py",
     ["--out", "{out}/questions_mito", "--task", "mito", "--seeds", "0,1,2"],
     ["--out", "{out}/questions_mito", "--task", "mito", "--seeds", "0", "--iterations", "1", "--initial", "4",
      "--per-iteration", "4", "--budget-patches", "4", "--steps-initial", "4", "--steps-finetune", "2",
      "--candidates", "24", "--no-full"]),
    ("cheap questions, 5 classes", "questions.py",
     ["--out", "{out}/questions_5class", "--task", "5class", "--seeds", "0,1,2"],
     ["--out", "{out}/questions_5class", "--task", "5class", "--seeds", "0", "--iterations", "1", "--initial", "4",
      "--per-iteration", "4", "--budget-patches", "4", "--steps-initial", "4", "--steps-finetune", "2",
      "--candidates", "24", "--no-full"]),
    ("noisy labels, meta-structures under the protocol (mitochondria)", "meta_structures.py",
     ["--out", "{out}/meta_structures/mito.json", "--seeds", "0,1,2,3,4", "--steps", "2000",
      "--valid-every", "100", "--downsample", "2"],
     ["--out", "{out}/meta_structures/mito.json", "--seeds", "0,1", "--conditions", "CL,RL", "--steps", "4",
      "--valid-every", "1", "--downsample", "4"]),
    ("active learning, training budget check", "al_budget.py",
     ["--out", "{out}/active_budget", "--seeds", "0,1,2", "--full-steps", "4800", "--full-every", "800"],
     ["--out", "{out}/active_budget", "--seeds", "0", "--finetune-steps", "2,4", "--steps-initial", "4",
      "--full-steps", "4", "--full-every", "2"]),
    ("noisy labels, meta-structures under the protocol (membranes)", "meta_structures.py",
     ["--out", "{out}/meta_structures/membrane.json", "--target", "membrane", "--valid-every", "100",
      "--seeds", "0,1,2,3,4", "--steps", "2000", "--downsample", "2"],
     ["--out", "{out}/meta_structures/membrane.json", "--target", "membrane", "--valid-every", "1",
      "--seeds", "0", "--conditions", "CL,RL", "--steps", "4", "--downsample", "4"]),
    ("iGTT against thresholding and a supervised U-Net", "igtt.py",
     ["--out", "{out}/igtt.json", "--seeds", "0,1,2", "--epochs", "15", "--steps-per-epoch", "50"],
     ["--out", "{out}/igtt.json", "--seeds", "0", "--epochs", "2", "--steps-per-epoch", "2", "--crop", "256",
      "--targets", "membrane"]),
    ("lazy labels under the protocol: dense, dense + lazy cubes, dense at equal cost", "lazy_labels.py",
     ["--out", "{out}/lazy_labels_protocol.json", "--seeds", "0,1,2,3,4", "--dense-sizes", "4,8,16,32",
      "--lazy-counts", "40", "--lazy-prio", "0.25", "--lazy-cost", "0.1", "--steps", "3000", "--valid-every", "250"],
     ["--out", "{out}/lazy_labels_protocol.json", "--quick"]),
    ("label-conditioned segmentation", "lcs_conditioning.py",
     ["--out", "{out}/lcs_vnc.json", "--seeds", "0,1,2", "--steps", "800"],
     ["--out", "{out}/lcs_vnc.json", "--seeds", "0", "--steps", "3", "--test-crop", "256"]),
    ("label-conditioned segmentation, longer", "lcs_conditioning.py",
     ["--out", "{out}/lcs_vnc_3000.json", "--seeds", "0,1,2", "--steps", "3000"],
     ["--out", "{out}/lcs_vnc_3000.json", "--seeds", "0", "--steps", "2", "--test-crop", "256", "--skip-coarse"]),
    ("label-conditioned segmentation under the protocol (5 seeds, merge chosen on validation)", "lcs_protocol.py",
     ["--out", "{out}/lcs_protocol.json"],
     ["--out", "{out}/lcs_protocol.json", "--quick"]),
    ("pretraining, pretext kinds and steps (validation only)", "label_efficiency.py",
     ["--out", "{out}/pretext.json", "--stage", "pretext", "--seeds", "0,1,2", "--kinds", "masked,denoise",
      "--steps-grid", "225,675", "--pretext-budget", "8", "--steps", "600", "--valid-every", "60"],
     ["--out", "{out}/pretext.json", "--stage", "pretext", "--quick"]),
    ("pretraining, how long: 675, 2,900 and 6,400 masked steps (validation only)", "label_efficiency.py",
     ["--out", "{out}/pretext_length.json", "--stage", "pretext", "--seeds", "0,1,2,3,4", "--kinds", "masked",
      "--steps-grid", "675,2900,6400", "--pretext-budget", "8", "--steps", "600", "--valid-every", "60"],
     ["--out", "{out}/pretext_length.json", "--stage", "pretext", "--quick", "--kinds", "masked"]),
    ("pretraining, the encoder's learning rate when fine-tuning (validation only)", "label_efficiency.py",
     ["--out", "{out}/finetune.json", "--stage", "finetune", "--seeds", "0,1,2", "--kind", "masked",
      "--pretrain-steps", "675", "--pretext-budget", "8", "--steps", "600", "--valid-every", "60"],
     ["--out", "{out}/finetune.json", "--stage", "finetune", "--quick"]),
    ("pretraining, label efficiency", "label_efficiency.py",
     ["--out", "{out}/label_efficiency.json", "--stage", "main", "--kind", "masked", "--pretrain-steps", "675",
      "--steps", "600", "--valid-every", "60"],
     ["--out", "{out}/label_efficiency.json", "--quick"]),
    ("pretraining, label efficiency, 600 fine-tuning steps (half of the length-chosen main stage)",
     "label_efficiency.py",
     ["--out", "{out}/label_efficiency_600.json", "--stage", "main", "--kind", "masked", "--pretrain-steps", "675",
      "--steps", "600", "--valid-every", "60", "--budgets", "8,32"],
     ["--out", "{out}/label_efficiency_600.json", "--quick"]),
    ("pretraining, label efficiency, 1,500 fine-tuning steps (the other half; merged with --markdown)",
     "label_efficiency.py",
     ["--out", "{out}/label_efficiency_1500.json", "--stage", "main", "--kind", "masked", "--pretrain-steps", "675",
      "--steps", "1500", "--valid-every", "150", "--budgets", "8,32"],
     ["--out", "{out}/label_efficiency_1500.json", "--quick", "--steps", "4"]),
    ("pretraining, active learning from the pretrained network", "label_efficiency.py",
     ["--out", "{out}/label_efficiency_active.json", "--stage", "active", "--tasks", "mito", "--kind", "masked",
      "--pretrain-steps", "675", "--steps", "600", "--valid-every", "60"],
     ["--out", "{out}/label_efficiency_active.json", "--stage", "active", "--quick"]),
    ("objects: emseg segment against connected components", "instances.py",
     ["--out", "{out}/instances.json"],
     ["--out", "{out}/instances.json", "--quick"]),
]

#: Threads per experiment in full runs (the defaults target is measured on the whole machine).
THREADS = {"new-user defaults, the target run on test (2 threads)": "2"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None, help="Run only experiments whose name contains this text.")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="emseg_reproduce_")) if args.quick else HERE
    failed = []
    for name, script, full, quick in EXPERIMENTS:
        if args.only and args.only not in name:
            continue
        argv = [a.format(out=out) for a in (quick if args.quick else full)]
        env = dict(os.environ, OMP_NUM_THREADS="1" if args.quick else THREADS.get(name, "1"))
        t0 = time.perf_counter()
        print(f"== {name}: {script} {' '.join(argv)}", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / script), *argv], env=env)
        print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    print(f"outputs in {out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
