"""LCS against the matched multi-channel baseline on VNC, under the protocol: 5 seeds fixed in advance.

Design, fixed before any run (docs/results.md, "Rerun under the protocol"):

- Data: VNC stack 1, classes 1 mitochondria, 2 membrane, 3 synapse, 4 glia. Sections 0-11 train
  (read in place through the training config's ``region``, nothing copied), 12-14 validation,
  15-19 test. The atlas patch is chosen by :func:`emseg.lcs.choose_offset` on the labels of the
  training sections only, one patch for every arm and seed.
- Arms (``--arms``): ``lcs`` (label-conditioned, the shipped ``[lcs]`` defaults) and ``baseline``
  (the multi-channel softmax baseline with the shipped defaults, i.e. the matched loss:
  ``bce_weight`` x lazy NLL + ``baseline_dice_weight`` x soft Dice, both 1). Optional extra arms:
  ``lcs-atlas`` (atlas conditioning) and ``baseline-nll`` (the old NLL-only baseline). Every arm has
  the same backbone, patch, batch, steps, learning rate and augmentation. Not the same size: the
  label conditioning adds weights (at depth 4, width 8: about 741k parameters against the
  baseline's 486k); every run records its count (``parameters``). Neither arm weights classes:
  the LCS task takes no ``class_weights``, and the baseline's soft Dice averages the classes.
- Checkpoint: each run validates on sections 12-14 every ``--valid-every`` steps (the training
  config's ``valid`` cube; the score is the mean Dice of the arm's shipped merge) and keeps the best.
- Merge (LCS only; the baseline's softmax argmax has no choice): the chosen checkpoint's per-label
  maps of the validation sections are merged both ways (``calibrated`` and ``max``,
  :mod:`emseg.lcs.merge`). **Rule:** per arm, the merge with the higher mean validation Dice (mean
  over the 4 classes, then over the seeds) is chosen; a tie goes to the shipped default
  (``calibrated``). No threshold is tuned: ``max`` uses its fixed 0.5, ``calibrated`` its scale and
  offset fitted on the atlas (training sections).
- Test: after every seed of an arm is validated, each run's chosen checkpoint is scored once on
  sections 15-19 under the chosen merge only (the other merge's test Dice is never computed).

One campaign run per (arm, seed), resumable (:class:`_campaign.Campaign`): a run holds its
validation figures and, once the merge is chosen, its test figures. Checkpoints go into a folder
beside ``--out``; validation and test inputs and predictions into a temporary folder (``--workdir``).
``--markdown`` prints the tables of docs/results.md from a finished ``--out``; the figure (per-class
test Dice, a bar per arm, a dot per seed) is written beside it as ``.png``.

    python benchmarks/results/lcs_protocol.py --out benchmarks/results/lcs_protocol.json
    python benchmarks/results/lcs_protocol.py --out benchmarks/results/lcs_protocol.json --markdown
    python benchmarks/results/lcs_protocol.py --quick --out /tmp/lcs_protocol.json   # about a minute
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _campaign import SPLIT, Campaign, ci_cell, finished, mean_std, no_data, paired_interval, pyplot  # noqa: E402
from _common import data_dir, dice  # noqa: E402

import lcs_vnc  # noqa: E402

CLASSES = lcs_vnc.CLASSES  # {1: "mitochondria", 2: "membrane", 3: "synapse", 4: "glia"}
MERGES = ("calibrated", "max")  # in order of preference on a tie (the shipped default first)
#: arm -> [lcs] settings beyond the shipped defaults
ARMS = {"lcs": {}, "baseline": {"baseline": True},
        "lcs-atlas": {"conditioning": "atlas"}, "baseline-nll": {"baseline": True, "baseline_dice_weight": 0.0}}
QUICK = dict(seeds="0,1", steps=4, valid_every=2, patch=64, batch=2, depth=2, width=4, crop=128)
AUGMENT = {"flip": True, "rotate90": True, "brightness": 0.1, "contrast": 0.1}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="Results JSON; checkpoints go into a folder beside it.")
    ap.add_argument("--arms", default="lcs,baseline", help=f"Comma-separated, of {', '.join(ARMS)}.")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="Fixed before the campaign (part of its settings).")
    ap.add_argument("--steps", type=int, default=3000, help="Training steps per run (every arm).")
    ap.add_argument("--valid-every", type=int, default=250, help="Validation (checkpoint choice) interval.")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--patch", type=int, default=128, help="2D patch side (also the atlas side).")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--crop", type=int, default=None,
                    help="Validate and test on the central CROP x CROP of each section [whole sections].")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--device", default="auto", help="Training and inference device.")
    ap.add_argument("--workdir", default=None, help="Folder for validation/test inputs and predictions [new in /tmp].")
    ap.add_argument("--quick", action="store_true", help="Tiny settings (a smoke test of the whole script).")
    ap.add_argument("--markdown", action="store_true", help="Print the tables of a finished --out, draw its figure.")
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    unknown = [a for a in arm_list(args) if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {', '.join(unknown)} (known: {', '.join(ARMS)})")
    return args


def arm_list(args) -> list[str]:
    return [a.strip() for a in args.arms.split(",") if a.strip()]


def seed_list(args) -> list[int]:
    return [int(s) for s in str(args.seeds).split(",")]


def settings(args) -> dict:
    """What must not change within one campaign (the arms may grow; the seeds are fixed)."""
    keys = ("seeds", "steps", "valid_every", "batch", "patch", "depth", "width", "lr", "crop", "precision")
    return {k: getattr(args, k) for k in keys}


# ----------------------------------------------------------------------------- data
def crop_box(shape: tuple[int, ...], crop: int | None) -> list[list[int]]:
    """(start, stop) of the central ``crop`` x ``crop`` of the last two axes (whole axes without crop)."""
    h, w = shape[-2:]
    c = min(crop or max(h, w), h, w)
    return [[(h - c) // 2, (h - c) // 2 + c], [(w - c) // 2, (w - c) // 2 + c]]


def write_sections(src: Path, sections: list[int], crop: int | None, path: Path) -> np.ndarray:
    """Copy raw and labels of ``sections`` (start, stop), centre-cropped, to ``path`` (a temporary
    file for inference); the labels are returned."""
    with h5py.File(src, "r") as fh:
        (y0, y1), (x0, x1) = crop_box(fh["raw"].shape, crop)
        box = (slice(*sections), slice(y0, y1), slice(x0, x1))
        raw, label = fh["raw"][box], fh["label"][box]
    with h5py.File(path, "w") as fh:
        fh["raw"], fh["label"] = raw, label
    return label


def atlas_offset(src: Path, patch: int) -> tuple[int, ...]:
    """The atlas corner chosen by :func:`emseg.lcs.choose_offset` on the training sections' labels."""
    from emseg.lcs import choose_offset

    with h5py.File(src, "r") as fh:
        label = fh["label"][slice(*SPLIT["train"])]
    offset = choose_offset(label, (1, patch, patch), list(CLASSES))
    return tuple(int(o) + (SPLIT["train"][0] if i == 0 else 0) for i, o in enumerate(offset))


