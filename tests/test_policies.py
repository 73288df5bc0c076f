"""Clipping policies: differential tests against PyPI zclip / autoclip, oracles, state, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard as gg
from gradguard._plan import ParamPlan
from gradguard.stats import compute_stats
from gradguard.testing import count_host_syncs

torch.set_num_threads(1)

zclip = pytest.importorskip("zclip")
autoclip_torch = pytest.importorskip("autoclip.torch")


def bind(policy, model):
    plan = ParamPlan.from_module(model)
    policy.bind(model, plan)
    return plan


def apply(policy, plan, skip=None):
    grads = plan.grads()
    stats = compute_stats(grads, policy.norm_type)
    if skip is None:
        skip = stats.nonfinite
    thr, clipped = policy.clip_(plan.params, grads, stats, torch.as_tensor(skip))
    return stats, thr, clipped


def norm_sequence(n=80, seed=0, spikes=((30, 10.0), (31, 3.0), (45, 50.0), (60, 8.0))):
    rng = np.random.default_rng(seed)
    seq = list(1.0 + 0.1 * rng.standard_normal(n))
    for i, f in spikes:
        if i < n:
            seq[i] *= f
    return seq


def set_grads(models, step, norm, dtype):
    """Give every model the same gradients, of global norm `norm`, random direction per step."""
    g = torch.Generator().manual_seed(1000 + step)
    shapes = [p.shape for p in models[0].parameters()]
    raw = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    total = math.sqrt(sum(float(r.pow(2).sum()) for r in raw))
    for m in models:
        for p, r in zip(m.parameters(), raw):
            p.grad = (r * (norm / total)).to(dtype)


def tiny(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def grads_of(m):
    return [p.grad.clone() for p in m.parameters()]


# --------------------------------------------------------------------------------------------
# ZClip vs PyPI zclip 1.0.0
ZCLIP_CASES = [
    dict(),
    dict(clip_option="mean"),
    dict(mode="percentile"),
    dict(clip_factor=0.7),
    dict(skip_update_on_spike=True),
    dict(z_thresh=2.0, alpha=0.9, warmup=10),
    dict(max_norm=1.05),
]


@pytest.mark.parametrize("kw", ZCLIP_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zclip_matches_pypi(kw, dtype):
    ref_kw = dict(kw)
    cap = ref_kw.pop("max_norm", None)
    ref_kw["max_grad_norm"] = cap  # zclip's code default is 1.0; gradguard's is None
    if "warmup" in ref_kw:
        ref_kw["warmup_steps"] = ref_kw.pop("warmup")
    ref = zclip.ZClip(**ref_kw)
    ours = gg.ZClip(**kw)
    ma, mb = tiny(dtype), tiny(dtype)
    plan = bind(ours, mb)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    n_spikes = 0
    for t, norm in enumerate(norm_sequence()):
        set_grads([ma, mb], t, norm, dtype)
        expected_thr = None
        if ref.initialized:
            g_ref = ref._compute_grad_norm(ma)
            cv = ref._compute_clip_val(g_ref)
            if cv is not None:
                expected_thr = min(cv, cap) if cap is not None else cv
                n_spikes += 1
        ref.step(ma)
        _, thr, clipped = apply(ours, plan)
        for a, b in zip(grads_of(ma), grads_of(mb)):
            torch.testing.assert_close(b, a, rtol=tol, atol=tol * 1e-3)
        if expected_thr is not None:
            assert float(thr) == pytest.approx(expected_thr, rel=tol)
        if ref.initialized:
            assert float(ours.state.mean) == pytest.approx(ref.mean, rel=tol)
            assert float(ours.state.var) == pytest.approx(ref.var, rel=max(tol, 1e-10))
    assert n_spikes >= 2, "the sequence must exercise the spike branch"


def test_zclip_oracle_adaptive_threshold():
    # zclip's own test: mean 1, var 0.25, z_thresh 2, g = 3 -> z = 4 -> threshold 1.5
    p = ZClip_fixture_model()
    pol = gg.ZClip(z_thresh=2.0, warmup=1, eps=1e-12)
    plan = bind(pol, p)
    st_ = pol.state
    pol.state = st_._replace(mean=torch.tensor(1.0, dtype=torch.float64),
                             var=torch.tensor(0.25, dtype=torch.float64),
                             count=torch.tensor(1))
    p.weight.grad = torch.tensor([[3.0]], dtype=torch.float64)
    _, thr, clipped = apply(pol, plan)
    assert float(thr) == pytest.approx(1.5, rel=1e-9)
    assert bool(clipped)
    assert float(p.weight.grad) == pytest.approx(1.5 * 3 / (3 + 1e-6), rel=1e-9)


def ZClip_fixture_model():
    m = nn.Linear(1, 1, bias=False).double()
    return m


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_zclip_nan_poisons_pypi_not_gradguard(bad):
    ref = zclip.ZClip(max_grad_norm=None, warmup_steps=5)
    ours = gg.ZClip(warmup=5)
    ma, mb = tiny(), tiny()
    plan = bind(ours, mb)
    seq = [1.0 + 0.05 * math.sin(i) for i in range(20)] + [bad] + [1.0, 1.02, 50.0]
    for t, norm in enumerate(seq):
        set_grads([ma, mb], t, 1.0 if not math.isfinite(norm) else norm, torch.float64)
        if not math.isfinite(norm):
            ma[0].weight.grad[0, 0] = bad
            mb[0].weight.grad[0, 0] = bad
        before = ours.state
        ref.step(ma)
        stats, thr, clipped = apply(ours, plan)  # skip = stats.nonfinite, as the Guard does
        if not math.isfinite(norm):
            for a, b in zip(before, ours.state):
                assert torch.equal(a, b), "a non-finite norm must leave the state bit-identical"
    if math.isnan(bad):
        assert math.isnan(ref.mean), "zclip 1.0.0 is poisoned by one NaN step"
        # ... and its 50x spike passes unclipped (norm in == norm out)
        assert float(torch.cat([g.flatten() for g in grads_of(ma)]).norm()) == pytest.approx(50.0, rel=1e-9)
    else:
        assert math.isfinite(ref.mean)  # Inf is fed as tau = mean: zclip survives it
    assert math.isfinite(float(ours.state.mean))
    assert float(torch.cat([g.flatten() for g in grads_of(mb)]).norm()) < 5.0, "gradguard clips the spike"


def test_zclip_max_norm_parity_with_zclip_default():
    """zclip's hidden default max_grad_norm=1.0 clips every warm-up step: gradguard's max_norm=1.0 matches."""
    ref = zclip.ZClip()  # max_grad_norm=1.0 in code
    ours = gg.ZClip(max_norm=1.0)
    ma, mb = tiny(), tiny()
    plan = bind(ours, mb)
    for t, norm in enumerate(norm_sequence(40)):
        set_grads([ma, mb], t, norm * 2, torch.float64)
        ref.step(ma)
        apply(ours, plan)
        for a, b in zip(grads_of(ma), grads_of(mb)):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------
# AutoClip vs PyPI autoclip 0.2.1 and the paper's reference convention
@pytest.mark.parametrize("q,window", [(0.9, 1000), (0.1, 7), (0.5, 3), (0.0, 5), (1.0, 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_autoclip_matches_pypi_global(q, window, dtype):
    ma, mb = tiny(dtype), tiny(dtype)
    ref = autoclip_torch.QuantileClip(ma.parameters(), quantile=q, history_length=window,
                                      global_threshold=True)
    ours = gg.AutoClip(percentile=100 * q, window=window, include_current=False)
    plan = bind(ours, mb)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for t, norm in enumerate(norm_sequence(60)):
        set_grads([ma, mb], t, norm, dtype)
        hist = ref.state["global_history"]
        exp_thr = math.inf if len(hist) == 0 else float(torch.quantile(hist.double(), q))
        ref.step()
        _, thr, _ = apply(ours, plan)
        assert float(thr) == pytest.approx(exp_thr, rel=tol)
        for a, b in zip(grads_of(ma), grads_of(mb)):
            torch.testing.assert_close(b, a, rtol=tol, atol=tol * 1e-3)


@pytest.mark.parametrize("p,window", [(10.0, 1000), (50.0, 4), (90.0, 9), (0.0, 3), (100.0, 5)])
def test_autoclip_matches_paper_reference(p, window):
    """The paper's code: append the current norm, then np.percentile (linear), then torch's clip."""
    m = tiny()
    ours = gg.AutoClip(percentile=p, window=window)
    plan = bind(ours, m)
    history: list[float] = []
    for t, norm in enumerate(norm_sequence(50)):
        set_grads([m], t, norm, torch.float64)
        before = [g.clone() for g in grads_of(m)]
        n = float(torch.cat([g.flatten() for g in before]).norm())
        history.append(n)
        thr = float(np.percentile(history[-window:], p))
        coef = min(1.0, thr / (n + 1e-6))
        _, got_thr, clipped = apply(ours, plan)
        assert float(got_thr) == pytest.approx(thr, rel=1e-12)
        assert bool(clipped) == (coef < 1)
        for b, a in zip(before, grads_of(m)):
            torch.testing.assert_close(a, b * coef, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("include_current,expected", [
    (True, [1, 1.5, 2, 2.5, 0.5, 2.5]),  # pseeth/autoclip (the paper)
    (False, [1, 1, 1.5, 2, 0.5, 2]),  # PyPI autoclip QuantileClip(global_threshold=True)
])
def test_autoclip_oracle_table(include_current, expected):
    """oracles.md section 1e: quantile 0.5 on norms 1, 2, 3, 10, 0.5, 4."""
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    m = nn.Module()
    m.w = w
    pol = gg.AutoClip(percentile=50, include_current=include_current, eps=0.0)
    plan = bind(pol, m)
    got = []
    for n in [1, 2, 3, 10, 0.5, 4]:
        w.grad = torch.tensor([float(n)], dtype=torch.float64)
        apply(pol, plan)
        got.append(float(w.grad))
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_autoclip_nan_poisons_pypi_not_gradguard(bad):
    ma, mb = tiny(), tiny()
    ref = autoclip_torch.QuantileClip(ma.parameters(), quantile=0.9, history_length=4,
                                      global_threshold=True)
    ours = gg.AutoClip(percentile=90, window=4, include_current=False)
    plan = bind(ours, mb)
    for t in range(8):
        set_grads([ma, mb], t, 1.0 + 0.01 * t, torch.float64)
        if t == 5:
            ma[0].weight.grad[0, 0] = bad
            mb[0].weight.grad[0, 0] = bad
        before = ours.state
        ref.step()
        apply(ours, plan)
        if t == 5:
            assert all(torch.equal(a, b) for a, b in zip(before, ours.state))
    last_ref = torch.cat([g.flatten() for g in grads_of(ma)])
    last_ours = torch.cat([g.flatten() for g in grads_of(mb)])
    if math.isnan(bad):
        assert torch.isnan(last_ref).all(), "PyPI autoclip: one NaN poisons every later step"
    else:
        # The Inf stays in its history: the threshold is +inf (clipping off) or, where the
        # interpolation meets the Inf (q=0.9 over 4 norms here), NaN (every gradient NaN).
        assert not math.isfinite(float(torch.quantile(ref.state["global_history"], 0.9)))
    assert torch.isfinite(last_ours).all()
    assert int(ours.state.count) == 7
    assert torch.isfinite(ours.state.history).all()


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(1e-3, 1e3, allow_nan=False), min_size=1, max_size=30),
    p=st.floats(0, 100),
    window=st.integers(1, 12),
)
def test_autoclip_percentile_matches_numpy(values, p, window):
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    m = nn.Module()
    m.w = w
    pol = gg.AutoClip(percentile=p, window=window)
    plan = bind(pol, m)
    for i, v in enumerate(values):
        w.grad = torch.tensor([v], dtype=torch.float64)
        _, thr, _ = apply(pol, plan)
        assert float(thr) == pytest.approx(float(np.percentile(values[max(0, i + 1 - window): i + 1], p)), rel=1e-12)


def test_policies_are_sync_free():
    for pol in [gg.FixedClip(1.0), gg.ValueClip(0.1), gg.AGC(exclude=()), gg.AutoClip(window=5),
                gg.ZClip(warmup=2)]:
        m = tiny(torch.float32)
        plan = bind(pol, m)
        for t in range(5):
            set_grads([m], t, 1.0 + t, torch.float32)
            with count_host_syncs() as c:
                apply(pol, plan, skip=torch.tensor(t == 3))
            assert c.count == 0, (pol, c.ops)


# --------------------------------------------------------------------------------------------
def test_fixedclip_bitwise_torch_parity():
    ma, mb = tiny(torch.float32), tiny(torch.float32)
    pol = gg.FixedClip(0.3)
    plan = bind(pol, mb)
    for t in range(4):
        set_grads([ma, mb], t, 0.1 + 0.3 * t, torch.float32)
        n_ref = torch.nn.utils.clip_grad_norm_(ma.parameters(), 0.3)
        stats, thr, clipped = apply(pol, plan)
        assert torch.equal(stats.global_norm, n_ref)
        assert all(torch.equal(a, b) for a, b in zip(grads_of(ma), grads_of(mb)))
        assert float(thr) == pytest.approx(0.3) and bool(clipped) == (float(n_ref) > 0.3 - 1e-6)


def test_skip_leaves_grads_and_state_untouched():
    for pol in [gg.FixedClip(0.01), gg.ValueClip(1e-4), gg.AGC(exclude=()), gg.AutoClip(window=4),
                gg.ZClip(warmup=2)]:
        m = tiny()
        plan = bind(pol, m)
        for t in range(4):
            set_grads([m], t, 1.0 + t, torch.float64)
            apply(pol, plan)
        set_grads([m], 9, 100.0, torch.float64)
        before = grads_of(m)
        state = pol.state
        _, _, clipped = apply(pol, plan, skip=torch.tensor(True))
        assert not bool(clipped)
        assert all(torch.equal(a, b) for a, b in zip(before, grads_of(m))), pol
        if state is not None:
            assert all(torch.equal(a, b) for a, b in zip(state, pol.state)), pol


def test_valueclip_clamps_and_reports_exactly():
    m = tiny()
    pol = gg.ValueClip(0.5)
    plan = bind(pol, m)
    for p in m.parameters():
        p.grad = torch.full_like(p, 0.25)
    _, thr, clipped = apply(pol, plan)
    assert not bool(clipped) and math.isinf(float(thr))
    m[2].bias.grad[1] = -3.0
    _, _, clipped = apply(pol, plan)
    assert bool(clipped) and float(m[2].bias.grad[1]) == -0.5


# --------------------------------------------------------------------------------------------
# AGC
def test_agc_oracle_values():
    """oracles.md 1b: params ([1,2],[3,4]), grads ([500,5],[300,3]), clip 1.0 (timm formula, float64)."""
    m = nn.Module()
    m.a = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    m.b = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    m.a.grad = torch.tensor([500.0, 5.0], dtype=torch.float64)
    m.b.grad = torch.tensor([300.0, 3.0], dtype=torch.float64)
    pol = gg.AGC(clipping=1.0, exclude=())
    plan = bind(pol, m)
    _, _, clipped = apply(pol, plan)
    assert bool(clipped)
    torch.testing.assert_close(m.a.grad, torch.tensor([2.2359562, 0.02235956], dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(m.b.grad, torch.tensor([4.99975, 0.0499975], dtype=torch.float64), rtol=1e-6, atol=0)


def test_agc_matches_functional_with_head_excluded():
    torch.manual_seed(0)
    ma = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    mb = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    mb.load_state_dict(ma.state_dict())
    pol = gg.AGC(0.01)
    plan = bind(pol, mb)
    x = torch.randn(4, 6)
    for m in (ma, mb):
        (m(x) * 100).sum().backward()
    gg.adaptive_clip_grad_(ma.named_parameters(), 0.01, exclude=["2.weight", "2.bias"])
    apply(pol, plan)
    assert pol.excluded == ["2.weight", "2.bias"]
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ma.parameters(), mb.parameters()))


class _HeadNotLast(nn.Module):
    """The output head is registered first; an auxiliary Linear is registered last."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Linear(5, 8)
        self.aux = nn.Linear(8, 8)

    def forward(self, x):
        return self.head(torch.relu(self.aux(self.body(x)))).view(-1, 3)


