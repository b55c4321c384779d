"""Sliding-window, blockwise inference: window placement, blending weights, seam-free results with a
translation-equivariant model, agreement with a single forward pass, and ``predict_file``."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import emseg.engine.inference as inference
from conftest import synthetic, write_h5
from emseg.models.checkpoint import save_checkpoint
from emseg.errors import InputError
from emseg.engine.blocks import plan_blocks
from emseg.data.values import to_float
from emseg.engine.inference import (
    SlidingWindow,
    blend_weights,
    output_shape,
    predict_volume,
    softmax_forward,
    window_starts,
)
from emseg.io import open_volume
from emseg.models import UNet, build_model
from emseg.semantic.predict import PredictConfig, predict_file


class Pointwise(nn.Module):
    """A translation-equivariant network: 1x1 convolutions and a pointwise non-linearity.

    ``divisor`` pretends a down-sampling factor so that window rounding is exercised.
    """

    def __init__(self, ndim: int, classes: int = 3, divisor: int = 4):
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.body = nn.Sequential(conv(1, 5, 1), nn.Tanh(), conv(5, classes, 1))
        self.divisor = (divisor,) * ndim

    def forward(self, x):
        return self.body(x * 4.0 - 2.0)


def _np_softmax(x: np.ndarray, axis: int = 0) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _pointwise_reference(model: Pointwise, raw01: np.ndarray) -> np.ndarray:
    """Whole-volume probabilities computed voxel by voxel with numpy from the model's weights."""
    c1, c2 = model.body[0], model.body[2]
    w1 = c1.weight.detach().numpy().reshape(c1.out_channels).astype(np.float64)
    b1 = c1.bias.detach().numpy().astype(np.float64)
    w2 = c2.weight.detach().numpy().reshape(c2.out_channels, c1.out_channels).astype(np.float64)
    b2 = c2.bias.detach().numpy().astype(np.float64)
    v = raw01.astype(np.float64).reshape(-1) * 4.0 - 2.0
    hidden = np.tanh(w1[:, None] * v[None] + b1[:, None])
    logits = w2 @ hidden + b2[:, None]
    return _np_softmax(logits, 0).reshape((c2.out_channels,) + raw01.shape)


# --------------------------------------------------------------------------- windows and weights


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 300), window=st.integers(1, 80), overlap=st.floats(0, 0.95))
def test_window_starts_cover_and_end_flush(size, window, overlap):
    stride = max(1, int(round(window * (1 - overlap))))
    starts = window_starts(size, window, stride)
    if window >= size:
        assert starts == [0]
        return
    assert starts[0] == 0 and starts[-1] == size - window
    assert all(b > a for a, b in zip(starts, starts[1:]))
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))
    covered = np.zeros(size, bool)
    for s in starts:
        assert 0 <= s <= size - window
        covered[s: s + window] = True
    assert covered.all()


