"""Clipping: peer test suites ported (torch, optax, timm, Keras/TF), parity with torch.nn.utils,
overflow traps and gradguard's documented deviations.

Torch's cases run through an ``impl`` fixture over {``torch.nn.utils``, ``gradguard``}: the
drop-in signatures match, so the same assertions call ``impl.clip_grad_norm_(...)`` unchanged.
Inputs on which gradguard deliberately differs (norm_type <= 0, max_norm <= 0, clip_value <= 0,
fp16 overflow, the return dtype for fp16) run against torch only, and gradguard's behaviour there
is asserted separately.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.utils as tnu
from torch import nn

from tests import _reference as ref
import gradguard as gg

INF, NAN = math.inf, math.nan
F32_TOL = {"rtol": 1.3e-6, "atol": 1e-5}  # torch.testing's defaults for float32
EMPTY_GENERATOR = "`parameters` is an empty generator, no gradient clipping will occur."


@pytest.fixture(params=["torch", "gradguard"])
def impl(request):
    return {"torch": tnu, "gradguard": gg}[request.param]


def params_with_grads(*grads, dtype=None):
    """Leaf parameters whose .grad is a clone of each given tensor (None: no grad)."""
    out = []
    for g in grads:
        if g is None:
            out.append(nn.Parameter(torch.zeros(2, dtype=dtype or torch.float32)))
            continue
        p = nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        out.append(p)
    return out


def assert_same(a, b):
    """Bitwise equality, NaN in the same places, same dtype."""
    __tracebackhide__ = True
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def linear_with_grads(weight_grad, bias_grad):
    lin = nn.Linear(10, 10)
    lin.weight.grad = weight_grad.clone().view_as(lin.weight)
    lin.bias.grad = bias_grad.clone().view_as(lin.bias)
    return lin


# ---------------------------------------------------------------------------------------------
# torch test_nn.py::test_clip_grad_norm, norm types x foreach, assertions (i)-(viii)

NORM_TYPES = [0.5, 1.5, 2, 4, "inf"]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_torch_suite(impl, norm_type, foreach):
    max_norm = 2.0
    p = float(norm_type)
    grads = torch.arange(1.0, 101).view(10, 10), torch.ones(10).div(1000)
    lin = linear_with_grads(*grads)

    total = impl.clip_grad_norm_(lin.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    after = [lin.weight.grad, lin.bias.grad]
    # (i) the returned norm is the p-norm of all grads (float64 reference, float32 tolerance)
    expected_before = ref.global_norm(grads, p)
    torch.testing.assert_close(total, torch.tensor(expected_before, dtype=torch.float32), **F32_TOL)
    # (ii) the norm after clipping is max_norm; (iii) and no larger than before
    norm_after = ref.global_norm(after, p)
    assert norm_after == pytest.approx(max_norm, rel=1.3e-6, abs=1e-5)
    assert norm_after <= expected_before
    # (iv) one factor for every element: each equals g * c bitwise with torch's c; the ratios
    # p.grad / g agree to within 2 float32 ulps (torch asserts their std is 0 to 1e-5)
    c = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for a, g in zip(after, grads):
        assert_same(a, g.view_as(a) * c)
    ratios = torch.cat([(a / g.view_as(a)).view(-1) for a, g in zip(after, grads)])
    assert (ratios - ratios[0]).abs().max() <= 2 * torch.finfo(torch.float32).eps * ratios[0]
    assert ratios.std() <= 1e-5

    # (v) the decomposed API gives the same grads and norm, bit for bit
    lin2 = linear_with_grads(*grads)
    grads2 = [q.grad for q in lin2.parameters()]
    total2 = impl.get_total_norm(grads2, norm_type, False, foreach)
    impl.clip_grads_with_norm_(lin2.parameters(), max_norm, total2, foreach)
    assert_same(total2, total)
    for a, b in zip(after, grads2):
        assert_same(a, b)

    # (vi) small grads are left unchanged (scale exactly 1) and the norm is returned as is
    small = torch.rand(10, 10).div(10000), torch.ones(10).div(500)
    lin3 = linear_with_grads(*small)
    total3 = impl.clip_grad_norm_(lin3.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    torch.testing.assert_close(total3, torch.tensor(ref.global_norm(small, p), dtype=torch.float32), **F32_TOL)
    assert_same(lin3.weight.grad, small[0])
    assert_same(lin3.bias.grad, small[1])

    # (vii) a bare Tensor and [Tensor] give identical grads
    p1, p2 = params_with_grads(grads[0], grads[0])
    n1 = impl.clip_grad_norm_(p1, max_norm, norm_type=norm_type, foreach=foreach)
    n2 = impl.clip_grad_norm_([p2], max_norm, norm_type=norm_type, foreach=foreach)
    assert_same(n1, n2)
    assert_same(p1.grad, p2.grad)

    # (viii) an exhausted generator: exactly one warning, torch's exact text, at the call site
    gen = (q for q in lin.parameters())
    list(gen)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = impl.clip_grad_norm_(gen, max_norm, norm_type=norm_type, foreach=foreach)
    assert [str(x.message) for x in w] == [EMPTY_GENERATOR]
    assert w[0].filename == __file__
    assert_same(out, torch.tensor(0.0))


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("norm_type", [0.5, 1, 1.5, 2, 3.5, 4, INF, "inf", -INF])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_grad_norm_bitwise_equal_to_torch(norm_type, foreach, dtype):
    gen = torch.Generator().manual_seed(7)
    grads = [
        torch.randn(7, 5, generator=gen, dtype=dtype) * 3,
        None,
        torch.randn(11, generator=gen, dtype=dtype),
        torch.randn((), generator=gen, dtype=dtype),
        torch.randn(3, 2, 2, generator=gen, dtype=dtype) * 1e-3,
    ]
    for max_norm in (0.5, 1e6):  # one that clips, one that does not
        ours, theirs = params_with_grads(*grads, dtype=dtype), params_with_grads(*grads, dtype=dtype)
        n_ours = gg.clip_grad_norm_(ours, max_norm, norm_type, foreach=foreach)
        n_theirs = tnu.clip_grad_norm_(theirs, max_norm, norm_type, foreach=foreach)
        assert_same(n_ours, n_theirs)
        for a, b in zip(ours, theirs):
            if b.grad is None:
                assert a.grad is None
            else:
                assert_same(a.grad, b.grad)
        assert_same(
            gg.get_total_norm([g for g in grads if g is not None], norm_type, foreach=foreach),
            tnu.get_total_norm([g for g in grads if g is not None], norm_type, foreach=foreach),
        )


# ---------------------------------------------------------------------------------------------
# torch test_nn.py::test_clip_grad_value


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bias_grad", [2.0, None], ids=["bias-grad", "bias-no-grad"])
def test_clip_grad_value_torch_suite(impl, foreach, bias_grad):
    lin = nn.Linear(10, 10)
    clip_value = 2.5
    weight_grad = torch.arange(-50.0, 50).view(10, 10).div(5)  # -10 ... 9.8
    lin.weight.grad = weight_grad.clone()
    lin.bias.grad = None if bias_grad is None else torch.full((10,), bias_grad)
    impl.clip_grad_value_(lin.parameters(), clip_value, foreach=foreach)
    for q in filter(lambda q: q.grad is not None, lin.parameters()):
        assert q.grad.max() <= clip_value
        assert q.grad.min() >= -clip_value
    assert_same(lin.weight.grad, ref.clip_value(weight_grad, clip_value).float())
    if bias_grad is None:
        assert lin.bias.grad is None
    else:
        assert_same(lin.bias.grad, torch.full((10,), 2.0))  # inside the bound: unchanged
    # a single tensor and a list behave the same
    p1, p2 = params_with_grads(weight_grad, weight_grad)
    impl.clip_grad_value_(p1, clip_value, foreach=foreach)
    impl.clip_grad_value_([p2], clip_value, foreach=foreach)
    assert_same(p1.grad, p2.grad)


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_clip_grad_value_bitwise_equal_to_torch(foreach, dtype):
    gen = torch.Generator().manual_seed(3)
    grads = [(torch.randn(6, 4, generator=gen) * 3).to(dtype), None, torch.tensor([NAN, INF, -INF, 0.5], dtype=dtype)]
    ours, theirs = params_with_grads(*grads, dtype=dtype), params_with_grads(*grads, dtype=dtype)
    gg.clip_grad_value_(ours, 1.25, foreach=foreach)
    tnu.clip_grad_value_(theirs, 1.25, foreach=foreach)
    for a, b in zip(ours, theirs):
        if b.grad is not None:
            assert_same(a.grad, b.grad)
    # NaN stays NaN; +/-Inf become +/-clip_value (which hides an overflow: see the docstring)
    assert torch.isnan(ours[2].grad[0]) and ours[2].grad[1:].tolist() == [1.25, -1.25, 0.5]


# ---------------------------------------------------------------------------------------------
# torch test_nn.py::test_clip_grad_norm_error_if_nonfinite: the whole table, as literals

POS = [0.1, 1, 2, 3.5, INF]
NEG = [-0.1, -1, -2, -3.5]
ALL_BUT_0 = POS + NEG
ALL = ALL_BUT_0 + [0]
# (grad in only one element?, finite prefix parameter?, scalars, nonfinite norms, finite norms)
NONFINITE_TABLE = [
    # an infinite grad
    (False, False, [INF, -INF], ALL_BUT_0, [0]),
    (False, True, [INF, -INF], POS, NEG + [0]),
    (True, False, [INF, -INF], POS, NEG + [0]),
    (True, True, [INF, -INF], POS, NEG + [0]),
    # a NaN grad
    (False, False, [NAN], ALL_BUT_0, [0]),
    (False, True, [NAN], ALL_BUT_0, [0]),
    (True, False, [NAN], ALL_BUT_0, [0]),
    (True, True, [NAN], ALL_BUT_0, [0]),
    # large but never an error
    (False, False, [2e22, -2e22], [], ALL),
    (False, True, [2e22, -2e22], [], ALL),
    (True, False, [2e22, -2e22], [], ALL),
    (True, True, [2e22, -2e22], [], ALL),
    # overflows float64 for some orders only
    (False, False, [2e200, -2e200], [3.5, 2, -2, -3.5], [INF, 1, 0.1, 0, -1, -0.1]),
    (False, True, [2e200, -2e200], [3.5, 2], NEG + [INF, 1, 0.1, 0]),
    (True, False, [2e200, -2e200], [3.5, 2], NEG + [INF, 1, 0.1, 0]),
    (True, True, [2e200, -2e200], [3.5, 2], NEG + [INF, 1, 0.1, 0]),
]


def nonfinite_case_params(scalar, one_elem, prefix):
    """float64 ones(10) whose grad is the scalar in one element (index 1) or in all, optionally
    after a parameter with grad 1, built by backward() as in torch's test."""
    param = torch.ones(10, dtype=torch.float64, requires_grad=True)
    (param[1] if one_elem else param).mul(scalar).sum().backward()
    if not prefix:
        return [param]
    head = torch.ones(1, dtype=torch.float64, requires_grad=True)
    head.mul(1).sum().backward()
    return [head, param]


