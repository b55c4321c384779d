"""Plumbing of the results campaigns in benchmarks/results (resume, statistics, tables, figures),
on made-up runs: the experiments themselves are long and not part of the test suite."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
sys.path.insert(0, str(RESULTS))
sys.path.insert(0, str(RESULTS.parent))

import _campaign  # noqa: E402


def test_campaign_resumes_and_refuses_other_settings(tmp_path):
    path = tmp_path / "c.json"
    calls = []

    def work(v):
        calls.append(v)
        return {"value": v}

    c = _campaign.Campaign(path, {"a": 1})
    c.run({"seed": 0}, lambda: work(10))
    c.run({"seed": 1}, lambda: work(11))
    # a new process (a resumed campaign) skips what is stored
    c2 = _campaign.Campaign(path, {"a": 1})
    c2.run({"seed": 0}, lambda: work(99))
    c2.run({"seed": 2}, lambda: work(12))
    assert calls == [10, 11, 12]
    doc = json.loads(path.read_text())
    assert [(r["seed"], r["value"]) for r in doc["runs"]] == [(0, 10), (1, 11), (2, 12)]
    with pytest.raises(SystemExit, match="other settings"):
        _campaign.Campaign(path, {"a": 2})
    # the settings are on disk from the first start: a campaign killed inside its first run is
    # not continued under other settings either
    fresh = tmp_path / "sub" / "d.json"
    _campaign.Campaign(fresh, {"a": 1})
    assert json.loads(fresh.read_text())["settings"] == {"a": 1} and json.loads(fresh.read_text())["runs"] == []
    with pytest.raises(SystemExit, match="other settings"):
        _campaign.Campaign(fresh, {"a": 2})


def test_a_training_that_returned_early_is_never_stored(tmp_path, synthetic_h5):
    # A Ctrl-C makes run_training save and return (result.interrupted); so does a step budget cut
    # short. The campaign helper stops there, before anything is scored or stored.
    from conftest import tiny_train_config
    from emseg.engine.config import config_from_dict
    from emseg.runtime import Runtime
    from emseg.semantic.train import train

    config = config_from_dict(tiny_train_config(synthetic_h5, steps=4))
    cut = train(config, tmp_path / "cut", runtime=Runtime(device="cpu", seed=0), stop_after=2)
    assert cut.interrupted and cut.final_step == 2
    c = _campaign.Campaign(tmp_path / "c.json", {"steps": 4})

    def run():
        _campaign.finished(cut, 4, "cut")
        return {"score": 1.0}

    with pytest.raises(SystemExit, match="stopped at step 2 of 4"):
        c.run({"seed": 0}, run)
    assert json.loads((tmp_path / "c.json").read_text())["runs"] == []
    whole = train(config, tmp_path / "cut", runtime=Runtime(device="cpu", seed=0), resume=True)
    _campaign.finished(whole, 4, "whole")  # completed: passes
    cut.final_step, cut.interrupted = 4, False
    with pytest.raises(SystemExit):
        _campaign.finished(cut, 5, "short of its step budget")
    _campaign.finished(whole, None, "a time budget: only the interruption counts")


def test_paired_interval_is_the_t_interval():
    d = [0.01, 0.05, 0.03, -0.01]
    m, lo, hi = _campaign.paired_interval(d)
    # t_{0.975, 3} = 3.182446
    half = 3.182446305284263 * np.std(d, ddof=1) / 2
    assert m == pytest.approx(np.mean(d)) and lo == pytest.approx(m - half) and hi == pytest.approx(m + half)
    assert np.isnan(_campaign.paired_interval([0.1])[1])


def fake_rows(effect: float, seeds=(0, 1, 2), iterations=3):
    rng = np.random.default_rng(0)
    rows = []
    for s in seeds:
        base = rng.uniform(0.3, 0.5)
        for it in range(iterations + 1):
            for name, bonus in (("random", 0.0), ("entropy", effect)):
                j = base + 0.05 * it + (bonus if it else 0.0) + rng.normal(0, 0.01)
                rows.append({"strategy": name, "seed": s, "iteration": it, "n_labelled": 20 + 20 * it,
                             "mean_fg_jaccard": j})
    return rows


def test_active_summary_pairs_by_seed_and_finds_the_label_cost(tmp_path):
    import active_learning as mod
    rows = fake_rows(0.1)
    full = [{"seed": s, "mean_fg_jaccard": 0.6} for s in (0, 1, 2)]
    s = mod.summary(rows, full, 3)
    J = {(r["strategy"], r["seed"], r["iteration"]): r["mean_fg_jaccard"] for r in rows}
    per_seed = [np.mean([J["entropy", sd, it] - J["random", sd, it] for it in (1, 2, 3)]) for sd in (0, 1, 2)]
    assert s["strategies"]["entropy"]["diff_vs_random"][0] == pytest.approx(np.mean(per_seed))
    lo, hi = s["strategies"]["entropy"]["diff_vs_random"][1:]
    assert lo < 0.1 < hi and lo > 0
    # 95% of 0.6 = 0.57: the first iteration whose mean over seeds reaches it
    means = {it: np.mean([J["entropy", sd, it] for sd in (0, 1, 2)]) for it in range(4)}
    first = next((20 + 20 * it for it in range(4) if means[it] >= 0.57), None)
    assert s["strategies"]["entropy"]["patches_to_95pct_full"] == first
    text = mod.markdown(json.loads(json.dumps(s)), 3)  # as read back from JSON (string keys)
    assert "| entropy |" in text and "not reached" in text or str(first) in text
    mod.plot(rows, json.loads(json.dumps(s)), tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_defaults_table_and_figure(tmp_path):
    import defaults_vnc

    runs = []
    for seed in (0, 1):
        for arm, j in (("shipped", [0.9, 0.8, 0.7, 0.2, 0.6]), ("old", [0.9, 0.6, 0.6, 0.0, 0.1])):
            runs.append({"arm": arm, "seed": seed, "steps": 100, "jaccard": [v + 0.01 * seed for v in j]})
    text = defaults_vnc.table(runs, "old")
    assert "| shipped | 0,1 | 100/100 |" in text
    # paired difference of the mean foreground Jaccard: (0.8+0.7+0.2+0.6 - 0.6-0.6-0.0-0.1)/4 = 0.25, no spread
    assert "+0.250 [+0.250, +0.250]" in text
    defaults_vnc.plot(runs, tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 1000
    # every arm is a valid config on top of the four new-user keys
    from emseg.engine.config import config_from_dict

    seen = {}
    for arm, overrides in defaults_vnc.ARMS.items():
        cfg = config_from_dict(defaults_vnc.new_user_config(tmp_path, 600, overrides))
        assert cfg.max_seconds == 600 and cfg.n_classes == 5
        seen[arm] = defaults_vnc.resolved(cfg)
    # every arm trains differently once emseg's defaults are filled in (the shipped defaults are the
    # weights x Dice corner of the factorial, written out), and each name says how
    assert seen["shipped"] == seen["w16-cosine-weights-dice"]
    names = [a for a in seen if a != "w16-cosine-weights-dice"]
    assert all(seen[a] != seen[b] for i, a in enumerate(names) for b in names[i + 1:])
    for arm, r in seen.items():
        if arm != "shipped":
            assert (r["class_weights"] == "auto") == ("weights" in arm)
            assert (r["dice_weight"] > 0) == ("dice" in arm)
            assert (r["optim"]["schedule"] == "cosine") == ("cosine" in arm)
    # the screen's rule and the targets are applied in the report, not left to the reader
    assert "`shipped`: +0.250 [+0.250, +0.250] (2 pairs): replaces `old`" in text
    test_runs = [dict(r, stage="test") for r in runs]
    report = defaults_vnc.table(test_runs, None)
    assert ("`shipped`: mitochondria 0.805 missed (>= 0.85), membrane 0.705 missed (>= 0.8), synapse 0.205 missed "
            "(>= 0.3), glia 0.605 met (>= 0.6)") in report


def test_defaults_markdown_merges_seeds_run_side_by_side(tmp_path, capsys, monkeypatch):
    import defaults_vnc

    names = []
    for seed in (0, 1):
        runs = [{"arm": arm, "seed": seed, "stage": "screen", "steps": 10, "jaccard": [0.9, j, 0.5, 0.1, 0.4]}
                for arm, j in (("shipped", 0.6 + 0.1 * seed), ("old-w16", 0.5))]
        names.append(tmp_path / f"s{seed}.json")
        names[-1].write_text(json.dumps({"runs": runs, "settings": {"seconds": 600.0, "threads": 1, "stage": "screen"}}))
    out = ",".join(map(str, names))
    monkeypatch.setattr(sys, "argv", ["defaults_vnc.py", "--markdown", "--baseline", "shipped", "--out", out,
                                      "--figure", str(tmp_path / "f.png")])
    assert defaults_vnc.main() == 0
    text = capsys.readouterr().out
    # old-w16 - shipped per seed, mean foreground: (0.5 - 0.6) / 4 and (0.5 - 0.7) / 4
    assert "| shipped | 0,1 |" in text and f"`old-w16`: {_campaign.ci_cell(_campaign.paired_interval([-0.025, -0.05]))} (2 pairs)" in text
    assert (tmp_path / "f.png").stat().st_size > 1000
    monkeypatch.setattr(sys, "argv", ["defaults_vnc.py", "--markdown", "--out", f"{names[0]},{names[0]}"])
    with pytest.raises(SystemExit, match="more than one"):
        defaults_vnc.main()


def test_meta_structures_table_pairs_with_clean_labels(tmp_path):
    import meta_structures

    runs = []
    for seed, base in ((0, 0.80), (1, 0.84)):
        for run, drop, err in (("CL", 0.0, 0.0), ("RL", 0.40, 0.1)):
            runs.append({"run": run, "seed": seed, "dice_mito": base - drop - 0.01 * seed * (run == "RL"),
                         "label_agreement": 1 - err, "final_loss": 0.3, "loss_curve": [1.0, 0.5, 0.3],
                         "loss_every": 10})
    text = meta_structures.table(runs)
    # RL - CL per seed: -0.40 and -0.41
    m, lo, hi = _campaign.paired_interval([-0.40, -0.41])
    assert f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" in text and "| CL |" in text
    meta_structures.plot(runs, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 1000


def test_lazy_labels_table_pairs_lazy_with_dense_and_equal_cost_dense(tmp_path):
    import lazy_labels

    settings = {"dense_sizes": [4, 8], "lazy_counts": [40], "lazy_prio": 0.25, "lazy_cost": 0.1}
    assert lazy_labels.trainings(settings) == [(4, 0), (4, 40), (8, 0), (8, 40), (12, 0)]  # (8, 0) once
    jaccard = {(4, 0): 0.50, (4, 40): 0.55, (8, 0): 0.60, (8, 40): 0.62, (12, 0): 0.70}
    runs = [{"seed": s, "windows": w, "lazy": m, "jaccard": j + 0.01 * s, "fp": 1000 - 100 * m // 40}
            for s in (0, 1) for (w, m), j in jaccard.items()]
    doc = {"settings": settings, "runs": runs}
    text = lazy_labels.table(doc)
    assert "**4 dense windows**" in text and "**8 dense windows**" in text
    assert "+40 lazy - dense: Jaccard +0.050 [+0.050, +0.050], FP voxels -100 [-100, -100]" in text
    assert "+40 lazy - equal-cost dense: Jaccard -0.050 [-0.050, -0.050]" in text  # 4 + 40 lazy vs 8 dense
    assert "+40 lazy - equal-cost dense: Jaccard -0.080 [-0.080, -0.080]" in text  # 8 + 40 lazy vs 12 dense
    assert "| dense at equal cost (40 lazy) | 12 | 0 | 12 |" in text
    lazy_labels.plot(doc, tmp_path / "lazy.png")
    assert (tmp_path / "lazy.png").stat().st_size > 0
    # the seeds run as two campaigns (one per core) give the same tables, merged
    halves = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, seed in zip(halves, (0, 1)):
        path.write_text(json.dumps({"settings": settings, "runs": [r for r in runs if r["seed"] == seed]}))
    import subprocess
    merged = subprocess.run([sys.executable, str(RESULTS / "lazy_labels.py"), "--markdown", "--out",
                             ",".join(map(str, halves))], capture_output=True, text=True, check=True).stdout
    assert merged.strip() == text.strip() and (tmp_path / "a.png").stat().st_size > 0
    halves[1].write_text(json.dumps({"settings": settings, "runs": runs}))  # seed 0 in both: refused
    again = subprocess.run([sys.executable, str(RESULTS / "lazy_labels.py"), "--markdown", "--out",
                            ",".join(map(str, halves))], capture_output=True, text=True)
    assert again.returncode != 0 and "more than one of the campaigns" in again.stderr


def test_lazy_labels_windows_follow_the_split_and_the_raw_criterion():
    import lazy_labels

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, (20, 512, 512)).astype(np.uint8)
    raw[3, :256, :256] = 128  # a flat, monotonic region
    mito = np.zeros(raw.shape, bool)
    mito[:, 300:310, 300:310] = True
    dense = lazy_labels.dense_list(raw.shape, 32, seed=1)
    assert dense[:4] == lazy_labels.dense_list(raw.shape, 4, seed=1)  # nested
    assert all(0 <= z < 12 for z, _, _ in dense)
    lazy = lazy_labels.lazy_list(raw, mito, dense, 5, seed=1, share=0.05)
    assert lazy[:2] == lazy_labels.lazy_list(raw, mito, dense, 2, seed=1, share=0.05)
    for z, y, x in lazy:
        assert 0 <= z < 12 and not mito[z, y:y + 128, x:x + 128].any()
        assert not any(lazy_labels.overlaps((z, y, x), d) for d in dense)
    flat = [b for b in lazy if b[0] == 3 and b[1] + 128 <= 256 and b[2] + 128 <= 256]
    assert flat or any(lazy_labels.overlaps(b, d) for d in dense for b in [(3, 0, 0)])


def test_meta_structures_pcl_table_pairs_each_pcl_condition_with_each_rcl_arm_by_seed():
    import meta_structures

    dice = {("PCL-dil", 0): 0.70, ("PCL-dil", 1): 0.74, ("PCL-dil", 2): 0.69,
            ("RCL-flip", 0): 0.60, ("RCL-flip", 1): 0.66, ("RCL-flip", 2): 0.62,
            ("RCL-samp", 0): 0.80, ("RCL-samp", 1): 0.81,  # seed 2 missing: pairs only seeds 0 and 1
            ("CL", 0): 0.9}
    runs = [{"run": run, "seed": seed, "dice_mito": v} for (run, seed), v in dice.items()]
    rows = {line.split(" | ")[0].strip("| "): line for line in meta_structures.pcl_table(runs).splitlines()}
    flip = _campaign.paired_interval([0.10, 0.08, 0.07])
    samp = _campaign.paired_interval([-0.10, -0.07])
    assert rows["PCL-dil"] == f"| PCL-dil | {_campaign.ci_cell(flip)} | {_campaign.ci_cell(samp)} |"
    assert "- RCL-flip (95% CI)" in rows["PCL condition"] and "CL |" not in rows["PCL-dil"]
    assert meta_structures.pcl_table([r for r in runs if not r["run"].startswith("RCL")]) == ""


def test_meta_structures_late_gain_reads_the_curve_halfway():
    import meta_structures

    # Dice 0.2 at step 100 rising linearly to 0.8 at step 1000: half-way (500) it is 0.2 + 0.6 * 400/900
    curve = [[100, 0.2], [1000, 0.8]]
    assert meta_structures.late_gain(curve) == pytest.approx(0.8 - (0.2 + 0.6 * 400 / 900))
    assert meta_structures.late_gain([[100, 0.5], [500, 0.7], [1000, 0.7]]) == pytest.approx(0.0)


def test_meta_structures_quarter_gain_averages_the_last_two_quarters():
    import meta_structures

    steps = list(range(100, 2001, 100))
    dice = [0.01 * i for i in range(len(steps))]
    # quarters of 2,000 steps: (1000, 1500] holds 1100..1500, (1500, 2000] holds 1600..2000
    before = [d for s, d in zip(steps, dice) if 1000 < s <= 1500]
    last = [d for s, d in zip(steps, dice) if s > 1500]
    gain = meta_structures.quarter_gain([list(c) for c in zip(steps, dice)])
    assert gain == pytest.approx(np.mean(last) - np.mean(before)) and gain == pytest.approx(0.05)
    flat = [[s, 0.7 if s > 800 else 0.1] for s in steps]
    assert meta_structures.quarter_gain(flat) == pytest.approx(0.0)
    assert np.isnan(meta_structures.quarter_gain([[2, 0.1], [4, 0.2]]))  # no validation in the third quarter


def test_meta_structures_markdown_merges_campaigns_run_side_by_side(tmp_path, capsys, monkeypatch):
    import meta_structures

    names = []
    for part, seeds in (("a", (0, 1)), ("b", (2,))):
        runs = [{"run": run, "seed": s, "dice_mito": 0.8 - 0.1 * (run == "RL") - 0.01 * s * (run == "RL"),
                 "label_agreement": 1.0, "final_loss": 0.3, "loss_curve": [1.0, 0.5], "loss_every": 10,
                 "valid_curve": [[100, 0.5], [200, 0.6], [300, 0.7], [400, 0.7]]}
                for s in seeds for run in ("CL", "RL")]
        path = tmp_path / f"{part}.json"
        path.write_text(json.dumps({"split": _campaign.SPLIT, "runs": runs}))
        names.append(str(path))
    monkeypatch.setattr(sys, "argv", ["meta_structures.py", "--markdown", "--out", ",".join(names),
                                      "--figure", str(tmp_path / "both.png")])
    assert meta_structures.main() == 0
    text = capsys.readouterr().out
    m, lo, hi = _campaign.paired_interval([-0.10, -0.11, -0.12])  # RL - CL over the three seeds
    assert f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" in text
    assert "validation Dice, last quarter" in text and (tmp_path / "both.png").stat().st_size > 1000
    # campaigns of other settings, or of the same seeds, do not share a table
    other = json.loads(Path(names[1]).read_text())
    Path(names[1]).write_text(json.dumps(dict(other, settings={"steps": 5})))
    monkeypatch.setattr(sys, "argv", ["meta_structures.py", "--markdown", "--out", ",".join(names)])
    with pytest.raises(SystemExit):
        meta_structures.main()
    monkeypatch.setattr(sys, "argv", ["meta_structures.py", "--markdown", "--out", f"{names[0]},{names[0]}"])
    with pytest.raises(SystemExit):
        meta_structures.main()


def test_igtt_table_pairs_with_otsu_and_ems(tmp_path):
    import igtt

    runs = [{"target": "membrane", "method": "otsu", "seed": 0, "dice": 0.50, "auc": 0.9, "fg_fraction": 0.36,
             "truth_fg": {"membrane": 0.14}}]
    for seed, (d_ems, d_no) in enumerate([(0.60, 0.52), (0.58, 0.55), (0.62, 0.53)]):
        for method, d in (("igtt", d_ems), ("igtt-noems", d_no)):
            runs.append({"target": "membrane", "method": method, "seed": seed, "dice": d, "auc": 0.9,
                         "fg_fraction": 0.3, "truth_fg": {"membrane": 0.14}, "oracle_dice": 0.7, "prior_dice": 0.65,
                         "epochs": [{"epoch": 1, "dice": d - 0.1, "mask_iou_prev": None},
                                    {"epoch": 2, "dice": d, "mask_iou_prev": 0.9}]})
    text = igtt.table(runs)
    assert _campaign.ci_cell(_campaign.paired_interval([0.10, 0.08, 0.12])) in text  # iGTT - Otsu
    assert "EMS - no EMS (paired by seed): " + _campaign.ci_cell(_campaign.paired_interval([0.08, 0.03, 0.09])) in text
    igtt.plot(runs, tmp_path / "i.png")
    assert (tmp_path / "i.png").stat().st_size > 1000


def test_igtt_threshold_diagnostics_against_brute_force():
    from sklearn.metrics import f1_score

    import igtt_vnc

    rng = np.random.default_rng(0)
    truth = (rng.random((2, 30, 30)) < 0.2).astype(np.int64)
    prob = np.clip(0.3 * truth + rng.random(truth.shape) * 0.8, 0, 1).astype(np.float32)
    d = igtt_vnc.threshold_diagnostics(prob, truth, 7)
    thresholds = np.linspace(prob.min(), prob.max(), 7)
    best = max(f1_score(truth.ravel(), m.ravel()) for t in thresholds for m in (prob >= t, prob < t))
    assert d["oracle_dice"] == pytest.approx(best)
    k = int(truth.sum())  # the top-k voxels by probability (no ties in random floats)
    top = np.zeros(truth.size, bool)
    top[np.argsort(prob.ravel())[::-1][:k]] = True
    assert d["prior_dice"] == pytest.approx(f1_score(truth.ravel(), top), abs=2e-3)


def test_al_budget_table_lists_every_fine_tuning_budget(tmp_path):
    import al_budget

    runs = [{"kind": "finetune", "seed": s, "steps": st, "initial": 0.30, "jaccard": 0.30 + st / 1000 + s / 100}
            for s in (0, 1) for st in (50, 200)]
    runs += [{"kind": "full", "seed": s, "curve": [[800, 0.4 + s / 10], [1600, 0.5 + s / 10]]} for s in (0, 1)]
    text = al_budget.table(runs, [50, 200])
    assert "| 200 | 0.505 +- 0.007 | 0.205 +- 0.007 |" in text
    assert "| test Jaccard | 0.450 +- 0.071 | 0.550 +- 0.071 |" in text
    al_budget.plot(runs, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- questions.py
def _ask_rows():
    """Two seeds; the dense arms at 2 + 2 x it patches of cost 10, a question arm that spends less."""
    rows = []
    for seed, base in ((0, 0.30), (1, 0.40)):
        for it in range(3):
            rows.append({"strategy": "entropy", "seed": seed, "iteration": it, "n_labelled": 2 + 2 * it,
                         "cost_s": 20.0 + 20 * it, "mean_fg_jaccard": base + 0.1 * it, "fp_rate": 0.2 - 0.05 * it})
        for it, (cost, j, fp) in enumerate(((20.0, base, 0.2), (30.0, base + 0.2, 0.1), (50.0, base + 0.3, 0.04))):
            rows.append({"strategy": "dense+presence", "seed": seed, "iteration": it, "n_labelled": 9,
                         "cost_s": cost, "mean_fg_jaccard": j, "fp_rate": fp})
    return rows


def test_questions_summary_matches_costs_pairs_by_seed_and_finds_the_cost_to_reach(tmp_path):
    import questions as mod

    full = [{"seed": 0, "mean_fg_jaccard": 0.6}, {"seed": 1, "mean_fg_jaccard": 0.6}]
    s = mod.summary(_ask_rows(), full, initial=2, per_round=2, iterations=2, dense_cost=10.0)
    assert s["grid_cost_s"] == [20.0, 40.0, 60.0]
    arm = s["arms"]["dense+presence"]
    # the arm at cost 40: between (30, b+0.2) and (50, b+0.3) -> b+0.25; at 60: held at its last value b+0.3
    assert arm["jaccard"][1] == pytest.approx([0.55, 0.65]) and arm["jaccard"][2] == pytest.approx([0.6, 0.7])
    assert arm["fp_rate"][1] == pytest.approx([0.07, 0.07]) and arm["fp_rate"][2] == pytest.approx([0.04, 0.04])
    # arm - entropy: per seed the mean over grid points 1, 2 of (b+.25 - (b+.1), b+.3 - (b+.2)) = 0.125 each
    assert arm["diff_j_vs_ref"][0] == pytest.approx(0.125) and arm["diff_j_last_vs_ref"][0] == pytest.approx(0.1)
    assert arm["diff_fp_vs_ref"][0] == pytest.approx(np.mean([0.07 - 0.15, 0.04 - 0.10]))
    assert arm["fp_ratio_last_vs_ref"] == pytest.approx(0.4) and arm["n_pairs"] == 2
    # 95% of 0.6 = 0.57: entropy seed 0 (0.3, 0.4, 0.5) never; seed 1 (0.4, 0.5, 0.6) at 40 + 0.7 x 20 = 54
    assert s["arms"]["entropy"]["cost_to_95pct_full_s"] == [None, pytest.approx(54.0)]
    # the arm: seed 0 (0.3, 0.5, 0.6) at 30 + 0.7 x 20 = 44; seed 1 (0.4, 0.6) at 20 + 0.85 x 10 = 28.5
    assert arm["cost_to_95pct_full_s"] == [pytest.approx(44.0), pytest.approx(28.5)]
    assert arm["cost_ratio_ref_over_arm"] is None  # entropy did not reach it on every seed
    assert arm["mean_round_cost_s"] == pytest.approx(15.0)
    text = mod.markdown(json.loads(json.dumps(s)))
    assert "| dense+presence | 0.350 +- 0.071 | 0.600 +- 0.071 | 0.650 +- 0.071 |" in text
    assert "+0.125 [+0.125, +0.125]" in text and "| 0.40 |" in text and "not reached (1/2 seeds)" in text
    mod.plot(json.loads(json.dumps(s)), tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 1000


def test_questions_campaign_runs_resumes_and_prints_its_table(tmp_path, monkeypatch, capsys):
    """End to end on a tiny synthetic stand-in for the VNC stack (20 sections of 128 x 128)."""
    from conftest import synthetic, write_h5
    import questions as mod

    vol = synthetic((20, 128, 128), 3)
    write_h5(tmp_path / "vnc_stack1.h5", raw=vol.raw, label=vol.label)
    monkeypatch.setenv("EMSEG_DATA", str(tmp_path))
    out = tmp_path / "ask"
    argv = ["questions.py", "--out", str(out), "--seeds", "0,1", "--iterations", "1", "--initial", "2",
            "--per-iteration", "2", "--budget-patches", "2", "--steps-initial", "2", "--steps-finetune", "1",
            "--candidates", "8", "--depth", "2", "--base-width", "4", "--batch-size", "2",
            "--question-arms", "dense+presence,dense+partial+presence"]
    monkeypatch.setattr(sys, "argv", argv)
    assert mod.main() == 0
    first = capsys.readouterr().out
    assert "[16/16]" in first and "| dense+partial+presence |" in first
    doc = json.loads((out / "results.json").read_text())
    assert sorted((r["kind"], r["seed"]) for r in doc["runs"]) == [("full", 0), ("full", 1)]
    assert set(doc["summary"]["arms"]) == {"random", "entropy", "dense+presence", "dense+partial+presence"}
    assert doc["summary"]["grid_cost_s"] == pytest.approx([2 * 163.84, 4 * 163.84])
    assert (out / "results.png").stat().st_size > 1000
    # resumed: nothing is recomputed, the stored runs are kept
    assert mod.main() == 0
    again = capsys.readouterr().out
    assert "[" not in again.split("Test Jaccard")[0]
    assert json.loads((out / "results.json").read_text())["runs"] == doc["runs"]
    monkeypatch.setattr(sys, "argv", ["questions.py", "--out", str(out), "--markdown"])
    assert mod.main() == 0
    assert capsys.readouterr().out.strip() == mod.markdown(doc["summary"]).strip()
    # other settings into the same folder are refused
    monkeypatch.setattr(sys, "argv", argv + ["--costs", "presence=2"])
    with pytest.raises(Exception, match="budget|other settings"):
        mod.main()


# ----------------------------------------------------------------------------- label_efficiency.py
def test_label_efficiency_quick_runs_resumes_and_draws(tmp_path, monkeypatch, capsys):
    """--quick end to end on a synthetic stand-in for VNC stack 1 (no stack 2: pretraining reads
    stack-1 sections 0-14 only), then the pretext stage; a rerun recomputes nothing."""
    from conftest import synthetic, write_h5
    import label_efficiency as mod

    vol = synthetic((20, 128, 128), 3)
    write_h5(tmp_path / "vnc_stack1.h5", raw=vol.raw, label=vol.label)
    monkeypatch.setenv("EMSEG_DATA", str(tmp_path))
    out = tmp_path / "le.json"
    assert mod.main(["--quick", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    keys = sorted((r["kind"], str(r.get("budget")), r.get("arm", "")) for r in doc["runs"])
    assert keys == [("pretrain", "None", ""), ("train", "2", "pretrained"), ("train", "2", "scratch"),
                    ("train", "all", "pretrained"), ("train", "all", "scratch")]
    assert (tmp_path / "le.png").stat().st_size > 1000
    for run in (r for r in doc["runs"] if r["kind"] == "train"):  # the plateau can be read from each run
        steps = [step for step, _ in run["valid_curve"]]
        assert steps == sorted(steps) and steps[-1] == run["steps"]
        assert max(score for _, score in run["valid_curve"]) == pytest.approx(run["valid_best"], rel=1e-5)
    pre = next(r for r in doc["runs"] if r["kind"] == "pretrain")
    import torch
    state = torch.load(pre["checkpoint"], weights_only=True)
    assert state["task"] == "pretrain" and state["config"]["train"][0]["region"] == [[0, 15]]
    capsys.readouterr()
    assert mod.main(["--quick", "--out", str(out)]) == 0  # resumed: the stored runs are kept as they are
    assert json.loads(out.read_text())["runs"] == doc["runs"]
    assert "| mito | 2 |" in capsys.readouterr().out
    # continued on a machine without its checkpoints: the pretraining is made again, to the same weights,
    # and a pretrained run computed now equals the one computed from the original weights
    import shutil
    folder = Path(pre["checkpoint"]).parent
    first = next(r for r in doc["runs"] if r.get("arm") == "pretrained" and r["budget"] == 2)

    def rerun_without_the_pretrained_run(pretrain_row):
        runs = [dict(pretrain_row) if r["kind"] == "pretrain" else r for r in doc["runs"] if r is not first]
        out.write_text(json.dumps(dict(doc, runs=runs)))
        return mod.main(["--quick", "--out", str(out)])

    shutil.rmtree(folder)
    assert mod.main(["--quick", "--out", str(out)]) == 0  # every pretrained run stored: no weights needed
    assert not folder.exists()
    assert rerun_without_the_pretrained_run(pre) == 0
    again = next(r for r in json.loads(out.read_text())["runs"] if r.get("arm") == "pretrained" and r["budget"] == 2)
    assert again["valid_curve"] == first["valid_curve"] and again["test_score"] == first["test_score"]
    assert "made again" in capsys.readouterr().out
    assert pre["weights_sha256"] == mod.weights_digest(folder / "last.pt")  # made again: the same weights
    # weights that differ from the recorded ones are refused rather than mixed with the stored runs,
    # whether they are there or made again (and then not left in place)
    with pytest.raises(SystemExit, match="does not hold the weights"):
        rerun_without_the_pretrained_run(dict(pre, weights_sha256="0" * 64))
    shutil.rmtree(folder)
    with pytest.raises(SystemExit, match="would mix two networks"):
        rerun_without_the_pretrained_run(dict(pre, weights_sha256="0" * 64))
    assert not folder.exists() and not folder.with_name(folder.name + ".remake").exists()
    # a row that recorded only its final loss (older campaigns) is checked by it
    older = {k: v for k, v in pre.items() if k != "weights_sha256"}
    with pytest.raises(SystemExit, match="pretrain_loss"):
        rerun_without_the_pretrained_run(dict(older, pretrain_loss=older["pretrain_loss"] + 1.0))
    assert rerun_without_the_pretrained_run(older) == 0 and (folder / "last.pt").exists()
    assert mod.main(["--quick", "--stage", "pretext", "--out", str(tmp_path / "pt.json")]) == 0
    runs = json.loads((tmp_path / "pt.json").read_text())["runs"]
    assert sorted(r["pretext"] for r in runs) == ["contrastive", "denoise", "masked", "none"]
    assert all("test_score" not in r for r in runs)  # the pretext stage never scores the test sections


def test_label_efficiency_validation_only_runs_pair_with_the_stage_by_steps(tmp_path, monkeypatch, capsys):
    """--validation-only never reads the test sections; --markdown over it and a run of the stage
    with fewer steps pairs the best validation scores by task, seed, budget and arm."""
    from conftest import synthetic, write_h5
    import label_efficiency as mod

    vol = synthetic((20, 128, 128), 3)
    write_h5(tmp_path / "vnc_stack1.h5", raw=vol.raw, label=vol.label)
    monkeypatch.setenv("EMSEG_DATA", str(tmp_path))
    tests_read = []
    real = mod.train_run
    monkeypatch.setattr(mod, "train_run", lambda *a, **k: tests_read.append(a[3] is not None) or real(*a, **k))
    short, long = tmp_path / "short.json", tmp_path / "long.json"
    assert mod.parse_args(["--quick", "--steps", "4", "--out", "x.json"]).steps == 4  # options given with --quick win
    assert mod.main(["--quick", "--budgets", "2", "--out", str(short)]) == 0
    assert mod.main(["--quick", "--budgets", "2", "--steps", "4", "--validation-only", "--out", str(long)]) == 0
    assert tests_read == [True, True, False, False]
    doc = json.loads(long.read_text())
    assert doc["settings"]["validation_only"] is True and "validation_only" not in json.loads(short.read_text())["settings"]
    rows = [r for r in doc["runs"] if r["kind"] == "train"]
    assert len(rows) == 2 and all(r["steps"] == 4 and "test_score" not in r for r in rows)
    assert (tmp_path / "long.png").stat().st_size > 1000
    capsys.readouterr()
    assert mod.main(["--markdown", "--out", f"{short},{long}", "--figure", str(tmp_path / "both.png")]) == 0
    text = capsys.readouterr().out
    by = {(r["arm"], r["steps"]): r["valid_best"] for f in (short, long)
          for r in json.loads(f.read_text())["runs"] if r["kind"] == "train"}
    for arm in ("scratch", "pretrained"):
        row = next(line for line in text.splitlines() if line.startswith(f"| mito | 2 | {arm} |"))
        assert f"{by[arm, 2]:.3f} | {by[arm, 4]:.3f} | {by[arm, 4] - by[arm, 2]:+.3f}" in row
    assert "| 4 - 2 steps (paired, 95% CI) |" in text
    assert (tmp_path / "both.png").stat().st_size > 1000  # the runs by length (the test plot has its own command)
    with pytest.raises(SystemExit):
        mod.parse_args(["--stage", "active", "--validation-only", "--out", "x.json"])


def test_label_efficiency_patches_are_nested_and_inside_the_pool():
    import label_efficiency as mod

    raw = np.arange(12 * 64 * 64, dtype=np.int64).reshape(12, 64, 64)
    small = mod.patch_cubes(raw, raw, 2, 16, 0, 2)
    large = mod.patch_cubes(raw, raw, 8, 16, 0, 2)
    assert len(large) == 8 and all(np.array_equal(a.raw, b.raw) for a, b in zip(small, large))
    assert all(c.raw.shape == (1, 16, 16) and c.info[0].all() for c in large)
    assert len({c.raw.tobytes() for c in large}) == 8
    assert mod.patch_cubes(raw, raw, None, 16, 0, 2)[0].raw.shape == (12, 64, 64)


def test_a_resumed_campaign_appends_its_provenance_and_keeps_each_runs(tmp_path, monkeypatch):
    from _campaign import SPLIT, Campaign

    out = tmp_path / "c.json"
    monkeypatch.setattr(sys, "argv", ["first.py", "--seeds", "0"])
    monkeypatch.setenv("EMSEG_COMMIT", "aaaaaaa")
    first = Campaign(out, {"steps": 3})
    first.run({"seed": 0}, lambda: {"score": 0.5})
    monkeypatch.setattr(sys, "argv", ["first.py", "--seeds", "0,1"])
    monkeypatch.setenv("EMSEG_COMMIT", "bbbbbbb")
    second = Campaign(out, {"steps": 3})
    assert second.run({"seed": 0}, lambda: {"score": -1.0})["score"] == 0.5  # stored, not rerun
    second.run({"seed": 1}, lambda: {"score": 0.7})
    doc = json.loads(out.read_text())
    assert [s["commit"] for s in doc["starts"]] == ["aaaaaaa", "bbbbbbb"]
    assert [s["command"] for s in doc["starts"]] == ["python first.py --seeds 0", "python first.py --seeds 0,1"]
    assert [(r["seed"], r["start"]) for r in doc["runs"]] == [(0, 0), (1, 1)]
    assert doc["command"] == "python first.py --seeds 0" and doc["split"] == SPLIT


# ----------------------------------------------------------------------------- instances.py
def test_instances_quick_runs_resumes_and_chooses_on_validation(tmp_path, monkeypatch, capsys):
    """--quick end to end on a synthetic stand-in for VNC stack 1: three networks, six arms, each
    arm's configuration the best of its validation grid (recomputed here), test scored once; a
    rerun recomputes nothing."""
    from conftest import synthetic, write_h5
    import instances as mod

    vol = synthetic((20, 128, 128), 3)
    write_h5(tmp_path / "vnc_stack1.h5", raw=vol.raw, label=vol.label)
    monkeypatch.setenv("EMSEG_DATA", str(tmp_path))
    out = tmp_path / "inst.json"
    assert mod.main(["--quick", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    nets = sorted(r["network"] for r in doc["runs"] if r["kind"] == "train")
    assert nets == ["cells-targets", "mito-targets", "semantic"]
    arms = sorted((r["task"], r["arm"]) for r in doc["runs"] if r["kind"] == "objects")
    assert arms == sorted((t, a) for t in ("cells", "mito") for a in ("cc", "ws-semantic", "ws-targets"))
    assert (tmp_path / "inst.png").stat().st_size > 1000
    args = mod.parse_args(["--quick", "--out", str(out)])
    _, labels = mod.load(mod.VALID, args.crop)
    for row in (r for r in doc["runs"] if r["kind"] == "objects" and r["arm"] != "cc"):
        folder = tmp_path / "inst" / f"{mod.arm_network(row['task'], row['arm'])}_seed0"
        probs = np.load(folder / "probs_valid.npy")
        gt = mod.objects(labels, row["task"])
        values = [mod.criterion(row["task"], mod.scores(mod.segment(probs, p), gt))
                  for p in mod.candidates(row["task"], row["arm"])]
        assert row["tried"] == len(values) and max(values) == pytest.approx(row["valid_value"])
        assert row["params"] in mod.candidates(row["task"], row["arm"])
    capsys.readouterr()
    assert mod.main(["--quick", "--out", str(out)]) == 0  # resumed: the stored runs are kept as they are
    assert json.loads(out.read_text())["runs"] == doc["runs"]
    assert "| ws-semantic |" in capsys.readouterr().out
    # killed after training, before the rows were stored: the trained networks are taken up again
    # from their last.pt (not refused as a folder that already holds a run) and score the same
    out.unlink()
    assert mod.main(["--quick", "--out", str(out)]) == 0
    again = json.loads(out.read_text())["runs"]
    assert [r["valid_best"] for r in again if r["kind"] == "train"] == \
        [r["valid_best"] for r in doc["runs"] if r["kind"] == "train"]
    assert [r["test"] for r in again if r["kind"] == "objects"] == [r["test"] for r in doc["runs"] if r["kind"] == "objects"]
    # campaigns of other settings, or the same seed twice, do not share a table
    with pytest.raises(SystemExit, match="more than one"):
        mod.main(["--markdown", "--out", f"{out},{out}"])
    other = json.loads(out.read_text())
    other["settings"]["steps"] += 1
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="other settings"):
        mod.main(["--markdown", "--out", f"{out},{tmp_path / 'other.json'}"])


def test_instances_ground_truth_objects_are_scikit_image_components_per_section():
    from skimage.measure import label
    import instances as mod

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (3, 40, 50))
    labels[:, 10:20, 10:30] = 1
    for task, mask in (("mito", labels == 1), ("cells", ~np.isin(labels, (2, 3, 4)))):
        ids = mod.objects(labels, task)
        for z in range(3):
            expected = label(mask[z], connectivity=1)
            pairs = np.unique(np.stack([ids[z].ravel(), expected.ravel()]), axis=1)
            assert np.array_equal(ids[z] == 0, expected == 0)
            assert len(pairs[0]) == len(np.unique(pairs[0])) == len(np.unique(pairs[1]))


def test_instances_cells_baseline_fills_its_boundary_voxels_so_thick_boundaries_do_not_merge_cells():
    # Cells separated by 1-px membrane lines; the "prediction" draws the same membranes 3 px thick.
    # Components alone leave the thick lines at 0, one label across every cell (a merge); filled
    # with the nearest component, every true cell is one object again.
    from scipy import ndimage
    import instances as mod

    labels = np.zeros((2, 60, 60), np.int64)
    labels[:, ::15, :] = 2
    labels[:, :, ::15] = 2
    thick = ndimage.binary_dilation(labels == 2, structure=np.ones((1, 3, 3)))
    probs = np.stack([(~thick).astype(np.float32)] + [np.zeros(thick.shape, np.float32)]
                     + [thick.astype(np.float32)] + [np.zeros(thick.shape, np.float32)] * 2)
    gt = mod.objects(labels, "cells")
    plain, filled = (dict(mode="components", classes=[0, 1], min_size=0, **extra) for extra in ({}, {"fill": True}))
    assert mod.scores(mod.segment(probs, plain), gt)["adapted_rand_error"] > 0.05
    ids = mod.segment(probs, filled)
    assert (ids > 0).all()
    assert mod.scores(ids, gt)["adapted_rand_error"] == pytest.approx(0.0, abs=1e-9)
    assert filled in mod.candidates("cells", "cc") and all("fill" not in c for c in mod.candidates("mito", "cc"))


def test_label_efficiency_active_stage_quick(tmp_path, monkeypatch, capsys):
    """--stage active --quick end to end: the seed's pretraining, the whole-pool reference and the
    loops (entropy and random from the pretrained network in one, entropy from scratch), every round
    scored on the test sections."""
    from conftest import synthetic, write_h5
    import label_efficiency as mod

    vol = synthetic((20, 128, 128), 3)
    write_h5(tmp_path / "vnc_stack1.h5", raw=vol.raw, label=vol.label)
    monkeypatch.setenv("EMSEG_DATA", str(tmp_path))
    out = tmp_path / "al.json"
    assert mod.main(["--quick", "--stage", "active", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert sorted(r["kind"] for r in doc["runs"]) == ["active", "active", "pretrain", "reference"]
    assert doc["settings"]["al_per_iteration"] == 2 and doc["settings"]["stage"] == "active"
    ref = next(r for r in doc["runs"] if r["kind"] == "reference")
    assert ref["steps"] == 3 and [s for s, _ in ref["valid_curve"]] == [1, 2, 3]
    curves = mod.active_curves(doc["runs"], "mito")
    assert set(curves) == set(mod.AL_ARMS) == {("pretrained", "entropy"), ("pretrained", "random"),
                                               ("scratch", "entropy")}
    for per_seed in curves.values():
        assert per_seed[0]["n_labelled"] == [2, 4] and all(0 <= j <= 1 for j in per_seed[0]["test_scores"])
    # entropy and random share the pretrained loop's first network: the same round-0 score
    assert curves["pretrained", "entropy"][0]["test_scores"][0] == curves["pretrained", "random"][0]["test_scores"][0]
    folder = out.with_suffix("")
    cfg = json.loads((folder / "active_mito_pretrained_seed0" / "config.json").read_text())
    assert cfg["init"].endswith("last.pt") and cfg["pool"]["region"] == [[0, 12]]
    assert cfg["test"]["region"] == [[15, 20], [32, 96], [32, 96]]  # the central 64^2, as the reference's test
    assert json.loads((folder / "active_mito_scratch_seed0" / "config.json").read_text()).get("init") is None
    assert "whole-pool reference" in capsys.readouterr().out
    assert out.with_suffix(".png").stat().st_size > 1000


def test_label_efficiency_finetune_stage_quick(tmp_path, monkeypatch, capsys):
    """--stage finetune --quick end to end: one pretraining, a fine-tuning per encoder scale and a
    scratch run (at the full rate), all on the validation sections; a rerun recomputes nothing."""
    from conftest import synthetic, write_h5
    import label_efficiency as mod

    vol = synthetic((20, 128, 128), 3)
    write_h5(tmp_path / "vnc_stack1.h5", raw=vol.raw, label=vol.label)
    monkeypatch.setenv("EMSEG_DATA", str(tmp_path))
    out = tmp_path / "ft.json"
    seen = []
    real = mod.train_run
    monkeypatch.setattr(mod, "train_run", lambda *a, **k: seen.append((a[4], k.get("encoder_lr_scale", 1.0)))
                        or real(*a, **k))
    assert mod.main(["--quick", "--stage", "finetune", "--encoder-lr-scales", "0.5,0,1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["settings"]["encoder_lr_scales"] == "0.5,0,1"
    rows = [r for r in doc["runs"] if r["kind"] == "finetune"]
    assert [r["encoder_lr_scale"] for r in rows] == [0.5, 0.0, 1.0, None]
    assert all("test_score" not in r and 0 <= r["valid_best"] <= 1 for r in rows)
    assert seen == [(2, 0.5), (2, 0.0), (2, 1.0), (2, 1.0)]  # validation only; scratch at the full rate
    assert sum(r["kind"] == "pretrain" for r in doc["runs"]) == 1
    text = capsys.readouterr().out
    assert "| scratch |" in text and "| pretrained, encoder x 0.5 |" in text
    assert out.with_suffix(".png").stat().st_size > 1000
    assert mod.main(["--quick", "--stage", "finetune", "--encoder-lr-scales", "0.5,0,1", "--out", str(out)]) == 0
    assert len(seen) == 4  # resumed: nothing recomputed


def test_label_efficiency_finetune_table_pairs_with_the_full_rate():
    import label_efficiency as mod

    runs = [{"kind": "finetune", "seed": s, "encoder_lr_scale": scale, "valid_best": v + 0.01 * s}
            for s in (0, 1, 2) for scale, v in ((1.0, 0.5), (0.1, 0.6), (None, 0.3))]
    runs[4]["valid_best"] += 0.03  # seed 1, scale 0.1: the differences 0.10, 0.13, 0.10
    text = mod.table(runs)
    m, lo, hi = _campaign.paired_interval([0.10, 0.13, 0.10])
    assert "| pretrained, encoder x 0.1 | " in text and f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" in text
    assert "| scratch | 0.310 +- 0.010 | 0.300 / 0.310 / 0.320 |" in text


def test_label_efficiency_active_table_counts_patches_to_the_bar():
    """Patches to 95% of each seed's reference and the geometric mean of scratch-entropy's over the arm's,
    against values worked out by hand."""
    import label_efficiency as mod

    n = [8, 18, 28, 38, 48]
    runs = [{"kind": "reference", "task": "mito", "seed": 0, "test_score": 0.8},   # bar 0.76
            {"kind": "reference", "task": "mito", "seed": 1, "test_score": 0.6},   # bar 0.57
            {"kind": "reference", "task": "mito", "seed": 2, "test_score": 0.6}]

    def loop(network, seed, **scores):
        return {"kind": "active", "task": "mito", "seed": seed, "network": network,
                "strategies": {k: {"n_labelled": n, "test_scores": v} for k, v in scores.items()}}

    runs += [loop("pretrained", 0, entropy=[0.5, 0.78, 0.8, 0.8, 0.8], random=[0.5, 0.6, 0.7, 0.7, 0.7]),
             loop("pretrained", 1, entropy=[0.59, 0.6, 0.6, 0.6, 0.6], random=[0.5, 0.58, 0.7, 0.7, 0.7]),
             loop("pretrained", 2, entropy=[0.1, 0.2, 0.3, 0.58, 0.6], random=[0.1, 0.1, 0.1, 0.1, 0.1]),
             loop("scratch", 0, entropy=[0.1, 0.3, 0.5, 0.7, 0.77]),     # 48
             loop("scratch", 1, entropy=[0.1, 0.3, 0.56, 0.58, 0.6]),    # 38
             loop("scratch", 2, entropy=[0.1, 0.1, 0.1, 0.1, 0.1])]      # never
    assert mod.reach(n, [0.5, 0.78, 0.8, 0.8, 0.8], 0.8) == 18
    assert mod.reach(n, [0.1] * 5, 0.8) is None
    text = mod.active_table(runs, 768)
    entropy = next(line for line in text.splitlines() if line.startswith("| pretrained, entropy | 18 / 8 / 38 |"))
    both = np.log([48 / 18, 38 / 8])  # seeds 0 and 1; seed 2: only the arm reaches it, ratio > 48 / 38
    assert f"{np.exp(both.mean()):.2f}x" in entropy and "(2 seeds)" in entropy
    assert f"only the arm reaches it on seed 2 (ratio > {48 / 38:.2f})" in entropy
    assert f"{np.mean([18, 8, 38]) / 768:.3f} (3 of 3)" in entropy
    random_row = next(line for line in text.splitlines() if line.startswith("| pretrained, random | > 48 / 18 / > 48 |"))
    assert f"{38 / 18:.2f}x (1 seed)" in random_row and "(1 of 3)" in random_row
    assert "only the baseline reaches it on seed 0" in random_row
    assert "| n=8 | n=18 |" in text and "| scratch, entropy | 48 / 38 / > 48 |" in text


def test_stored_label_efficiency_campaigns_resume_with_the_current_script():
    """Each stored campaign's recorded command, parsed by the script as it is now, gives the settings
    it recorded: rerunning it continues the campaign instead of being refused."""
    import label_efficiency as mod

    stored = sorted((RESULTS / "label_efficiency").glob("*.json"))
    stored += sorted((RESULTS / "pretext").glob("*.json")) + sorted((RESULTS / "finetune").glob("*.json"))
    assert stored
    for path in stored:
        doc = json.loads(path.read_text())
        argv = (doc.get("starts") or [doc])[-1]["command"].split()[2:]  # older campaigns: "command" only
        assert mod.settings(mod.parse_args(argv)) == doc["settings"], path


def test_reproduce_names_real_scripts_and_its_thread_table_real_experiments():
    import reproduce

    names = [name for name, *_ in reproduce.EXPERIMENTS]
    assert len(set(names)) == len(names)
    assert set(reproduce.THREADS) <= set(names)  # a key that names no experiment would never apply
    for _, script, full, quick in reproduce.EXPERIMENTS:
        assert (reproduce.HERE / script).is_file() and "--out" in full and "--out" in quick


def test_label_efficiency_two_lengths_keep_per_seed_the_run_better_on_validation(tmp_path, capsys):
    """Main-stage JSONs of two fine-tuning lengths: the table lists each length alone and, per task,
    budget, arm and seed, the run with the higher best validation score (ties: the shorter); its
    test score is what the arm scores, paired with the other arm's choice of the same seed."""
    import label_efficiency as mod

    rng = np.random.default_rng(3)
    files = []
    for steps in (600, 1500):
        runs = [{"kind": "train", "task": "mito", "seed": seed, "budget": 8, "arm": arm, "steps": steps,
                 "valid_best": float(rng.uniform()), "test_score": float(rng.uniform())}
                for seed in range(5) for arm in mod.ARMS]
        files.append(tmp_path / f"len{steps}.json")
        files[-1].write_text(json.dumps({"runs": runs}))
    every = [r for f in files for r in json.loads(f.read_text())["runs"]]
    tie = next(r for r in every if r["steps"] == 1500 and r["seed"] == 4 and r["arm"] == "scratch")
    tie["valid_best"] = next(r for r in every if r["steps"] == 600 and r["seed"] == 4
                             and r["arm"] == "scratch")["valid_best"]
    files[1].write_text(json.dumps({"runs": [r for r in every if r["steps"] == 1500]}))
    # the choice computed another way: sort each seed's two runs by validation, then by fewer steps
    expect = {}
    for arm in mod.ARMS:
        for seed in range(5):
            two = [r for r in every if r["arm"] == arm and r["seed"] == seed]
            expect[arm, seed] = sorted(two, key=lambda r: (-r["valid_best"], r["steps"]))[0]
    assert expect["scratch", 4]["steps"] == 600
    assert mod.main(["--markdown", "--out", ",".join(map(str, files)), "--figure", str(tmp_path / "f.png")]) == 0
    text = capsys.readouterr().out
    diff = [expect["pretrained", s]["test_score"] - expect["scratch", s]["test_score"] for s in range(5)]
    row = next(line for line in text.splitlines() if line.startswith("| mito | 8 | chosen on validation |"))
    assert f"{np.mean(diff):+.3f}" in row
    scratch = [expect["scratch", s]["test_score"] for s in range(5)]
    assert f"{np.mean(scratch):.3f}" in row.split("|")[4]
    for n in (600, 1500):  # each length alone
        mine = {(r["arm"], r["seed"]): r["test_score"] for r in every if r["steps"] == n}
        line = next(line for line in text.splitlines() if line.startswith(f"| mito | 8 | {n} |"))
        assert f"{np.mean([mine['pretrained', s] - mine['scratch', s] for s in range(5)]):+.3f}" in line
    chosen = next(line for line in text.splitlines() if line.startswith("| mito | 8 | scratch | seed 0"))
    assert chosen.endswith(", ".join(f"seed {s}: {expect['scratch', s]['steps']}" for s in range(5)) + " |")
    # a seed that ran one length only had no choice: it is left out of the chosen runs, not counted
    partial = [r for r in every if not (r["seed"] == 2 and r["arm"] == "scratch" and r["steps"] == 1500)]
    kept = mod.selected_runs(partial)
    assert {(r["arm"], r["seed"]) for r in kept} == {(a, s) for a in mod.ARMS for s in range(5)} - {("scratch", 2)}
    assert all(r is expect[r["arm"], r["seed"]] or r == expect[r["arm"], r["seed"]] for r in kept)
    with pytest.raises(SystemExit, match="a fine-tuning length stored twice"):
        mod.selected_runs(every + [dict(every[0])])
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_label_efficiency_pretext_grid_split_over_campaigns_counts_each_seed_once(tmp_path, capsys):
    """A seed's pretraining-length grid run as two campaigns (one per core), each with the seed's
    scratch run: the table counts that scratch once, pairs every arm with scratch and with the
    shortest pretraining of its kind by seed (a t-interval computed with scipy), and refuses two
    copies of one run that disagree."""
    from scipy import stats

    import label_efficiency as mod

    rng = np.random.default_rng(5)
    score = {(arm, seed): float(rng.uniform()) for arm in (0, 675, 2900, 6400) for seed in range(5)}

    def row(arm, seed):
        if arm == 0:
            return {"kind": "pretext", "pretext": "none", "minutes": 0, "steps": 600, "seed": seed,
                    "valid_best": score[arm, seed]}
        return {"kind": "pretext", "pretext": "masked", "steps": arm, "seed": seed, "valid_best": score[arm, seed]}

    whole = [row(a, s) for s in range(4) for a in (0, 675, 2900, 6400)]
    halves = ([row(a, 4) for a in (0, 675, 2900)], [row(a, 4) for a in (0, 6400)])
    files = []
    for name, runs in (("a", whole), ("b", halves[0]), ("c", halves[1])):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps({"runs": runs}))
    out = ",".join(map(str, files))
    assert mod.main(["--markdown", "--out", out, "--figure", str(tmp_path / "f.png")]) == 0
    lines = capsys.readouterr().out.splitlines()

    def interval(d):
        d = np.asarray(d)
        lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
        return f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]"

    scratch = next(line for line in lines if line.startswith("| scratch |"))
    assert f"{np.mean([score[0, s] for s in range(5)]):.3f} +- {np.std([score[0, s] for s in range(5)], ddof=1):.3f}" \
        in scratch
    for arm in (675, 2900, 6400):
        cells = next(line for line in lines if line.startswith(f"| masked, {arm} steps |")).split("|")
        assert cells[3].strip() == " / ".join(f"{score[arm, s]:.3f}" for s in range(5))
        assert cells[4].strip() == interval([score[arm, s] - score[0, s] for s in range(5)])
        assert cells[5].strip() == ("-" if arm == 675 else interval([score[arm, s] - score[675, s] for s in range(5)]))
    assert (tmp_path / "f.png").stat().st_size > 1000
    files[2].write_text(json.dumps({"runs": [dict(halves[1][0], valid_best=score[0, 4] + 0.1), halves[1][1]]}))
    with pytest.raises(SystemExit, match="seed 4: stored twice with other scores"):
        mod.main(["--markdown", "--out", out, "--figure", str(tmp_path / "f.png")])


