"""The question arms of `emseg query simulate`: the ground truth answers, the cost columns of curves.csv,
resuming, growing the arms, and the configuration checks.

Expected costs are recomputed by hand from the stored questions; answers from the synthetic ground truth.
"""
from __future__ import annotations

import csv
import itertools
import json
import math

import numpy as np
import pytest

from conftest import synthetic, to_toml, write_h5
from emseg.active.simulation.loop import class_free_windows, false_positive_rates, load_simulate_config, run_simulation
from emseg.errors import InputError
from emseg.runtime import Runtime


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim_ask")
    vol = synthetic((4, 64, 64), 0)
    return write_h5(root / "data.h5", raw=vol.raw, label=vol.label), vol


def _sim(tmp_path, data, **extra):
    cfg = {
        "n_classes": 3, "patch": [1, 16, 16], "initial": 2, "per_iteration": 2, "iterations": 2, "seeds": [0],
        "strategies": ["entropy"], "questions": ["dense+presence", "partial=1+presence=1"], "budget": 30.0,
        "steps_initial": 2, "steps_finetune": 2, "batch_size": 2,
        "pool": {"raw": f"{data}:raw", "label": f"{data}:label", "region": [[0, 3]]},
        "test": {"raw": f"{data}:raw", "label": f"{data}:label", "region": [[3, 4]]},
        "model": {"depth": 2, "base_width": 4, "norm": "batch"}, "optim": {"lr": 0.01},
    }
    cfg.update(extra)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = tmp_path / "sim.toml"
    path.write_text(to_toml(cfg))
    return load_simulate_config(path)


class _Stop(Exception):
    pass


def test_simulate_question_arms_record_cost_answer_from_truth_and_resume(volume, tmp_path):
    data, vol = volume
    config = _sim(tmp_path, data)
    full = run_simulation(config, tmp_path / "a", runtime=Runtime(device="cpu"), plot=False)
    assert full.computed == full.total == 9
    with open(tmp_path / "a" / "curves.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["strategy", "seed", "iteration", "n_labelled", "jaccard_0", "jaccard_1", "jaccard_2",
                             "mean_fg_jaccard", "cost_s", "n_dense", "n_partial", "n_presence", "fp_rate",
                             "fp_rate_1", "fp_rate_2"]
    assert [r["strategy"] for r in rows] == ["entropy"] * 3 + ["dense+presence"] * 3 + ["partial=0.5+presence=0.5"] * 3
    dense_patch = 16 * 16 * 0.01
    for r in rows[:3]:  # strategies label dense patches
        assert float(r["cost_s"]) == pytest.approx(int(r["n_labelled"]) * dense_patch) and r["n_presence"] == "0"
    pool_truth = vol.label[:3]
    for arm, arm_rows in (("dense+presence", rows[3:6]), ("partial=0.5+presence=0.5", rows[6:])):
        state = json.loads((tmp_path / "a" / "runs" / "seed_0" / f"ask-{arm}" / "state.json").read_text())
        spent = 2 * dense_patch
        counts = {"dense": 2, "partial": 0, "presence": 0}
        assert float(arm_rows[0]["cost_s"]) == pytest.approx(spent)
        for it, sel in enumerate(state["selections"], start=1):
            round_cost = math.fsum(q["cost"] for q in sel)
            assert 0 < round_cost <= 30.0
            for q in sel:
                want = {"dense": dense_patch, "partial": 16 * 16 * 0.0025, "presence": 5.0}[q["question"]]
                assert q["cost"] == pytest.approx(want)
                z, y, x = q["offset"]
                if q["question"] == "presence":  # the oracle is the ground truth
                    assert q["answer"] == bool((pool_truth[z, y:y + 16, x:x + 16] == q["class"]).any())
                else:
                    assert q["answer"] is None
                counts[q["question"]] += 1
            if arm.startswith("partial"):  # the fixed mix: 15 s per type
                for t in ("partial", "presence"):
                    assert math.fsum(q["cost"] for q in sel if q["question"] == t) <= 15.0
            spent += round_cost
            r = arm_rows[it]
            assert float(r["cost_s"]) == pytest.approx(spent)
            assert [int(r[f"n_{t}"]) for t in ("dense", "partial", "presence")] == [counts[t] for t in
                                                                                     ("dense", "partial", "presence")]
    assert sum(int(r["n_presence"]) for r in rows) > 0

    # interrupted after four new rows, then continued: the same rows
    def stop(event, seen=[]):
        if event["event"] == "row" and event["computed"]:
            seen.append(1)
            if len(seen) == 5:
                raise _Stop

    with pytest.raises(_Stop):
        run_simulation(config, tmp_path / "b", runtime=Runtime(device="cpu"), progress=stop, plot=False)
    resumed = run_simulation(config, tmp_path / "b", runtime=Runtime(device="cpu"), plot=False)
    assert resumed.computed == 4
    cols = ["jaccard_0", "mean_fg_jaccard", "cost_s", "n_presence"]
    assert [[r[c] for c in cols] for r in resumed.rows] == [pytest.approx([r[c] for c in cols], nan_ok=True)
                                                             for r in full.rows]
    # arms may be added to a folder; a changed budget is refused by the arms that ran with another
    more = _sim(tmp_path, data, questions=["dense+presence", "partial=1+presence=1", "presence"])
    grown = run_simulation(more, tmp_path / "a", runtime=Runtime(device="cpu"), plot=True)
    assert grown.computed == 3 and (grown.curves_png is not None or grown.plot_note)
    with pytest.raises(InputError, match="another budget"):
        run_simulation(_sim(tmp_path, data, budget=50.0), tmp_path / "a", runtime=Runtime(device="cpu"), plot=False)


