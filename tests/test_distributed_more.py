"""``emseg noise`` and the pool scoring of ``emseg query`` on dask.distributed (threaded test clusters)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import zarr
from conftest import synthetic, write_h5

from emseg.active.pool import build_pool
from emseg.active.scoring import chunk_seed, score_pool, score_pool_on_cluster
from emseg.checkpoint import save_checkpoint
from emseg.cluster import FAIL_BLOCKS_ENV, BlockFailed, open_client
from emseg.errors import InputError
from emseg.models import build_model
from emseg.noise.blockwise import noise_file

HAVE_DASK = importlib.util.find_spec("distributed") is not None
pytestmark = pytest.mark.skipif(not HAVE_DASK, reason="dask.distributed is not installed (extra 'distributed')")
SHAPE = (4, 48, 48)
BLOCK = (2, 24, 24)  # 2 x 2 x 2 = 8 blocks
N_BLOCKS = 8


@pytest.fixture(scope="module")
def client():
    with open_client("local", workers=2, processes=False) as c:
        yield c


@pytest.fixture
def labels_h5(tmp_path):
    return write_h5(tmp_path / "lab.h5", label=synthetic(SHAPE, 3).label)


def _array(path, key=None):
    return zarr.open_array(store=str(path), path=key, mode="r")


# ------------------------------------------------------------------------------ emseg noise


def test_noise_cluster_equals_in_process(tmp_path, labels_h5, client):
    noise_file(f"{labels_h5}:label", str(tmp_path / "ref.zarr"), "flip", {"p": 0.45}, seed=4,
                     block_shape=BLOCK, n_classes=3)
    out = noise_file(f"{labels_h5}:label", str(tmp_path / "run.zarr/noisy/flip"), "flip", {"p": 0.45}, seed=4,
                     block_shape=BLOCK, n_classes=3, client=client, report=True)
    a, b = _array(tmp_path / "ref.zarr"), _array(tmp_path / "run.zarr", "noisy/flip")
    np.testing.assert_array_equal(a[...], b[...])
    assert dict(a.attrs) == dict(b.attrs) and b.attrs["noise_seed"] == 4 and b.attrs["noise_mode"] == "flip"
    assert not (tmp_path / "run.zarr/noisy/.flip.partial").exists()
    assert out.blocks == N_BLOCKS
    # independent check of the flip: per block, round(0.45 * n_k) voxels of each class changed
    clean = synthetic(SHAPE, 3).label
    changed = clean != b[...]
    assert abs(changed.mean() - 0.45) <= N_BLOCKS * 3 / clean.size
    # the report read back from the output is the transition matrix counted directly
    counts = np.zeros((3, 3))
    np.add.at(counts, (clean.ravel(), b[...].ravel()), 1)
    np.testing.assert_allclose(out.report["matrix"], counts / counts.sum(1, keepdims=True))


def test_noise_resume_after_a_failed_block_computes_only_the_rest(tmp_path, labels_h5, client, monkeypatch):
    ref = tmp_path / "ref.zarr"
    noise_file(f"{labels_h5}:label", str(ref), "shift", {"radius": 2}, seed=1, block_shape=BLOCK)
    out = tmp_path / "out.zarr"
    monkeypatch.setenv(FAIL_BLOCKS_ENV, "5")
    with pytest.raises(BlockFailed, match=r"block 5 .*failed after 1 attempt"):
        noise_file(f"{labels_h5}:label", str(out), "shift", {"radius": 2}, seed=1, block_shape=BLOCK,
                   client=client, retries=0)
    partial = tmp_path / "out.zarr.partial"
    assert not out.exists() and sorted(int(p.name) for p in (partial / ".done").iterdir()) == [
        i for i in range(N_BLOCKS) if i != 5]
    # rerun: every block but 5 would fail, so success means only block 5 was computed
    monkeypatch.setenv(FAIL_BLOCKS_ENV, ",".join(str(i) for i in range(N_BLOCKS) if i != 5))
    noise_file(f"{labels_h5}:label", str(out), "shift", {"radius": 2}, seed=1, block_shape=BLOCK, client=client)
    np.testing.assert_array_equal(_array(out)[...], _array(ref)[...])
    assert not partial.exists() and "emseg_resume" not in _array(out).attrs
    # a partial started with other parameters is refused, not mixed
    monkeypatch.setenv(FAIL_BLOCKS_ENV, "0")
    with pytest.raises(BlockFailed):
        noise_file(f"{labels_h5}:label", str(tmp_path / "o2.zarr"), "shift", {"radius": 2}, seed=1,
                   block_shape=BLOCK, client=client, retries=0)
    monkeypatch.delenv(FAIL_BLOCKS_ENV)
    with pytest.raises(InputError, match="other parameters.*noise_seed 1 -> 2"):
        noise_file(f"{labels_h5}:label", str(tmp_path / "o2.zarr"), "shift", {"radius": 2}, seed=2,
                   block_shape=BLOCK, client=client)


def test_noise_scheduler_needs_zarr_output(tmp_path, labels_h5):
    from click.testing import CliRunner
    from emseg.cli.main import cli

    res = CliRunner().invoke(cli, ["noise", f"{labels_h5}:label", f"{tmp_path / 'o.h5'}:n", "--flip", "0.2",
                                   "--scheduler", "tcp://127.0.0.1:1"])
    assert res.exit_code == 2 and "needs a zarr output" in res.output
    res = CliRunner().invoke(cli, ["noise", f"{labels_h5}:label", str(tmp_path / "o.zarr"), "--flip", "0.2",
                                   "--workers", "2"])
    assert res.exit_code == 2 and "--scheduler local only" in res.output
    assert not (tmp_path / "o.zarr").exists()


# ------------------------------------------------------------------------------ emseg query scoring


@pytest.fixture
def net_and_raw(tmp_path):
    torch.manual_seed(0)
    config = {"ndim": 2, "in_channels": 1, "out_channels": 3, "depth": 1, "base_width": 4, "norm": "batch",
              "dropout": 0.3}
    model = build_model(config).eval()
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "model_config": config})
    raw = synthetic(SHAPE, 5).raw
    return model, ckpt, raw, write_h5(tmp_path / "raw.h5", raw=raw)


def test_query_scoring_on_cluster_equals_in_process(net_and_raw, client):
    model, ckpt, raw, h5 = net_and_raw
    pool = build_pool([raw.shape], (1, 16, 16))  # 36 candidates, chunks of 10 -> 4 tasks
    ref = score_pool(model, pool, [raw], "entropy", batch_size=4, chunk_size=10)
    got = score_pool_on_cluster(str(ckpt), pool, [f"{h5}:raw"], "entropy", batch_size=4, chunk_size=10,
                                client=client, device="cpu")
    np.testing.assert_array_equal(got.scores, ref.scores)
    # independent: mean pixel entropy of the softmax, patch by patch
    for i in (0, 17, 35):
        box = pool.box(i)
        x = torch.from_numpy(raw[box.slices()][0].astype(np.float32) / 255)[None, None]
        with torch.no_grad():
            p = torch.softmax(model(x), 1).double()
        assert got.scores[i] == pytest.approx(float(-(p * torch.log(p.clamp_min(1e-300))).sum(1).mean()), rel=1e-5)
    # BALD: the same per-chunk seeds give the same scores; another seed gives others
    bald = {"batch_size": 4, "chunk_size": 10, "mc_samples": 3, "seed": 7}
    ref = score_pool(model, pool, [raw], "bald", **bald)
    got = score_pool_on_cluster(str(ckpt), pool, [f"{h5}:raw"], "bald", client=client, device="cpu", **bald)
    np.testing.assert_array_equal(got.scores, ref.scores)
    other = score_pool(model, pool, [raw], "bald", **{**bald, "seed": 8})
    assert not np.array_equal(other.scores, ref.scores)
    assert chunk_seed(7, 0) != chunk_seed(7, 1)
