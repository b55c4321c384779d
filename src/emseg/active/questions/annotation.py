"""What answered questions say about a box: its lazy-label ``info`` masks and training labels.

The annotation side of :mod:`emseg.active.questions.types`: :func:`lazy_info` builds the masks of
``docs/formats.md``, :func:`oracle_answer` answers from ground truth (the simulation), and
:func:`box_annotation` turns a box's :class:`BoxKnowledge` (dense, outlined classes, classes absent)
into labels and masks. :mod:`emseg.active.questions.answers` writes them as lazy cubes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BoxKnowledge", "box_annotation", "lazy_info", "oracle_answer"]


def lazy_info(n_classes: int, *, labeled: Sequence[int] = (), not_present: Sequence[int] = ()) -> np.ndarray:
    """The ``(2, n_classes)`` uint8 ``info`` masks: row 0 ``mask_class_labeled``, row 1 ``mask_class_not_present``.

    Examples
    --------
    >>> lazy_info(3, not_present=[2]).tolist()
    [[0, 0, 0], [0, 0, 1]]
    """
    info = np.zeros((2, int(n_classes)), dtype=np.uint8)
    info[0, list(labeled)] = 1
    info[1, list(not_present)] = 1
    return info


def oracle_answer(kind: str, klass: int | None, truth: np.ndarray) -> bool | None:
    """The ground truth's answer: for presence, whether class ``klass`` occurs in ``truth``
    (the box's labels); ``None`` for dense and partial questions (answered by their labels)."""
    if kind == "presence":
        return bool(np.any(np.asarray(truth) == int(klass)))
    return None


@dataclass
class BoxKnowledge:
    """What the answers say about one box: labelled densely, classes outlined, classes absent,
    and the seconds spent on it."""

    dense: bool = False
    partial: set[int] = field(default_factory=set)
    absent: set[int] = field(default_factory=set)
    cost: float = 0.0


def box_annotation(n_classes: int, knowledge: BoxKnowledge, shape: Sequence[int],
                   truth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The label and ``info`` of a box of ``shape`` from what was asked of it (``None``: nothing to
    train on).

    Dense: the truth, every class labelled. Otherwise labels are -1 except the voxels of the
    outlined (partial) classes, which need ``truth``; ``mask_class_labeled`` = the outlined classes,
    ``mask_class_not_present`` = the classes answered absent (a partial class with no voxel counts
    as absent). A box with only "yes" answers carries no lazy-label information: ``None``.

    Examples
    --------
    >>> label, info = box_annotation(3, BoxKnowledge(absent={2}), (1, 2, 2))
    >>> int(label.max()), info.tolist()
    (-1, [[0, 0, 0], [0, 0, 1]])
    """
    shape = tuple(int(s) for s in shape)
    if (knowledge.dense or knowledge.partial) and (truth is None or np.shape(truth) != shape):
        raise ValueError(f"a dense or partial box needs its labels of shape {shape}")
    if knowledge.dense:
        return np.asarray(truth, dtype=np.int16), lazy_info(n_classes, labeled=range(n_classes))
    absent, labeled = set(knowledge.absent), set()
    label = np.full(shape, -1, dtype=np.int16)
    for k in sorted(knowledge.partial):
        hit = np.asarray(truth) == k
        if hit.any():
            label[hit] = k
            labeled.add(k)
        else:
            absent.add(k)
    if absent & labeled:
        raise ValueError(f"classes {sorted(absent & labeled)} are both outlined and absent")
    if not labeled and not absent:
        return None
    return label, lazy_info(n_classes, labeled=sorted(labeled), not_present=sorted(absent))
