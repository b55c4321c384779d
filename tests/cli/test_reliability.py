"""Reliability: finite checkpoints, locks, stale temp files, exact logs after resume, and kill -9 faults.

The fault tests run a real process, kill it with SIGKILL at a chosen moment (while a checkpoint
is half written, while a resumable output has some blocks done), then resume and compare the
result with an uninterrupted run, bit for bit.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import synthetic, tiny_train_config, write_h5
from emseg.models.checkpoint import load_checkpoint, save_checkpoint
from emseg.engine.config import config_from_dict
from emseg.errors import InputError, TrainingDiverged
from emseg.runtime.locks import WriterLock, clean_stale_temps, lock_folder, pid_alive
from emseg.models import build_model
from emseg.semantic.predict import PredictConfig, predict_file
from emseg.engine.training import run_training
from emseg.semantic.train import SegmentationTask, train
from emseg.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]


def _config(h5: Path, **overrides):
    data = tiny_train_config(h5, **overrides)
    data.setdefault("model", {}).update(depth=1, base_width=2)
    data["patch_shape"] = [1, 16, 16]
    return config_from_dict(data)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for the child process")
        time.sleep(0.01)


def _spawn(script: str, tmp_path: Path) -> subprocess.Popen:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(script))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))
    return subprocess.Popen([sys.executable, str(path)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _rows(path: Path) -> list[tuple[str, str, str]]:
    with path.open(newline="") as fh:
        return [(r["step"], r["loss"], r["lr"]) for r in csv.DictReader(fh)]


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------- NaN / finite state


class _BlowUpTask(SegmentationTask):
    """The third batch has raw values of 1e38: its forward pass overflows and poisons BatchNorm."""

    calls = 0

    def batch(self, rng):
        data = super().batch(rng)
        self.calls += 1
        if self.calls == 3:
            data["raw"] = data["raw"] * 0 + 1e38
        return data


def test_nan_loss_keeps_the_last_good_state_buffers_included(tmp_path, synthetic_h5):
    cfg = _config(synthetic_h5, steps=6, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match="at step 3"):
        run_training(_BlowUpTask(cfg), cfg, tmp_path / "run", runtime=Runtime(device="cpu", seed=0))
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # the same two good steps without the blow-up: the kept checkpoint is exactly that state
    run_training(SegmentationTask(cfg), cfg, tmp_path / "ref", runtime=Runtime(device="cpu", seed=0), stop_after=2)
    _assert_same_weights(tmp_path / "run" / "last.pt", tmp_path / "ref" / "last.pt")
    buffers = [k for k in state["model"] if "running_" in k]
    assert buffers  # BatchNorm statistics are part of what was checked


def test_prediction_stops_at_a_non_finite_output_naming_the_block(tmp_path, synthetic_h5):
    net = dict(ndim=2, in_channels=1, out_channels=3, depth=1, base_width=2, norm="none")
    model = build_model(net)
    weights = {k: v * 1e15 for k, v in model.state_dict().items()}  # finite weights, overflowing features
    save_checkpoint(tmp_path / "m.pt", {"model": weights, "model_config": net, "config": {"patch_shape": [1, 16, 16]}})
    with pytest.raises(InputError, match=r"non-finite in block 0 \[0:"):
        predict_file(PredictConfig(str(tmp_path / "m.pt"), f"{synthetic_h5}:raw", str(tmp_path / "p.zarr"),
                                   device="cpu"))
    assert not (tmp_path / "p.zarr").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "train.h5"]


# --------------------------------------------------------------------------- logging window


def test_metrics_after_resume_equal_an_uninterrupted_run(tmp_path, synthetic_h5):
    cfg = _config(synthetic_h5, steps=8, log_every=3, checkpoint_every=2)
    train(cfg, tmp_path / "full", runtime=Runtime(device="cpu", seed=0))
    first = train(cfg, tmp_path / "split", runtime=Runtime(device="cpu", seed=0), stop_after=4)  # mid-window: steps 4 of 4..6
    assert first.interrupted and first.final_step == 4
    train(cfg, tmp_path / "split", runtime=Runtime(device="cpu", seed=0), resume=True)
    full, split = _rows(tmp_path / "full" / "metrics.csv"), _rows(tmp_path / "split" / "metrics.csv")
    assert [r[0] for r in full] == ["3", "6", "8"]
    assert split == full
    _assert_same_weights(tmp_path / "full" / "last.pt", tmp_path / "split" / "last.pt")


# --------------------------------------------------------------------------- locks and temp files


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    child = _spawn(f"""
        import time
        from emseg.runtime.locks import lock_folder
        lock = lock_folder({str(folder)!r})
        open({str(tmp_path / 'ready')!r}, 'w').close()
        time.sleep(600)
    """, tmp_path)
    try:
        _wait_for(lambda: (tmp_path / "ready").exists() or child.poll() is not None)
        with pytest.raises(InputError, match=f"in use by process {child.pid}"):
            lock_folder(folder)
    finally:
        _kill(child)
    assert (folder / ".emseg.lock").read_text().strip() == str(child.pid)  # left behind by kill -9
    with lock_folder(folder) as lock:
        assert lock.held and (folder / ".emseg.lock").read_text().strip() == str(os.getpid())
    assert not (folder / ".emseg.lock").exists()


def test_two_trainings_into_one_folder(tmp_path, synthetic_h5):
    cfg = _config(synthetic_h5, steps=2)
    (tmp_path / "run").mkdir()
    with WriterLock(tmp_path / "run" / ".emseg.lock"):
        with pytest.raises(InputError, match=f"in use by process {os.getpid()}"):
            train(cfg, tmp_path / "run", runtime=Runtime(device="cpu"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


def test_a_failed_training_removes_the_folder_it_created(tmp_path, synthetic_h5):
    cfg = _config(synthetic_h5, steps=2)
    with pytest.raises(InputError, match="nothing to resume"):
        train(cfg, tmp_path / "new" / "run", runtime=Runtime(device="cpu"), resume=True)
    assert not (tmp_path / "new" / "run").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(InputError, match="nothing to resume"):
        train(cfg, tmp_path / "kept", runtime=Runtime(device="cpu"), resume=True)
    assert (tmp_path / "kept").is_dir()  # not ours to remove


def test_stale_temp_files_only_of_dead_processes_are_removed(tmp_path):
    dead = _dead_pid()
    assert not pid_alive(dead)
    names = [f".last.pt.tmp-{dead}-a1b2c3", f".last.pt.tmp-{os.getpid()}-a1b2c3", ".last.pt.tmp-x",
             "last.pt", f".best.pt.tmp-{dead}"]
    for name in names:
        (tmp_path / name).write_text("x")
    (tmp_path / f".out.zarr.tmp-{dead}-0f0f0f0f").mkdir()
    removed = clean_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".last.pt.tmp-{dead}-a1b2c3", f".best.pt.tmp-{dead}",
                                                      f".out.zarr.tmp-{dead}-0f0f0f0f"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".last.pt.tmp-{os.getpid()}-a1b2c3", ".last.pt.tmp-x", "last.pt"])


# --------------------------------------------------------------------------- kill -9, then resume


def test_kill_during_checkpoint_writing_then_resume_is_exact(tmp_path, synthetic_h5):
    data = tiny_train_config(synthetic_h5, steps=6, checkpoint_every=2, log_every=1)
    data.setdefault("model", {}).update(depth=1, base_width=2)
    data["patch_shape"] = [1, 16, 16]
    cfg = config_from_dict(data)
    train(cfg, tmp_path / "ref", runtime=Runtime(device="cpu", seed=0))
    run = tmp_path / "run"
    child = _spawn(f"""
        import time, torch
        import emseg.models.checkpoint
        from emseg.engine.config import config_from_dict
        from emseg.semantic.train import train
        from emseg.runtime import Runtime
        real = torch.save
        def save(state, path):
            real(state, path)
            if state["step"] == 4:  # the tmp file is complete, the rename has not happened
                open({str(tmp_path / 'ready')!r}, 'w').close()
                time.sleep(600)
        emseg.models.checkpoint.torch.save = save
        torch.set_num_threads(1)
        train(config_from_dict({data!r}), {str(run)!r}, runtime=Runtime(device="cpu", seed=0))
    """, tmp_path)
    _wait_for(lambda: (tmp_path / "ready").exists() or child.poll() is not None)
    assert child.poll() is None, child.stderr.read().decode()
    _kill(child)
    temps = [p.name for p in run.iterdir() if ".tmp-" in p.name]
    assert temps == [f".last.pt.tmp-{child.pid}-" + temps[0].rsplit("-", 1)[1]]
    assert load_checkpoint(run / "last.pt")["step"] == 2  # the previous good checkpoint
    result = train(cfg, run, runtime=Runtime(device="cpu", seed=0), resume=True)
    assert result.start_step == 2 and result.final_step == 6
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt", "metrics.csv"]
    _assert_same_weights(tmp_path / "ref" / "last.pt", run / "last.pt")
    assert _rows(run / "metrics.csv") == _rows(tmp_path / "ref" / "metrics.csv")


@pytest.fixture
def model_pt(tmp_path) -> Path:
    torch.manual_seed(3)
    net = dict(ndim=2, in_channels=1, out_channels=3, depth=1, base_width=2, norm="group")
    save_checkpoint(tmp_path / "model.pt", {"model": build_model(net).state_dict(), "model_config": net,
                                            "config": {"patch_shape": [1, 16, 16]}})
    return tmp_path / "model.pt"


def test_kill_during_resumable_predict_then_resume_is_identical(tmp_path, model_pt):
    write_h5(tmp_path / "in.h5", raw=synthetic((4, 32, 32), 2).raw)
    common = dict(model=str(model_pt), input=f"{tmp_path}/in.h5:raw", block_shape=(1, 16, 16), device="cpu",
                  resume=True)
    predict_file(PredictConfig(output=str(tmp_path / "ref.zarr"), **common))
    out = tmp_path / "out.zarr"
    child = _spawn(f"""
        import time, torch
        import emseg.engine.inference
        from emseg.semantic.predict import PredictConfig, predict_file
        real, calls = emseg.engine.inference.predict_block, []
        def slow(predictor, source, block, **kw):
            calls.append(block.index)
            if len(calls) == 6:  # 5 blocks done and marked; the 6th never finishes
                time.sleep(600)
            return real(predictor, source, block, **kw)
        emseg.engine.inference.predict_block = slow  # what each resumable task calls
        torch.set_num_threads(1)
        predict_file(PredictConfig(output={str(out)!r}, **{common!r}))
    """, tmp_path)
    done = tmp_path / "out.zarr.partial" / ".done"
    _wait_for(lambda: (done.is_dir() and len(list(done.iterdir())) >= 5) or child.poll() is not None)
    assert child.poll() is None, child.stderr.read().decode()
    _kill(child)
    assert not out.exists() and (tmp_path / ".out.zarr.partial.lock").exists()
    result = predict_file(PredictConfig(output=str(out), **common))
    assert result.blocks_skipped == 5 and result.blocks_computed == 16 - 5
    np.testing.assert_array_equal(zarr.open_array(str(out), mode="r")[...],
                                  zarr.open_array(str(tmp_path / "ref.zarr"), mode="r")[...])
    assert not (tmp_path / ".out.zarr.partial.lock").exists() and not (tmp_path / "out.zarr.partial").exists()


def test_kill_during_resumable_noise_then_resume_is_identical(tmp_path):
    pytest.importorskip("distributed")
    from emseg.engine.cluster import open_client
    from emseg.noise.blockwise import NoiseConfig, noise_file

    write_h5(tmp_path / "lab.h5", label=synthetic((4, 32, 32), 3).label)
    args = (f"{tmp_path}/lab.h5:label",)
    kwargs = dict(mode="flip", params={"p": 0.3}, seed=2, block_shape=(1, 16, 16), n_classes=3)
    noise_file(NoiseConfig(args[0], str(tmp_path / "ref.zarr"), **kwargs))
    out = tmp_path / "out.zarr"
    child = _spawn(f"""
        import time
        import emseg.noise.process as per_block
        from emseg.noise.blockwise import NoiseConfig, noise_file
        from emseg.engine.cluster import open_client
        real, calls = per_block._apply, []
        def slow(data, block, *a, **kw):
            calls.append(block.index)
            if len(calls) == 6:
                time.sleep(600)
            return real(data, block, *a, **kw)
        per_block._apply = slow
        with open_client("local", workers=1, processes=False) as client:
            noise_file(NoiseConfig({args[0]!r}, {str(out)!r}, retries=0, **{kwargs!r}), client=client)
    """, tmp_path)
    done = tmp_path / "out.zarr.partial" / ".done"
    _wait_for(lambda: (done.is_dir() and len(list(done.iterdir())) >= 5) or child.poll() is not None, 120)
    assert child.poll() is None, child.stderr.read().decode()
    _kill(child)
    assert not out.exists()
    with open_client("local", workers=1, processes=False) as client:
        result = noise_file(NoiseConfig(args[0], str(out), **kwargs), client=client)
    assert result.blocks == 16
    np.testing.assert_array_equal(zarr.open_array(str(out), mode="r")[...],
                                  zarr.open_array(str(tmp_path / "ref.zarr"), mode="r")[...])
    assert not (tmp_path / ".out.zarr.partial.lock").exists()


def test_a_budget_stop_writes_what_a_normal_end_writes(tmp_path, synthetic_h5):
    """Stopped by max_seconds before the first log_every: the final metrics row and last.pt are there."""
    cfg = _config(synthetic_h5, steps=None, max_seconds=0.4, log_every=10 ** 6, checkpoint_every=10 ** 6)
    result = train(cfg, tmp_path / "run", runtime=Runtime(device="cpu"))
    assert result.budget_exhausted and not result.interrupted and result.final_step >= 1
    rows = _rows(tmp_path / "run" / "metrics.csv")
    assert [r[0] for r in rows] == [str(result.final_step)]  # exactly one row: the final one
    assert float(rows[0][1]) == pytest.approx(float(np.mean(result.losses)), rel=1e-4)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == result.final_step
    assert (tmp_path / "run" / "best.pt").exists()


def test_ctrl_c_while_the_cli_is_imported_is_one_line_and_exit_130(monkeypatch, capsys):
    """The console script imports the command line inside its guard (emseg.cli.entry)."""
    import types

    from emseg.cli import entry

    class Interrupting(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "emseg.cli.main", Interrupting("emseg.cli.main"))
    monkeypatch.setattr(sys, "argv", ["emseg", "--json", "evaluate", "a.h5:x", "b.h5:y"])
    with pytest.raises(SystemExit) as exc:
        entry.main()
    captured = capsys.readouterr()
    assert exc.value.code == 130
    assert captured.err == "error: interrupted\n"
    assert captured.out.strip() == '{"error": "interrupted", "exit_code": 130}'


def test_ctrl_c_at_start_up_of_the_real_script(tmp_path):
    """A real SIGINT once the interpreter runs emseg's code (torch loading): one line, exit 130."""
    script = Path(sys.executable).with_name("emseg")
    if not script.exists():
        pytest.skip("the emseg console script is not installed beside this python")
    proc = subprocess.Popen([str(script), "evaluate", "a.h5:x", "b.h5:y"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def loading() -> bool:
        try:
            return "numpy" in Path(f"/proc/{proc.pid}/maps").read_text() or proc.poll() is not None
        except OSError:
            return True

    _wait_for(loading)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert err.decode().strip().splitlines() == ["error: interrupted"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rel", ["out.h5:b", "out.zarr/b"])
def test_ctrl_c_while_the_temporary_copy_is_made_leaves_no_temp(tmp_path, monkeypatch, rel):
    """An interrupt inside create_volume (copying an HDF5 file, creating a zarr array) removes the temp."""
    import shutil as shutil_module

    import emseg.io._output as output
    from emseg.io import create_volume

    spec = f"{tmp_path}/{rel}"
    with create_volume(spec.replace(":b", ":a").replace("/b", "/a"), (2, 4), "uint8") as out:
        out[...] = 5
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def interrupted(*args, **kwargs):
        if rel.startswith("out.h5"):
            Path(args[1]).write_bytes(b"half a copy")
        else:
            Path(kwargs["store"], kwargs["name"]).mkdir(parents=True)
        raise KeyboardInterrupt

    if rel.startswith("out.h5"):
        monkeypatch.setattr(shutil_module, "copyfile", interrupted)
    else:
        monkeypatch.setattr(output.zarr, "create_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        create_volume(spec, (2, 4), "uint8")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
