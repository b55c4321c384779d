"""``emseg.runtime.ddp``: two-process DDP training equals one process on the whole batch; one process is the identity."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import tiny_train_config
from emseg.engine.config import config_from_dict
from emseg.runtime.ddp import ProcessGroup
from emseg.errors import InputError
from emseg.models import build_model
from emseg.semantic.train import SegmentationTask

# ------------------------------------------------------------------------------ DDP training

HARNESS = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from emseg.engine.config import config_from_dict
    from emseg.engine.training import run_training
    from emseg.runtime import Runtime
    from emseg.semantic.train import SegmentationTask

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
            result = run_training(task, cfg, out / name, runtime=Runtime(device="cpu", seed=7), **kw)
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