@pytest.mark.parametrize("shape", [(16, 16), (1, 32, 32), (7, 10), (3, 5, 8), (1,)])
def test_gaussian_weights_positive_with_max_one(shape):
    w = blend_weights(shape, "gaussian")
    assert w.shape == shape and w.dtype == np.float32
    assert np.all(w > 0)
    assert w.max() == pytest.approx(1.0, abs=1e-6)
    for axis in range(len(shape)):  # symmetric about the centre, largest there
        np.testing.assert_allclose(w, np.flip(w, axis), rtol=1e-6)
    centre = tuple(s // 2 for s in shape)
    assert w[centre] == pytest.approx(w.max())
    if min(shape) >= 8:
        corner = (0,) * len(shape)
        assert w[corner] < 0.1 * w[centre]


def test_constant_weights_and_bad_blend():
    np.testing.assert_array_equal(blend_weights((3, 4), "constant"), np.ones((3, 4)))
    with pytest.raises(ValueError, match="blend"):
        blend_weights((3, 4), "median")
    with pytest.raises(ValueError, match="blend"):
        SlidingWindow(lambda x: x, (8, 8), blend="median")
    with pytest.raises(ValueError, match="overlap"):
        SlidingWindow(lambda x: x, (8, 8), overlap=1.0)


@pytest.mark.parametrize("shape, block, halo", [((10, 37, 41), (4, 16, 16), (0, 5, 3)), ((13, 20), (13, 7), (2, 2)),
                                                ((5, 5, 5), (8, 8, 8), (1, 1, 1))])
def test_plan_blocks_partition_the_volume(shape, block, halo):
    blocks = plan_blocks(shape, block, halo)
    count = np.zeros(shape, np.int32)
    for b in blocks:
        count[b.inner] += 1
        for i, o, h, s in zip(b.inner, b.outer, halo, shape):
            assert o.start == max(0, i.start - h) and o.stop == min(s, i.stop + h)
        inner_again = tuple(slice(o.start + io.start, o.start + io.stop) for o, io in zip(b.outer, b.inner_in_outer))
        assert inner_again == b.inner
    assert np.all(count == 1)
    assert [b.index for b in blocks] == list(range(len(blocks)))


# --------------------------------------------------------------------------- agreement with references


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("ndim, patch", [(2, (1, 16, 16)), (3, (4, 12, 16))])
def test_pointwise_model_has_no_seams(ndim, patch, blend):
    """Many blocks and overlapping windows reproduce the whole-volume pointwise result."""
    model = Pointwise(ndim).eval()
    raw = np.random.default_rng(0).integers(0, 256, (6, 45, 38)).astype(np.uint8)
    predictor = SlidingWindow(softmax_forward(model), patch, divisor=model.divisor, overlap=0.4, blend=blend,
                              batch_size=3)
    blocks = plan_blocks(raw.shape, (4, 20, 24), (1, 6, 6))
    dest = np.full((3,) + raw.shape, np.nan, np.float32)
    stats = predict_volume(predictor, raw, dest, blocks=blocks, output_type="probabilities")
    expected = _pointwise_reference(model, raw / 255.0)
    np.testing.assert_allclose(dest, expected, rtol=0, atol=2e-6)
    assert stats.voxels == raw.size and stats.blocks == len(blocks) > 4


def test_region_smaller_than_patch_equals_single_forward_pass():
    model = UNet(ndim=2, out_channels=3, depth=2, base_width=4).eval()
    region = np.random.default_rng(1).random((12, 20)).astype(np.float32)  # multiples of the divisor 4
    probs = SlidingWindow(softmax_forward(model), (32, 32), divisor=model.divisor)(region)
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(region)[None, None]), dim=1)[0].numpy()
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)


def test_region_not_a_multiple_of_divisor_is_padded_then_cropped():
    model = UNet(ndim=2, out_channels=2, depth=2, base_width=4).eval()
    region = np.random.default_rng(2).random((10, 13)).astype(np.float32)
    probs = SlidingWindow(softmax_forward(model), (32, 32), divisor=model.divisor)(region)
    assert probs.shape == (2, 10, 13)
    padded = np.pad(region, ((0, 2), (0, 3)), mode="reflect")  # up to (12, 16)
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(padded)[None, None]), dim=1)[0].numpy()[:, :10, :13]
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)


def test_small_volume_predict_volume_equals_forward_per_section():
    """A 3D volume smaller than the patch, predicted by a 2D network, section by section."""
    model = UNet(ndim=2, out_channels=3, depth=2, base_width=4).eval()
    raw = np.random.default_rng(3).integers(0, 256, (3, 16, 20)).astype(np.uint8)
    predictor = SlidingWindow(softmax_forward(model), (1, 32, 32), divisor=model.divisor)
    dest = np.zeros((3, 3, 16, 20), np.float32)
    predict_volume(predictor, raw, dest, blocks=plan_blocks(raw.shape, raw.shape, (0, 16, 16)))
    with torch.no_grad():
        x = torch.from_numpy(raw.astype(np.float32) / 255)[:, None]
        expected = torch.softmax(model(x), dim=1).permute(1, 0, 2, 3).numpy()
    np.testing.assert_allclose(dest, expected, rtol=0, atol=1e-6)


