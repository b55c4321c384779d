"""``train --init``: weights matched by name and shape, the head re-initialised, bad sources refused."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_train_config, to_toml
from emseg.cli.main import cli
from emseg.engine.config import config_from_dict, load_config
from emseg.semantic.train import train
from emseg.errors import InputError
from emseg.models import build_model
from emseg.models.checkpoint import save_checkpoint
from emseg.models.transfer import init_from_checkpoint
from emseg.runtime import Runtime

ARCH = dict(ndim=2, in_channels=1, depth=2, base_width=4, norm="batch", dropout=0.0, anisotropic_levels=0)


def _source(path, out_channels=1, seed=7, **changes):
    """A checkpoint of a randomly initialised network, with non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    config = dict(ARCH, out_channels=out_channels, **changes)
    model = build_model(config)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
    save_checkpoint(path, {"model": model.state_dict(), "model_config": config, "task": "pretrain", "step": 9})
    return model


def test_init_copies_every_tensor_but_a_head_of_another_shape(tmp_path):
    source = _source(tmp_path / "pre.pt", out_channels=1)
    torch.manual_seed(0)
    config = dict(ARCH, out_channels=3)
    model = build_model(config)
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    report = init_from_checkpoint(model, config, tmp_path / "pre.pt")
    ours, theirs = model.state_dict(), source.state_dict()
    assert report["reinitialised"] == ["head.weight", "head.bias"]
    assert report["loaded"] == len(ours) - 2
    assert report["loaded_values"] == sum(v.numel() for k, v in ours.items() if not k.startswith("head."))
    for name, value in ours.items():
        if name.startswith("head."):
            assert torch.equal(value, fresh_head[name]) and value.shape != theirs[name].shape
        else:
            assert torch.equal(value, theirs[name]), name
    assert report["sha256"] == hashlib.sha256((tmp_path / "pre.pt").read_bytes()).hexdigest()
    assert report["task"] == "pretrain" and report["step"] == 9


def test_init_with_the_same_class_count_copies_the_head_too(tmp_path):
    source = _source(tmp_path / "seg.pt", out_channels=3)
    model = build_model(dict(ARCH, out_channels=3))
    report = init_from_checkpoint(model, dict(ARCH, out_channels=3), tmp_path / "seg.pt")
    assert report["reinitialised"] == []
    for a, b in zip(model.state_dict().values(), source.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("change, word", [({"depth": 1}, "depth"), ({"base_width": 8}, "base_width"),
                                          ({"norm": "group"}, "norm"), ({"ndim": 3}, "ndim")])
def test_another_architecture_is_one_line_naming_the_setting(tmp_path, change, word):
    _source(tmp_path / "other.pt", **change)
    model = build_model(dict(ARCH, out_channels=3))
    before = [v.clone() for v in model.state_dict().values()]
    with pytest.raises(InputError) as err:
        init_from_checkpoint(model, dict(ARCH, out_channels=3), tmp_path / "other.pt")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "other.pt") in message and word in message
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))  # nothing loaded


def test_a_tensor_of_another_shape_is_named(tmp_path):
    """A state dict that does not fit its own model_config: the first mismatching tensor is named."""
    _source(tmp_path / "bad.pt")
    state = torch.load(tmp_path / "bad.pt", weights_only=True)
    state["model"]["encoders.0.body.0.weight"] = torch.zeros(4, 1, 5, 5)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(InputError, match=r"encoders\.0\.body\.0\.weight \(4, 1, 5, 5\)"):
        init_from_checkpoint(build_model(dict(ARCH, out_channels=1)), dict(ARCH, out_channels=1), tmp_path / "bad.pt")


@pytest.mark.parametrize("content, words", [(b"not a checkpoint", "not a readable emseg checkpoint"),
                                            (None, "no such checkpoint file")])
def test_not_a_checkpoint(tmp_path, content, words):
    path = tmp_path / "x.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=words) as err:
        init_from_checkpoint(build_model(dict(ARCH, out_channels=3)), dict(ARCH, out_channels=3), path)
    assert str(path) in str(err.value)


