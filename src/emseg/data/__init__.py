"""Training data: cubes of raw + labels, patch sampling weighted by ``prio``, augmentation."""
from __future__ import annotations

from emseg.data.augment import Augmenter
from emseg.data.sampling import Cube, PatchSampler, close_cubes, open_cubes
from emseg.data.values import to_float

__all__ = ["Augmenter", "Cube", "PatchSampler", "close_cubes", "open_cubes", "to_float"]