def test_sigmoid_for_single_channel():
    model = nn.Conv2d(1, 1, 1)
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(softmax_forward(model)(x), torch.sigmoid(model(x)))


def test_labels_output_is_argmax_of_probabilities():
    model = UNet(ndim=2, out_channels=4, depth=2, base_width=4).eval()
    raw = synthetic((4, 64, 64), 0).raw[:2, :40, :44]
    predictor = SlidingWindow(softmax_forward(model), (1, 16, 16), divisor=model.divisor, overlap=0.5)
    blocks = plan_blocks(raw.shape, (1, 24, 24), (0, 8, 8))
    probs = np.zeros(output_shape(raw.shape, 4, "probabilities"), np.float32)
    labels = np.zeros(output_shape(raw.shape, 4, "labels"), np.uint8)
    predict_volume(predictor, raw, probs, blocks=blocks, output_type="probabilities")
    predict_volume(predictor, raw, labels, blocks=blocks, output_type="labels")
    assert probs.shape == (4,) + raw.shape and labels.shape == raw.shape
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(labels, np.argmax(probs, axis=0))


@pytest.mark.parametrize("channels, blend", [(5, "gaussian"), (3, "constant"), (1, "gaussian")])
def test_labels_skip_the_normalisation_and_agree_with_the_probabilities(channels, blend):
    """Labels come from the summed weighted probabilities without dividing by the weights: the
    same class map as the argmax (one channel: > 0.5) of the normalised probabilities."""
    torch.manual_seed(channels)
    model = build_model(dict(ndim=2, in_channels=1, out_channels=channels, depth=2, base_width=4, norm="batch")).eval()
    window = SlidingWindow(softmax_forward(model), (1, 48, 48), divisor=model.divisor, overlap=0.5, blend=blend)
    region = np.random.default_rng(channels).random((2, 101, 77), dtype=np.float32)
    probs, labels = window(region), window(region, labels=True)
    assert labels.dtype == np.uint8 and labels.shape == region.shape
    expected = np.argmax(probs, axis=0) if channels > 1 else (probs[0] > 0.5)
    np.testing.assert_array_equal(labels, expected)


def test_skip_progress_and_block_callbacks():
    model = Pointwise(2).eval()
    raw = np.random.default_rng(4).integers(0, 256, (2, 16, 24)).astype(np.uint8)
    predictor = SlidingWindow(softmax_forward(model), (1, 8, 8), divisor=model.divisor)
    blocks = plan_blocks(raw.shape, (1, 8, 24), (0, 4, 4))
    dest = np.full((3,) + raw.shape, -1.0, np.float32)
    done, calls = [], []
    stats = predict_volume(predictor, raw, dest, blocks=blocks, skip=lambda b: b.index % 2 == 0,
                           on_block_done=done.append, progress=lambda d, t: calls.append((d, t)))
    assert [b.index for b in done] == [b.index for b in blocks if b.index % 2 == 1]
    for b in blocks:
        region = dest[(slice(None),) + b.inner]
        assert np.all(region == -1.0) if b.index % 2 == 0 else np.all(region >= 0)
    assert calls[-1] == (raw.size, raw.size) and len(calls) == len(blocks)
    assert stats.voxels == sum(b.size for b in done)


# --------------------------------------------------------------------------- predict_file


def _checkpoint(tmp_path, model: UNet, patch=(1, 32, 32)):
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_config": model.config,
                           "config": {"patch_shape": list(patch)}, "step": 0})
    return path