def run_nonfinite_case(clip, norm_type, scalar, one_elem, prefix, nonfinite):
    for error_if_nonfinite in (False, True):
        params = nonfinite_case_params(scalar, one_elem, prefix)
        where = f"norm_type={norm_type} scalar={scalar} one_elem={one_elem} prefix={prefix}"
        if nonfinite and error_if_nonfinite:
            before = [q.grad.clone() for q in params]
            with pytest.raises(RuntimeError, match=f"^The total norm of order {float(norm_type)} for gradients"):
                clip(params, 1, norm_type=norm_type, error_if_nonfinite=True)
            for q, b in zip(params, before):  # grads unchanged on error
                assert_same(q.grad, b), where
        else:
            total = clip(params, 1, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)
            assert bool(torch.isfinite(total)) != nonfinite, where


@pytest.mark.parametrize(("one_elem", "prefix", "scalars", "nonfinite_norms", "finite_norms"), NONFINITE_TABLE)
def test_error_if_nonfinite_table_torch(one_elem, prefix, scalars, nonfinite_norms, finite_norms):
    for scalar in scalars:
        for norm_type in nonfinite_norms:
            run_nonfinite_case(tnu.clip_grad_norm_, norm_type, scalar, one_elem, prefix, True)
        for norm_type in finite_norms:
            run_nonfinite_case(tnu.clip_grad_norm_, norm_type, scalar, one_elem, prefix, False)


