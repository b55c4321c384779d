"""Active-learning scores and batch selection (Roels & Saeys, EM segmentation).

Uncertainty scores reduce pixel-wise criteria to one value per sample; selectors turn scores
and/or embeddings into indices to label; :data:`STRATEGIES` names the combinations.
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
from .registry import KINDS, STRATEGIES, Strategy, get_strategy
from .scores import REDUCTIONS, BaldAccumulator, bald, entropy, least_confidence

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
]
