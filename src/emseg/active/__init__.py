"""Active-learning scores and batch selection (Roels & Saeys, EM segmentation).

Uncertainty scores reduce pixel-wise criteria to one value per sample; selectors turn scores
and/or embeddings into indices to label; :data:`STRATEGIES` names the combinations.
:mod:`~emseg.active.pool` builds candidate pools, :mod:`~emseg.active.scoring.stream` scores them batch
by batch (in this process or on a cluster), :mod:`~emseg.active.selection.select` picks a batch,
:mod:`~emseg.active.query` is the ``emseg query`` pipeline, :mod:`~emseg.active.results` writes the
queries and crops, and :mod:`~emseg.active.simulation.loop` runs the simulated active-learning experiment.
:mod:`~emseg.active.questions.types` asks cheaper questions than dense patches (partial, presence) within
an annotation budget, and :mod:`~emseg.active.questions.answers` turns answered presence questions into lazy cubes.
"""

from __future__ import annotations

from emseg.active.selection.diversity import (
    HYBRID_TOP_M_FACTOR,
    hybrid_select,
    kcenter_greedy,
    kmeans_select,
    random_select,
    select_top,
)
from emseg.active.questions.answers import answers_to_cubes, read_answers
from emseg.active.results import export_crops, read_query_boxes, write_queries
from emseg.active.pool import Box, CandidatePool, build_pool
from emseg.active.query import Query, QueryConfig, QueryResult, query_files
from emseg.active.questions.types import QUESTION_TYPES, CostModel, build_questions, parse_ask, select_questions
from emseg.active.registry import KINDS, STRATEGIES, Strategy, get_strategy
from emseg.active.scoring.criteria import (
    REDUCTIONS,
    BaldAccumulator,
    bald,
    class_mass,
    class_statistics,
    entropy,
    least_confidence,
    uncertain_class_mass,
)
from emseg.active.scoring.stream import PoolScores, score_pool
from emseg.active.selection.select import select
from emseg.active.simulation.loop import SimulateConfig, SimulationResult, load_simulate_config, run_simulation

__all__ = [
    "HYBRID_TOP_M_FACTOR",
    "KINDS",
    "REDUCTIONS",
    "STRATEGIES",
    "BaldAccumulator",
    "Strategy",
    "bald",
    "entropy",
    "get_strategy",
    "hybrid_select",
    "kcenter_greedy",
    "kmeans_select",
    "least_confidence",
    "random_select",
    "select_top",
    "Box",
    "CandidatePool",
    "PoolScores",
    "Query",
    "QueryConfig",
    "QueryResult",
    "build_pool",
    "export_crops",
    "query_files",
    "read_query_boxes",
    "score_pool",
    "select",
    "write_queries",
    "SimulateConfig",
    "SimulationResult",
    "load_simulate_config",
    "run_simulation",
    "QUESTION_TYPES",
    "CostModel",
    "answers_to_cubes",
    "build_questions",
    "class_mass",
    "class_statistics",
    "parse_ask",
    "read_answers",
    "select_questions",
    "uncertain_class_mass",
]

