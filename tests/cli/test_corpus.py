"""A generated corpus of malformed files of every kind emseg reads, one field mutated at a time.

Configs, checkpoints, answers and query JSON, OME-Zarr metadata, volumes and integers of the
command line. Each case must hold the bad-input contract: exit 2, one stderr line ``error: ...``
naming the file, with ``--json`` exactly one JSON document, no new file anywhere, bounded time and
memory. Checkpoint fields are also mutated property-based (hypothesis).
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import synthetic, to_toml, write_h5
from emseg.cli.main import cli
from emseg.models import build_model

NET = dict(ndim=2, in_channels=1, out_channels=3, depth=1, base_width=2, norm="batch", dropout=0.2,
           anisotropic_levels=0, cond_channels=0)
_STATE = build_model(NET).state_dict()


def _ckpt(path: Path, **changes) -> None:
    payload = {"model": _STATE, "model_config": dict(NET),
               "config": {"patch_shape": [1, 16, 16], "n_classes": 3}, "task": "segmentation", "step": 1}
    payload.update(changes)
    torch.save(payload, path)


def _ome(path: Path, *, paths=("0",), axes=None, multiscales=None) -> None:
    group = zarr.open_group(store=str(path), mode="w", zarr_format=3)
    group.create_array("0", shape=(2, 32, 32), dtype="uint8", chunks=(1, 32, 32))
    axes = axes if axes is not None else [{"name": n, "type": "space"} for n in "zyx"]
    entry = {"axes": axes, "datasets": [{"path": p, "coordinateTransformations": [
        {"type": "scale", "scale": [1.0, 1.0, 1.0]}]} for p in paths]}
    group.attrs["ome"] = {"version": "0.5", "multiscales": multiscales if multiscales is not None else [entry]}


def _answers(data: Path, **changes) -> str:
    doc = {"format": "emseg-answers", "version": 1, "axes": "zyx", "n_classes": 3,
           "answers": [{"number": 1, "volume": f"{data}:raw", "offset": [0, 0, 0], "shape": [1, 16, 16],
                        "class": 1, "answer": False}]}
    for key, value in changes.items():
        if key.startswith("a."):
            doc["answers"][0][key[2:]] = value
        else:
            doc[key] = value
    return json.dumps(doc)


def _queries(**changes) -> str:
    q = {"rank": 1, "volume": "x.h5:raw", "volume_index": 0, "offset": [0, 0, 0], "shape": [1, 16, 16]}
    q.update(changes)
    return json.dumps({"queries": [q]})


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus2")
    vol = synthetic((2, 32, 32), 0)
    big = vol.label.astype(np.int64)
    big[0, 0, 0] = 1 << 40
    write_h5(d / "data.h5", raw=vol.raw, label=vol.label, big=big, strattr=vol.label)
    with h5py.File(d / "data.h5", "a") as fh:
        fh["strattr"].attrs["n_classes"] = "three"
    train = {"n_classes": 3, "patch_shape": [1, 16, 16], "batch_size": 1, "steps": 1,
             "model": {"depth": 1, "base_width": 2},
             "train": [{"raw": f"{d}/data.h5:raw", "label": f"{d}/data.h5:label"}]}
    good = to_toml(train)
    (d / "latin1.toml").write_bytes(good.encode() + b'# caf\xe9\n')
    (d / "bom16.toml").write_bytes(good.encode("utf-16"))
    (d / "deep.toml").write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    (d / "cfgdir.toml").mkdir()
    (d / "huge.toml").write_bytes(b"# " + b"x" * (2 << 20) + b"\n")
    _ckpt(d / "good.pt")
    for name, change in {
        "config_str": {"config": "not a table"}, "config_list": {"config": [1, 2]},
        "n_classes_huge": {"config": {"n_classes": 10 ** 12, "patch_shape": [1, 16, 16]}},
        "n_classes_str": {"config": {"n_classes": "3", "patch_shape": [1, 16, 16]}},
        "patch_str": {"config": {"n_classes": 3, "patch_shape": "1,16,16"}},
        "patch_huge": {"config": {"n_classes": 3, "patch_shape": [1, 1 << 40, 16]}},
        "patch_axes": {"config": {"n_classes": 3, "patch_shape": [1, 1, 16, 16]}},
        "step_neg": {"step": -1}, "step_str": {"step": "1"}, "task_int": {"task": 7},
        "model_str": {"model": "weights"}, "model_config_list": {"model_config": [1]},
        "lcs_str": {"lcs": "x"}, "best_str": {"best_metric": "good"}, "optimizer_list": {"optimizer": [1]},
    }.items():
        _ckpt(d / f"{name}.pt", **change)
    (d / "answers").mkdir()
    for name, change in {
        "n_huge": {"n_classes": 10 ** 12}, "n_str": {"n_classes": "3"}, "n_zero": {"n_classes": 0},
        "n_float": {"n_classes": 3.0}, "answers_dict": {"answers": {}}, "class_bool": {"a.class": True},
        "offset_huge": {"a.offset": [0, 0, 1 << 60]}, "shape_zero": {"a.shape": [1, 0, 16]},
        "shape_axes": {"a.shape": [1, 1, 1, 16], "a.offset": [0, 0, 0, 0]}, "volume_int": {"a.volume": 3},
        "answer_str": {"a.answer": "no"}, "format": {"format": "other"},
    }.items():
        (d / "answers" / f"{name}.json").write_text(_answers(d / "data.h5", **change))
    (d / "answers" / "latin1.json").write_bytes(_answers(d / "data.h5").encode() + b"\xff")
    (d / "answers" / "deep.json").write_text("[" * 100000 + "]" * 100000)
    (d / "answers" / "list.json").write_text("[]")
    (d / "queries").mkdir()
    for name, text in {
        "queries_dict": json.dumps({"queries": {"a": 1}}), "no_queries": json.dumps({"x": 1}),
        "offset_float": _queries(offset=[0, 0.5, 0]), "offset_str": _queries(offset="0,0,0"),
        "shape_zero": _queries(shape=[1, 0, 16]), "index_neg": _queries(volume_index=-1),
        "index_str": _queries(volume_index="0"), "query_str": json.dumps({"queries": ["x"]}),
        "offset_huge": _queries(offset=[0, 0, 10 ** 30]), "volume_list": _queries(volume=["x"]),
    }.items():
        (d / "queries" / f"{name}.json").write_text(text)
    (d / "queries" / "latin1.json").write_bytes(_queries().encode() + b"\xe9")
    _ome(d / "escape.ome.zarr", paths=("../other.ome.zarr/0",))
    _ome(d / "absolute.ome.zarr", paths=("/etc/0",))
    _ome(d / "dotpath.ome.zarr", paths=(".",))
    _ome(d / "pathint.ome.zarr", paths=(0,))
    _ome(d / "axes2.ome.zarr", axes=[{"name": "y"}, {"name": "x"}])
    _ome(d / "axesdup.ome.zarr", axes=[{"name": "x"}, {"name": "x"}, {"name": "x"}])
    _ome(d / "axesstr.ome.zarr", axes="zyx")
    _ome(d / "mstr.ome.zarr", multiscales=["x"])
    _ome(d / "levels.ome.zarr", paths=tuple(str(i) for i in range(100)))
    (d / "badmeta.zarr").mkdir()
    (d / "badmeta.zarr" / "zarr.json").write_text("{ not json")
    (d / "garbage.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    return d


P, E, Q, T = "predict", "evaluate", "query", "train"
CASES = [
    # configs: encoding, size, nesting, not a file
    ("config-latin1", [T, "{d}/latin1.toml", "--out", "r"], ["latin1.toml", "UTF-8", "line 13"]),
    ("config-utf16", [T, "{d}/bom16.toml", "--out", "r"], ["bom16.toml", "UTF-8", "line 1"]),
    ("config-deep", [T, "{d}/deep.toml", "--out", "r"], ["deep.toml"]),
    ("config-dir", [T, "{d}/cfgdir.toml", "--out", "r"], ["cfgdir.toml"]),
    ("config-huge", [T, "{d}/huge.toml", "--out", "r"], ["huge.toml", "too large"]),
    # checkpoints: every schema field, nested config included
    *[(f"ckpt-{n}", [P, f"{{d}}/{n}.pt", "{d}/data.h5:raw", "o.h5:p"], [f"{n}.pt", field]) for n, field in (
        ("config_str", "config"), ("config_list", "config"), ("n_classes_huge", "config.n_classes"),
        ("n_classes_str", "config.n_classes"), ("patch_str", "config.patch_shape"),
        ("patch_huge", "config.patch_shape"), ("patch_axes", "config.patch_shape"), ("step_neg", "step"),
        ("step_str", "step"), ("task_int", "task"), ("model_str", "model"), ("model_config_list", "model_config"),
        ("lcs_str", "lcs"), ("best_str", "best_metric"), ("optimizer_list", "optimizer"))],
    ("query-ckpt-config-str", [Q, "{d}/config_str.pt", "{d}/data.h5:raw", "--n", "1"], ["config_str.pt", "config"]),
    ("lcs-ckpt-config-str", ["lcs", "infer", "{d}/config_str.pt", "{d}/data.h5:raw", "l.zarr"], ["config_str.pt"]),
    ("export-ckpt-config-str", ["export", "{d}/config_str.pt", "m.zip"], ["config_str.pt", "config"]),
    # answers JSON
    *[(f"answers-{n}", [Q, "answers", f"{{d}}/answers/{n}.json", "--out", "c.h5"], [f"{n}.json", *w]) for n, w in (
        ("n_huge", ["n_classes"]), ("n_str", ["n_classes"]), ("n_zero", ["n_classes"]), ("n_float", ["n_classes"]),
        ("answers_dict", ["answers"]), ("class_bool", ["class"]), ("offset_huge", ["offset"]),
        ("shape_zero", ["shape"]), ("shape_axes", ["shape"]), ("volume_int", ["volume"]), ("answer_str", ["answer"]),
        ("format", ["format"]), ("latin1", ["JSON"]), ("deep", []), ("list", []))],
    # query JSON read back by --exclude-boxes
    *[(f"queries-{n}", [Q, "{d}/good.pt", "{d}/data.h5:raw", "--n", "1", "--exclude-boxes",
                        f"{{d}}/queries/{n}.json"], [f"{n}.json", *w]) for n, w in (
        ("queries_dict", ["queries"]), ("no_queries", ["queries"]), ("offset_float", ["offset"]),
        ("offset_str", ["offset"]), ("shape_zero", ["shape"]), ("index_neg", ["volume_index"]),
        ("index_str", ["volume_index"]), ("query_str", ["query 1"]), ("offset_huge", ["offset"]),
        ("volume_list", ["volume"]), ("latin1", ["UTF-8"]))],
    # OME-Zarr metadata
    *[(f"ome-{n}", [E, f"{{d}}/{n}.ome.zarr", "{d}/data.h5:label"], [f"{n}.ome.zarr", *w]) for n, w in (
        ("escape", ["inside the store"]), ("absolute", ["inside the store"]), ("dotpath", ["inside the store"]),
        ("pathint", ["inside the store"]), ("axes2", ["axes"]), ("axesdup", ["axes"]), ("axesstr", ["axes"]),
        ("mstr", ["multiscales"]), ("levels", ["levels"]))],
    ("ome-escape-predict", [P, "{d}/good.pt", "{d}/escape.ome.zarr", "o.h5:p"], ["escape.ome.zarr"]),
    # volumes
    ("zarr-bad-metadata", [E, "{d}/badmeta.zarr", "{d}/data.h5:label"], ["badmeta.zarr"]),
    ("h5-garbage", [E, "{d}/garbage.h5:x", "{d}/data.h5:label"], ["garbage.h5"]),
    # integers of the command line that reach numpy or torch
    ("seed-huge", ["--seed", str(2 ** 70), E, "{d}/data.h5:label", "{d}/data.h5:label"], ["--seed"]),
    ("seed-negative", [P, "{d}/good.pt", "{d}/data.h5:raw", "o.h5:p", "--seed", "-1"], ["--seed"]),
    ("n-classes-huge", [E, "{d}/data.h5:label", "{d}/data.h5:label", "--n-classes", str(10 ** 30)], ["--n-classes"]),
    ("n-classes-int64", [E, "{d}/data.h5:label", "{d}/data.h5:label", "--n-classes", str(2 ** 40)], ["4096"]),
    ("labels-huge", [E, "{d}/data.h5:big", "{d}/data.h5:big"], ["data.h5:big", "classes"]),
    ("attr-n-classes-str", [E, "{d}/data.h5:strattr", "{d}/data.h5:label"], ["data.h5:strattr", "n_classes"]),
    ("noise-n-classes-int64", ["noise", "{d}/data.h5:label", "n.h5:n", "--flip", "0.1", "--n-classes",
                               str(2 ** 40)], ["n_classes"]),
    ("noise-random-n-classes", ["noise", "{d}/data.h5:label", "n.h5:n", "--random", "0.1", "--n-classes",
                                str(2 ** 40)], ["n_classes"]),
    ("query-n-huge", [Q, "{d}/good.pt", "{d}/data.h5:raw", "--n", str(10 ** 30)], ["--n"]),
    ("noise-seed-huge", ["noise", "{d}/data.h5:label", "n.h5:n", "--flip", "0.1", "--seed", str(2 ** 64)],
     ["--seed"]),
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _check_contract(result, words: list[str], seconds: float) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert json.loads(result.stdout) == {"error": lines[0][len("error: "):], "exit_code": 2}
    assert seconds < 30
    return lines[0]


@pytest.mark.parametrize("case, argv, words", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_holds_the_contract(work, tmp_path, monkeypatch, case, argv, words):
    monkeypatch.chdir(tmp_path)
    before_work = _tree(work)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    result = CliRunner().invoke(cli, ["--device", "cpu"] + [a.format(d=work) for a in argv] + ["--json"])
    _check_contract(result, words, time.monotonic() - start)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert grown_mib < 512, f"peak memory grew by {grown_mib:.0f} MiB"
    assert _tree(work) == before_work and _tree(tmp_path) == set()


def test_corpus_size():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


#: Values of the wrong type or range for each checkpoint field (``None`` means: delete the key).
_BAD = {
    "config": ["x", 3, [1], {"n_classes": -1}, {"n_classes": 2 ** 70}, {"patch_shape": [0, 16, 16]},
               {"patch_shape": [True, 16, 16]}, {"patch_shape": []}],
    "model_config": ["x", None, [1], {"depth": "2"}, {"ndim": 7}],
    "model": ["x", None, {"head.weight": "x"}, {1: torch.zeros(1)}],
    "step": [-5, "1", 1.5, [1]],
    "task": [1, ["segmentation"]],
    "best_metric": ["x", [0.5]],
    "log_window": ["x"], "rng": [1], "init": ["path"], "igtt": [[]], "pretext": [3],
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(_BAD)), pick=st.integers(0, 7))
def test_any_bad_checkpoint_field_is_refused_naming_the_file(work, tmp_path, field, pick):
    value = _BAD[field][pick % len(_BAD[field])]
    path = work / f"mutant_{field}.pt"
    payload = {"model": _STATE, "model_config": dict(NET), "config": {"patch_shape": [1, 16, 16], "n_classes": 3},
               "task": "segmentation", "step": 1}
    if value is None:
        payload.pop(field)
    else:
        payload[field] = value
    torch.save(payload, path)
    try:
        start = time.monotonic()
        result = CliRunner().invoke(cli, ["--device", "cpu", "predict", str(path), f"{work}/data.h5:raw",
                                          f"{tmp_path}/o.h5:p", "--json"])
        line = _check_contract(result, [path.name], time.monotonic() - start)
        assert field in line or "model" in line or "checkpoint" in line, line
        assert not (tmp_path / "o.h5").exists()
    finally:
        path.unlink()