def test_resume_of_an_init_run_continues_exactly_from_last_pt(tmp_path, synthetic_h5, monkeypatch):
    _source(tmp_path / "pre.pt")
    config = config_from_dict(tiny_train_config(synthetic_h5, init=str(tmp_path / "pre.pt")))
    full = train(config, tmp_path / "full", runtime=Runtime(device="cpu", seed=1))
    first = train(config, tmp_path / "split", runtime=Runtime(device="cpu", seed=1), stop_after=3)
    calls = []
    import emseg.engine.training as training

    real = training.init_from_checkpoint
    monkeypatch.setattr(training, "init_from_checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    rest = train(config, tmp_path / "split", runtime=Runtime(device="cpu", seed=1), resume=True)
    assert calls == []  # init is not re-applied on resume
    np.testing.assert_allclose(first.losses + rest.losses, full.losses, rtol=0, atol=1e-6)
    last = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert last["init"] == full.init == rest.init and last["init"]["reinitialised"] == ["head.weight", "head.bias"]
    assert last["init"]["path"] == str(tmp_path / "pre.pt")


def test_init_from_scratch_run_differs_from_a_run_without(tmp_path, synthetic_h5):
    _source(tmp_path / "pre.pt")
    plain = train(config_from_dict(tiny_train_config(synthetic_h5, steps=1)), tmp_path / "a", runtime=Runtime(device="cpu", seed=1))
    init = train(config_from_dict(tiny_train_config(synthetic_h5, steps=1, init=str(tmp_path / "pre.pt"))),
                 tmp_path / "b", runtime=Runtime(device="cpu", seed=1))
    assert plain.init is None and init.init is not None and plain.losses != init.losses


def test_config_init_path_is_relative_to_the_config_file(tmp_path, synthetic_h5):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "train.toml"
    path.write_text(to_toml(tiny_train_config(synthetic_h5, init="../pre.pt")))
    assert load_config(path).init == str(tmp_path / "cfg" / ".." / "pre.pt")


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_cli_init_reports_what_was_loaded_and_refuses_resume(tmp_path, synthetic_h5):
    _source(tmp_path / "pre.pt")
    (tmp_path / "train.toml").write_text(to_toml(tiny_train_config(synthetic_h5, steps=2)))
    runner = CliRunner()
    args = ["train", str(tmp_path / "train.toml"), "--out", str(tmp_path / "run")]
    result = runner.invoke(cli, args + ["--init", str(tmp_path / "pre.pt"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["init"]["reinitialised"] == ["head.weight", "head.bias"] and doc["init"]["task"] == "pretrain"
    result = runner.invoke(cli, args + ["--init", str(tmp_path / "pre.pt")])
    assert result.exit_code == 2  # the run folder already holds a run
    result = runner.invoke(cli, args + ["--init", str(tmp_path / "pre.pt"), "--resume"])
    assert result.exit_code == 2 and "--init" in _error_line(result) and "--resume" in _error_line(result)
    human = runner.invoke(cli, ["train", str(tmp_path / "train.toml"), "--out", str(tmp_path / "run2"),
                                "--init", str(tmp_path / "pre.pt")])
    assert human.exit_code == 0 and "re-initialised: head.weight, head.bias" in " ".join(human.stdout.split())


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_text("hello"), "not a readable emseg checkpoint"),
    (lambda p: _source(p, depth=1), "depth"),
])
def test_cli_bad_init_file_exits_2_with_one_line(tmp_path, synthetic_h5, make, words):
    make(tmp_path / "bad.pt")
    (tmp_path / "train.toml").write_text(to_toml(tiny_train_config(synthetic_h5, steps=1)))
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "train.toml"), "--out", str(tmp_path / "run"),
                                      "--init", str(tmp_path / "bad.pt")])
    assert result.exit_code == 2
    line = _error_line(result)
    assert line.startswith("error: ") and str(tmp_path / "bad.pt") in line and words in line


def test_encoder_parameters_are_the_contracting_path_and_the_bottleneck():
    from emseg.models.unet import encoder_parameters

    model = build_model(dict(ARCH, out_channels=3))
    by_name = {id(p) for name, p in model.named_parameters() if name.split(".")[0] in ("encoders", "bottleneck")}
    assert {id(p) for p in encoder_parameters(model)} == by_name and by_name
    assert len(encoder_parameters(model)) < len(list(model.parameters()))


def _one_step(tmp_path, synthetic_h5, name, scale):
    """Weights before and after one Adam step at a constant rate from the same pretrained start."""
    config = config_from_dict(tiny_train_config(
        synthetic_h5, steps=1, init=str(tmp_path / "pre.pt"), optim={"encoder_lr_scale": scale}))
    before = build_model(dict(ARCH, out_channels=3))
    init_from_checkpoint(before, dict(ARCH, out_channels=3), tmp_path / "pre.pt")
    train(config, tmp_path / name, runtime=Runtime(device="cpu", seed=1))
    after = torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
    moved = {k: float((after[k] - v).abs().max()) for k, v in before.state_dict().items()
             if v.is_floating_point() and "running" not in k and k != "head.weight" and k != "head.bias"}
    return moved, config.optim.lr


@pytest.mark.parametrize("scale", [0.0, 0.1])
def test_encoder_lr_scale_scales_the_first_adam_step_of_the_encoder(tmp_path, synthetic_h5, scale):
    # Adam's first step moves every parameter with a non-zero gradient by lr * g / (|g| + eps),
    # i.e. by almost exactly its learning rate: the encoder by scale * lr, the decoder by lr.
    _source(tmp_path / "pre.pt")
    moved, lr = _one_step(tmp_path, synthetic_h5, f"s{scale}", scale)
    encoder = [v for k, v in moved.items() if k.split(".")[0] in ("encoders", "bottleneck")]
    decoder = [v for k, v in moved.items() if k.split(".")[0] in ("decoders", "upconvs")]
    assert encoder and decoder
    assert max(decoder) == pytest.approx(lr, rel=1e-3)
    if scale == 0:
        assert max(encoder) == 0.0  # frozen
    else:
        assert max(encoder) == pytest.approx(scale * lr, rel=1e-3)