# ----------------------------------------------------------------------------- training
def train_config(args, src: Path):
    """The training config shared by every arm: sections 0-11 train, 12-14 validate (the checkpoint choice)."""
    from emseg.engine.config import config_from_dict

    with h5py.File(src, "r") as fh:
        box = crop_box(fh["raw"].shape, args.crop)
    volumes = {"raw": f"{src}:raw", "label": f"{src}:label"}
    return config_from_dict({
        "n_classes": 5, "patch_shape": [1, args.patch, args.patch], "batch_size": args.batch, "steps": args.steps,
        "log_every": 50, "checkpoint_every": args.valid_every, "valid_every": args.valid_every,
        "precision": args.precision, "model": {"depth": args.depth, "base_width": args.width, "norm": "batch"},
        "optim": {"lr": args.lr}, "augment": AUGMENT,
        "train": [dict(volumes, region=[SPLIT["train"]])],
        "valid": [dict(volumes, region=[SPLIT["validation"], *box])]})


def lcs_settings(arm: str, src: Path, offset) -> object:
    """The arm's ``[lcs]`` table: the shipped defaults, the atlas, and the arm's own changes."""
    from emseg.lcs import lcs_config_from_dict

    table = {"classes": list(CLASSES), "atlas_raw": f"{src}:raw", "atlas_label": f"{src}:label",
             "atlas_offset": list(offset), **ARMS[arm]}
    return lcs_config_from_dict(table, n_classes=5)


def train_arm(args, src: Path, offset, arm: str, seed: int, folder: Path) -> dict:
    """Train one (arm, seed) run (resuming a killed one); the checkpoint kept by validation."""
    from emseg.lcs import train_lcs
    from emseg.runtime import Runtime

    t0 = time.perf_counter()
    result = train_lcs(train_config(args, src), lcs_settings(arm, src, offset), folder,
                       runtime=Runtime(device=args.device, seed=seed), resume=(folder / "last.pt").exists())
    finished(result, args.steps, str(folder))
    best = folder / "best.pt"  # absent only when no validation score was finite
    from emseg.models.checkpoint import load_checkpoint

    weights = load_checkpoint(folder / "last.pt")["model"]
    parameters = sum(int(v.numel()) for k, v in weights.items() if "running_" not in k and "num_batches" not in k)
    return {"checkpoint": str(best if best.exists() else folder / "last.pt"), "steps": result.final_step,
            "parameters": parameters,
            "valid_best": _finite(result.best_metric), "train_seconds": time.perf_counter() - t0,
            "final_loss": result.losses[-1] if result.losses else None}


