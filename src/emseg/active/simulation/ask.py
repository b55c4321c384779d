"""Question arms of the simulated loop: ask cheap questions, the ground truth answers.

An arm (``questions = ["dense+presence"]`` in the simulate config, see
:func:`~emseg.active.questions.types.parse_ask`) starts from the same initial boxes and network as the
strategies of its seed. Each round it scores the pool with the current network
(:data:`~emseg.active.questions.types.QUESTION_STRATEGY`, one forward pass per box), spends ``budget``
annotator seconds with :func:`~emseg.active.questions.types.select_questions`, lets the ground truth
answer (dense: the labels; partial: the labels of the class; presence: whether the class occurs
in the box), and fine-tunes on every box it knows something about
(:func:`~emseg.active.questions.annotation.box_annotation`). A box is sampled in proportion to the annotation
time spent on it, a densely labelled one counting 1 (so cheap lazy cubes do not crowd out the
dense ones). Rows carry the cumulative cost (``cost_s``) and question counts.

State lives in ``runs/seed_S/ask-ARM/state.json`` and is written atomically after each step, as
for the strategies, so an interrupted arm continues where it stopped.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emseg.active.pool import CandidatePool
from emseg.active.questions.annotation import BoxKnowledge, box_annotation, oracle_answer
from emseg.active.questions.types import QUESTION_STRATEGY, Ask, build_questions, select_questions
from emseg.active.scoring.stream import score_pool
from emseg.active.simulation.config import SimulateConfig
from emseg.active.simulation.state import finish_iteration, iteration_dir, read_state, stable_id, write_state
from emseg.models.checkpoint import load_model
from emseg.data import Cube
from emseg.errors import InputError

__all__ = ["COST_COLUMNS", "arm_dir_name", "dense_cost_fields", "run_arm"]

#: Columns appended to ``curves.csv``.
COST_COLUMNS = ("cost_s", "n_dense", "n_partial", "n_presence")


def arm_dir_name(arm: Ask) -> str:
    """Folder of an arm under ``runs/seed_S``."""
    return f"ask-{arm.name}"


def dense_cost_fields(row: dict[str, Any], config: SimulateConfig) -> dict[str, Any]:
    """Fill the cost columns of a strategy row (``n_labelled`` dense patches) unless present."""
    if "cost_s" not in row:
        voxels = int(np.prod(config.patch))
        n = int(row["n_labelled"])
        row.update(cost_s=n * config.costs.cost("dense", voxels), n_dense=n, n_partial=0, n_presence=0)
    return row


def _knowledge(init_idx: Sequence[int], selections: Sequence[Sequence[dict[str, Any]]],
               dense_cost: float) -> dict[int, BoxKnowledge]:
    boxes: dict[int, BoxKnowledge] = {}
    for i in init_idx:
        boxes[int(i)] = BoxKnowledge(dense=True, cost=dense_cost)
    for round_ in selections:
        for q in round_:
            kn = boxes.setdefault(int(q["index"]), BoxKnowledge())
            kn.cost += float(q["cost"])
            if q["question"] == "dense":
                kn.dense = True
            elif q["question"] == "partial":
                kn.partial.add(int(q["class"]))
            elif q["answer"] is False:
                kn.absent.add(int(q["class"]))
    return boxes


def _asked(selections: Sequence[Sequence[dict[str, Any]]]) -> tuple[dict[int, set[int]], dict[int, set[int]]]:
    """Classes resolved per box (outlined or answered absent) and classes answered present."""
    resolved: dict[int, set[int]] = {}
    present: dict[int, set[int]] = {}
    for round_ in selections:
        for q in round_:
            if q["question"] == "partial" or (q["question"] == "presence" and q["answer"] is False):
                resolved.setdefault(int(q["index"]), set()).add(int(q["class"]))
            elif q["question"] == "presence":
                present.setdefault(int(q["index"]), set()).add(int(q["class"]))
    return resolved, present


def _counts(selections: Sequence[Sequence[dict[str, Any]]], n_initial: int) -> dict[str, int]:
    out = {"n_dense": n_initial, "n_partial": 0, "n_presence": 0}
    for round_ in selections:
        for q in round_:
            out[f"n_{q['question']}"] += 1
    return out


def run_arm(
    arm: Ask,
    *,
    config: SimulateConfig,
    seed: int,
    seed_dir: Path,
    pool: CandidatePool,
    pool_raw: np.ndarray,
    pool_label: np.ndarray,
    init_idx: Sequence[int],
    init_dir: Path,
    init_row: dict[str, Any],
    fresh_initial: bool,
    device: torch.device,
    train: Callable[..., None],
    evaluate: Callable[[Path], dict[str, float]],
    emit_row: Callable[[dict[str, Any], bool], None],
    phase: Callable[[str, str | None, int, int], None],
) -> None:
    """Run (or continue) one question arm of one seed; rows go to ``emit_row``.

    ``train(cubes, run_dir, seed=, init_from=)`` fine-tunes, ``evaluate(weights)`` returns the
    Jaccard columns; both come from :func:`emseg.active.simulation.loop.run_simulation`, as do the
    state-file helpers.
    """
    name = arm.name
    k = config.n_classes
    voxels = int(np.prod(config.patch))
    dense_cost = config.costs.cost("dense", voxels)
    a_dir = seed_dir / arm_dir_name(arm)
    a_dir.mkdir(exist_ok=True)
    state_path = a_dir / "state.json"
    settings = {"budget": config.budget, "costs": config.costs.to_dict()}
    if state_path.exists():
        state = read_state(state_path)
        if state.get("settings") != settings:
            raise InputError(f"arm {name!r} ran with another budget or cost model ({state.get('settings')}); "
                             "choose another --out", source=str(state_path))
    else:
        state = {"settings": settings, "initial_row": False, "selections": [], "rows": []}
    offsets = pool.offsets.tolist()
    for sel in state["selections"]:
        if any(offsets[int(q["index"])] != q["offset"] for q in sel):
            raise InputError("stored questions do not match the pool; choose another `out_dir`", source=str(state_path))
    fresh = not state["initial_row"]
    if fresh:
        state["initial_row"] = True
        write_state(state_path, state)
    emit_row({"strategy": name, "seed": seed, "iteration": 0, "n_labelled": len(init_idx), **init_row,
              "cost_s": len(init_idx) * dense_cost, **_counts([], len(init_idx))}, fresh or fresh_initial)
    done = min(len(state["rows"]), config.iterations)
    for row in state["rows"][:done]:
        emit_row(row, False)
    prev = init_dir / "last.pt" if not state["rows"] else a_dir / f"iter_{len(state['rows']):03d}" / "last.pt"
    for it in range(len(state["rows"]) + 1, config.iterations + 1):
        run_dir = iteration_dir(a_dir, it)
        if len(state["selections"]) < it:
            phase("score", name, seed, it)
            known = _knowledge(init_idx, state["selections"], dense_cost)
            current = pool.with_labelled([i for i, kn in known.items() if kn.dense])
            model, _ = load_model(prev, device)
            scores = score_pool(model, current, [pool_raw], QUESTION_STRATEGY, reduction="sum",
                                batch_size=config.score_batch_size, device=device,
                                precision=config.train.effective_precision, fold=True)
            del model
            resolved, present = _asked(state["selections"])
            table = build_questions(current, scores.scores, arm.types, config.costs, asked=resolved, present=present)
            rows, _ = select_questions(current, table, budget=config.budget, shares=arm.shares, types=arm.types)
            picked = []
            for r in rows:
                i, kind, klass = int(table.index[r]), table.kind_name(int(r)), int(table.klass[r])
                truth = pool_label[pool.box(i).slices()]
                picked.append({"index": i, "offset": offsets[i], "question": kind,
                               "class": None if kind == "dense" else klass, "cost": float(table.cost[r]),
                               "value": float(table.value[r]),
                               "answer": oracle_answer(kind, klass, truth)})
            state["selections"].append(picked)
            write_state(state_path, state)
        selections = state["selections"][:it]
        known = _knowledge(init_idx, selections, dense_cost)
        cubes = []
        for i, kn in sorted(known.items()):
            sl = pool.box(i).slices()
            made = box_annotation(k, kn, config.patch, pool_label[sl])
            if made is not None:
                label, info = made
                prio = 1.0 if kn.dense else min(1.0, kn.cost / dense_cost)
                cubes.append(Cube(raw=pool_raw[sl], label=label, info=info, prio=prio, name=f"box{i}"))
        phase("train", name, seed, it)
        train(cubes, run_dir, seed=stable_id("finetune", seed, it) % 2**31, init_from=prev)
        phase("evaluate", name, seed, it)
        spent = len(init_idx) * dense_cost + sum(float(q["cost"]) for sel in selections for q in sel)
        row = {"strategy": name, "seed": seed, "iteration": it, "n_labelled": len(cubes),
               **evaluate(run_dir / "last.pt"), "cost_s": spent, **_counts(selections, len(init_idx))}
        prev = finish_iteration(state, state_path, row, a_dir, it)
        emit_row(row, True)
