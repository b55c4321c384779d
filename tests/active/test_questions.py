"""Ask cheap questions: class statistics, the cost model, the budgeted selector, answers -> lazy cubes,
and `emseg query --ask` / `emseg query answers` end to end (the simulated arms: test_simulate_questions.py).

Expectations are computed another way: numpy references of the statistics, direct network calls per
patch, hand-worked greedy selections, the ground truth of the synthetic volume.
"""
from __future__ import annotations

import csv
import json
import math
import os
from fractions import Fraction

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import synthetic, tiny_train_config, to_toml, write_h5
from emseg.active.questions.answers import answers_to_cubes, read_answers
from emseg.active.pool import build_pool
from emseg.active.questions.annotation import BoxKnowledge, box_annotation
from emseg.active.questions.types import (
    QUESTION_STRATEGY,
    QUESTION_TYPES,
    CostModel,
    QuestionTable,
    build_questions,
    parse_ask,
    parse_costs,
    select_questions,
)
from emseg.active.scoring.criteria import class_mass, class_statistics, entropy, uncertain_class_mass
from emseg.active.scoring.stream import score_pool
from emseg.models.checkpoint import load_model
from emseg.cli.main import cli
from emseg.engine.config import config_from_dict
from emseg.data import open_cubes, to_float
from emseg.errors import InputError
from emseg.semantic.train import train
from emseg.runtime import Runtime


def _softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _reference_stats(p: np.ndarray) -> np.ndarray:
    """(B, C, *S) probabilities -> (B, C, 3) mass, uncertain mass, peak, by explicit loops."""
    b, c = p.shape[:2]
    flat = p.reshape(b, c, -1)
    out = np.zeros((b, c, 3))
    for i in range(b):
        h = np.array([-sum(q * math.log(q) for q in flat[i, :, v] if q > 0) for v in range(flat.shape[2])])
        for k in range(c):
            out[i, k] = [flat[i, k].sum(), (flat[i, k] * h / math.log(c)).sum(), flat[i, k].max()]
    return out


# ----------------------------------------------------------------------------- statistics
def test_class_statistics_match_a_loop_reference():
    rng = np.random.default_rng(0)
    p = _softmax(rng.normal(size=(3, 4, 5, 6)) * 2)
    p[0, :, 0, 0] = [1, 0, 0, 0]  # a one-hot pixel: 0 log 0 = 0, and no uncertainty
    got = class_statistics(torch.from_numpy(p)).numpy()
    np.testing.assert_allclose(got, _reference_stats(p), rtol=1e-10)
    np.testing.assert_allclose(class_mass(torch.from_numpy(p)).numpy(), got[..., 0], rtol=1e-12)
    np.testing.assert_allclose(uncertain_class_mass(torch.from_numpy(p), "mean").numpy(), got[..., 1] / 30, rtol=1e-10)
    # the uncertain mass splits the patch's normalised entropy by class
    np.testing.assert_allclose(got[..., 1].sum(axis=1), entropy(torch.from_numpy(p), "sum").numpy() / math.log(4),
                               rtol=1e-10)
    # a sigmoid channel is read as (1 - p, p)
    s = rng.uniform(size=(2, 1, 7))
    np.testing.assert_allclose(class_statistics(torch.from_numpy(s)).numpy(),
                               _reference_stats(np.concatenate([1 - s, s], axis=1)), rtol=1e-10)
    with pytest.raises(ValueError, match="reduction"):
        class_statistics(torch.from_numpy(p), "none")


@pytest.fixture(scope="module")
def asked(tmp_path_factory):
    """A tiny network trained for a few steps on the synthetic volume, and that volume on disk."""
    root = tmp_path_factory.mktemp("ask")
    vol = synthetic((4, 64, 64), 0)
    data = write_h5(root / "data.h5", raw=vol.raw, label=vol.label)
    cfg = config_from_dict(tiny_train_config(data, steps=4))
    train(cfg, root / "run", runtime=Runtime(device="cpu", seed=0))
    return root, data, vol


