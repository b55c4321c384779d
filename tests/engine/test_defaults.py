"""The choices behind the training defaults: lazy soft Dice, automatic class weights, a cosine
schedule that follows a time budget."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from emseg.engine.config import OptimConfig, config_from_dict, learning_rate
from emseg.data import Cube
from emseg.errors import InputError
from emseg.losses import lazy_soft_dice
from emseg.semantic.train import SegmentationTask, auto_class_weights
from emseg.runtime import Runtime


def dice_reference(logits, target, labeled, not_present, smooth=1.0):
    """Loop-by-loop float64 version of the documented formula."""
    x = logits.double().numpy()
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    t = target.numpy()
    B, K = x.shape[:2]
    dices = []
    for k in range(K):
        inter = total = masked = 0.0
        for b in range(B):
            for idx in np.ndindex(t.shape[1:]):
                on = (labeled[b, k] > 0 and t[(b,) + idx] >= 0) or not_present[b, k] > 0
                if not on:
                    continue
                pk = p[(b, k) + idx]
                hit = float(t[(b,) + idx] == k)
                inter += pk * hit
                total += pk + hit
                masked += 1
        if masked:
            dices.append((2 * inter + smooth) / (total + smooth))
    return 1.0 - float(np.mean(dices)) if dices else 0.0


@pytest.mark.parametrize("seed", range(4))
def test_lazy_soft_dice_matches_a_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, K = 3, 4
    logits = torch.randn(B, K, 5, 6, generator=g) * 3
    target = torch.randint(-1, K, (B, 5, 6), generator=g)
    labeled = (torch.rand(B, K, generator=g) > 0.3).float()
    not_present = torch.zeros(B, K)
    not_present[0, 2] = 1
    got = float(lazy_soft_dice(logits, target, labeled, not_present))
    assert got == pytest.approx(dice_reference(logits, target, labeled.numpy(), not_present.numpy()), rel=1e-5)


def test_lazy_soft_dice_gradient_on_a_patch_without_the_class():
    """A class absent from the batch still has gradient: its predicted mass is penalised."""
    logits = torch.zeros(2, 3, 8, 8, requires_grad=True)
    target = torch.zeros(2, 8, 8, dtype=torch.long)  # only class 0 present
    lazy_soft_dice(logits, target).backward()
    g = logits.grad
    assert float(g[:, 1].abs().sum()) > 1e-3 and float(g[:, 1].mean()) > 0  # lower class-1 logits
    # a fully ignored batch teaches nothing (and does not fail)
    logits.grad = None
    loss = lazy_soft_dice(logits, torch.full((2, 8, 8), -1))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(logits.grad.abs().sum()) == 0.0


def test_lazy_soft_dice_agrees_with_monai_when_installed():
    monai = pytest.importorskip("monai.losses")
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 6, 6, generator=g)
    target = torch.randint(0, 3, (2, 6, 6), generator=g)
    ref = monai.DiceLoss(softmax=True, to_onehot_y=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)
    assert float(lazy_soft_dice(logits, target)) == pytest.approx(float(ref(logits, target.unsqueeze(1))), rel=1e-5)


def cube(labels, info=None):
    labels = np.asarray(labels)
    if info is None:
        info = np.array([[1] * 3, [0] * 3], np.uint8)
    return Cube(np.zeros(labels.shape, np.uint8), labels, np.asarray(info, np.uint8), 1.0)


def test_auto_class_weights_inverse_square_root_of_frequency():
    labels = np.array([0] * 80 + [1] * 16 + [2] * 4).reshape(1, 10, 10)
    w = np.array(auto_class_weights([cube(labels)], 3))
    f = np.array([0.8, 0.16, 0.04])
    raw = f ** -0.5
    np.testing.assert_allclose(w, raw / (f * raw).sum(), rtol=1e-12)
    assert (f * w).sum() == pytest.approx(1.0)


def test_auto_class_weights_count_only_annotated_classes_and_cap_the_ratio():
    dense = cube(np.array([0] * 99 + [1]).reshape(1, 10, 10))
    # a lazy cube labels class 2 only: its class-0 voxels must not count
    lazy = cube(np.array([0] * 50 + [2] * 50).reshape(1, 10, 10), info=[[0, 0, 1], [0, 0, 0]])
    w = np.array(auto_class_weights([dense, lazy], 3, max_ratio=5.0))
    counts = np.array([99.0, 1.0, 50.0])
    f = counts / counts.sum()
    raw = np.minimum(f ** -0.5, (f ** -0.5).min() * 5.0)
    np.testing.assert_allclose(w, raw / (f * raw).sum(), rtol=1e-12)
    assert w.max() / w.min() == pytest.approx(5.0)
    # an unseen class gets the largest weight
    w = auto_class_weights([cube(np.zeros((1, 4, 4), int))], 3)
    assert w[1] == w[2] == max(w)


def test_class_weights_auto_in_a_config(tmp_path):
    import h5py

    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as fh:
        fh["raw"] = np.zeros((1, 16, 16), np.uint8)
        lab = np.zeros((1, 16, 16), np.uint8)
        lab[0, :4] = 1
        fh["label"] = lab
    cfg = config_from_dict({"n_classes": 2, "patch_shape": [1, 16, 16], "class_weights": "auto",
                            "model": {"depth": 1, "base_width": 4},
                            "train": [{"raw": f"{path}:raw", "label": f"{path}:label"}]})
    task = SegmentationTask(cfg)
    f = np.array([0.75, 0.25])
    expected = f ** -0.5 / (f * f ** -0.5).sum()
    np.testing.assert_allclose(task.class_weights.numpy(), expected, rtol=1e-6)
    with pytest.raises(InputError, match='class_weights must be "auto" or a list'):
        config_from_dict({"n_classes": 2, "patch_shape": [1, 16, 16], "class_weights": "often",
                          "train": [{"raw": f"{path}:raw"}]})
    with pytest.raises(InputError, match="dice_weight"):
        config_from_dict({"n_classes": 2, "patch_shape": [1, 16, 16], "dice_weight": -1,
                          "train": [{"raw": f"{path}:raw"}]})


def test_cosine_follows_whichever_budget_runs_out_first():
    o = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert learning_rate(o, 0, 100) == pytest.approx(1.0)
    assert learning_rate(o, 50, 100) == pytest.approx(0.5)
    # half the time spent at step 10: the schedule is at its midpoint
    assert learning_rate(o, 10, 100, budget_used=0.5) == pytest.approx(0.5)
    # steps ahead of time: steps win
    assert learning_rate(o, 75, 100, budget_used=0.1) == pytest.approx(0.5 * (1 + np.cos(0.75 * np.pi)))
    assert learning_rate(o, 10, 100, budget_used=2.0) == pytest.approx(0.0, abs=1e-12)


def _tiny_volume(tmp_path):
    """A 32 x 32 section with random binary labels, as h5."""
    import h5py

    path = tmp_path / "c.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as fh:
        fh["raw"] = rng.integers(0, 255, (1, 32, 32), dtype=np.uint8)
        fh["label"] = (rng.random((1, 32, 32)) > 0.5).astype(np.uint8)
    return path


def test_steps_default_to_the_time_budget_when_one_is_set(tmp_path):
    from emseg.engine.config import UNBOUNDED_STEPS
    from emseg.semantic.train import train

    path = _tiny_volume(tmp_path)
    base = {"n_classes": 2, "patch_shape": [1, 16, 16], "batch_size": 2, "model": {"depth": 1, "base_width": 2},
            "train": [{"raw": f"{path}:raw", "label": f"{path}:label"}]}
    assert config_from_dict(base).total_steps == 1000
    assert config_from_dict(dict(base, steps=7, max_seconds=1.0)).total_steps == 7
    timed = config_from_dict(dict(base, max_seconds=1.5, optim={"schedule": "cosine", "min_lr_ratio": 0.0}))
    assert timed.total_steps == UNBOUNDED_STEPS
    seen = []
    result = train(timed, tmp_path / "run", runtime=Runtime(device="cpu", seed=0), progress=seen.append)
    assert result.budget_exhausted and result.final_step == len(seen) > 5
    assert all(e["total"] is None for e in seen)
    used = [e["budget_used"] for e in seen]
    assert used == sorted(used) and 0 < used[-1] < 1.2
    # the learning rate follows the spent budget: it ends near its cosine floor
    assert seen[-1]["lr"] < 0.15 * seen[0]["lr"]


def test_an_empty_class_weights_list_turns_the_auto_default_off(tmp_path):
    base = {"n_classes": 2, "patch_shape": [1, 16, 16], "train": [{"raw": f"{tmp_path}/x.h5:raw"}]}
    assert config_from_dict(base).class_weights == "auto"
    assert config_from_dict(dict(base, class_weights=[])).class_weights is None
    assert config_from_dict(dict(base, class_weights=[1, 2])).class_weights == (1.0, 2.0)


def test_a_resumed_time_budgeted_run_continues_the_budget_it_had_spent(tmp_path):
    # An interrupted run whose checkpoint says it has spent 60 % of a generous budget: resumed, its
    # schedule carries on from 60 % (not from the warm-up peak), and a checkpoint that has spent the
    # whole budget ends at once instead of training for another full budget.
    from emseg.semantic.train import train

    path = _tiny_volume(tmp_path)
    config = config_from_dict({"n_classes": 2, "patch_shape": [1, 16, 16], "batch_size": 2, "max_seconds": 1000.0,
                               "model": {"depth": 1, "base_width": 2}, "train": [{"raw": f"{path}:raw", "label": f"{path}:label"}],
                               "optim": {"schedule": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.0}})
    for name, spent in (("part", 600.0), ("done", 1000.0)):
        train(config, tmp_path / name, runtime=Runtime(device="cpu", seed=0), stop_after=2)
        state = torch.load(tmp_path / name / "last.pt", weights_only=False)
        state["elapsed_s"] = spent
        torch.save(state, tmp_path / name / "last.pt")
        seen = []
        result = train(config, tmp_path / name, runtime=Runtime(device="cpu", seed=0), resume=True,
                       progress=seen.append, stop_after=3)  # bounded even if the budget were ignored
        if name == "part":
            assert result.final_step == 5 and seen[0]["budget_used"] >= 0.6
            assert seen[0]["lr"] <= learning_rate(config.optim, 2, config.total_steps, budget_used=0.6) + 1e-12
        else:
            assert result.budget_exhausted and result.final_step == 2 and not seen
