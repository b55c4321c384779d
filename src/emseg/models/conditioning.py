"""How a conditioned U-Net reads its condition (label-conditioned segmentation).

The raw condition is a tensor (N, C, *P): for LCS the atlas image and the binary atlas mask of the
class to segment, with the spatial shape of the atlas patch. :meth:`UNet.condition` turns it into
a :class:`ConditionCode` once (per label at inference), and :meth:`UNet.decode` applies the code.

``conditioning`` choices:

* ``"maxpool"`` -- the first implementation: the condition max-pooled to the bottleneck,
  concatenated to the bottleneck features and mixed by a conv block (normalised after the
  concatenation). Kept so that checkpoints written with it load and predict as before.
* ``"atlas"`` -- the seed method, repaired: the condition is *area*-pooled (averaged) to the
  bottleneck, so a mask keeps the fraction of each cell the class covers, and concatenated there.
  The convolution over the concatenation is split into its image part, which is normalised, and
  its condition part, added after the normalisation. Because every later group or instance
  normalisation would again remove a condition that is uniform over the patch, the pooled
  condition is also added (1 x 1 convolution, nearest up-sampling) after every decoder level.
* ``"prototype"`` -- alignment-free: the atlas image goes through the network's own encoder;
  masked average pooling of its features at every level (area-pooled mask) gives a class
  prototype and a background prototype. A small MLP maps them to FiLM parameters (per-channel
  scale and shift), applied after the bottleneck and after every decoder level. The code is one
  vector per class, valid at every position of any image, whatever the atlas layout.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
import torch.nn.functional as F

CONDITIONINGS = ("maxpool", "atlas", "prototype")


class ConditionCode:
    """A condition turned into what :meth:`UNet.decode` consumes (N rows, or 1 row for any batch).

    ``kind`` names the conditioning that made it; ``value`` is a tensor with the rows first.
    Indexing (``code[k]``, ``code[a:b]``) selects rows, keeping the row axis.
    """

    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value: torch.Tensor):
        self.kind = kind
        self.value = value

    def __len__(self) -> int:
        return int(self.value.shape[0])

    def __getitem__(self, index) -> "ConditionCode":
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return ConditionCode(self.kind, self.value[index])

    def rows(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The value with ``batch`` rows (one row is broadcast), cast to ``dtype``."""
        n = self.value.shape[0]
        if n not in (1, batch):
            raise ValueError(f"condition has {n} rows for a batch of {batch}")
        value = self.value.to(dtype)
        return value.expand((batch,) + tuple(value.shape[1:])) if n == 1 and batch > 1 else value

    @staticmethod
    def cat(codes: Sequence["ConditionCode"]) -> "ConditionCode":
        return ConditionCode(codes[0].kind, torch.cat([c.value for c in codes]))