def test_a_run_resumes_only_with_the_encoder_lr_scale_it_started_with(tmp_path, synthetic_h5):
    _source(tmp_path / "pre.pt")
    half = dict(init=str(tmp_path / "pre.pt"), optim={"encoder_lr_scale": 0.5})
    config = config_from_dict(tiny_train_config(synthetic_h5, **half))
    full = train(config, tmp_path / "full", runtime=Runtime(device="cpu", seed=1))
    train(config, tmp_path / "split", runtime=Runtime(device="cpu", seed=1), stop_after=3)
    other = config_from_dict(tiny_train_config(synthetic_h5, **dict(half, optim={"encoder_lr_scale": 1.0})))
    with pytest.raises(InputError, match="encoder_lr_scale = 0.5"):
        train(other, tmp_path / "split", runtime=Runtime(device="cpu", seed=1), resume=True)
    rest = train(config, tmp_path / "split", runtime=Runtime(device="cpu", seed=1), resume=True)
    np.testing.assert_allclose(rest.losses, full.losses[3:], rtol=0, atol=1e-6)


def test_the_encoder_rate_is_the_scheduled_rate_times_the_scale_at_every_step_and_after_resume(tmp_path,
                                                                                            synthetic_h5):
    # Warmup then cosine: the rate changes every step; each Adam step must see the encoder group
    # at scale x the other group's rate, from its first step (set when the optimizer is built) on.
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from emseg.engine.training import build_optimizer

    _source(tmp_path / "pre.pt")
    optim = {"encoder_lr_scale": 0.25, "schedule": "cosine", "warmup_steps": 2}
    config = config_from_dict(tiny_train_config(synthetic_h5, steps=6, init=str(tmp_path / "pre.pt"), optim=optim))
    built = build_optimizer(build_model(dict(ARCH, out_channels=3)), config.optim)
    assert [g["lr"] for g in built.param_groups] == [config.optim.lr, 0.25 * config.optim.lr]
    seen: list[list[float]] = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append([g["lr"] for g in opt.param_groups]))
    try:
        train(config, tmp_path / "full", runtime=Runtime(device="cpu", seed=1))
        full, seen[:] = list(seen), []
        train(config, tmp_path / "split", runtime=Runtime(device="cpu", seed=1), stop_after=3)
        train(config, tmp_path / "split", runtime=Runtime(device="cpu", seed=1), resume=True)
    finally:
        hook.remove()
    assert len(full) == 6 and len({round(rest, 12) for rest, _ in full}) >= 4  # the schedule moves
    for rest, encoder in full:
        assert encoder == pytest.approx(0.25 * rest, rel=1e-12)
    assert seen == full


@pytest.mark.parametrize("scale", [-0.1, 1.5, float("nan")])
def test_encoder_lr_scale_out_of_range_is_refused(synthetic_h5, scale):
    with pytest.raises(InputError, match="encoder_lr_scale"):
        config_from_dict(tiny_train_config(synthetic_h5, optim={"encoder_lr_scale": scale}))


def test_an_encoder_scale_without_init_is_refused_and_writes_nothing(tmp_path, synthetic_h5):
    config = config_from_dict(tiny_train_config(synthetic_h5, optim={"encoder_lr_scale": 0.5}))
    with pytest.raises(InputError, match="needs a checkpoint to start from"):
        train(config, tmp_path / "run", runtime=Runtime(device="cpu", seed=1))
    assert not (tmp_path / "run").exists()


def test_cli_encoder_lr_scale_reaches_the_run_and_needs_init(tmp_path, synthetic_h5):
    _source(tmp_path / "pre.pt")
    (tmp_path / "train.toml").write_text(to_toml(tiny_train_config(synthetic_h5, steps=1)))
    runner = CliRunner()
    base = ["train", str(tmp_path / "train.toml")]
    result = runner.invoke(cli, base + ["--out", str(tmp_path / "run"), "--init", str(tmp_path / "pre.pt"),
                                        "--encoder-lr-scale", "0", "--json"])
    assert result.exit_code == 0, result.output
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["config"]["optim"]["encoder_lr_scale"] == 0.0
    pre = torch.load(tmp_path / "pre.pt", weights_only=True)["model"]
    assert torch.equal(last["model"]["encoders.0.body.0.weight"], pre["encoders.0.body.0.weight"])  # frozen
    alone = runner.invoke(cli, base + ["--out", str(tmp_path / "alone"), "--encoder-lr-scale", "0.5"])
    assert alone.exit_code == 2 and "init" in _error_line(alone) and not (tmp_path / "alone").exists()
    wrong = runner.invoke(cli, base + ["--out", str(tmp_path / "w"), "--init", str(tmp_path / "pre.pt"),
                                       "--encoder-lr-scale", "2"])
    assert wrong.exit_code == 2 and not (tmp_path / "w").exists()
