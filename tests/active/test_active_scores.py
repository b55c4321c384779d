"""Tests of the active-learning scores and selectors against direct numpy/scipy references."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from emseg.active import (
    STRATEGIES,
    BaldAccumulator,
    bald,
    entropy,
    get_strategy,
    hybrid_select,
    kcenter_greedy,
    kmeans_select,
    least_confidence,
    random_select,
    select_top,
)
from emseg.active.selection.diversity import kcenter_greedy_naive

SPATIAL = [(6, 7), (3, 4, 5)]


# ----------------------------------------------------------------------------- references
def _softmax_np(logits: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _random_probs(rng: np.random.Generator, shape: tuple[int, ...], axis: int = 1) -> np.ndarray:
    p = _softmax_np(rng.normal(scale=2.0, size=shape), axis=axis)
    # Plant exact zeros/ones so the 0 log 0 convention is exercised.
    flat = np.moveaxis(p, axis, -1).reshape(-1, shape[axis])
    flat[::7] = 0.0
    flat[::7, 0] = 1.0
    return np.moveaxis(flat.reshape(np.moveaxis(p, axis, -1).shape), -1, axis)


def _np_entropy_map(p: np.ndarray, axis: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=axis)


def _np_reduce(m: np.ndarray, reduction: str) -> np.ndarray:
    if reduction == "none":
        return m
    axes = tuple(range(1, m.ndim))
    return m.mean(axis=axes) if reduction == "mean" else m.sum(axis=axes)


def _brute_kcenter(x: np.ndarray, n: int, labeled: list[int], first: int | None) -> list[int]:
    """Greedy k-center on the full pairwise distance matrix."""
    dist = cdist(x, x)  # (N, N) Euclidean
    chosen = list(labeled)
    picks: list[int] = []
    if not labeled or first is not None:
        if first is None:
            first = int(np.argmax(cdist(x, x.mean(axis=0, keepdims=True))[:, 0]))
        picks.append(first)
        chosen.append(first)
    while len(picks) < n:
        cover = dist[:, chosen].min(axis=1)
        cover[chosen] = -np.inf
        nxt = int(np.flatnonzero(cover == cover.max())[0])
        picks.append(nxt)
        chosen.append(nxt)
    return picks


# ----------------------------------------------------------------------------- scores
@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_entropy_and_least_confidence_match_numpy(spatial, reduction):
    rng = np.random.default_rng(0)
    p = _random_probs(rng, (3, 4, *spatial))
    pt = torch.from_numpy(p)
    before = pt.clone()

    got_h = entropy(pt, reduction=reduction)
    np.testing.assert_allclose(got_h.numpy(), _np_reduce(_np_entropy_map(p, 1), reduction), rtol=1e-12, atol=1e-12)

    lc_map = 1.0 - np.max(p, axis=1)
    got_lc = least_confidence(pt, reduction=reduction)
    np.testing.assert_allclose(got_lc.numpy(), _np_reduce(lc_map, reduction), rtol=1e-12, atol=1e-12)

    assert got_h.dtype == torch.float64
    assert torch.equal(pt, before)  # input untouched


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_entropy_extremes(n_classes):
    uniform = torch.full((2, n_classes, 4, 5), 1.0 / n_classes, dtype=torch.float64)
    torch.testing.assert_close(entropy(uniform), torch.full((2,), math.log(n_classes), dtype=torch.float64))
    torch.testing.assert_close(
        least_confidence(uniform), torch.full((2,), 1 - 1 / n_classes, dtype=torch.float64)
    )

    labels = torch.randint(0, n_classes, (2, 3, 4, 5), generator=torch.Generator().manual_seed(1))
    onehot = torch.nn.functional.one_hot(labels, n_classes).movedim(-1, 1).to(torch.float32)
    for fn in (entropy, least_confidence):
        out = fn(onehot, reduction="none")
        assert not torch.isnan(out).any()
        assert torch.equal(out, torch.zeros_like(out))

    # Random distributions never exceed log C.
    rnd = torch.softmax(torch.randn(4, n_classes, 6, 6, dtype=torch.float64), dim=1)
    assert (entropy(rnd, reduction="none") <= math.log(n_classes) + 1e-12).all()


def test_single_channel_is_sigmoid_foreground():
    fg = torch.tensor([[[[0.0, 1.0], [0.25, 0.5]]]], dtype=torch.float64)  # (1, 1, 2, 2)
    two = torch.cat([1 - fg, fg], dim=1)
    for fn in (entropy, least_confidence):
        torch.testing.assert_close(fn(fg, reduction="none"), fn(two, reduction="none"))
    q = 0.25
    expected = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    assert entropy(fg, reduction="none")[0, 1, 0].item() == pytest.approx(expected)
    assert entropy(fg, reduction="none")[0, 0, 0].item() == 0.0


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bald_matches_numpy_and_streaming(spatial, reduction):
    rng = np.random.default_rng(3)
    n_passes = 6
    mc = _random_probs(rng, (n_passes, 2, 3, *spatial), axis=2)
    mean_p = mc.mean(axis=0)
    mi = _np_entropy_map(mean_p, 1) - _np_entropy_map(mc, 2).mean(axis=0)
    expected = _np_reduce(np.maximum(mi, 0.0), reduction)

    mct = torch.from_numpy(mc)
    np.testing.assert_allclose(bald(mct, reduction=reduction).numpy(), expected, rtol=1e-10, atol=1e-12)

    acc = BaldAccumulator()
    for t in range(n_passes):
        acc.update(mct[t])
    assert acc.n_passes == n_passes
    np.testing.assert_allclose(acc.result(reduction).numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(acc.mean_probs().numpy(), mean_p, rtol=1e-12)
    # An iterable of passes (e.g. a generator of forward passes) gives the same scores.
    np.testing.assert_allclose(
        bald((mct[t] for t in range(n_passes)), reduction=reduction).numpy(), expected, rtol=1e-10, atol=1e-12
    )


def test_bald_zero_when_passes_agree_and_max_when_they_split():
    p = torch.softmax(torch.randn(3, 4, 5, 6, 7), dim=1)  # float32 on purpose: round-off
    agree = p.unsqueeze(0).expand(8, *p.shape)
    out = bald(agree, reduction="none")
    assert (out >= 0).all()  # clamped, never negative
    assert out.max().item() < 1e-6

    # Half of the passes say class 0 for sure, half say class 1: MI = log 2 everywhere.
    a = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    a[:, 0] = 1.0
    split = torch.stack([a, a.flip(1), a, a.flip(1)])
    torch.testing.assert_close(bald(split), torch.tensor([math.log(2)], dtype=torch.float64))


def test_bald_accumulator_memory_is_independent_of_passes():
    acc = BaldAccumulator()
    for _ in range(20):
        acc.update(torch.rand(2, 1, 4, 4))
    state = [v for v in vars(acc).values() if isinstance(v, torch.Tensor)]
    assert sum(s.numel() for s in state) == 2 * 2 * 4 * 4 + 2 * 4 * 4


def test_score_argument_errors():
    p = torch.full((1, 2, 3, 3), 0.5)
    with pytest.raises(ValueError, match="reduction"):
        entropy(p, reduction="max")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        least_confidence(p * 3)
    with pytest.raises(ValueError, match="floating-point"):
        entropy(torch.ones(1, 2, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least"):
        entropy(torch.ones(4))
    with pytest.raises(ValueError, match="differs"):
        acc = BaldAccumulator()
        acc.update(p)
        acc.update(torch.full((1, 2, 3, 4), 0.5))
    with pytest.raises(ValueError, match="no pass"):
        BaldAccumulator().result()
    with pytest.raises(ValueError, match="no pass"):
        bald([])


def test_bald_matches_baal():
    baal_heuristics = pytest.importorskip("baal.active.heuristics")
    rng = np.random.default_rng(5)
    mc = _random_probs(rng, (10, 7, 3), axis=2)  # (T, B, C)
    ours = bald(torch.from_numpy(mc)).numpy()
    theirs = baal_heuristics.BALD().compute_score(np.moveaxis(mc, 0, -1))  # (B, C, T)
    np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- simple selectors
def test_select_top_matches_lexsort_with_ties():
    rng = np.random.default_rng(2)
    s = rng.integers(0, 5, size=40).astype(np.float64)  # many ties
    expected = np.lexsort((np.arange(40), -s))[:12]
    assert select_top(torch.from_numpy(s), 12).tolist() == expected.tolist()
    assert select_top(torch.from_numpy(s), 0).numel() == 0
    with pytest.raises(ValueError, match="NaN"):
        select_top(torch.tensor([0.1, float("nan")]), 1)
    with pytest.raises(ValueError, match="cannot select"):
        select_top(torch.zeros(3), 4)


def test_random_select_distinct_seeded_and_uniform():
    a = random_select(50, 20, rng=7)
    assert a.dtype == torch.int64 and len(set(a.tolist())) == 20
    assert all(0 <= i < 50 for i in a.tolist())
    assert torch.equal(a, random_select(50, 20, rng=7))
    assert not torch.equal(a, random_select(50, 20, rng=8))
    # Each index is drawn with probability n / N = 0.2 (binomial, 2000 draws, 5 sigma).
    gen = np.random.default_rng(0)
    counts = np.zeros(10)
    for _ in range(2000):
        counts[random_select(10, 2, gen).numpy()] += 1
    assert np.all(np.abs(counts - 400) < 5 * math.sqrt(2000 * 0.2 * 0.8))
    with pytest.raises(ValueError, match="cannot select"):
        random_select(3, 4)


# ----------------------------------------------------------------------------- k-center greedy
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n_labeled", [0, 1, 25])
def test_kcenter_greedy_matches_bruteforce(seed, n_labeled):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(500, 8)) * rng.uniform(0.5, 2.0, size=8)
    labeled = sorted(rng.choice(500, size=n_labeled, replace=False).tolist())
    expected = _brute_kcenter(x, 40, labeled, first=None)
    xt = torch.from_numpy(x)
    before = xt.clone()
    fast = kcenter_greedy(xt, 40, labeled_idx=labeled or None)
    naive = kcenter_greedy_naive(xt, 40, labeled_idx=labeled or None)
    assert fast.tolist() == expected
    assert naive.tolist() == expected
    assert torch.equal(xt, before)
    assert not set(expected) & set(labeled)

    # An explicit first pick, and an rng-drawn first pick (reproducible per seed).
    first = int(rng.integers(500))
    if first in labeled:
        first = next(i for i in range(500) if i not in labeled)
    expected_first = _brute_kcenter(x, 15, labeled, first=first)
    assert kcenter_greedy(xt, 15, labeled_idx=labeled, first=first).tolist() == expected_first
    if not labeled:
        r1 = kcenter_greedy(xt, 10, rng=seed)
        assert torch.equal(r1, kcenter_greedy(xt, 10, rng=seed))
        assert r1.tolist() == _brute_kcenter(x, 10, [], first=int(r1[0]))


def test_kcenter_greedy_ties_duplicates_and_masks():
    x = torch.tensor([[0.0], [2.0], [-2.0], [2.0], [0.0]], dtype=torch.float64)
    # From centre 0, samples 1, 2, 3 are all at distance 2: lowest index wins.
    assert kcenter_greedy(x, 1, labeled_idx=[0]).tolist() == [1]
    # Duplicates of chosen/labelled samples (distance 0) are picked only after everything
    # else, and labelled samples never.
    out = kcenter_greedy(x, 4, labeled_idx=[0])
    assert out.tolist() == [1, 2, 3, 4]
    mask = torch.tensor([True, False, False, False, False])
    assert kcenter_greedy(x, 4, labeled_idx=mask).tolist() == out.tolist()
    assert kcenter_greedy_naive(x, 4, labeled_idx=[0]).tolist() == out.tolist()
    with pytest.raises(ValueError, match="already labelled"):
        kcenter_greedy(x, 5, labeled_idx=[0])
    with pytest.raises(ValueError, match="labeled_idx"):
        kcenter_greedy(x, 1, labeled_idx=[7])
    with pytest.raises(ValueError, match="already labelled"):
        kcenter_greedy(x, 1, labeled_idx=[0], first=0)


def test_kcenter_greedy_float32_and_integer_embeddings():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    fast = kcenter_greedy(torch.from_numpy(x), 20)
    assert fast.tolist() == _brute_kcenter(x.astype(np.float64), 20, [], None)
    grid = torch.tensor([[0, 0], [10, 0], [0, 10], [10, 10], [5, 5]])  # int64
    assert set(kcenter_greedy(grid, 4, labeled_idx=[4]).tolist()) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- k-means
def _blobs(seed: int, n_blobs: int = 6, per_blob: int = 30, dim: int = 5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_blobs, dim)) * 100.0
    x = np.concatenate([c + rng.normal(size=(per_blob, dim)) for c in centres])
    perm = rng.permutation(len(x))
    labels = np.repeat(np.arange(n_blobs), per_blob)[perm]
    return x[perm], labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_select_one_per_blob_nearest_blob_mean(seed):
    x, labels = _blobs(seed)
    sel = kmeans_select(torch.from_numpy(x), 6, rng=seed)
    assert sel.dtype == torch.int64 and sel.shape == (6,)
    assert sorted(labels[sel.numpy()].tolist()) == list(range(6))
    # Converged clusters are the blobs, so each pick is the blob member nearest its mean.
    for i in sel.tolist():
        members = np.flatnonzero(labels == labels[i])
        d = cdist(x[members], x[members].mean(axis=0, keepdims=True))[:, 0]
        assert i == members[np.argmin(d)]


def test_kmeans_select_deterministic_and_distinct():
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.normal(size=(200, 3)))
    a = kmeans_select(x, 12, rng=11)
    assert torch.equal(a, kmeans_select(x, 12, rng=11))
    assert torch.equal(a, kmeans_select(x, 12, rng=np.random.default_rng(11)))
    assert len(set(a.tolist())) == 12
    seeds_differ = any(not torch.equal(a, kmeans_select(x, 12, rng=s)) for s in range(12, 16))
    assert seeds_differ
    # Only three distinct points but five clusters: indices stay distinct.
    dup = torch.tensor([[0.0, 0.0]] * 4 + [[1.0, 1.0]] * 3 + [[5.0, 5.0]] * 3)
    out = kmeans_select(dup, 5, rng=0)
    assert len(set(out.tolist())) == 5
    assert {tuple(dup[i].tolist()) for i in out.tolist()} == {(0.0, 0.0), (1.0, 1.0), (5.0, 5.0)}
    assert kmeans_select(x, 0, rng=0).numel() == 0
    with pytest.raises(ValueError, match="cannot select"):
        kmeans_select(x, 201)


# ----------------------------------------------------------------------------- hybrid
@pytest.mark.parametrize("seed", [0, 1])
def test_hybrid_select_within_top_m_and_kcenter_among_them(seed):
    rng = np.random.default_rng(seed)
    n_total, n = 300, 10
    x = rng.normal(size=(n_total, 6))
    s = rng.random(n_total)
    labeled = rng.choice(n_total, size=20, replace=False).tolist()

    # Default top_m = 4 n, computed among unlabelled samples.
    free = np.setdiff1d(np.arange(n_total), labeled)
    cand = free[np.argsort(-s[free], kind="stable")[: 4 * n]]
    out = hybrid_select(torch.from_numpy(s), torch.from_numpy(x), n, labeled_idx=labeled)
    assert set(out.tolist()) <= set(cand.tolist())
    assert len(set(out.tolist())) == n and not set(out.tolist()) & set(labeled)
    # Same as brute-force k-center on candidates + labelled centres.
    sub = np.concatenate([x[cand], x[labeled]])
    local = _brute_kcenter(sub, n, list(range(len(cand), len(sub))), first=None)
    assert out.tolist() == cand[local].tolist()

    # No labelled set: first pick is the most uncertain sample.
    top = np.argsort(-s, kind="stable")
    out2 = hybrid_select(torch.from_numpy(s), torch.from_numpy(x), n, top_m=25)
    assert int(out2[0]) == top[0] and set(out2.tolist()) <= set(top[:25].tolist())
    # top_m == n reduces to plain top-n uncertainty.
    out3 = hybrid_select(torch.from_numpy(s), torch.from_numpy(x), n, top_m=n)
    assert sorted(out3.tolist()) == sorted(top[:n].tolist())
    with pytest.raises(ValueError, match="top_m"):
        hybrid_select(torch.from_numpy(s), torch.from_numpy(x), n, top_m=n - 1)


# ----------------------------------------------------------------------------- registry
def test_registry():
    assert set(STRATEGIES) == {"random", "entropy", "least_confidence", "bald", "kmeans", "coreset", "hybrid"}
    kinds = {k: v.kind for k, v in STRATEGIES.items()}
    assert kinds == {
        "random": "random", "entropy": "uncertainty", "least_confidence": "uncertainty",
        "bald": "uncertainty", "kmeans": "diversity", "coreset": "diversity", "hybrid": "hybrid",
    }
    assert [k for k, v in STRATEGIES.items() if v.needs_mc_dropout] == ["bald"]
    assert {k for k, v in STRATEGIES.items() if v.needs_embeddings} == {"kmeans", "coreset", "hybrid"}
    assert get_strategy("BALD") is STRATEGIES["bald"]
    assert get_strategy("least-confidence").score_fn is least_confidence
    with pytest.raises(ValueError, match="valid names: bald, coreset, entropy, hybrid, kmeans"):
        get_strategy("margin")
    with pytest.raises(dataclasses.FrozenInstanceError):
        STRATEGIES["entropy"].kind = "random"  # type: ignore[misc]

    # Each uncertainty strategy's select_fn ranks its score_fn output.
    p = torch.softmax(torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    st = get_strategy("entropy")
    scores = st.score_fn(p, "mean")
    assert st.select_fn(scores, 2).tolist() == np.argsort(-scores.numpy(), kind="stable")[:2].tolist()
