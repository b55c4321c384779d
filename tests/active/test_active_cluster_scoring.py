"""``emseg.active.scoring.cluster``: the pool scoring of ``emseg query`` on dask.distributed equals in-process
scoring (``emseg.active.scoring.stream``)."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from conftest import (CLUSTER_BLOCK, CLUSTER_BLOCKS, CLUSTER_SHAPE, needs_dask, synthetic, write_h5,
                      zarr_array)

from emseg.active.pool import build_pool
from emseg.active.scoring.cluster import score_pool_on_cluster
from emseg.active.scoring.stream import chunk_seed, score_pool
from emseg.models.checkpoint import save_checkpoint
from emseg.models import build_model

pytestmark = needs_dask
SHAPE, BLOCK, N_BLOCKS = CLUSTER_SHAPE, CLUSTER_BLOCK, CLUSTER_BLOCKS
_array = zarr_array


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
    ref = score_pool(model, pool, [raw], "entropy", batch_size=4, chunk_size=10, precision="fp32")
    got = score_pool_on_cluster(str(ckpt), pool, [f"{h5}:raw"], "entropy", batch_size=4, chunk_size=10,
                                client=client, device="cpu", precision="fp32")
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
