"""Hypothesis properties of the clipping and statistics functions (style.md 1.11).

Values are pinned by the float64 references (``_reference``); these tests state what must hold
for any input: bounds, direction, idempotence, invariance to order and grouping, the scaling law.
Tolerances are in units of the rounding error of the dtype the norms are computed in.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from tests import _reference as ref
import gradguard as gg
from tests._strategies import (
    EXACT_DTYPES,
    FLOAT_DTYPES,
    PROPS,
    grad_lists,
    max_norms,
    norm_types,
    params_for,
    tensors,
    ulp,
)


def loosest_ulp(grads) -> float:
    return max(ulp(g.dtype) for g in grads)


def clipped(grads, max_norm, norm_type=2.0, **kw):
    ps = params_for(grads)
    total = gg.clip_grad_norm_(ps, max_norm, norm_type, **kw)
    return total, [p.grad for p in ps]


def n_elems(grads) -> int:
    return sum(g.numel() for g in grads)


# ---------------------------------------------------------------------------------------------
# agreement with the float64 reference, any shapes, orders and dtypes


@PROPS
@given(grads=grad_lists(FLOAT_DTYPES), norm_type=norm_types)
def test_stats_agree_with_reference(grads, norm_type):
    s = gg.grad_stats(params_for(grads), norm_type)
    u = loosest_ulp(grads)
    # accumulation error grows with the number of terms; 8 ulps per term is generous for n <= 625
    rel = 8 * u * n_elems(grads) if u < 2**-8 else 2 * u
    for got, g in zip(s.per_tensor_norm.tolist(), grads):
        assert got == pytest.approx(ref.global_norm([g], norm_type), rel=rel, abs=1e-300)
    assert float(s.global_norm) == pytest.approx(ref.global_norm(grads, norm_type), rel=rel, abs=1e-300)
    assert float(gg.get_total_norm(grads, norm_type)) == float(s.global_norm)
    assert not bool(s.nonfinite)
    # the accumulation dtype: never below float32
    assert s.global_norm.dtype == (torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32)


@PROPS
@given(grads=grad_lists(EXACT_DTYPES), norm_type=norm_types, max_norm=max_norms, eps=st.sampled_from([0.0, 1e-6]))
def test_clip_agrees_with_reference(grads, norm_type, max_norm, eps):
    total, out = clipped(grads, max_norm, norm_type, eps=eps)
    ref_total, ref_out = ref.clip_by_norm(grads, max_norm, norm_type, eps=eps)
    rel = 8 * loosest_ulp(grads) * n_elems(grads)
    assert float(total) == pytest.approx(ref_total, rel=rel, abs=1e-300)
    # the coefficient is a ratio of norms: near max_norm == total (eps = 0), a relative error
    # in the total can flip "keep" to "scale by ~1"; both give the same numbers to rel
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a.double(), b, rtol=2 * rel + 4 * ulp(a.dtype), atol=1e-300)


# ---------------------------------------------------------------------------------------------
# norm after clipping, direction, untouched below the threshold, idempotence


@PROPS
@given(grads=grad_lists(EXACT_DTYPES), norm_type=norm_types, max_norm=max_norms, eps=st.sampled_from([0.0, 1e-6]))
def test_norm_after_clip_is_at_most_max_norm(grads, norm_type, max_norm, eps):
    before = ref.global_norm(grads, norm_type)
    _, out = clipped(grads, max_norm, norm_type, eps=eps)
    after = ref.global_norm(out, norm_type)
    tol = 8 * loosest_ulp(grads) * n_elems(grads)
    assert after <= max_norm * (1 + tol)
    assert after <= before * (1 + tol)
    if before > max_norm * (1 + tol):  # it clipped: equality, up to rounding and torch's eps
        assert after == pytest.approx(max_norm * before / (before + eps), rel=tol)


@PROPS
@given(grads=grad_lists(EXACT_DTYPES), norm_type=norm_types, max_norm=max_norms)
def test_direction_is_preserved(grads, norm_type, max_norm):
    total, out = clipped(grads, max_norm, norm_type)
    c = min(1.0, max_norm / (float(total) + 1e-6))
    for a, g in zip(out, grads):
        assert torch.equal(torch.sign(a), torch.sign(g)) or (c == 0.0)
        # one factor for all: a == g * c to the grad dtype's rounding
        torch.testing.assert_close(a.double(), g.double() * c, rtol=4 * ulp(g.dtype), atol=1e-300)


@PROPS
@given(grads=grad_lists(FLOAT_DTYPES), norm_type=norm_types, eps=st.sampled_from([0.0, 1e-6]))
def test_below_threshold_is_bit_for_bit_unchanged(grads, norm_type, eps):
    max_norm = 2 * ref.global_norm(grads, norm_type) + 1.0
    _, out = clipped(grads, max_norm, norm_type, eps=eps)
    for a, g in zip(out, grads):
        assert torch.equal(a, g)


@PROPS
@given(grads=grad_lists(EXACT_DTYPES), norm_type=norm_types, max_norm=max_norms)
def test_clipping_twice_equals_clipping_once_with_eps_zero(grads, norm_type, max_norm):
    """Idempotence. Not bit for bit: after one clip the norm is max_norm up to rounding, so a
    second clip may scale by max/N' = 1 - O(ulp); the grads move by at most a few ulps."""
    _, once = clipped(grads, max_norm, norm_type, eps=0.0)
    _, twice = clipped(once, max_norm, norm_type, eps=0.0)
    rel = 8 * loosest_ulp(grads) * n_elems(grads)
    for a, b in zip(twice, once):
        torch.testing.assert_close(a, b, rtol=rel, atol=0)