@pytest.mark.parametrize(("one_elem", "prefix", "scalars", "nonfinite_norms", "finite_norms"), NONFINITE_TABLE)
def test_error_if_nonfinite_table_gradguard(one_elem, prefix, scalars, nonfinite_norms, finite_norms):
    for scalar in scalars:
        for norm_type in nonfinite_norms:
            if norm_type > 0:
                run_nonfinite_case(gg.clip_grad_norm_, norm_type, scalar, one_elem, prefix, True)
        for norm_type in finite_norms:
            if norm_type > 0:
                run_nonfinite_case(gg.clip_grad_norm_, norm_type, scalar, one_elem, prefix, False)
            # same inputs, after clipping, as torch: bit for bit, corruption included
            if norm_type > 0:
                ours = nonfinite_case_params(scalar, one_elem, prefix)
                theirs = nonfinite_case_params(scalar, one_elem, prefix)
                assert_same(gg.clip_grad_norm_(ours, 1, norm_type), tnu.clip_grad_norm_(theirs, 1, norm_type))
                for a, b in zip(ours, theirs):
                    assert_same(a.grad, b.grad)
        # the orders gradguard refuses (torch's 0-"norm" and negative orders): a ValueError
        # naming the argument and the value, raised before any grad is read or changed
        for norm_type in [n for n in nonfinite_norms + finite_norms if n <= 0]:
            params = nonfinite_case_params(scalar, one_elem, prefix)
            before = [q.grad.clone() for q in params]
            with pytest.raises(ValueError, match=rf"`norm_type` must be a positive number.*got {norm_type!r}"):
                gg.clip_grad_norm_(params, 1, norm_type=norm_type, error_if_nonfinite=True)
            for q, b in zip(params, before):
                assert_same(q.grad, b)


def test_error_if_nonfinite_table_covers_every_order():
    # every row of the table classifies every order it is about, once
    for one_elem, prefix, scalars, nonfinite_norms, finite_norms in NONFINITE_TABLE:
        assert sorted(nonfinite_norms + finite_norms) == sorted(ALL)


def test_error_if_nonfinite_costs_exactly_one_sync_and_only_when_asked():
    from gradguard.testing import count_host_syncs

    params = params_with_grads(torch.tensor([3.0, 4.0]))
    with count_host_syncs() as c:
        gg.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert c.count == 1
    with count_host_syncs() as c:
        gg.clip_grad_norm_(params, 1.0)
    assert c.count == 0


# ---------------------------------------------------------------------------------------------
# torch test_clip_grad_norm_multi_device, on CPU: mixed dtypes exercise the (device, dtype) grouping