def test_simulate_question_config_errors(volume, tmp_path):
    data, _ = volume
    for extra, word in (({"budget": None}, "budget"), ({"questions": ["guess"]}, "unknown question type"),
                        ({"questions": ["auto", "dense+partial+presence"]}, "twice"),
                        ({"budget": -1.0}, "budget"), ({"costs": {"presence_cost": 0}}, "presence_cost"),
                        ({"costs": {"speed": 1}}, "unknown cost"), ({"questions": "dense"}, "list")):
        with pytest.raises(InputError, match=word):
            _sim(tmp_path, data, **extra)
    # question arms only, no strategy: allowed
    assert _sim(tmp_path, data, strategies=[]).strategies == ()


# ----------------------------------------------------------------------------- false positives in class-free windows
def _brute_fp(prediction, label, patch, n_classes):
    """fp_rate_k by looping over the grid windows one by one."""
    grid = [range(0, n - p + 1, p) for n, p in zip(label.shape, patch)]
    out = {}
    for k in range(1, n_classes):
        hits = voxels = 0
        for corner in itertools.product(*grid):
            sl = tuple(slice(c, c + p) for c, p in zip(corner, patch))
            truth = label[sl]
            if (truth == -1).any() or (truth == k).any():
                continue
            hits += int((prediction[sl] == k).sum())
            voxels += truth.size
        out[f"fp_rate_{k}"] = hits / voxels if voxels else float("nan")
    rates = [v for v in out.values() if not math.isnan(v)]
    out["fp_rate"] = sum(rates) / len(rates) if rates else float("nan")
    return out


@pytest.mark.parametrize("shape, patch", [((3, 20, 23), (1, 4, 5)), ((6, 9, 10), (2, 3, 3)), ((10, 12), (5, 4))])
def test_false_positive_rate_matches_a_window_by_window_loop(shape, patch):
    rng = np.random.default_rng(len(shape) + patch[-1])
    # blocky truth so that some windows are free of a class, a few unknown voxels, one class never free
    label = np.kron(rng.integers(0, 3, size=[-(-n // 3) for n in shape]), np.ones([3] * len(shape), int))
    label = label[tuple(slice(0, n) for n in shape)].astype(np.int16)
    label[rng.random(shape) < 0.01] = -1
    label.flat[:: max(1, label.size // 200)] = 3  # class 3 is everywhere: no window free of it (or few)
    prediction = rng.integers(0, 4, size=shape)
    got = false_positive_rates(prediction, class_free_windows(label, patch, 4), patch)
    want = _brute_fp(prediction, label, patch, 4)
    assert got.keys() == want.keys()
    assert [got[k] for k in sorted(got)] == pytest.approx([want[k] for k in sorted(want)], nan_ok=True)
    assert not math.isnan(got["fp_rate_1"])
    # a perfect prediction has none; predicting k everywhere gives 1 in k's free windows
    assert false_positive_rates(label, class_free_windows(label, patch, 4), patch)["fp_rate_1"] == 0
    assert false_positive_rates(np.ones(shape, int), class_free_windows(label, patch, 4), patch)["fp_rate_1"] == 1
    # the input is not modified; a volume smaller than one window has no windows
    assert (label >= -1).all() and class_free_windows(label[:1, :1], patch[-2:], 4).size == 0


def test_simulated_rows_record_the_false_positive_rate_of_their_network(volume, tmp_path):
    from emseg.models.checkpoint import load_model
    from emseg.engine.inference import WindowOptions, make_predictor, predict_array

    data, vol = volume
    config = _sim(tmp_path, data, questions=["dense+presence"], iterations=1)
    result = run_simulation(config, tmp_path / "a", runtime=Runtime(device="cpu"), plot=True)
    assert result.curves_png is not None or result.plot_note
    test_raw, test_label = vol.raw[3:4], vol.label[3:4].astype(np.int64)
    runs = tmp_path / "a" / "runs" / "seed_0"
    weights = {("entropy", 0): runs / "initial" / "last.pt", ("dense+presence", 0): runs / "initial" / "last.pt",
               ("entropy", 1): runs / "entropy" / "iter_001" / "last.pt",
               ("dense+presence", 1): runs / "ask-dense+presence" / "iter_001" / "last.pt"}
    with open(tmp_path / "a" / "curves.csv", newline="") as fh:
        csv_rows = {(r["strategy"], int(r["iteration"])): r for r in csv.DictReader(fh)}
    assert set(csv_rows) == set(weights)
    for key, path in weights.items():
        model, _ = load_model(path, "cpu")
        predictor = make_predictor(model, config.patch, WindowOptions(precision="fp32"), "cpu")
        prediction = np.zeros(test_label.shape, np.int64)
        for block, probs in predict_array(predictor, test_raw, config.patch):
            prediction[block.inner] = probs.argmax(axis=0)
        want = _brute_fp(prediction, test_label, config.patch, 3)
        for col in ("fp_rate", "fp_rate_1", "fp_rate_2"):
            assert float(csv_rows[key][col]) == pytest.approx(want[col], rel=1e-5, nan_ok=True), (key, col)
    assert any(not math.isnan(float(r["fp_rate"])) for r in csv_rows.values())
