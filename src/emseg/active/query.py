"""The ``emseg query`` pipeline on files: build the pool, score it, select, write the queries."""
from __future__ import annotations

import math
import time
from contextlib import ExitStack
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emseg.active.results import (
    QUERY_FORMAT,
    QUERY_FORMAT_VERSION,
    export_crops,
    napari_note,
    query_paths,
    write_queries,
)
from emseg.active.questions.answers import answers_path, stale_answers, write_answers_template
from emseg.active.pool import Box, CandidatePool, build_pool
from emseg.active.questions.annotation import lazy_info
from emseg.active.questions.types import (
    QUESTION_STRATEGY,
    Ask,
    CostModel,
    build_questions,
    parse_ask,
    rank_questions,
    select_questions,
)
from emseg.active.registry import get_strategy
from emseg.active.scoring.cluster import score_pool_on_cluster
from emseg.active.scoring.stream import PoolScores, has_dropout, squeeze_leading_axis, score_pool
from emseg.active.selection.select import select
from emseg.models.checkpoint import load_model
from emseg.runtime.device import resolve_device
from emseg.errors import InputError
from emseg.models.loading import window_shape
from emseg.io import check_output_location, check_raw, claim_outputs, open_volume, parse_spec
from emseg.engine.training import check_divisible
from emseg.runtime.precision import DEFAULT_PRECISION

__all__ = ["Query", "QueryConfig", "QueryResult", "query_files", "rank_queries"]


@dataclass(frozen=True)
class Query:
    """One ranked pick: ``rank`` 1 is the first choice."""

    rank: int
    volume: str
    box: Box
    score: float | None
    strategy: str

    def to_dict(self) -> dict[str, Any]:
        center = [o + (s - 1) / 2 for o, s in zip(self.box.offset, self.box.shape)]
        return {"rank": self.rank, "volume": self.volume, "volume_index": self.box.volume,
                "offset": list(self.box.offset), "shape": list(self.box.shape), "center": center,
                "score": self.score, "strategy": self.strategy}


def rank_queries(pool: CandidatePool, picks: np.ndarray, strategy: str,
                 scores: PoolScores | None = None) -> list[Query]:
    """Turn picked indices into ranked :class:`Query` records (score ``None`` when unscored)."""
    out = []
    for rank, i in enumerate(np.asarray(picks, dtype=np.int64), start=1):
        s = None
        if scores is not None and scores.scores is not None and math.isfinite(scores.scores[i]):
            s = float(scores.scores[i])
        box = pool.box(int(i))
        out.append(Query(rank, pool.names[box.volume], box, s, strategy))
    return out


@dataclass(frozen=True)
class QueryConfig:
    """Everything ``emseg query`` needs.

    ``exclude_labels`` maps a pool volume index to label volume specs; ``exclude_boxes`` holds
    boxes (dicts with ``volume`` spec or ``volume_index``, ``offset``, ``shape``) from earlier
    queries. ``out`` is the JSON path (the CSV goes beside it with the same stem); ``export``
    an optional HDF5 file for the crops. ``scheduler`` (``"local"`` or ``"tcp://HOST:PORT"``)
    scores the pool as cluster tasks (:func:`score_pool_on_cluster`), ``workers`` sizes a local one.
    """

    model: str
    pool: tuple[str, ...]
    strategy: str = "entropy"
    n: int = 20
    patch_shape: tuple[int, ...] | None = None
    candidates: int | None = None
    mc_samples: int = 10
    reduction: str = "mean"
    batch_size: int = 8
    exclude_labels: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    exclude_boxes: tuple[Mapping[str, Any], ...] = ()
    out: str | None = None
    export: str | None = None
    seed: int = 0
    device: str = "auto"
    #: ``auto | fp32 | bf16`` (see :mod:`emseg.runtime.precision`).
    precision: str = DEFAULT_PRECISION
    scheduler: str | None = None
    workers: int | None = None
    #: Question types (:func:`~emseg.active.questions.types.parse_ask`): ``dense`` is the classic query
    #: by ``strategy``; ``presence``, ``partial``, ``auto`` or a mix ask cheaper questions.
    ask: str = "dense"
    #: Seconds of annotation to spend (required for ``auto`` and mixes; else ``n`` questions).
    budget: float | None = None
    costs: CostModel = field(default_factory=CostModel)
    #: Replace existing outputs (``out`` with its CSV and answers file, ``export``); refused otherwise.
    overwrite: bool = False


