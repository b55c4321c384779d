"""``emseg query simulate --init / --finetune``: where the initial network and each round start."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import synthetic, tiny_train_config, to_toml, write_h5
from emseg.active.simulation.loop import load_simulate_config, run_simulation
from emseg.cli.main import cli
from emseg.engine.config import config_from_dict
from emseg.errors import InputError
from emseg.models.checkpoint import load_checkpoint
from emseg.runtime import Runtime
from emseg.semantic.train import train

TINY_LR = 1e-12  # Adam moves each weight by about the learning rate: the start stays visible


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim_init")
    vol = synthetic((4, 64, 64), 0)
    data = write_h5(root / "data.h5", raw=vol.raw, label=vol.label)
    source = tiny_train_config(data, steps=2)  # a 4-class network of the same shape: its head is replaced
    source.update(n_classes=4, patch_shape=[1, 16, 16], model={"depth": 2, "base_width": 4, "norm": "batch"})
    train(config_from_dict(source), root / "source", runtime=Runtime(device="cpu", seed=5))
    return root, data, root / "source" / "last.pt"


def _config(root: Path, data: Path, name: str, **extra):
    cfg = {
        "n_classes": 3, "patch": [1, 16, 16], "initial": 2, "per_iteration": 2, "iterations": 1, "seeds": [0],
        "strategies": ["random"], "steps_initial": 1, "steps_finetune": 1, "batch_size": 2,
        "pool": {"raw": f"{data}:raw", "label": f"{data}:label", "region": [[0, 3]]},
        "test": {"raw": f"{data}:raw", "label": f"{data}:label", "region": [[3, 4]]},
        "model": {"depth": 2, "base_width": 4, "norm": "batch"}, "optim": {"lr": TINY_LR},
        **extra,
    }
    path = root / f"{name}.toml"
    path.write_text(to_toml(cfg))
    return path


def _encoder_matches(weights: Path, source: Path) -> bool:
    got, want = load_checkpoint(weights)["model"], load_checkpoint(source)["model"]
    shared = [k for k in want if not k.startswith("head.") and want[k].is_floating_point() and "running" not in k]
    assert shared
    return all(torch.allclose(got[k], want[k], atol=1e-6) for k in shared)


@pytest.mark.parametrize("finetune, round_from_init", [("previous", True), ("init", True), ("scratch", False)])
def test_rounds_start_where_finetune_says(setup, finetune, round_from_init):
    root, data, source = setup
    config = load_simulate_config(_config(root, data, finetune, finetune=finetune),
                                  overrides={"init": str(source)})
    out = root / f"run_{finetune}"
    run_simulation(config, out, runtime=Runtime(device="cpu"), plot=False)
    weights = sorted(out.rglob("last.pt"))
    initial = [w for w in weights if "iter_" not in str(w)]
    rounds = [w for w in weights if "iter_001" in str(w)]
    assert len(initial) == 1 and len(rounds) == 1
    assert _encoder_matches(initial[0], source)  # the initial network starts from --init
    assert _encoder_matches(rounds[0], source) is round_from_init


def test_finetune_init_without_a_checkpoint_and_a_missing_checkpoint_are_refused(setup):
    root, data, _ = setup
    with pytest.raises(InputError, match="needs an 'init'"):
        load_simulate_config(_config(root, data, "no_init", finetune="init"))
    res = CliRunner().invoke(cli, ["query", "simulate", str(_config(root, data, "cli")), "--out", str(root / "x"),
                                   "--init", str(root / "absent.pt")])
    assert res.exit_code == 2 and "absent.pt" in res.stderr and not (root / "x").exists()


def test_a_frozen_encoder_stays_the_pretrained_one_through_every_round(setup):
    # encoder_lr_scale = 0 at a rate that moves every other weight: each round's seeded checkpoint
    # must carry the optimiser groups that run_training resumes, and the encoder never moves
    root, data, source = setup
    path = _config(root, data, "frozen", finetune="previous")
    path.write_text(path.read_text().replace(f"lr = {TINY_LR}", "lr = 0.01\nencoder_lr_scale = 0.0"))
    config = load_simulate_config(path, overrides={"init": str(source)})
    assert config.train.optim.encoder_lr_scale == 0.0
    out = root / "run_frozen"
    run_simulation(config, out, runtime=Runtime(device="cpu"), plot=False)
    rounds = [w for w in sorted(out.rglob("last.pt")) if "iter_001" in str(w)]
    assert len(rounds) == 1
    got, want = load_checkpoint(rounds[0])["model"], load_checkpoint(source)["model"]
    encoder = [k for k in want if k.split(".")[0] in ("encoders", "bottleneck") and "running" not in k
               and want[k].is_floating_point()]
    decoder = [k for k in want if k.split(".")[0] == "decoders" and "running" not in k and want[k].is_floating_point()]
    assert encoder and decoder
    assert all(torch.equal(got[k], want[k]) for k in encoder)
    assert not all(torch.allclose(got[k], want[k], atol=1e-4) for k in decoder)


@pytest.mark.parametrize("init, finetune", [(False, "previous"), (True, "scratch")])
def test_an_encoder_scale_without_a_pretrained_start_is_refused(setup, init, finetune):
    root, data, source = setup
    path = _config(root, data, f"scale_{init}_{finetune}", finetune=finetune)
    path.write_text(path.read_text().replace(f"lr = {TINY_LR}", f"lr = {TINY_LR}\nencoder_lr_scale = 0.5"))
    with pytest.raises(InputError, match="encoder_lr_scale"):
        load_simulate_config(path, overrides={"init": str(source)} if init else None)


def test_a_folder_written_before_the_encoder_scale_existed_continues(setup):
    import json

    root, data, source = setup
    config = load_simulate_config(_config(root, data, "older", finetune="previous"), overrides={"init": str(source)})
    out = root / "run_older"
    run_simulation(config, out, runtime=Runtime(device="cpu"), plot=False)
    stored = json.loads((out / "config.json").read_text())
    del stored["train"]["optim"]["encoder_lr_scale"]  # as an older emseg wrote it
    (out / "config.json").write_text(json.dumps(stored))
    again = run_simulation(config, out, runtime=Runtime(device="cpu"), plot=False)
    assert again.computed == 0