class _LogSoftmaxModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.out = nn.Linear(8, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return torch.log_softmax(self.out(torch.relu(self.fc1(x))), dim=-1)


class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mix = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, idx):
        return {"logits": self.lm_head(torch.tanh(self.mix(self.emb(idx))))}


@pytest.mark.parametrize("model,x,expected", [
    (_HeadNotLast(), torch.randn(2, 5), ["head.weight", "head.bias"]),
    (_LogSoftmaxModel(), torch.randn(2, 5), ["out.weight", "out.bias"]),
    (_TiedLM(), torch.tensor([[1, 2, 3]]), ["emb.weight"]),
], ids=["head-registered-first", "log-softmax-fallback", "tied-lm-head-dict-output"])
def test_agc_finds_head_from_structure(model, x, expected):
    pol = gg.AGC()
    plan = bind(pol, model)
    out = model(x)
    out = out["logits"] if isinstance(out, dict) else out
    out.sum().backward()
    apply(pol, plan)
    assert pol.excluded == expected


def test_agc_module_order_fallback_and_named_exclude():
    m = _HeadNotLast()
    pol = gg.AGC()
    plan = bind(pol, m)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    apply(pol, plan)  # no forward seen: the last nn.Linear in module order (documented fallback)
    assert pol.excluded == ["aux.weight", "aux.bias"]
    pol2 = gg.AGC(exclude=["head", "body.bias"])
    bind(pol2, _HeadNotLast())
    assert pol2.excluded == ["head.weight", "head.bias", "body.bias"]


