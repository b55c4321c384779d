"""A configurable 2D/3D U-Net.

The network keeps the spatial shape (``same`` padding), so input sides must be multiples of
:attr:`UNet.divisor`. It can return the bottleneck embedding (for diversity-based active learning),
carries dropout for Monte-Carlo sampling, and accepts an optional conditioning tensor
(label-conditioned segmentation; how it is read is chosen by ``conditioning``, see
:mod:`emseg.models.conditioning`).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from emseg.models.conditioning import CONDITIONINGS, ConditionCode, make_conditioner

NORMS = ("batch", "group", "instance", "none")


def _norm(kind: str, ndim: int, channels: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if ndim == 2 else nn.InstanceNorm3d)(channels, affine=True)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


class ConvBlock(nn.Module):
    """Two convolutions, each followed by normalisation and ReLU; optional dropout at the end."""

    def __init__(self, ndim: int, cin: int, cout: int, kernel, norm: str, dropout: float):
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        padding = tuple(k // 2 for k in kernel)
        self.body = nn.Sequential(
            conv(cin, cout, kernel, padding=padding, bias=norm == "none"),
            _norm(norm, ndim, cout),
            nn.ReLU(inplace=True),
            conv(cout, cout, kernel, padding=padding, bias=norm == "none"),
            _norm(norm, ndim, cout),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.body(x))


class UNet(nn.Module):
    """U-Net for 2D (N,C,Y,X) or 3D (N,C,Z,Y,X) segmentation.

    Parameters
    ----------
    ndim : 2 or 3
    in_channels, out_channels : int
        Input channels and output channels (classes; 1 for a sigmoid head).
    depth : int
        Number of down-sampling steps; the bottleneck is at ``2**depth`` times lower resolution.
    base_width : int
        Feature maps at the first level, doubled at every level.
    norm : {"batch", "group", "instance", "none"}
    dropout : float
        Dropout probability in the bottleneck and decoder blocks (used for MC dropout).
    anisotropic_levels : int
        3D only: the first this-many levels pool and convolve in-plane only (kernel (1,3,3)),
        for ssTEM volumes with thick sections.
    cond_channels : int
        Channels of an optional conditioning input (N, cond_channels, *P).
    conditioning : {"maxpool", "atlas", "prototype"}
        How a conditioned network reads its condition (:mod:`emseg.models.conditioning`).
        ``"maxpool"``, the default, is the first implementation, kept so that stored model
        configs without this key rebuild unchanged.

    Examples
    --------
    >>> net = UNet(ndim=2, out_channels=3, depth=2, base_width=4)
    >>> net(torch.zeros(1, 1, 16, 16)).shape
    torch.Size([1, 3, 16, 16])
    """

    def __init__(
        self,
        *,
        ndim: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        depth: int = 4,
        base_width: int = 32,
        norm: str = "batch",
        dropout: float = 0.0,
        anisotropic_levels: int = 0,
        cond_channels: int = 0,
        conditioning: str = "maxpool",
    ):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if ndim == 2 and anisotropic_levels:
            raise ValueError("anisotropic_levels applies to 3D networks only")
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        self.config: dict[str, Any] = dict(
            ndim=ndim, in_channels=in_channels, out_channels=out_channels, depth=depth,
            base_width=base_width, norm=norm, dropout=dropout,
            anisotropic_levels=anisotropic_levels, cond_channels=cond_channels,
        )
        if cond_channels and conditioning != "maxpool":
            self.config["conditioning"] = conditioning
        self.ndim = ndim
        self.depth = depth
        self.cond_channels = cond_channels
        widths = [base_width * 2**i for i in range(depth + 1)]
        kernels, pools = [], []
        for level in range(depth + 1):
            flat = ndim == 3 and level < anisotropic_levels
            kernels.append((1, 3, 3) if flat else (3,) * ndim)
            pools.append((1, 2, 2) if flat else (2,) * ndim)
        pools = pools[:depth]
        self._pools = pools
        pool = nn.MaxPool2d if ndim == 2 else nn.MaxPool3d
        upconv = nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d

        self.encoders = nn.ModuleList()
        self.pools = nn.ModuleList()
        cin = in_channels
        for level in range(depth):
            self.encoders.append(ConvBlock(ndim, cin, widths[level], kernels[level], norm, 0.0))
            self.pools.append(pool(pools[level], pools[level]))
            cin = widths[level]
        self.bottleneck = ConvBlock(ndim, cin, widths[depth], kernels[depth], norm, dropout)
        self.cond_block = (
            ConvBlock(ndim, widths[depth] + cond_channels, widths[depth], kernels[depth], norm, dropout)
            if cond_channels and conditioning == "maxpool" else None
        )
        self.conditioner = (
            make_conditioner(conditioning, ndim=ndim, widths=widths, kernels=kernels, pools=pools,
                             cond_channels=cond_channels, norm=lambda c: _norm(norm, ndim, c),
                             bias=norm == "none", dropout=dropout)
            if cond_channels and conditioning != "maxpool" else None
        )
        self.upconvs = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            self.upconvs.append(upconv(widths[level + 1], widths[level], pools[level], pools[level]))
            self.decoders.append(ConvBlock(ndim, 2 * widths[level], widths[level], kernels[level], norm, dropout))
        self.head = conv(widths[0], out_channels, 1)

    @property
    def divisor(self) -> tuple[int, ...]:
        """Per-axis factor that input sides must be multiples of."""
        div = [1] * self.ndim
        for p in self._pools:
            div = [d * q for d, q in zip(div, p)]
        return tuple(div)

    @property
    def embedding_channels(self) -> int:
        return self.config["base_width"] * 2 ** self.depth

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The deterministic part of the network: encoder levels and the bottleneck convolutions.

        Returns the skip connections and the bottleneck features before its dropout, so that
        Monte-Carlo dropout can run :meth:`decode` T times on one encoding (no dropout happens
        before this point, so the results equal T full forward passes).
        """
        skips = []
        for enc, pool in zip(self.encoders, self.pools):
            x = enc(x)
            skips.append(x)
            x = pool(x)
        return skips, self.bottleneck.body(x)

    def condition(self, cond: torch.Tensor) -> ConditionCode:
        """Turn a raw condition (N, cond_channels, *P) into the code :meth:`decode` applies.

        Computing it once and passing it to :meth:`decode` for many inputs gives the same result
        as passing the raw condition each time (a prototype code does not depend on the input's
        shape; an ``atlas``/``maxpool`` condition must have the input's spatial shape).
        """
        if not self.cond_channels:
            raise ValueError("this network takes no conditioning input")
        if cond.dim() != self.ndim + 2 or cond.shape[1] != self.cond_channels:
            raise ValueError(f"expected a condition (N, {self.cond_channels}, *S), got shape {tuple(cond.shape)}")
        bad = [s for s, d in zip(cond.shape[2:], self.divisor) if s % d]
        if bad:
            raise ValueError(f"condition sides {tuple(cond.shape[2:])} must be multiples of {self.divisor}")
        if self.conditioner is not None:
            return self.conditioner.code(self, cond)
        factor = self.divisor
        pool = F.max_pool2d if self.ndim == 2 else F.max_pool3d
        return ConditionCode("maxpool", pool(cond, factor, factor))

    def decode(self, skips: list[torch.Tensor], features: torch.Tensor,
               cond: torch.Tensor | ConditionCode | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits from :meth:`encode`'s output; also returns the bottleneck embedding.

        ``cond`` is a raw condition or a code from :meth:`condition` (one row broadcasts to the batch).
        """
        x = self.bottleneck.dropout(features)
        embedding = x
        state = None
        if self.cond_channels:
            if cond is None:
                raise ValueError("this network is conditioned: pass cond (N, cond_channels, *S)")
            code = cond if isinstance(cond, ConditionCode) else self.condition(cond)
            if self.conditioner is None:
                x = self.cond_block(torch.cat([x, code.rows(x.shape[0], x.dtype)], dim=1))
            else:
                state = self.conditioner.start(code, x.shape[0], x.dtype)
                x = self.conditioner.apply(0, x, state)
        elif cond is not None:
            raise ValueError("this network takes no conditioning input")
        for stage, (up, dec, skip) in enumerate(zip(self.upconvs, self.decoders, reversed(skips)), start=1):
            x = dec(torch.cat([up(x), skip], dim=1))
            if state is not None:
                x = self.conditioner.apply(stage, x, state)
        return self.head(x), embedding

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor | None = None,
        *,
        return_embedding: bool = False,
    ):
        """Logits (N, out_channels, *S); with ``return_embedding`` also the bottleneck features."""
        if x.dim() != self.ndim + 2:
            raise ValueError(f"expected a {self.ndim + 2}D tensor (N,C,*S), got shape {tuple(x.shape)}")
        bad = [s for s, d in zip(x.shape[2:], self.divisor) if s % d]
        if bad:
            raise ValueError(f"input sides {tuple(x.shape[2:])} must be multiples of {self.divisor}")
        skips, x = self.encode(x)
        logits, embedding = self.decode(skips, x, cond)
        return (logits, embedding) if return_embedding else logits


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference, each convolution followed by batch norm merged into one.

    In eval mode batch norm is an affine map per channel, so it folds into the preceding
    convolution's weights and bias (``y = gamma (W x + b - mu) / sqrt(var + eps) + beta``). The
    output is unchanged up to rounding, and on CPU, where bf16 batch norm on channels-last
    tensors runs at memory speed, inference gets about twice as fast. ``model`` itself is not
    modified; a model without batch norm (or in training mode) is returned as it is.

    Examples
    --------
    >>> net = UNet(ndim=2, out_channels=2, depth=1, base_width=4).eval()
    >>> x = torch.rand(1, 1, 8, 8)
    >>> bool(torch.allclose(fold_batchnorm(net)(x), net(x), atol=1e-5))
    True
    """
    if model.training or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    folded = copy.deepcopy(model)
    for module in folded.modules():
        if not isinstance(module, ConvBlock):
            continue
        layers = list(module.body)
        for i in range(len(layers) - 1):
            if isinstance(layers[i], nn.modules.conv._ConvNd) and isinstance(layers[i + 1], nn.modules.batchnorm._BatchNorm):
                layers[i] = fuse_conv_bn_eval(layers[i], layers[i + 1])
                layers[i + 1] = nn.Identity()
        module.body = nn.Sequential(*layers)
    return folded.eval()


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the encoder of every :class:`UNet` in ``model``: its contracting path
    (the levels before each pooling) and the bottleneck; the decoder, the head and any
    conditioning are not part of it."""
    out: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, UNet):
            for part in (module.encoders, module.bottleneck):
                out.update((id(p), p) for p in part.parameters())
    return list(out.values())


def build_model(config: dict[str, Any]) -> UNet:
    """Rebuild a :class:`UNet` from its ``config`` dict (as stored in checkpoints)."""
    return UNet(**config)


def set_mc_dropout(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Put ``model`` in eval mode with only its dropout layers sampling (Monte-Carlo dropout).

    Normalisation layers stay in eval mode, so their running statistics are used and not updated.
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.train(enabled)
    return model
