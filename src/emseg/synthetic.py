"""A synthetic EM-like volume with labels, the embedded default for demos and tests.

Cells are Voronoi regions whose boundaries are dark membranes; mitochondria are dark, textured
ellipsoids inside cells; the image gets blur, shot-like noise and slowly varying illumination.
Classes: 0 background (cytoplasm), 1 membrane, 2 mitochondria. Sections are independent 2D
images with slowly drifting seeds, like anisotropic ssTEM.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import segmentation

CLASSES = ("background", "membrane", "mitochondria")


@dataclass(frozen=True)
class SyntheticVolume:
    raw: np.ndarray  # uint8 (z, y, x)
    label: np.ndarray  # uint8 (z, y, x), values 0..2
    classes: tuple[str, ...] = CLASSES


def make_volume(shape=(8, 256, 256), *, n_cells: int = 40, n_mito: int = 30, rng=None) -> SyntheticVolume:
    """Generate raw and labels of ``shape`` (z, y, x); 2D shapes give one section.

    Examples
    --------
    >>> vol = make_volume((2, 64, 64), rng=0)
    >>> vol.raw.shape, vol.raw.dtype, int(vol.label.max()) <= 2
    ((2, 64, 64), dtype('uint8'), True)
    """
    rng = np.random.default_rng(rng)
    flat = len(shape) == 2
    z, h, w = (1,) + tuple(shape) if flat else tuple(shape)
    seeds = rng.uniform((0, 0), (h, w), size=(n_cells, 2))
    mito = np.column_stack([
        rng.uniform(0, h, n_mito), rng.uniform(0, w, n_mito),
        rng.uniform(3, 9, n_mito), rng.uniform(2, 5, n_mito), rng.uniform(0, np.pi, n_mito),
    ])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    raws, labels = [], []
    for _ in range(z):
        seeds = seeds + rng.normal(0, 1.0, seeds.shape)
        mito[:, :2] += rng.normal(0, 0.7, (n_mito, 2))
        markers = np.zeros((h, w), dtype=np.int32)
        iy = np.clip(seeds[:, 0].astype(int), 0, h - 1)
        ix = np.clip(seeds[:, 1].astype(int), 0, w - 1)
        markers[iy, ix] = np.arange(1, n_cells + 1)
        dist = ndimage.distance_transform_edt(markers == 0)
        cells = segmentation.watershed(dist, markers)
        membrane = segmentation.find_boundaries(cells, mode="thick")
        label = np.zeros((h, w), dtype=np.uint8)
        for cy, cx, a, b, theta in mito:
            dy, dx = yy - cy, xx - cx
            u = dx * np.cos(theta) + dy * np.sin(theta)
            v = -dx * np.sin(theta) + dy * np.cos(theta)
            label[(u / a) ** 2 + (v / b) ** 2 <= 1] = 2
        label[membrane] = 1
        img = np.full((h, w), 0.72, dtype=np.float32)
        img += ndimage.gaussian_filter(rng.normal(0, 0.08, (h, w)), 2).astype(np.float32)  # cytoplasm texture
        img[label == 1] = 0.22
        mito_tex = 0.38 + 0.12 * np.sin(yy * 0.9 + xx * 0.4)
        img[label == 2] = mito_tex[label == 2]
        img = ndimage.gaussian_filter(img, 1.0)
        img *= 1 + 0.1 * np.sin(yy / h * np.pi + rng.uniform(0, np.pi)) * np.cos(xx / w * np.pi)
        img += rng.normal(0, 0.06, (h, w))
        raws.append(np.clip(img * 255, 0, 255).astype(np.uint8))
        labels.append(label)
    raw, label = np.stack(raws), np.stack(labels)
    if flat:
        raw, label = raw[0], label[0]
    return SyntheticVolume(raw, label)
