"""Simulated active learning with the ground truth as oracle (``emseg query simulate``).

The experiment of Roels & Saeys: a network is trained on ``initial`` random patches of a pool
region, then, for each strategy, ``iterations`` times: score the unlabelled pool with the current
network, take ``per_iteration`` new patches, reveal their ground truth, fine-tune from the
previous weights, and measure Jaccard on a held-out test region, and the false-positive rate in
its class-free windows (:func:`class_free_windows`, :func:`false_positive_rates`): per foreground
class, the fraction of the voxels of the test grid's windows without that class that are
predicted as it. Every strategy starts from the
same initial set and the same initial network (per seed).

Training goes through :func:`emseg.engine.training.run_training` with :class:`BoxTask`, a
:class:`~emseg.semantic.train.SegmentationTask` whose cubes are the labelled boxes held in memory.
Fine-tuning starts from a checkpoint holding the previous weights at step 0 (fresh optimiser),
resumed by ``run_training``. The configuration file is read and checked by
:mod:`emseg.active.simulation.config`.

Output folder layout::

    DIR/config.json                       the configuration (checked when resuming)
    DIR/curves.csv                        one row per (strategy, seed, iteration)
    DIR/curves.png                        mean test Jaccard vs labelled patches and vs cost, and the
                                          false-positive rate vs cost (matplotlib)
    DIR/runs/seed_S/initial/last.pt       initial network of seed S
    DIR/runs/seed_S/initial.json          initial boxes and test scores
    DIR/runs/seed_S/STRATEGY/state.json   boxes chosen per iteration and their rows
    DIR/runs/seed_S/STRATEGY/iter_K/      fine-tuning run of iteration K (the newest is kept)
    DIR/runs/seed_S/ask-ARM/state.json    a question arm (emseg.active.simulation.ask): questions, answers, rows

Every state file is written atomically after each step, so an interrupted run continues where
it stopped and completed rows are never recomputed.
"""
from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emseg.active.simulation.curves import class_free_windows, false_positive_rates, plot_curves, summarise, write_curves
from emseg.active.selection.diversity import random_select
from emseg.active.pool import CandidatePool, build_pool
from emseg.active.scoring.stream import score_pool
from emseg.active.selection.select import select
from emseg.active.questions.types import parse_ask
from emseg.active.registry import get_strategy
from emseg.active.simulation.ask import dense_cost_fields, run_arm
from emseg.active.simulation.state import finish_iteration, iteration_dir, read_state, stable_id, write_state
from emseg.active.simulation.config import (
    GROWABLE,
    PER_ARM,
    RegionSpec,
    SimulateConfig,
    load_simulate_config,
    simulate_config_from_dict,
)
from emseg.models.checkpoint import load_checkpoint, load_model, model_from_state, save_checkpoint
from emseg.engine.config import OptimConfig, TrainConfig
from emseg.data import Cube
from emseg.runtime.device import resolve_device
from emseg.errors import InputError
from emseg.io import open_volume
from emseg.engine.training import build_optimizer, run_training
from emseg.semantic.train import SegmentationTask, evaluate_cubes
from emseg.runtime import Runtime

__all__ = [
    "BoxTask",
    "RegionSpec",
    "SimulateConfig",
    "SimulationResult",
    "class_free_windows",
    "false_positive_rates",
    "load_simulate_config",
    "plot_curves",
    "run_simulation",
    "simulate_config_from_dict",
    "summarise",
]

# ----------------------------------------------------------------------------- training task
class BoxTask(SegmentationTask):
    """:class:`~emseg.semantic.train.SegmentationTask` over in-memory cubes (the labelled boxes).

    Everything but data loading (network configuration, batches, lazy-label loss) is inherited.

    Examples
    --------
    >>> task = BoxTask(config.train, [Cube(raw=r, label=l, info=info, prio=1.0)])  # doctest: +SKIP
    """

    name = "active"

    def __init__(self, config: TrainConfig, cubes: Sequence[Cube]):
        super().__init__(config, cubes=cubes, valid_cubes=[])
        self.metric_columns = ()