def mixed_grads():
    """40 grads alternating float32 / float64 over four orders of magnitude: enough terms that
    the order of the final reduction shows in the last bits."""
    gen = torch.Generator().manual_seed(11)
    return [
        torch.randn(3 + i % 7, generator=gen, dtype=torch.float64 if i % 2 else torch.float32)
        * 10.0 ** (i % 4 - 2)
        for i in range(40)
    ]


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("norm_type", [0.5, 2, 4, INF])
def test_mixed_dtypes_match_single_dtype_reference(impl, norm_type, foreach):
    grads = mixed_grads()
    params = params_with_grads(*grads)
    total = impl.clip_grad_norm_(params, 1.0, norm_type, foreach=foreach)
    assert total.dtype == torch.float64  # float32 and float64 norms reduce in float64
    # the same grads, all float64, one group: the single-device reference of torch's test
    single = params_with_grads(*[g.double() for g in grads])
    total64 = impl.clip_grad_norm_(single, 1.0, norm_type, foreach=foreach)
    assert float(total) == pytest.approx(float(total64), rel=1e-6)
    assert float(total) == pytest.approx(ref.global_norm(grads, norm_type), rel=1e-6)
    for q, s in zip(params, single):
        torch.testing.assert_close(q.grad, s.grad.to(q.grad.dtype), rtol=2e-6, atol=1e-7)
    assert [q.grad.dtype for q in params] == [g.dtype for g in grads]


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("norm_type", [0.5, 2, 4, INF])
def test_mixed_dtypes_bitwise_equal_to_torch(norm_type, foreach):
    grads = mixed_grads()
    ours, theirs = params_with_grads(*grads), params_with_grads(*grads)
    assert_same(gg.clip_grad_norm_(ours, 1.0, norm_type, foreach=foreach),
                tnu.clip_grad_norm_(theirs, 1.0, norm_type, foreach=foreach))
    for a, b in zip(ours, theirs):
        assert_same(a.grad, b.grad)


# ---------------------------------------------------------------------------------------------
# Reference behaviour of torch 2.13 measured in oracles.md: grads [3,4] and [0,12], max_norm 1


@pytest.mark.parametrize(
    ("norm_type", "expected"),
    [(0.5, 51.784615), (1, 19.0), (2, 13.0), (3.5, 12.099076), (INF, 12.0)],
)
def test_measured_torch_returns(impl, norm_type, expected):
    params = params_with_grads(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0]))
    total = impl.clip_grad_norm_(params, 1.0, norm_type)
    assert float(total) == pytest.approx(expected, rel=1e-7, abs=1e-6)
    assert float(total) == pytest.approx(ref.global_norm([[3, 4], [0, 12]], norm_type), rel=1.3e-6)


def test_measured_torch_oddities_on_refused_inputs():
    """What torch does with the inputs gradguard refuses (run against torch only)."""
    def fresh():
        return params_with_grads(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0]))

    params = fresh()
    assert float(tnu.clip_grad_norm_(params, 1.0, 0)) == 2.0  # a count of non-zeros ...
    assert params[0].grad.abs().max() < 3.0  # ... and it clips by it
    for p in (-1, -2, -INF):
        params = fresh()
        assert float(tnu.clip_grad_norm_(params, 1.0, p)) == 0.0  # a zero element: "norm" 0
        assert params[0].grad.tolist() == [3.0, 4.0]  # and no clipping
    params = fresh()
    tnu.clip_grad_norm_(params, 0.0)
    assert params[0].grad.tolist() == [0.0, 0.0]  # max_norm = 0 zeroes the grads
    params = fresh()
    tnu.clip_grad_norm_(params, -1.0)
    assert params[0].grad.lt(0).all()  # max_norm = -1 flips their sign
    params = fresh()
    tnu.clip_grad_value_(params, -1.0)
    assert params[0].grad.tolist() == [-1.0, -1.0]  # clip_value = -1 sets every grad to -1


@pytest.mark.parametrize(
    ("fn", "args", "arg"),
    [
        ("clip_grad_norm_", (0.0,), "max_norm"),
        ("clip_grad_norm_", (-1.0,), "max_norm"),
        ("clip_grad_norm_", (1.0, 0), "norm_type"),
        ("clip_grad_norm_", (1.0, -2), "norm_type"),
        ("clip_grad_value_", (-1.0,), "clip_value"),
        ("clip_grad_value_", (0.0,), "clip_value"),
    ],
)
def test_refused_inputs_raise_and_leave_grads(fn, args, arg):
    """The deliberate deviation: where torch flips, zeroes or counts, gradguard raises."""
    params = params_with_grads(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0]))
    with pytest.raises(ValueError, match=f"`{arg}`.*got {args[-1]!r}"):
        getattr(gg, fn)(params, *args)
    assert params[0].grad.tolist() == [3.0, 4.0] and params[1].grad.tolist() == [0.0, 12.0]


def test_empty_and_gradless_inputs(impl):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty list warns about nothing
        assert_same(impl.clip_grad_norm_([], 1.0), torch.tensor(0.0))
        assert_same(impl.get_total_norm([]), torch.tensor(0.0))
        no_grads = params_with_grads(None, None)
        assert_same(impl.clip_grad_norm_(no_grads, 1.0), torch.tensor(0.0))
        impl.clip_grads_with_norm_(no_grads, 1.0, torch.tensor(5.0))
        assert all(q.grad is None for q in no_grads)


