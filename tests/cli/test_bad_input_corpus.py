"""A corpus of bad inputs, run through every command with click's CliRunner.

Each case must exit with code 2, print exactly one stderr line ``error: ...`` naming the bad
input (file, dataset, key or option), and leave the working folder as it was: no output, no
temp file, no empty run folder. With ``--json`` the failure is also one JSON document on stdout.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import synthetic, to_toml, write_h5
from emseg.models.checkpoint import save_checkpoint
from emseg.cli.main import cli
from emseg.runtime.locks import lock_folder, lock_output
from emseg.models import build_model

NET = dict(ndim=2, in_channels=1, out_channels=3, depth=1, base_width=2, norm="batch", dropout=0.2,
           anisotropic_levels=0, cond_channels=0)


def _checkpoint(path: Path, *, config=None, state=None, **extra) -> None:
    torch.manual_seed(0)
    model = build_model(NET)
    payload = {"model": state if state is not None else model.state_dict(),
               "model_config": config if config is not None else dict(NET),
               "config": {"patch_shape": [1, 16, 16], "n_classes": 3}, "task": "segmentation", "step": 1}
    payload.update(extra)
    torch.save(payload, path)  # written directly: save_checkpoint refuses non-finite weights


def _toml(path: Path, data_h5: Path, **changes) -> None:
    config = {"n_classes": 3, "patch_shape": [1, 16, 16], "batch_size": 1, "steps": 1, "amp": False,
              "model": {"depth": 1, "base_width": 2},
              "train": [{"raw": f"{data_h5}:raw", "label": f"{data_h5}:label"}]}
    for key, value in changes.items():
        table, _, name = key.rpartition(".")
        (config.setdefault(table, {}) if table else config)[name] = value
    path.write_text(to_toml(config))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder of inputs, good and bad, shared by all cases (which must not change it)."""
    d = tmp_path_factory.mktemp("corpus")
    vol = synthetic((2, 32, 32), 0)
    nan_raw = vol.raw.astype(np.float32)
    nan_raw[1, 3, 3] = np.nan
    write_h5(d / "data.h5", raw=vol.raw, label=vol.label, empty=np.zeros((0, 32, 32), np.uint8),
             nanraw=nan_raw, flabel=vol.label.astype(np.float32), small=vol.raw[:, :16, :16])
    with h5py.File(d / "data.h5", "a") as fh:  # a huge plane that is never written: a few KB on disk
        fh.create_dataset("huge", shape=(1, 1 << 17, 1 << 17), dtype=np.uint8, chunks=(1, 256, 256))
    (d / "trunc.h5").write_bytes((d / "data.h5").read_bytes()[:2000])
    (d / "notes.txt").write_text("a file, not a folder\n")
    _toml(d / "good.toml", d / "data.h5")
    bad_configs = {
        "steps_str": {"steps": "2"}, "steps0": {"steps": 0}, "depth0": {"model.depth": 0},
        "depth1000": {"model.depth": 1000}, "norm": {"model.norm": "bad"}, "dropout": {"model.dropout": 1.5},
        "patchdiv": {"patch_shape": [1, 15, 16]}, "unknown": {"model.depht": 2}, "lr": {"optim.lr": -1.0},
        "batch0": {"batch_size": 0}, "weights": {"class_weights": [1.0, 2.0]}, "patchstr": {"patch_shape": "abc"},
        "amp_str": {"amp": "yes"}, "gamma": {"optim.gamma": 0.0}, "missing_ds": {"train": [
            {"raw": f"{d / 'data.h5'}:nothing", "label": f"{d / 'data.h5'}:label"}]},
        "empty_raw": {"train": [{"raw": f"{d / 'data.h5'}:empty", "label": f"{d / 'data.h5'}:empty"}]},
    }
    for name, changes in bad_configs.items():
        _toml(d / f"{name}.toml", d / "data.h5", **changes)
    (d / "syntax.toml").write_text("steps = = 2\n")
    (d / "no_classes.toml").write_text(f'patch_shape = [1, 16, 16]\n[[train]]\nraw = "{d}/data.h5:raw"\n')
    _checkpoint(d / "good.pt")
    _checkpoint(d / "depth1000.pt", config=dict(NET, depth=1000))
    _checkpoint(d / "depth_str.pt", config=dict(NET, depth="two"))
    _checkpoint(d / "wide.pt", config=dict(NET, base_width=4096, depth=6))
    other = build_model(dict(NET, depth=2)).state_dict()
    _checkpoint(d / "other_arch.pt", state=other)
    broken = build_model(NET).state_dict()
    broken["head.weight"][0] = float("nan")
    _checkpoint(d / "nan_weight.pt", state=broken)
    stats = build_model(NET).state_dict()
    stats["encoders.0.body.1.running_var"][:] = float("inf")
    _checkpoint(d / "nan_buffer.pt", state=stats)
    (d / "garbage.pt").write_bytes(b"not a checkpoint")
    lcs_meta = {"lcs": {"classes": [1], "baseline": True, "patch_shape": [1, 16, 16]}}
    _checkpoint(d / "lcs_depth.pt", config=dict(NET, depth=1000, out_channels=2), **lcs_meta)
    nan_lcs = build_model(dict(NET, out_channels=2)).state_dict()
    nan_lcs["head.bias"][:] = float("nan")
    _checkpoint(d / "lcs_nan.pt", config=dict(NET, out_channels=2), state=nan_lcs, **lcs_meta)
    (d / "locked").mkdir()
    import tifffile

    tifffile.imwrite(d / "stack.tif", vol.raw, compression="zlib")
    (d / "trunc.tif").write_bytes((d / "stack.tif").read_bytes()[:600])
    (d / "mixed").mkdir()
    tifffile.imwrite(d / "mixed" / "s1.tif", vol.raw[0])
    tifffile.imwrite(d / "mixed" / "s2.tif", vol.raw[1, :16])
    (d / "cut.mrc").write_bytes(b"\0" * 1200)
    (d / "vol.n5" / "raw").mkdir(parents=True)
    return d


