from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from emseg.losses import LazyNLLLoss, dmi_loss, iou_loss, lazy_nll, soft_dice_loss

# --------------------------------------------------------------------------- references


def np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    ez = np.exp(z)
    return ez / ez.sum(axis=axis, keepdims=True)


def ref_lazy_nll(logits, target, labeled=None, not_present=None, cw=None, ew=None) -> float:
    """Dense float64 evaluation of the lazy-label NLL with explicit one-hot arrays."""
    logits = np.asarray(logits, dtype=np.float64)
    target = np.asarray(target)
    B, K = logits.shape[:2]
    V = int(np.prod(logits.shape[2:], dtype=np.int64))
    x = logits.reshape(B, K, V)
    t = target.reshape(B, V)
    p = np_softmax(x, axis=1)
    onehot = np.zeros((B, K, V))
    for b in range(B):
        for v in range(V):
            if t[b, v] >= 0:
                onehot[b, t[b, v], v] = 1.0
    lab = np.ones((B, K)) if labeled is None else np.asarray(labeled, dtype=np.float64)
    npr = np.zeros((B, K)) if not_present is None else np.asarray(not_present, dtype=np.float64)
    w = np.ones(K) if cw is None else np.asarray(cw, dtype=np.float64)
    e = np.ones((B, V)) if ew is None else np.asarray(ew, dtype=np.float64).reshape(B, V)
    sel = onehot * lab[:, :, None]
    up = -np.sum(sel * w[None, :, None] * e[:, None, :] * np.log(p))
    down = -np.sum(npr[:, :, None] * w[None, :, None] * e[:, None, :] * np.log(1.0 - p))
    denom = max(sel.sum() + V * npr.sum(), 1.0)
    return float((up + down) / denom)


def random_problem(rng: np.random.Generator, B: int, K: int, spatial: tuple[int, ...], *, masks=True):
    logits = rng.normal(0.0, 2.0, size=(B, K, *spatial))
    target = rng.integers(-1, K, size=(B, *spatial))
    out = {"logits": logits, "target": target}
    if masks:
        out["labeled"] = (rng.random((B, K)) < 0.6).astype(np.float64)
        out["not_present"] = (rng.random((B, K)) < 0.3).astype(np.float64)
        out["cw"] = rng.uniform(0.2, 3.0, size=K)
        out["ew"] = rng.uniform(0.0, 2.0, size=(B, *spatial))
    return out


def call_lazy(prob: dict, dtype=torch.float64, **kw) -> torch.Tensor:
    def opt(name):
        return None if name not in prob else torch.tensor(prob[name], dtype=dtype)

    return lazy_nll(
        torch.tensor(prob["logits"], dtype=dtype),
        torch.tensor(prob["target"], dtype=torch.long),
        labeled=opt("labeled"),
        not_present=opt("not_present"),
        class_weights=opt("cw"),
        example_weights=opt("ew"),
        **kw,
    )


def ref_from(prob: dict) -> float:
    return ref_lazy_nll(
        prob["logits"], prob["target"], prob.get("labeled"), prob.get("not_present"),
        prob.get("cw"), prob.get("ew"),
    )


# --------------------------------------------------------------------------- lazy_nll


