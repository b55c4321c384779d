"""``emseg pretrain``: block masks, pretext losses, config checks, exact resume, --init of the result."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import synthetic, tiny_train_config, to_toml, write_h5
from emseg.cli.main import cli
from emseg.engine.config import config_from_dict
from emseg.semantic.train import train
from emseg.errors import InputError
from emseg.models import build_model
from emseg.pretrain import PretextConfig, PretrainTask, load_pretrain_config, pretrain, pretrain_config_from_dict
from emseg.pretrain.pretext import block_mask, make_pretext_batch, pretext_loss
from emseg.runtime import Runtime


def _config_dict(h5, **overrides):
    config = {"patch_shape": [1, 32, 32], "batch_size": 2, "steps": 6, "log_every": 1, "precision": "fp32",
              "model": {"depth": 2, "base_width": 4}, "data": [{"raw": f"{h5}:raw"}], "pretext": {"block": 8},
              "optim": {"warmup_steps": 0}}
    config.update(overrides)
    return config


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- masks and losses


def test_block_mask_hides_a_fixed_share_of_whole_blocks_at_random():
    rng = np.random.default_rng(0)
    draws = np.stack([block_mask((32, 32), (8, 8), 0.6, rng) for _ in range(400)])
    blocks = draws[:, ::8, ::8]  # one voxel per block
    # whole blocks: every voxel of a block equals its corner
    assert np.array_equal(draws, np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2))
    assert (blocks.reshape(400, -1).sum(1) == round(0.6 * 16)).all()  # exactly 10 of 16 blocks per patch
    freq = blocks.mean(0)  # each block hidden with probability 10/16; binomial std 0.024 over 400 draws
    assert np.abs(freq - 10 / 16).max() < 0.12
    # C(16, 10) = 8008 masks: 400 draws hold about 10 repeats by chance
    assert len({d.tobytes() for d in draws}) > 370


def test_block_mask_3d_blocks_per_section_and_border_blocks():
    rng = np.random.default_rng(1)
    per_section = [block_mask((4, 32, 32), (1, 16, 16), 0.5, rng) for _ in range(20)]
    assert all(m.sum() == 8 * 256 for m in per_section)  # 8 of 16 (1, 16, 16) blocks
    assert any(not np.array_equal(m[0], m[1]) for m in per_section)  # sections are masked on their own
    deep = block_mask((4, 32, 32), (4, 16, 16), 0.5, rng)
    assert all(np.array_equal(deep[0], s) for s in deep)  # a 4-deep block covers every section alike
    cut = block_mask((20, 20), (16, 16), 0.5, rng)  # 2 x 2 grid, far blocks cut to the patch
    assert cut.shape == (20, 20) and cut.sum() in (16 * 16 + 16 * 4, 16 * 4 + 4 * 4, 16 * 4 * 2, 16 * 16 + 4 * 4)


def test_masked_batch_and_loss_equal_a_hand_computed_mse_over_hidden_voxels():
    rng = np.random.default_rng(2)
    raw = rng.random((2, 1, 32, 32), dtype=np.float32)
    batch = make_pretext_batch(raw, PretextConfig(block=8), 2, rng)
    hidden = batch["mask"] > 0
    assert np.all(batch["raw"][hidden] == 0) and np.array_equal(batch["raw"][~hidden], raw[~hidden])
    assert np.array_equal(batch["target"], raw)
    model = build_model(dict(ndim=2, out_channels=1, depth=1, base_width=4))
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    loss = pretext_loss(model(tensors["raw"]), tensors["target"], tensors["mask"])
    pred = model(tensors["raw"]).detach().numpy()
    expected = np.mean((pred[hidden].astype(np.float64) - raw[hidden]) ** 2)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # visible voxels do not count: changing their target changes nothing
    other = tensors["target"].clone()
    other[~torch.from_numpy(hidden)] += 5.0
    assert float(pretext_loss(model(tensors["raw"]), other, tensors["mask"])) == pytest.approx(float(loss), rel=1e-6)


def test_normalised_targets_and_denoising_pairs():
    rng = np.random.default_rng(3)
    raw = rng.random((3, 1, 32, 32), dtype=np.float32) * 0.5 + 0.2
    target = make_pretext_batch(raw, PretextConfig(norm_target=True, block=8), 2, rng)["target"]
    np.testing.assert_allclose(target.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(target.std(axis=(1, 2, 3)), 1, atol=1e-4)
    pair = make_pretext_batch(raw, PretextConfig(kind="denoise", noise_std=0.2), 2, rng)
    assert set(pair) == {"raw", "target"} and np.array_equal(pair["target"], raw)
    noise = pair["raw"] - raw  # 3072 samples: the std is within 5% of 0.2
    assert abs(float(noise.std()) - 0.2) < 0.01 and abs(float(noise.mean())) < 0.02


# --------------------------------------------------------------------------- config


def test_config_defaults_are_the_recipe(synthetic_h5):
    cfg = pretrain_config_from_dict({"patch_shape": [1, 32, 32], "data": [{"raw": f"{synthetic_h5}:raw"}]})
    assert cfg.training.batch_size == 16 and cfg.training.optim.lr == 1e-3
    assert cfg.training.model.depth == 4 and cfg.training.model.base_width == 16
    assert (cfg.pretext.kind, cfg.pretext.mask_ratio, cfg.pretext.block) == ("masked", 0.6, 16)


@pytest.mark.parametrize("change, words", [
    ({"data": [{"raw": "x.h5:raw", "label": "x.h5:label"}]}, "`emseg train`"),
    ({"n_classes": 2}, "unknown key(s) n_classes"),
    ({"pretext": {"kind": "jigsaw"}}, "pretext.kind must be one of masked, denoise"),
    ({"pretext": {"ratio": 0.5}}, "unknown key(s) ratio in [pretext]"),
    ({"pretext": {"mask_ratio": 1.0}}, "pretext.mask_ratio must be in (0, 1)"),
    ({"pretext": {"kind": "contrastive", "embed_dim": 1}}, "pretext.embed_dim must be from 2 to 256"),
    ({"pretext": {"embed_dim": 10**9}}, "pretext.embed_dim must be from 2 to 256"),
    ({"data": [{"raw": "x.h5:raw", "prio": 1, "lable": 2}]}, "unknown key(s) lable in [[data]]"),
    ({"data": []}, "no [[data]] volumes"),
])
def test_config_errors_are_one_line_naming_the_file(tmp_path, change, words):
    path = tmp_path / "pre.toml"
    path.write_text(to_toml(_config_dict(tmp_path / "x.h5", **change)))
    with pytest.raises(InputError) as err:
        load_pretrain_config(path)
    assert words in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- training


def test_pretrain_resume_continues_exactly(tmp_path, synthetic_h5):
    config = pretrain_config_from_dict(_config_dict(synthetic_h5))
    full = pretrain(config, tmp_path / "full", runtime=Runtime(device="cpu", seed=3))
    assert full.final_step == 6 and len(full.losses) == 6 and np.isfinite(full.losses).all()
    first = pretrain(config, tmp_path / "split", runtime=Runtime(device="cpu", seed=3), stop_after=2)
    rest = pretrain(config, tmp_path / "split", runtime=Runtime(device="cpu", seed=3), resume=True)
    assert first.interrupted and rest.start_step == 2 and rest.final_step == 6
    np.testing.assert_allclose(first.losses + rest.losses, full.losses, rtol=0, atol=1e-6)
    a, b = _load(tmp_path / "split" / "last.pt"), _load(tmp_path / "full" / "last.pt")
    for x, y in zip(a["model"].values(), b["model"].values()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    with open(tmp_path / "split" / "metrics.csv", newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4, 5, 6]
    other = pretrain_config_from_dict(_config_dict(synthetic_h5, pretext={"kind": "denoise"}))
    with pytest.raises(InputError, match="other \\[pretext\\] settings"):
        pretrain(other, tmp_path / "split", runtime=Runtime(device="cpu", seed=3), resume=True)


def test_pretrain_checkpoint_is_an_init_source_for_train(tmp_path, synthetic_h5):
    config = pretrain_config_from_dict(_config_dict(synthetic_h5, steps=2))
    pretrain(config, tmp_path / "pre", runtime=Runtime(device="cpu"))
    state = _load(tmp_path / "pre" / "last.pt")
    seg_config = config_from_dict(tiny_train_config(synthetic_h5, steps=1))
    seg_model_config = dict(ndim=2, in_channels=1, out_channels=3, depth=2, base_width=4, norm="batch",
                            dropout=0.0, anisotropic_levels=0)
    assert state["task"] == "pretrain" and state["pretext"]["kind"] == "masked"
    assert state["model_config"] == dict(seg_model_config, out_channels=1)  # the keys `emseg train` writes
    assert (tmp_path / "pre" / "best.pt").exists()
    result = train(seg_config.replace(init=str(tmp_path / "pre" / "last.pt")), tmp_path / "ft", runtime=Runtime(device="cpu"))
    assert result.init["loaded"] == len(state["model"]) - 2
    assert _load(tmp_path / "ft" / "last.pt")["model_config"] == seg_model_config


def test_pretrain_on_3d_patches_with_section_blocks(tmp_path):
    h5 = write_h5(tmp_path / "v.h5", raw=synthetic((8, 32, 32), 2).raw)
    config = pretrain_config_from_dict(_config_dict(h5, patch_shape=[4, 16, 16], steps=2,
                                                    model={"depth": 1, "base_width": 4}))
    task = PretrainTask(config)
    batch = task.batch(np.random.default_rng(0))
    assert task.model_config()["ndim"] == 3 and batch["raw"].shape == (2, 1, 4, 16, 16)
    hidden = batch["mask"][:, 0].sum(dim=(2, 3))  # 8 x 8 blocks one section deep: 2 of 4 per section
    assert torch.all(hidden == round(0.6 * 4) * 64)
    task.close()
    assert pretrain(config, tmp_path / "run", runtime=Runtime(device="cpu")).final_step == 2
    contrastive = pretrain_config_from_dict(_config_dict(h5, patch_shape=[4, 16, 16], steps=2, pretext={
        "kind": "contrastive", "embed_dim": 4}, model={"depth": 1, "base_width": 4}))
    batch = PretrainTask(contrastive).batch(np.random.default_rng(0))
    assert batch["view"].shape == (2, 1, 4, 16, 16) and len(batch["voxels"]) == 2 * 4 * 16 * 16
    result = pretrain(contrastive, tmp_path / "run3", runtime=Runtime(device="cpu"))
    assert result.final_step == 2 and np.isfinite(result.losses).all()


# --------------------------------------------------------------------------- command line


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_cli_pretrain_json_curves_and_bad_input(tmp_path, synthetic_h5):
    runner = CliRunner()
    path = tmp_path / "pre.toml"
    path.write_text(to_toml(_config_dict(synthetic_h5, steps=2)))
    result = runner.invoke(cli, ["pretrain", str(path), "--out", str(tmp_path / "run"), "--kind", "denoise", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["kind"] == "denoise" and doc["final_step"] == 2 and doc["checkpoint"] == str(tmp_path / "run" / "last.pt")
    assert (tmp_path / "run" / "metrics.csv").exists() and (tmp_path / "run" / "curves.png").exists()
    assert _load(tmp_path / "run" / "last.pt")["pretext"]["kind"] == "denoise"

    path.write_text(to_toml(_config_dict(synthetic_h5, data=[{"raw": f"{synthetic_h5}:raw",
                                                              "label": f"{synthetic_h5}:label"}])))
    result = runner.invoke(cli, ["pretrain", str(path), "--out", str(tmp_path / "other")])
    assert result.exit_code == 2 and "emseg train" in _error_line(result) and str(path) in _error_line(result)
    path.write_text(to_toml(_config_dict(synthetic_h5, patch_shape=[1, 128, 128],
                                         model={"depth": 2, "base_width": 4})))
    result = runner.invoke(cli, ["pretrain", str(path), "--out", str(tmp_path / "other")])
    assert result.exit_code == 2 and "larger than the volume" in _error_line(result)
    assert str(synthetic_h5) in _error_line(result)


# --------------------------------------------------------------------------- contrastive


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 4, 8, 8), (2, 3, 6, 10)])
def test_turn_back_undoes_every_turn(shape):
    from emseg.pretrain.pretext import turn, turn_back

    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    ks = (0, 1, 2, 3) if shape[-1] == shape[-2] else (0, 2)

    def by_index(a, k, flip):
        """A quarter turn: out[..., i, j] = a[..., j, W - 1 - i]; the mirror: out[..., j] = a[..., W - 1 - j]."""
        for _ in range(k):
            h, w = a.shape[-2:]
            a = np.stack([np.stack([a[..., j, w - 1 - i] for j in range(h)], -1) for i in range(w)], -2)
        return np.stack([a[..., a.shape[-1] - 1 - j] for j in range(a.shape[-1])], -1) if flip else a

    pairs = [(k, flip) for k in ks for flip in (0, 1)]
    for k, flip in pairs:
        assert np.array_equal(np.stack([turn(s, k, flip) for s in x]), by_index(x, k, flip))
    # a different turn per sample, undone at once
    chosen = [pairs[(i * 3) % len(pairs)] for i in range(len(x))]
    turned = torch.from_numpy(np.stack([turn(s, k, flip) for s, (k, flip) in zip(x, chosen)]))
    assert np.array_equal(turn_back(turned, torch.tensor(chosen)).numpy(), x)


def _vicreg_reference(a, b, w=(25.0, 25.0, 1.0)):
    """VICReg's loss written out with numpy, term by term (Bardes et al. 2022, with the halved variance
    term and the mean-squared invariance of the authors' implementation)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    def v(z):
        return np.mean(np.maximum(0.0, 1.0 - np.sqrt(z.var(axis=0, ddof=1) + 1e-4)))
    def c(z):
        cov = np.cov(z, rowvar=False)
        return (np.sum(cov ** 2) - np.sum(np.diag(cov) ** 2)) / z.shape[1]
    return w[0] * np.mean((a - b) ** 2) + w[1] * (v(a) + v(b)) / 2 + w[2] * (c(a) + c(b))


