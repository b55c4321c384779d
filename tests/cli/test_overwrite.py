"""No output is replaced by surprise: existing outputs need --overwrite, and one writer at a time.

Every command that writes an output refuses one that exists (exit 2, one line naming it) and
leaves it byte for byte as it was; ``--overwrite`` replaces it. A writer holds the output's lock,
so a second concurrent writer is refused naming the first.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import synthetic, write_h5
from emseg.cli.main import cli
from emseg.errors import InputError
from emseg.io import check_overwrite, claim_output, create_volume
from emseg.models import build_model
from emseg.runtime.locks import lock_output

NET = dict(ndim=2, in_channels=1, out_channels=3, depth=1, base_width=2, norm="batch", dropout=0.2,
           anisotropic_levels=0, cond_channels=0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("overwrite")
    vol = synthetic((2, 32, 32), 0)
    write_h5(d / "data.h5", raw=vol.raw, label=vol.label)
    torch.manual_seed(0)
    torch.save({"model": build_model(NET).state_dict(), "model_config": dict(NET),
                "config": {"patch_shape": [1, 16, 16], "n_classes": 3}, "task": "segmentation", "step": 1},
               d / "m.pt")
    return d


def _run(args: list[str]):
    return CliRunner().invoke(cli, ["--device", "cpu", *args])


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_predict_into_an_existing_dataset_is_refused_and_keeps_it(inputs, tmp_path):
    keep = write_h5(tmp_path / "keep.h5", label=synthetic((2, 32, 32), 0).label)
    before = _snapshot(tmp_path)
    result = _run(["predict", f"{inputs}/m.pt", f"{inputs}/data.h5:raw", f"{keep}:label"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert str(keep) in lines[0] and "'label' already exists" in lines[0] and "--overwrite" in lines[0]
    assert _snapshot(tmp_path) == before
    # another dataset of the same file is a new output: allowed, and the ground truth stays
    assert _run(["predict", f"{inputs}/m.pt", f"{inputs}/data.h5:raw", f"{keep}:pred"]).exit_code == 0
    with h5py.File(keep, "r") as fh:
        assert fh["label"].dtype == np.uint8 and fh["pred"].dtype == np.float32
    ok = _run(["predict", f"{inputs}/m.pt", f"{inputs}/data.h5:raw", f"{keep}:label", "--overwrite"])
    assert ok.exit_code == 0, ok.stderr
    with h5py.File(keep, "r") as fh:
        assert fh["label"].dtype == np.float32


@pytest.mark.parametrize("rel", ["out.zarr", "out.zarr/probs", "out.ome.zarr"])
def test_predict_into_an_existing_zarr_is_refused(inputs, tmp_path, rel):
    target = f"{tmp_path}/{rel}"
    assert _run(["predict", f"{inputs}/m.pt", f"{inputs}/data.h5:raw", target]).exit_code == 0
    before = _snapshot(tmp_path)
    again = _run(["predict", f"{inputs}/m.pt", f"{inputs}/data.h5:raw", target, "--json"])
    assert again.exit_code == 2 and "already exists" in again.stderr and rel.split("/")[0] in again.stderr
    assert json.loads(again.stdout)["exit_code"] == 2
    assert _snapshot(tmp_path) == before
    assert _run(["predict", f"{inputs}/m.pt", f"{inputs}/data.h5:raw", target, "--overwrite"]).exit_code == 0


def test_resume_continues_but_a_finished_output_needs_overwrite(inputs, tmp_path):
    target = f"{tmp_path}/r.zarr/probs"
    assert _run(["predict", f"{inputs}/m.pt", f"{inputs}/data.h5:raw", target, "--resume"]).exit_code == 0
    again = _run(["predict", f"{inputs}/m.pt", f"{inputs}/data.h5:raw", target, "--resume"])
    assert again.exit_code == 2 and "already exists" in again.stderr
    forced = _run(["predict", f"{inputs}/m.pt", f"{inputs}/data.h5:raw", target, "--resume", "--overwrite"])
    assert forced.exit_code == 0, forced.stderr


def test_a_second_writer_is_refused_naming_the_first(inputs, tmp_path):
    holder = lock_output(tmp_path / "busy.h5")  # as a running writer of busy.h5 holds it
    try:
        result = _run(["predict", f"{inputs}/m.pt", f"{inputs}/data.h5:raw", f"{tmp_path}/busy.h5:p"])
    finally:
        holder.release()
    assert result.exit_code == 2 and "in use by process" in result.stderr and "busy.h5" in result.stderr
    assert not (tmp_path / "busy.h5").exists() and list(tmp_path.iterdir()) == []


def test_create_volume_holds_the_lock_until_commit(tmp_path):
    spec = f"{tmp_path}/a.zarr/x"
    with create_volume(spec, (2, 4), "uint8") as out:
        with pytest.raises(InputError, match="in use by process"):
            create_volume(f"{tmp_path}/a.zarr/y", (2, 4), "uint8")
        out[...] = 1
    with pytest.raises(InputError, match="already exists"):
        create_volume(spec, (2, 4), "uint8")
    with create_volume(spec, (2, 4), "uint8", overwrite=True) as out:
        out[...] = 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr"]  # lock files are gone


def test_check_overwrite_rules(tmp_path):
    write_h5(tmp_path / "f.h5", a=np.zeros((2, 2), np.uint8))
    check_overwrite(f"{tmp_path}/f.h5:b", overwrite=False)  # a new dataset in an existing file
    with pytest.raises(InputError, match="'a' already exists"):
        check_overwrite(f"{tmp_path}/f.h5:a", overwrite=False)
    check_overwrite(f"{tmp_path}/f.h5:a", overwrite=True)
    check_overwrite(f"{tmp_path}/f.h5:grp", overwrite=False, kind="group")  # a new group
    with pytest.raises(InputError, match="already exists"):  # no group: the whole file
        check_overwrite(f"{tmp_path}/f.h5", overwrite=False, kind="group")
    check_overwrite(f"{tmp_path}/new.zarr", overwrite=False, kind="group")
    (tmp_path / "q.json").write_text("{}")
    with pytest.raises(InputError, match="q.json"):
        claim_output(tmp_path / "q.json", overwrite=False, kind="file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5", "q.json"]


def test_noise_refuses_an_existing_output(inputs, tmp_path):
    out = write_h5(tmp_path / "n.h5", n=np.full((2, 32, 32), 7, np.uint8))
    before = _snapshot(tmp_path)
    result = _run(["noise", f"{inputs}/data.h5:label", f"{out}:n", "--flip", "0.1"])
    assert result.exit_code == 2 and "'n' already exists" in result.stderr and "--overwrite" in result.stderr
    assert _snapshot(tmp_path) == before
    ok = _run(["noise", f"{inputs}/data.h5:label", f"{out}:n", "--flip", "0.1", "--overwrite"])
    assert ok.exit_code == 0, ok.stderr


def test_query_refuses_existing_out_and_export(inputs, tmp_path):
    (tmp_path / "q.json").write_text("{\"mine\": 1}\n")
    base = ["query", f"{inputs}/m.pt", f"{inputs}/data.h5:raw", "--n", "1", "--patch", "1,16,16"]
    result = _run(base + ["--out", f"{tmp_path}/q.json"])
    assert result.exit_code == 2 and "q.json" in result.stderr and "--overwrite" in result.stderr
    assert (tmp_path / "q.json").read_text() == "{\"mine\": 1}\n"
    (tmp_path / "c.h5").write_bytes(b"x")
    result = _run(base + ["--out", f"{tmp_path}/new.json", "--export", f"{tmp_path}/c.h5"])
    assert result.exit_code == 2 and "c.h5" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "q.json"]
    ok = _run(base + ["--out", f"{tmp_path}/q.json", "--overwrite"])
    assert ok.exit_code == 0, ok.stderr
    assert json.loads((tmp_path / "q.json").read_text())["queries"]