# ----------------------------------------------------------------------------- helpers
def _load_region(spec: RegionSpec, n_classes: int, label_map: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    with open_volume(spec.raw) as raw_vol, open_volume(spec.label) as lab_vol:
        if raw_vol.shape != lab_vol.shape:
            raise InputError(f"label shape {lab_vol.shape} differs from raw shape {raw_vol.shape}",
                             source=spec.label)
        if raw_vol.ndim not in (2, 3):
            raise InputError(f"raw must be 2D or 3D, found {raw_vol.shape}", source=spec.raw)
        sl = spec.slices(raw_vol.shape)
        raw = raw_vol[sl]
        label = lab_vol[sl]
    if not np.issubdtype(label.dtype, np.integer):
        raise InputError(f"labels must be integers, found {label.dtype}", source=spec.label)
    label = label.astype(np.int64)
    top = len(label_map) if label_map is not None else n_classes
    bad = (label < -1) | (label >= top)
    if bad.any():
        what = "label_map has" if label_map is not None else "n_classes is"
        raise InputError(f"label value {int(label[bad].flat[0])} outside {{-1, 0..{top - 1}}} ({what} {top})",
                         source=spec.label)
    if label_map is not None:
        lut = np.asarray(label_map, dtype=np.int64)
        label = np.where(label >= 0, lut[np.clip(label, 0, None)], -1)
    return raw, label.astype(np.int16)


def _info(n_classes: int) -> np.ndarray:
    info = np.zeros((2, n_classes), dtype=np.uint8)
    info[0] = 1
    return info


def _rng(*parts: Any) -> np.random.Generator:
    return np.random.default_rng([stable_id(*parts)])


def _subset(pool: CandidatePool, idx: np.ndarray) -> CandidatePool:
    idx = np.sort(np.asarray(idx, dtype=np.int64))
    return CandidatePool(list(pool.volume_shapes), pool.patch_shape, pool.volume_index[idx],
                         pool.offsets[idx], pool.labelled[idx], list(pool.names), pool.may_overlap)


def _train_config(config: SimulateConfig, steps: int, lr: float) -> TrainConfig:
    t = config.train
    return t.replace(steps=steps, optim=dataclasses.replace(t.optim, lr=lr),
                     checkpoint_every=max(1, min(t.checkpoint_every, steps or 1)))


def _seed_checkpoint(run_dir: Path, init_from: Path, cfg: TrainConfig, seed: int, task_name: str) -> None:
    """A ``last.pt`` at step 0 holding the weights of ``init_from`` and a fresh optimiser."""
    prev = load_checkpoint(init_from)
    model = model_from_state(prev, source=str(init_from))  # checked like any loaded checkpoint
    opt = build_optimizer(model, cfg.optim)  # the groups run_training builds, so that it resumes this state
    state = {
        "model": prev["model"], "model_config": prev["model_config"], "optimizer": opt.state_dict(),
        "step": 0, "best_metric": None, "config": cfg.to_dict(), "task": task_name, "elapsed_s": 0.0,
        "rng": {"numpy": np.random.default_rng(seed).bit_generator.state,
                "python": random.Random(seed).getstate(),
                "torch": torch.Generator().manual_seed(seed).get_state()},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run_dir / "last.pt", state)


def _train(config: SimulateConfig, cubes: list[Cube], run_dir: Path, *, steps: int, lr: float, seed: int,
           device: str, init_from: Path | None, transfer: str | None = None) -> None:
    """Train (or fine-tune from ``init_from``, an earlier round's weights, or start from the weights of
    ``transfer``, any checkpoint, matched by name and shape) on ``cubes`` into ``run_dir``; resumes a
    partial run."""
    cfg = _train_config(config, steps, lr)
    if transfer is not None:
        cfg = cfg.replace(init=transfer)
    task = BoxTask(cfg, cubes)
    last = run_dir / "last.pt"
    if last.exists() and int(load_checkpoint(last).get("step", -1)) >= steps:
        return
    if not last.exists() and init_from is not None:
        _seed_checkpoint(run_dir, init_from, cfg, seed, task.name)
    result = run_training(task, cfg, run_dir, runtime=Runtime(device=device, seed=seed), resume=last.exists())
    if result.interrupted:
        raise KeyboardInterrupt
    (run_dir / "best.pt").unlink(missing_ok=True)  # a copy of last.pt without validation


def _evaluate(weights: Path, test_cube: Cube, config: SimulateConfig, device: torch.device,
              free: np.ndarray | None = None) -> dict[str, float]:
    """Test Jaccard per class and its foreground mean; with ``free`` (:func:`class_free_windows`)
    also the false-positive rates of :func:`false_positive_rates`."""
    model, _ = load_model(weights, device)
    prediction = np.zeros(np.shape(test_cube.label), dtype=np.int16)

    def keep(_: int, block: Any, labels: np.ndarray) -> None:
        prediction[block.inner] = labels

    res = evaluate_cubes(model, [test_cube], config.patch, config.n_classes, device,
                         precision=config.train.effective_precision, on_block=keep if free is not None else None)
    row = {f"jaccard_{c}": float(res[f"valid_jaccard_{c}"]) for c in range(config.n_classes)}
    row["mean_fg_jaccard"] = float(res["valid_score"])
    if free is not None:
        row.update(false_positive_rates(prediction, free, config.patch))
    return row


@dataclass
class SimulationResult:
    """Rows of ``curves.csv`` (all of the configured ones that exist) and what this call did."""

    out_dir: Path
    rows: list[dict[str, Any]]
    computed: int
    total: int
    curves_csv: Path
    curves_png: Path | None
    plot_note: str | None
    seconds: float
    summary: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "computed": self.computed, "total": self.total,
                "curves_csv": str(self.curves_csv),
                "curves_png": str(self.curves_png) if self.curves_png else None,
                "plot_note": self.plot_note, "seconds": round(self.seconds, 3), "summary": self.summary,
                "rows": self.rows}


