"""Named active-learning strategies and what each one needs from the model.

Each :class:`Strategy` says which kind of criterion it is and which model outputs it needs;
its functions follow one calling convention per ``kind``:

``"uncertainty"``
    ``score_fn(probs, reduction)`` -> ``(B,)`` scores (for BALD ``probs`` is the
    ``(T, B, C, *S)`` stack of dropout passes), then ``select_fn(scores, n)`` (=
    :func:`~emseg.active.selection.diversity.select_top`).
``"diversity"``
    ``select_fn(embeddings, n, ...)`` with ``rng`` (k-means) or ``labeled_idx`` (core-set).
``"hybrid"``
    ``score_fn`` as for uncertainty, then ``select_fn(scores, embeddings, n, labeled_idx=...)``.
``"random"``
    ``select_fn(n_total, n, rng)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from emseg.active.selection.diversity import hybrid_select, kcenter_greedy, kmeans_select, random_select, select_top
from emseg.active.scoring.criteria import bald, entropy, least_confidence

from emseg.errors import InputError

__all__ = ["KINDS", "STRATEGIES", "Strategy", "get_strategy"]

#: Valid values of :attr:`Strategy.kind`.
KINDS: tuple[str, ...] = ("uncertainty", "diversity", "hybrid", "random")


@dataclass(frozen=True)
class Strategy:
    """Description of one sample-selection strategy.

    Attributes
    ----------
    name : str
        Registry key.
    kind : {"uncertainty", "diversity", "hybrid", "random"}
        Family of the criterion; fixes the calling convention (see module docstring).
    needs_mc_dropout : bool
        Whether ``score_fn`` expects ``T`` stochastic (dropout-on) passes ``(T, B, C, *S)``.
    needs_embeddings : bool
        Whether ``select_fn`` needs ``(N, D)`` sample embeddings (U-Net bottleneck features).
    score_fn : callable or None
        Per-sample score from probabilities (higher = select first); ``None`` if unused.
    select_fn : callable
        Turns scores and/or embeddings into selected indices.
    description : str
        One-line summary.

    Examples
    --------
    >>> get_strategy("bald").needs_mc_dropout
    True
    """

    name: str
    kind: str
    needs_mc_dropout: bool
    needs_embeddings: bool
    score_fn: Callable[..., object] | None
    select_fn: Callable[..., object]
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if (self.score_fn is not None) != (self.kind in ("uncertainty", "hybrid")):
            raise ValueError(
                f"strategy {self.name!r}: score_fn must be given exactly for the "
                "uncertainty and hybrid kinds"
            )

    @property
    def needs_scores(self) -> bool:
        """Whether the strategy uses model probabilities (has a ``score_fn``)."""
        return self.score_fn is not None


#: All strategies by name.
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("random", "random", False, False, None, random_select,
                 "uniform random sampling (baseline)"),
        Strategy("entropy", "uncertainty", False, False, entropy, select_top,
                 "highest mean pixel-wise entropy"),
        Strategy("least_confidence", "uncertainty", False, False, least_confidence, select_top,
                 "highest mean pixel-wise 1 - max class probability"),
        Strategy("bald", "uncertainty", True, False, bald, select_top,
                 "highest mean pixel-wise mutual information over MC-dropout passes"),
        Strategy("kmeans", "diversity", False, True, None, kmeans_select,
                 "sample nearest each k-means centroid of the embeddings"),
        Strategy("coreset", "diversity", False, True, None, kcenter_greedy,
                 "greedy k-center core-set on the embeddings"),
        Strategy("hybrid", "hybrid", False, True, entropy, hybrid_select,
                 "k-center core-set among the 4n highest-entropy samples"),
    )
}


def get_strategy(name: str) -> Strategy:
    """Look up a strategy by name (case-insensitive; ``-`` is read as ``_``).

    Parameters
    ----------
    name : str
        One of the keys of :data:`STRATEGIES`.

    Returns
    -------
    Strategy

    Examples
    --------
    >>> get_strategy("least-confidence").kind
    'uncertainty'
    """
    key = str(name).strip().lower().replace("-", "_")
    try:
        return STRATEGIES[key]
    except KeyError:
        raise InputError(
            f"unknown strategy {name!r}; valid names: {', '.join(sorted(STRATEGIES))}"
        ) from None