def test_question_values_come_from_score_pool_and_match_direct_forward_passes(asked):
    root, _, vol = asked
    model, _ = load_model(root / "run" / "last.pt")
    pool = build_pool([vol.raw.shape], (1, 16, 16))
    scores = score_pool(model, pool, [vol.raw], QUESTION_STRATEGY, reduction="sum", batch_size=5, precision="fp32")
    assert scores.scores.shape == (len(pool), 3, 3)
    costs = CostModel(dense_cost_per_voxel=0.5, partial_cost_per_voxel=0.125, presence_cost=2.0)
    table = build_questions(pool, scores.scores, QUESTION_TYPES, costs, asked={0: [1]}, present={1: [2]})
    for i in range(len(pool)):
        z, y, x = pool.offsets[i]
        with torch.no_grad():
            logits = model(torch.from_numpy(to_float(vol.raw[z, y:y + 16, x:x + 16]))[None, None])
        ref = _reference_stats(torch.softmax(logits.double(), 1).numpy())[0]
        np.testing.assert_allclose(scores.scores[i], ref, rtol=1e-4, atol=1e-6)
        rows = {(QUESTION_TYPES[t], k): (v, c) for t, k, v, c in zip(table.kind[table.index == i],
                                                                    table.klass[table.index == i],
                                                                    table.value[table.index == i],
                                                                    table.cost[table.index == i])}
        want = {("partial", k): (ref[k, 1], 32.0) for k in (1, 2)}
        want.update({("presence", k): ((1 - ref[k, 2]) * ref[k, 1], 2.0) for k in (1, 2)})
        want[("dense", -1)] = (ref[:, 1].sum(), 128.0)
        if i == 0:  # class 1 was resolved already: not again, and no dense question for the box
            want = {key: v for key, v in want.items() if key[1] == 2}
        if i == 1:  # class 2 was answered present: a follow-up partial or dense question, no presence again
            del want[("presence", 2)]
        assert set(rows) == set(want)
        for key, (v, c) in want.items():
            assert rows[key][0] == pytest.approx(v, rel=1e-4) and rows[key][1] == c


# ----------------------------------------------------------------------------- costs and the selector
def test_cost_model_defaults_and_options():
    c = CostModel()
    assert c.cost("dense", 128 * 128) == pytest.approx(163.84)
    assert c.cost("partial", 128 * 128) == pytest.approx(40.96)
    assert c.cost("presence", 128 * 128) == c.cost("presence", 8) == 5.0
    assert parse_costs("presence=3, dense=0.02") == CostModel(dense_cost_per_voxel=0.02, presence_cost=3.0)
    assert CostModel.from_mapping({"partial_cost_per_voxel": 0.001}).partial_cost_per_voxel == 0.001
    for bad in ("presence=0", "dense=-1", "presence=nan", "speed=3", "dense"):
        with pytest.raises(InputError):
            parse_costs(bad)
    with pytest.raises(InputError, match="unknown question type"):
        c.cost("guess", 4)


def test_parse_ask_grammar():
    assert parse_ask("auto").types == QUESTION_TYPES and parse_ask("auto").shares is None
    assert parse_ask("presence+dense").name == "dense+presence" and parse_ask("dense").plain_dense
    assert not parse_ask("dense=1").plain_dense
    mix = parse_ask("presence=3+dense=1")
    assert mix.types == ("presence", "dense") and mix.shares == (0.75, 0.25)
    for bad in ("guess", "dense+dense", "dense=1+presence", "dense=0", "dense=x", ""):
        with pytest.raises(InputError):
            parse_ask(bad)


def _hand_pool_and_table(costs):
    """Three 1x8x8 boxes with hand-made statistics (see the worked greedy runs below)."""
    pool = build_pool([(1, 8, 24)], (1, 8, 8))
    stats = np.zeros((3, 3, 3))
    stats[0, :, 1], stats[0, :, 2] = [10, 30, 0], [0.9, 0.5, 0.1]
    stats[1, :, 1], stats[1, :, 2] = [5, 5, 20], [0.9, 0.95, 0.25]
    stats[2, :, 1], stats[2, :, 2] = [1, 1, 1], [1.0, 0.99, 0.99]
    return pool, build_questions(pool, stats, QUESTION_TYPES, costs)