def test_label_efficiency_campaigns_share_a_pretraining_root(tmp_path, monkeypatch):
    """Two main-stage campaigns of one seed (other fine-tuning lengths) with one --pretrain-root: the
    second uses the first's finished pretraining as it is (no step run, marked reused) and both
    record the same weights; the pretext stage pretraining as long finds it too."""
    from conftest import synthetic, write_h5
    import label_efficiency as mod

    vol = synthetic((20, 128, 128), 3)
    write_h5(tmp_path / "vnc_stack1.h5", raw=vol.raw, label=vol.label)
    monkeypatch.setenv("EMSEG_DATA", str(tmp_path))
    shared = tmp_path / "pretraining"
    common = ["--quick", "--budgets", "2", "--pretrain-root", str(shared)]
    rows = []
    for steps in (2, 3):
        out = tmp_path / f"steps{steps}.json"
        assert mod.main(common + ["--steps", str(steps), "--out", str(out)]) == 0
        rows.append(next(r for r in json.loads(out.read_text())["runs"] if r["kind"] == "pretrain"))
    assert "pretrain_reused" not in rows[0] and rows[1]["pretrain_reused"] is True
    assert rows[0]["weights_sha256"] == rows[1]["weights_sha256"] == mod.weights_digest(
        shared / Path(rows[0]["checkpoint"]).parent.name / "last.pt")
    assert [p.name for p in shared.iterdir()] == [Path(rows[0]["checkpoint"]).parent.name]
    assert not list((tmp_path / "steps2").glob("pretrain_*")) and not list((tmp_path / "steps3").glob("pretrain_*"))
    # the pretext stage's run of the same length and seed is the same pretraining
    last = shared / Path(rows[0]["checkpoint"]).parent.name / "last.pt"
    written = last.stat().st_mtime_ns
    assert mod.main(["--quick", "--stage", "pretext", "--kinds", "masked", "--steps-grid", "2", "--pretrain-root",
                     str(shared), "--out", str(tmp_path / "pt.json")]) == 0
    assert [p.name for p in shared.iterdir()] == [last.parent.name] and last.stat().st_mtime_ns == written
    pre = next(r for r in json.loads((tmp_path / "pt.json").read_text())["runs"] if r["pretext"] == "masked")
    assert pre["pretrain_reused"] is True and pre["weights_sha256"] == rows[0]["weights_sha256"]
    # a pretraining of other settings in the shared folder is refused, not used (here: another patch size)
    with pytest.raises(SystemExit, match="pretrained with other settings or precision"):
        mod.main(common + ["--patch", "64", "--out", str(tmp_path / "patch64.json")])
    assert last.stat().st_mtime_ns == written