def area_pool(x: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    """Average over non-overlapping ``factor`` blocks (sides must be multiples of it)."""
    factor = tuple(int(f) for f in factor)
    if all(f == 1 for f in factor):
        return x
    return (F.avg_pool2d if x.dim() == 4 else F.avg_pool3d)(x, factor, factor)


class AtlasConditioning(nn.Module):
    """Seed conditioning with area pooling; the condition term is added after normalisation.

    At the bottleneck: ``relu(norm(conv_x(x)) + conv_c(pooled))`` then a second conv -> norm ->
    relu, where ``conv_x(x) + conv_c(pooled)`` would be one convolution over the concatenation
    ``[x, pooled]``. After decoder level ``l``: ``relu(x + proj_l(upsample(pooled)))``.
    """

    def __init__(self, ndim: int, width: int, cond_channels: int, kernel, factor: Sequence[int],
                 norm: Callable[[int], nn.Module], bias: bool, dropout: float,
                 decoder_widths: Sequence[int] = ()):
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        padding = tuple(k // 2 for k in kernel)
        self.factor = tuple(int(f) for f in factor)
        self.proj = nn.ModuleList(conv(cond_channels, int(w), 1) for w in decoder_widths)
        self.conv_x = conv(width, width, kernel, padding=padding, bias=bias)
        self.norm_x = norm(width)
        self.conv_c = conv(cond_channels, width, kernel, padding=padding, bias=True)
        self.conv2 = conv(width, width, kernel, padding=padding, bias=bias)
        self.norm2 = norm(width)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def code(self, net, cond: torch.Tensor) -> ConditionCode:
        return ConditionCode("atlas", area_pool(cond.float(), self.factor))

    def start(self, code: ConditionCode, batch: int, dtype: torch.dtype):
        return code.rows(batch, dtype)

    def apply(self, stage: int, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        if stage:
            up = F.interpolate(pooled, size=x.shape[2:], mode="nearest")
            return F.relu(x + self.proj[stage - 1](up))
        if pooled.shape[2:] != x.shape[2:]:
            raise ValueError(f"condition pooled to {tuple(pooled.shape[2:])} does not match the bottleneck "
                             f"{tuple(x.shape[2:])}: the atlas condition needs the window's shape")
        h = F.relu(self.norm_x(self.conv_x(x)) + self.conv_c(pooled))
        return self.dropout(F.relu(self.norm2(self.conv2(h))))


class PrototypeConditioning(nn.Module):
    """Class and background prototypes of the atlas (shared encoder), applied by FiLM.

    Parameters
    ----------
    encoder_widths : sequence of int
        Channels of the encoder levels and of the bottleneck (the features that are pooled).
    film_widths : sequence of int
        Channels modulated: the bottleneck, then every decoder level (coarse to fine).
    factors : sequence of tuple
        Down-sampling factor of each pooled level relative to the input.
    hidden : int
        Width of the MLP from prototypes to FiLM parameters.
    """

    def __init__(self, encoder_widths: Sequence[int], film_widths: Sequence[int],
                 factors: Sequence[Sequence[int]], hidden: int):
        super().__init__()
        self.factors = [tuple(int(f) for f in fac) for fac in factors]
        self.film_widths = [int(w) for w in film_widths]
        dim = 2 * sum(int(w) for w in encoder_widths)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, 2 * sum(self.film_widths)))

    def code(self, net, cond: torch.Tensor) -> ConditionCode:
        image, mask = cond[:, :1], cond[:, 1:2].float()
        if image.shape[0] > 1 and torch.equal(image[1:], image[:1].expand_as(image[1:])):
            image = image[:1]  # one atlas image for every row: encode it once
        skips, bottleneck = net.encode(image)
        parts = []
        for feat, factor in zip(list(skips) + [bottleneck], self.factors):
            m = area_pool(mask, factor).flatten(1)  # (N, S): fraction of each cell in the mask
            f = feat.float().flatten(2)  # (1 or N, C, S)
            fg_w = m / m.sum(1, keepdim=True).clamp(min=1e-6)
            bg = 1.0 - m
            bg_w = bg / bg.sum(1, keepdim=True).clamp(min=1e-6)
            if f.shape[0] == 1:
                parts += [fg_w @ f[0].T, bg_w @ f[0].T]
            else:
                parts += [torch.einsum("ncs,ns->nc", f, fg_w), torch.einsum("ncs,ns->nc", f, bg_w)]
        return ConditionCode("prototype", torch.cat(parts, dim=1))

    def start(self, code: ConditionCode, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        params = self.mlp(code.rows(batch, torch.float32))
        out, i = [], 0
        for w in self.film_widths:
            gamma, beta = params[:, i:i + w], params[:, i + w:i + 2 * w]
            out.append((gamma.to(dtype), beta.to(dtype)))
            i += 2 * w
        return out

    def apply(self, stage: int, x: torch.Tensor, film) -> torch.Tensor:
        gamma, beta = film[stage]
        shape = gamma.shape + (1,) * (x.dim() - 2)
        return F.relu(x * (1.0 + gamma.reshape(shape)) + beta.reshape(shape))


def make_conditioner(kind: str, *, ndim: int, widths: Sequence[int], kernels, pools, cond_channels: int,
                     norm: Callable[[int], nn.Module], bias: bool, dropout: float) -> nn.Module:
    """The conditioning module of a U-Net with encoder ``widths`` (levels + bottleneck)."""
    depth = len(widths) - 1
    factors, current = [], [1] * ndim
    for level in range(depth + 1):
        factors.append(tuple(current))
        if level < depth:
            current = [c * p for c, p in zip(current, pools[level])]
    if kind == "atlas":
        return AtlasConditioning(ndim, widths[depth], cond_channels, kernels[depth], factors[depth], norm, bias,
                                 dropout, decoder_widths=[widths[level] for level in reversed(range(depth))])
    if kind == "prototype":
        if cond_channels != 2:
            raise ValueError("prototype conditioning takes cond_channels = 2 (atlas image, atlas mask)")
        film = [widths[depth]] + [widths[level] for level in reversed(range(depth))]
        return PrototypeConditioning(widths, film, factors, hidden=max(64, 2 * widths[depth]))
    raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {kind!r}")