@pytest.mark.parametrize("out", ["pred.h5:probs", "pred.zarr", "pred.zarr/grp/probs"])
def test_predict_file_end_to_end(tmp_path, out):
    """A volume smaller than the training patch: each section is one forward pass of the net."""
    model = UNet(ndim=2, out_channels=3, depth=2, base_width=4).eval()
    ckpt = _checkpoint(tmp_path, model)
    raw = synthetic((4, 64, 64), 0).raw[:3, :16, :20]
    write_h5(tmp_path / "in.h5", raw=raw)
    config = PredictConfig(model=str(ckpt), input=f"{tmp_path}/in.h5:raw", output=f"{tmp_path}/{out}",
                           device="cpu", precision="fp32")  # compared with the fp32 network below
    ticks = []
    result = predict_file(config, progress=lambda d, t: ticks.append((d, t)))
    assert result.shape == (3, 3, 16, 20) and result.n_classes == 3 and result.patch_shape == (1, 32, 32)
    assert ticks[-1] == (raw.size, raw.size)
    with open_volume(f"{tmp_path}/{out}") as vol:
        assert vol.shape == (3, 3, 16, 20) and vol.dtype == np.float32
        attrs = vol.attrs
        probs = vol[...]
    assert attrs["n_classes"] == 3 and attrs["output_type"] == "probabilities"
    assert list(attrs["patch_shape"]) == [1, 32, 32] and attrs["blend"] == "gaussian"
    assert attrs["source"] == f"{tmp_path}/in.h5:raw"
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(raw / np.float32(255))[:, None]), 1)
    np.testing.assert_allclose(probs, expected.permute(1, 0, 2, 3).numpy(), rtol=0, atol=1e-6)


def test_predict_file_labels_with_blocks(tmp_path):
    model = UNet(ndim=2, out_channels=3, depth=2, base_width=4).eval()
    ckpt = _checkpoint(tmp_path, model, patch=(1, 16, 16))
    raw = synthetic((4, 64, 64), 0).raw[:2, :40, :36]
    write_h5(tmp_path / "in.h5", raw=raw)
    common = dict(model=str(ckpt), input=f"{tmp_path}/in.h5:raw", block_shape=(1, 24, 24), device="cpu")
    predict_file(PredictConfig(output=f"{tmp_path}/p.zarr/probs", **common))
    result = predict_file(PredictConfig(output=f"{tmp_path}/p.zarr/labels", output_type="labels", **common))
    assert result.shape == raw.shape and result.stats.blocks == 2 * 2 * 2
    with open_volume(f"{tmp_path}/p.zarr/probs") as p, open_volume(f"{tmp_path}/p.zarr/labels") as lab:
        assert lab.dtype == np.uint8 and lab.attrs["output_type"] == "labels"
        np.testing.assert_array_equal(lab[...], np.argmax(p[...], axis=0))


def test_failure_mid_prediction_leaves_no_output(tmp_path, monkeypatch):
    model = UNet(ndim=2, out_channels=2, depth=2, base_width=4).eval()
    ckpt = _checkpoint(tmp_path, model, patch=(1, 16, 16))
    write_h5(tmp_path / "in.h5", raw=synthetic((4, 64, 64), 0).raw[:2, :32, :32])
    real = inference.predict_block
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "predict_block", failing)
    before = {p.name for p in tmp_path.iterdir()}
    for out in ("new.h5:probs", "new.zarr"):
        config = PredictConfig(model=str(ckpt), input=f"{tmp_path}/in.h5:raw", output=f"{tmp_path}/{out}",
                               block_shape=(1, 16, 16), device="cpu")
        calls.clear()
        with pytest.raises(RuntimeError, match="device lost"):
            predict_file(config)
        assert len(calls) == 3
        assert {p.name for p in tmp_path.iterdir()} == before  # no output, no temporary files


