"""`emseg query`: candidate pools, streaming scoring, selection, outputs, export and the simulated loop.

Expectations come from brute-force references (explicit loops over boxes, direct network calls
per patch, the score functions applied to stacked probabilities), never from stored outputs.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import tracemalloc

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import synthetic, tiny_train_config, to_toml, write_h5
from emseg.active import bald, entropy, least_confidence
from emseg.active import pool as pool_mod
from emseg.active.scoring import stream as scoring_mod
from emseg.active.pool import Box, build_pool, grid_offsets, labelled_in_boxes, random_offsets
from emseg.active.registry import get_strategy
from emseg.active.scoring.stream import score_pool
from emseg.active.selection.select import select
from emseg.active.simulation.loop import load_simulate_config, run_simulation
from emseg.models.checkpoint import load_model
from emseg.cli.main import cli
from emseg.engine.config import config_from_dict
from emseg.data import to_float
from emseg.errors import InputError
from emseg.models import UNet, set_mc_dropout
from emseg.semantic.train import train
from emseg.runtime import Runtime


# ----------------------------------------------------------------------------- helpers
def _brute_grid(shape, patch, stride):
    return [list(o) for o in itertools.product(*[range(0, s - p + 1, st) for s, p, st in zip(shape, patch, stride)])]


def _boxes_intersect(a_off, a_shape, b_off, b_shape) -> bool:
    return all(max(a, b) < min(a + s, b + t) for a, s, b, t in zip(a_off, a_shape, b_off, b_shape))


def _direct_probs(model, patch_float: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(patch_float)[None, None]), dim=1)


class RecordingNet(torch.nn.Module):
    """A tiny 2D network that records every batch it sees and builds its outputs in numpy
    (so anything kept alive is visible to tracemalloc)."""

    ndim = 2

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(2)
        self.drop = torch.nn.Dropout(0.5)
        self.batches: list[int] = []

    def forward(self, x, return_embedding=False):
        self.batches.append(int(x.shape[0]))
        with torch.no_grad():
            logits = self.drop(self.bn(self.conv(x)))
        out = torch.from_numpy(np.array(logits.numpy(), dtype=np.float32))
        emb = torch.from_numpy(np.array(logits[:, :, ::4, ::4].numpy(), dtype=np.float32))
        return (out, emb) if return_embedding else out


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    net = UNet(ndim=2, out_channels=3, depth=2, base_width=4, dropout=0.3)
    # Make BatchNorm statistics non-trivial so eval/train mode matters.
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(torch.rand(4, 1, 16, 16) * 2)
    return net.eval()


# ----------------------------------------------------------------------------- pool geometry
@pytest.mark.parametrize("shape,patch,stride", [
    ((3, 64, 64), (1, 32, 32), None), ((5, 70, 50), (2, 16, 24), None), ((40, 33), (8, 10), (5, 7)),
])
def test_grid_offsets_match_enumeration(shape, patch, stride):
    got = grid_offsets(shape, patch, stride).tolist()
    assert got == _brute_grid(shape, patch, stride or patch)


def test_random_offsets_stay_inside_and_cover_the_range():
    shape, patch = (6, 50, 40), (1, 16, 8)
    a = random_offsets(shape, patch, 3000, rng=3)
    assert a.shape[1] == 3 and len(a) == len({tuple(r) for r in a.tolist()})  # no duplicate positions
    hi = np.array(shape) - np.array(patch)
    assert (a >= 0).all() and (a <= hi).all()
    # with 3000 uniform draws every axis reaches both ends of its range
    assert (a.min(axis=0) == 0).all() and (a.max(axis=0) == hi).all()
    np.testing.assert_array_equal(a, random_offsets(shape, patch, 3000, rng=3))


@pytest.mark.parametrize("slab_voxels", [1 << 24, 64 * 3])  # one slab, then many slabs
def test_labelled_in_boxes_matches_brute_force(monkeypatch, slab_voxels):
    monkeypatch.setattr(pool_mod, "_LABEL_SLAB_VOXELS", slab_voxels)
    rng = np.random.default_rng(0)
    label = np.full((7, 20, 24), -1, dtype=np.int16)
    for _ in range(6):
        z, y, x = rng.integers(0, (7, 20, 24))
        label[z, y, x] = rng.integers(0, 3)
    patch = (2, 6, 5)
    offsets = random_offsets(label.shape, patch, 300, rng=1)
    got = labelled_in_boxes(label, offsets, patch)
    want = [bool((label[tuple(slice(o, o + p) for o, p in zip(off, patch))] >= 0).any()) for off in offsets]
    assert got.tolist() == want
    assert 0 < sum(want) < len(want)


def test_build_pool_exclusions_match_brute_force():
    shapes = [(3, 64, 64), (2, 48, 64)]
    patch = (1, 16, 16)
    label0 = np.full(shapes[0], -1, dtype=np.int8)
    label0[1, 10:20, 30:33] = 0
    label0[2, 63, 63] = 2
    old = [Box(1, (0, 5, 5), (1, 16, 16)), Box(0, (0, 40, 0), (3, 3, 3))]
    pool = build_pool(shapes, patch, candidates=400, rng=0, exclude_labels={0: [label0]}, exclude_boxes=old[1:],
                      labelled_boxes=old[:1])
    # brute force over the same random draw, without exclusions
    raw_pool = build_pool(shapes, patch, candidates=400, rng=0)
    keep, trained = [], []
    for i in range(len(raw_pool)):
        b = raw_pool.box(i)
        on_labels = b.volume == 0 and (label0[b.slices()] >= 0).any()
        on_box = any(b.volume == o.volume and _boxes_intersect(b.offset, b.shape, o.offset, o.shape) for o in old)
        if not (on_labels or on_box):
            keep.append((b.volume, b.offset))
        elif on_labels and not on_box:
            trained.append((b.volume, b.offset))
    free = [(pool.box(i).volume, pool.box(i).offset) for i in pool.free_indices()]
    assert free == keep
    assert pool.n_excluded == len(raw_pool) - len(keep) > 0
    # candidates on training labels stay as labelled members (core-set centres), and so does the
    # exact-shape labelled box
    assert trained
    assert [(pool.box(i).volume, pool.box(i).offset) for i in pool.labelled_indices()] == trained + [(1, (0, 5, 5))]


def test_build_pool_rejects_bad_inputs():
    with pytest.raises(InputError, match="larger than the volume"):
        build_pool([(1, 8, 8)], (1, 16, 16))
    with pytest.raises(InputError, match="differs from the pool volume shape"):
        build_pool([(1, 8, 8)], (1, 4, 4), exclude_labels={0: [np.zeros((1, 8, 9))]})
    with pytest.raises(ValueError, match="candidates"):
        build_pool([(1, 8, 8)], (1, 4, 4), candidates=0)


# ----------------------------------------------------------------------------- streaming scoring
def _peak_numpy_bytes(net, n_candidates, strategy, T=4):
    vol = (np.random.default_rng(0).random((n_candidates, 32, 32)) * 255).astype(np.uint8)
    pool = build_pool([vol.shape], (1, 32, 32))
    net.batches.clear()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    res = score_pool(net, pool, [vol], strategy, mc_samples=T, batch_size=4, precision="fp32")
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return res, peak, list(net.batches)


@pytest.mark.parametrize("strategy", ["bald", "hybrid"])
def test_scoring_streams_memory_independent_of_pool_size(strategy):
    net = RecordingNet()
    small, peak_small, batches_small = _peak_numpy_bytes(net, 16, strategy)
    large, peak_large, batches_large = _peak_numpy_bytes(net, 64, strategy)
    T = 4 if strategy == "bald" else 1
    for res, batches, n in ((small, batches_small, 16), (large, batches_large, 64)):
        assert max(batches) <= 4  # never more than one batch through the network
        assert len(batches) == math.ceil(n / 4) * T  # T passes per batch, nothing stacked
        assert res.scores.shape == (n,)
        assert res.embeddings is None if strategy == "bald" else res.embeddings.shape == (n, 2)
    # Keeping the per-patch probabilities of the 48 extra patches would need 48*2*32*32*4 = 393 kB
    # (x T for BALD); the only growth allowed is the (N,) scores and (N, C_b) embeddings.
    allowed = 48 * (8 + 2 * 4) + 64 * 1024
    assert peak_large - peak_small < allowed, (peak_small, peak_large)


def test_mc_dropout_samples_dropout_but_keeps_batchnorm_in_eval(tiny_unet):
    net = tiny_unet
    net.train()  # the caller's modes must come back afterwards
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: seen.append((type(mod).__name__, mod.training)))
             for m in net.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout))]
    bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    stats_before = [m.running_mean.clone() for m in bn]
    vol = (np.random.default_rng(1).random((2, 32, 32)) * 255).astype(np.uint8)
    pool = build_pool([vol.shape], (1, 16, 16))
    res = score_pool(net, pool, [vol], "bald", mc_samples=3, batch_size=8, precision="fp32")
    for h in hooks:
        h.remove()
    assert {t for name, t in seen if name == "BatchNorm2d"} == {False}
    assert {t for name, t in seen if name == "Dropout"} == {True}
    for before, m in zip(stats_before, bn):
        torch.testing.assert_close(m.running_mean, before)  # BatchNorm statistics untouched
    assert all(m.training for m in net.modules())  # modes restored
    assert (res.scores > 0).all()  # dropout passes disagree
    net.eval()


def test_bald_needs_dropout():
    net = UNet(ndim=2, out_channels=2, depth=1, base_width=2).eval()
    vol = np.zeros((1, 8, 8), dtype=np.uint8)
    with pytest.raises(InputError, match="dropout"):
        score_pool(net, build_pool([vol.shape], (1, 4, 4)), [vol], "bald", precision="fp32")


@pytest.mark.parametrize("shape,patch", [((2, 32, 48), (1, 16, 16)), ((32, 48), (16, 16))])
def test_scores_equal_score_functions_on_patch_probabilities(tiny_unet, shape, patch):
    net = tiny_unet.eval()
    vol = (np.random.default_rng(2).random(shape) * 255).astype(np.uint8)
    pool = build_pool([vol.shape], patch)
    patches = [to_float(vol[pool.box(i).slices()]).reshape(patch[-2:]) for i in range(len(pool))]
    for name, fn in (("entropy", entropy), ("least_confidence", least_confidence)):
        for reduction in ("mean", "sum"):
            res = score_pool(net, pool, [vol], name, reduction=reduction, batch_size=4, precision="fp32")
            want = [float(fn(_direct_probs(net, p), reduction)[0]) for p in patches]
            np.testing.assert_allclose(res.scores, want, rtol=1e-5, atol=1e-6)
    # hybrid: the same entropy plus the spatially averaged bottleneck features
    res = score_pool(net, pool, [vol], "hybrid", batch_size=5, precision="fp32")
    with torch.no_grad():
        emb = [net(torch.from_numpy(p)[None, None], return_embedding=True)[1].mean(dim=(2, 3))[0].numpy()
               for p in patches]
    np.testing.assert_allclose(res.embeddings, np.stack(emb), rtol=1e-5, atol=1e-6)
    # BALD: one batch holding the whole pool, T passes in the same random order
    torch.manual_seed(7)
    res = score_pool(net, pool, [vol], "bald", mc_samples=5, batch_size=len(pool), precision="fp32")
    torch.manual_seed(7)
    x = torch.from_numpy(np.stack(patches))[:, None]
    set_mc_dropout(net, True)
    with torch.no_grad():
        stacked = torch.stack([torch.softmax(net(x), dim=1) for _ in range(5)])
    net.eval()
    np.testing.assert_allclose(res.scores, bald(stacked).numpy(), rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- selection
def test_select_rules_against_direct_expectations():
    rng = np.random.default_rng(4)
    pool = build_pool([(1, 64, 64)], (1, 8, 8)).with_labelled([0, 5, 9])
    n = len(pool)
    scores = scoring_mod.PoolScores("entropy", rng.random(n), rng.normal(size=(n, 3)).astype(np.float32), "mean", None)
    free = [i for i in range(n) if i not in (0, 5, 9)]
    want = sorted(free, key=lambda i: -scores.scores[i])[:7]
    assert select(pool, "entropy", 7, scores=scores).tolist() == want
    for name in ("random", "kmeans", "coreset", "hybrid", "least_confidence"):
        picks = select(pool, name, 7, scores=scores, rng=0)
        assert len(set(picks.tolist())) == 7 and not set(picks.tolist()) & {0, 5, 9}
    # core-set: the first pick is the free point farthest from the labelled centres
    far = max(free, key=lambda i: min(np.linalg.norm(scores.embeddings[i] - scores.embeddings[j]) for j in (0, 5, 9)))
    assert select(pool, "coreset", 1, scores=scores)[0] == far
    with pytest.raises(InputError, match="free candidates"):
        select(pool, "random", n, rng=0)


def test_select_skips_overlapping_random_candidates():
    pool = build_pool([(1, 40, 40)], (1, 16, 16), candidates=300, rng=0)
    scores = scoring_mod.PoolScores("entropy", np.random.default_rng(0).random(len(pool)), None, "mean", None)
    for name in ("entropy", "random"):
        picks = select(pool, name, 4, scores=scores, rng=1)
        boxes = [pool.box(int(i)) for i in picks]
        assert 2 <= len(boxes) <= 4
        assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
        if len(boxes) < 4:  # fewer than asked only when every other candidate overlaps a chosen box
            assert all(any(pool.box(j).overlaps(b) for b in boxes) for j in range(len(pool)))


@pytest.mark.parametrize("name", ["kmeans", "coreset", "hybrid"])
def test_embedding_strategies_skip_overlapping_random_candidates(name):
    pool = build_pool([(1, 48, 48)], (1, 16, 16), candidates=400, rng=2)
    assert pool.may_overlap
    rng = np.random.default_rng(3)
    n = len(pool)
    # embeddings that follow the position: neighbouring (overlapping) boxes are similar, so an
    # unfiltered selection takes several boxes from one corner region
    emb = np.concatenate([pool.offsets[:, 1:] / 48.0, rng.normal(scale=2.0, size=(n, 6))], axis=1)
    scores = scoring_mod.PoolScores("entropy", rng.random(n), emb.astype(np.float32), "mean", None)
    strat = get_strategy(name)
    args = (torch.from_numpy(scores.scores), torch.from_numpy(scores.embeddings)) if name == "hybrid" else \
        (torch.from_numpy(scores.embeddings),)
    unfiltered = strat.select_fn(*args, 6, **({"rng": 0} if name == "kmeans" else {})).numpy()
    boxes = [pool.box(int(i)) for i in unfiltered]
    assert any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))  # the filter is needed
    picks = select(pool, name, 6, scores=scores, rng=0)
    boxes = [pool.box(int(i)) for i in picks]
    assert 1 <= len(boxes) <= 6 and len(set(picks.tolist())) == len(boxes)
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    # a 48 x 48 volume holds 9 disjoint 16 x 16 boxes: 4 non-overlapping picks always fit
    assert len(select(pool, name, 4, scores=scores, rng=0)) >= 1


def test_training_labels_act_as_coreset_and_hybrid_centres():
    shape, patch = (1, 64, 64), (1, 16, 16)
    label = np.full(shape, -1, np.int8)
    label[0, 2:10, 3:12] = 1  # training data inside grid candidate 0 only
    plain = build_pool([shape], patch)
    pool = build_pool([shape], patch, exclude_labels={0: [label]})
    assert pool.labelled_indices().tolist() == [0] and len(pool) == len(plain) == 16
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(16, 4)).astype(np.float32)
    emb[0] = emb[7] = 40.0  # candidate 7 looks exactly like the training patch
    s = rng.random(16) * 0.5
    s[7] = 1.0  # and is the most uncertain
    scores = scoring_mod.PoolScores("entropy", s, emb, "mean", None)
    # without the training data as a centre, 0 or 7 (the outlying pair) is chosen at once
    # (after a random first pick)
    assert set(select(plain, "coreset", 2, scores=scores, rng=0).tolist()) & {0, 7}
    assert select(plain, "hybrid", 1, scores=scores)[0] == 7
    # with it, 7 is at distance 0 from a centre: never first; the first pick is the free
    # candidate farthest from the training patch (brute force)
    far = max(range(1, 16), key=lambda i: np.linalg.norm(emb[i].astype(np.float64) - emb[0]))
    for name in ("coreset", "hybrid"):
        picks = select(pool, name, 3, scores=scores)
        assert picks[0] != 7 and 0 not in picks.tolist()
    assert select(pool, "coreset", 1, scores=scores)[0] == far


def brute_kcenter(x, n):
    """k-center greedy in float64 with explicit differences; first pick farthest from the mean."""
    x = np.asarray(x, np.float64)
    first = int(np.argmax(((x - x.mean(0)) ** 2).sum(1)))
    picks = [first]
    d = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, n):
        d_m = d.copy()
        d_m[picks] = -1
        i = int(np.argmax(d_m))
        picks.append(i)
        d = np.minimum(d, ((x - x[i]) ** 2).sum(1))
    return picks


def test_kcenter_float32_with_large_common_offset_matches_float64_brute_force():
    from emseg.active.selection.diversity import kcenter_greedy, kmeans_select

    mismatched = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        x = (rng.normal(size=(150, 8)) + 1e4).astype(np.float32)  # |x|^2 ~ 8e8: float32 eps ~ 50
        lab = [3, 17]
        got = kcenter_greedy(torch.from_numpy(x), 10).tolist()
        mismatched += got != brute_kcenter(x, 10)
        # with labelled centres too
        xd = x.astype(np.float64)
        d = np.min([((xd - xd[j]) ** 2).sum(1) for j in lab], axis=0)
        d[lab] = -1
        assert kcenter_greedy(torch.from_numpy(x), 1, labeled_idx=lab).tolist() == [int(np.argmax(d))]
    assert mismatched == 0
    # k-means is translation invariant too: the offset changes nothing
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(30, 3)), rng.normal(size=(30, 3)) + 8]).astype(np.float32)
    a = kmeans_select(torch.from_numpy(x), 2, rng=0).tolist()
    b = kmeans_select(torch.from_numpy(x + np.float32(1e4)), 2, rng=0).tolist()
    assert sorted(i // 30 for i in b) == [0, 1] and a == b


# ----------------------------------------------------------------------------- CLI end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny network trained for a few steps on a synthetic volume, plus that volume on disk."""
    root = tmp_path_factory.mktemp("query")
    vol = synthetic((4, 64, 64), 0)
    partial = np.full(vol.label.shape, -1, dtype=np.int16)
    partial[1, 10:20, 40:50] = vol.label[1, 10:20, 40:50]
    data = write_h5(root / "data.h5", raw=vol.raw, label=vol.label, partial=partial)
    cfg = config_from_dict(tiny_train_config(data, steps=4, model={"dropout": 0.2}))
    train(cfg, root / "run", runtime=Runtime(device="cpu", seed=0))
    return root, data, vol


