"""Ask cheap questions: question types, their annotation cost and the budgeted question selector.

Active learning usually asks one kind of question: *label this patch densely*. Weaker questions
cost an annotator far less and still teach the network through the lazy-label loss
(:func:`emseg.losses.lazy_nll`, the ``info`` masks of ``docs/formats.md``):

``dense``
    label every class of a patch; ``mask_class_labeled`` all 1. Cost: voxels x
    :attr:`CostModel.dense_cost_per_voxel`.
``partial``
    label only class ``k`` in a patch; ``mask_class_labeled`` = ``k`` only (and, when class ``k``
    turns out to be absent, ``mask_class_not_present[k] = 1``). Cost: voxels x
    :attr:`CostModel.partial_cost_per_voxel`.
``presence``
    "is class ``k`` present anywhere in this box?"; a constant :attr:`CostModel.presence_cost`.
    "No" gives a lazy cube: labels all -1, ``mask_class_labeled`` all 0,
    ``mask_class_not_present[k] = 1``. "Yes" flags nothing (a follow-up ``partial`` or
    ``dense`` question on the box can use it).

The value of a question comes from one scoring pass of the pool with the existing scoring path
(:func:`~emseg.active.scoring.stream.score_pool` with :data:`QUESTION_STRATEGY`, whose score is
:func:`~emseg.active.scoring.criteria.class_statistics`): per candidate box ``x`` and class ``k`` the mass
``m_k = sum_i p_ik``, the uncertain mass ``u_k = sum_i p_ik H(p_i) / log C`` and the peak
``max_i p_ik``. Values are in "uncertain voxels" (the normalised entropy ``H/log C`` summed over
voxels), the uncertainty a question resolves:

* dense: ``sum_k u_k`` (the whole normalised entropy of the box);
* partial ``k``: ``u_k`` (the share of class ``k``);
* presence ``k``: ``(1 - max_i p_ik) u_k``: ``u_k`` is what a "no" resolves, and ``1 - max_i p_ik``
  bounds the probability of a "no" from above (class ``k`` is absent only if it is absent at the
  most likely voxel), with no independence assumption between voxels. A "yes" is taken as
  worth nothing.

:func:`select_questions` spends a budget (annotator seconds) greedily by value / cost, or in a
fixed mix of shares per type. Nothing here reads files: :mod:`emseg.active.query` runs it on a
pool (``emseg query --ask``), :mod:`emseg.active.questions.answers` turns answered presence questions into
lazy cubes and :mod:`emseg.active.simulation.ask` runs it in the simulated loop.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from emseg.active.selection.diversity import select_top
from emseg.active.pool import Box, CandidatePool
from emseg.active.registry import Strategy
from emseg.active.scoring.criteria import class_statistics
from emseg.errors import InputError

__all__ = [
    "QUESTION_STRATEGY",
    "QUESTION_TYPES",
    "Ask",
    "CostModel",
    "Question",
    "QuestionTable",
    "build_questions",
    "parse_ask",
    "parse_costs",
    "rank_questions",
    "select_questions",
]

#: The question types, in the order used for ties.
QUESTION_TYPES: tuple[str, ...] = ("dense", "partial", "presence")

#: The scoring "strategy" of the question selector: per-class statistics, one forward pass per patch.
#: Not in :data:`~emseg.active.registry.STRATEGIES` (it ranks questions, not patches).
QUESTION_STRATEGY = Strategy("questions", "uncertainty", False, False, class_statistics, select_top,
                             "per-class mass, uncertain mass and peak probability of each patch")


# ----------------------------------------------------------------------------- costs
@dataclass(frozen=True)
class CostModel:
    """Annotation cost of each question type, in seconds of an annotator.

    The defaults are assumptions, not measurements; set them to your own timings. Densely
    painting every class of a 128 x 128 patch of EM takes a few minutes (0.01 s per voxel: 164 s);
    outlining a single class a quarter of that (0.0025 s per voxel: 41 s); a yes/no look for one
    class in a box a few seconds (5 s, whatever the box size).

    Examples
    --------
    >>> CostModel().cost("dense", 128 * 128)
    163.84
    >>> CostModel(presence_cost=3.0).cost("presence", 10**6)
    3.0
    """

    #: Seconds per voxel of a dense question (every class labelled).
    dense_cost_per_voxel: float = 0.01
    #: Seconds per voxel of a partial question (one class labelled).
    partial_cost_per_voxel: float = 0.0025
    #: Seconds per presence question (one class, one box).
    presence_cost: float = 5.0

    def __post_init__(self) -> None:
        for f in ("dense_cost_per_voxel", "partial_cost_per_voxel", "presence_cost"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise InputError(f"cost {f} must be a positive number of seconds, got {v!r}")

    def cost(self, kind: str, n_voxels: int) -> float:
        """Seconds of one question of type ``kind`` on a box of ``n_voxels`` voxels."""
        if kind == "dense":
            return float(n_voxels) * self.dense_cost_per_voxel
        if kind == "partial":
            return float(n_voxels) * self.partial_cost_per_voxel
        if kind == "presence":
            return float(self.presence_cost)
        raise InputError(f"unknown question type {kind!r}; valid: {', '.join(QUESTION_TYPES)}")

    def to_dict(self) -> dict[str, float]:
        return {"dense_cost_per_voxel": self.dense_cost_per_voxel,
                "partial_cost_per_voxel": self.partial_cost_per_voxel, "presence_cost": self.presence_cost}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> CostModel:
        """From a mapping of field names, or of the short names ``dense``, ``partial``, ``presence``."""
        short = {"dense": "dense_cost_per_voxel", "partial": "partial_cost_per_voxel", "presence": "presence_cost"}
        known = set(short) | set(short.values())
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise InputError(f"unknown cost {key!r} (known: {', '.join(sorted(short.values()))})")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"cost {key} must be a number of seconds, got {value!r}")
            kwargs[short.get(key, key)] = float(value)
        return cls(**kwargs)


def parse_costs(text: str | None) -> CostModel:
    """``"dense=0.01,presence=3"`` -> :class:`CostModel` (unnamed costs keep their defaults).

    Examples
    --------
    >>> parse_costs("presence=3").presence_cost
    3.0
    """
    if not text:
        return CostModel()
    values: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            values[key.strip()] = float(value)
        except ValueError:
            raise InputError(f"`costs`: expected NAME=SECONDS items (dense, partial, presence), got {part!r}") from None
    return CostModel.from_mapping(values)


# ----------------------------------------------------------------------------- what to ask
@dataclass(frozen=True)
class Ask:
    """Which question types to ask: greedily by value / cost (``shares`` None) or in a fixed mix.

    ``shares[j]`` is the fraction of the budget spent on ``types[j]`` (normalised to sum 1), the
    types served in the given order.
    """

    types: tuple[str, ...]
    shares: tuple[float, ...] | None = None

    @property
    def name(self) -> str:
        if self.shares is None:
            return "+".join(self.types)
        return "+".join(f"{t}={s:g}" for t, s in zip(self.types, self.shares))

    @property
    def plain_dense(self) -> bool:
        """Only dense questions and no mix: the classic query (``--ask dense``)."""
        return self.types == ("dense",) and self.shares is None


def parse_ask(text: str) -> Ask:
    """Parse an ``--ask`` value (or a simulation arm).

    ``dense``, ``partial``, ``presence``; ``auto`` (all three, greedy); ``A+B`` (greedy among
    those types); ``A=0.7+B=0.3`` (a fixed mix of budget shares).

    Examples
    --------
    >>> parse_ask("presence+dense").name
    'dense+presence'
    >>> parse_ask("dense=3+presence=1").shares
    (0.75, 0.25)
    """
    text = str(text).strip().lower()
    if text == "auto":
        return Ask(QUESTION_TYPES)
    parts = [p.strip() for p in text.split("+")]
    types, shares = [], []
    for part in parts:
        name, sep, share = part.partition("=")
        name = name.strip()
        if name not in QUESTION_TYPES:
            raise InputError(f"unknown question type {name!r} in {text!r}; valid: {', '.join(QUESTION_TYPES)}, "
                             "auto, A+B (greedy) or A=SHARE+B=SHARE (fixed mix)")
        if name in types:
            raise InputError(f"question type {name!r} is listed twice in {text!r}")
        types.append(name)
        if sep:
            try:
                value = float(share)
            except ValueError:
                value = float("nan")
            if not (math.isfinite(value) and value > 0):
                raise InputError(f"share of {name!r} in {text!r} must be a positive number, got {share!r}")
            shares.append(value)
    if shares and len(shares) != len(types):
        raise InputError(f"{text!r}: give a share to every type (A=0.5+B=0.5) or to none (A+B)")
    if not shares:
        return Ask(tuple(t for t in QUESTION_TYPES if t in types))
    total = math.fsum(shares)
    return Ask(tuple(types), tuple(s / total for s in shares))


# ----------------------------------------------------------------------------- the question table
@dataclass
class QuestionTable:
    """Every question that may be asked of a pool, one row each.

    ``index`` the pool candidate, ``kind`` an index into :data:`QUESTION_TYPES`, ``klass`` the
    class (-1 for dense), ``value`` in uncertain voxels, ``cost`` in seconds; ``stats`` the
    candidate's ``(C, 3)`` class statistics (mass, uncertain mass, peak) per row.
    """

    index: np.ndarray
    kind: np.ndarray
    klass: np.ndarray
    value: np.ndarray
    cost: np.ndarray
    stats: np.ndarray

    def __len__(self) -> int:
        return int(len(self.index))

    def kind_name(self, row: int) -> str:
        return QUESTION_TYPES[int(self.kind[row])]


def build_questions(
    pool: CandidatePool,
    stats: np.ndarray,
    types: Sequence[str],
    costs: CostModel,
    *,
    asked: Mapping[int, Sequence[int]] | None = None,
    present: Mapping[int, Sequence[int]] | None = None,
) -> QuestionTable:
    """The questions of ``types`` on the free candidates of ``pool``, with value and cost.

    Parameters
    ----------
    pool : CandidatePool
    stats : numpy.ndarray
        ``(N, C, 3)`` class statistics from :func:`~emseg.active.scoring.stream.score_pool` with
        :data:`QUESTION_STRATEGY` and ``reduction="sum"`` (NaN rows for unscored candidates).
    types : sequence of str
        Question types to offer; partial and presence questions are asked for the foreground
        classes ``1..C-1``.
    costs : CostModel
    asked : mapping pool index -> classes, optional
        Classes already resolved in a box (outlined, or answered absent): those are not asked
        again, and the box gets no dense question.
    present : mapping pool index -> classes, optional
        Classes answered present in a box: no presence question for them again, but a follow-up
        partial question (and a dense one for a box with nothing in ``asked``) may be asked.

    Returns
    -------
    QuestionTable
    """
    stats = np.asarray(stats, dtype=np.float64)
    if stats.ndim != 3 or stats.shape[0] != len(pool) or stats.shape[2] != 3:
        raise ValueError(f"stats must have shape ({len(pool)}, C, 3), got {stats.shape}")
    unknown = [t for t in types if t not in QUESTION_TYPES]
    if unknown:
        raise InputError(f"unknown question type {unknown[0]!r}; valid: {', '.join(QUESTION_TYPES)}")
    asked = {int(i): {int(k) for k in ks} for i, ks in (asked or {}).items()}
    present = {int(i): {int(k) for k in ks} for i, ks in (present or {}).items()}
    n_classes = stats.shape[1]
    voxels = int(np.prod(pool.patch_shape))
    rows: list[tuple[int, int, int, float, float]] = []
    for i in pool.free_indices():
        s = stats[int(i)]
        if not np.isfinite(s).all():
            continue
        done, seen = asked.get(int(i), set()), present.get(int(i), set())
        umass, peak = s[:, 1], s[:, 2]
        if "dense" in types and not done:
            rows.append((int(i), 0, -1, float(umass.sum()), costs.cost("dense", voxels)))
        for k in range(1, n_classes):
            if k in done:
                continue
            if "partial" in types:
                rows.append((int(i), 1, k, float(umass[k]), costs.cost("partial", voxels)))
            if "presence" in types and k not in seen:
                rows.append((int(i), 2, k, float(max(0.0, 1.0 - peak[k]) * umass[k]), costs.cost("presence", voxels)))
    arr = np.array(rows, dtype=np.float64).reshape(-1, 5)
    index = arr[:, 0].astype(np.int64)
    return QuestionTable(index, arr[:, 1].astype(np.int64), arr[:, 2].astype(np.int64), arr[:, 3], arr[:, 4],
                         stats[index] if len(index) else np.zeros((0, n_classes, 3)))


def _greedy(pool: CandidatePool, table: QuestionTable, rows: np.ndarray, budget: Fraction | None,
            max_questions: int | None, state: dict[str, Any]) -> None:
    """Take ``rows`` (already in preference order) while they fit; updates ``state`` in place."""
    patch = np.asarray(pool.patch_shape, dtype=np.int64)
    spent: Fraction = Fraction(0)
    for r in rows:
        if max_questions is not None and len(state["picks"]) >= max_questions:
            break
        if not table.value[r] > 0:
            break  # rows come best first: nothing of value is left
        cost = Fraction(float(table.cost[r]))
        if budget is not None and spent + cost > budget:
            continue  # too dear for what is left; a cheaper question may still fit
        i, kind, k = int(table.index[r]), int(table.kind[r]), int(table.klass[r])
        classes = state["boxes"].get(i)
        if classes is not None and (kind == 0 or "dense" in classes or k in classes):
            continue
        if classes is None and pool.may_overlap and state["boxes"]:
            others = np.array([j for j in state["boxes"] if j != i], dtype=np.int64)
            if len(others):
                o = pool.offsets[others]
                hit = (pool.volume_index[others] == pool.volume_index[i]) & np.all(
                    (o < pool.offsets[i] + patch) & (pool.offsets[i] < o + patch), axis=1)
                if hit.any():
                    continue
        state["boxes"].setdefault(i, set()).add("dense" if kind == 0 else k)
        state["picks"].append(int(r))
        spent += cost
    state["spent"] += spent


def select_questions(
    pool: CandidatePool,
    table: QuestionTable,
    *,
    budget: float | None = None,
    shares: Sequence[float] | None = None,
    types: Sequence[str] | None = None,
    max_questions: int | None = None,
) -> tuple[np.ndarray, float]:
    """Choose questions from ``table`` within ``budget`` seconds; rows in pick order and the spend.

    **Greedy rule** (``shares`` None): sort every question by ``value / cost``, highest first (ties:
    type order dense, partial, presence, then lower candidate index, then lower class); walk the
    list and take a question when its cost fits into what is left of the budget, its box has no
    dense question yet (a dense question needs a box with no question), its class was not asked
    of the box yet, and (for pools whose candidates overlap) its box overlaps no other chosen box.
    A question too dear for the rest of the budget is skipped, so cheaper ones can still fill
    it; questions of value 0 are never asked.

    **Fixed mix** (``shares`` given, aligned with ``types``): type ``types[j]`` gets the share
    ``shares[j] / sum(shares)`` of the budget and spends it by the same rule among its own
    questions, the types served in order (boxes taken by an earlier type stay taken). Unspent
    money of one type is not passed on.

    The spend is accumulated exactly (rational arithmetic), so the chosen questions never cost
    more than ``budget``. Without ``budget``, ``max_questions`` questions are taken by the same rule.

    Returns
    -------
    rows : numpy.ndarray
        int64 rows of ``table``, in pick order.
    spent : float
        Sum of their costs.

    Examples
    --------
    >>> rows, spent = select_questions(pool, table, budget=600.0)  # doctest: +SKIP
    """
    if budget is None and max_questions is None:
        raise ValueError("give a budget or max_questions")
    if budget is not None and not (math.isfinite(budget) and budget >= 0):
        raise InputError(f"the budget must be a finite number of seconds >= 0, got {budget!r}")
    if max_questions is not None and max_questions < 0:
        raise ValueError(f"max_questions must be >= 0, got {max_questions}")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(table.cost > 0, table.value / table.cost, 0.0)
    order = np.lexsort((table.klass, table.index, table.kind, -ratio)) if len(table) else np.zeros(0, np.int64)
    state: dict[str, Any] = {"picks": [], "boxes": {}, "spent": Fraction(0)}
    total = None if budget is None else Fraction(float(budget))
    if shares is None:
        _greedy(pool, table, order, total, max_questions, state)
    else:
        if types is None or len(types) != len(shares):
            raise ValueError("a fixed mix needs one share per type")
        weights = [Fraction(float(s)) for s in shares]
        if any(w <= 0 for w in weights):
            raise InputError(f"mix shares must be > 0, got {list(shares)}")
        for t, w in zip(types, weights):
            code = QUESTION_TYPES.index(t)
            sub = None if total is None else total * w / sum(weights)
            _greedy(pool, table, order[table.kind[order] == code], sub, max_questions, state)
    return np.asarray(state["picks"], dtype=np.int64), float(state["spent"])


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Question:
    """One chosen question, ranked like a :class:`~emseg.active.query.Query` (``rank`` 1 first).

    ``score`` is the question's value (uncertain voxels), ``klass`` its class (``None`` for dense),
    ``cost`` its seconds; ``mass``, ``uncertain_mass`` and ``peak`` the model's statistics of the
    class in the box (for dense: summed over classes, and the box's highest class peak).
    """

    rank: int
    volume: str
    box: Box
    score: float | None
    strategy: str
    kind: str = "dense"
    klass: int | None = None
    cost: float = 0.0
    mass: float | None = None
    uncertain_mass: float | None = None
    peak: float | None = None

    def to_dict(self) -> dict[str, Any]:
        center = [o + (s - 1) / 2 for o, s in zip(self.box.offset, self.box.shape)]
        return {"rank": self.rank, "volume": self.volume, "volume_index": self.box.volume,
                "offset": list(self.box.offset), "shape": list(self.box.shape), "center": center,
                "score": self.score, "strategy": self.strategy, "question": self.kind, "class": self.klass,
                "cost": self.cost, "mass": self.mass, "uncertain_mass": self.uncertain_mass, "peak": self.peak}


def rank_questions(pool: CandidatePool, table: QuestionTable, rows: np.ndarray, strategy: str) -> list[Question]:
    """Picked rows of ``table`` as ranked :class:`Question` records."""
    out = []
    for rank, r in enumerate(np.asarray(rows, dtype=np.int64), start=1):
        box = pool.box(int(table.index[r]))
        kind, k, s = table.kind_name(int(r)), int(table.klass[r]), table.stats[r]
        if kind == "dense":
            mass, umass, peak, klass = None, float(s[:, 1].sum()), float(s[1:, 2].max(initial=0.0)), None
        else:
            mass, umass, peak, klass = float(s[k, 0]), float(s[k, 1]), float(s[k, 2]), k
        out.append(Question(rank, pool.names[box.volume], box, float(table.value[r]), strategy, kind, klass,
                            float(table.cost[r]), mass, umass, peak))
    return out