def test_failure_keeps_previous_output(tmp_path, monkeypatch):
    model = UNet(ndim=2, out_channels=2, depth=2, base_width=4).eval()
    ckpt = _checkpoint(tmp_path, model, patch=(1, 16, 16))
    write_h5(tmp_path / "in.h5", raw=synthetic((4, 64, 64), 0).raw[:2, :32, :32])
    config = PredictConfig(model=str(ckpt), input=f"{tmp_path}/in.h5:raw", output=f"{tmp_path}/in.h5:pred",
                           block_shape=(1, 16, 16), device="cpu")
    predict_file(config)
    with open_volume(f"{tmp_path}/in.h5:pred") as vol:
        first = vol[...]

    def failing(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(inference, "predict_block", failing)
    with pytest.raises(RuntimeError):
        predict_file(dataclasses.replace(config, overwrite=True))
    with open_volume(f"{tmp_path}/in.h5:pred") as vol, open_volume(f"{tmp_path}/in.h5:raw") as raw:
        np.testing.assert_array_equal(vol[...], first)
        assert raw.shape == (2, 32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5", "model.pt"]


def test_conditioned_checkpoint_is_refused(tmp_path):
    model = UNet(ndim=2, out_channels=2, depth=1, base_width=2, cond_channels=1)
    ckpt = _checkpoint(tmp_path, model)
    write_h5(tmp_path / "in.h5", raw=np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match="conditioned"):
        predict_file(PredictConfig(model=str(ckpt), input=f"{tmp_path}/in.h5:raw", output=f"{tmp_path}/o.h5:p",
                                   device="cpu"))


def test_predict_array_covers_the_cube_once_with_each_blocks_float_halo():
    from emseg.engine.inference import predict_array

    rng = np.random.default_rng(4)
    raw = rng.integers(0, 256, size=(3, 70, 45), dtype=np.uint8)
    patch = (1, 32, 16)
    seen = np.zeros(raw.shape, dtype=int)

    def record(region, block):
        np.testing.assert_array_equal(region, to_float(raw[block.outer], np.uint8))
        for inner, outer, p, n in zip(block.inner, block.outer, patch, raw.shape):
            assert outer.start == max(0, inner.start - p // 2) and outer.stop == min(n, inner.stop + p // 2)
        return block.index

    for block, result in predict_array(record, raw, patch):
        assert result == block.index
        seen[block.inner] += 1
    assert (seen == 1).all()


def test_predict_array_with_a_window_matches_predicting_each_region():
    from emseg.engine.inference import predict_array

    torch.manual_seed(0)
    net = UNet(ndim=2, in_channels=1, out_channels=2, depth=2, base_width=4).eval()
    window = SlidingWindow(softmax_forward(net), (1, 16, 16), divisor=net.divisor)
    raw = np.random.default_rng(1).random((2, 40, 24)).astype(np.float32)
    out = np.full((2,) + raw.shape, np.nan, dtype=np.float32)
    for block, probs in predict_array(window, raw, (1, 16, 16)):
        expected = window(raw[block.outer])[(slice(None),) + block.inner_in_outer]
        np.testing.assert_allclose(probs, expected, rtol=1e-6, atol=1e-6)
        out[(slice(None),) + block.inner] = probs
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-5)


def test_the_window_batch_changes_nothing_but_its_default_follows_the_device():
    """One window per pass on a CPU (the default there) predicts what batches of 4 predict."""
    from emseg.engine.inference import window_batch

    torch.manual_seed(1)
    model = build_model(dict(ndim=2, in_channels=1, out_channels=3, depth=2, base_width=4, norm="batch")).eval()
    region = np.random.default_rng(1).random((2, 70, 90), dtype=np.float32)
    probs = [SlidingWindow(softmax_forward(model), (1, 32, 32), divisor=model.divisor, overlap=0.5,
                           batch_size=window_batch(b, "cpu"))(region) for b in (None, 4)]
    np.testing.assert_allclose(probs[0], probs[1], rtol=1e-5, atol=1e-6)
    assert window_batch(None, "cpu") == 1 and window_batch(None, torch.device("cuda:1")) == 4
    assert window_batch(2, "cuda") == 2
