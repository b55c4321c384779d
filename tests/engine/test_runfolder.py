"""``emseg.engine.runfolder``: one writer per run folder, metrics.csv rows on resume, buffers."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from emseg.engine.runfolder import MetricsLog, in_run_folder, non_finite_state, restore_buffers, snapshot_buffers
from emseg.errors import InputError


@in_run_folder
def _job(task, config, out_dir, *, inside=None, fail=False):
    if inside is not None:
        inside()
    if fail:
        raise RuntimeError("boom")
    (Path(out_dir) / "last.pt").write_bytes(b"x")
    return "done"


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "run"

    def nested():
        with pytest.raises(InputError):
            _job(None, None, out)

    assert _job(None, None, out, inside=nested) == "done"
    assert _job(None, None, out) == "done"  # the lock is released at the end


def test_a_failed_first_run_leaves_no_folder_but_an_earlier_run_keeps_its_own(tmp_path):
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        _job(None, None, fresh, fail=True)
    assert not fresh.exists()
    kept = tmp_path / "kept"
    _job(None, None, kept)
    with pytest.raises(RuntimeError):
        _job(None, None, kept, fail=True)
    assert (kept / "last.pt").read_bytes() == b"x"


def _rows(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_metrics_log_drops_rows_after_the_resumed_step_and_formats_numbers(tmp_path):
    path = tmp_path / "metrics.csv"
    log = MetricsLog(path, ["step", "loss", "note"], resume_step=None)
    for step in (10, 20, 30):
        log.write({"step": step, "loss": 1.0 / step, "note": None, "ignored": 5})
    resumed = MetricsLog(path, ["step", "loss", "note"], resume_step=20)
    resumed.write({"step": 30, "loss": 0.25})
    rows = _rows(path)
    assert [r["step"] for r in rows] == ["10", "20", "30"]
    assert rows[0]["loss"] == f"{0.1:.6g}" and rows[0]["note"] == "" and rows[2]["loss"] == "0.25"
    assert list(rows[0]) == ["step", "loss", "note"]


def test_buffers_are_restored_and_non_finite_state_is_named():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    saved = snapshot_buffers(net)
    net.train()
    net(torch.randn(8, 2) * 100)  # moves the running statistics
    assert not torch.equal(net[1].running_mean, saved[0])
    restore_buffers(net, saved)
    assert torch.equal(net[1].running_mean, saved[0])
    assert non_finite_state(net) is None
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
    assert "0.weight" in non_finite_state(net)
