"""The U-Net: output and embedding shapes in 2D, 3D and anisotropic 3D, MC dropout, conditioning."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from emseg.models import UNet, build_model, set_mc_dropout


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
@pytest.mark.parametrize("spatial", [(16, 16), (8, 24)])
def test_2d_output_shape(norm, spatial):
    net = UNet(ndim=2, out_channels=3, depth=2, base_width=4, norm=norm)
    out = net(torch.randn(2, 1, *spatial))
    assert out.shape == (2, 3, *spatial)
    assert net.divisor == (4, 4)


def test_3d_output_shape():
    net = UNet(ndim=3, in_channels=2, out_channels=5, depth=2, base_width=4)
    assert net.divisor == (4, 4, 4)
    assert net(torch.randn(1, 2, 8, 12, 16)).shape == (1, 5, 8, 12, 16)


@pytest.mark.parametrize("depth, levels", [(3, 1), (3, 2), (2, 2), (2, 3), (3, 0)])
def test_anisotropic_divisor_and_shape(depth, levels):
    net = UNet(ndim=3, out_channels=2, depth=depth, base_width=2, anisotropic_levels=levels)
    z_div = 2 ** max(0, depth - levels)  # the first `levels` poolings keep z
    assert net.divisor == (z_div, 2**depth, 2**depth)
    x = torch.randn(1, 1, z_div, 2**depth * 2, 2**depth)
    assert net(x).shape == (1, 2, *x.shape[2:])
    if z_div > 1:
        with pytest.raises(ValueError, match="multiples"):
            net(torch.randn(1, 1, z_div + 1, 2**depth, 2**depth))


def test_fully_anisotropic_network_treats_sections_independently():
    """With every level in-plane (kernels (1,3,3)), section z of the output depends only on
    section z of the input."""
    net = UNet(ndim=3, out_channels=2, depth=2, base_width=4, norm="none", anisotropic_levels=3).eval()
    x = torch.randn(1, 1, 3, 16, 16)
    y = x.clone()
    y[:, :, 0] += torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        a, b = net(x), net(y)
    assert not torch.allclose(a[:, :, 0], b[:, :, 0])
    torch.testing.assert_close(a[:, :, 1:], b[:, :, 1:], rtol=0, atol=0)
    # A level with 3x3x3 kernels mixes sections: the same check then fails.
    mixed = UNet(ndim=3, out_channels=2, depth=2, base_width=4, norm="none", anisotropic_levels=2).eval()
    with torch.no_grad():
        assert not torch.allclose(mixed(x)[:, :, 1:], mixed(y)[:, :, 1:])


@pytest.mark.parametrize("ndim, spatial", [(2, (16, 24)), (3, (4, 8, 16))])
def test_embedding_shape(ndim, spatial):
    depth, width = 2, 3
    net = UNet(ndim=ndim, out_channels=2, depth=depth, base_width=width)
    logits, emb = net(torch.randn(2, 1, *spatial), return_embedding=True)
    assert logits.shape == (2, 2, *spatial)
    assert emb.shape == (2, width * 2**depth, *(s // 2**depth for s in spatial))
    assert net.embedding_channels == width * 2**depth


def test_embedding_shape_anisotropic():
    net = UNet(ndim=3, out_channels=2, depth=2, base_width=2, anisotropic_levels=1)
    _, emb = net(torch.randn(1, 1, 4, 16, 16), return_embedding=True)
    assert emb.shape == (1, 8, 2, 4, 4)


def test_bad_inputs_raise_value_error():
    net = UNet(ndim=2, out_channels=2, depth=2, base_width=2)
    with pytest.raises(ValueError, match="multiples"):
        net(torch.randn(1, 1, 16, 18))
    with pytest.raises(ValueError, match="4D"):
        net(torch.randn(1, 1, 2, 16, 16))


@pytest.mark.parametrize("kwargs", [dict(ndim=4), dict(norm="layer"), dict(dropout=1.0), dict(dropout=-0.1),
                                    dict(depth=-1), dict(ndim=2, anisotropic_levels=1)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        UNet(**kwargs)


def _modules(net, kind):
    return [m for m in net.modules() if isinstance(m, kind)]


def test_mc_dropout_samples_while_batchnorm_stays_in_eval():
    net = UNet(ndim=2, out_channels=3, depth=2, base_width=4, norm="batch", dropout=0.5)
    net.train()
    net(torch.randn(4, 1, 16, 16))  # move the running statistics away from their initial values
    bn = _modules(net, nn.modules.batchnorm._BatchNorm)
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in bn]
    set_mc_dropout(net, True)
    assert bn and not any(m.training for m in bn)
    drops = _modules(net, nn.Dropout)
    assert drops and all(m.training for m in drops)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        a, b = net(x), net(x)
    assert not torch.allclose(a, b)
    for m, (mean, var) in zip(bn, before):  # eval-mode BatchNorm does not update its statistics
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
    set_mc_dropout(net, False)
    assert not any(m.training for m in net.modules())
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x), rtol=0, atol=0)


def test_conditioned_network_requires_cond():
    net = UNet(ndim=2, out_channels=2, depth=2, base_width=4, cond_channels=2).eval()
    x = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match="cond"):
        net(x)
    cond = torch.zeros(1, 2, 16, 16)
    other = cond.clone()
    other[:, 0, :4, :4] = 1.0
    with torch.no_grad():
        a, b = net(x, cond), net(x, other)
    assert a.shape == (1, 2, 16, 16)
    assert not torch.allclose(a, b)  # the conditioning reaches the output
    plain = UNet(ndim=2, out_channels=2, depth=2, base_width=4)
    with pytest.raises(ValueError, match="no conditioning"):
        plain(x, cond)


def test_conditioned_3d_anisotropic():
    net = UNet(ndim=3, out_channels=2, depth=2, base_width=2, anisotropic_levels=1, cond_channels=1).eval()
    x = torch.randn(1, 1, 2, 8, 8)
    cond = torch.zeros(1, 1, 2, 8, 8)
    cond[..., :4, :] = 1  # a condition that differs from its mirror image and from all-ones
    with torch.no_grad():
        out, ones, none = net(x, cond), net(x, torch.ones_like(cond)), net(x, torch.zeros_like(cond))
    assert out.shape == (1, 2, 2, 8, 8)
    # the condition reaches the output: three conditions, three different maps
    assert not torch.allclose(out, ones) and not torch.allclose(out, none) and not torch.allclose(ones, none)


def test_build_model_round_trip():
    net = UNet(ndim=3, out_channels=4, depth=2, base_width=3, norm="group", dropout=0.1, anisotropic_levels=1)
    copy = build_model(dict(net.config))
    copy.load_state_dict(net.state_dict())
    net.eval()
    copy.eval()
    x = torch.randn(1, 1, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), net(x), rtol=0, atol=0)
    assert copy.config == net.config