def _picked(table, rows):
    return [(QUESTION_TYPES[int(table.kind[r])], int(table.index[r]), int(table.klass[r])) for r in rows]


def test_greedy_and_mixed_selection_against_hand_computation():
    # dense 64 s, partial 16 s, presence 2 s per question on these 64-voxel boxes
    costs = CostModel(dense_cost_per_voxel=1.0, partial_cost_per_voxel=0.25, presence_cost=2.0)
    pool, table = _hand_pool_and_table(costs)
    # value / cost, best first: presence(0,1) = (1 - 0.5) 30 / 2 = 7.5 and presence(1,2) = (1 - 0.25) 20 / 2
    # = 7.5 (a tie: the lower box first), 4 s; partial(0,1) 30/16 and partial(1,2) 20/16 are blocked (class
    # asked), dense(0) 40/64 and dense(1) 30/64 too (box taken); partial(1,1) 5/16 -> 20 s; partial(2,1)
    # and partial(2,2) 1/16 -> 36 s, 52 s; dense(2) 3/64 and presence(2,k) are blocked, then value 0.
    rows, spent = select_questions(pool, table, budget=70.0)
    assert _picked(table, rows) == [("presence", 0, 1), ("presence", 1, 2), ("partial", 1, 1), ("partial", 2, 1),
                                    ("partial", 2, 2)]
    assert spent == 52.0
    # with 30 s the 16 s partials of box 2 no longer fit after 20 s; its cheap presence questions do
    rows, spent = select_questions(pool, table, budget=30.0)
    assert _picked(table, rows) == [("presence", 0, 1), ("presence", 1, 2), ("partial", 1, 1),
                                    ("presence", 2, 1), ("presence", 2, 2)]
    assert spent == 24.0
    # fixed mix: 35 s for dense buys nothing (64 s each), 35 s for presence buys all five with value
    rows, spent = select_questions(pool, table, budget=70.0, shares=(0.5, 0.5), types=("dense", "presence"))
    assert [t for t, _, _ in _picked(table, rows)] == ["presence"] * 5 and spent == 10.0
    # 80 s dense: box 0 (value 40); 80 s partial on the other boxes: 4 x 16 s
    rows, spent = select_questions(pool, table, budget=160.0, shares=(1, 1), types=("dense", "partial"))
    assert _picked(table, rows) == [("dense", 0, -1), ("partial", 1, 2), ("partial", 1, 1), ("partial", 2, 1),
                                    ("partial", 2, 2)]
    assert spent == 128.0
    # without a budget: the first n by the same rule
    rows, _ = select_questions(pool, build_questions(pool, np.zeros((3, 3, 3)) + 0.5, ["presence"], costs),
                               max_questions=2)
    assert len(rows) == 2