# ----------------------------------------------------------------------------- scoring
def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def class_dice(merged: np.ndarray, gt: np.ndarray) -> dict:
    """Dice per class name of a merged label map and ``mean`` over the classes present (None: absent)."""
    out = {name: _finite(dice(merged == c, gt == c)) for c, name in CLASSES.items()}
    finite = [v for v in out.values() if v is not None]
    out["mean"] = float(np.mean(finite)) if finite else None
    return out


def score_validation(args, checkpoint: str, valid: Path, gt: np.ndarray) -> dict:
    """Validation Dice under every merge the model allows (LCS: calibrated and max, from the same maps)."""
    with tempfile.TemporaryDirectory(dir=valid.parent) as tmp:
        _, merged, _, _ = lcs_vnc.infer(Path(checkpoint), valid, Path(tmp) / "pred.zarr", list(CLASSES),
                                        device=args.device)
    return {m: class_dice(merged[m], gt) for m in MERGES if m in merged}


def score_test(args, checkpoint: str, test: Path, gt: np.ndarray, merge: str) -> dict:
    """Test Dice under ``merge`` alone (the only merge computed on the test sections)."""
    from emseg.io import open_volume
    from emseg.lcs import InferConfig, infer_file

    with tempfile.TemporaryDirectory(dir=test.parent) as tmp:
        result = infer_file(InferConfig(checkpoint, f"{test}:raw", str(Path(tmp) / "pred.zarr"),
                                        labels=tuple(CLASSES), merge=merge, device=args.device, batch_size=4))
        with open_volume(result.arrays["labels"]) as vol:
            merged = vol[...]
    return class_dice(merged, gt)


def choose_merge(runs: list[dict], arm: str, seeds: list[int]) -> dict:
    """The arm's merge by the rule of the docstring: highest mean validation Dice over ``seeds``
    (a tie: the earlier of :data:`MERGES`)."""
    mine = [r for r in runs if r["arm"] == arm and r["seed"] in seeds]
    means = {m: float(np.mean([r["valid"][m]["mean"] for r in mine]))
             for m in MERGES if all(m in r["valid"] and r["valid"][m]["mean"] is not None for r in mine)}
    best = max(means, key=lambda m: (means[m], -MERGES.index(m)))
    return {"merge": best, "valid_mean": means, "seeds": seeds}


# ----------------------------------------------------------------------------- the campaign
def run_campaign(args, campaign: Campaign, root: Path, work: Path) -> None:
    """Train and validate every (arm, seed); then per arm choose the merge and test each run once."""
    src = data_dir() / "vnc_stack1.h5"
    offset = atlas_offset(src, args.patch)
    campaign.doc["atlas_offset"] = list(offset)
    print(f"atlas: section {offset[0]}, y {offset[1]}, x {offset[2]} (chosen on sections 0-11)", flush=True)
    valid, test = work / "valid.h5", work / "test.h5"
    gt_valid = write_sections(src, SPLIT["validation"], args.crop, valid)
    seeds = seed_list(args)
    for arm in arm_list(args):
        for seed in seeds:
            def one(arm=arm, seed=seed) -> dict:
                run = train_arm(args, src, offset, arm, seed, root / f"{arm}_seed{seed}")
                return dict(run, valid=score_validation(args, run["checkpoint"], valid, gt_valid))

            row = campaign.run({"arm": arm, "seed": seed}, one)
            print(f"  {arm} seed {seed}: validation mean Dice "
                  + ", ".join(f"{m} {v['mean']}" for m, v in row["valid"].items()), flush=True)
    gt_test = write_sections(src, SPLIT["test"], args.crop, test)
    choices = campaign.doc.setdefault("choices", {})
    for arm in arm_list(args):
        choices[arm] = choose_merge(campaign.runs, arm, seeds)
        merge = choices[arm]["merge"]
        print(f"  {arm}: merge {merge} chosen on validation {choices[arm]['valid_mean']}", flush=True)
        for seed in seeds:
            test_once(args, campaign, campaign.find(arm=arm, seed=seed), merge, test, gt_test)


def test_once(args, campaign: Campaign, run: dict, merge: str, test: Path, gt: np.ndarray) -> None:
    """Score ``run`` on the test sections under ``merge`` unless done; refuse a changed choice."""
    if "test" in run:
        if run["test_merge"] != merge:
            raise SystemExit(f"{run['arm']} seed {run['seed']} was tested with merge {run['test_merge']}, "
                             f"validation now chooses {merge}")
        return
    t0 = time.perf_counter()
    run.update(test=score_test(args, run["checkpoint"], test, gt, merge), test_merge=merge,
               test_seconds=time.perf_counter() - t0)
    campaign.save()
    print(f"  {run['arm']} seed {run['seed']}: test mean Dice {run['test']['mean']} ({merge})", flush=True)


