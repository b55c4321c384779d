"""``emseg.engine.config``: the training TOML mapped onto frozen dataclasses, checked key by key."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_train_config, to_toml
from emseg.models import build_model
from emseg.engine.config import (
    OptimConfig,
    TrainConfig,
    config_from_dict,
    learning_rate,
    load_config,
    model_divisor,
    read_toml,
)
from emseg.errors import InputError


def write_config(tmp_path: Path, config: dict, name: str = "train.toml") -> Path:
    path = tmp_path / name
    path.write_text(to_toml(config))
    return path


def test_relative_volume_paths_resolve_against_the_config_folder(tmp_path):
    sub = tmp_path / "cfg"
    sub.mkdir()
    absolute = tmp_path / "abs.zarr"
    config = tiny_train_config(Path("data/a.h5"))
    config["valid"] = [{"raw": f"{absolute}/raw", "label": f"{absolute}/label"}]
    loaded = load_config(write_config(sub, config))
    assert loaded.train[0].raw == f"{sub / 'data/a.h5'}:raw"
    assert loaded.train[0].label == f"{sub / 'data/a.h5'}:label"
    assert loaded.valid[0].raw == f"{absolute}/raw"  # absolute paths are kept as given


def test_defaults_come_from_the_dataclasses(tmp_path):
    loaded = load_config(write_config(tmp_path, tiny_train_config(tmp_path / "a.h5")))
    assert isinstance(loaded, TrainConfig)
    assert loaded.valid == ()
    assert loaded.optim.schedule == "constant" and OptimConfig.schedule == "cosine"  # given / default
    assert loaded.optim.min_lr_ratio == OptimConfig.min_lr_ratio and loaded.batch_size == 2
    assert loaded.optim.lr == 1e-2  # given
    assert loaded.model.dropout == 0.0 and loaded.augment.flip is True
    assert loaded.effective_precision == "fp32"  # amp = false is the older spelling of fp32
    assert loaded.model_ndim == 2  # patch [1, 32, 32]


@pytest.mark.parametrize("change, message", [
    ({"optim": {"lrr": 0.1}}, r"unknown key\(s\) lrr in \[optim\]"),
    ({"stepz": 3}, r"unknown key\(s\) stepz in \[top level\]"),
    ({"steps": "2"}, r"steps must be an integer, got '2'"),
    ({"steps": True}, r"steps must be an integer, got True"),
    ({"optim": {"lr": True}}, r"optim.lr must be a number, got True"),
    ({"augment": {"flip": 1}}, r"augment.flip must be true or false, got 1"),
    ({"batch_size": 0}, r"batch_size must be in \[1, inf\), got 0"),
    ({"model": {"dropout": 1.0}}, r"model.dropout must be in \[0, 1\), got 1.0"),
    ({"optim": {"gamma": 0.0}}, r"optim.gamma must be in \(0, inf\), got 0.0"),
    ({"patch_shape": [1, 30, 32]}, r"patch_shape \[1, 30, 32\] must be a multiple of \[4, 4\] for model.depth 2"),
    ({"patch_shape": [1, "a", 32]}, r"patch_shape must be a list of integers"),
    ({"class_weights": [1.0, 2.0]}, r"class_weights has 2 entries, n_classes is 3"),
    ({"precision": "fp16"}, r"precision must be auto, fp32 or bf16, got 'fp16'"),
    ({"amp": False, "precision": "bf16"}, r"amp = false contradicts precision"),
    ({"model": {"anisotropic_levels": 1}}, r"anisotropic_levels applies to 3D models only"),
    ({"train": []}, r"no \[\[train\]\] cubes"),
])
def test_bad_keys_name_the_key_and_the_file(tmp_path, change, message):
    path = write_config(tmp_path, tiny_train_config(tmp_path / "a.h5", **change))
    with pytest.raises(InputError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_required_keys_and_bad_files(tmp_path):
    config = tiny_train_config(tmp_path / "a.h5")
    del config["n_classes"]
    with pytest.raises(InputError, match="missing required key 'n_classes'"):
        load_config(write_config(tmp_path, config))
    with pytest.raises(InputError, match="no such config file"):
        read_toml(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("steps = = 3\n")
    with pytest.raises(InputError, match="invalid TOML") as info:
        load_config(broken)
    assert str(broken) in str(info.value)


def test_overrides_reach_into_tables_and_none_is_ignored(tmp_path):
    path = write_config(tmp_path, tiny_train_config(tmp_path / "a.h5"))
    loaded = load_config(path, overrides={"steps": 11, "optim.lr": 0.5, "model.depth": None, "batch_size": None})
    assert loaded.steps == 11 and loaded.optim.lr == 0.5
    assert loaded.model.depth == 2 and loaded.batch_size == 2  # None overrides leave the file's value
    with pytest.raises(InputError, match=r"unknown key\(s\) nope in \[optim\]"):
        load_config(path, overrides={"optim.nope": 1})


def test_extra_sections_are_kept_only_when_asked_for(tmp_path):
    config = tiny_train_config(tmp_path / "a.h5", lcs={"labels": [1, 2]})
    path = write_config(tmp_path, config)
    assert load_config(path, sections=("lcs",)).sections == {"lcs": {"labels": [1, 2]}}
    with pytest.raises(InputError, match=r"unknown key\(s\) lcs"):
        load_config(path)


@settings(max_examples=25, deadline=None)
@given(
    depth=st.integers(1, 4),
    flat=st.integers(0, 5),
    ndim=st.sampled_from([2, 3]),
)
def test_model_divisor_matches_the_networks_pooling(depth, flat, ndim):
    """The patch divisor of the config equals the product of the U-Net's pooling factors."""
    flat = flat if ndim == 3 else 0
    patch = [1, 8, 8] if ndim == 2 else [8, 8, 8]
    config = TrainConfig(train=(), n_classes=2, patch_shape=tuple(patch))
    config = config.replace(model=type(config.model)(ndim=ndim, depth=depth, anisotropic_levels=flat))
    net = build_model({"ndim": ndim, "depth": depth, "anisotropic_levels": flat, "base_width": 1})
    assert model_divisor(config) == tuple(net.divisor)  # what the network built from it needs


