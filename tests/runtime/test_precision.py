"""Precision (auto | fp32 | bf16): resolution under mocked hardware, parity with fp32, fp32 checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import synthetic, tiny_train_config, to_toml, write_h5
from emseg.runtime import precision as precision_mod
from emseg.models.checkpoint import load_checkpoint
from emseg.cli.main import cli
from emseg.engine.config import config_from_dict
from emseg.errors import InputError
from emseg.engine.inference import SlidingWindow, softmax_forward
from emseg.models import UNet
from emseg.runtime.precision import Precision, resolve_precision
from emseg.engine.training import run_training
from emseg.semantic.train import SegmentationTask
from emseg.runtime import Runtime


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) native bf16."""

    def set_(flag: bool):
        monkeypatch.setattr(precision_mod, "cpu_bf16_support",
                            lambda: (flag, "AVX512-BF16" if flag else "a CPU without AVX512-BF16 or AMX"))

    return set_


# --------------------------------------------------------------------------- resolution
def test_auto_is_bf16_only_on_native_bf16_cpus(cpu_bf16):
    cpu_bf16(True)
    assert resolve_precision("auto", "cpu").name == "bf16"
    cpu_bf16(False)
    assert resolve_precision("auto", "cpu").name == "fp32"
    assert resolve_precision("fp32", "cpu").name == "fp32"


def test_bf16_without_hardware_is_an_input_error_naming_it(cpu_bf16):
    cpu_bf16(False)
    with pytest.raises(InputError, match="without AVX512-BF16"):
        resolve_precision("bf16", "cpu")
    with pytest.raises(InputError, match="precision must be auto, fp32 or bf16"):
        resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("capability, expected", [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "fp32")])
def test_auto_on_cuda_follows_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Mock GPU")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    p = resolve_precision("auto", torch.device("cuda", 0))
    assert p.name == expected and p.device_type == "cuda"
    if expected == "fp32":
        with pytest.raises(InputError, match=r"Mock GPU \(compute capability 7.5\)"):
            resolve_precision("bf16", torch.device("cuda", 0))


def test_cpu_probe_agrees_with_proc_cpuinfo():
    """torch's probe and the kernel's CPU flags tell the same story about bf16."""
    flags = precision_mod._cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    probe = getattr(torch, "cpu", None)
    if not hasattr(probe, "_is_avx512_bf16_supported"):
        pytest.skip("this torch has no CPU feature probe: cpu_bf16_support reads /proc/cpuinfo itself")
    ok, name = precision_mod.cpu_bf16_support()
    assert ok == bool({"avx512_bf16", "amx_bf16"} & flags), (name, sorted(f for f in flags if "bf16" in f))


def test_channels_last_layout_and_autocast_context():
    p = Precision("bf16", "cpu", True)
    x = torch.zeros(2, 1, 8, 8)
    assert p.prepare_input(x).is_contiguous(memory_format=torch.channels_last)
    x3 = torch.zeros(2, 1, 4, 8, 8)
    assert p.prepare_input(x3).is_contiguous(memory_format=torch.channels_last_3d)
    with p.autocast():
        assert torch.is_autocast_enabled("cpu")
        y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert y.dtype == torch.bfloat16
    with Precision("fp32", "cpu", False).autocast():
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.float32


def test_wrapped_network_returns_float32_outputs_with_gradients():
    net = UNet(ndim=2, out_channels=3, depth=1, base_width=4)
    fwd = Precision("bf16", "cpu", True).wrap(net)
    out = fwd(torch.rand(2, 1, 8, 8))
    assert out.dtype == torch.float32 and out.requires_grad and fwd.divisor == net.divisor
    out.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())


# --------------------------------------------------------------------------- parity
def _trained_net(steps: int = 60) -> tuple[UNet, np.ndarray]:
    """A small U-Net fitted briefly (fp32) to a synthetic EM-like volume, so argmax is meaningful."""
    vol = synthetic((4, 64, 64), 0)
    torch.manual_seed(0)
    net = UNet(ndim=2, out_channels=3, depth=2, base_width=8)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.from_numpy(vol.raw[:3].astype(np.float32) / 255)[:, None]
    y = torch.from_numpy(vol.label[:3].astype(np.int64))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval(), vol.raw[3].astype(np.float32) / 255


def test_bf16_forward_agrees_with_fp32():
    """Same weights: argmax agreement >= 99%; probabilities within 0.1 on 99% of voxels and 0.01 on
    average (bf16 keeps 8 mantissa bits, so activations carry ~0.4% relative error per layer; the
    largest deviations sit where two classes' logits are close)."""
    net, image = _trained_net()
    x = torch.from_numpy(image)[None, None]
    with torch.no_grad():
        p32 = torch.softmax(net(x), 1)
        bf = Precision("bf16", "cpu", True)
        bf.prepare_model(net)
        with bf.autocast():
            p16 = torch.softmax(net(bf.prepare_input(x)).float(), 1)
    agree = (p32.argmax(1) == p16.argmax(1)).float().mean().item()
    assert agree >= 0.99
    diff = (p32 - p16).abs().flatten()
    assert torch.quantile(diff, 0.99).item() < 0.1
    assert diff.mean().item() < 0.01


def test_sliding_window_in_bf16_agrees_with_fp32():
    net, image = _trained_net()
    region = np.stack([image, image[::-1]])
    kw = dict(divisor=net.divisor, overlap=0.25, batch_size=2)
    p32 = SlidingWindow(softmax_forward(net), (1, 32, 32), **kw)(region)
    p16 = SlidingWindow(softmax_forward(net), (1, 32, 32), precision=Precision("bf16", "cpu", True), **kw)(region)
    assert p16.dtype == np.float32 and p16.shape == p32.shape
    np.testing.assert_allclose(p16.sum(0), 1, atol=1e-5)  # blended in float32
    assert (p32.argmax(0) == p16.argmax(0)).mean() >= 0.99


