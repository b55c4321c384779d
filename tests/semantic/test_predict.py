"""``emseg.semantic.predict``: blockwise prediction in this process or on dask.distributed, resumable."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import synthetic, write_h5
from emseg.models.checkpoint import save_checkpoint
from emseg.engine.cluster import FAIL_BLOCKS_ENV, BlockFailed, DoneMarkers, open_client, require_distributed
from emseg.errors import InputError
from emseg.models import build_model
from emseg.semantic.predict import PredictConfig, predict_file

HAVE_DASK = importlib.util.find_spec("distributed") is not None
needs_dask = pytest.mark.skipif(not HAVE_DASK, reason="dask.distributed is not installed (extra 'distributed')")
SHAPE = (4, 64, 64)
BLOCK = (2, 32, 32)  # 2 x 2 x 2 = 8 blocks
N_BLOCKS = 8


@pytest.fixture
def model_and_raw(tmp_path) -> tuple[Path, Path]:
    """A small random 2D U-Net checkpoint (3 classes) and a raw volume of SHAPE."""
    torch.manual_seed(0)
    config = dict(ndim=2, in_channels=1, out_channels=3, depth=2, base_width=4, norm="batch")
    model = build_model(config)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "model_config": config,
                           "config": {"patch_shape": [1, 32, 32]}})
    raw = write_h5(tmp_path / "raw.h5", raw=synthetic(SHAPE, 2).raw)
    return ckpt, raw


def _config(ckpt, raw, output, **kw) -> PredictConfig:
    return PredictConfig(model=str(ckpt), input=f"{raw}:raw", output=str(output), block_shape=BLOCK,
                         device="cpu", **kw)


def _read(path, key=None) -> np.ndarray:
    return zarr.open_array(store=str(path), path=key, mode="r")[...]


def _reference(ckpt, raw, tmp_path) -> np.ndarray:
    """The plain in-process prediction (temporary output renamed at the end, no markers)."""
    predict_file(_config(ckpt, raw, tmp_path / "ref.zarr"))
    return _read(tmp_path / "ref.zarr")


# ------------------------------------------------------------------------------ prediction


@needs_dask
def test_threaded_cluster_equals_in_process(tmp_path, model_and_raw):
    distributed = require_distributed()
    ckpt, raw = model_and_raw
    expected = _reference(ckpt, raw, tmp_path)
    done = []
    with distributed.Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None) as client:
        result = predict_file(_config(ckpt, raw, tmp_path / "out.zarr/pred/probs"), client=client,
                              progress=lambda d, t: done.append((d, t)))
    np.testing.assert_array_equal(_read(tmp_path / "out.zarr", "pred/probs"), expected)
    assert result.blocks_computed == N_BLOCKS and result.stats.voxels == int(np.prod(SHAPE))
    assert done[-1] == (int(np.prod(SHAPE)),) * 2
    attrs = zarr.open_array(store=str(tmp_path / "out.zarr"), path="pred/probs").attrs
    assert "emseg_resume" not in attrs and attrs["n_classes"] == 3
    assert sorted(os.listdir(tmp_path / "out.zarr" / "pred")) == ["probs", "zarr.json"]  # no partial left
    assert not (tmp_path / "out.zarr" / "pred" / "probs" / ".done").exists()


@needs_dask
def test_process_cluster_failure_then_resume_computes_only_the_rest(tmp_path, model_and_raw, monkeypatch):
    ckpt, raw = model_and_raw
    expected = _reference(ckpt, raw, tmp_path)  # conftest pins torch to one thread, like the workers
    out = tmp_path / "out.zarr"
    config = _config(ckpt, raw, out, retries=1)
    partial = tmp_path / "out.zarr.partial"
    # One cluster of real worker processes for both runs (starting one takes seconds).
    with open_client("local", workers=2) as client:
        monkeypatch.setenv(FAIL_BLOCKS_ENV, "5")
        with pytest.raises(BlockFailed, match=r"block 5 \[2:4, 0:32, 32:64\] failed after 2 attempt") as info:
            predict_file(config, client=client)
        assert info.value.index == 5
        assert not out.exists() and partial.is_dir()  # the final name appears only when complete
        assert DoneMarkers(partial / ".done").done() == set(range(N_BLOCKS)) - {5}

        # Every block but 5 now fails if computed again: the rerun succeeds only by skipping them.
        monkeypatch.setenv(FAIL_BLOCKS_ENV, ",".join(str(i) for i in range(N_BLOCKS) if i != 5))
        result = predict_file(config, client=client)
        pids = set(client.run(os.getpid).values())
    assert os.getpid() not in pids and len(pids) == 2  # the blocks ran in other processes
    assert result.blocks_computed == 1 and result.blocks_skipped == N_BLOCKS - 1
    np.testing.assert_array_equal(_read(out), expected)
    assert not partial.exists()


@needs_dask
def test_a_remote_scheduler_builds_the_network_on_its_workers_only(tmp_path, model_and_raw, monkeypatch):
    """Its workers may have devices this machine lacks: the submitting process checks the
    checkpoint but builds no network, and reports the precision as asked, unresolved."""
    distributed = require_distributed()
    ckpt, raw = model_and_raw
    expected = _reference(ckpt, raw, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the network was built in the submitting process")

    monkeypatch.setattr("emseg.semantic.predict.open_for_volume", refuse)
    with distributed.Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None) as client:
        result = predict_file(_config(ckpt, raw, tmp_path / "r.zarr", scheduler="tcp://127.0.0.1:9"), client=client)
    np.testing.assert_array_equal(_read(tmp_path / "r.zarr"), expected)
    assert result.precision == PredictConfig.precision and result.blocks_computed == N_BLOCKS
    with pytest.raises(AssertionError, match="submitting process"):  # a run on this machine's workers builds it
        predict_file(_config(ckpt, raw, tmp_path / "l.zarr", resume=True))


def test_in_process_resume_and_parameter_check(tmp_path, model_and_raw, monkeypatch):
    ckpt, raw = model_and_raw
    expected = _reference(ckpt, raw, tmp_path)
    out = tmp_path / "res.zarr"
    monkeypatch.setenv(FAIL_BLOCKS_ENV, "0,7")
    with pytest.raises(BlockFailed, match=r"block 0 .*1 other block\(s\) failed too"):
        predict_file(_config(ckpt, raw, out, resume=True, retries=0))
    with pytest.raises(InputError, match=r"other parameters.*overlap 0.25 -> 0.5"):
        predict_file(_config(ckpt, raw, out, resume=True, overlap=0.5))
    monkeypatch.delenv(FAIL_BLOCKS_ENV)
    result = predict_file(_config(ckpt, raw, out, resume=True))
    assert (result.blocks_computed, result.blocks_skipped) == (2, N_BLOCKS - 2)
    np.testing.assert_array_equal(_read(out), expected)


def test_cluster_needs_zarr_output(tmp_path, model_and_raw):
    ckpt, raw = model_and_raw
    with pytest.raises(InputError, match="needs a zarr output"):
        predict_file(_config(ckpt, raw, f"{tmp_path / 'o.h5'}:probs", scheduler="local", workers=1))
    with pytest.raises(InputError, match="`workers` applies only when `scheduler` is 'local'"):
        predict_file(_config(ckpt, raw, tmp_path / "o.zarr", workers=2))


def test_cli_words_parameter_names_as_its_flags(tmp_path, model_and_raw):
    """The core names `workers` and `scheduler`; `emseg predict` says --workers and --scheduler."""
    from click.testing import CliRunner

    from emseg.cli.main import cli

    ckpt, raw = model_and_raw
    with pytest.raises(InputError) as info:
        predict_file(_config(ckpt, raw, tmp_path / "o.zarr", workers=2))
    assert "`workers`" in str(info.value) and "--workers" not in str(info.value)
    res = CliRunner().invoke(cli, ["predict", str(ckpt), f"{raw}:raw", str(tmp_path / "o.zarr"), "--workers", "2"])
    assert res.exit_code == 2
    assert res.stderr.strip() == "error: --workers applies only when --scheduler is 'local'"
    res = CliRunner().invoke(cli, ["predict", str(ckpt), f"{raw}:raw", str(tmp_path / "o.zarr"), "--block", "2,32",
                                   "--json"])
    assert res.exit_code == 2 and not (tmp_path / "o.zarr").exists()
    assert json.loads(res.stdout)["error"] == f"{raw}:raw: --block (2, 32) does not fit a 3D volume"


def test_cli_scheduler_with_h5_output_exits_2(tmp_path, model_and_raw):
    from click.testing import CliRunner

    from emseg.cli.main import cli

    ckpt, raw = model_and_raw
    res = CliRunner().invoke(cli, ["predict", str(ckpt), f"{raw}:raw", f"{tmp_path / 'o.h5'}:p",
                                   "--scheduler", "tcp://127.0.0.1:1"])
    assert res.exit_code == 2 and "needs a zarr output" in res.output