@dataclass
class QueryResult:
    """The ranked queries and what produced them (``to_dict()`` is the JSON document)."""

    strategy: str
    model: str
    patch_shape: tuple[int, ...]
    volumes: list[str]
    volume_shapes: list[tuple[int, ...]]
    queries: list[Query]
    n_candidates: int
    n_excluded: int
    n_labelled: int
    reduction: str
    mc_samples: int | None
    seed: int
    ignored_boxes: int = 0
    seconds_scoring: float = 0.0
    seconds_total: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    #: For ``--ask`` other than ``dense``: the questions asked, budget, spend and cost model.
    questions: dict[str, Any] | None = None
    #: One-line remarks on the outputs (e.g. a stale answers file kept beside ``out``).
    notes: list[str] = field(default_factory=list)

    @property
    def axes(self) -> str:
        return "zyx"[-len(self.patch_shape):]

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "format": QUERY_FORMAT, "version": QUERY_FORMAT_VERSION, "axes": self.axes,
            "convention": napari_note(self.axes),
            "strategy": self.strategy, "model": self.model, "patch_shape": list(self.patch_shape),
            "volumes": list(self.volumes), "volume_shapes": [list(s) for s in self.volume_shapes],
            "n_candidates": self.n_candidates, "n_excluded": self.n_excluded,
            "n_labelled": self.n_labelled, "ignored_boxes": self.ignored_boxes, "reduction": self.reduction, "mc_samples": self.mc_samples,
            "seed": self.seed, "seconds_scoring": round(self.seconds_scoring, 3),
            "seconds_total": round(self.seconds_total, 3), "outputs": dict(self.outputs),
            "queries": [q.to_dict() for q in self.queries],
        }
        if self.questions is not None:
            doc["ask"] = dict(self.questions)
        if self.notes:
            doc["notes"] = list(self.notes)
        return doc


def _match_boxes(boxes: Sequence[Mapping[str, Any]], names: Sequence[str]) -> tuple[list[Box], int]:
    """Boxes of earlier queries mapped onto the current pool volumes (by volume name)."""
    index = {name: i for i, name in enumerate(names)}
    out, ignored = [], 0
    for b in boxes:
        vol = b.get("volume")
        i = index.get(str(vol)) if vol is not None else b.get("volume_index")
        if i is None or len(b["offset"]) != len(b["shape"]):
            ignored += 1
            continue
        out.append(Box(int(i), tuple(int(v) for v in b["offset"]), tuple(int(v) for v in b["shape"])))
    return out, ignored


def query_files(config: QueryConfig, *,
                progress: Callable[[int, int], None] | None = None) -> QueryResult:
    """The ``emseg query`` pipeline: load the model, build the pool, score, select, write.

    Writes ``config.out`` (JSON) and the CSV beside it atomically, and the crops to
    ``config.export`` when given.

    Examples
    --------
    >>> cfg = QueryConfig(model="run/best.pt", pool=("stack.h5:raw",), n=20,
    ...                   patch_shape=(1, 256, 256), out="queries.json")
    >>> result = query_files(cfg)  # doctest: +SKIP
    """
    if config.export:
        inputs = [parse_spec(s).path for s in config.pool]
        inputs += [parse_spec(s).path for specs in (config.exclude_labels or {}).values() for s in specs]
        export = Path(config.export).resolve()
        if any(export == p.resolve() for p in [*inputs, Path(config.model)]):
            raise InputError("`export` would replace an input file; choose a new file", source=str(config.export))
    targets = []
    if config.out:
        json_path, csv_path = query_paths(config.out)
        targets += [(json_path, "file"), (csv_path, "file"), (answers_path(json_path), "file")]
    if config.export:
        targets.append((config.export, "file"))
    with claim_outputs(targets, overwrite=config.overwrite):  # one writer; existing outputs kept
        return _query_files(config, progress=progress)


