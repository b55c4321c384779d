"""Conditioning of the U-Net (emseg.models.conditioning): the code, every normalisation, learning."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_h5
from emseg.engine.config import config_from_dict
from emseg.lcs import LabelPredictor, lcs_config_from_dict, load_lcs_model, train_lcs
from emseg.models import UNet
from emseg.models.conditioning import ConditionCode
from emseg.runtime import Runtime


def _net(conditioning, norm="batch", depth=2, width=4, seed=0):
    torch.manual_seed(seed)
    return UNet(ndim=2, out_channels=1, depth=depth, base_width=width, norm=norm, cond_channels=2,
                conditioning=conditioning)


def _cond(image, masks):
    image = torch.as_tensor(image, dtype=torch.float32).expand(len(masks), 1, *image.shape[-2:])
    return torch.cat([image, torch.as_tensor(np.asarray(masks), dtype=torch.float32)[:, None]], dim=1)


def test_prototype_code_is_the_masked_mean_of_the_atlas_features():
    net = _net("prototype", depth=2, width=3).eval()
    rng = np.random.default_rng(0)
    image = rng.random((16, 16)).astype(np.float32)
    masks = [rng.random((16, 16)) < 0.3, np.zeros((16, 16), bool)]
    masks[1][4:12, 2:6] = True
    with torch.no_grad():
        code = net.condition(_cond(image, masks)).value.numpy()
        skips, bottleneck = net.encode(torch.from_numpy(image)[None, None])
    expected = []
    for m in masks:
        parts = []
        for feat in list(skips) + [bottleneck]:
            f = feat[0].numpy()
            s = 16 // f.shape[-1]
            # fraction of each cell in the mask, by explicit loops over the cells
            frac = np.array([[m[i * s:(i + 1) * s, j * s:(j + 1) * s].mean() for j in range(f.shape[-1])]
                             for i in range(f.shape[-2])])
            parts.append((f * frac).sum((1, 2)) / frac.sum())
            parts.append((f * (1 - frac)).sum((1, 2)) / (1 - frac).sum())
        expected.append(np.concatenate(parts))
    np.testing.assert_allclose(code, np.stack(expected), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("conditioning", ["maxpool", "atlas", "prototype"])
def test_a_precomputed_code_gives_the_same_output(conditioning):
    net = _net(conditioning, norm="group").eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(3, 1, 16, 16, generator=gen)
    cond = torch.rand(3, 2, 16, 16, generator=gen)
    cond[:, 0] = cond[0, 0]  # one atlas image (the prototype encodes it once)
    with torch.no_grad():
        direct = net(x, cond)
        skips, feats = net.encode(x)
        code = net.condition(cond)
        assert isinstance(code, ConditionCode) and len(code) == 3
        torch.testing.assert_close(net.decode(skips, feats, code)[0], direct)
        # one row broadcasts to the batch
        torch.testing.assert_close(net.decode(skips, feats, code[1])[0], net(x, cond[1:2].expand(3, -1, -1, -1)))
        if conditioning == "prototype":  # different images per row are encoded one by one
            other = cond.clone()
            other[1, 0] = torch.rand(16, 16, generator=gen)
            rows = torch.cat([net.condition(other[i:i + 1]).value for i in range(3)])
            torch.testing.assert_close(net.condition(other).value, rows)


@pytest.mark.parametrize("norm", ["batch", "group", "instance"])
@pytest.mark.parametrize("conditioning", ["atlas", "prototype", "maxpool"])
def test_a_uniform_condition_change_moves_the_output(norm, conditioning):
    """Same images, target 1 under the all-ones mask and 0 under the all-zeros mask: only the
    condition tells them apart, and it is uniform over the patch, so normalisation must not erase it."""
    net = _net(conditioning, norm=norm, depth=3, width=8)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, 32, 32, generator=gen)
    m = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(4, 1, 1, 1).expand(4, 1, 32, 32)
    for _ in range(60):
        x = torch.rand(4, 1, 32, 32, generator=gen)
        loss = F.binary_cross_entropy_with_logits(net(x, torch.cat([image.expand(4, -1, -1, -1), m], 1)), m)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x = torch.rand(2, 1, 32, 32, generator=gen)
    with torch.no_grad():
        p0 = torch.sigmoid(net(x, torch.cat([image.expand(2, -1, -1, -1), torch.zeros(2, 1, 32, 32)], 1)))
        p1 = torch.sigmoid(net(x, torch.cat([image.expand(2, -1, -1, -1), torch.ones(2, 1, 32, 32)], 1)))
    gap = float((p1 - p0).mean())
    if conditioning == "maxpool" and norm != "batch":
        assert abs(gap) < 0.1  # the first implementation: group/instance norm erase the condition
    else:
        assert gap > 0.5


def textures(label, rng):
    """Background flat, class 1 vertical stripes, class 2 horizontal stripes: all of mean 0.5."""
    h, w = label.shape[-2:]
    yy, xx = np.mgrid[:h, :w]
    vertical, horizontal = np.where(xx % 2, 0.85, 0.15), np.where(yy % 2, 0.85, 0.15)
    raw = np.choose(label, [np.full((h, w), 0.5), vertical, horizontal]) + rng.normal(0, 0.05, label.shape)
    return (np.clip(raw, 0, 1) * 255).astype(np.uint8)


def test_prototype_conditioning_learns_classes_that_differ_only_in_texture(tmp_path):
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, size=(6, 8, 8)).repeat(4, 1).repeat(4, 2).astype(np.uint8)
    raw = textures(label, rng)
    alabel = np.zeros((1, 16, 16), np.uint8)
    alabel[0, :, :8] = 1
    alabel[0, 8:, 8:] = 2
    araw = textures(alabel, rng)
    h5 = write_h5(tmp_path / "tex.h5", raw=raw, label=label, atlas_raw=araw, atlas_label=alabel)
    data = {"n_classes": 3, "patch_shape": [1, 16, 16], "batch_size": 8, "steps": 80, "log_every": 10,
            "checkpoint_every": 1000, "valid_every": 1000, "amp": False,
            "train": [{"raw": f"{h5}:raw", "label": f"{h5}:label"}],
            "model": {"depth": 2, "base_width": 8, "norm": "batch"}, "optim": {"lr": 1e-2},
            "augment": {"flip": True, "rotate90": False, "brightness": 0.0, "contrast": 0.0}}
    config = config_from_dict(data)
    lcs = lcs_config_from_dict({"atlas_raw": f"{h5}:atlas_raw", "atlas_label": f"{h5}:atlas_label",
                                "conditioning": "prototype", "merge_prob": 0.0}, n_classes=3)
    train_lcs(config, lcs, tmp_path / "run", runtime=Runtime(device="cpu", seed=0))
    model = load_lcs_model(tmp_path / "run" / "last.pt")
    test_label = rng.integers(0, 3, size=(1, 8, 8)).repeat(4, 1).repeat(4, 2)
    image = textures(test_label, rng).astype(np.float32) / 255
    predictor = LabelPredictor(model.model, [1, 2], (1, 16, 16), atlas=model.atlas)
    probs = predictor.window(image)
    for k, c in enumerate([1, 2]):
        acc = np.mean((probs[k] > 0.5) == (test_label == c))
        assert acc > 0.9, (c, acc)  # a constant map would score about 2/3
    merged = predictor.predict(image)
    assert np.mean(merged == test_label) > 0.85


@pytest.mark.parametrize("conditioning", ["maxpool", "atlas", "prototype"])
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_stored_configs_are_checked_and_sized_with_their_conditioning(conditioning, norm):
    from emseg.models.checkpoint import check_model_config, count_parameters
    from emseg.errors import InputError

    for ndim, levels in ((2, 0), (3, 1)):
        net = UNet(ndim=ndim, out_channels=1, depth=2, base_width=3, norm=norm, cond_channels=2,
                   anisotropic_levels=levels, conditioning=conditioning)
        assert check_model_config(net.config, source="m.pt") == net.config
        assert count_parameters(net.config) == sum(p.numel() for p in net.parameters())
    with pytest.raises(InputError, match="conditioning must be one of"):
        check_model_config(dict(net.config, conditioning="film"), source="m.pt")
