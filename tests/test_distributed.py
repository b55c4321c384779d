"""Scaling out: blockwise prediction on dask.distributed with resume, and 2-process DDP training."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import synthetic, tiny_train_config, write_h5
from emseg.checkpoint import save_checkpoint
from emseg.config import config_from_dict
from emseg.cluster import (
    FAIL_BLOCKS_ENV,
    BlockFailed,
    DoneMarkers,
    fit_chunks,
    open_client,
    require_distributed,
    run_blocks,
)
from emseg.ddp import ProcessGroup
from emseg.errors import InputError
from emseg.blocks import plan_blocks
from emseg.models import build_model
from emseg.predict import PredictConfig, predict_file
from emseg.training import SegmentationTask

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


# ------------------------------------------------------------------------------ generic executor


def test_run_blocks_in_process_retries_marks_and_skips(tmp_path):
    attempts: dict[int, int] = {}

    def flaky(block):
        attempts[block.index] = attempts.get(block.index, 0) + 1
        if block.index == 2 and attempts[2] < 3:
            raise OSError("transient")
        return block.index * 10

    blocks = plan_blocks((4, 4), (2, 2), (0, 0))
    markers = DoneMarkers(tmp_path / "done")
    markers.mark(1)
    seen = []
    report = run_blocks(flaky, blocks, retries=2, done=markers, on_done=lambda b, r: seen.append((b.index, r)))
    assert report.skipped == [1] and sorted(report.computed) == [0, 2, 3]
    assert attempts == {0: 1, 2: 3, 3: 1}  # block 1 never ran, block 2 succeeded on its third attempt
    assert sorted(seen) == [(0, 0), (2, 20), (3, 30)]
    assert markers.done() == {0, 1, 2, 3}


def test_run_blocks_reports_the_block_after_retries(tmp_path):
    calls = []

    def broken(block):
        calls.append(block.index)
        if block.index == 3:
            raise ValueError("bad pixels\nsecond line")
        return None

    blocks = plan_blocks((4, 4), (2, 2), (1, 1))
    markers = DoneMarkers(tmp_path / "done")
    with pytest.raises(BlockFailed) as info:
        run_blocks(broken, blocks, retries=1, done=markers, failure_source="out.zarr")
    message = str(info.value)
    assert message.startswith("out.zarr: block 3 [2:4, 2:4] failed after 2 attempt(s) (ValueError: bad pixels)")
    assert "\n" not in message and isinstance(info.value, InputError)
    assert calls.count(3) == 2 and markers.done() == {0, 1, 2}  # the others finished and were recorded


def test_missing_dask_is_an_input_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(InputError, match=r"pip install 'emseg\[distributed\]'"):
        require_distributed()


def test_fit_chunks_tile_the_block():
    for block, chunks in [((16, 512, 512), (4, 256, 256)), ((12, 300, 500), (8, 256, 256)), ((3, 7), (8, 8))]:
        fitted = fit_chunks(block, chunks)
        assert all(b % c == 0 and c <= max(k, 1) for b, c, k in zip(block, fitted, chunks))
    assert fit_chunks((12, 300, 500), (8, 256, 256)) == (6, 150, 250)
    with pytest.raises(InputError, match="multiples"):
        fit_chunks((257,), (256,))  # a prime side only tiles into 1-voxel chunks


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
    with pytest.raises(InputError, match="--workers applies to --scheduler local only"):
        predict_file(_config(ckpt, raw, tmp_path / "o.zarr", workers=2))


def test_cli_scheduler_with_h5_output_exits_2(tmp_path, model_and_raw):
    from click.testing import CliRunner

    from emseg.cli.main import cli

    ckpt, raw = model_and_raw
    res = CliRunner().invoke(cli, ["predict", str(ckpt), f"{raw}:raw", f"{tmp_path / 'o.h5'}:p",
                                   "--scheduler", "tcp://127.0.0.1:1"])
    assert res.exit_code == 2 and "needs a zarr output" in res.output


# ------------------------------------------------------------------------------ DDP training

HARNESS = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from emseg.config import config_from_dict
    from emseg.training import SegmentationTask, run_training

    class Recording(SegmentationTask):
        """Keeps the batches it draws and the model the loss sees."""
        def batch(self, rng):
            b = super().batch(rng)
            self.batches = getattr(self, "batches", []) + [{k: v.clone() for k, v in b.items()}]
            return b
        def loss(self, model, batch):
            self.net = getattr(model, "net", model)  # inside the precision wrapper: the DDP module
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 2:  # the weights after the first update
                self.after_one = {n: p.detach().clone() for n, p in model.module.named_parameters()}
            return super().loss(model, batch)

    cfg = config_from_dict(json.loads(Path(sys.argv[1]).read_text()))
    out, rank = Path(sys.argv[2]), int(os.environ["RANK"])

    def run(name, **kw):
        task = Recording(cfg)
        try:
            result = run_training(task, cfg, out / name, device="cpu", seed=7, **kw)
        finally:
            task.close()
        return task, result

    full, full_result = run("full")
    _, first = run("split", stop_after=3)
    _, rest = run("split", resume=True)
    torch.save({
        "wrapper": type(full.net).__name__, "divisor": list(full.net.divisor),
        "full_batches": full.batches, "after_one": full.after_one,
        "params": {n: p.detach().clone() for n, p in full.net.module.named_parameters()},
        "losses": full_result.losses, "split_losses": first.losses + rest.losses,
        "best": full_result.best_metric,
    }, out / f"rank{rank}.pt")
''')


def test_two_process_ddp_training(tmp_path, synthetic_h5, synthetic_valid_h5):
    config = tiny_train_config(synthetic_h5, steps=6, valid_every=2,
                               valid=[{"raw": f"{synthetic_valid_h5}:raw", "label": f"{synthetic_valid_h5}:label"}])
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "harness.py").write_text(HARNESS)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(tmp_path / "harness.py"), str(tmp_path / "config.json"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    load = lambda p: torch.load(p, weights_only=True)  # noqa: E731

    # Real DDP; the network's own attributes stay reachable through the wrapper.
    assert r0["wrapper"] == r1["wrapper"] != "UNet" and r0["divisor"] == [4, 4]
    # Each rank draws its own patches (seed + rank) ...
    assert not torch.equal(r0["full_batches"][0]["raw"], r1["full_batches"][0]["raw"])
    # ... yet both end with the same weights, and rank 0's checkpoint holds exactly them.
    last = load(tmp_path / "full" / "last.pt")
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
        assert torch.equal(p, last["model"][name]), name
    assert last["world_size"] == 2 and len(last["rng_ranks"]) == 2
    assert last["rng_ranks"][0]["numpy"] == last["rng"]["numpy"] != last["rng_ranks"][1]["numpy"]
    assert r0["losses"] == r1["losses"] and r0["best"] == r1["best"] is not None
    assert (tmp_path / "full" / "best.pt").exists() and not list(tmp_path.glob("full/.*"))
    rows = (tmp_path / "full" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 6  # written once (rank 0), one row per step

    # Resume: stop after 3 steps, continue, and land on exactly the uninterrupted run.
    split = load(tmp_path / "split" / "last.pt")
    assert r0["split_losses"] == r0["losses"] and r1["split_losses"] == r1["losses"]
    for name, p in last["model"].items():
        assert torch.equal(p, split["model"][name]), name

    # One step equals Adam on the mean of the two ranks' gradients, computed here independently.
    cfg = config_from_dict(config)
    task = SegmentationTask(cfg)

    def first_step(batches):
        torch.manual_seed(7)  # rank 0's initial weights, broadcast to rank 1 by DDP
        model = build_model(task.model_config())
        model.train()
        grads, losses = [], []
        for batch in batches:
            model.zero_grad()
            loss = task.loss(model, batch)
            loss.backward()
            losses.append(float(loss.detach()))
            grads.append([p.grad.clone() for p in model.parameters()])
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
        for p, *g in zip(model.parameters(), *grads):
            p.grad = sum(g) / len(g)
        optimizer.step()
        return dict(model.named_parameters()), float(np.mean(losses))

    both, mean_loss = first_step([r0["full_batches"][0], r1["full_batches"][0]])
    alone, _ = first_step([r0["full_batches"][0]])
    task.close()
    assert r0["losses"][0] == pytest.approx(mean_loss, rel=1e-6)  # the logged loss is the mean over ranks
    for name, p in both.items():
        torch.testing.assert_close(r0["after_one"][name], p.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(r1["after_one"][name], p.detach(), rtol=0, atol=1e-5)
    assert any(not torch.allclose(r0["after_one"][n], p.detach(), atol=1e-5) for n, p in alone.items())


def test_single_process_group_is_the_identity(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    group = ProcessGroup.from_env()
    model = torch.nn.Linear(2, 2)
    assert not group.active and group.is_main and group.wrap(model) is model
    assert group.mean(1.5) == 1.5 and group.any(True) is True and group.broadcast({"a": 1}) == {"a": 1}
    with pytest.raises(InputError, match="written by 2 training process"):
        group.rng_state({"world_size": 2, "rng": {}, "rng_ranks": [{}, {}]}, "last.pt")