def _check_selection(pool, table, rows, spent, budget, shares, types):
    costs = [Fraction(float(table.cost[r])) for r in rows]
    assert sum(costs, Fraction(0)) <= Fraction(float(budget))  # never more than the budget, exactly
    assert spent == pytest.approx(float(sum(costs, Fraction(0))), abs=1e-9)
    boxes: dict[int, list] = {}
    for r in rows:
        boxes.setdefault(int(table.index[r]), []).append((int(table.kind[r]), int(table.klass[r])))
        assert table.value[r] > 0
    for items in boxes.values():
        assert (0, -1) not in items or len(items) == 1  # a dense question is alone on its box
        assert len({k for _, k in items}) == len(items)  # a class is asked once per box
    chosen = list(boxes)
    for a in range(len(chosen)):
        for b in range(a + 1, len(chosen)):
            assert not pool.box(chosen[a]).overlaps(pool.box(chosen[b]))
    if shares is None:  # greedy: whatever still fits and does not conflict was taken
        left = Fraction(float(budget)) - sum(costs, Fraction(0))
        taken = set(int(r) for r in rows)
        for r in range(len(table)):
            if r in taken or not table.value[r] > 0 or Fraction(float(table.cost[r])) > left:
                continue
            i, kind, k = int(table.index[r]), int(table.kind[r]), int(table.klass[r])
            if i in boxes:
                assert kind == 0 or (0, -1) in boxes[i] or k in {kk for _, kk in boxes[i]}
            else:
                assert any(pool.box(i).overlaps(pool.box(j)) for j in boxes)
    else:
        total = sum(Fraction(float(s)) for s in shares)
        for t, s in zip(types, shares):
            part = sum((Fraction(float(table.cost[r])) for r in rows if QUESTION_TYPES[int(table.kind[r])] == t),
                       Fraction(0))
            assert part <= Fraction(float(budget)) * Fraction(float(s)) / total


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 5))
    shape = (int(rng.integers(1, 3)), 24, 24)
    overlap = bool(rng.integers(0, 2))
    pool = build_pool([shape], (1, 8, 8), candidates=int(rng.integers(3, 30)) if overlap else None, rng=seed)
    p = rng.dirichlet(np.ones(n_classes) * 0.5, size=(len(pool), 64)).transpose(0, 2, 1)
    stats = class_statistics(torch.from_numpy(p)).numpy()
    costs = CostModel(*(float(v) for v in rng.uniform(0.01, 3.0, size=3)))
    types = [t for t in QUESTION_TYPES if rng.integers(0, 2)] or ["presence"]
    shares = tuple(float(v) for v in rng.uniform(0.1, 1, size=len(types))) if rng.integers(0, 2) else None
    budget = float(rng.uniform(0, 400))
    return pool, build_questions(pool, stats, types, costs), budget, shares, types


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(st.integers(0, 2**32 - 1))
    def test_selector_never_spends_more_than_its_budget(seed):
        pool, table, budget, shares, types = _random_case(seed)
        rows, spent = select_questions(pool, table, budget=budget, shares=shares, types=types)
        _check_selection(pool, table, rows, spent, budget, shares, types)
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    def test_selector_never_spends_more_than_its_budget():
        for seed in range(60):
            pool, table, budget, shares, types = _random_case(seed)
            rows, spent = select_questions(pool, table, budget=budget, shares=shares, types=types)
            _check_selection(pool, table, rows, spent, budget, shares, types)


def test_selector_budget_edge_cases():
    costs = CostModel(dense_cost_per_voxel=0.1, partial_cost_per_voxel=0.1, presence_cost=0.1)
    pool = build_pool([(1, 8, 80)], (1, 8, 8))
    table = build_questions(pool, np.full((10, 2, 3), 0.5), ["presence"], costs)
    # ten questions of 0.1 s: their float sum is 0.9999999999999999, their exact sum 1.0000000000000000555;
    # a budget of 1.0 buys nine of them, never ten
    rows, spent = select_questions(pool, table, budget=1.0)
    assert len(rows) == 9 and math.fsum([0.1] * 9) <= 1.0
    assert select_questions(pool, table, budget=0.0)[0].size == 0
    with pytest.raises(InputError, match="budget"):
        select_questions(pool, table, budget=float("inf"))
    empty = QuestionTable(*(np.zeros(0, dtype=np.int64),) * 3, np.zeros(0), np.zeros(0), np.zeros((0, 2, 3)))
    assert select_questions(pool, empty, budget=5.0)[0].size == 0