@PROPS
@given(grads=grad_lists(EXACT_DTYPES), norm_type=norm_types, max_norm=max_norms)
def test_clipping_twice_with_torch_eps_shrinks_by_eps_only(grads, norm_type, max_norm):
    _, once = clipped(grads, max_norm, norm_type)
    _, twice = clipped(once, max_norm, norm_type)
    # the second coefficient is max/(N' + 1e-6) with N' <= max: at least 1 - 1e-6/max
    rel = 8 * loosest_ulp(grads) * n_elems(grads) + 1e-6 / max_norm
    for a, b in zip(twice, once):
        torch.testing.assert_close(a, b, rtol=rel, atol=0)


# ---------------------------------------------------------------------------------------------
# invariance to order and to grouping


@PROPS
@given(grads=grad_lists(FLOAT_DTYPES, min_size=2, max_size=6), norm_type=norm_types, max_norm=max_norms, data=st.data())
def test_invariant_to_tensor_order(grads, norm_type, max_norm, data):
    perm = data.draw(st.permutations(range(len(grads))))
    s = gg.grad_stats(params_for(grads), norm_type)
    sp = gg.grad_stats(params_for([grads[i] for i in perm]), norm_type)
    # per-tensor norms do not depend on the neighbours, bit for bit
    assert torch.equal(sp.per_tensor_norm, s.per_tensor_norm[list(perm)])
    rel = 4 * loosest_ulp(grads) * len(grads)
    if norm_type == math.inf:
        assert torch.equal(sp.global_norm, s.global_norm)  # a max is exact
    else:
        assert float(sp.global_norm) == pytest.approx(float(s.global_norm), rel=rel)
    _, out = clipped(grads, max_norm, norm_type)
    _, out_p = clipped([grads[i] for i in perm], max_norm, norm_type)
    for j, i in enumerate(perm):
        torch.testing.assert_close(out_p[j], out[i], rtol=rel + 2 * ulp(grads[i].dtype), atol=0)


@PROPS
@given(grads=grad_lists(EXACT_DTYPES), norm_type=norm_types, max_norm=max_norms, data=st.data())
def test_invariant_to_splitting_tensors(grads, norm_type, max_norm, data):
    """Splitting each tensor into pieces (as sharding or bucketing would) changes nothing."""
    pieces, sizes = [], []
    for g in grads:
        flat = g.reshape(-1)
        cut = data.draw(st.integers(0, flat.numel()))
        parts = [p for p in (flat[:cut], flat[cut:]) if p.numel()]
        pieces.extend(p.clone() for p in parts)
        sizes.append(len(parts))
    rel = 8 * loosest_ulp(grads) * n_elems(grads)
    whole = gg.get_total_norm(grads, norm_type)
    split = gg.get_total_norm(pieces, norm_type)
    assert float(split) == pytest.approx(float(whole), rel=rel)
    _, out = clipped(grads, max_norm, norm_type)
    _, out_s = clipped(pieces, max_norm, norm_type)
    joined = torch.cat([p.reshape(-1).double() for p in out_s])
    torch.testing.assert_close(joined, torch.cat([o.reshape(-1).double() for o in out]), rtol=2 * rel, atol=1e-300)


