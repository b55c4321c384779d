"""Active-learning scores and batch selection (Roels & Saeys, EM segmentation).

Uncertainty scores reduce pixel-wise criteria to one value per sample; selectors turn scores
and/or embeddings into indices to label; :data:`STRATEGIES` names the combinations.
:mod:`~emseg.active.pool` builds candidate pools and scores them batch by batch,
:mod:`~emseg.active.export` writes the queries and crops, and :mod:`~emseg.active.simulate`
runs the simulated active-learning experiment (its names are loaded on first use).
"""

from __future__ import annotations

from .diversity import (
    HYBRID_TOP_M_FACTOR,
    hybrid_select,
    kcenter_greedy,
    kcenter_greedy_naive,
    kmeans_select,
    random_select,
    select_top,
)
from .export import export_crops, read_query_boxes, write_queries
from .pool import (
    Box,
    CandidatePool,
    PoolScores,
    Query,
    QueryConfig,
    QueryResult,
    build_pool,
    query_files,
    score_pool,
    select,
)
from .registry import KINDS, STRATEGIES, Strategy, get_strategy
from .scores import REDUCTIONS, BaldAccumulator, bald, entropy, least_confidence

_SIMULATE_NAMES = ("SimulateConfig", "SimulationResult", "load_simulate_config", "run_simulation")

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
    "kcenter_greedy_naive",
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
    *_SIMULATE_NAMES,
]


def __getattr__(name: str):
    # The simulation pulls in the training loop; import it only when asked for.
    if name in _SIMULATE_NAMES:
        from . import simulate

        return getattr(simulate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