# ----------------------------------------------------------------------------- answers -> cubes
def test_box_annotation_encodes_each_kind_of_answer():
    truth = np.array([[[0, 1], [1, 0]]])
    label, info = box_annotation(3, BoxKnowledge(absent={2}), truth.shape)
    assert (label == -1).all() and label.dtype == np.int16 and info.tolist() == [[0, 0, 0], [0, 0, 1]]
    assert box_annotation(3, BoxKnowledge(), truth.shape) is None  # only "yes" answers: nothing to learn
    label, info = box_annotation(3, BoxKnowledge(partial={1}), truth.shape, truth)
    assert label.tolist() == [[[-1, 1], [1, -1]]] and info.tolist() == [[0, 1, 0], [0, 0, 0]]
    label, info = box_annotation(3, BoxKnowledge(partial={1, 2}), truth.shape, truth)  # class 2 found absent
    assert label.tolist() == [[[-1, 1], [1, -1]]] and info.tolist() == [[0, 1, 0], [0, 0, 1]]
    label, info = box_annotation(3, BoxKnowledge(dense=True, absent={2}), truth.shape, truth)
    assert (label == truth).all() and info.tolist() == [[1, 1, 1], [0, 0, 0]]
    with pytest.raises(ValueError):
        box_annotation(3, BoxKnowledge(partial={1}), truth.shape)


def _answers_doc(data, entries, n_classes=3):
    return {"format": "emseg-answers", "version": 1, "axes": "zyx", "n_classes": n_classes,
            "answers": [{"volume": f"{data}:raw", **e} for e in entries]}


def test_answers_to_cubes_no_yes_and_unanswered(tmp_path):
    vol = synthetic((4, 64, 64), 0)
    data = write_h5(tmp_path / "data.h5", raw=vol.raw, label=vol.label)
    a, b, c = ([1, 0, 0], [1, 8, 8]), ([2, 8, 16], [1, 8, 8]), ([3, 40, 40], [1, 8, 8])
    entries = [{"offset": a[0], "shape": a[1], "class": 2, "answer": False},
               {"offset": a[0], "shape": a[1], "class": 1, "answer": False},
               {"offset": b[0], "shape": b[1], "class": 1, "answer": True},   # yes: nothing flagged
               {"offset": b[0], "shape": b[1], "class": 2, "answer": False},
               {"offset": c[0], "shape": c[1], "class": 1, "answer": None},   # unanswered: skipped
               {"offset": c[0], "shape": c[1], "class": 1, "answer": True},
               {"offset": a[0], "shape": a[1], "class": 2, "answer": False}]  # a repeat agrees
    (tmp_path / "a.json").write_text(json.dumps(_answers_doc(data, entries)))
    res = answers_to_cubes(tmp_path / "a.json", tmp_path / "cubes.h5").to_dict()
    assert (res["n_questions"], res["n_no"], res["n_yes"], res["n_unanswered"], res["n_cubes"]) == (7, 4, 2, 1, 2)
    assert [(p["offset"], p["class"]) for p in res["present"]] == [(b[0], 1), (c[0], 1)]
    with h5py.File(tmp_path / "cubes.h5", "r") as fh:
        assert sorted(fh) == ["cube_000", "cube_001"] and fh.attrs["format"] == "emseg-lazy-cubes"
        for name, (off, shape), absent in (("cube_000", a, [[0, 0, 0], [0, 1, 1]]),
                                           ("cube_001", b, [[0, 0, 0], [0, 0, 1]])):
            g = fh[name]
            sl = tuple(slice(o, o + s) for o, s in zip(off, shape))
            np.testing.assert_array_equal(g["raw"][...], vol.raw[sl])
            assert g["label"].dtype == np.int16 and (g["label"][...] == -1).all()
            assert g["info"][...].tolist() == absent  # "no" classes only; the "yes" class 1 of box b is not flagged
    # exactly the format a training config takes
    cfg = config_from_dict(tiny_train_config(data, patch_shape=[1, 8, 8], train=[
        {"raw": f"{tmp_path / 'cubes.h5'}:cube_{j:03d}/raw", "label": f"{tmp_path / 'cubes.h5'}:cube_{j:03d}/label"}
        for j in (0, 1)]))
    cubes = open_cubes(cfg.train, 3, cfg.patch_shape)
    assert [c.info.tolist() for c in cubes] == [[[0, 0, 0], [0, 1, 1]], [[0, 0, 0], [0, 0, 1]]]
    assert read_answers(tmp_path / "a.json")[0] == 3


