"""The fast path's plumbing: prefetching, threads, block shapes, overlapped block I/O, BALD encoding once."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from conftest import synthetic, tiny_train_config
from emseg.runtime import device as device_mod
from emseg.active.pool import build_pool
from emseg.active.scoring.stream import score_pool
from emseg.engine.config import config_from_dict
from emseg.data.prefetch import Prefetcher, step_rng
from emseg.engine.blocks import default_block_shape, plan_blocks
from emseg.engine.inference import SlidingWindow, predict_volume, softmax_forward
from emseg.models import UNet, set_mc_dropout
from emseg.engine.training import run_training
from emseg.semantic.train import SegmentationTask
from emseg.runtime import Runtime


# --------------------------------------------------------------------------- prefetch
def test_prefetcher_runs_ahead_in_order_in_another_thread():
    seen = []

    def make(step):
        seen.append((step, threading.current_thread().name))
        return step * 10

    with Prefetcher(make, start=3, depth=2) as pf:
        assert [pf.get(s) for s in (3, 4, 5)] == [30, 40, 50]
        with pytest.raises(ValueError, match="expected step 6"):
            pf.get(7)
    assert [s for s, _ in seen[:3]] == [3, 4, 5]
    assert all(name == "emseg-prefetch" for _, name in seen)


def test_prefetcher_hands_over_the_error_of_its_step():
    def make(step):
        if step == 1:
            raise OSError("disk gone")
        return step

    with Prefetcher(make) as pf:
        assert pf.get(0) == 0
        with pytest.raises(OSError, match="disk gone"):
            pf.get(1)


def test_step_rng_depends_on_seed_step_and_stream_only():
    a = step_rng(5, 10).integers(1 << 30, size=4)
    assert np.array_equal(a, step_rng(5, 10).integers(1 << 30, size=4))
    for other in (step_rng(5, 11), step_rng(6, 10), step_rng(5, 10, stream=1)):
        assert not np.array_equal(a, other.integers(1 << 30, size=4))


def _train(tmp_path, name, h5, **overrides):
    cfg = config_from_dict(tiny_train_config(h5, steps=5, **overrides))
    task = SegmentationTask(cfg)
    try:
        result = run_training(task, cfg, tmp_path / name, runtime=Runtime(device="cpu", seed=3))
    finally:
        task.close()
    return result, torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]


def test_training_with_and_without_prefetch_is_identical(tmp_path, synthetic_h5):
    r1, w1 = _train(tmp_path, "on", synthetic_h5, prefetch=True)
    r2, w2 = _train(tmp_path, "off", synthetic_h5, prefetch=False)
    assert r1.losses == r2.losses
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


# --------------------------------------------------------------------------- threads
def test_threads_follow_affinity_unless_the_environment_fixes_them(monkeypatch):
    before = torch.get_num_threads()
    try:
        for var in device_mod.THREAD_VARIABLES:
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(device_mod.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
        assert device_mod.available_cores() == 3
        assert device_mod.configure_threads() == 3
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # e.g. a dask worker: left alone
        assert device_mod.configure_threads() == 1
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("shape, patch, chunks", [
    ((20, 1024, 1024), (1, 256, 256), (1, 512, 512)),
    ((20, 1024, 1024), (16, 128, 128), (1, 512, 512)),
    ((7, 3000, 2000), (1, 256, 256), (1, 256, 256)),
    ((5, 100, 90), (1, 64, 64), (1, 1, 1)),
    ((300, 400), (64, 64), (100, 100)),
])
def test_default_blocks_are_chunk_multiples_that_cover_and_bound_memory(shape, patch, chunks):
    block = default_block_shape(shape, patch, chunks)
    assert all(b % c == 0 for b, c in zip(block, chunks))
    assert all(b >= min(p, s) for b, p, s in zip(block, patch, shape))
    covered = np.zeros(shape, dtype=np.uint8) if np.prod(shape) < 5e6 else None
    blocks = plan_blocks(shape, block, [p // 2 for p in patch])
    if covered is not None:
        for b in blocks:
            covered[b.inner] += 1
        assert (covered == 1).all()
    assert int(np.prod(block)) <= 2 * 4 * 1024**2 or len(shape) == 2


def test_whole_sections_need_no_halo_recomputation():
    """A 2D network on 1024^2 sections: every block's outer region equals its inner region."""
    shape, patch = (20, 1024, 1024), (1, 256, 256)
    blocks = plan_blocks(shape, default_block_shape(shape, patch, (1, 512, 512)), [p // 2 for p in patch])
    assert sum(int(np.prod([s.stop - s.start for s in b.outer])) for b in blocks) == int(np.prod(shape))


class _Store:
    """An in-memory output that records the order of writes and can fail on one block."""

    def __init__(self, shape, fail_at=None):
        self.data = np.zeros(shape, dtype=np.float32)
        self.fail_at = fail_at
        self.writes = 0

    def __setitem__(self, index, value):
        self.writes += 1
        if self.writes == self.fail_at:
            raise OSError("disk full")
        self.data[index] = value


def test_overlapped_io_gives_the_same_output_and_stops_at_a_failed_write():
    net = UNet(ndim=2, out_channels=2, depth=1, base_width=4).eval()
    raw = synthetic((4, 64, 64), 0).raw[:, :40, :48]
    predictor = SlidingWindow(softmax_forward(net), (1, 16, 16), divisor=net.divisor)
    blocks = plan_blocks(raw.shape, (1, 16, 16), (0, 8, 8))
    outs = []
    for overlap_io in (False, True):
        store = _Store((2,) + raw.shape)
        done = []
        predict_volume(predictor, raw, store, blocks=blocks, on_block_done=lambda b: done.append(b.index),
                       overlap_io=overlap_io)
        assert done == [b.index for b in blocks]
        outs.append(store.data)
    np.testing.assert_array_equal(outs[0], outs[1])
    store = _Store((2,) + raw.shape, fail_at=3)
    done = []
    with pytest.raises(OSError, match="disk full"):
        predict_volume(predictor, raw, store, blocks=blocks, on_block_done=lambda b: done.append(b.index))
    assert done == [blocks[0].index, blocks[1].index]  # nothing after the failed block is marked done


# --------------------------------------------------------------------------- BALD
class _FullPassesOnly(torch.nn.Module):
    """The same network without encode/decode: scoring must fall back to T full passes."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.ndim = net.ndim

    def forward(self, x, *args, **kwargs):
        return self.net(x, *args, **kwargs)


def test_bald_encoding_once_equals_full_passes_and_baal_style_reference():
    torch.manual_seed(0)
    net = UNet(ndim=2, out_channels=3, depth=2, base_width=4, dropout=0.3).eval()
    with torch.no_grad():  # confident logits, so that dropout moves them and BALD is far from 0
        net.head.weight.mul_(200)
    vol = synthetic((4, 64, 64), 0).raw
    pool = build_pool([vol.shape], (1, 32, 32), candidates=10, rng=0)
    fast = score_pool(net, pool, [vol], "bald", mc_samples=6, batch_size=4, seed=11, precision="fp32")
    slow = score_pool(_FullPassesOnly(net), pool, [vol], "bald", mc_samples=6, batch_size=4, seed=11,
                      precision="fp32")
    np.testing.assert_allclose(fast.scores, slow.scores, rtol=1e-5, atol=1e-7)
    # Independent reference: the same dropout masks (torch seeded as the scorer seeds chunk 0, batches in
    # order), T full passes stacked, and BALD = H[mean_t p_t] - mean_t H[p_t] written out in float64.
    from emseg.active.scoring.stream import chunk_seed

    x = torch.stack([torch.from_numpy(vol[b.slices()][0].astype(np.float32) / 255)[None]
                     for b in (pool.box(i) for i in range(len(pool)))])
    torch.manual_seed(chunk_seed(11, 0))
    set_mc_dropout(net, True)
    ref = []
    with torch.no_grad():
        for b0 in range(0, len(x), 4):
            stack = torch.stack([torch.softmax(net(x[b0:b0 + 4]), 1) for _ in range(6)]).double()
            mean = stack.mean(0)
            h_mean = -(mean * torch.log(mean.clamp_min(1e-300))).sum(1)
            mean_h = -(stack * torch.log(stack.clamp_min(1e-300))).sum(2).mean(0)
            ref.append((h_mean - mean_h).mean(dim=(1, 2)))
    net.eval()
    ref = torch.cat(ref).numpy()
    assert ref.min() > 1e-3
    np.testing.assert_allclose(fast.scores, ref, rtol=1e-4, atol=1e-6)


def test_bald_runs_the_encoder_once_per_batch(monkeypatch):
    net = UNet(ndim=2, out_channels=2, depth=2, base_width=4, dropout=0.2).eval()
    calls = {"encode": 0, "decode": 0}
    enc, dec = net.encode, net.decode
    monkeypatch.setattr(net, "encode", lambda *a: (calls.__setitem__("encode", calls["encode"] + 1), enc(*a))[1])
    monkeypatch.setattr(net, "decode", lambda *a: (calls.__setitem__("decode", calls["decode"] + 1), dec(*a))[1])
    vol = synthetic((4, 64, 64), 0).raw
    pool = build_pool([vol.shape], (1, 32, 32), candidates=8, rng=0)
    score_pool(net, pool, [vol], "bald", mc_samples=5, batch_size=4, seed=1, precision="fp32")
    assert calls == {"encode": 2, "decode": 10}


# --------------------------------------------------------------------------- batch-norm folding
@pytest.mark.parametrize("ndim, aniso", [(2, 0), (3, 1)])
def test_folding_batchnorm_keeps_the_output_and_leaves_the_model_alone(ndim, aniso):
    from emseg.models import fold_batchnorm

    torch.manual_seed(0)
    net = UNet(ndim=ndim, out_channels=3, depth=2, base_width=4, anisotropic_levels=aniso)
    net.train()
    shape = (3, 1) + ((16, 16) if ndim == 2 else (4, 16, 16))
    for _ in range(3):  # non-trivial running statistics
        net(torch.rand(shape) * 3 + 1)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batchnorm(net)
    x = torch.rand(shape)
    with torch.no_grad():
        np.testing.assert_allclose(folded(x).numpy(), net(x).numpy(), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert fold_batchnorm(net.train()) is net  # training mode: nothing to fold


def test_scoring_with_folded_batchnorm_ranks_like_the_network():
    torch.manual_seed(0)
    net = UNet(ndim=2, out_channels=3, depth=2, base_width=4, dropout=0.2)
    net.train()
    vol = synthetic((4, 64, 64), 0).raw
    for _ in range(3):
        net(torch.rand(4, 1, 32, 32) * 2)
    net.eval()
    pool = build_pool([vol.shape], (1, 16, 16), candidates=30, rng=0)
    for strategy in ("entropy", "bald"):
        plain = score_pool(net, pool, [vol], strategy, mc_samples=4, seed=3, precision="fp32")
        folded = score_pool(net, pool, [vol], strategy, mc_samples=4, seed=3, precision="fp32", fold=True)
        np.testing.assert_allclose(folded.scores, plain.scores, rtol=1e-3, atol=1e-6)
    assert not net.training and any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_compiled_prediction_equals_eager(tmp_path):
    """--compile changes how the network runs, not what it computes (fp32, a tiny network)."""
    pytest.importorskip("torch._inductor")
    from emseg.models.checkpoint import save_checkpoint
    from emseg.io import open_volume
    from emseg.semantic.predict import PredictConfig, predict_file
    from conftest import write_h5

    torch.manual_seed(0)
    net = UNet(ndim=2, out_channels=2, depth=1, base_width=4).eval()
    save_checkpoint(tmp_path / "m.pt", {"model": net.state_dict(), "model_config": net.config,
                                        "config": {"patch_shape": [1, 16, 16]}, "step": 0})
    write_h5(tmp_path / "in.h5", raw=synthetic((4, 64, 64), 0).raw[:2, :32, :32])
    outs = []
    for compiled in (False, True):
        out = tmp_path / f"p{int(compiled)}.zarr"
        predict_file(PredictConfig(model=str(tmp_path / "m.pt"), input=f"{tmp_path}/in.h5:raw", output=str(out),
                                   device="cpu", precision="fp32", compile=compiled, batch_size=4))
        with open_volume(str(out)) as vol:
            outs.append(vol[...])
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


def test_validation_sees_the_current_weights_not_a_stale_folded_copy():
    """Each validation folds the network anew: weights changed between two calls change the result."""
    from emseg.data import Cube
    from emseg.semantic.train import evaluate_cubes

    vol = synthetic((4, 64, 64), 0)
    cube = Cube(raw=vol.raw[:1], label=vol.label[:1].astype(np.int16), info=np.ones((2, 3), np.uint8), prio=1.0)
    torch.manual_seed(0)
    net = UNet(ndim=2, out_channels=3, depth=1, base_width=4).eval()
    first = evaluate_cubes(net, [cube], (1, 32, 32), 3, torch.device("cpu"))
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([0.0, 0.0, 50.0]))  # now every voxel is class 2
    second = evaluate_cubes(net, [cube], (1, 32, 32), 3, torch.device("cpu"))
    frac2 = float((vol.label[:1] == 2).mean())
    assert second["valid_jaccard_2"] == pytest.approx(frac2, rel=1e-6) != first["valid_jaccard_2"]
