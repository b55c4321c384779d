"""Does self-supervised pretraining on the unlabelled volumes save labels? Scratch against pretrained on VNC.

Protocol, fixed before any run: VNC stack 1 (20 sections of 1024^2, classes of its README),
sections 0-11 the labelled pool, 12-14 validation, 15-19 test. Pretraining (``emseg pretrain``,
``--kind``, ``--pretrain-minutes`` per seed) sees raw only: stack 2 and stack 1 sections 0-14,
never 15-19. Per seed (0-4) and task (``mito``: mitochondria against the rest; ``5class``: the
five classes), the labelled budgets are 2, 8 and 32 random ``--patch`` x ``--patch`` patches of
the pool (nested: the first n of one random list per seed) and the whole pool. Both arms train
``--steps`` steps with the same settings (depth 4, width 16, batch 8), validate every
``--valid-every`` steps on the validation sections and keep the checkpoint of the best
validation score; ``pretrained`` starts from the seed's pretrained weights (``--init``, the head
re-initialised), ``scratch`` from random ones. The chosen checkpoint is scored once on the test
sections (mean foreground Jaccard).

Results (resumable per run) in ``--out`` (a JSON file), the figure beside it (``.png``: test
Jaccard against labelled patches, log x, one line per arm, 95% t-intervals over seeds) and
``--markdown`` prints the table with the paired difference pretrained - scratch.

``--stage active`` is the active-learning stage: per seed, the loop of ``emseg query simulate``
(pool: sections 0-11, test: 15-19) from ``--al-initial`` random patches, ``--al-per-iteration``
more per round for ``--al-iterations`` rounds, each round fine-tuned ``--al-steps-finetune`` steps
from the previous round's weights, in three arms: entropy and random from the seed's pretrained
network, entropy from scratch. Its reference is the whole pool trained from scratch for
``--reference-steps`` (validation every ``--reference-valid-every``, the best validation checkpoint
scored on test): the labelled patches each arm needs to reach 95% of it are counted per seed.

``--stage pretext`` compares pretext kinds (``--kinds``) and pretraining minutes
(``--minutes-grid``) on the validation sections only (best validation score after fine-tuning
on ``--pretext-budget`` patches, mitochondria), to choose the default kind and duration without
looking at the test sections.

``--validation-only`` runs the main stage without reading the test sections (each run's best
validation score is kept): how long to fine-tune is chosen this way, by running the stage with
another ``--steps`` and comparing with the validation scores of the stage's runs
(``--markdown`` over both JSONs pairs them by task, seed, budget and arm).

Main-stage JSONs of several ``--steps`` (each scoring test) merged by ``--markdown`` give a table
per length and one of the length chosen on validation: per task, budget, arm and seed the run
with the higher best validation score (ties: the shorter), paired by seed as before.

``--stage finetune`` asks, on the validation sections only, whether the pretrained network should
be fine-tuned with a lower encoder learning rate (``optim.encoder_lr_scale``, ``--encoder-lr-scales``;
0 freezes the encoder): per seed, the main stage's pretraining (``--kind``, ``--pretrain-steps``)
fine-tuned on ``--pretext-budget`` patches (mitochondria) at each scale, and the same patches
from scratch; the best validation score of each run is recorded, the test sections are not read.

    python benchmarks/results/label_efficiency.py --out benchmarks/results/label_efficiency.json
    python benchmarks/results/label_efficiency.py --stage pretext --out benchmarks/results/pretext.json
    python benchmarks/results/label_efficiency.py --stage finetune --kind masked --pretrain-steps 675 \
        --steps 600 --valid-every 60 --seeds 0,1,2 --out benchmarks/results/finetune/seeds012.json
    python benchmarks/results/label_efficiency.py --quick --out /tmp/le.json   # tiny, under a minute
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _campaign import Campaign, ci_cell, finished, mean_std, no_data, paired_interval, pyplot  # noqa: E402
from _common import data_dir  # noqa: E402
from emseg.runtime import Runtime

POOL, VALID, TEST = (0, 12), (12, 15), (15, 20)
VNC_SECTION = 1024  # side of a VNC section: the pool holds 12 x 1024^2 / patch^2 patches
PRETRAIN_SECTIONS = (0, 15)
ARMS = ("scratch", "pretrained")
#: The active-learning stage's loops: the start of the initial network and the query strategies that
#: share it (one simulation, so that they share the initial patches and the first network).
AL_LOOPS = (("pretrained", ("entropy", "random")), ("scratch", ("entropy",)))
#: The arms compared, (network, strategy); the last is the baseline of the label ratio.
AL_ARMS = tuple((network, strategy) for network, strategies in AL_LOOPS for strategy in strategies)
AL_BASELINE = ("scratch", "entropy")
#: The share of the reference score an arm must reach (its labelled patches are counted).
AL_REACH = 0.95
N_CLASSES = {"mito": 2, "5class": 5}
QUICK = dict(seeds="0", tasks="mito", budgets="2,all", patch=32, depth=1, base_width=4, batch_size=2, steps=2,
             valid_every=1, pretrain_steps=2, crop=64, kinds="masked,denoise,contrastive", minutes_grid="0.01",
             al_initial=2, al_per_iteration=2, al_iterations=1, al_steps_finetune=1, al_batch_size=2,
             reference_steps=3, reference_valid_every=1)


def pool_patches(args) -> float:
    """Patches of ``--patch``^2 in the labelled pool: sections 0-11 at the shape the data file's
    header gives, or of 1024^2 (VNC's) where the data is absent (``--markdown`` needs no data)."""
    h = w = VNC_SECTION
    root = data_dir()
    if root is not None:
        from emseg.io import open_volume

        with open_volume(f"{root / 'vnc_stack1.h5'}:raw") as r:
            h, w = r.shape[1:]
    return (POOL[1] - POOL[0]) * h * w / args.patch ** 2


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="Results JSON; checkpoints go into a folder beside it.")
    ap.add_argument("--stage", choices=("main", "pretext", "active", "finetune"), default="main")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--tasks", default="mito,5class")
    ap.add_argument("--budgets", default="2,8,32,all", help="Labelled patches per run; 'all' = the whole pool.")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--base-width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1000, help="Fine-tuning (and scratch) steps.")
    ap.add_argument("--valid-every", type=int, default=100)
    ap.add_argument("--kind", default="masked", help="Pretext of the main stage.")
    ap.add_argument("--validation-only", action="store_true",
                    help="--stage main: score the validation sections only (the test sections are not read).")
    ap.add_argument("--pretrain-minutes", type=float, default=30.0)
    ap.add_argument("--pretrain-steps", type=int, default=None, help="Pretrain this many steps instead of minutes.")
    ap.add_argument("--pretrain-root", default=None,
                    help="Folder of the pretraining runs [default: the folder beside --out]. Pretraining by steps "
                         "is deterministic per seed, so campaigns may share one (both fine-tuning lengths of a seed; "
                         "the pretraining-length curve and a main stage pretraining as long): a finished run found "
                         "there is used as it is, and refused if it ran other settings or another precision. Never two "
                         "campaigns of a seed at once.")
    ap.add_argument("--crop", type=int, default=None, help="Score only the central CROP x CROP of each section.")
    ap.add_argument("--kinds", default="masked,denoise", help="--stage pretext: pretext kinds compared.")
    ap.add_argument("--minutes-grid", default="5,15,30", help="--stage pretext: pretraining minutes compared.")
    ap.add_argument("--steps-grid", default=None,
                    help="--stage pretext: pretraining steps compared instead of minutes (a grid that does not "
                         "depend on what else runs on the machine; seconds are recorded per run).")
    ap.add_argument("--pretext-budget", type=int, default=8, help="--stage pretext and finetune: labelled patches.")
    ap.add_argument("--encoder-lr-scales", default="0.1,0,1",
                    help="--stage finetune: encoder learning-rate scales compared (run in this order).")
    ap.add_argument("--al-initial", type=int, default=8, help="--stage active: random patches of round 0.")
    ap.add_argument("--al-per-iteration", type=int, default=10, help="--stage active: patches added per round.")
    ap.add_argument("--al-iterations", type=int, default=11, help="--stage active: rounds after the first.")
    ap.add_argument("--al-steps-finetune", type=int, default=200,
                    help="--stage active: fine-tuning steps per round (round 0 trains --steps).")
    ap.add_argument("--al-batch-size", type=int, default=4, help="--stage active: batch of the loop's training.")
    ap.add_argument("--reference-steps", type=int, default=3000,
                    help="--stage active: training steps of the whole-pool reference.")
    ap.add_argument("--reference-valid-every", type=int, default=150)
    ap.add_argument("--quick", action="store_true",
                    help="Tiny settings (a smoke test of the whole script); options given with it override them.")
    ap.add_argument("--figure", default=None,
                    help="--markdown: where the merged figure goes [default: beside the first JSON].")
    ap.add_argument("--markdown", action="store_true",
                    help="Print the table of a finished --out (several, comma-separated: merged) and stop; the "
                         "pretext stage also draws its figure beside the first.")
    if ap.parse_known_args(argv)[0].quick:  # the tiny settings become the defaults: options given still win
        ap.set_defaults(**QUICK)
    args = ap.parse_args(argv)
    if args.validation_only and args.stage != "main":
        ap.error(f"--validation-only applies to --stage main (--stage {args.stage} chooses what it scores itself)")
    return args