_GOOD = {"offset": [0, 0, 0], "shape": [1, 8, 8], "class": 1, "answer": False}
BAD_ANSWERS = [
    ("not-json", "{not json", ["not JSON"]),
    ("not-object", "[1, 2]", ["expected a JSON object"]),
    ("no-answers", {"n_classes": 3}, ["missing key 'answers'"]),
    ("no-classes", {"answers": []}, ["missing key 'n_classes'"]),
    ("missing-class", [{k: v for k, v in _GOOD.items() if k != "class"}], ["answer 1", "missing key 'class'"]),
    ("missing-answer", [_GOOD, {k: v for k, v in _GOOD.items() if k != "answer"}], ["answer 2", "'answer'"]),
    ("answer-yes", [{**_GOOD, "answer": "yes"}], ["answer 1", "true, false or null", '"yes"']),
    ("answer-int", [{**_GOOD, "answer": 1}], ["answer 1", "true, false or null"]),
    ("outside", [{**_GOOD, "offset": [0, 60, 0]}], ["answer 1", "outside", "[4, 64, 64]"]),
    ("too-few-axes", [{**_GOOD, "offset": [0, 0], "shape": [8, 8]}], ["answer 1", "outside"]),
    ("negative-offset", [{**_GOOD, "offset": [0, -1, 0]}], ["answer 1", "offset"]),
    ("unknown-class", [{**_GOOD, "class": 5}], ["answer 1", "unknown class 5"]),
    ("class-str", [{**_GOOD, "class": "mito"}], ["answer 1", "unknown class"]),
    ("disagree", [_GOOD, {**_GOOD, "answer": True}], ["answers 1 and 2 disagree"]),
    ("no-volume", [{**_GOOD, "volume": "{d}/absent.h5:raw"}], ["answer 1", "absent.h5"]),
]