@PROPS
@given(grads=grad_lists((torch.float32,), min_size=2, max_size=6), norm_type=norm_types, data=st.data())
def test_invariant_to_dtype_grouping(grads, norm_type, data):
    """The same values split over float32 and float64 groups (exact conversions) give the
    same per-tensor norms as one float64 group, to float32 rounding."""
    to64 = data.draw(st.lists(st.booleans(), min_size=len(grads), max_size=len(grads)))
    mixed = [g.double() if b else g for g, b in zip(grads, to64)]
    s_mixed = gg.grad_stats(params_for(mixed), norm_type)
    s_64 = gg.grad_stats(params_for([g.double() for g in grads]), norm_type)
    rel = 8 * ulp(torch.float32) * n_elems(grads)
    assert s_mixed.per_tensor_norm.tolist() == pytest.approx(s_64.per_tensor_norm.tolist(), rel=rel)
    assert float(s_mixed.global_norm) == pytest.approx(float(s_64.global_norm), rel=rel)


# ---------------------------------------------------------------------------------------------
# scaling law


@PROPS
@given(grads=grad_lists(EXACT_DTYPES), norm_type=norm_types, c=st.floats(-100, 100).filter(lambda c: abs(c) > 1e-2))
def test_scaling_law(grads, norm_type, c):
    n = float(gg.get_total_norm(grads, norm_type))
    nc = float(gg.get_total_norm([g * c for g in grads], norm_type))
    rel = 8 * loosest_ulp(grads) * n_elems(grads)
    assert nc == pytest.approx(abs(c) * n, rel=rel, abs=1e-300)


@PROPS
@given(grads=grad_lists(EXACT_DTYPES), norm_type=st.sampled_from([1.0, 2.0, math.inf]), k=st.integers(-8, 8), sign=st.sampled_from([1, -1]))
def test_scaling_law_is_exact_for_powers_of_two(grads, norm_type, k, sign):
    """Scaling by +/-2^k is exact in binary floating point, and so are |x|, x^2, sums and
    sqrt of 2^(2k) S: for p in {1, 2, inf} the law holds bit for bit."""
    c = sign * 2.0**k
    n = gg.get_total_norm(grads, norm_type)
    nc = gg.get_total_norm([g * c for g in grads], norm_type)
    assert torch.equal(nc, n * abs(c))


# ---------------------------------------------------------------------------------------------
# value clipping and AGC


@PROPS
@given(grads=grad_lists(FLOAT_DTYPES), v=st.floats(1e-3, 1e3))
def test_clip_grad_value_bounds(grads, v):
    ps = params_for(grads)
    gg.clip_grad_value_(ps, v)
    for p, g in zip(ps, grads):
        bound = float(torch.tensor(v, dtype=g.dtype))  # v as the grad dtype represents it
        assert p.grad.abs().max() <= bound
        inside = g.double().abs() <= v
        assert torch.equal(p.grad[inside], g[inside])  # untouched inside the bound
        assert torch.equal(p.grad, ref.clip_value(g, v).to(g.dtype))


@PROPS
@given(
    shapes=st.lists(st.sampled_from([(), (3,), (4, 3), (2, 3, 2), (5, 1, 2, 2)]), min_size=1, max_size=4),
    w_scales=st.lists(st.sampled_from([0.0, 1e-2, 1.0]), min_size=4, max_size=4),
    g_scales=st.lists(st.sampled_from([1e-4, 1.0, 100.0]), min_size=4, max_size=4),
    clipping=st.floats(1e-3, 1.0),
    dtype=st.sampled_from(EXACT_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_agc_unit_norm_bound_and_reference(shapes, w_scales, g_scales, clipping, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=gen, dtype=dtype) * w_scales[i] for i, s in enumerate(shapes)]
    gs = [torch.randn(s, generator=gen, dtype=dtype) * g_scales[i] for i, s in enumerate(shapes)]
    ps = params_for(gs)
    for p, w in zip(ps, ws):
        p.data.copy_(w)
    gg.adaptive_clip_grad_(ps, clipping)
    tol = 16 * ulp(dtype)
    for p, w, g in zip(ps, ws, gs):
        for un, wn in zip(ref.agc_unit_norms(p.grad), ref.agc_unit_norms(w)):
            # |G_u| <= lambda * max(|W_u|, eps), up to rounding
            assert un <= clipping * max(wn, 1e-3) * (1 + tol) + 1e-300
        torch.testing.assert_close(p.grad.double(), ref.agc(w, g, clipping), rtol=tol, atol=1e-300)
