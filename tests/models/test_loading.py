"""A checkpoint opened for a volume (emseg.models.loading)."""
from __future__ import annotations

import os

import pytest
import torch

from emseg.errors import InputError
from emseg.models import build_model
from emseg.models.checkpoint import save_checkpoint
from emseg.models.loading import (
    cached_open,
    forget_opened,
    open_for_volume,
    read_for_volume,
    window_shape,
)

TINY = {"ndim": 2, "in_channels": 1, "out_channels": 3, "depth": 2, "base_width": 4, "norm": "batch"}


def _state(config=TINY, seed: int = 0, patch=(1, 32, 32)) -> dict:
    torch.manual_seed(seed)
    model = build_model(config)
    for module in model.modules():  # running statistics far from the defaults, so that folding them shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return {"model": model.state_dict(), "model_config": dict(config), "step": 7,
            "config": {"patch_shape": list(patch)}}


@pytest.mark.parametrize("patch, trained, shape, ndim, expected", [
    (None, (1, 32, 32), (40, 40), 2, (32, 32)),
    (None, (32, 32), (5, 40, 40), 2, (1, 32, 32)),
    ((1, 16, 16), (32, 32), (5, 40, 40), 2, (1, 16, 16)),
    (None, (4, 32, 32), (5, 40, 40), 3, (4, 32, 32)),
])
def test_window_shape(patch, trained, shape, ndim, expected):
    assert window_shape(patch, trained, shape, ndim) == expected


def test_window_shape_3d_net_on_2d_volume():
    with pytest.raises(InputError):
        window_shape(None, (4, 32, 32), (40, 40), 3)


def test_read_for_volume_fits_the_training_patch_and_clips_the_window(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, _state(patch=(1, 32, 32)))
    checkpoint = read_for_volume(path, (5, 20, 48))
    assert checkpoint.patch == (1, 32, 32) and checkpoint.window == (1, 20, 32)
    assert checkpoint.n_classes == 3 and checkpoint.ndim == 2
    assert read_for_volume(path, (5, 20, 48), patch_shape=(1, 16, 16)).patch == (1, 16, 16)


def test_read_for_volume_refuses_a_label_conditioned_checkpoint(tmp_path):
    path = tmp_path / "lcs.pt"
    save_checkpoint(path, _state(dict(TINY, out_channels=1, cond_channels=2)))
    with pytest.raises(InputError, match="label-conditioned"):
        read_for_volume(path, (5, 40, 40))


def test_opened_network_computes_what_the_stored_network_computes(tmp_path):
    """Batch norm folded and the memory format changed: the logits of the rebuilt eval network."""
    path = tmp_path / "m.pt"
    state = _state(seed=5)
    save_checkpoint(path, state)
    opened = open_for_volume(read_for_volume(path, (3, 64, 64)), device="cpu", precision="fp32")
    reference = build_model(TINY)
    reference.load_state_dict(state["model"])
    reference.eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(opened.net(x), reference(x), rtol=1e-4, atol=1e-5)
    assert opened.precision.name == "fp32" and opened.device == torch.device("cpu")
    assert opened.divisor == tuple(reference.divisor)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in opened.net.modules())


def test_cached_open_opens_once_per_run_and_notices_a_replaced_file(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, _state(seed=3))
    forget_opened()
    try:
        first = cached_open(str(path), (3, 64, 64), patch_shape=(1, 32, 32), device="cpu", precision="fp32")
        assert cached_open(str(path), (3, 64, 64), patch_shape=(1, 32, 32), device="cpu",
                           precision="fp32") is first
        st_ = os.stat(path)
        save_checkpoint(path, _state(seed=4))
        os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
        with pytest.raises(InputError, match="checkpoint changed"):
            cached_open(str(path), (3, 64, 64), patch_shape=(1, 32, 32), device="cpu", precision="fp32",
                        mtime_ns=st_.st_mtime_ns, size=st_.st_size)
        reloaded = cached_open(str(path), (3, 64, 64), patch_shape=(1, 32, 32), device="cpu", precision="fp32")
        assert reloaded is not first
        x = torch.rand(1, 1, 32, 32)
        with torch.no_grad():
            assert not torch.allclose(reloaded.net(x), first.net(x))
    finally:
        forget_opened()