# --------------------------------------------------------------------------------------------
def test_state_dict_round_trip_in_lockstep():
    for make in [lambda: gg.AutoClip(window=6), lambda: gg.ZClip(warmup=4), lambda: gg.FixedClip(1.0),
                 lambda: gg.AGC(), lambda: gg.ValueClip(1.0)]:
        a, b = make(), make()
        ma, mb = tiny(), tiny()
        pa, pb = bind(a, ma), bind(b, mb)
        for t, n in enumerate(norm_sequence(12)):
            set_grads([ma], t, n, torch.float64)
            apply(a, pa)
        b.load_state_dict(a.state_dict())
        for t, n in enumerate(norm_sequence(20)[12:], start=12):
            set_grads([ma, mb], t, n, torch.float64)
            ra, rb = apply(a, pa), apply(b, pb)
            assert torch.equal(ra[1], rb[1])
            assert all(torch.equal(x, y) for x, y in zip(grads_of(ma), grads_of(mb)))


def test_load_state_dict_rejects_other_policy():
    a = gg.ZClip()
    bind(a, tiny())
    b = gg.AutoClip()
    bind(b, tiny())
    with pytest.raises(ValueError, match="ZClip policy, not of a AutoClip"):
        b.load_state_dict(a.state_dict())


def test_policy_cannot_serve_two_models():
    pol = gg.ZClip()
    bind(pol, tiny())
    with pytest.raises(ValueError, match="one policy per Guard"):
        bind(pol, tiny())