# ----------------------------------------------------------------------------- report
KEYS = list(CLASSES.values()) + ["mean"]


def test_scores(runs: list[dict], arm: str) -> dict[int, dict]:
    """seed -> test Dice per class name (and ``mean``) of the arm's tested runs."""
    return {r["seed"]: r["test"] for r in runs if r["arm"] == arm and "test" in r}


def paired(a: dict[int, dict], b: dict[int, dict], key: str) -> dict[int, float]:
    """seed -> a - b for ``key`` over the seeds where both are scored."""
    return {s: a[s][key] - b[s][key] for s in sorted(set(a) & set(b))
            if a[s][key] is not None and b[s][key] is not None}


def diff_cell(diffs: list[float]) -> str:
    """Mean paired difference and its 95% t-interval (``-`` without a pair)."""
    return ci_cell(paired_interval(diffs)) if diffs else "-"


def table(doc: dict) -> str:
    """Markdown: test Dice per arm with paired differences against the baseline, the merge choice,
    and the per-seed differences."""
    runs = doc["runs"]
    arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
    scores = {a: test_scores(runs, a) for a in arms}
    versus = [a for a in arms if a != "baseline"] if "baseline" in arms else []
    seeds = sorted({s for sc in scores.values() for s in sc})
    lines = [f"Test Dice of the merged label map (sections 15-19), seeds {seeds}; merge chosen on validation.", "",
             "| class | " + " | ".join(arms) + "".join(f" | {a} - baseline (paired, 95% CI)" for a in versus) + " |",
             "|---|" + "---|" * (len(arms) + len(versus))]
    for key in KEYS:
        cells = [mean_std([sc[key] for sc in scores[a].values()]) for a in arms]
        cells += [diff_cell(list(paired(scores[a], scores["baseline"], key).values())) for a in versus]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "| arm | " + " | ".join(f"validation mean Dice, {m}" for m in MERGES) + " | chosen merge |",
              "|---|" + "---|" * (len(MERGES) + 1)]
    for arm, choice in doc.get("choices", {}).items():
        vals = [f"{choice['valid_mean'][m]:.3f}" if m in choice["valid_mean"] else "-" for m in MERGES]
        lines.append(f"| {arm} | " + " | ".join(vals) + f" | {choice['merge']} |")
    for a in versus:
        lines += ["", f"Per-seed differences, {a} - baseline:", "",
                  "| seed | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
        diffs = {key: paired(scores[a], scores["baseline"], key) for key in KEYS}
        for s in seeds:
            lines.append(f"| {s} | " + " | ".join(f"{diffs[k][s]:+.3f}" if s in diffs[k] else "-" for k in KEYS)
                         + " |")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    """Per-class test Dice: a bar per arm (mean over seeds), a dot per seed."""
    plt = pyplot()
    runs = doc["runs"]
    arms = [a for a in ARMS if any(r["arm"] == a and "test" in r for r in runs)]
    fig, ax = plt.subplots(figsize=(1.6 * len(KEYS) + 1, 4))
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        scores = test_scores(runs, arm)
        x = np.arange(len(KEYS)) + (i - (len(arms) - 1) / 2) * width
        vals = [[sc[k] for sc in scores.values() if sc[k] is not None] for k in KEYS]
        merge = doc.get("choices", {}).get(arm, {}).get("merge", "")
        bars = ax.bar(x, [np.mean(v) if v else np.nan for v in vals], width, alpha=0.6,
                      label=f"{arm} ({merge})" if merge else arm)
        for xi, v in zip(x, vals):
            ax.scatter([xi] * len(v), v, s=12, color=bars.patches[0].get_facecolor(), edgecolor="k", zorder=3)
    ax.set_xticks(np.arange(len(KEYS)), KEYS)
    ax.set(ylabel="test Dice (sections 15-19)", ylim=(0, 1),
           title=f"LCS vs baseline, seeds {sorted({r['seed'] for r in runs if 'test' in r})}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.markdown:
        doc = json.loads(out.read_text())
        print(table(doc))
        plot(doc, out.with_suffix(".png"))
        return 0
    if data_dir() is None:
        return no_data()
    campaign = Campaign(out, settings(args))
    root = out.with_suffix("")
    root.mkdir(exist_ok=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lcs_protocol_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        run_campaign(args, campaign, root, work)
    finally:
        if args.workdir is None:  # the copies of the validation and test sections
            shutil.rmtree(work, ignore_errors=True)
    campaign.doc["seconds"] = time.perf_counter() - t0
    campaign.save()
    print(table(campaign.doc))
    plot(campaign.doc, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
