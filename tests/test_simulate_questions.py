"""The question arms of `emseg query simulate`: the ground truth answers, the cost columns of curves.csv,
resuming, growing the arms, and the configuration checks.

Expected costs are recomputed by hand from the stored questions; answers from the synthetic ground truth.
"""
from __future__ import annotations

import csv
import json
import math

import pytest

from conftest import synthetic, to_toml, write_h5
from emseg.active.simulate import load_simulate_config, run_simulation
from emseg.errors import InputError


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
    full = run_simulation(config, tmp_path / "a", device="cpu", plot=False)
    assert full.computed == full.total == 9
    with open(tmp_path / "a" / "curves.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["strategy", "seed", "iteration", "n_labelled", "jaccard_0", "jaccard_1", "jaccard_2",
                             "mean_fg_jaccard", "cost_s", "n_dense", "n_partial", "n_presence"]
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
        run_simulation(config, tmp_path / "b", device="cpu", progress=stop, plot=False)
    resumed = run_simulation(config, tmp_path / "b", device="cpu", plot=False)
    assert resumed.computed == 4
    cols = ["jaccard_0", "mean_fg_jaccard", "cost_s", "n_presence"]
    assert [[r[c] for c in cols] for r in resumed.rows] == [pytest.approx([r[c] for c in cols], nan_ok=True)
                                                             for r in full.rows]
    # arms may be added to a folder; a changed budget is refused by the arms that ran with another
    more = _sim(tmp_path, data, questions=["dense+presence", "partial=1+presence=1", "presence"])
    grown = run_simulation(more, tmp_path / "a", device="cpu", plot=True)
    assert grown.computed == 3 and (grown.curves_png is not None or grown.plot_note)
    with pytest.raises(InputError, match="another budget"):
        run_simulation(_sim(tmp_path, data, budget=50.0), tmp_path / "a", device="cpu", plot=False)


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
