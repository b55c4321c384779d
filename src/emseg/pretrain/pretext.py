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

``contrastive`` (dense self-distillation without negatives, VICReg's loss per voxel): two views of
each patch, each with its own intensity jitter (gain 0.7-1.3 about the patch mean, offset
+-0.15, a Gaussian blur of sigma 0.5-1.5 in-plane on half of the views, white noise of standard
deviation up to ``noise_std``), the second also turned by one of the in-plane rotations and
flips (the eight of the square; the four that keep a non-square patch's shape); the network maps
both to ``embed_dim`` channels per voxel, the second map is turned back, and the loss compares the
two maps at up to 4,096 voxels of the batch drawn at random: ``25 * invariance + 25 * (variance +
variance') / 2 + (covariance + covariance')`` (VICReg, Bardes et al. 2022, with the weights and the
halved variance term of the authors' implementation, for which the weights were chosen;
invariance: the mean squared difference over voxels and channels; variance: the mean over
channels of ``max(0, 1 - sqrt(var + 1e-4))``; covariance: the squared off-diagonal covariances
divided by ``embed_dim``).
The network learns what stays the same under the jitter and the turn, without a reconstruction.

Intensities are those the segmentation network sees: raw values scaled to [0, 1]
(:func:`emseg.data.to_float`), after augmentation.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

#: The pretext families ``[pretext] kind`` selects.
KINDS = ("masked", "denoise", "contrastive")
#: ``contrastive``: weights of VICReg's invariance, variance and covariance terms.
VICREG_WEIGHTS = (25.0, 25.0, 1.0)
#: ``contrastive``: voxels of a batch the loss compares (drawn without replacement each step).
CONTRASTIVE_VOXELS = 4096


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


def turn(x: np.ndarray, k: int, flip: int) -> np.ndarray:
    """``x`` rotated ``k`` quarter turns in its last two axes, then mirrored along the last if ``flip``."""
    out = np.rot90(x, k, axes=(-2, -1))
    return np.ascontiguousarray(out[..., ::-1] if flip else out)


def turn_back(x: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Undo :func:`turn` on each sample of ``x`` (B, C, *S); ``transforms`` (B, 2) holds ``(k, flip)``."""
    out = []
    for sample, (k, flip) in zip(x, transforms.tolist()):
        sample = sample.flip(-1) if flip else sample
        out.append(torch.rot90(sample, -k, dims=(-2, -1)))
    return torch.stack(out)


def jitter(patch: np.ndarray, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """One view of a (1, *S) patch: gain and offset, an in-plane blur on half of the views, white noise."""
    mean = float(patch.mean())
    out = (patch - mean) * np.float32(rng.uniform(0.7, 1.3)) + np.float32(mean + rng.uniform(-0.15, 0.15))
    if rng.random() < 0.5:
        sigma = rng.uniform(0.5, 1.5)
        out = ndimage.gaussian_filter(out, sigma=(0,) * (out.ndim - 2) + (sigma, sigma))
    out = out + np.float32(rng.uniform(0.0, noise_std)) * rng.standard_normal(out.shape, dtype=np.float32)
    return out.astype(np.float32)


def two_views(raw: np.ndarray, pretext, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``contrastive``: ``raw`` (first views), ``view`` (second views, turned), ``transforms`` (B, 2)
    and ``voxels``, the flat indices of the (B, *S) voxels the loss compares."""
    spatial = raw.shape[2:]
    square = spatial[-1] == spatial[-2]
    first, second, transforms = [], [], []
    for patch in raw:
        k, flip = (int(rng.integers(4)) if square else 2 * int(rng.integers(2))), int(rng.integers(2))
        first.append(jitter(patch, pretext.noise_std, rng))
        second.append(turn(jitter(patch, pretext.noise_std, rng), k, flip))
        transforms.append((k, flip))
    n = raw.shape[0] * math.prod(spatial)
    voxels = rng.choice(n, size=min(CONTRASTIVE_VOXELS, n), replace=False) if n > CONTRASTIVE_VOXELS \
        else np.arange(n)
    return {"raw": np.stack(first), "view": np.stack(second), "transforms": np.asarray(transforms, dtype=np.int64),
            "voxels": np.asarray(voxels, dtype=np.int64)}


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, voxels: torch.Tensor | None = None,
                weights: Sequence[float] = VICREG_WEIGHTS) -> torch.Tensor:
    """VICReg's loss between two aligned (B, C, *S) maps at the flat (B, *S) indices ``voxels`` (all
    without), in float32.

    Examples
    --------
    >>> z = torch.randn(2, 8, 16, 16)
    >>> bool(vicreg_loss(z, z) < vicreg_loss(z, torch.randn(2, 8, 16, 16)))
    True
    """
    def rows(z):
        flat = z.float().movedim(1, -1).reshape(-1, z.shape[1])
        return flat if voxels is None else flat[voxels]

    a, b = rows(z1), rows(z2)

    def variance(z):
        return F.relu(1.0 - torch.sqrt(z.var(dim=0) + 1e-4)).mean()

    def covariance(z):
        z = z - z.mean(dim=0)
        cov = z.T @ z / max(z.shape[0] - 1, 1)
        return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / z.shape[1]

    w_inv, w_var, w_cov = weights
    return (w_inv * F.mse_loss(a, b) + w_var * (variance(a) + variance(b)) / 2
            + w_cov * (covariance(a) + covariance(b)))


def make_pretext_batch(raw: np.ndarray, pretext, ndim: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Network input ``raw``, ``target`` and, for ``masked``, ``mask`` (1 = hidden) for a batch; for
    ``contrastive``, the two views (:func:`two_views`).

    ``raw`` is (B, 1, *S) float32 with ``len(S) == ndim``; ``pretext`` a
    :class:`~emseg.pretrain.config.PretextConfig`.
    """
    raw = np.asarray(raw, dtype=np.float32)
    spatial = raw.shape[2:]
    if pretext.kind == "contrastive":
        return two_views(raw, pretext, rng)
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