def test_clip_grad_value_without_any_grad():
    """Deviation (a torch bug): torch's clip_grad_value_ fails when no parameter has a grad;
    gradguard does nothing, as clip_grad_norm_ does."""
    no_grads = params_with_grads(None, None)
    with pytest.raises(RuntimeError, match="nested_tensorlist"):
        tnu.clip_grad_value_(no_grads, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gg.clip_grad_value_(no_grads, 1.0)
        gg.clip_grad_value_([], 1.0)
    assert all(q.grad is None for q in no_grads)


def test_norm_exactly_max_norm_is_still_scaled_with_torch_eps(impl):
    params = params_with_grads(torch.tensor([0.6, 0.8], dtype=torch.float64))
    total = impl.clip_grad_norm_(params, 1.0)
    assert float(total) == pytest.approx(1.0, abs=1e-15)
    assert params[0].grad.tolist() == pytest.approx([0.6 / (1 + 1e-6), 0.8 / (1 + 1e-6)], rel=1e-12)
    assert params[0].grad[0] < 0.6


def test_norm_exactly_max_norm_is_left_alone_with_eps_zero():
    params = params_with_grads(torch.tensor([0.6, 0.8], dtype=torch.float64))
    gg.clip_grad_norm_(params, float(torch.tensor([0.6, 0.8], dtype=torch.float64).norm()), eps=0.0)
    assert params[0].grad.tolist() == [0.6, 0.8]


def test_nan_and_inf_grads_corrupt_as_in_torch(impl):
    params = params_with_grads(torch.tensor([NAN, 1.0]))
    assert math.isnan(impl.clip_grad_norm_(params, 1.0))
    assert torch.isnan(params[0].grad).all()
    params = params_with_grads(torch.tensor([INF, 1.0]))
    assert impl.clip_grad_norm_(params, 1.0) == INF
    assert math.isnan(params[0].grad[0]) and params[0].grad[1] == 0.0  # [nan, 0]


def test_fp16_plus_fp64_total_is_float64(impl):
    params = params_with_grads(torch.tensor([3.0, 4.0], dtype=torch.float16), torch.tensor([12.0], dtype=torch.float64))
    total = impl.get_total_norm([q.grad for q in params])
    assert total.dtype == torch.float64 and float(total) == 13.0


# ---------------------------------------------------------------------------------------------
# Overflow traps (oracles.md 1a) and the fp16 deviation


def test_fp16_overflow_gives_true_norm_in_float32():
    """Deviation: torch returns inf in float16 and then zeroes the grads; gradguard accumulates
    in float32 and returns the true norm, 84852.8 = 6e4 * sqrt2 (fp16(6e4) = 60000 exactly)."""
    g = torch.tensor([6e4, 6e4], dtype=torch.float16)
    theirs = params_with_grads(g)
    t_total = tnu.clip_grad_norm_(theirs, 1.0)
    assert t_total.dtype == torch.float16 and t_total == INF
    assert theirs[0].grad.tolist() == [0.0, 0.0]

    ours = params_with_grads(g)
    total = gg.clip_grad_norm_(ours, 1.0)
    assert total.dtype == torch.float32
    assert float(total) == pytest.approx(6e4 * math.sqrt(2), rel=1e-7)
    assert float(total) == pytest.approx(84852.8, abs=0.05)
    # clipped to norm 1 (in fp16's precision), not zeroed
    assert ours[0].grad.dtype == torch.float16
    assert ref.global_norm([ours[0].grad], 2) == pytest.approx(1.0, rel=1e-3)
    stats = gg.grad_stats(params_with_grads(g))
    assert not bool(stats.nonfinite) and float(stats.global_norm) == pytest.approx(84852.8, abs=0.05)


def test_fp16_tiny_coefficient_does_not_underflow():
    """A float16 gradient whose coefficient is below float16's smallest subnormal (6e-8) is still
    scaled, not zeroed: the multiplier stays float32 (only bf16, float32's range, is rounded)."""
    g = torch.full((1_000_000,), 6e4, dtype=torch.float16)  # norm 6e7: coefficient 1.7e-8
    ps = params_with_grads(g)
    total = gg.clip_grad_norm_(ps, 1.0)
    assert float(total) == pytest.approx(6e7, rel=1e-3)  # float32 accumulation of 1M terms
    assert ps[0].grad.dtype == torch.float16 and bool((ps[0].grad > 0).all())
    assert ref.global_norm([ps[0].grad], 2) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_total_is_returned_in_float32(dtype):
    """Deviation: torch returns the total in the grads' dtype; gradguard in float32."""
    grads = [torch.tensor([3.0, 4.0], dtype=dtype), torch.tensor([12.0], dtype=dtype)]
    assert tnu.get_total_norm(grads).dtype == dtype
    total = gg.get_total_norm(grads)
    assert total.dtype == torch.float32 and float(total) == 13.0
    ours, theirs = params_with_grads(*grads), params_with_grads(*grads)
    gg.clip_grad_norm_(ours, 1.0)
    tnu.clip_grad_norm_(theirs, 1.0)
    for a, b in zip(ours, theirs):  # the grads agree to the dtype's precision
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad, b.grad, rtol=2 * torch.finfo(dtype).eps, atol=0)


