"""Patch augmentation: flips, in-plane 90 degree rotations, brightness/contrast, elastic."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Augmenter:
    """Random augmentation of one (raw, label) patch pair; the same geometry is applied to both.

    ``flip``: mirror each spatial axis with probability 1/2. ``rotate90``: rotate the last two axes
    by a random multiple of 90 degrees (square patches only). ``brightness``/``contrast``: add
    U(-b, b) and scale by U(1-c, 1+c) around the patch mean (raw only). ``elastic``: smooth random
    in-plane displacement of ``elastic_alpha`` voxels (std) smoothed by ``elastic_sigma``; labels
    are resampled with nearest neighbour.

    The ``[augment]`` table of a training config is read into this class (its defaults are the
    table's: :data:`emseg.engine.config.AugmentConfig` is this class).
    """

    flip: bool = True
    rotate90: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    elastic: bool = False
    elastic_alpha: float = 4.0
    elastic_sigma: float = 8.0

    def __call__(self, raw: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        if self.flip:
            for axis in range(raw.ndim):
                if rng.random() < 0.5:
                    raw, label = np.flip(raw, axis), np.flip(label, axis)
        if self.rotate90 and raw.shape[-1] == raw.shape[-2]:
            k = int(rng.integers(4))
            raw, label = np.rot90(raw, k, axes=(-2, -1)), np.rot90(label, k, axes=(-2, -1))
        if self.elastic:
            raw, label = self._elastic(raw, label, rng)
        if self.contrast:
            mean = raw.mean()
            raw = (raw - mean) * rng.uniform(1 - self.contrast, 1 + self.contrast) + mean
        if self.brightness:
            raw = raw + rng.uniform(-self.brightness, self.brightness)
        return np.ascontiguousarray(raw, dtype=np.float32), np.ascontiguousarray(label)

    def _elastic(self, raw, label, rng):
        plane = raw.shape[-2:]
        grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in plane], indexing="ij")
        shifts = [
            ndimage.gaussian_filter(rng.standard_normal(plane).astype(np.float32), self.elastic_sigma)
            for _ in range(2)
        ]
        coords = []
        for g, d in zip(grids, shifts):
            std = d.std()
            coords.append(g + (d / std * self.elastic_alpha if std > 0 else 0))

        def warp(img, order, mode):
            flat = img.reshape((-1,) + plane)
            out = np.stack([ndimage.map_coordinates(s, coords, order=order, mode=mode) for s in flat])
            return out.reshape(img.shape)

        return warp(raw, 1, "reflect"), warp(label, 0, "nearest")
