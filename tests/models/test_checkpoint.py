"""``emseg.models.checkpoint``: atomic writes, safe loading, and a model config checked before anything is built."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from click.testing import CliRunner
from hypothesis import strategies as st

from emseg import __version__
from emseg.models.checkpoint import (
    MAX_PARAMETERS,
    activation_elements,
    cached_model,
    check_model_config,
    count_parameters,
    divisor_of,
    forget_cached_models,
    load_checkpoint,
    load_model,
    network_patch,
    save_checkpoint,
)
from emseg.cli.main import cli
from emseg.errors import InputError
from emseg.models import build_model
from conftest import write_h5

TINY = {"ndim": 2, "in_channels": 1, "out_channels": 3, "depth": 2, "base_width": 4, "norm": "batch"}


def tiny_state(config=TINY, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = build_model(config)
    return {"model": model.state_dict(), "model_config": dict(config), "step": 7}


@settings(max_examples=25, deadline=None)
@given(
    ndim=st.sampled_from([2, 3]),
    depth=st.integers(0, 3),
    base_width=st.integers(1, 6),
    norm=st.sampled_from(["batch", "group", "instance", "none"]),
    flat=st.integers(0, 4),
    cond=st.sampled_from([(0, "maxpool"), (2, "maxpool"), (3, "atlas"), (2, "prototype")]),
    channels=st.tuples(st.integers(1, 3), st.integers(1, 4)),
)
def test_count_parameters_equals_the_built_network(ndim, depth, base_width, norm, flat, cond, channels):
    """The count made without building the network equals the parameters of the built one."""
    flat = min(flat, depth + 1) if ndim == 3 else 0
    config = {"ndim": ndim, "depth": depth, "base_width": base_width, "norm": norm, "anisotropic_levels": flat,
              "cond_channels": cond[0], "conditioning": cond[1], "in_channels": channels[0],
              "out_channels": channels[1]}
    model = build_model(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("config, expected", [
    ({"ndim": 2, "depth": 3}, (8, 8)),
    ({"ndim": 3, "depth": 2, "anisotropic_levels": 1}, (2, 4, 4)),  # one level pools in-plane only
])
def test_divisor_is_the_product_of_the_pooling_and_the_network_keeps_such_sides(config, expected):
    config = dict(config, base_width=2, out_channels=2)
    assert divisor_of(config) == expected
    model = build_model(config).eval()
    x = torch.zeros((1, 1) + tuple(2 * d for d in expected))
    assert model(x).shape[2:] == x.shape[2:]


def test_activation_bound_grows_with_the_window():
    small, big = activation_elements(TINY, (16, 16)), activation_elements(TINY, (32, 32))
    assert big == 4 * small  # every level scales with the window's area
    # the first level alone: six maps of base_width channels over the window
    assert small >= 6 * 4 * 16 * 16


@pytest.mark.parametrize("config, message", [
    ([1, 2], "model_config must be a table"),
    ({"depht": 2}, r"unknown key\(s\) depht"),
    ({"depth": 2.0}, "model_config.depth must be an integer, got 2.0"),
    ({"ndim": True}, "model_config.ndim must be an integer, got True"),
    ({"ndim": 4}, r"model_config.ndim must be in \[2, 3\], got 4"),
    ({"dropout": float("nan")}, "model_config.dropout must be finite"),
    ({"dropout": 1}, r"model_config.dropout must be in \[0, 1\)"),
    ({"norm": "layer"}, "model_config.norm must be one of batch, group, instance, none"),
    ({"conditioning": "film"}, "model_config.conditioning must be one of"),
    ({"ndim": 2, "anisotropic_levels": 1}, "applies to 3D networks only"),
    ({"ndim": 3, "depth": 1, "anisotropic_levels": 3}, r"must be <= depth \+ 1 = 2"),
    ({"depth": 16, "base_width": 65536}, "parameters"),
])
def test_bad_model_configs_are_refused_naming_the_file(config, message):
    with pytest.raises(InputError, match=message) as info:
        check_model_config(config, source="run/best.pt")
    assert "run/best.pt" in str(info.value)


def test_parameter_and_activation_limits():
    # base_width 2**12 at depth 4: widths up to 65536, far beyond the parameter budget
    assert count_parameters({"depth": 4, "base_width": 4096}) > MAX_PARAMETERS
    check_model_config(TINY, source="m.pt", patch=(64, 64))
    with pytest.raises(InputError, match="choose a smaller `patch_shape`"):
        check_model_config(TINY, source="m.pt", patch=(1 << 17, 1 << 17))
    assert network_patch((1, 32, 32), TINY) == (32, 32)  # a 3D window to a 2D network
    assert network_patch((8, 32, 32), {"ndim": 3}) == (8, 32, 32)


def test_save_then_load_round_trips_and_rebuilds_the_same_network(tmp_path):
    state = tiny_state()
    path = tmp_path / "m.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded["emseg_version"] == __version__ and loaded["step"] == 7
    assert set(loaded["model"]) == set(state["model"])
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
    model, _ = load_model(path)
    reference = build_model(TINY)
    reference.load_state_dict(state["model"])
    reference.eval()
    x = torch.randn(2, 1, 16, 16)
    assert not model.training
    assert torch.equal(model(x), reference(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary left behind


def test_non_finite_weights_are_never_written_and_the_old_file_stays(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, tiny_state(seed=1))
    before = path.read_bytes()
    bad = tiny_state(seed=2)
    key = next(k for k, v in bad["model"].items() if v.is_floating_point())
    bad["model"][key] = bad["model"][key].clone().fill_(float("nan"))
    with pytest.raises(ValueError, match=f"non-finite values in {key}"):
        save_checkpoint(path, bad)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    # written another way (plain torch.save), it is refused on load, naming the tensor
    torch.save(bad, tmp_path / "nan.pt")
    with pytest.raises(InputError, match=f"NaN or infinite values in {key}"):
        load_model(tmp_path / "nan.pt")


def test_unreadable_or_foreign_files(tmp_path):
    with pytest.raises(InputError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(InputError, match="is a folder"):
        load_checkpoint(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(InputError, match="not a readable emseg checkpoint") as info:
        load_checkpoint(tmp_path / "junk.pt")
    assert "junk.pt" in str(info.value)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="no model / model_config"):
        load_checkpoint(tmp_path / "other.pt")


def test_state_that_does_not_fit_its_config(tmp_path):
    state = tiny_state()
    state["model_config"] = dict(TINY, out_channels=5)  # the head's shape differs
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(InputError, match="wrong shape"):
        load_model(tmp_path / "m.pt")
    state = tiny_state()
    state["model"]["extra.weight"] = torch.zeros(1)
    del state["model"][next(iter(state["model"]))]
    torch.save(state, tmp_path / "m2.pt")
    with pytest.raises(InputError, match=r"missing: .*; unexpected: extra.weight"):
        load_model(tmp_path / "m2.pt")


def test_cached_model_loads_once_and_notices_a_replaced_file(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, tiny_state(seed=3))
    forget_cached_models()
    try:
        first, _ = cached_model(str(path), "cpu")
        again, _ = cached_model(str(path), "cpu")
        assert again is first
        st_ = os.stat(path)
        save_checkpoint(path, tiny_state(seed=4))
        os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
        with pytest.raises(InputError, match="checkpoint changed"):
            cached_model(str(path), "cpu", mtime_ns=st_.st_mtime_ns, size=st_.st_size)
        reloaded, _ = cached_model(str(path), "cpu")
        assert reloaded is not first
        key = next(k for k, v in reloaded.state_dict().items() if v.is_floating_point())
        assert not torch.equal(reloaded.state_dict()[key], first.state_dict()[key])
    finally:
        forget_cached_models()


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_a_checkpoint_written_by_emseg_0_1_0_still_loads_and_predicts_the_same(tmp_path):
    """``checkpoint_v0.1.0.pt`` was trained and predicted (fp32, ``emseg predict``) by emseg 0.1.0
    before its modules moved; the file must load and give the same probabilities today."""
    from emseg.synthetic import make_volume

    raw = make_volume((2, 64, 64), rng=0).raw
    write_h5(tmp_path / "in.h5", raw=raw)
    res = CliRunner().invoke(cli, ["--quiet", "--precision", "fp32", "predict", str(FIXTURES / "checkpoint_v0.1.0.pt"),
                                   f"{tmp_path / 'in.h5'}:raw", f"{tmp_path / 'out.h5'}:probs"])
    assert res.exit_code == 0, res.output
    with h5py.File(tmp_path / "out.h5", "r") as fh:
        probs = fh["probs"][:]
    expected = np.load(FIXTURES / "checkpoint_v0.1.0_probs.npz")["probs"]
    assert probs.shape == expected.shape == (3, 2, 64, 64)
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5)
    state = load_checkpoint(FIXTURES / "checkpoint_v0.1.0.pt")
    assert state["emseg_version"] == "0.1.0" and state["task"] == "segmentation"