def _query_files(config: QueryConfig, *, progress: Callable[[int, int], None] | None) -> QueryResult:
    t0 = time.perf_counter()
    strat = get_strategy(config.strategy)
    ask = parse_ask(config.ask)
    _check_ask(config, ask)
    if isinstance(config.n, bool) or config.n < 1:
        raise InputError(f"`n` must be >= 1, got {config.n}")
    if not config.pool:
        raise InputError("no pool volume given")
    if config.workers is not None and config.scheduler != "local":
        raise InputError("`workers` applies only when `scheduler` is 'local'")
    for target in (config.out, config.export):
        # Fail before any output is written, so a bad --out leaves no --export file behind.
        if target:
            check_output_location(Path(target))
    device = resolve_device(config.device)
    model, state = load_model(config.model, device)
    if state["model_config"].get("cond_channels"):
        raise InputError("this checkpoint is label-conditioned; query needs a plain segmentation network",
                         source=config.model)
    trained_patch = (state.get("config") or {}).get("patch_shape")
    with ExitStack() as stack:
        sources = []
        for spec in config.pool:
            vol = stack.enter_context(open_volume(spec))
            check_raw(vol)
            sources.append(vol)
        names = [str(v.spec) for v in sources]
        shapes = [v.shape for v in sources]
        if len({len(s) for s in shapes}) != 1:
            raise InputError("pool volumes must all be 2D or all 3D")
        patch = window_shape(config.patch_shape, trained_patch, shapes[0], model.ndim)
        check_divisible(patch, model.divisor, source="`patch_shape`")
        squeeze_leading_axis(patch, model.ndim)
        labels: dict[int, list[Any]] = {}
        for vol_index, specs in config.exclude_labels.items():
            if not 0 <= int(vol_index) < len(sources):
                raise InputError(f"`exclude_labels` names pool volume {vol_index}, but there are {len(sources)}")
            for spec in specs:
                labels.setdefault(int(vol_index), []).append(stack.enter_context(open_volume(spec)))
        boxes, ignored = _match_boxes(config.exclude_boxes, names)
        pool = build_pool(shapes, patch, candidates=config.candidates, rng=config.seed,
                          exclude_labels=labels, labelled_boxes=boxes, names=names)
        if len(pool.free_indices()) == 0:
            raise InputError("no candidate patch left after exclusions")
        n = min(int(config.n), len(pool.free_indices()))
        if not ask.plain_dense:
            return _ask_questions(config, ask, model, _n_classes(state), pool, sources, patch, ignored, device,
                                  t0, progress)
        if strat.needs_mc_dropout and not has_dropout(model):
            raise InputError(f"strategy {strat.name!r} samples dropout, but this network has no dropout "
                             "(train it with model.dropout > 0)")
        if config.scheduler is not None:
            scores = score_pool_on_cluster(config.model, pool, [str(v.spec) for v in sources], strat.name,
                                           mc_samples=config.mc_samples, reduction=config.reduction,
                                           batch_size=config.batch_size, device=config.device, seed=config.seed,
                                           precision=config.precision, fold=True, scheduler=config.scheduler, workers=config.workers, progress=progress)
        else:
            scores = score_pool(model, pool, sources, strat, mc_samples=config.mc_samples,
                                reduction=config.reduction, batch_size=config.batch_size, device=device,
                                progress=progress, seed=config.seed, precision=config.precision, fold=True)
        picks = select(pool, strat, n, scores=scores, rng=config.seed)
        queries = rank_queries(pool, picks, strat.name, scores)
        result = QueryResult(
            strat.name, str(config.model), patch, names, [tuple(s) for s in shapes], queries,
            n_candidates=len(pool.free_indices()), n_excluded=pool.n_excluded,
            n_labelled=int(pool.labelled.sum()), reduction=config.reduction,
            mc_samples=scores.mc_samples, seed=config.seed, ignored_boxes=ignored,
            seconds_scoring=scores.seconds)
        if config.export:
            export_crops(config.export, sources, queries, n_classes=_n_classes(state))
            result.outputs["export"] = str(config.export)
        _write(result, config, t0)
    return result


