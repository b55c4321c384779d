"""Pretext tasks: turn a batch of raw patches into (network input, target, loss weights).

``masked`` (masked-image modelling for CNNs): the patch is tiled into blocks (``block`` voxels
in-plane, ``block_z`` sections deep in 3D; ``block_z = 1`` masks each section on its own), a fixed
share ``mask_ratio`` of the blocks is drawn without replacement and hidden (their voxels set to 0
in the network input), and the network reconstructs the hidden voxels' intensities: the loss is
the mean squared error over hidden voxels only. With ``norm_target`` the target is the patch
standardised to zero mean and unit variance (statistics of the whole clean patch).

``denoise`` (Gaussian denoising): the input is the patch plus white Gaussian noise of standard
deviation ``noise_std`` (in the [0, 1] intensity units of the network input), the target is the
clean patch, and the loss is the mean squared error over all voxels.

Intensities are those the segmentation network sees: raw values scaled to [0, 1]
(:func:`emseg.data.to_float`), after augmentation.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

#: The pretext families ``[pretext] kind`` selects.
KINDS = ("masked", "denoise")


def block_mask(shape: Sequence[int], block: Sequence[int], ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of ``shape``: ``round(ratio * n)`` of the ``n`` blocks tiling it hidden (True).

    The grid starts at the patch corner; blocks at the far border are cut to the patch. At least
    one block is hidden and at least one stays visible (when there are two or more).

    Examples
    --------
    >>> m = block_mask((32, 32), (16, 16), 0.5, np.random.default_rng(0))
    >>> int(m.sum()), m.shape
    (512, (32, 32))
    """
    shape, block = tuple(int(s) for s in shape), tuple(int(b) for b in block)
    grid = tuple(math.ceil(s / b) for s, b in zip(shape, block))
    n = math.prod(grid)
    k = min(max(1, round(ratio * n)), max(1, n - 1))
    flat = np.zeros(n, dtype=bool)
    flat[rng.permutation(n)[:k]] = True
    mask = flat.reshape(grid)
    for axis, b in enumerate(block):
        mask = np.repeat(mask, b, axis=axis)
    return np.ascontiguousarray(mask[tuple(slice(0, s) for s in shape)])


def standardise(patch: np.ndarray) -> np.ndarray:
    """``(patch - mean) / std`` over the whole patch (std floored at 1e-6)."""
    patch = np.asarray(patch, dtype=np.float32)
    return ((patch - patch.mean()) / max(float(patch.std()), 1e-6)).astype(np.float32)


def _patch_mask(spatial: Sequence[int], pretext, ndim: int, rng: np.random.Generator) -> np.ndarray:
    """One patch's mask: 2D blocks; in 3D, ``block_z``-deep blocks, or with ``block_z = 1`` the
    same share of 2D blocks hidden in every section, drawn section by section."""
    plane = (pretext.block,) * 2
    if ndim == 2:
        return block_mask(spatial, plane, pretext.mask_ratio, rng)
    if pretext.block_z == 1:
        return np.stack([block_mask(spatial[1:], plane, pretext.mask_ratio, rng) for _ in range(spatial[0])])
    return block_mask(spatial, (pretext.block_z,) + plane, pretext.mask_ratio, rng)


def make_pretext_batch(raw: np.ndarray, pretext, ndim: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Network input ``raw``, ``target`` and, for ``masked``, ``mask`` (1 = hidden) for a batch.

    ``raw`` is (B, 1, *S) float32 with ``len(S) == ndim``; ``pretext`` a
    :class:`~emseg.pretrain.config.PretextConfig`.
    """
    raw = np.asarray(raw, dtype=np.float32)
    spatial = raw.shape[2:]
    if pretext.kind == "denoise":
        noisy = raw + np.float32(pretext.noise_std) * rng.standard_normal(raw.shape, dtype=np.float32)
        return {"raw": noisy.astype(np.float32), "target": raw.copy()}
    masks = np.stack([_patch_mask(spatial, pretext, ndim, rng) for _ in range(raw.shape[0])])[:, None]
    target = np.stack([standardise(p) for p in raw]) if pretext.norm_target else raw.copy()
    return {"raw": np.where(masks, np.float32(0), raw).astype(np.float32), "target": target,
            "mask": masks.astype(np.float32)}


def pretext_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error (float32) over the voxels where ``mask`` is 1, or over all without a mask.

    Examples
    --------
    >>> p, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    >>> float(pretext_loss(p, t, torch.tensor([[0.0, 1.0]])))
    4.0
    """
    err = (prediction.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    mask = mask.float()
    return (err * mask).sum() / mask.sum().clamp(min=1.0)