def test_fp64_1e23_stays_finite(impl):
    # Lightning's test_grad_norm_with_double_dtype: float64 accumulation (a float32 one gives inf)
    params = params_with_grads(torch.tensor([1e23], dtype=torch.float64))
    total = impl.clip_grad_norm_(params, 1.0)
    assert total.dtype == torch.float64 and float(total) == 1e23
    assert float(params[0].grad) == pytest.approx(1.0, rel=1e-12)
    assert not bool(gg.grad_stats(params_with_grads(torch.tensor([1e23], dtype=torch.float64))).nonfinite)


def test_fp32_sum_of_squares_overflow_is_flagged():
    """float32 grads whose squares overflow: torch and gradguard both return inf (the true norm
    5e19 is finite). Documented in GradStats: the flag calls such a step exploded."""
    g = torch.tensor([3e19, 4e19])
    assert ref.global_norm([g], 2) == pytest.approx(5e19)
    assert tnu.get_total_norm([g]) == INF
    assert gg.get_total_norm([g]) == INF
    stats = gg.grad_stats(params_with_grads(g))
    assert bool(stats.nonfinite) and stats.global_norm == INF
    # the same grads in float64 are fine
    assert float(gg.get_total_norm([g.double()])) == pytest.approx(ref.global_norm([g], 2), rel=1e-15)


# ---------------------------------------------------------------------------------------------
# optax _clipping_test.py: updates ([500,5],[300,3]), params ([1,2],[3,4])


def optax_fixture(dtype=torch.float32):
    params = [torch.tensor([1.0, 2.0], dtype=dtype), torch.tensor([3.0, 4.0], dtype=dtype)]
    updates = [torch.tensor([500.0, 5.0], dtype=dtype), torch.tensor([300.0, 3.0], dtype=dtype)]
    return params, updates


def clipped_copy(clip, updates, max_norm, **kw):
    ps = params_with_grads(*updates)
    clip(ps, max_norm, **kw)
    return [q.grad.clone() for q in ps]


def global_norm_errors(clip, dtype, **kw):
    """optax test_clip_by_global_norm: largest |norm - 1/i| and largest chained-vs-fresh
    relative difference over i = 1..50."""
    _, updates = optax_fixture(dtype)
    chained = [u.clone() for u in updates]
    norm_err, chain_err = 0.0, 0.0
    for i in range(1, 51):
        max_norm = 1.0 / i
        chained = clipped_copy(clip, chained, max_norm, **kw)
        fresh = clipped_copy(clip, updates, max_norm, **kw)
        norm_err = max(norm_err, abs(ref.global_norm(chained, 2) - max_norm))
        for c, f in zip(chained, fresh):
            chain_err = max(chain_err, float(((c.double() - f.double()).abs() / f.double().abs()).max()))
    return norm_err, chain_err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optax_clip_by_global_norm_passes_with_eps_zero(dtype):
    assert ref.global_norm(optax_fixture()[1], 2) == pytest.approx(math.sqrt(340034))
    norm_err, chain_err = global_norm_errors(gg.clip_grad_norm_, dtype, eps=0.0)
    assert norm_err < 5e-7  # assertAlmostEqual(..., places=6)
    assert chain_err <= 1e-6  # assert_allclose(rtol=1e-6)