def _check_folder(out: Path, config: SimulateConfig) -> None:
    path = out / "config.json"
    current = config.to_dict()
    if path.exists():
        stored = read_state(path)
        optim = stored.get("train", {}).get("optim") if isinstance(stored.get("train"), dict) else None
        if isinstance(optim, dict):  # a folder of an older emseg: the optimiser keys added since at their defaults
            stored["train"]["optim"] = {**dataclasses.asdict(OptimConfig()), **optim}
        a = {k: v for k, v in stored.items() if k not in GROWABLE + PER_ARM}
        b = {k: v for k, v in current.items() if k not in GROWABLE + PER_ARM}
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise InputError(f"holds a simulation with a different configuration (differs in: {', '.join(diff)}); "
                             "choose another `out_dir`", source=str(out))
    write_state(path, current)


def run_simulation(
    config: SimulateConfig,
    out_dir: str | Path,
    *,
    runtime: Runtime = Runtime(),
    progress: Callable[[dict[str, Any]], None] | None = None,
    plot: bool = True,
) -> SimulationResult:
    """Run (or continue) the simulated active-learning experiment into ``out_dir``.

    Parameters
    ----------
    config : SimulateConfig
    out_dir : str or Path
        Output folder; an existing one with the same configuration is continued (``seeds``,
        ``strategies`` and ``iterations`` may grow between runs).
    runtime : Runtime
        The device, and a precision that replaces the config's when set (the seeds are the
        config's ``seeds``).
    progress : callable, optional
        Called with a dict: ``{"event": "phase", "phase": ..., "strategy", "seed", "iteration"}``
        before each training/scoring/evaluation and ``{"event": "row", "row": ..., "done",
        "total", "computed": bool}`` after each row.
    plot : bool
        Draw ``curves.png`` (needs matplotlib; skipped with a note otherwise).

    Returns
    -------
    SimulationResult

    Examples
    --------
    >>> result = run_simulation(load_simulate_config("active.toml"), "runs/al")  # doctest: +SKIP
    >>> result.summary["entropy"][-1]["mean"]  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    if runtime.precision is not None:
        config = dataclasses.replace(config, train=config.train.replace(precision=runtime.precision, amp=True))
    dev = resolve_device(runtime.device)
    strategies = [get_strategy(s).name for s in config.strategies]
    arms = [parse_ask(a) for a in config.questions]
    k = config.n_classes
    pool_raw, pool_label = _load_region(config.pool, k, config.label_map)
    test_raw, test_label = _load_region(config.test, k, config.label_map)
    if len(config.patch) != pool_raw.ndim:
        raise InputError(f"patch {config.patch} has {len(config.patch)} axes, the pool region has {pool_raw.ndim}")
    # Checked before anything is written into out_dir (the per-seed check below stays for subsets).
    n_pool = len(build_pool([pool_raw.shape], config.patch, names=["pool"]))
    if config.candidates is not None:
        n_pool = min(n_pool, config.candidates)
    needed = config.initial + config.per_iteration * config.iterations
    if needed > n_pool:
        raise InputError(f"the pool holds {n_pool} patches, fewer than initial + per_iteration x "
                         f"iterations = {needed}")
    out.mkdir(parents=True, exist_ok=True)
    _check_folder(out, config)
    test_cube = Cube(raw=test_raw, label=test_label, info=_info(k), prio=1.0, name="test")
    free = class_free_windows(test_label, config.patch, k)
    total = len(config.seeds) * (len(strategies) + len(arms)) * (config.iterations + 1)
    rows: dict[tuple[str, int, int], dict[str, Any]] = {}
    computed = 0
    lr_ft = config.lr_finetune if config.lr_finetune is not None else config.train.optim.lr

    def fine_tune(cubes: list[Cube], run_dir: Path, *, seed: int, init_from: Path | None) -> None:
        """One round's training, started as ``config.finetune`` says (``init_from``: the last round's weights)."""
        if config.finetune == "scratch":
            _train(config, cubes, run_dir, steps=config.steps_initial, lr=config.train.optim.lr, seed=seed,
                   device=str(dev), init_from=None)
        elif config.finetune == "init":
            _train(config, cubes, run_dir, steps=config.steps_finetune, lr=lr_ft, seed=seed, device=str(dev),
                   init_from=None, transfer=config.init)
        else:
            _train(config, cubes, run_dir, steps=config.steps_finetune, lr=lr_ft, seed=seed, device=str(dev),
                   init_from=init_from)
    csv_path = out / "curves.csv"

    def ordered() -> list[dict[str, Any]]:
        return [rows[(s, seed, it)] for s in [*strategies, *(a.name for a in arms)] for seed in config.seeds
                for it in range(config.iterations + 1) if (s, seed, it) in rows]

    def emit_row(row: dict[str, Any], fresh: bool) -> None:
        nonlocal computed
        row = dense_cost_fields(dict(row), config)
        rows[(row["strategy"], row["seed"], row["iteration"])] = row
        computed += int(fresh)
        if fresh:
            write_curves(csv_path, ordered(), k)
        if progress is not None:
            progress({"event": "row", "row": row, "done": len(rows), "total": total, "computed": fresh})

    def phase(name: str, strategy: str | None, seed: int, iteration: int) -> None:
        if progress is not None:
            progress({"event": "phase", "phase": name, "strategy": strategy, "seed": seed, "iteration": iteration})

    def cubes_for(pool: CandidatePool, indices: Sequence[int]) -> list[Cube]:
        cubes = []
        for i in indices:
            sl = pool.box(int(i)).slices()
            cubes.append(Cube(raw=pool_raw[sl], label=pool_label[sl], info=_info(k), prio=1.0, name=f"box{i}"))
        return cubes

    for seed in config.seeds:
        seed_dir = out / "runs" / f"seed_{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        pool = build_pool([pool_raw.shape], config.patch, names=["pool"])
        if config.candidates is not None and config.candidates < len(pool):
            pool = _subset(pool, _rng("candidates", seed).choice(len(pool), config.candidates, replace=False))
        needed = config.initial + config.per_iteration * config.iterations
        if needed > len(pool):
            raise InputError(f"the pool holds {len(pool)} patches, fewer than initial + per_iteration x "
                             f"iterations = {needed}")
        offsets = pool.offsets.tolist()

        # ---- initial network, shared by all strategies of this seed
        init_json = seed_dir / "initial.json"
        init_dir = seed_dir / "initial"
        if init_json.exists():
            init_state = read_state(init_json)
            init_idx = [int(i) for i in init_state["indices"]]
            if [offsets[i] for i in init_idx] != init_state["offsets"]:
                raise InputError("stored initial boxes do not match the pool; choose another `out_dir`",
                                 source=str(init_json))
        else:
            init_idx = random_select(len(pool), config.initial, _rng("initial", seed)).tolist()
            init_state = {"indices": init_idx, "offsets": [offsets[i] for i in init_idx], "row": None}
            write_state(init_json, init_state)
        if init_state.get("row") is None:
            phase("train", None, seed, 0)
            _train(config, cubes_for(pool, init_idx), init_dir, steps=config.steps_initial,
                   lr=config.train.optim.lr, seed=seed, device=str(dev), init_from=None, transfer=config.init)
            phase("evaluate", None, seed, 0)
            init_state["row"] = _evaluate(init_dir / "last.pt", test_cube, config, dev, free)
            write_state(init_json, init_state)
            fresh_initial = True
        else:
            fresh_initial = False

        for strategy in strategies:
            s_dir = seed_dir / strategy
            s_dir.mkdir(exist_ok=True)
            state_path = s_dir / "state.json"
            state = read_state(state_path) if state_path.exists() else {
                "initial_row": False, "selections": [], "offsets": [], "rows": []}
            if not state.get("initial_row"):
                state["initial_row"] = True
                write_state(state_path, state)
                fresh = True
            else:
                fresh = False
            emit_row({"strategy": strategy, "seed": seed, "iteration": 0, "n_labelled": len(init_idx),
                      **init_state["row"]}, fresh or fresh_initial)
            done_rows = min(len(state["rows"]), config.iterations)
            labelled = list(init_idx)
            for sel in state["selections"][:len(state["rows"])]:
                labelled += sel
            stored_offsets = [offsets[i] for sel in state["selections"] for i in sel]
            if stored_offsets != [o for sel in state["offsets"] for o in sel]:
                raise InputError("stored boxes do not match the pool; choose another `out_dir`", source=str(state_path))
            for row in state["rows"][:done_rows]:
                emit_row(row, False)
            prev_weights = init_dir / "last.pt"
            if state["rows"]:
                prev_weights = s_dir / f"iter_{len(state['rows']):03d}" / "last.pt"
            for it in range(len(state["rows"]) + 1, config.iterations + 1):
                run_dir = iteration_dir(s_dir, it)
                if len(state["selections"]) < it:
                    phase("score", strategy, seed, it)
                    model, _ = load_model(prev_weights, dev)
                    current = pool.with_labelled(labelled)
                    torch.manual_seed(stable_id("score", seed, strategy, it) % 2**31)
                    scores = None
                    strat = get_strategy(strategy)
                    if strat.needs_scores or strat.needs_embeddings:
                        scores = score_pool(model, current, [pool_raw], strat, mc_samples=config.mc_samples,
                                            reduction=config.reduction, batch_size=config.score_batch_size,
                                            device=dev, precision=config.train.effective_precision, fold=True)
                    picks = select(current, strat, config.per_iteration, scores=scores,
                                   rng=_rng("select", seed, strategy, it)).tolist()
                    del model
                    state["selections"].append(picks)
                    state["offsets"].append([offsets[i] for i in picks])
                    write_state(state_path, state)
                labelled += state["selections"][it - 1]
                phase("train", strategy, seed, it)
                fine_tune(cubes_for(pool, labelled), run_dir, seed=stable_id("finetune", seed, it) % 2**31,
                          init_from=prev_weights)
                phase("evaluate", strategy, seed, it)
                row = {"strategy": strategy, "seed": seed, "iteration": it, "n_labelled": len(labelled),
                       **_evaluate(run_dir / "last.pt", test_cube, config, dev, free)}
                prev_weights = finish_iteration(state, state_path, row, s_dir, it)
                emit_row(row, True)

        for arm in arms:
            run_arm(arm, config=config, seed=seed, seed_dir=seed_dir, pool=pool, pool_raw=pool_raw,
                    pool_label=pool_label, init_idx=init_idx, init_dir=init_dir, init_row=init_state["row"],
                    fresh_initial=fresh_initial, device=dev,
                    train=fine_tune,
                    evaluate=lambda weights: _evaluate(weights, test_cube, config, dev, free), emit_row=emit_row,
                    phase=phase)

    final_rows = ordered()
    write_curves(csv_path, final_rows, k)
    png, note = None, None
    if plot:
        note = plot_curves(final_rows, out / "curves.png")
        png = None if note else out / "curves.png"
    return SimulationResult(out, final_rows, computed, total, csv_path, png, note,
                            time.perf_counter() - t0, summarise(final_rows))