@pytest.mark.parametrize("call,exc,match", [
    (lambda: gg.FixedClip(0), ValueError, "`max_norm` must be a positive"),
    (lambda: gg.FixedClip(-1.0), ValueError, "`max_norm`"),
    (lambda: gg.FixedClip(math.inf), ValueError, "`max_norm`"),
    (lambda: gg.FixedClip("1"), TypeError, "`max_norm` must be a number"),
    (lambda: gg.FixedClip(1.0, norm_type=0), ValueError, "`norm_type`"),
    (lambda: gg.FixedClip(1.0, eps=-1), ValueError, "`eps`"),
    (lambda: gg.ValueClip(0.0), ValueError, "`clip_value`"),
    (lambda: gg.ValueClip(torch.tensor(1.0)), TypeError, "`clip_value`"),
    (lambda: gg.AGC(clipping=0), ValueError, "`clipping`"),
    (lambda: gg.AGC(eps=-1e-3), ValueError, "`eps`"),
    (lambda: gg.AGC(exclude="head"), ValueError, "exclude=\\['head'\\]"),
    (lambda: gg.AGC(exclude=[1]), TypeError, "`exclude` entries"),
    (lambda: gg.AGC(exclude=3), TypeError, "`exclude`"),
    (lambda: gg.AutoClip(percentile=101), ValueError, "`percentile` must lie in"),
    (lambda: gg.AutoClip(percentile=-1), ValueError, "`percentile`"),
    (lambda: gg.AutoClip(window=0), ValueError, "`window` must be >= 1"),
    (lambda: gg.AutoClip(window=2.5), TypeError, "`window` must be an int"),
    (lambda: gg.AutoClip(include_current=1), TypeError, "`include_current`"),
    (lambda: gg.AutoClip(max_norm=0), ValueError, "`max_norm`"),
    (lambda: gg.AutoClip(eps=math.nan), ValueError, "`eps`"),
    (lambda: gg.ZClip(alpha=1.0), ValueError, "`alpha` must lie in \\(0.0, 1.0\\)"),
    (lambda: gg.ZClip(alpha=0), ValueError, "`alpha`"),
    (lambda: gg.ZClip(z_thresh=0), ValueError, "`z_thresh`"),
    (lambda: gg.ZClip(warmup=0), ValueError, "`warmup`"),
    (lambda: gg.ZClip(eps=0), ValueError, "`eps`"),
    (lambda: gg.ZClip(mode="z"), ValueError, "`mode` must be one of 'zscore', 'percentile'"),
    (lambda: gg.ZClip(clip_option="max"), ValueError, "`clip_option` must be one of"),
    (lambda: gg.ZClip(clip_factor=-1), ValueError, "`clip_factor`"),
    (lambda: gg.ZClip(skip_update_on_spike="yes"), TypeError, "`skip_update_on_spike`"),
    (lambda: gg.ZClip(max_norm=-2), ValueError, "`max_norm`"),
])
def test_policy_validation(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_agc_unknown_exclude_name():
    with pytest.raises(ValueError, match="neither a module nor a trainable parameter"):
        bind(gg.AGC(exclude=["nope"]), tiny())


def test_agc_unbound_says_to_bind_first():
    model = tiny()
    model(torch.randn(2, 5, dtype=torch.float64)).sum().backward()
    plan = ParamPlan.from_module(model)
    with pytest.raises(RuntimeError, match=r"AGC is not bound to a model.*gg\.Guard\(model, clip=gg\.AGC"):
        apply(gg.AGC(), plan)


# --------------------------------------------------------------------------------------------
# AGC on the batched path: timm's formula bit for bit, its statistics, the tied head
def _timm_formula_agc_(params, clipping, eps=1e-3):
    """timm's adaptive_clip_grad written out per tensor (unitwise_norm, clamp, where)."""
    for p in params:
        g = p.grad
        dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
        w_n = p.detach().norm(2.0, dim=dims, keepdim=True) if dims else p.detach().norm(2.0)
        g_n = g.norm(2.0, dim=dims, keepdim=True) if dims else g.norm(2.0)
        max_norm = w_n.clamp(min=eps).mul_(clipping)
        clipped = g * (max_norm / g_n.clamp(min=1e-6))
        p.grad = torch.where(g_n < max_norm, g, clipped)


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.gain = nn.Parameter(torch.ones(()))
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc((torch.relu(self.conv(x)) * self.gain).flatten(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agc_guard_path_is_timm_bit_for_bit(dtype):
    torch.manual_seed(3)
    ma = _Conv().to(dtype)
    mb = _Conv().to(dtype)
    mb.load_state_dict(ma.state_dict())
    x = torch.randn(4, 3, 6, 6, dtype=dtype)
    for m in (ma, mb):
        (m(x) * 50).sum().backward()
    pol = gg.AGC(0.02, exclude=())
    guard = gg.Guard(mb, clip=pol, measure_updates=0)
    plan_grads = [p.grad.clone() for p in mb.parameters()]
    _timm_formula_agc_(ma.parameters(), 0.02)
    out = guard.step(torch.optim.SGD(mb.parameters(), lr=0.0))
    assert bool(out.clipped)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ma.parameters(), mb.parameters()))
    # the statistics the Guard recorded came from AGC's unit norms: the norms of the raw gradients
    ref = torch.stack([g.norm() for g in plan_grads])
    recorded = torch.tensor(guard.flush().layer_norm[0], dtype=torch.float64)
    torch.testing.assert_close(recorded, ref.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.global_norm, ref.norm(), rtol=1e-6, atol=0)
    # the free function agrees too
    mc = _Conv().to(dtype)
    mc.load_state_dict(ma.state_dict())
    for p, g in zip(mc.parameters(), plan_grads):
        p.grad = g.clone()
    gg.adaptive_clip_grad_(mc.parameters(), 0.02)
    assert all(torch.equal(a.grad, c.grad) for a, c in zip(ma.parameters(), mc.parameters()))


def test_agc_skip_and_nonfinite_leave_grads_and_flag_nonfinite():
    m = _Conv()
    guard = gg.Guard(m, clip=gg.AGC(exclude=()), measure_updates=0)
    m(torch.randn(2, 3, 6, 6)).sum().backward()
    m.conv.weight.grad[1, 0, 0, 0] = math.inf
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = [p.detach().clone() for p in m.parameters()]
    out = guard.step(opt)
    assert bool(out.skipped) and not math.isfinite(float(out.global_norm))
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


class _TinyGPT(nn.Module):
    """GPT-like: token + position embeddings, pre-norm blocks, ln_f, and a head tied to wte
    written as a matrix product (no nn.Linear head); forward returns (logits, loss)."""

    def __init__(self, vocab=20, d=8, n_layer=2, ctx=6, head="matmul"):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln_1": nn.LayerNorm(d), "c_attn": nn.Linear(d, 3 * d), "c_proj": nn.Linear(d, d),
            "ln_2": nn.LayerNorm(d), "c_fc": nn.Linear(d, 4 * d), "mlp_proj": nn.Linear(4 * d, d),
        }) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = head

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t))
        for b in self.blocks:
            q, k, v = b["c_attn"](b["ln_1"](x)).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            x = x + b["c_proj"](att @ v)
            x = x + b["mlp_proj"](torch.relu(b["c_fc"](b["ln_2"](x))))
        h = self.ln_f(x)
        if self.head == "matmul":
            logits = h @ self.wte.weight.t()
        else:
            logits = nn.functional.linear(h, self.wte.weight)
        loss = None if targets is None else nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