def test_vicreg_loss_equals_the_formula_at_the_chosen_voxels():
    from emseg.pretrain.pretext import vicreg_loss

    rng = np.random.default_rng(1)
    z1 = rng.normal(size=(2, 6, 5, 7)).astype(np.float32) * 0.3
    z2 = z1 + rng.normal(size=z1.shape).astype(np.float32) * 0.1
    voxels = rng.choice(2 * 5 * 7, 40, replace=False)
    rows = lambda z: np.moveaxis(z, 1, -1).reshape(-1, 6)  # noqa: E731
    got = float(vicreg_loss(torch.from_numpy(z1), torch.from_numpy(z2), torch.from_numpy(voxels)))
    assert got == pytest.approx(_vicreg_reference(rows(z1)[voxels], rows(z2)[voxels]), rel=1e-4)
    assert float(vicreg_loss(torch.from_numpy(z1), torch.from_numpy(z2))) == \
        pytest.approx(_vicreg_reference(rows(z1), rows(z2)), rel=1e-4)


def test_two_views_are_the_same_patch_jittered_and_turned():
    from emseg.pretrain.pretext import turn_back

    vol = synthetic((1, 64, 64), 2).raw[0].astype(np.float32) / 255.0
    raw = np.stack([vol[None, :32, :32], vol[None, 32:, 32:], vol[None, :32, 32:]])
    rng = np.random.default_rng(5)
    batch = make_pretext_batch(raw, PretextConfig(kind="contrastive"), 2, rng)
    assert batch["raw"].shape == batch["view"].shape == raw.shape and batch["transforms"].shape == (3, 2)
    assert len(set(batch["voxels"].tolist())) == len(batch["voxels"]) == 3 * 32 * 32  # fewer than 4,096: all
    back = turn_back(torch.from_numpy(batch["view"]), torch.from_numpy(batch["transforms"])).numpy()
    for i, (k, flip) in enumerate(batch["transforms"]):
        aligned = np.corrcoef(back[i].ravel(), batch["raw"][i].ravel())[0, 1]
        assert aligned > 0.6  # the same structures, under two jitters
        if k or flip:  # before turning back they do not line up
            assert np.corrcoef(batch["view"][i].ravel(), batch["raw"][i].ravel())[0, 1] < aligned - 0.2
    big = make_pretext_batch(np.repeat(raw, 2, axis=0), PretextConfig(kind="contrastive"), 2, rng)  # 6,144 voxels
    assert len(big["voxels"]) == 4096 and len(set(big["voxels"].tolist())) == 4096
    assert big["voxels"].min() >= 0 and big["voxels"].max() < 6 * 32 * 32