@pytest.mark.parametrize("case, content, words", BAD_ANSWERS, ids=[c[0] for c in BAD_ANSWERS])
def test_bad_answers_file_exits_2_and_writes_nothing(tmp_path, case, content, words):
    vol = synthetic((4, 64, 64), 0)
    data = write_h5(tmp_path / "data.h5", raw=vol.raw)
    path = tmp_path / "answers.json"
    if isinstance(content, list):  # answer entries; a "volume" of the case replaces the good one
        content = _answers_doc(data, [{k: v.format(d=tmp_path) if isinstance(v, str) else v for k, v in e.items()}
                                      for e in content])
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    before = sorted(os.listdir(tmp_path))
    result = CliRunner().invoke(cli, ["query", "answers", str(path), "--out", str(tmp_path / "cubes.h5"), "--json"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "answers.json" in lines[0], lines
    for word in words:
        assert word in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == before  # no cubes file, no temporary file


def test_answers_out_must_be_a_new_h5_file(tmp_path):
    vol = synthetic((4, 64, 64), 0)
    data = write_h5(tmp_path / "data.h5", raw=vol.raw)
    (tmp_path / "a.json").write_text(json.dumps(_answers_doc(data, [_GOOD])))
    with pytest.raises(InputError, match="HDF5"):
        answers_to_cubes(tmp_path / "a.json", tmp_path / "cubes.zarr")
    with pytest.raises(InputError, match="replace an input"):
        answers_to_cubes(tmp_path / "a.json", data)
    assert sorted(os.listdir(tmp_path)) == ["a.json", "data.h5"]


# ----------------------------------------------------------------------------- the CLI loop
def _invoke(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_ask_presence_answer_train_on_lazy_and_dense_cubes_and_ask_again(asked, tmp_path):
    root, data, vol = asked
    model = str(root / "run" / "last.pt")
    common = ["--patch", "1,8,8", "--device", "cpu", "--precision", "fp32", "--json"]
    # --ask dense is the classic query, unchanged
    plain = _invoke(["query", model, f"{data}:raw", "--n", "3", *common])
    dense = _invoke(["query", model, f"{data}:raw", "--n", "3", "--ask", "dense", *common])
    for doc in (plain, dense):
        doc.pop("seconds_scoring"), doc.pop("seconds_total")
    assert plain == dense and "ask" not in dense

    q = tmp_path / "q.json"
    doc = _invoke(["query", model, f"{data}:raw", "--ask", "presence", "--n", "40", "--out", str(q), *common])
    qs = doc["queries"]
    assert len(qs) == 40 and doc["ask"]["n_questions"] == {"dense": 0, "partial": 0, "presence": 40}
    assert doc["ask"]["spent"] == pytest.approx(40 * 5.0) and json.loads(q.read_text()) == doc
    assert all(x["question"] == "presence" and x["class"] in (1, 2) and x["cost"] == 5.0 for x in qs)
    scores = [x["score"] for x in qs]
    assert scores == sorted(scores, reverse=True)  # one cost: ranked by value
    for x in qs:
        assert x["score"] == pytest.approx((1 - x["peak"]) * x["uncertain_mass"], rel=1e-9)
    with open(tmp_path / "q.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[-3:] == ["question", "class", "cost"] and [r["class"] for r in rows] == [
        str(x["class"]) for x in qs]
    answers = json.loads((tmp_path / "q.answers.json").read_text())
    assert answers["n_classes"] == 3 and len(answers["answers"]) == 40
    truth = []
    for x, a in zip(qs, answers["answers"]):
        assert (a["rank"], a["offset"], a["shape"], a["class"], a["answer"]) == (
            x["rank"], x["offset"], x["shape"], x["class"], None)
        sl = tuple(slice(o, o + s) for o, s in zip(a["offset"], a["shape"]))
        a["answer"] = bool((vol.label[sl] == a["class"]).any())  # the ground truth answers
        truth.append(a["answer"])
    answers["answers"][-1]["answer"] = None
    assert not all(truth[:-1]), "the test needs some 'no' answers"
    (tmp_path / "q.answers.json").write_text(json.dumps(answers))
    res = _invoke(["query", "answers", str(tmp_path / "q.answers.json"), "--out", str(tmp_path / "cubes.h5"),
                   "--json"])
    assert (res["n_no"], res["n_yes"], res["n_unanswered"]) == (truth[:-1].count(False), truth[:-1].count(True), 1)
    with h5py.File(tmp_path / "cubes.h5", "r") as fh:
        for cube in res["cubes"]:
            sl = tuple(slice(o, o + s) for o, s in zip(cube["offset"], cube["shape"]))
            flagged = np.flatnonzero(fh[cube["name"]]["info"][1])
            assert list(flagged) == cube["not_present"] and all(not (vol.label[sl] == k).any() for k in flagged)
            assert not fh[cube["name"]]["info"][0].any() and (fh[cube["name"]]["label"][...] == -1).all()

    # train on the lazy cubes and the dense volume with emseg train
    cubes = tmp_path / "cubes.h5"
    config = tiny_train_config(data, steps=2, patch_shape=[1, 8, 8])
    config["train"] += [{"raw": f"{cubes}:{c['name']}/raw", "label": f"{cubes}:{c['name']}/label", "prio": 0.2}
                        for c in res["cubes"]]
    config["train"][0]["prio"] = 1.0
    (tmp_path / "t.toml").write_text(to_toml(config))
    out = _invoke(["train", str(tmp_path / "t.toml"), "--out", str(tmp_path / "run2"), "--device", "cpu", "--json"])
    assert out["final_step"] == 2

    # ask again with the new network: a budgeted mix, skipping the boxes asked before
    again = _invoke(["query", str(tmp_path / "run2" / "last.pt"), f"{data}:raw", "--ask", "auto", "--budget", "60",
                     "--exclude-boxes", str(q), "--costs", "dense=0.05", "--export", str(tmp_path / "crops.h5"),
                     *common])
    assert 0 < again["ask"]["spent"] <= 60 and again["ask"]["costs"]["dense_cost_per_voxel"] == 0.05
    before = {tuple(x["offset"]) for x in qs}
    assert not before & {tuple(x["offset"]) for x in again["queries"]}
    assert sum(x["cost"] for x in again["queries"]) == pytest.approx(again["ask"]["spent"])
    with h5py.File(tmp_path / "crops.h5", "r") as fh:  # dense and partial questions are exported, presence not
        exported = [x for x in again["queries"] if x["question"] != "presence"]
        assert len(fh) == len(exported)
        for x in exported:
            info = fh[f"crop_{x['rank'] - 1:03d}/info"][...]
            want = [1, 1, 1] if x["question"] == "dense" else [int(k == x["class"]) for k in range(3)]
            assert info.tolist() == [want, [0, 0, 0]]


def test_a_query_without_presence_questions_removes_or_names_the_stale_answers_file(asked, tmp_path):
    root, data, _ = asked
    model = str(root / "run" / "last.pt")
    q, stale = tmp_path / "q.json", tmp_path / "q.answers.json"
    common = ["--patch", "1,8,8", "--device", "cpu", "--precision", "fp32", "--out", str(q), "--overwrite"]

    def query(*args):
        result = CliRunner().invoke(cli, ["query", model, f"{data}:raw", *common, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    query("--ask", "presence", "--n", "3")
    assert len(json.loads(stale.read_text())["answers"]) == 3
    # nothing answered yet: a later query of this --out without presence questions removes it, and says so
    for later in (["--n", "2"], ["--ask", "dense", "--n", "2"], ["--ask", "partial", "--n", "2"]):
        query("--ask", "presence", "--n", "3")
        out = query(*later)
        assert not stale.exists(), later
        assert "removed" in out.output and "q.answers.json" in out.output
        assert "q.answers.json" in json.loads(q.read_text())["notes"][0]
    # answers given: the file is kept, the output (and the JSON) says so
    query("--ask", "presence", "--n", "3")
    doc = json.loads(stale.read_text())
    doc["answers"][0]["answer"] = False
    stale.write_text(json.dumps(doc))
    out = query("--n", "2", "--json")
    assert json.loads(stale.read_text()) == doc
    notes = json.loads(out.stdout)["notes"]
    assert len(notes) == 1 and "kept because 1 of its 3 answers are given" in notes[0]
    # not an answers file of emseg: left alone, named
    stale.write_text("my notes")
    out = query("--n", "2")
    assert stale.read_text() == "my notes" and "not an emseg answers file" in out.output
    # no stale file: no note
    stale.unlink()
    assert "notes" not in json.loads(query("--n", "2", "--json").stdout)


def test_ask_option_errors(asked, tmp_path):
    root, data, _ = asked
    model = str(root / "run" / "last.pt")
    for args, word in ((["--ask", "auto"], "--budget"), (["--budget", "5"], "--budget"),
                       (["--ask", "guess"], "unknown question type"), (["--costs", "presence=-1"], "presence_cost"),
                       (["--ask", "presence", "--scheduler", "local"], "--scheduler")):
        result = CliRunner().invoke(cli, ["query", model, f"{data}:raw", "--patch", "1,8,8", "--out",
                                          str(tmp_path / "q.json"), *args])
        assert result.exit_code == 2 and word in result.stderr, (args, result.output)
    assert os.listdir(tmp_path) == []


def test_an_oversized_answers_file_is_refused_before_it_is_read(tmp_path):
    from emseg.active.questions.answers import MAX_ANSWERS_BYTES
    from emseg.errors import InputError

    path = tmp_path / "huge.answers.json"
    with open(path, "wb") as fh:
        fh.truncate(MAX_ANSWERS_BYTES + 1)  # sparse: no disk used
    with pytest.raises(InputError, match="too large"):
        read_answers(path)