def settings(args) -> dict:
    keys = ("stage", "tasks", "budgets", "patch", "depth", "base_width", "batch_size", "steps", "valid_every", "kind",
            "pretrain_minutes", "pretrain_steps", "crop", "kinds", "minutes_grid", "steps_grid", "pretext_budget")
    if args.stage == "active":  # only this stage's JSON records its keys (the others resume as they were)
        keys += ("al_initial", "al_per_iteration", "al_iterations", "al_steps_finetune", "al_batch_size",
                 "reference_steps", "reference_valid_every")
    if args.stage == "finetune":
        keys += ("encoder_lr_scales",)
    if args.validation_only:
        keys += ("validation_only",)
    return {k: getattr(args, k) for k in keys}


# ----------------------------------------------------------------------------- data
def load_sections(path: Path, sections: tuple[int, int], crop: int | None, task: str):
    """Raw and labels (mapped to the task's classes) of stack-1 sections, optionally centre-cropped."""
    from emseg.io import open_volume

    with open_volume(f"{path}:raw") as r, open_volume(f"{path}:label") as lab:
        h, w = r.shape[1:]
        c = min(crop or h, h, w)
        box = (slice(*sections), slice((h - c) // 2, (h - c) // 2 + c), slice((w - c) // 2, (w - c) // 2 + c))
        raw, label = np.asarray(r[box]), np.asarray(lab[box]).astype(np.int64)
    return raw, (label == 1).astype(np.int64) if task == "mito" else label


def cube(raw, label, n_classes: int, name: str):
    from emseg.data import Cube

    info = np.zeros((2, n_classes), np.uint8)
    info[0] = 1  # every class annotated
    return Cube(raw, label, info, 1.0, name)


def patch_cubes(raw, label, n: int | None, patch: int, seed: int, n_classes: int) -> list:
    """The first ``n`` of a fixed random list of pool patches of this seed (None = the whole pool)."""
    if n is None:
        return [cube(raw, label, n_classes, "pool")]
    rng = np.random.default_rng(1000 + seed)
    z, h, w = raw.shape
    corners = [(int(rng.integers(z)), int(rng.integers(h - patch + 1)), int(rng.integers(w - patch + 1)))
               for _ in range(max(64, n))]
    return [cube(raw[k:k + 1, y:y + patch, x:x + patch], label[k:k + 1, y:y + patch, x:x + patch], n_classes,
                 f"patch{i}") for i, (k, y, x) in enumerate(corners[:n])]


# ----------------------------------------------------------------------------- runs
def pretrain_folder(root: Path, seed: int, kind: str, minutes: float | None, steps: int | None) -> Path:
    """Where the pretraining of ``seed`` lives under ``root`` (``--pretrain-root`` where given)."""
    return root / (f"pretrain_{kind}_{steps}steps_seed{seed}" if steps else f"pretrain_{kind}_{minutes}min_seed{seed}")


def pretrain_run(args, root: Path, seed: int, kind: str, minutes: float | None, steps: int | None = None,
                 folder: Path | None = None) -> dict:
    """Pretrain on stack 2 and stack-1 sections 0-14 (raw only) for ``steps`` (else ``args.pretrain_steps``,
    else ``minutes``); resumes a killed run."""
    steps = steps or args.pretrain_steps
    from emseg.models.checkpoint import load_checkpoint
    from emseg.pretrain import pretrain, pretrain_config_from_dict
    from emseg.runtime.device import resolve_device
    from emseg.runtime.precision import resolve_precision

    stack1 = data_dir() / "vnc_stack1.h5"
    data = [{"raw": f"{stack1}:raw", "region": [list(PRETRAIN_SECTIONS)]}]
    stack2 = data_dir() / "vnc_stack2_unlabeled.h5"
    if stack2.exists():
        data.append({"raw": f"{stack2}:raw"})
    folder = folder or pretrain_folder(pretrain_root(args, root), seed, kind, minutes, steps)
    last = folder / "last.pt"
    # a killed run resumes; with a time budget it continues the budget it had spent (the engine counts it)
    budget = {"steps": steps} if steps else {"max_seconds": 60.0 * minutes}
    config = pretrain_config_from_dict({
        "patch_shape": [1, args.patch, args.patch], "data": data, "pretext": {"kind": kind},
        "model": {"depth": args.depth, "base_width": args.base_width}, "checkpoint_every": 200, **budget})
    if last.exists():  # killed earlier, or another campaign's under a shared --pretrain-root
        state = load_checkpoint(last)
        precision = resolve_precision(config.training.effective_precision, resolve_device("auto")).name
        if state.get("config") != config.training.to_dict() or state.get("precision") != precision:
            raise SystemExit(f"{last} was pretrained with other settings or precision ({state.get('precision')}, "
                             f"here {precision}) than this campaign's: use another --pretrain-root or --out")
    t0 = time.perf_counter()
    result = pretrain(config, folder, runtime=Runtime(device="auto", seed=seed), resume=last.exists())
    finished(result, steps, str(folder))
    # a run found finished (another campaign's, under a shared --pretrain-root) ran no step here:
    # its final loss and seconds are that campaign's
    reused = {"pretrain_reused": True} if result.final_step == result.start_step > 0 else {}
    return {"checkpoint": str(folder / "last.pt"), "pretrain_steps": result.final_step,
            "pretrain_loss": result.losses[-1] if result.losses else None, "seconds": time.perf_counter() - t0,
            "weights_sha256": weights_digest(folder / "last.pt"), **reused}


def pretrain_root(args, root: Path) -> Path:
    """The folder of the pretraining runs: ``--pretrain-root``, else the campaign's own folder."""
    return Path(args.pretrain_root) if args.pretrain_root else root


def weights_digest(checkpoint: Path) -> str:
    """sha256 of a checkpoint's network weights and buffers, in name order (equal weights, equal digest,
    whatever else the file holds)."""
    import hashlib

    from emseg.models.checkpoint import load_checkpoint

    digest = hashlib.sha256()
    for name, tensor in sorted(load_checkpoint(checkpoint)["model"].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def pretrained_weights(args, root: Path, pre: dict) -> str:
    """The checkpoint of the stored pretraining run ``pre``, checked, and made again where it is gone
    (a campaign continued on another machine keeps its JSON, not its checkpoints).

    Pretraining is deterministic for a seed (each batch depends on the seed and step only), so
    weights made again must have the recorded digest (rows that recorded none: end at the recorded
    loss). They are made in a folder of their own and moved into place only when they do; otherwise
    the pretrained runs already stored came from other weights and the campaign stops rather than
    mix them. A checkpoint that is there is checked against the recorded digest too.
    """
    import shutil

    stored = Path(pre["checkpoint"])
    here = stored if stored.exists() else pretrain_folder(pretrain_root(args, root), pre["seed"], pre["pretext"], None,
                                                           pre.get("pretrain_steps")) / "last.pt"
    if here.exists():
        if pre.get("weights_sha256") and weights_digest(here) != pre["weights_sha256"]:
            raise SystemExit(f"{here} does not hold the weights the stored runs of seed {pre['seed']} started from "
                             "(another sha256); use another --out")
        return str(here)
    if not args.pretrain_steps or (pre.get("weights_sha256") is None and pre.get("pretrain_loss") is None):
        raise SystemExit(f"{stored} is gone and cannot be made again and checked (a pretraining by minutes, or "
                         "one that recorded neither its weights' digest nor its final loss); use another --out")
    print(f"  pretraining of seed {pre['seed']} made again ({stored} is gone)", flush=True)
    remake = here.parent.with_name(here.parent.name + ".remake")
    shutil.rmtree(remake, ignore_errors=True)  # a remake killed earlier starts over
    again = pretrain_run(args, root, pre["seed"], pre["pretext"], None, int(pre["pretrain_steps"]), folder=remake)
    key = "weights_sha256" if pre.get("weights_sha256") else "pretrain_loss"
    if again[key] != pre[key]:
        shutil.rmtree(remake)
        raise SystemExit(f"the pretraining of seed {pre['seed']} made again has {key} {again[key]!r}, not the "
                         f"recorded {pre[key]!r}: its pretrained runs would mix two networks; use another --out")
    shutil.rmtree(here.parent, ignore_errors=True)
    remake.rename(here.parent)
    return str(here)


def score_text(value: float | None) -> str:
    """A best validation score for the log (None: no validation gave a finite score)."""
    return "none" if value is None else f"{value:.3f}"


def train_run(args, cubes, valid, test, n_classes: int, seed: int, init: str | None, steps: int | None = None,
              valid_every: int | None = None, encoder_lr_scale: float = 1.0) -> dict:
    """Train (or fine-tune from ``init``) ``steps`` (default ``--steps``), keep the best validation
    checkpoint, score it on ``test`` (None: validation only)."""
    from emseg.engine.config import config_from_dict
    from emseg.engine.training import run_training
    from emseg.semantic.train import SegmentationTask, evaluate_cubes
    from emseg.models.checkpoint import load_model

    config = config_from_dict({
        "n_classes": n_classes, "patch_shape": [1, args.patch, args.patch], "batch_size": args.batch_size,
        "steps": steps or args.steps, "valid_every": valid_every or args.valid_every, "checkpoint_every": 10**9,
        "train": [{"raw": "in-memory.h5:raw"}], "model": {"depth": args.depth, "base_width": args.base_width},
        **({"init": init} if init else {}),
        **({"optim": {"encoder_lr_scale": encoder_lr_scale}} if encoder_lr_scale != 1 else {})})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_training(SegmentationTask(config, cubes=cubes, valid_cubes=[valid]), config, tmp,
                              runtime=Runtime(device="auto", seed=seed))
        finished(result, config.steps, f"{len(cubes)} patches, seed {seed}")
        out = {"valid_best": result.best_metric, "steps": result.final_step,
               "valid_curve": valid_curve(Path(tmp) / "metrics.csv")}
        if test is not None:
            best = Path(tmp) / "best.pt"  # absent when no validation score was finite: the last weights
            model, _ = load_model(best if best.exists() else Path(tmp) / "last.pt", "cpu")
            scores = evaluate_cubes(model, [test], config.patch_shape, n_classes, "cpu")
            out["jaccard"] = [scores[f"valid_jaccard_{c}"] for c in range(n_classes)]
            out["test_score"] = scores["valid_score"]
    return dict(out, seconds=time.perf_counter() - t0)


def valid_curve(metrics_csv: Path) -> list[list[float]]:
    """``[step, validation score]`` of every validation of a run (its ``metrics.csv``): whether the
    run reached its plateau on validation is read from it."""
    with open(metrics_csv, newline="") as fh:
        return [[int(r["step"]), float(r["valid_score"])] for r in csv.DictReader(fh) if r.get("valid_score")]


def budgets(args) -> list[int | None]:
    return [None if b == "all" else int(b) for b in args.budgets.split(",")]


def seed_weights(args, campaign: Campaign, root: Path, seed: int):
    """A function giving the checkpoint of ``seed``'s pretraining (run, or its stored row checked and
    remade, at the first call only: a seed whose pretrained runs are all stored needs no weights)."""
    path: list[str] = []

    def weights() -> str:
        if not path:
            pre = campaign.run({"kind": "pretrain", "pretext": args.kind, "seed": seed},
                               lambda: pretrain_run(args, root, seed, args.kind, args.pretrain_minutes))
            path.append(pretrained_weights(args, root, pre))
        return path[0]
    return weights


def tasks_and_seeds(args, campaign: Campaign, root: Path):
    """Per task and seed: the task's class count, pool (raw, labels), validation and test cubes, the
    seed and its pretrained weights (:func:`seed_weights`)."""
    stack1 = data_dir() / "vnc_stack1.h5"
    for task in args.tasks.split(","):
        k = N_CLASSES[task]
        pool = load_sections(stack1, POOL, None, task)
        valid = cube(*load_sections(stack1, VALID, args.crop, task), k, "valid")
        test = cube(*load_sections(stack1, TEST, args.crop, task), k, "test")
        for seed in (int(s) for s in args.seeds.split(",")):
            yield task, k, pool, valid, test, seed, seed_weights(args, campaign, root, seed)


def run_main(args, campaign: Campaign, root: Path) -> None:
    for task, k, pool, valid, test, seed, weights in tasks_and_seeds(args, campaign, root):
        for n in budgets(args):
            cubes = patch_cubes(*pool, n, args.patch, seed, k)
            for arm in ARMS:
                row = campaign.run({"kind": "train", "task": task, "seed": seed, "budget": n or "all", "arm": arm},
                                   lambda: train_run(args, cubes, valid, None if args.validation_only else test, k,
                                                     seed, weights() if arm == "pretrained" else None))
                score = (f"valid {score_text(row['valid_best'])}" if args.validation_only
                         else f"test {row['test_score']:.3f}")
                print(f"  {task} seed {seed} n={n or 'all'} {arm}: {score} ({row['steps']} steps)", flush=True)


def active_config(args, task: str, seed: int, strategies: tuple[str, ...], init: str | None):
    """The simulated loop of one seed and initial network (``emseg query simulate``'s configuration)."""
    from emseg.active.simulation.config import simulate_config_from_dict
    from emseg.io import open_volume

    stack1 = data_dir() / "vnc_stack1.h5"
    with open_volume(f"{stack1}:raw") as vol:
        h, w = vol.shape[1:]
    c = min(args.crop or h, h, w)  # the central crop of load_sections
    crop = [] if not args.crop else [[(h - c) // 2, (h - c) // 2 + c], [(w - c) // 2, (w - c) // 2 + c]]
    data = {"n_classes": N_CLASSES[task], "patch": [1, args.patch, args.patch], "seeds": [seed],
            "strategies": list(strategies), "initial": args.al_initial, "per_iteration": args.al_per_iteration,
            "iterations": args.al_iterations, "steps_initial": args.steps, "steps_finetune": args.al_steps_finetune,
            "batch_size": args.al_batch_size, "score_batch_size": 16, "finetune": "previous",
            "pool": {"raw": f"{stack1}:raw", "label": f"{stack1}:label", "region": [list(POOL)]},
            "test": {"raw": f"{stack1}:raw", "label": f"{stack1}:label", "region": [list(TEST)] + crop},
            "model": {"depth": args.depth, "base_width": args.base_width}}
    if task == "mito":
        data["label_map"] = [0, 1, 0, 0, 0]
    if init:
        data["init"] = init
    return simulate_config_from_dict(data, source="label_efficiency")


def active_run(args, root: Path, task: str, seed: int, network: str, strategies: tuple[str, ...],
               init: str | None) -> dict:
    """One loop for one seed (resumable in its folder): per strategy, the labelled patches and test
    score of every round."""
    from emseg.active.simulation.loop import run_simulation

    t0 = time.perf_counter()
    result = run_simulation(active_config(args, task, seed, strategies, init),
                            root / f"active_{task}_{network}_seed{seed}", runtime=Runtime(device="auto"), plot=False)
    out: dict = {"strategies": {}, "seconds": time.perf_counter() - t0}
    for strategy in strategies:
        rounds = sorted((r for r in result.rows if r["strategy"] == strategy), key=lambda r: int(r["iteration"]))
        out["strategies"][strategy] = {"n_labelled": [int(r["n_labelled"]) for r in rounds],
                                       "test_scores": [float(r["mean_fg_jaccard"]) for r in rounds]}
    return out


def run_active(args, campaign: Campaign, root: Path) -> None:
    for task, k, pool, valid, test, seed, weights in tasks_and_seeds(args, campaign, root):
        ref = campaign.run({"kind": "reference", "task": task, "seed": seed},
                           lambda: train_run(args, patch_cubes(*pool, None, args.patch, seed, k), valid, test, k,
                                             seed, None, args.reference_steps, args.reference_valid_every))
        print(f"  {task} seed {seed} whole-pool reference: test {ref['test_score']:.3f}", flush=True)
        for network, strategies in AL_LOOPS:
            key = {"kind": "active", "task": task, "seed": seed, "network": network}
            row = campaign.run(key, lambda: active_run(args, root, task, seed, network, strategies,
                                                       weights() if network == "pretrained" else None))
            for strategy, curve in row["strategies"].items():
                print(f"  {task} seed {seed} {network} {strategy}: test " + " ".join(
                    f"{n}:{j:.3f}" for n, j in zip(curve["n_labelled"], curve["test_scores"])), flush=True)


def screen_seeds(args):
    """Per seed of the validation-only stages: the seed, its ``--pretext-budget`` random patches of
    the pool and the validation cube (mitochondria)."""
    stack1 = data_dir() / "vnc_stack1.h5"
    pool = load_sections(stack1, POOL, None, "mito")
    valid = cube(*load_sections(stack1, VALID, args.crop, "mito"), 2, "valid")
    for seed in (int(s) for s in args.seeds.split(",")):
        yield seed, patch_cubes(*pool, args.pretext_budget, args.patch, seed, 2), valid


def run_pretext(args, campaign: Campaign, root: Path) -> None:
    """Kinds x minutes, scored on the validation sections only (mitochondria, ``--pretext-budget`` patches)."""
    for seed, cubes, valid in screen_seeds(args):
        campaign.run({"kind": "pretext", "pretext": "none", "minutes": 0, "seed": seed},
                     lambda: train_run(args, cubes, valid, None, 2, seed, None))
        for kind in args.kinds.split(","):
            grid = ([(None, int(n)) for n in args.steps_grid.split(",")] if args.steps_grid
                    else [(float(m), None) for m in args.minutes_grid.split(",")])
            for minutes, steps in grid:
                def one():
                    pre = pretrain_run(args, root, seed, kind, minutes, steps)
                    return dict(train_run(args, cubes, valid, None, 2, seed, pre["checkpoint"]),
                                pretrain_steps=pre["pretrain_steps"], pretrain_loss=pre["pretrain_loss"],
                                pretrain_seconds=pre["seconds"], weights_sha256=pre["weights_sha256"],
                                **{k: v for k, v in pre.items() if k == "pretrain_reused"})
                key = {"minutes": minutes} if steps is None else {"steps": steps}
                row = campaign.run({"kind": "pretext", "pretext": kind, **key, "seed": seed}, one)
                print(f"  {kind} {key} seed {seed}: valid {row['valid_best']}", flush=True)


def run_finetune(args, campaign: Campaign, root: Path) -> None:
    """Encoder learning-rate scales of the fine-tuning, and scratch, on the validation sections only."""
    for seed, cubes, valid in screen_seeds(args):
        weights = seed_weights(args, campaign, root, seed)
        for scale in (float(s) for s in args.encoder_lr_scales.split(",")):
            row = campaign.run({"kind": "finetune", "encoder_lr_scale": scale, "seed": seed},
                               lambda: train_run(args, cubes, valid, None, 2, seed, weights(), encoder_lr_scale=scale))
            print(f"  seed {seed} encoder_lr_scale {scale:g}: valid {score_text(row['valid_best'])}", flush=True)
        row = campaign.run({"kind": "finetune", "encoder_lr_scale": None, "seed": seed},
                           lambda: train_run(args, cubes, valid, None, 2, seed, None))
        print(f"  seed {seed} scratch: valid {score_text(row['valid_best'])}", flush=True)


# ----------------------------------------------------------------------------- report
def budget_key(budget) -> tuple:
    """Budgets in table order: numbers ascending, the whole pool ("all") last."""
    return budget == "all", budget if budget != "all" else 0


def group_key(group: tuple) -> tuple:
    """(task, budget, arm) groups in table order: by task, budget (:func:`budget_key`), arm."""
    return group[0], *budget_key(group[1]), group[2]


def budget_x(budget, pool_patches: float) -> float:
    """Where a budget sits on a figure's labelled-patches axis (the whole pool at its patch count)."""
    return pool_patches if budget == "all" else budget


def length_table(runs: list[dict]) -> list[str]:
    """Best validation score of the main stage's runs by fine-tuning steps (the runs of several
    ``--steps``), and per task, budget and arm the paired difference longest - shortest."""
    trains = [r for r in runs if r.get("kind") == "train" and r.get("valid_best") is not None]
    lengths = sorted({r["steps"] for r in trains})
    if len(lengths) < 2:
        return []
    short, long = lengths[0], lengths[-1]
    lines = ["", "| task | labelled patches | arm | " + " | ".join(f"{n} steps" for n in lengths)
             + f" | {long} - {short} steps (paired, 95% CI) |", "|---|---|---|" + "---|" * (len(lengths) + 1)]
    groups = dict.fromkeys((r["task"], r["budget"], r["arm"]) for r in trains)
    for task, budget, arm in sorted(groups, key=group_key):
        by = {n: {r["seed"]: r["valid_best"] for r in trains
                  if (r["task"], r["budget"], r["arm"], r["steps"]) == (task, budget, arm, n)} for n in lengths}
        seeds = sorted(set(by[short]) & set(by[long]))
        diff = ci_cell(paired_interval([by[long][s] - by[short][s] for s in seeds])) if seeds else "-"
        lines.append(f"| {task} | {budget} | {arm} | " + " | ".join(mean_std(by[n].values()) for n in lengths)
                     + f" | {diff} |")
    return lines


def _curve(runs, task, arm):
    out = {}
    for r in runs:
        if r.get("kind") == "train" and r["task"] == task and r["arm"] == arm and r.get("test_score") is not None:
            out.setdefault(r["budget"], {})[r["seed"]] = r["test_score"]
    return out


def selected_runs(runs: list[dict]) -> list[dict]:
    """Per task, budget, arm and seed, the one run of several fine-tuning lengths (``--steps``) with the
    highest best validation score; a tie goes to the shorter run. What a user with both lengths
    would keep, chosen without the test sections; its test score is the arm's score. A group that
    did not run every length had no choice and is left out; a length stored twice is refused."""
    trains = [r for r in runs if r.get("kind") == "train" and r.get("test_score") is not None]
    lengths = {r["steps"] for r in trains}
    groups: dict[tuple, list[dict]] = {}
    for r in trains:
        groups.setdefault((r["task"], r["budget"], r["arm"], r["seed"]), []).append(r)
    best = []
    for (task, budget, arm, seed), mine in groups.items():
        steps = [r["steps"] for r in mine]
        if len(set(steps)) != len(steps):
            raise SystemExit(f"{task}, {budget} patches, {arm}, seed {seed}: a fine-tuning length stored twice; "
                             "merge campaigns of other seeds or lengths")
        scored = [r for r in mine if r.get("valid_best") is not None]  # no finite validation: not choosable
        if set(steps) == lengths and scored:
            best.append(max(scored, key=lambda r: (r["valid_best"], -r["steps"])))
    return best


def length_sets(runs: list[dict]) -> tuple[list[tuple[int, list[dict]]], list[dict]]:
    """The main stage's test-scored runs by fine-tuning length (``(steps, runs)``, shortest first) and,
    with several lengths, the runs chosen on validation (:func:`selected_runs`; else empty)."""
    trains = [r for r in runs if r.get("kind") == "train" and r.get("test_score") is not None]
    lengths = sorted({r["steps"] for r in trains})
    per_length = [(n, [r for r in trains if r["steps"] == n]) for n in lengths]
    return per_length, (selected_runs(trains) if len(lengths) > 1 else [])


def _test_rows(trains: list[dict], what: str) -> list[str]:
    """Rows of the test table: per task and budget, both arms' mean +- sd and pretrained - scratch
    paired by seed; ``what`` is the fine-tuning column (the length, or the lengths chosen)."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in trains):
        scratch, pre = _curve(trains, task, "scratch"), _curve(trains, task, "pretrained")
        for budget in sorted(scratch, key=budget_key):
            seeds = sorted(set(scratch[budget]) & set(pre.get(budget, {})))
            diff = paired_interval([pre[budget][s] - scratch[budget][s] for s in seeds])
            cells = [task, budget] + ([what] if what else [])
            lines.append("| " + " | ".join(map(str, cells)) + f" | {mean_std(scratch[budget].values())} | "
                         f"{mean_std(pre.get(budget, {}).values())} | {ci_cell(diff)} |")
    return lines


def chosen_lengths(chosen: list[dict]) -> list[str]:
    """Per task, budget and arm, the fine-tuning length the validation chose for each seed."""
    lines = ["", "| task | labelled patches | arm | steps chosen on validation, by seed |", "|---|---|---|---|"]
    for task, budget, arm in sorted(dict.fromkeys((r["task"], r["budget"], r["arm"]) for r in chosen),
                                    key=group_key):
        mine = sorted((r["seed"], r["steps"]) for r in chosen
                      if (r["task"], r["budget"], r["arm"]) == (task, budget, arm))
        lines.append(f"| {task} | {budget} | {arm} | " + ", ".join(f"seed {s}: {n}" for s, n in mine) + " |")
    return lines


#: The scratch arm of the pretext stage in :func:`pretext_scores`.
SCRATCH = ("none", "", 0)


def pretext_scores(runs: list[dict]) -> dict[tuple[str, str, float], dict[int, float]]:
    """Best validation score of the pretext stage's runs per arm (pretext kind, unit ``"steps"`` or
    ``"min"``, pretraining length; scratch is :data:`SCRATCH`) and seed. A seed's grid may be split
    over several campaigns (one per core), each with its own scratch run: a run stored twice counts
    once, and the copies must agree (the same seed on the same data trains to the same network)."""
    scores: dict[tuple[str, str, float], dict[int, float]] = {}
    for r in runs:
        if r.get("kind") != "pretext" or r.get("valid_best") is None:
            continue
        # a run by minutes records them (its "steps" are the fine-tuning's); a run by steps only those
        arm = SCRATCH if r["pretext"] == "none" else (
            (r["pretext"], "min", r["minutes"]) if "minutes" in r else (r["pretext"], "steps", r["steps"]))
        seen = scores.setdefault(arm, {})
        if r["seed"] in seen and not np.isclose(seen[r["seed"]], r["valid_best"], rtol=0, atol=1e-9):
            raise SystemExit(f"pretext arm {arm_text(arm)}, seed {r['seed']}: stored twice with other scores "
                             f"({seen[r['seed']]:.4f}, {r['valid_best']:.4f}); merge campaigns of one machine")
        seen[r["seed"]] = r["valid_best"]
    return scores


def arm_text(arm: tuple[str, str, float]) -> str:
    return "scratch" if arm == SCRATCH else f"{arm[0]}, {arm[2]:g} {arm[1]}"


def pretext_table(runs: list[dict]) -> list[str]:
    """The pretext stage: per arm the best validation score (mean, per seed) and the paired differences
    against scratch and against the shortest pretraining of the same kind and unit."""
    scores = pretext_scores(runs)
    if not scores:
        return []
    seeds = sorted({s for per in scores.values() for s in per})
    scratch = scores.get(SCRATCH, {})
    lines = ["", "| arm (pretraining) | best validation score (mito) | seeds " + " / ".join(map(str, seeds))
             + " | - scratch (paired, 95% CI) | - shortest of the kind (paired, 95% CI) |", "|---|---|---|---|---|"]

    def diff(mine: dict, base: dict) -> str:
        pairs = [mine[s] - base[s] for s in seeds if s in mine and s in base]
        return ci_cell(paired_interval(pairs)) if mine is not base and pairs else "-"

    for arm in sorted(scores, key=lambda a: (a != SCRATCH, a)):
        mine = scores[arm]
        shortest = scores[min(a for a in scores if a[:2] == arm[:2])]
        lines.append(f"| {arm_text(arm)} | {mean_std(mine.values())} | "
                     + " / ".join(f"{mine[s]:.3f}" if s in mine else "-" for s in seeds)
                     + f" | {diff(mine, scratch)} | {diff(mine, shortest)} |")
    return lines


def table(runs: list[dict]) -> str:
    lines = []
    per_length, chosen = length_sets(runs)
    if len(per_length) == 1:
        lines += ["| task | labelled patches | scratch | pretrained | pretrained - scratch (paired, 95% CI) |",
                  "|---|---|---|---|---|"] + _test_rows(per_length[0][1], "")
    elif per_length:  # runs of several lengths: each length alone, then the length chosen on validation
        lines += ["| task | labelled patches | fine-tuning steps | scratch | pretrained "
                  "| pretrained - scratch (paired, 95% CI) |", "|---|---|---|---|---|---|"]
        for n, rows in per_length:
            lines += _test_rows(rows, str(n))
        if chosen:
            lines += _test_rows(chosen, "chosen on validation") + chosen_lengths(chosen)
    lines += length_table(runs)
    lines += pretext_table(runs)
    finetune = [r for r in runs if r.get("kind") == "finetune" and r["valid_best"] is not None]
    if finetune:
        base = {r["seed"]: r["valid_best"] for r in finetune if r["encoder_lr_scale"] == 1}
        seeds = sorted({r["seed"] for r in finetune})
        lines += ["", "| fine-tuning | best validation score (mito), mean | seeds " + " / ".join(map(str, seeds))
                  + " | - encoder x 1 (paired, 95% CI) |", "|---|---|---|---|"]
        for arm in finetune_arms(finetune):
            mine = {r["seed"]: r["valid_best"] for r in finetune if finetune_arm(r) == arm}
            diff = [mine[s] - base[s] for s in seeds if s in mine and s in base]
            cell = "-" if arm.endswith("x 1") or not diff else ci_cell(paired_interval(diff))
            lines.append(f"| {arm} | {mean_std(mine.values())} | "
                         + " / ".join(f"{mine[s]:.3f}" if s in mine else "-" for s in seeds) + f" | {cell} |")
    return "\n".join(lines)


def reach(n_labelled: list[int], scores: list[float], reference: float) -> int | None:
    """The fewest labelled patches whose round scores ``AL_REACH`` of ``reference`` (None: never)."""
    return next((n for n, j in zip(n_labelled, scores) if j >= AL_REACH * reference), None)


def active_curves(runs: list[dict], task: str) -> dict:
    """``{(network, strategy): {seed: {"n_labelled", "test_scores"}}}`` of the stage's loops."""
    out: dict = {}
    for r in runs:
        if r.get("kind") == "active" and r["task"] == task:
            for strategy, curve in r["strategies"].items():
                out.setdefault((r["network"], strategy), {})[r["seed"]] = curve
    return out


def label_ratio(needed: dict, base: dict, last: dict) -> str:
    """The baseline's labelled patches over the arm's, per seed where both reach the bar (geometric
    mean and 95% t-interval of the log ratio), and the seeds where only one of them reaches it
    (``last``: the most patches each loop had, the bound of a ratio it cannot show)."""
    both = [np.log(base[s] / n) for s, n in needed.items() if n and base.get(s)]
    only_arm = [s for s, n in needed.items() if n and s in base and not base[s]]
    only_base = [s for s, n in needed.items() if not n and base.get(s)]
    if len(both) > 1:
        mean, lo, hi = paired_interval(both)
        cell = f"{np.exp(mean):.2f}x [{np.exp(lo):.2f}, {np.exp(hi):.2f}] ({len(both)} seeds)"
    elif both:
        cell = f"{np.exp(both[0]):.2f}x (1 seed)"
    else:
        cell = "-"
    if only_arm:
        cell += "; only the arm reaches it on seed " + ", ".join(
            f"{s} (ratio > {last[s] / needed[s]:.2f})" for s in only_arm)
    if only_base:
        cell += "; only the baseline reaches it on seed " + ", ".join(map(str, only_base))
    return cell


def active_table(runs: list[dict], pool_patches: float) -> str:
    """The active-learning stage: test score per round and arm, then per seed the labelled patches each
    arm needs to reach 95% of the whole-pool reference and the ratio of scratch-entropy's to them."""
    lines: list[str] = []
    for task in dict.fromkeys(r["task"] for r in runs if r.get("kind") == "active"):
        refs = {r["seed"]: r["test_score"] for r in runs if r.get("kind") == "reference" and r["task"] == task}
        arms = active_curves(runs, task)
        ns = sorted({n for per_seed in arms.values() for c in per_seed.values() for n in c["n_labelled"]})
        lines += [f"| {task}: arm | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
        for (network, strategy), per_seed in arms.items():
            cells = [mean_std([dict(zip(c["n_labelled"], c["test_scores"])).get(n) for c in per_seed.values()])
                     for n in ns]
            lines.append(f"| {network}, {strategy} | " + " | ".join(cells) + " |")
        seeds = sorted(refs)
        lines += ["", f"Whole-pool reference ({pool_patches:g} patches, scratch): "
                      + ", ".join(f"seed {s} {refs[s]:.3f}" for s in seeds)
                      + f"; {AL_REACH:.0%} of it is the bar.", "",
                  f"| {task}: arm | labelled patches to {AL_REACH:.0%} of the reference, per seed "
                  f"({', '.join(map(str, seeds))}) | share of the pool (seeds that reach it) "
                  "| scratch-entropy's patches / the arm's (geometric mean, 95% CI) |",
                  "|---|---|---|---|"]

        def needed(per_seed):
            return {s: reach(c["n_labelled"], c["test_scores"], refs[s]) for s, c in per_seed.items() if s in refs}

        base = needed(arms.get(AL_BASELINE, {}))
        last = {s: max(c["n_labelled"]) for s, c in arms.get(AL_BASELINE, {}).items()}
        for (network, strategy), per_seed in arms.items():
            mine = needed(per_seed)
            shown = " / ".join(str(mine[s]) if mine.get(s) else f"> {max(per_seed[s]['n_labelled'])}"
                               if s in per_seed else "not run" for s in seeds)
            got = [n for n in mine.values() if n]
            share = f"{np.mean(got) / pool_patches:.3f} ({len(got)} of {len(mine)})" if got else "none reach it"
            ratio = "1 (the baseline)" if (network, strategy) == AL_BASELINE else label_ratio(mine, base, last)
            lines.append(f"| {network}, {strategy} | {shown} | {share} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def plot_active(runs: list[dict], path: Path) -> None:
    """Test score against labelled patches, one line per arm (mean, 95% t-band over seeds), with the
    whole-pool reference and its 95%."""
    from scipy import stats

    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in runs if r.get("kind") == "active"))
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5.5 * max(1, len(tasks)), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (network, strategy), per_seed in active_curves(runs, task).items():
            mine = [dict(zip(c["n_labelled"], c["test_scores"])) for c in per_seed.values()]
            ns = sorted({n for m in mine for n in m})
            vals = [np.asarray([m[n] for m in mine if n in m], float) for n in ns]
            mean = np.array([v.mean() for v in vals])
            half = np.array([stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0
                             for v in vals])
            line, = ax.plot(ns, mean, marker="o", ms=3, label=f"{network}, {strategy}")
            ax.fill_between(ns, mean - half, mean + half, color=line.get_color(), alpha=0.15)
        refs = [r["test_score"] for r in runs if r.get("kind") == "reference" and r["task"] == task]
        if refs:
            ax.axhline(np.mean(refs), color="k", ls="--", lw=1, label="whole pool (scratch)")
            ax.axhline(AL_REACH * np.mean(refs), color="k", ls=":", lw=1, label=f"{AL_REACH:.0%} of it")
        ax.set(title=task, xlabel="labelled patches", ylabel="test Jaccard (mean foreground)", ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot(runs: list[dict], path: Path, pool_patches: float) -> None:
    from scipy import stats

    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in runs if r.get("kind") == "train"))
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5.5 * max(1, len(tasks)), 4), squeeze=False)
    per_length, chosen = length_sets(runs)
    # one length: a line per arm; several: the length chosen on validation (solid) and each length alone
    sets = ([("", rows) for _, rows in per_length] if len(per_length) < 2 else
            [(", chosen on validation", chosen)] * bool(chosen) + [(f", {n} steps", rows) for n, rows in per_length])
    for ax, task in zip(axes[0], tasks):
        for i, (label, rows) in enumerate(sets):
            for arm in ARMS:
                curve = _curve(rows, task, arm)
                xs = sorted(curve, key=budget_key)
                x = [budget_x(b, pool_patches) for b in xs]
                vals = [np.asarray(list(curve[b].values()), float) for b in xs]
                mean = [v.mean() for v in vals]
                half = [stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0
                        for v in vals]
                ax.errorbar(x, mean, yerr=half if i == 0 else None, marker="o", ms=4, capsize=3,
                            color=f"C{ARMS.index(arm)}", ls=("-", "--", ":", "-.")[i % 4], alpha=1 if i == 0 else 0.5,
                            label=arm + label)
        ax.set_xscale("log")
        ax.set(title=task, xlabel=f"labelled patches (whole pool = {pool_patches:g})",
               ylabel="test Jaccard (mean foreground)", ylim=(0, 1))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_length(runs: list[dict], path: Path, pool_patches: float) -> None:
    """Best validation score against labelled patches, a line per arm and fine-tuning length."""
    plt = pyplot()
    trains = [r for r in runs if r.get("kind") == "train" and r.get("valid_best") is not None]
    tasks = list(dict.fromkeys(r["task"] for r in trains))
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5.5 * max(1, len(tasks)), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, (arm, steps) in enumerate(sorted({(r["arm"], r["steps"]) for r in trains if r["task"] == task})):
            mine = [r for r in trains if (r["task"], r["arm"], r["steps"]) == (task, arm, steps)]
            xs = sorted({r["budget"] for r in mine}, key=budget_key)
            ax.plot([budget_x(b, pool_patches) for b in xs],
                    [np.mean([r["valid_best"] for r in mine if r["budget"] == b]) for b in xs], marker="o", ms=4,
                    color=f"C{ARMS.index(arm)}", ls=("-", "--", ":", "-.")[i % 4], label=f"{arm}, {steps} steps")
        ax.set_xscale("log")
        ax.set(title=task, xlabel=f"labelled patches (whole pool = {pool_patches:g})",
               ylabel="best validation Jaccard (mean over seeds)", ylim=(0, 1))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_pretext(runs: list[dict], path: Path) -> None:
    """Best validation score against pretraining steps (or minutes), one line per pretext kind (and
    unit) through the means from scratch at 0, a dot per seed."""
    plt = pyplot()
    scores = pretext_scores(runs)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for kind_unit in sorted({a[:2] for a in scores if a != SCRATCH}):
        arms = sorted((a for a in scores if a[:2] == kind_unit), key=lambda a: a[2])
        arms = [SCRATCH] * (SCRATCH in scores) + arms
        line, = ax.plot([a[2] for a in arms], [np.mean(list(scores[a].values())) for a in arms], marker="o",
                        label=f"{kind_unit[0]} ({kind_unit[1]}, mean)")
        ax.scatter([a[2] for a in arms[1:] for _ in scores[a]], [v for a in arms[1:] for v in scores[a].values()],
                   s=14, alpha=0.5, color=line.get_color())
    if SCRATCH in scores:
        ax.scatter([0] * len(scores[SCRATCH]), list(scores[SCRATCH].values()), s=14, alpha=0.5, color="k",
                   label="scratch (seeds)")
    ax.set(xlabel="pretraining steps or minutes (0 = from scratch)", ylabel="best validation Jaccard (mito)",
           ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def finetune_arm(r: dict) -> str:
    return "scratch" if r["encoder_lr_scale"] is None else f"pretrained, encoder x {r['encoder_lr_scale']:g}"


def finetune_arms(rows: list[dict]) -> list[str]:
    """The fine-tuning arms of ``rows`` in table and figure order: scratch first."""
    return sorted({finetune_arm(r) for r in rows}, key=lambda a: (a != "scratch", a))


def plot_finetune(runs: list[dict], path: Path) -> None:
    """Best validation score per fine-tuning arm, a line per seed (the seeds are paired)."""
    plt = pyplot()
    rows = [r for r in runs if r.get("kind") == "finetune" and r["valid_best"] is not None]
    arms = finetune_arms(rows)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for seed in sorted({r["seed"] for r in rows}):
        by_arm = {finetune_arm(r): r["valid_best"] for r in rows if r["seed"] == seed}
        xs = [i for i, a in enumerate(arms) if a in by_arm]
        ax.plot(xs, [by_arm[arms[i]] for i in xs], marker="o", alpha=0.6, label=f"seed {seed}")
    ax.bar(range(len(arms)), [np.mean([r["valid_best"] for r in rows if finetune_arm(r) == a]) for a in arms],
           color="0.85", zorder=0, label="mean")
    ax.set_xticks(range(len(arms)), arms, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="best validation Jaccard (mito)", ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.markdown:
        # not _campaign.merged_runs: campaigns of other settings (stages, --steps) are merged on purpose,
        # each run carrying what it needs to be paired (task, seed, budget, arm, steps)
        runs = [r for name in args.out.split(",") for r in json.loads(Path(name).read_text())["runs"]]
        print(table(runs))
        figure = Path(args.figure) if args.figure else Path(args.out.split(",")[0]).with_suffix(".png")
        if any(r.get("kind") == "active" for r in runs):
            print(active_table(runs, pool_patches(args)))
            plot_active(runs, figure)
        elif any(r.get("kind") == "pretext" for r in runs):
            plot_pretext(runs, figure)
        elif any(r.get("kind") == "finetune" for r in runs):
            plot_finetune(runs, figure)
        elif any(r.get("kind") == "train" and r.get("test_score") is None for r in runs):  # validation-only
            plot_length(runs, figure, pool_patches(args))
        elif any(r.get("test_score") is not None for r in runs):
            plot(runs, figure, pool_patches(args))
        return 0
    if data_dir() is None:
        return no_data()
    campaign = Campaign(out, settings(args))
    root = out.with_suffix("")
    root.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    {"main": run_main, "pretext": run_pretext, "active": run_active, "finetune": run_finetune}[args.stage](
        args, campaign, root)
    campaign.doc["seconds"] = time.perf_counter() - t0
    campaign.save()
    print(table(campaign.runs))
    if args.stage == "pretext":
        plot_pretext(campaign.runs, out.with_suffix(".png"))
    if args.stage == "finetune":
        plot_finetune(campaign.runs, out.with_suffix(".png"))
    if args.stage == "active":
        print(active_table(campaign.runs, pool_patches(args)))
        plot_active(campaign.runs, out.with_suffix(".png"))
    if args.stage == "main":
        (plot_length if args.validation_only else plot)(campaign.runs, out.with_suffix(".png"), pool_patches(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
