"""Objects inside one block (numpy, scipy and scikit-image; no torch): the maps a mode reads from
class probabilities, and the labelling of a block.

Every map is pointwise in the probabilities (:func:`object_map`), so a voxel's map value does not
depend on the block it was read in; the seed region (:func:`seed_region`) needs ``seed_erosion``
voxels of context, the watershed (:func:`watershed_block`) a halo (see
:class:`~emseg.instances.config.SegmentConfig`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from skimage.segmentation import watershed
from scipy import ndimage

from emseg.instances.config import OUTSIDE, SegmentConfig


def neighbourhood(ndim: int, connectivity: int, per_section: bool) -> np.ndarray:
    """The boolean 3^ndim structuring element: faces (1), edges (2) or corners (3); with
    ``per_section`` a 3D element has no neighbour along z (objects stay in their section)."""
    structure = ndimage.generate_binary_structure(ndim, min(connectivity, ndim))
    if per_section and ndim == 3:
        structure = structure.copy()
        structure[0] = structure[2] = False
        flat = ndimage.generate_binary_structure(2, min(connectivity, 2))
        structure[1] = flat
    return structure


def class_probabilities(probs: np.ndarray) -> np.ndarray:
    """(C, *R) float32 probabilities; one channel p (a sigmoid network) becomes two, (1 - p, p)."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape[0] == 1:
        return np.concatenate([1 - probs, probs])
    return probs


def object_map(probs: np.ndarray, config: SegmentConfig) -> np.ndarray:
    """What a mode reads from probabilities (C, *R): the uint8 foreground mask of ``components``
    (argmax in ``classes``, or their summed probability > ``threshold``), or the float32 boundary
    probability of ``watershed`` (summed over ``boundary_classes``; :data:`~emseg.instances.config.OUTSIDE`
    where ``mask_classes`` exclude the voxel)."""
    probs = class_probabilities(probs)
    if config.mode == "watershed":
        boundary = np.sum(probs[list(config.boundary_classes)], axis=0, dtype=np.float32)
        if config.mask_classes is not None:  # outside the mask: above every probability (config.flood_mask)
            outside = np.sum(probs[list(config.mask_classes)], axis=0, dtype=np.float32) >= config.mask_threshold
            boundary[outside] = OUTSIDE
        return boundary
    if config.threshold is not None:
        return (np.sum(probs[list(config.classes)], axis=0, dtype=np.float32) > config.threshold).astype(np.uint8)
    return np.isin(np.argmax(probs, axis=0), config.classes).astype(np.uint8)


def map_dtype(config: SegmentConfig) -> np.dtype:
    """The sample type of :func:`object_map` for ``config.mode``."""
    return np.dtype(np.float32 if config.mode == "watershed" else np.uint8)


def seed_region(boundary: np.ndarray, config: SegmentConfig) -> np.ndarray:
    """Where seeds lie: boundary < ``seed_threshold``, eroded ``seed_erosion`` times.

    Voxels outside the array count as seed region, so that a cell at the volume's border keeps
    its seed; a block read with ``seed_erosion`` voxels of context is then exact in its inner part.
    """
    region = np.asarray(boundary) < config.seed_threshold
    if config.seed_erosion:
        structure = neighbourhood(region.ndim, config.connectivity, config.per_section)
        region = ndimage.binary_erosion(region, structure, iterations=config.seed_erosion, border_value=1)
    return region


def label_mask(mask: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of ``mask`` under ``structure``: (int32 labels 1..n, n)."""
    labels, n = ndimage.label(np.asarray(mask, dtype=bool), structure=structure)
    return labels, int(n)


def watershed_block(boundary: np.ndarray, seeds: np.ndarray, config: SegmentConfig) -> np.ndarray:
    """Seeded watershed of ``boundary`` from ``seeds`` (any integer ids, 0 = none): each voxel gets
    the id of the seed that floods it, 0 outside the flooding mask (``mask_threshold``,
    :meth:`~emseg.instances.config.SegmentConfig.flood_mask`) or where no seed reaches.

    With ``per_section`` a 3D block is flooded section by section. Seeds are renumbered to
    1..n for the flood and the ids given back, so that ids of any size pass.
    """
    seeds = np.asarray(seeds)
    ids, local = np.unique(seeds, return_inverse=True)
    local = local.reshape(seeds.shape).astype(np.int32)
    if ids[0] != 0:  # no background in the block: shift so that 0 keeps meaning "no seed"
        ids, local = np.concatenate([np.zeros(1, ids.dtype), ids]), local + 1
    if len(ids) == 1:
        return np.zeros(seeds.shape, dtype=seeds.dtype)
    boundary = np.asarray(boundary, dtype=np.float32)
    mask = config.flood_mask(boundary)
    connectivity = config.connectivity
    if config.per_section and boundary.ndim == 3:
        out = np.zeros(local.shape, dtype=np.int32)
        for z in range(boundary.shape[0]):
            if local[z].any():
                out[z] = watershed(boundary[z], local[z], connectivity=min(connectivity, 2),
                                   mask=None if mask is None else mask[z])
    else:
        out = watershed(boundary, local, connectivity=min(connectivity, boundary.ndim), mask=mask)
    return ids[out]


def crop(array: np.ndarray, region: Sequence[slice], inner: Sequence[slice]) -> np.ndarray:
    """The part ``inner`` (volume coordinates) of ``array``, which holds ``region``."""
    return array[tuple(slice(i.start - r.start, i.stop - r.start) for i, r in zip(inner, region))]


def grow(inner: Sequence[slice], halo: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """``inner`` grown by ``halo`` on each side, clipped to the volume ``shape``."""
    return tuple(slice(max(0, s.start - h), min(n, s.stop + h)) for s, h, n in zip(inner, halo, shape))