@settings(max_examples=25, deadline=None)
@given(
    steps=st.integers(1, 60),
    batch_size=st.integers(1, 9),
    lr=st.floats(1e-6, 1.0),
    schedule=st.sampled_from(["constant", "cosine", "step"]),
    region=st.one_of(st.none(), st.tuples(st.integers(0, 5), st.integers(6, 9)).map(lambda r: (r,))),
    prio=st.one_of(st.none(), st.floats(0.1, 10.0)),
    weights=st.booleans(),
)
def test_to_dict_round_trips(tmp_path_factory, steps, batch_size, lr, schedule, region, prio, weights):
    """A config written out with ``to_dict`` and read back is the same config."""
    base = tmp_path_factory.getbasetemp()
    data = tiny_train_config(base / "a.h5", steps=steps, batch_size=batch_size,
                             optim={"lr": lr, "schedule": schedule},
                             class_weights=[1.0, 0.5, 2.0] if weights else None)
    data["train"][0].update(region=[list(r) for r in region] if region else None, prio=prio)
    config = config_from_dict(data, base_dir=base)
    again = config_from_dict(config.to_dict(), base_dir="/elsewhere")  # paths are absolute by now
    assert again == config


@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
def test_learning_rate_schedules(schedule):
    optim = OptimConfig(lr=0.1, schedule=schedule, warmup_steps=4, step_size=3, gamma=0.5, min_lr_ratio=0.1)
    total = 20
    rates = [learning_rate(optim, s, total) for s in range(total + 1)]
    assert rates[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # linear warm-up to lr
    after = rates[4:]
    assert all(a >= b - 1e-15 for a, b in zip(after, after[1:]))  # never increases after warm-up
    if schedule == "constant":
        assert after == pytest.approx([0.1] * len(after))
    elif schedule == "cosine":
        assert after[0] == pytest.approx(0.1) and rates[total] == pytest.approx(0.01)
        mid = 4 + (total - 4) // 2
        assert rates[mid] == pytest.approx(0.01 + 0.5 * 0.09 * (1 + math.cos(math.pi * 0.5)))
    else:
        assert [learning_rate(optim, s, total) for s in (4, 5, 6, 9)] == pytest.approx(
            [0.1 * 0.5 ** (s // 3) for s in (4, 5, 6, 9)])