@pytest.mark.parametrize("clip", [gg.clip_grad_norm_, tnu.clip_grad_norm_], ids=["gradguard", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optax_clip_by_global_norm_fails_with_torch_eps(clip, dtype):
    """Measured (oracles.md 1c): max/(norm + 1e-6) misses optax's bounds, in fp32 and fp64."""
    norm_err, chain_err = global_norm_errors(clip, dtype)
    assert norm_err > 5e-7
    assert chain_err > 1e-6
    assert norm_err == pytest.approx(9.8e-7, rel=0.05)
    assert chain_err == pytest.approx(4.9e-5, rel=0.05)


def test_optax_clip_value():
    _, updates = optax_fixture()
    ps = params_with_grads(*updates)
    gg.clip_grad_value_(ps, 1e6)
    for q, u in zip(ps, updates):
        assert_same(q.grad, u)
    gg.clip_grad_value_(ps, 1.0)
    for q in ps:
        assert_same(q.grad, torch.ones(2))


def unit_norms(t):
    return torch.tensor(ref.agc_unit_norms(t), dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optax_adaptive_grad_clip(dtype):
    params, updates = optax_fixture(dtype)
    for i in range(1, 51):
        clipping = 1.0 / i
        ps = params_with_grads(*updates)
        for q, w in zip(ps, params):
            q.data.copy_(w)
        gg.adaptive_clip_grad_(ps, clipping)
        for q, w, u in zip(ps, params, updates):
            assert (unit_norms(q.grad) - clipping * unit_norms(w) < 1e-6).all()
            torch.testing.assert_close(q.grad.double(), ref.agc(w, u, clipping), rtol=2e-6, atol=0)
        # clipping again (continuous clipping): no numerical drift beyond rtol 1e-6
        again = [q.grad.clone() for q in ps]
        gg.adaptive_clip_grad_(ps, clipping)
        for q, a in zip(ps, again):
            torch.testing.assert_close(q.grad, a, rtol=1e-6, atol=0)


def test_optax_adaptive_grad_clip_conv3d_layout():
    """optax's conv3d case: a JAX kernel (D, H, W, in, out) has units over every axis but the
    last; torch's (out, in, D, H, W) over every dim but dim 0. Clip in torch layout, transpose
    back, and compare with units computed in JAX layout."""
    gen = torch.Generator().manual_seed(5)
    jax_w = torch.randn(3, 3, 3, 4, 6, generator=gen, dtype=torch.float64)
    jax_g = torch.randn(3, 3, 3, 4, 6, generator=gen, dtype=torch.float64) * 10
    to_torch = (4, 3, 0, 1, 2)
    p = nn.Parameter(jax_w.permute(*to_torch).contiguous())
    p.grad = jax_g.permute(*to_torch).contiguous()
    gg.adaptive_clip_grad_([p], clipping=0.5)
    back = p.grad.permute(2, 3, 4, 1, 0)  # (out, in, D, H, W) -> (D, H, W, in, out)
    for u in range(6):
        w_norm = float(jax_w[..., u].norm())
        g_norm = float(jax_g[..., u].norm())
        m = 0.5 * max(w_norm, 1e-3)
        expected = jax_g[..., u] * (1.0 if g_norm < m else m / g_norm)
        torch.testing.assert_close(back[..., u], expected, rtol=1e-12, atol=0)
        assert float(back[..., u].norm()) <= 0.5 * w_norm + 1e-6


# ---------------------------------------------------------------------------------------------
# timm AGC: measured reference values (oracles.md 1b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agc_reference_values(dtype):
    params, updates = optax_fixture(dtype)
    ps = params_with_grads(*updates)
    for q, w in zip(ps, params):
        q.data.copy_(w)
    gg.adaptive_clip_grad_(ps, 1.0)
    rel = 1e-6 if dtype == torch.float32 else 1e-12
    assert ps[0].grad.tolist() == pytest.approx([2.2359562, 0.02235956], rel=1e-6)
    assert ps[1].grad.tolist() == pytest.approx([4.99975, 0.0499975], rel=1e-6)
    for q, w, u in zip(ps, params, updates):
        assert q.grad.tolist() == pytest.approx(ref.agc(w, u, 1.0).tolist(), rel=rel)
    # clipping 0.1: exactly 1/10 of those (up to rounding)
    ps10 = params_with_grads(*updates)
    for q, w in zip(ps10, params):
        q.data.copy_(w)
    gg.adaptive_clip_grad_(ps10, 0.1)
    for a, b in zip(ps10, ps):
        assert a.grad.tolist() == pytest.approx((b.grad / 10).tolist(), rel=rel)


def test_agc_2d_torch_layout_and_eps_floor():
    # optax's 2-D case (JAX grads [[1,2],[3,4]], params ones), transposed to torch layout
    w = nn.Parameter(torch.ones(2, 2))
    w.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).T.contiguous()
    gg.adaptive_clip_grad_([w], 1.0)
    assert w.grad.T.flatten().tolist() == pytest.approx([0.4472136, 0.6324555, 1.3416408, 1.2649111], rel=1e-6)
    # a zero-initialised parameter moves: the weight norm is floored at eps = 1e-3
    z = nn.Parameter(torch.zeros(2))
    z.grad = torch.tensor([3.0, 4.0])
    gg.adaptive_clip_grad_([z], 0.01)
    assert z.grad.tolist() == pytest.approx([6e-6, 8e-6], rel=1e-6)


def test_agc_exclude_and_named_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    for q in model.parameters():
        q.grad = torch.full_like(q, 100.0)
    head = model[1].weight
    gg.adaptive_clip_grad_(model.parameters(), 0.01, exclude=[head])
    assert (head.grad == 100.0).all()
    assert (model[0].weight.grad < 100.0).all()
    for q in model.parameters():
        q.grad = torch.full_like(q, 100.0)
    gg.adaptive_clip_grad_(model.named_parameters(), 0.01, exclude=["1.weight", "1.bias"])
    assert (model[1].weight.grad == 100.0).all() and (model[1].bias.grad == 100.0).all()
    assert (model[0].bias.grad < 100.0).all()
    for q in model.parameters():
        q.grad = torch.full_like(q, 100.0)
    gg.adaptive_clip_grad_(model.named_parameters(), 0.01, exclude=[head, "1.bias"])  # both kinds
    assert (model[1].weight.grad == 100.0).all() and (model[1].bias.grad == 100.0).all()
    assert (model[0].weight.grad < 100.0).all()


def test_agc_nonfinite_unit_becomes_nan_as_in_timm_and_optax():
    w = nn.Parameter(torch.ones(2, 3))
    w.grad = torch.tensor([[NAN, 1.0, 1.0], [0.001, 0.0, 0.0]])
    gg.adaptive_clip_grad_([w], 0.01)
    assert torch.isnan(w.grad[0]).all()  # the NaN unit: NaN throughout
    assert w.grad[1].tolist() == pytest.approx([0.001, 0.0, 0.0])  # the other unit: untouched (|g| < m)


# ---------------------------------------------------------------------------------------------
# Keras optimizer_test.py and TF clip_ops_test.py (oracles.md 1g)


def test_keras_clip_norm_clip_value_global_clip_norm():
    ps = params_with_grads(torch.tensor([100.0, 100.0]))
    gg.clip_grad_norm_(ps, 1.0, eps=0.0)  # clipnorm: one tensor's norm
    assert ps[0].grad.tolist() == pytest.approx([math.sqrt(2) / 2] * 2, rel=1e-7)
    ps = params_with_grads(torch.tensor([100.0, 100.0]))
    gg.clip_grad_value_(ps, 1.0)
    assert ps[0].grad.tolist() == [1.0, 1.0]
    g = torch.tensor([50.0, 100.0])
    ps = params_with_grads(g)
    gg.clip_grad_norm_(ps, 1.0, eps=0.0)
    assert ps[0].grad.tolist() == pytest.approx((g / g.norm()).tolist(), rel=1e-7)


def tf_fixture(x0_10=4.0):
    return params_with_grads(torch.tensor([[-2.0, 0.0, 0.0], [x0_10, 0.0, 0.0]]), torch.tensor([1.0, -2.0]))


def test_tf_clip_by_global_norm_clipped():
    ps = tf_fixture()
    total = gg.clip_grad_norm_(ps, 4.0, eps=0.0)
    assert float(total) == 5.0
    assert ps[0].grad.flatten().tolist() == pytest.approx([-1.6, 0, 0, 3.2, 0, 0], abs=1e-6)
    assert ps[1].grad.tolist() == pytest.approx([0.8, -1.6], abs=1e-6)
    assert ps[0].grad[0, 0].item() == torch.tensor(-2.0 * 0.8).item()  # exactly x * fp32(0.8)
    # the torch convention: -1.59999968, still within TF's 1e-6
    ps = tf_fixture()
    gg.clip_grad_norm_(ps, 4.0)
    assert ps[0].grad[0, 0].item() == pytest.approx(-1.59999968, abs=5e-8)  # < half an ulp
    assert ps[0].grad[0, 0].item() == pytest.approx(-1.6, abs=1e-6)


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_tf_clip_by_global_norm_zero(eps):
    ps = params_with_grads(torch.zeros(2, 3), torch.zeros(2))
    assert float(gg.clip_grad_norm_(ps, 4.0, eps=eps)) == 0.0
    assert ps[0].grad.eq(0).all() and ps[1].grad.eq(0).all()


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_tf_clip_by_global_norm_inf(eps):
    """TF: norm inf and every output NaN. gradguard, like torch and optax, multiplies by
    max/inf = 0: the inf entry becomes NaN and the finite ones 0 (skip such steps with Guard)."""
    ps = tf_fixture(INF)
    assert gg.clip_grad_norm_(ps, 4.0, eps=eps) == INF
    assert math.isnan(ps[0].grad[1, 0])
    rest = torch.cat([ps[0].grad.flatten()[[0, 1, 2, 4, 5]], ps[1].grad])
    assert rest.eq(0).all()
    assert bool(gg.grad_stats(tf_fixture(INF)).nonfinite)


# ---------------------------------------------------------------------------------------------
# eps conventions and the coefficient


def test_clip_coef_matches_reference():
    from gradguard.clip import clip_coef

    for total, max_norm in itertools.product([0.0, 0.5, 1.0, 5.0, 1e30], [1e-3, 1.0, 4.0]):
        for eps in (0.0, 1e-6, 0.5):
            t = torch.tensor(total, dtype=torch.float64)
            c = clip_coef(t, max_norm, eps)
            assert c.dtype == torch.float64 and c.shape == ()
            assert float(c) == pytest.approx(ref.clip_coef(total, max_norm, eps), rel=1e-15)


def test_clip_grads_with_norm_eps_zero_and_max_norm_inf():
    ps = params_with_grads(torch.tensor([3.0, 4.0]))
    gg.clip_grads_with_norm_(ps, 1.0, torch.tensor(5.0), eps=0.0)
    assert ps[0].grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-7)
    ps = params_with_grads(torch.tensor([3.0, 4.0]))
    assert float(gg.clip_grad_norm_(ps, INF)) == 5.0  # measures only
    assert ps[0].grad.tolist() == [3.0, 4.0]


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.bfloat16, 2**-7), (torch.float16, 2e-3), (torch.float64, 1e-12)])
def test_agc_low_precision_matches_reference(dtype, rtol):
    """Matrices unit-wise and vectors in one foreach batch, in every dtype."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(6, 4), (5,), (), (3, 2, 2), (7,)]
    ws = [(torch.randn(s, generator=gen) * 0.5).to(dtype) for s in shapes]
    gs = [(torch.randn(s, generator=gen) * 10).to(dtype) for s in shapes]
    gs[1] = gs[1] * 1e-4  # one vector below its threshold: untouched
    ps = params_with_grads(*gs)
    for q, w in zip(ps, ws):
        q.data.copy_(w)
    gg.adaptive_clip_grad_(ps, 0.05)
    for q, w, g in zip(ps, ws, gs):
        assert q.grad.dtype == dtype
        torch.testing.assert_close(q.grad.double(), ref.agc(w, g, 0.05), rtol=rtol, atol=0)
    assert_same(ps[1].grad, gs[1])