@pytest.mark.parametrize("head", ["matmul", "F.linear"])
def test_agc_auto_finds_tied_head_of_a_gpt(head):
    torch.manual_seed(0)
    model = _TinyGPT(head=head)
    pol = gg.AGC(0.01)
    guard = gg.Guard(model, clip=pol, measure_updates=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        idx = torch.randint(0, 20, (4, 6))
        _, loss = model(idx, torch.randint(0, 20, (4, 6)))
        loss.backward()
        guard.step(opt, loss=loss)
        opt.zero_grad()
    # the head is the tied embedding matrix, not the last Linear called (the MLP projection)
    assert pol.excluded == ["wte.weight"]


def test_agc_head_found_when_forward_returns_only_the_loss():
    class LossOnly(_TinyGPT):
        def forward(self, idx, targets=None):  # type: ignore[override]
            return super().forward(idx, targets)[1]

    model = LossOnly()
    pol = gg.AGC(0.01)
    gg.Guard(model, clip=pol)
    model(torch.randint(0, 20, (2, 6)), torch.randint(0, 20, (2, 6))).backward()
    assert pol.excluded == ["wte.weight"]


def test_agc_guard_edge_cases_head_only_and_missing_grads():
    # a model that is only its head: nothing is clipped, the statistics still come out
    head = nn.Linear(4, 2)
    g = gg.Guard(head, clip=gg.AGC())
    head(torch.randn(3, 4)).sum().backward()
    raw = [p.grad.clone() for p in head.parameters()]
    out = g.step(torch.optim.SGD(head.parameters(), lr=0.0))
    assert g.clip.excluded == ["weight", "bias"] and not bool(out.clipped)
    assert all(torch.equal(a, p.grad) for a, p in zip(raw, head.parameters()))
    torch.testing.assert_close(out.global_norm, torch.cat([r.flatten() for r in raw]).norm())
    # a parameter without a gradient this step (an unused branch): the others match the free function
    torch.manual_seed(1)
    ma, mb = _Conv(), _Conv()
    mb.load_state_dict(ma.state_dict())
    x = torch.randn(2, 3, 6, 6)
    for m in (ma, mb):
        (m.fc(torch.relu(m.conv(x)).flatten(1)) * 30).sum().backward()  # `gain` gets no gradient
    guard = gg.Guard(mb, clip=gg.AGC(0.02, exclude=()), measure_updates=0)
    gg.adaptive_clip_grad_(ma.parameters(), 0.02)
    out = guard.step(torch.optim.SGD(mb.parameters(), lr=0.0))
    assert mb.gain.grad is None and bool(out.clipped)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ma.parameters(), mb.parameters()) if a.grad is not None)
    assert guard.flush().layer_norm[0][0] == 0.0  # `gain` (registered first): no gradient, norm 0