# --------------------------------------------------------------------------- training
def test_checkpoints_stay_fp32_and_record_the_precision(tmp_path, synthetic_h5, cpu_bf16):
    cpu_bf16(True)  # torch computes bf16 on any CPU; only the speed needs native support
    cfg = config_from_dict(tiny_train_config(synthetic_h5, steps=3, amp=True, precision="bf16"))
    task = SegmentationTask(cfg)
    try:
        result = run_training(task, cfg, tmp_path / "run", runtime=Runtime(device="cpu", seed=0))
    finally:
        task.close()
    assert result.precision == "bf16" and result.to_dict()["precision"] == "bf16"
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["precision"] == "bf16"
    tensors = list(state["model"].values())
    tensors += [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    floats = [t for t in tensors if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)
    assert all(torch.isfinite(t).all() for t in floats)


def test_amp_false_still_means_fp32_and_contradiction_is_refused(synthetic_h5):
    assert config_from_dict(tiny_train_config(synthetic_h5, amp=False)).effective_precision == "fp32"
    assert config_from_dict(tiny_train_config(synthetic_h5, amp=True)).effective_precision == "auto"
    with pytest.raises(InputError, match="contradicts"):
        config_from_dict(tiny_train_config(synthetic_h5, amp=False, precision="bf16"))
    with pytest.raises(InputError, match="precision must be"):
        config_from_dict(tiny_train_config(synthetic_h5, amp=True, precision="half"))


def test_cli_bf16_on_hardware_without_it_is_one_line_exit_2(tmp_path, synthetic_h5, cpu_bf16):
    cpu_bf16(False)
    cfg = tmp_path / "train.toml"
    cfg.write_text(to_toml(tiny_train_config(synthetic_h5, steps=1)))
    res = CliRunner().invoke(cli, ["train", str(cfg), "--out", str(tmp_path / "run"), "--precision", "bf16"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bf16" in lines[0] and "without AVX512-BF16" in lines[0]
    assert not (tmp_path / "run" / "last.pt").exists()


def test_cli_fp32_overrides_the_config_and_is_reported(tmp_path, synthetic_h5):
    cfg = tmp_path / "train.toml"
    cfg.write_text(to_toml(tiny_train_config(synthetic_h5, steps=2, amp=True, precision="auto")))
    res = CliRunner().invoke(cli, ["--json", "train", str(cfg), "--out", str(tmp_path / "run"), "--precision", "fp32"])
    assert res.exit_code == 0, res.output
    import json

    assert json.loads(res.stdout)["precision"] == "fp32"
    assert load_checkpoint(tmp_path / "run" / "last.pt")["precision"] == "fp32"


def test_predict_bf16_agrees_with_fp32_on_disk(tmp_path):
    from emseg.models.checkpoint import save_checkpoint
    from emseg.io import open_volume
    from emseg.semantic.predict import PredictConfig, predict_file

    net, _ = _trained_net()
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, {"model": net.state_dict(), "model_config": net.config,
                           "config": {"patch_shape": [1, 32, 32]}, "step": 0})
    write_h5(tmp_path / "in.h5", raw=synthetic((4, 64, 64), 0).raw)
    outs = {}
    for name in ("fp32", "bf16"):
        prec = name if name == "fp32" else Precision("bf16", "cpu", True)
        cfg = PredictConfig(model=str(ckpt), input=f"{tmp_path}/in.h5:raw", output=f"{tmp_path}/{name}.zarr",
                            device="cpu", precision=prec, output_type="labels")
        assert predict_file(cfg).precision == name
        with open_volume(f"{tmp_path}/{name}.zarr") as vol:
            outs[name] = vol[...]
    assert (outs["fp32"] == outs["bf16"]).mean() >= 0.99


# --------------------------------------------------------------------------- Apple MPS
@pytest.fixture
def mps_bf16(monkeypatch):
    """Pretend torch does (True) or does not (False) run bf16 autocast on MPS here."""

    def set_(flag: bool):
        monkeypatch.setattr(precision_mod, "mps_bf16_support",
                            lambda: (flag, "Apple MPS (Mock GPU)" if flag else "Apple MPS before macOS 14"))

    return set_


@pytest.mark.parametrize("supported", [True, False])
def test_auto_on_mps_is_fp32_and_contiguous(mps_bf16, supported):
    mps_bf16(supported)
    for ndim in (2, 3):
        p = resolve_precision("auto", torch.device("mps"), ndim=ndim)
        assert (p.name, p.device_type, p.channels_last) == ("fp32", "mps", False)
        assert isinstance(p.autocast(), type(Precision("fp32", "cpu", False).autocast()))


def test_explicit_bf16_on_mps_follows_torch_support(mps_bf16):
    mps_bf16(True)
    p = resolve_precision("bf16", "mps")
    assert p.name == "bf16" and p.device_type == "mps" and not p.channels_last
    mps_bf16(False)
    with pytest.raises(InputError, match="Apple MPS before macOS 14"):
        resolve_precision("bf16", "mps")


def test_mps_probe_answers_without_a_mac():
    ok, hardware = precision_mod.mps_bf16_support()
    assert isinstance(ok, bool) and hardware.startswith("Apple MPS")
    if not torch.backends.mps.is_available():
        assert not ok