def _run(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result


def test_cli_query_json_csv_export_and_the_loop_closes(trained, tmp_path):
    root, data, vol = trained
    out = tmp_path / "q.json"
    res = _run(["query", str(root / "run" / "last.pt"), f"{data}:raw", "--strategy", "entropy", "--n", "3",
                "--patch", "1,32,32", "--exclude", f"{data}:partial", "--out", str(out),
                "--export", str(tmp_path / "crops.h5"), "--json", "--device", "cpu", "--precision", "fp32"])  # scores compared with fp32
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc == json.loads(out.read_text()) and doc["axes"] == "zyx"
    qs = doc["queries"]
    assert [q["rank"] for q in qs] == [1, 2, 3]
    # the grid has 4 x 2 x 2 = 16 patches; the partial labels touch exactly the one at (1, 0, 32)
    assert doc["n_excluded"] == 1 and doc["n_candidates"] == 15
    model, _ = load_model(root / "run" / "last.pt")
    direct = {}
    for off in _brute_grid(vol.raw.shape, (1, 32, 32), (1, 32, 32)):
        if off == [1, 0, 32]:
            continue
        p = to_float(vol.raw[off[0], off[1]:off[1] + 32, off[2]:off[2] + 32])
        direct[tuple(off)] = float(entropy(_direct_probs(model, p))[0])
    best3 = sorted(direct, key=lambda o: -direct[o])[:3]
    assert [tuple(q["offset"]) for q in qs] == best3
    np.testing.assert_allclose([q["score"] for q in qs], [direct[o] for o in best3], rtol=1e-5)
    with open(tmp_path / "q.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(int(r["z"]), int(r["y"]), int(r["x"])) for r in rows] == best3
    assert [float(r["score"]) for r in rows] == pytest.approx([q["score"] for q in qs])
    # exported crops: raw equals the source region, labels are -1, info all labelled
    with h5py.File(tmp_path / "crops.h5", "r") as fh:
        for k, q in enumerate(qs):
            g = fh[f"crop_{k:03d}"]
            z, y, x = q["offset"]
            np.testing.assert_array_equal(g["raw"][...], vol.raw[z:z + 1, y:y + 32, x:x + 32])
            assert g["label"].dtype == np.int16 and (g["label"][...] == -1).all()
            np.testing.assert_array_equal(g["info"][...], [[1, 1, 1], [0, 0, 0]])
    # the loop closes: annotate two crops (from the ground truth) and train on them
    with h5py.File(tmp_path / "crops.h5", "a") as fh:
        for k in (0, 1):
            z, y, x = qs[k]["offset"]
            fh[f"crop_{k:03d}/label"][...] = vol.label[z:z + 1, y:y + 32, x:x + 32]
    crops = tmp_path / "crops.h5"
    config = tiny_train_config(data, steps=2, train=[{"raw": f"{crops}:crop_{k:03d}/raw",
                                                       "label": f"{crops}:crop_{k:03d}/label"} for k in (0, 1)])
    (tmp_path / "t.toml").write_text(to_toml(config))
    res = _run(["train", str(tmp_path / "t.toml"), "--out", str(tmp_path / "run2"), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["final_step"] == 2 and (tmp_path / "run2" / "last.pt").exists()
    # a second round skips the boxes chosen in the first
    res = _run(["query", str(root / "run" / "last.pt"), f"{data}:raw", "--strategy", "coreset", "--n", "4",
                "--patch", "1,32,32", "--exclude-boxes", str(out), "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    doc2 = json.loads(res.output)
    assert doc2["n_labelled"] == 3 and doc2["n_candidates"] == 13
    assert not {tuple(q["offset"]) for q in doc2["queries"]} & set(best3)


def test_cli_query_bald_random_candidates_and_errors(trained, tmp_path):
    root, data, _ = trained
    model = str(root / "run" / "last.pt")
    res = _run(["query", model, f"{data}:raw", "--strategy", "bald", "--mc-samples", "3", "--candidates", "40",
                "--n", "3", "--patch", "1,32,32", "--json", "--device", "cpu", "--seed", "3"])
    assert res.exit_code == 0, res.output
    qs = json.loads(res.output)["queries"]
    assert all(q["strategy"] == "bald" and q["score"] >= 0 for q in qs)
    assert not any(_boxes_intersect(a["offset"], a["shape"], b["offset"], b["shape"])
                   for a, b in itertools.combinations(qs, 2))
    bad = CliRunner().invoke(cli, ["query", model, f"{data}:raw", "--strategy", "nope"])
    assert bad.exit_code == 2 and "unknown strategy" in bad.output
    bad = CliRunner().invoke(cli, ["query", model, f"{data}:raw", "--patch", "1,30,30"])
    assert bad.exit_code == 2 and "multiple" in bad.output


# ----------------------------------------------------------------------------- simulate
def _sim_config(tmp_path, data, **extra):
    cfg = {
        "n_classes": 3, "patch": [1, 32, 32], "initial": 2, "per_iteration": 2, "iterations": 2, "seeds": [0],
        "strategies": ["random", "entropy"], "steps_initial": 3, "steps_finetune": 2, "batch_size": 2,
        "pool": {"raw": f"{data}:raw", "label": f"{data}:label", "region": [[0, 3]]},
        "test": {"raw": f"{data}:raw", "label": f"{data}:label", "region": [[3, 4], [0, 64], [0, 64]]},
        "model": {"depth": 2, "base_width": 4, "norm": "batch"}, "optim": {"lr": 0.01},
    }
    cfg.update(extra)
    path = tmp_path / "sim.toml"
    path.write_text(to_toml(cfg))
    return path


class _Stop(Exception):
    pass


def test_simulate_rows_resume_and_cli(trained, tmp_path):
    _, data, vol = trained
    config = load_simulate_config(_sim_config(tmp_path, data))
    full = run_simulation(config, tmp_path / "a", runtime=Runtime(device="cpu"), plot=False)
    assert full.computed == full.total == 6
    keys = [(r["strategy"], r["seed"], r["iteration"], r["n_labelled"]) for r in full.rows]
    assert keys == [(s, 0, it, 2 + 2 * it) for s in ("random", "entropy") for it in range(3)]
    with open(tmp_path / "a" / "curves.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert list(csv_rows[0]) == ["strategy", "seed", "iteration", "n_labelled", "jaccard_0", "jaccard_1",
                                 "jaccard_2", "mean_fg_jaccard", "cost_s", "n_dense", "n_partial", "n_presence",
                                 "fp_rate", "fp_rate_1", "fp_rate_2"]
    assert len(csv_rows) == 6
    for r in full.rows:
        assert r["mean_fg_jaccard"] == pytest.approx(np.nanmean([r["jaccard_1"], r["jaccard_2"]]), nan_ok=True)
    # same initial set and network: identical iteration-0 rows
    assert full.rows[0]["jaccard_0"] == full.rows[3]["jaccard_0"]
    # picks are distinct grid boxes outside the initial set
    init = json.loads((tmp_path / "a" / "runs" / "seed_0" / "initial.json").read_text())["offsets"]
    for s in ("random", "entropy"):
        st = json.loads((tmp_path / "a" / "runs" / "seed_0" / s / "state.json").read_text())
        chosen = init + [o for sel in st["offsets"] for o in sel]
        assert len({tuple(o) for o in chosen}) == 6
        assert all(o[1] % 32 == 0 and o[2] % 32 == 0 and o[0] < 3 for o in chosen)

    # interrupted after 3 new rows, then continued: only the missing rows are computed
    def stop_after_three(event, seen=[]):
        if event["event"] == "row" and event["computed"]:
            seen.append(1)
            if len(seen) == 3:
                raise _Stop

    with pytest.raises(_Stop):
        run_simulation(config, tmp_path / "b", runtime=Runtime(device="cpu"), progress=stop_after_three, plot=False)
    with open(tmp_path / "b" / "curves.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 3

    # interrupted again between a selection (already stored) and its fine-tuning
    def stop_before_training(event):
        if event["event"] == "phase" and event["phase"] == "train" and event["iteration"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        run_simulation(config, tmp_path / "b", runtime=Runtime(device="cpu"), progress=stop_before_training, plot=False)
    resumed = run_simulation(config, tmp_path / "b", runtime=Runtime(device="cpu"), plot=False)
    assert resumed.computed == 1
    assert [r["n_labelled"] for r in resumed.rows] == [r["n_labelled"] for r in full.rows]
    cols = ["jaccard_0", "jaccard_1", "jaccard_2", "mean_fg_jaccard"]
    assert [[r[c] for c in cols] for r in resumed.rows] == [
        pytest.approx([r[c] for c in cols], nan_ok=True) for r in full.rows]

    # a finished folder returns at once with the same rows, through the CLI too
    res = _run(["query", "simulate", str(tmp_path / "sim.toml"), "--out", str(tmp_path / "a"), "--json",
                "--no-plot", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["computed"] == 0 and len(doc["rows"]) == 6
    assert [r["jaccard_0"] for r in doc["rows"]] == pytest.approx([r["jaccard_0"] for r in full.rows])
    # another configuration in the same folder is refused
    other = load_simulate_config(tmp_path / "sim.toml", overrides={"steps_finetune": 5})
    with pytest.raises(InputError, match="different configuration"):
        run_simulation(other, tmp_path / "a", runtime=Runtime(device="cpu"), plot=False)


def test_simulate_config_errors(trained, tmp_path):
    _, data, _ = trained
    with pytest.raises(InputError, match="dropout"):
        load_simulate_config(_sim_config(tmp_path, data, strategies=["bald"]))
    with pytest.raises(InputError, match="unknown key"):
        load_simulate_config(_sim_config(tmp_path, data, typo=1))
    with pytest.raises(InputError, match="unknown strategy"):
        load_simulate_config(_sim_config(tmp_path, data, strategies=["nope"]))
    bad = CliRunner().invoke(cli, ["query", "simulate", str(tmp_path / "sim.toml"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown strategy" in bad.output
    with pytest.raises(InputError, match="candidates"):
        load_simulate_config(_sim_config(tmp_path, data, candidates=3))