@pytest.mark.parametrize("spatial", [(7,), (4, 5), (3, 4, 5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lazy_nll_matches_dense_reference(spatial, seed):
    rng = np.random.default_rng(seed)
    prob = random_problem(rng, B=2 + seed % 2, K=3 + seed, spatial=spatial)
    expected = ref_from(prob)
    got64 = float(call_lazy(prob, torch.float64))
    got32 = float(call_lazy(prob, torch.float32))
    assert got64 == pytest.approx(expected, rel=1e-10)
    assert got32 == pytest.approx(expected, rel=1e-5)


def test_lazy_nll_mask_dtypes_equivalent():
    rng = np.random.default_rng(5)
    prob = random_problem(rng, 2, 4, (3, 3))
    logits = torch.tensor(prob["logits"])
    target = torch.tensor(prob["target"])
    lab, npr = prob["labeled"], prob["not_present"]
    values = [
        float(lazy_nll(logits, target, labeled=torch.tensor(lab, dtype=dt),
                       not_present=torch.tensor(npr, dtype=dt)))
        for dt in (torch.bool, torch.int64, torch.float32, torch.float64)
    ]
    expected = ref_lazy_nll(prob["logits"], prob["target"], lab, npr)
    assert values == pytest.approx([expected] * 4, rel=1e-10)


@pytest.mark.parametrize("spatial", [(6,), (3, 4), (2, 3, 4)])
def test_lazy_nll_without_masks_is_cross_entropy(spatial):
    rng = np.random.default_rng(sum(spatial))
    logits = torch.tensor(rng.normal(size=(3, 4, *spatial)), dtype=torch.float32)
    target = torch.tensor(rng.integers(-1, 4, size=(3, *spatial)))
    expected = F.cross_entropy(logits, target, ignore_index=-1)
    assert float(lazy_nll(logits, target)) == pytest.approx(float(expected), rel=1e-6)


def test_lazy_nll_all_ignored_is_zero_with_zero_grad():
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    target = torch.full((2, 4, 4), -1)
    loss = lazy_nll(logits, target)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_lazy_nll_unlabeled_class_voxels_do_not_matter():
    # Changing logits only at voxels whose target class is not labelled leaves the loss unchanged.
    rng = np.random.default_rng(3)
    logits = torch.tensor(rng.normal(size=(1, 3, 8, 8)))
    target = torch.tensor(rng.integers(0, 3, size=(1, 8, 8)))
    labeled = torch.tensor([[1.0, 0.0, 1.0]])
    base = lazy_nll(logits, target, labeled=labeled)
    changed = logits.clone()
    changed[:, :, target[0] == 1] += torch.tensor(rng.normal(size=(3, int((target == 1).sum()))))
    assert float(lazy_nll(changed, target, labeled=labeled)) == pytest.approx(float(base), rel=1e-12)


def test_lazy_nll_gradcheck():
    rng = np.random.default_rng(11)
    prob = random_problem(rng, B=2, K=3, spatial=(2, 3))
    logits = torch.tensor(prob["logits"], dtype=torch.float64, requires_grad=True)
    kwargs = dict(
        labeled=torch.tensor(prob["labeled"]),
        not_present=torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]),
        class_weights=torch.tensor(prob["cw"]),
    )
    ew = torch.tensor(prob["ew"], dtype=torch.float64, requires_grad=True)
    target = torch.tensor(prob["target"])
    assert torch.autograd.gradcheck(
        lambda lg, e: lazy_nll(lg, target, example_weights=e, **kwargs), (logits, ew)
    )


def test_lazy_nll_extreme_logits_finite():
    torch.manual_seed(0)
    signs = torch.randint(0, 2, (2, 3, 5, 5)).double() * 2 - 1
    logits = (1e4 * signs).requires_grad_(True)
    target = torch.randint(-1, 3, (2, 5, 5))
    npr = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    for dtype in (torch.float32, torch.float64):
        lg = logits.detach().to(dtype).requires_grad_(True)
        loss = lazy_nll(lg, target, not_present=npr.to(dtype))
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(lg.grad).all()


def test_lazy_nll_not_present_class_with_p_one():
    # Two classes, class 0 dominates by 2e4 everywhere but is flagged absent: p_0 == 1.0 in
    # floating point, yet log(1 - p_0) = -2e4 exactly and the gradient is finite.
    V = 6
    logits = torch.zeros(1, 2, V, dtype=torch.float32)
    logits[:, 0] = 1e4
    logits[:, 1] = -1e4
    logits.requires_grad_(True)
    target = torch.full((1, V), -1)
    npr = torch.tensor([[1.0, 0.0]])
    loss = lazy_nll(logits, target, not_present=npr)
    loss.backward()
    # loss = -(1/V) * V * log(1 - p0) = 2e4 (up to exp(-2e4) terms)
    assert loss.item() == pytest.approx(2e4, rel=1e-6)
    assert torch.isfinite(logits.grad).all()
    # d/dx0 of -(lse_rest - lse_all)/V = p0/V = 1/V; d/dx1 = -(1 - p1)/V = -1/V
    assert torch.allclose(logits.grad[0, 0], torch.full((V,), 1.0 / V))
    assert torch.allclose(logits.grad[0, 1], torch.full((V,), -1.0 / V))


def test_lazy_nll_does_not_modify_inputs():
    rng = np.random.default_rng(4)
    prob = random_problem(rng, 2, 3, (3, 4))
    tensors = {
        "logits": torch.tensor(prob["logits"], requires_grad=True),
        "target": torch.tensor(prob["target"]),
        "labeled": torch.tensor(prob["labeled"]),
        "not_present": torch.tensor(prob["not_present"]),
        "class_weights": torch.tensor(prob["cw"]),
        "example_weights": torch.tensor(prob["ew"]),
    }
    before = {k: v.detach().clone() for k, v in tensors.items()}
    lazy_nll(**tensors).backward()
    for k, v in tensors.items():
        assert torch.equal(v.detach(), before[k]), k


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(target=a["target"][:, :2]), "target shape"),
        (lambda a: a.update(target=a["target"].float()), "integer"),
        (lambda a: a.update(target=a["target"] + 5), "target values"),
        (lambda a: a.update(target=a["target"] - 2), "target values"),
        (lambda a: a.update(labeled=torch.ones(2, 4)), "labeled shape"),
        (lambda a: a.update(not_present=torch.ones(3, 3)), "not_present shape"),
        (lambda a: a.update(class_weights=torch.ones(4)), "class_weights shape"),
        (lambda a: a.update(class_weights=-torch.ones(3)), "non-negative"),
        (lambda a: a.update(example_weights=torch.ones(2, 3)), "example_weights shape"),
        (lambda a: a.update(logits=torch.ones(2)), "logits must have shape"),
        (lambda a: a.update(logits=a["logits"].long()), "floating"),
    ],
)
def test_lazy_nll_validation(change, match):
    args = {
        "logits": torch.randn(2, 3, 4, 4),
        "target": torch.randint(-1, 3, (2, 4, 4)),
        "labeled": torch.ones(2, 3),
        "not_present": torch.zeros(2, 3),
        "class_weights": torch.ones(3),
        "example_weights": torch.ones(2, 4, 4),
    }
    change(args)
    with pytest.raises(ValueError, match=match):
        lazy_nll(**args)