T, P, E, Q, N, L = "train", "predict", "evaluate", "query", "noise", "lcs"
#: (id, argv, words the error line must contain); {d} is the corpus folder.
CASES = [
    # training configs: types, ranges, consistency, files
    ("train-steps-str", [T, "{d}/steps_str.toml", "--out", "run"], ["steps_str.toml", "steps", "integer"]),
    ("train-steps-0", [T, "{d}/steps0.toml", "--out", "run"], ["steps0.toml", "steps"]),
    ("train-depth-0", [T, "{d}/depth0.toml", "--out", "run"], ["depth0.toml", "model.depth"]),
    ("train-depth-1000", [T, "{d}/depth1000.toml", "--out", "run"], ["depth1000.toml", "model.depth"]),
    ("train-norm", [T, "{d}/norm.toml", "--out", "run"], ["norm.toml", "model.norm"]),
    ("train-dropout", [T, "{d}/dropout.toml", "--out", "run"], ["dropout.toml", "model.dropout"]),
    ("train-patch-div", [T, "{d}/patchdiv.toml", "--out", "run"], ["patchdiv.toml", "patch_shape", "multiple"]),
    ("train-unknown-key", [T, "{d}/unknown.toml", "--out", "run"], ["unknown.toml", "depht"]),
    ("train-lr", [T, "{d}/lr.toml", "--out", "run"], ["lr.toml", "optim.lr"]),
    ("train-batch-0", [T, "{d}/batch0.toml", "--out", "run"], ["batch0.toml", "batch_size"]),
    ("train-class-weights", [T, "{d}/weights.toml", "--out", "run"], ["weights.toml", "class_weights"]),
    ("train-patch-str", [T, "{d}/patchstr.toml", "--out", "run"], ["patchstr.toml", "patch_shape"]),
    ("train-amp-str", [T, "{d}/amp_str.toml", "--out", "run"], ["amp_str.toml", "amp"]),
    ("train-gamma", [T, "{d}/gamma.toml", "--out", "run"], ["gamma.toml", "optim.gamma"]),
    ("train-syntax", [T, "{d}/syntax.toml", "--out", "run"], ["syntax.toml", "TOML"]),
    ("train-no-classes", [T, "{d}/no_classes.toml", "--out", "run"], ["no_classes.toml", "n_classes"]),
    ("train-missing-config", [T, "{d}/absent.toml", "--out", "run"], ["absent.toml"]),
    ("train-missing-dataset", [T, "{d}/missing_ds.toml", "--out", "run"], ["data.h5", "nothing"]),
    ("train-empty-raw", [T, "{d}/empty_raw.toml", "--out", "run"], ["data.h5", "empty"]),
    ("train-out-under-file", [T, "{d}/good.toml", "--out", "{d}/notes.txt/run"], ["notes.txt"]),
    ("train-out-is-file", [T, "{d}/good.toml", "--out", "{d}/notes.txt"], ["notes.txt"]),
    ("train-out-dev-null", [T, "{d}/good.toml", "--out", "/dev/null/x"], ["/dev/null"]),
    ("train-resume-nothing", [T, "{d}/good.toml", "--out", "run", "--resume"], ["run", "nothing to resume"]),
    ("train-patch-option", [T, "{d}/good.toml", "--out", "run", "--patch", "0,16,16"], ["--patch"]),
    ("train-patch-option-div", [T, "{d}/good.toml", "--out", "run", "--patch", "1,15,15"], ["good.toml", "patch"]),
    ("train-steps-option", [T, "{d}/good.toml", "--out", "run", "--steps", "0"], ["good.toml", "steps"]),
    ("train-locked", [T, "{d}/good.toml", "--out", "{d}/locked"], ["locked", "in use by process {pid}"]),
    # checkpoints: schema, size bounds, architecture, finiteness
    ("predict-depth-1000", [P, "{d}/depth1000.pt", "{d}/data.h5:raw", "o.h5:p"], ["depth1000.pt", "depth"]),
    ("predict-depth-str", [P, "{d}/depth_str.pt", "{d}/data.h5:raw", "o.h5:p"], ["depth_str.pt", "depth", "two"]),
    ("predict-too-many-params", [P, "{d}/wide.pt", "{d}/data.h5:raw", "o.h5:p"], ["wide.pt", "parameters"]),
    ("predict-other-arch", [P, "{d}/other_arch.pt", "{d}/data.h5:raw", "o.h5:p"], ["other_arch.pt", "match"]),
    ("predict-nan-weight", [P, "{d}/nan_weight.pt", "{d}/data.h5:raw", "o.h5:p"], ["nan_weight.pt", "head.weight"]),
    ("predict-nan-buffer", [P, "{d}/nan_buffer.pt", "{d}/data.h5:raw", "o.h5:p"], ["nan_buffer.pt", "running_var"]),
    ("predict-garbage", [P, "{d}/garbage.pt", "{d}/data.h5:raw", "o.h5:p"], ["garbage.pt"]),
    ("predict-model-is-dir", [P, "{d}/locked", "{d}/data.h5:raw", "o.h5:p"], ["locked"]),
    ("predict-missing-model", [P, "{d}/absent.pt", "{d}/data.h5:raw", "o.h5:p"], ["absent.pt"]),
    # predict: volumes, options, outputs
    ("predict-empty-volume", [P, "{d}/good.pt", "{d}/data.h5:empty", "o.h5:p"], ["data.h5:empty", "empty"]),
    ("predict-nan-raw", [P, "{d}/good.pt", "{d}/data.h5:nanraw", "o.h5:p"], ["data.h5:nanraw", "NaN"]),
    ("predict-missing-dataset", [P, "{d}/good.pt", "{d}/data.h5:nothing", "o.h5:p"], ["data.h5", "nothing"]),
    ("predict-patch-z", [P, "{d}/good.pt", "{d}/data.h5:raw", "o.h5:p", "--patch", "2,16,16"], ["--patch"]),
    ("predict-patch-axes", [P, "{d}/good.pt", "{d}/data.h5:raw", "o.h5:p", "--patch", "16"], ["--patch"]),
    ("predict-patch-huge", [P, "{d}/good.pt", "{d}/data.h5:huge", "o.zarr", "--patch", "1,131072,131072"],
     ["good.pt", "--patch", "activation"]),
    ("predict-resume-patch-huge", [P, "{d}/good.pt", "{d}/data.h5:huge", "o.zarr", "--patch", "1,131072,131072",
                                   "--resume"], ["good.pt", "--patch", "activation"]),
    ("predict-overlap", [P, "{d}/good.pt", "{d}/data.h5:raw", "o.h5:p", "--overlap", "1.5"], ["--overlap"]),
    ("predict-batch-size", [P, "{d}/good.pt", "{d}/data.h5:raw", "o.h5:p", "--batch-size", "0"], ["--batch-size"]),
    ("predict-block-axes", [P, "{d}/good.pt", "{d}/data.h5:raw", "o.h5:p", "--block", "2,16"], ["--block"]),
    ("predict-out-dev-null", [P, "{d}/good.pt", "{d}/data.h5:raw", "/dev/null/o.h5:p"], ["/dev/null"]),
    ("predict-out-under-file", [P, "{d}/good.pt", "{d}/data.h5:raw", "{d}/notes.txt/o.zarr"], ["notes.txt"]),
    ("predict-out-truncated", [P, "{d}/good.pt", "{d}/data.h5:raw", "{d}/trunc.h5:p"], ["trunc.h5", "HDF5"]),
    ("predict-out-is-input", [P, "{d}/good.pt", "{d}/data.h5:raw", "{d}/data.h5:raw"], ["data.h5"]),
    ("predict-resume-h5", [P, "{d}/good.pt", "{d}/data.h5:raw", "o.h5:p", "--resume"], ["o.h5", "zarr"]),
    ("predict-resume-dev-null", [P, "{d}/good.pt", "{d}/data.h5:raw", "/dev/null/o.zarr", "--resume"],
     ["/dev/null"]),
    ("predict-resume-locked", [P, "{d}/good.pt", "{d}/data.h5:raw", "{d}/locked/o.zarr", "--resume"],
     ["o.zarr", "in use by process {pid}"]),
    ("predict-format", [P, "{d}/good.pt", "{d}/data.h5:raw", "o.mrc"], ["o.mrc", "writes HDF5"]),
    ("predict-truncated-tif", [P, "{d}/good.pt", "{d}/trunc.tif", "o.zarr"], ["trunc.tif", "TIFF"]),
    ("predict-mixed-slices", [P, "{d}/good.pt", "{d}/mixed/", "o.zarr"], ["s2.tif", "differs"]),
    ("predict-glob-nothing", [P, "{d}/good.pt", "{d}/mixed/*.png", "o.zarr"], ["*.png", "matches no file"]),
    ("predict-truncated-mrc", [P, "{d}/good.pt", "{d}/cut.mrc", "o.zarr"], ["cut.mrc", "MRC"]),
    ("predict-n5-no-attributes", [P, "{d}/good.pt", "{d}/vol.n5/raw", "o.zarr"], ["vol.n5/raw", "attributes.json"]),
    # noise
    ("noise-empty", [N, "{d}/data.h5:empty", "n.h5:n", "--flip", "0.1"], ["data.h5:empty", "empty"]),
    ("noise-float-labels", [N, "{d}/data.h5:flabel", "n.h5:n", "--flip", "0.1"], ["data.h5:flabel", "integers"]),
    ("noise-flip-range", [N, "{d}/data.h5:label", "n.h5:n", "--flip", "1.5"], ["flip"]),
    ("noise-out-dev-null", [N, "{d}/data.h5:label", "/dev/null/n.h5:n", "--flip", "0.1"], ["/dev/null"]),
    ("noise-out-truncated", [N, "{d}/data.h5:label", "{d}/trunc.h5:n", "--flip", "0.1"], ["trunc.h5", "HDF5"]),
    ("noise-missing-dataset", [N, "{d}/data.h5:nothing", "n.h5:n", "--flip", "0.1"], ["data.h5", "nothing"]),
    ("noise-same-as-input", [N, "{d}/data.h5:label", "{d}/data.h5:label", "--flip", "0.1"], ["data.h5"]),
    # evaluate
    ("evaluate-empty", [E, "{d}/data.h5:empty", "{d}/data.h5:empty"], ["data.h5:empty", "empty"]),
    ("evaluate-shape", [E, "{d}/data.h5:small", "{d}/data.h5:label"], ["data.h5:small", "shape"]),
    ("evaluate-missing", [E, "{d}/absent.h5:p", "{d}/data.h5:label"], ["absent.h5"]),
    ("evaluate-float-gt", [E, "{d}/data.h5:label", "{d}/data.h5:flabel"], ["data.h5:flabel"]),
    ("evaluate-instances-shape", [E, "--instances", "{d}/data.h5:small", "{d}/data.h5:label"],
     ["data.h5:small", "shape"]),
    ("evaluate-instances-float", [E, "--instances", "{d}/data.h5:flabel", "{d}/data.h5:label"],
     ["data.h5:flabel", "float32"]),
    ("evaluate-instances-empty", [E, "--instances", "{d}/data.h5:empty", "{d}/data.h5:empty"],
     ["data.h5:empty", "empty"]),
    # query
    ("query-nan-model", [Q, "{d}/nan_weight.pt", "{d}/data.h5:raw", "--n", "1"], ["nan_weight.pt"]),
    ("query-depth-str", [Q, "{d}/depth_str.pt", "{d}/data.h5:raw", "--n", "1"], ["depth_str.pt", "depth"]),
    ("query-empty-pool", [Q, "{d}/good.pt", "{d}/data.h5:empty", "--n", "1", "--patch", "1,16,16"],
     ["data.h5:empty"]),
    ("query-n-0", [Q, "{d}/good.pt", "{d}/data.h5:raw", "--n", "0"], ["--n"]),
    ("query-out-dev-null", [Q, "{d}/good.pt", "{d}/data.h5:raw", "--n", "1", "--out", "/dev/null/q.json"],
     ["/dev/null"]),
    # label-conditioned inference
    ("lcs-depth-1000", [L, "infer", "{d}/lcs_depth.pt", "{d}/data.h5:raw", "l.zarr"], ["lcs_depth.pt", "depth"]),
    ("lcs-nan", [L, "infer", "{d}/lcs_nan.pt", "{d}/data.h5:raw", "l.zarr"], ["lcs_nan.pt", "head.bias"]),
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_no_leftovers(work, tmp_path, monkeypatch, case, argv, words):
    monkeypatch.chdir(tmp_path)
    holder = None
    if case == "train-locked":
        holder = lock_folder(work / "locked")
    elif case == "predict-resume-locked":
        holder = lock_output(work / "locked" / "o.zarr.partial")
    before_work, before_cwd = _tree(work), _tree(tmp_path)
    try:
        args = [a.format(d=work) for a in argv]
        result = CliRunner().invoke(cli, ["--device", "cpu"] + args + ["--json"])
    finally:
        if holder is not None:
            holder.release()
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word.format(d=work, pid=os.getpid()) in lines[0], lines[0]
    doc = json.loads(result.stdout)
    assert doc == {"error": lines[0][len("error: "):], "exit_code": 2}
    after_work = _tree(work) - ({".lock", "locked/.emseg.lock", "locked/.o.zarr.partial.lock"})
    assert after_work - before_work == set() and _tree(tmp_path) == before_cwd


def test_corpus_names_are_unique():
    """Each case is reported by its name: two cases of one name would hide one of them."""
    names = [c[0] for c in CASES]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


def test_an_internal_value_error_is_an_unexpected_error_exit_1(tmp_path, monkeypatch):
    """A ValueError from inside a core is a bug, not bad input: exit 1, one line, 'unexpected error'."""
    import emseg.cli.evaluate

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant failed")

    monkeypatch.setattr(emseg.cli.evaluate, "evaluate_volumes", broken)
    write_h5(tmp_path / "a.h5", label=np.zeros((2, 8, 8), np.uint8))
    result = CliRunner().invoke(cli, ["evaluate", f"{tmp_path}/a.h5:label", f"{tmp_path}/a.h5:label"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1
    assert lines[0] == "error: unexpected error: ValueError: an internal invariant failed"


def test_a_warning_does_not_break_the_one_line_error(tmp_path, monkeypatch):
    import warnings

    import emseg.cli.evaluate
    from emseg.errors import InputError

    def noisy(*args, **kwargs):
        warnings.warn("something torch would say", UserWarning)
        raise InputError("bad labels", source="x.h5:label")

    monkeypatch.setattr(emseg.cli.evaluate, "evaluate_volumes", noisy)
    write_h5(tmp_path / "a.h5", label=np.zeros((2, 8, 8), np.uint8))
    result = CliRunner().invoke(cli, ["evaluate", f"{tmp_path}/a.h5:label", f"{tmp_path}/a.h5:label"])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == ["error: x.h5:label: bad labels"]


def test_a_usage_error_of_noise_points_at_the_visible_command(tmp_path):
    result = CliRunner().invoke(cli, ["noise", "a.h5:label", "b.h5:n", "--flip", "x"], prog_name="emseg")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1
    assert "'emseg noise --help'" in lines[0] and "synth" not in lines[0]


def test_truncated_h5_output_is_left_alone(work):
    """The truncated file is refused before anything is copied: it keeps its bytes and no temp appears."""
    data = (work / "trunc.h5").read_bytes()
    with pytest.raises(OSError):
        h5py.File(work / "trunc.h5", "r")
    assert (work / "trunc.h5").read_bytes() == data
    assert not [p for p in work.iterdir() if p.name.startswith(".trunc.h5.tmp")]


def test_save_checkpoint_refuses_non_finite_weights(tmp_path):
    model = build_model(NET)
    save_checkpoint(tmp_path / "last.pt", {"model": model.state_dict(), "model_config": NET})
    good = (tmp_path / "last.pt").read_bytes()
    broken = model.state_dict()
    broken["head.bias"][:] = float("nan")
    with pytest.raises(ValueError, match="head.bias"):
        save_checkpoint(tmp_path / "last.pt", {"model": broken, "model_config": NET})
    assert (tmp_path / "last.pt").read_bytes() == good and os.listdir(tmp_path) == ["last.pt"]
