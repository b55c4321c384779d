"""Device resolution (auto picks CUDA, then Apple's MPS, then the CPU) under mocked availability,
the one-line error for a device that is not there, and the device-generic random state."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_train_config, to_toml
from emseg.cli.main import cli
from emseg.errors import InputError
from emseg.losses import dmi_loss
from emseg.losses._checks import as_float64
from emseg.runtime import Runtime
from emseg.runtime.choices import DEVICES
from emseg.runtime.ddp import ProcessGroup
from emseg.runtime.device import fork_rng, mps_available, resolve_device


@pytest.fixture
def available(monkeypatch):
    """Pretend CUDA and MPS are (True) or are not (False) offered by torch."""

    def set_(cuda: bool, mps: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return set_


@pytest.mark.parametrize("cuda, mps, expected", [
    (True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu"),
])
def test_auto_picks_cuda_then_mps_then_cpu(available, cuda, mps, expected):
    available(cuda, mps)
    assert resolve_device("auto").type == expected


def test_mps_is_a_device_choice(available):
    assert "mps" in DEVICES
    assert Runtime(device="mps").device == "mps"
    available(False, True)
    assert resolve_device("mps") == torch.device("mps")
    assert mps_available()


def test_a_missing_device_is_an_input_error_naming_it(available):
    available(False, False)
    assert not mps_available()
    with pytest.raises(InputError, match="MPS is not available"):
        resolve_device("mps")
    with pytest.raises(InputError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cli_mps_without_it_is_one_line_exit_2(tmp_path, synthetic_h5, available):
    available(False, False)
    (tmp_path / "train.toml").write_text(to_toml(tiny_train_config(synthetic_h5, steps=1)))
    for args in (["train", str(tmp_path / "train.toml"), "--out", str(tmp_path / "run"), "--device", "mps"],
                 ["--device", "mps", "train", str(tmp_path / "train.toml"), "--out", str(tmp_path / "run")]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "MPS" in lines[0], result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "run" / "last.pt").exists()


def test_help_offers_mps():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0 and "mps" in result.output


def test_data_parallel_training_refuses_mps():
    group = ProcessGroup(world_size=2, rank=0, local_rank=0)
    with pytest.raises(InputError, match="MPS"):
        group.place(torch.device("mps"))


def test_fork_rng_leaves_the_random_state_as_it_was():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with fork_rng("cpu"):
        torch.manual_seed(11)
        torch.rand(100)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_float64_sums_of_the_dmi_loss_keep_gradients_and_device():
    p = torch.rand(2, 1, 4, 4, requires_grad=True)
    t = (torch.rand(2, 4, 4) > 0.5).long()
    wide = as_float64(p)
    assert wide.dtype == torch.float64 and wide.device == p.device
    loss = dmi_loss(p, t)
    assert loss.dtype == torch.float32 and loss.device == p.device
    loss.backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()