def _write(result: QueryResult, config: QueryConfig, t0: float, *, answers: bool = False) -> Path | None:
    """Record the total time and write the JSON and CSV of ``result`` (naming the answers file when
    there is one); the JSON's path, or None without ``config.out``."""
    result.seconds_total = time.perf_counter() - t0
    if not config.out:
        return None
    json_path, csv_path = query_paths(config.out)
    result.outputs["json"] = str(json_path)
    result.outputs["csv"] = str(csv_path)
    remove = False
    if answers:
        result.outputs["answers"] = str(answers_path(json_path))
    else:  # an answers file of an earlier query into the same `out` no longer belongs to these questions
        remove, note = stale_answers(answers_path(json_path))
        if note:
            result.notes.append(note)
    write_queries(result, config.out)
    if remove:
        answers_path(json_path).unlink(missing_ok=True)
    return json_path


def _n_classes(state: Mapping[str, Any]) -> int:
    """Classes of a checkpoint: its training config's ``n_classes``, else its output channels (>= 2)."""
    return int((state.get("config") or {}).get("n_classes") or max(2, state["model_config"]["out_channels"]))


def _check_ask(config: QueryConfig, ask: Ask) -> None:
    if ask.plain_dense:
        if config.budget is not None:
            raise InputError("`budget` applies to `ask` presence, partial, auto or a mix; `ask` dense picks "
                             "`n` patches by `strategy`")
        return
    if config.budget is None and (ask.shares is not None or len(ask.types) > 1):
        raise InputError(f"`ask` {ask.name} spends a budget: give `budget` (seconds)")
    if config.scheduler is not None:
        raise InputError("`scheduler` scores `ask` dense only")


def _ask_questions(config: QueryConfig, ask: Ask, model: Any, n_classes: int, pool: CandidatePool,
                   sources: Sequence[Any], patch: tuple[int, ...], ignored: int, device: Any, t0: float,
                   progress: Callable[[int, int], None] | None) -> QueryResult:
    """``--ask`` other than ``dense``: score the pool's class statistics, choose questions, write."""
    scores = score_pool(model, pool, sources, QUESTION_STRATEGY, reduction="sum", batch_size=config.batch_size,
                        device=device, progress=progress, seed=config.seed, precision=config.precision, fold=True)
    table = build_questions(pool, scores.scores, ask.types, config.costs)
    rows, spent = select_questions(pool, table, budget=config.budget, shares=ask.shares, types=ask.types,
                                   max_questions=None if config.budget is not None else int(config.n))
    questions = rank_questions(pool, table, rows, ask.name)
    counts = {t: sum(q.kind == t for q in questions) for t in ("dense", "partial", "presence")}
    result = QueryResult(
        ask.name, str(config.model), patch, list(pool.names), [tuple(s) for s in pool.volume_shapes], questions,
        n_candidates=len(pool.free_indices()), n_excluded=pool.n_excluded, n_labelled=int(pool.labelled.sum()),
        reduction="sum", mc_samples=None, seed=config.seed, ignored_boxes=ignored, seconds_scoring=scores.seconds,
        questions={"ask": ask.name, "budget": config.budget, "spent": spent, "n_questions": counts,
                   "n_classes": n_classes, "costs": config.costs.to_dict()})
    if config.export:
        crops = [q for q in questions if q.kind != "presence"]
        infos = [lazy_info(n_classes, labeled=range(n_classes) if q.kind == "dense" else [q.klass]) for q in crops]
        export_crops(config.export, sources, crops, n_classes=n_classes, infos=infos)
        result.outputs["export"] = str(config.export)
    json_path = _write(result, config, t0, answers=bool(counts["presence"]))
    if json_path is not None and counts["presence"]:
        write_answers_template(answers_path(json_path), questions, n_classes=n_classes, axes=result.axes,
                               source=str(json_path))
    return result