def test_contrastive_pretraining_learns_and_initialises_train(tmp_path, synthetic_h5):
    config = pretrain_config_from_dict(_config_dict(synthetic_h5, steps=30, batch_size=4,
                                                    pretext={"kind": "contrastive", "embed_dim": 8}))
    result = pretrain(config, tmp_path / "pre", runtime=Runtime(device="cpu", seed=0))
    losses = np.asarray(result.losses)
    assert np.isfinite(losses).all() and losses[-5:].mean() < losses[:5].mean()
    state = _load(tmp_path / "pre" / "last.pt")
    assert state["model_config"]["out_channels"] == 8 and state["pretext"]["embed_dim"] == 8
    seg_config = config_from_dict(tiny_train_config(synthetic_h5, steps=1))
    out = train(seg_config.replace(init=str(tmp_path / "pre" / "last.pt")), tmp_path / "ft",
                runtime=Runtime(device="cpu"))
    assert out.init["loaded"] == len(state["model"]) - 2 and len(out.init["reinitialised"]) == 2


def test_a_run_written_before_a_pretext_key_existed_resumes(tmp_path, synthetic_h5):
    config = pretrain_config_from_dict(_config_dict(synthetic_h5, steps=4))
    pretrain(config, tmp_path / "pre", runtime=Runtime(device="cpu", seed=0), stop_after=2)
    state = _load(tmp_path / "pre" / "last.pt")
    del state["pretext"]["embed_dim"]  # as an older emseg wrote it
    torch.save(state, tmp_path / "pre" / "last.pt")
    assert pretrain(config, tmp_path / "pre", runtime=Runtime(device="cpu", seed=0), resume=True).final_step == 4