def test_lazy_nll_module_wrapper():
    rng = np.random.default_rng(8)
    prob = random_problem(rng, 2, 3, (4, 4))
    crit = LazyNLLLoss(class_weights=prob["cw"].tolist()).double()
    assert "class_weights" in crit.state_dict()
    got = crit(
        torch.tensor(prob["logits"]),
        torch.tensor(prob["target"]),
        labeled=torch.tensor(prob["labeled"]),
        not_present=torch.tensor(prob["not_present"]),
        example_weights=torch.tensor(prob["ew"]),
    )
    assert float(got) == pytest.approx(ref_from(prob), rel=1e-6)
    plain = LazyNLLLoss()
    lg = torch.tensor(prob["logits"])
    tg = torch.tensor(prob["target"])
    assert float(plain(lg, tg)) == pytest.approx(float(F.cross_entropy(lg, tg, ignore_index=-1)))


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    K=st.integers(2, 5),
    spatial=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    seed=st.integers(0, 2**32 - 1),
    masks=st.booleans(),
)
def test_lazy_nll_property_matches_reference(B, K, spatial, seed, masks):
    prob = random_problem(np.random.default_rng(seed), B, K, spatial, masks=masks)
    loss = call_lazy(prob)
    assert float(loss) >= 0.0
    assert float(loss) == pytest.approx(ref_from(prob), rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------- binary losses


def ref_overlap(p, t, m, kind, eps, per_sample=True):
    p = np.asarray(p, np.float64)
    t = np.asarray(t)
    m = np.asarray(m, np.float64) * (t != -1)
    tt = (t == 1).astype(np.float64)
    rows = range(p.shape[0]) if per_sample else [None]
    vals = []
    for b in rows:
        pb, tb, mb = (p, tt, m) if b is None else (p[b], tt[b], m[b])
        inter = np.sum(pb * tb * mb)
        sp, st_ = np.sum(pb * mb), np.sum(tb * mb)
        if kind == "dice":
            vals.append(1 - (2 * inter + eps) / (sp + st_ + eps))
        else:
            vals.append(1 - (inter + eps) / (sp + st_ - inter + eps))
    return float(np.mean(vals))


@pytest.mark.parametrize("fn, kind", [(soft_dice_loss, "dice"), (iou_loss, "iou")])
@pytest.mark.parametrize("spatial", [(9,), (4, 5), (2, 3, 4)])
@pytest.mark.parametrize("per_sample", [True, False])
def test_overlap_losses_match_numpy(fn, kind, spatial, per_sample):
    rng = np.random.default_rng(len(spatial))
    p = rng.random((3, *spatial))
    t = rng.integers(-1, 2, size=(3, *spatial))
    m = (rng.random((3, *spatial)) < 0.8).astype(np.float64)
    got = fn(torch.tensor(p)[:, None], torch.tensor(t), torch.tensor(m), eps=1e-6,
             per_sample=per_sample)
    assert float(got) == pytest.approx(ref_overlap(p, t, m, kind, 1e-6, per_sample), rel=1e-10)
    # No mask: only the -1 voxels are excluded.
    got = fn(torch.tensor(p), torch.tensor(t), per_sample=per_sample)
    expected = ref_overlap(p, t, np.ones_like(p), kind, 1e-6, per_sample)
    assert float(got) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("fn", [soft_dice_loss, iou_loss])
def test_overlap_losses_limits_and_grad(fn):
    t = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]])
    # perfect prediction (including an empty target predicted empty) -> 0
    assert float(fn(t.double(), t)) == pytest.approx(0.0, abs=1e-9)
    # complete miss on a non-empty target -> ~1
    assert float(fn(1.0 - t[:1].double(), t[:1])) == pytest.approx(1.0, abs=1e-6)
    p = torch.rand(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    tt = torch.randint(0, 2, (2, 3, 3))
    assert torch.autograd.gradcheck(lambda x: fn(x, tt), (p,))


def ref_dmi(p, t, m, eps):
    p = np.asarray(p, np.float64).ravel()
    t = np.asarray(t).ravel()
    keep = (np.asarray(m).ravel() > 0) & (t != -1)
    p, t = p[keep], t[keep]
    P = np.stack([1 - p, p], axis=1)
    S = np.stack([t == 0, t == 1], axis=1).astype(np.float64)
    n = len(p)
    U = P.T @ S / n
    return float(-np.log(abs(np.linalg.det(U)) + eps / n**2))


@pytest.mark.parametrize("shape", [(2, 1, 5, 6), (3, 4, 5)])
def test_dmi_matches_numpy(shape):
    rng = np.random.default_rng(len(shape))
    p = rng.random(shape)
    tshape = (shape[0], *shape[2:]) if len(shape) == 4 else shape
    t = rng.integers(-1, 2, size=tshape)
    m = (rng.random(tshape) < 0.7).astype(np.float64)
    # make the target informative so that det(U) is not ~0
    p = np.where(np.reshape(t == 1, p.shape), 0.6 + 0.4 * p, 0.5 * p)
    got = dmi_loss(torch.tensor(p), torch.tensor(t), torch.tensor(m), eps=1e-3)
    assert float(got) == pytest.approx(ref_dmi(p, t, m, 1e-3), rel=1e-10)
    got = dmi_loss(torch.tensor(p), torch.tensor(t), eps=0.0)
    assert float(got) == pytest.approx(ref_dmi(p, t, np.ones(tshape), 0.0), rel=1e-10)


def test_dmi_perfect_beats_random_and_is_differentiable():
    rng = np.random.default_rng(0)
    t = torch.tensor(rng.integers(0, 2, size=(2, 8, 8)))
    perfect = dmi_loss(t.double()[:, None], t)
    random = dmi_loss(torch.tensor(rng.random((2, 1, 8, 8))), t)
    n1 = float((t == 1).sum())
    n = t.numel()
    assert float(perfect) == pytest.approx(-math.log(n1 * (n - n1) / n**2 + 1e-3 / n**2), rel=1e-10)
    assert float(perfect) < float(random)
    p = torch.rand(1, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor([[[0, 1, 1], [0, 0, 1], [1, 0, -1]]])
    assert torch.autograd.gradcheck(lambda x: dmi_loss(x, tt), (p,))


def _sparse_case(fg_fraction, n=4096, seed=0):
    """Informative probabilities for a target with the given foreground fraction."""
    rng = np.random.default_rng(seed)
    t = np.zeros(n, np.int64)
    t[rng.choice(n, max(1, round(fg_fraction * n)), replace=False)] = 1
    p = np.where(t == 1, 0.55 + 0.3 * rng.random(n), 0.05 + 0.3 * rng.random(n))
    return p, t


def xu_dmi_grad(p, t):
    """Gradient of Xu et al.'s L = -log|det(U)|, U = P^T S unnormalised, from the closed form
    dL/dU = -U^{-T}: dL/dp_n = -(U^{-1}[t_n, 1] - U^{-1}[t_n, 0]) (float64, numpy)."""
    P = np.stack([1 - p, p], axis=1)
    S = np.stack([t == 0, t == 1], axis=1).astype(np.float64)
    inv = np.linalg.inv(P.T @ S)
    return -(inv[t, 1] - inv[t, 0])


def xu_dmi(p, t):
    P = np.stack([1 - p, p], axis=1)
    S = np.stack([t == 0, t == 1], axis=1).astype(np.float64)
    return float(-np.log(abs(np.linalg.det(P.T @ S))))


def test_dmi_gradient_matches_finite_differences_at_half_a_percent_foreground():
    p, t = _sparse_case(0.005, n=2 * 20 * 20, seed=1)
    assert int(t.sum()) == 4
    x = torch.tensor(p.reshape(2, 1, 20, 20), requires_grad=True)
    tt = torch.tensor(t.reshape(2, 20, 20))
    assert torch.autograd.gradcheck(lambda v: dmi_loss(v, tt), (x,), eps=1e-6, atol=1e-6, rtol=1e-4)
    # manual central differences of the independent numpy formula, at foreground and background voxels
    (grad,) = torch.autograd.grad(dmi_loss(x, tt), x)
    grad = grad.reshape(-1).numpy()
    h = 1e-6
    for i in [*np.flatnonzero(t == 1)[:4], *np.flatnonzero(t == 0)[:4]]:
        up, down = p.copy(), p.copy()
        up[i] += h
        down[i] -= h
        fd = (xu_dmi(up, t) - xu_dmi(down, t)) / (2 * h)
        assert grad[i] == pytest.approx(fd, rel=1e-5)


@pytest.mark.parametrize("fg", [0.5, 0.02, 0.005])
def test_dmi_gradient_does_not_shrink_with_sparsity(fg):
    p, t = _sparse_case(fg)
    x = torch.tensor(p, dtype=torch.float32, requires_grad=True)
    (grad,) = torch.autograd.grad(dmi_loss(x, torch.tensor(t)), x)
    ref = xu_dmi_grad(p, t)
    # float32 input, float64 determinant: the gradient is Xu et al.'s to float32 precision
    np.testing.assert_allclose(grad.double().numpy(), ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    # eps added to the normalised determinant would scale it by det_n / (det_n + eps), a loss of
    # more than a quarter here (and fivefold for the weaker separation of early training)
    n = p.size
    P = np.stack([1 - p, p], axis=1)
    S = np.stack([t == 0, t == 1], axis=1).astype(np.float64)
    det_n = np.linalg.det(P.T @ S / n)
    if fg <= 0.005:
        assert det_n / (det_n + 1e-3) < 0.75


def test_dmi_multiclass_matches_numpy_and_gradcheck():
    rng = np.random.default_rng(5)
    k = 3
    t = rng.integers(-1, k, size=(2, 6, 7))
    logits = rng.normal(size=(2, k, 6, 7)) + 2.0 * np.moveaxis(np.eye(k)[np.maximum(t, 0)], -1, 1)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = (rng.random(t.shape) < 0.8).astype(np.float64)
    keep = (m > 0).ravel() & (t.ravel() >= 0)
    P = np.moveaxis(probs, 1, -1).reshape(-1, k)[keep]
    S = np.eye(k)[t.ravel()[keep]]
    n = int(keep.sum())
    expected = -np.log(abs(np.linalg.det(P.T @ S)) + 1e-3) + k * np.log(n)
    got = dmi_loss(torch.tensor(probs), torch.tensor(t), torch.tensor(m))
    assert float(got) == pytest.approx(expected, rel=1e-10)
    # K = 2 in the class layout equals the binary layout
    p2 = torch.tensor(probs[:, :2] / probs[:, :2].sum(1, keepdims=True))
    t2 = torch.tensor(np.where(t == 2, 1, t))
    assert float(dmi_loss(p2, t2)) == pytest.approx(float(dmi_loss(p2[:, 1:], t2)), rel=1e-10)
    x = torch.tensor(probs, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: dmi_loss(v, torch.tensor(t)), (x,))
    with pytest.raises(ValueError, match="target values"):
        dmi_loss(x, torch.full((2, 6, 7), 3))


@pytest.mark.parametrize("fn", [soft_dice_loss, iou_loss, dmi_loss])
def test_binary_losses_validation_and_no_mutation(fn):
    p = torch.rand(2, 1, 4, 4)
    t = torch.randint(-1, 2, (2, 4, 4))
    m = torch.ones(2, 4, 4)
    before = (p.clone(), t.clone(), m.clone())
    fn(p, t, m)
    assert all(torch.equal(a, b) for a, b in zip((p, t, m), before))
    with pytest.raises(ValueError, match="shape"):
        fn(p, t[:, :3])
    with pytest.raises(ValueError, match="mask shape"):
        fn(p, t, m[:1])
    with pytest.raises(ValueError, match="target values"):
        fn(p, t + 2)
    with pytest.raises(ValueError, match="floating"):
        fn(t, t)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(2, 4),
    K=st.integers(2, 4),
    spatial=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
    seed=st.integers(0, 2**32 - 1),
    weighted=st.booleans(),
)
def test_lazy_nll_is_non_negative_and_fully_ignored_patches_get_no_gradient(B, K, spatial, seed, weighted):
    """Patches whose voxels are all ignored (and that flag no class as absent) add nothing."""
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn((B, K, *spatial), generator=gen, dtype=torch.float64)).requires_grad_()
    target = torch.randint(-1, K, (B, *spatial), generator=gen)
    ignored = torch.zeros(B, dtype=torch.bool)
    ignored[torch.randint(0, B, (1,), generator=gen)] = True  # at least one patch fully ignored
    target[ignored] = -1
    labeled = torch.randint(0, 2, (B, K), generator=gen).double()
    not_present = torch.randint(0, 2, (B, K), generator=gen).double()
    not_present[ignored] = 0.0
    weights = torch.rand(K, generator=gen, dtype=torch.float64) if weighted else None
    loss = lazy_nll(logits, target, labeled=labeled, not_present=not_present, class_weights=weights)
    assert float(loss.detach()) >= 0.0
    loss.backward()
    assert torch.all(logits.grad[ignored] == 0)
    # and the loss does not depend on what the ignored patches' logits are
    changed = logits.detach().clone()
    changed[ignored] = 100.0 * torch.randn_like(changed[ignored])
    again = lazy_nll(changed, target, labeled=labeled, not_present=not_present, class_weights=weights)
    assert float(again) == pytest.approx(float(loss.detach()), rel=1e-12, abs=1e-15)
