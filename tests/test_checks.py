"""Validation at the public boundary (every error names the argument and the value it got), the
empty-input rules, foreach on an unsupported device, and the host-sync counter itself."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.utils as tnu
from torch import nn

import gradguard as gg
from gradguard._checks import check_choice, check_int, check_positive, check_probability
from gradguard.testing import count_host_syncs

INF, NAN = math.inf, math.nan
EMPTY_GENERATOR = "`parameters` is an empty generator, no gradient clipping will occur."


def params():
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([3.0, 4.0])
    return [p]


def expect(exc, arg, value, fn, *args, **kwargs):
    """``fn`` raises ``exc`` whose message names `arg` and the repr of ``value``; grads unchanged."""
    __tracebackhide__ = True
    ps = params()
    with pytest.raises(exc) as info:
        fn(ps, *args, **kwargs)
    msg = str(info.value)
    assert f"`{arg}`" in msg, msg
    assert repr(value) in msg, msg
    assert ps[0].grad.tolist() == [3.0, 4.0]
    return msg


# ---------------------------------------------------------------------------------------------
# numbers: max_norm, clip_value, clipping, eps, norm_type


@pytest.mark.parametrize("value", [0.0, -1.0, -1e-12, NAN, -INF, 0])
def test_max_norm(value):
    msg = expect(ValueError, "max_norm", value, gg.clip_grad_norm_, value)
    assert "max_norm=1.0" in msg  # the fix
    expect(ValueError, "max_norm", value, gg.clip_grads_with_norm_, value, torch.tensor(5.0))


def test_max_norm_inf_is_allowed_and_measures_only():
    ps = params()
    assert float(gg.clip_grad_norm_(ps, INF)) == 5.0 and ps[0].grad.tolist() == [3.0, 4.0]


@pytest.mark.parametrize("value", ["1.0", None, True, [1.0]])
def test_max_norm_wrong_type(value):
    expect(TypeError, "max_norm", value, gg.clip_grad_norm_, value)


def test_max_norm_tensor_works_as_in_torch():
    ps, ref = params(), params()
    total = gg.clip_grad_norm_(ps, torch.tensor(1.0))
    assert torch.equal(total, tnu.clip_grad_norm_(ref, torch.tensor(1.0)))
    assert torch.equal(ps[0].grad, ref[0].grad)
    with pytest.raises(TypeError, match=r"`max_norm` must be a number or a one-element floating"):
        gg.clip_grad_norm_(params(), torch.ones(2))


def test_numpy_scalars_are_numbers():
    ps = params()
    assert float(gg.clip_grad_norm_(ps, np.float32(1.0), eps=np.float64(0.0))) == 5.0
    assert ps[0].grad.tolist() == pytest.approx([0.6, 0.8])
    gg.clip_grad_value_(ps, np.float32(0.5))
    assert ps[0].grad.tolist() == [0.5, 0.5]


@pytest.mark.parametrize("value", [0.0, -1.0, NAN, INF, -INF])
def test_clip_value(value):
    msg = expect(ValueError, "clip_value", value, gg.clip_grad_value_, value)
    assert "clip_value=1.0" in msg


@pytest.mark.parametrize("value", [0.0, -0.01, NAN, INF])
def test_agc_clipping(value):
    expect(ValueError, "clipping", value, gg.adaptive_clip_grad_, value)


@pytest.mark.parametrize("value", [0.0, -1e-3, NAN, INF])
def test_agc_eps(value):
    expect(ValueError, "eps", value, gg.adaptive_clip_grad_, 0.01, value)


@pytest.mark.parametrize("value", [-1e-6, NAN, INF, -INF])
def test_clip_eps(value):
    msg = expect(ValueError, "eps", value, gg.clip_grad_norm_, 1.0, eps=value)
    assert "1e-6" in msg and "0 for optax" in msg
    expect(ValueError, "eps", value, gg.clip_grads_with_norm_, 1.0, torch.tensor(5.0), eps=value)


@pytest.mark.parametrize("value", ["0", True, None])
def test_clip_eps_wrong_type(value):
    expect(TypeError, "eps", value, gg.clip_grad_norm_, 1.0, eps=value)


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, -2.0, NAN, "nan", "-1"])
@pytest.mark.parametrize("fn", ["clip_grad_norm_", "get_total_norm", "grad_stats"])
def test_norm_type_out_of_range(value, fn):
    extra = (1.0,) if fn == "clip_grad_norm_" else ()
    if fn == "get_total_norm":
        ps = params()
        with pytest.raises(ValueError) as info:
            gg.get_total_norm([ps[0].grad], value)
        msg = str(info.value)
        assert "`norm_type`" in msg and repr(value) in msg
        return
    msg = expect(ValueError, "norm_type", value, getattr(gg, fn), *extra, norm_type=value)
    assert "'inf'" in msg and "2.0" in msg  # the fix


@pytest.mark.parametrize("value", ["nonsense", "two", ""])
def test_norm_type_nonsense_string(value):
    expect(ValueError, "norm_type", value, gg.clip_grad_norm_, 1.0, value)


@pytest.mark.parametrize("value", [None, [2.0], True, torch.tensor(2.0)])
def test_norm_type_wrong_type(value):
    ps = params()
    with pytest.raises(TypeError, match=r"`norm_type` must be a number or 'inf', got"):
        gg.clip_grad_norm_(ps, 1.0, value)


@pytest.mark.parametrize("value", ["inf", "Inf", "-inf", INF, -INF, 2, "2.0", 0.25])
def test_norm_type_accepted(value):
    gg.clip_grad_norm_(params(), 1.0, value)
    gg.grad_stats(params(), value)


def test_total_norm_must_be_a_tensor():
    with pytest.raises(TypeError, match=r"`total_norm` must be a Tensor .*got float"):
        gg.clip_grads_with_norm_(params(), 1.0, 5.0)


# ---------------------------------------------------------------------------------------------
# parameters that are not tensors


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grad_value_", "grad_stats", "adaptive_clip_grad_"])
@pytest.mark.parametrize(("value", "shown"), [(5, "int: 5"), ("abc", "str: 'abc'"), (None, "NoneType: None"), (2.5, "float: 2.5")])
def test_parameters_not_iterable(fn, value, shown):
    args = {"clip_grad_norm_": (1.0,), "clip_grad_value_": (1.0,), "grad_stats": (), "adaptive_clip_grad_": ()}[fn]
    with pytest.raises(TypeError) as info:
        getattr(gg, fn)(value, *args)
    msg = str(info.value)
    assert "`parameters`" in msg and shown in msg, msg


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grad_value_", "grad_stats"])
def test_parameters_with_non_tensor_items(fn):
    args = (1.0,) if fn != "grad_stats" else ()
    with pytest.raises(TypeError, match=re.escape("`parameters`[1] must be a Tensor, got int: 7.")):
        getattr(gg, fn)([params()[0], 7], *args)


def test_get_total_norm_names_tensors():
    with pytest.raises(TypeError, match=re.escape("`tensors`[0] must be a Tensor, got str: 'a'.")):
        gg.get_total_norm(["a"])


def test_named_parameters_passed_to_clip_grad_norm():
    model = nn.Linear(2, 2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(TypeError) as info:
        gg.clip_grad_norm_(model.named_parameters(), 1.0)
    msg = str(info.value)
    assert "`parameters`[0] must be a Tensor, got tuple: ('weight', Parameter" in msg
    assert "pass model.parameters(), not model.named_parameters()" in msg
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_agc_exclude_errors():
    model = nn.Linear(2, 2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"`exclude` names a parameter \('weight'\) but `parameters` carries no names"):
        gg.adaptive_clip_grad_(model.parameters(), exclude=["weight"])
    with pytest.raises(ValueError, match=r"`exclude` names 'head.weight', which is not among the parameters"):
        gg.adaptive_clip_grad_(model.named_parameters(), exclude=["head.weight"])
    with pytest.raises(TypeError, match=r"`exclude` entries must be Tensors or names, got int"):
        gg.adaptive_clip_grad_(model.parameters(), exclude=[3])
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# empty inputs: an exhausted generator warns (as torch does, where torch does), an empty list not


def exhausted():
    gen = (p for p in params())
    list(gen)
    return gen


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda ps: gg.clip_grad_norm_(ps, 1.0), EMPTY_GENERATOR),
        (lambda ps: gg.adaptive_clip_grad_(ps), EMPTY_GENERATOR),
        (lambda ps: gg.grad_stats(ps), "`parameters` is an empty generator: there are no gradients to measure."),
    ],
    ids=["clip_grad_norm_", "adaptive_clip_grad_", "grad_stats"],
)
def test_exhausted_generator_warns_once(call, message):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        call(exhausted())
    assert [str(x.message) for x in w] == [message]
    assert w[0].category is UserWarning
    assert w[0].filename == __file__  # attributed to the caller's line


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda ps: gg.get_total_norm(ps), lambda ps: tnu.get_total_norm(ps)),
        (lambda ps: gg.clip_grads_with_norm_(ps, 1.0, torch.tensor(1.0)), lambda ps: tnu.clip_grads_with_norm_(ps, 1.0, torch.tensor(1.0))),
    ],
    ids=["get_total_norm", "clip_grads_with_norm_"],
)
def test_exhausted_generator_silent_where_torch_is(ours, theirs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theirs(exhausted())
        ours(exhausted())


def test_clip_grad_value_exhausted_generator_is_silent():
    # torch's clip_grad_value_ fails on an empty list (see test_clip.py); gradguard does nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gg.clip_grad_value_(exhausted(), 1.0)


def test_empty_list_is_silent_and_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for out in (gg.clip_grad_norm_([], 1.0), gg.get_total_norm([]), gg.grad_stats([]).global_norm):
            assert torch.equal(out, torch.tensor(0.0))
        gg.clip_grad_value_([], 1.0)
        gg.adaptive_clip_grad_([])
        gg.clip_grads_with_norm_([], 1.0, torch.tensor(0.0))


# ---------------------------------------------------------------------------------------------
# foreach=True on a device without foreach kernels


def meta_params():
    p = nn.Parameter(torch.empty(3, device="meta"))
    p.grad = torch.empty(3, device="meta")
    return [p]


def _meta_is_unsupported() -> bool:
    from torch.utils._foreach_utils import _device_has_foreach_support

    return not _device_has_foreach_support(torch.device("meta"))


@pytest.mark.skipif(not _meta_is_unsupported(), reason="this torch has foreach kernels for meta")
@pytest.mark.parametrize(
    "call",
    [
        lambda ps: gg.clip_grad_norm_(ps, 1.0, foreach=True),
        lambda ps: gg.get_total_norm([p.grad for p in ps], foreach=True),
        lambda ps: gg.clip_grads_with_norm_(ps, 1.0, torch.tensor(1.0, device="meta"), foreach=True),
        lambda ps: gg.clip_grad_value_(ps, 1.0, foreach=True),
        lambda ps: gg.grad_stats(ps, foreach=True),
    ],
    ids=["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_", "grad_stats"],
)
def test_foreach_true_on_unsupported_device(call):
    message = "foreach=True was passed, but can't use the foreach API on meta tensors"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        tnu.clip_grad_norm_(meta_params(), 1.0, foreach=True)  # torch's own words
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call(meta_params())


@pytest.mark.skipif(not _meta_is_unsupported(), reason="this torch has foreach kernels for meta")
def test_foreach_default_falls_back_on_unsupported_device():
    s = gg.grad_stats(meta_params())
    assert s.global_norm.device.type == "meta" and s.per_tensor_norm.shape == (1,)
    assert gg.clip_grad_norm_(meta_params(), 1.0).device.type == "meta"
    gg.clip_grad_value_(meta_params(), 1.0)
    w = nn.Parameter(torch.empty(4, 3, device="meta"))
    w.grad = torch.empty(4, 3, device="meta")
    gg.adaptive_clip_grad_(meta_params() + [w])  # vectors fall back to one tensor at a time


# ---------------------------------------------------------------------------------------------
# the small validators other modules use


def test_check_positive_int_probability_choice():
    assert check_positive("lr", 0.5) == 0.5
    with pytest.raises(ValueError, match=r"`lr` must be a positive finite number, got -1. Use 1e-3."):
        check_positive("lr", -1, "Use 1e-3.")
    assert check_positive("max_norm", INF, allow_inf=True) == INF
    assert check_int("window", 3) == 3
    with pytest.raises(ValueError, match=r"`window` must be >= 1, got 0"):
        check_int("window", 0)
    with pytest.raises(TypeError, match=r"`window` must be an int, got float: 2.0"):
        check_int("window", 2.0)
    with pytest.raises(TypeError, match=r"`window` must be an int, got bool"):
        check_int("window", True)
    assert check_probability("alpha", 0.97) == 0.97
    with pytest.raises(ValueError, match=r"`alpha` must lie in \(0.0, 1.0\), got 1.0"):
        check_probability("alpha", 1.0, open_low=True, open_high=True)
    with pytest.raises(ValueError, match=r"`alpha` must lie in \[0.0, 1.0\], got nan"):
        check_probability("alpha", NAN)
    assert check_choice("mode", "norm", ("norm", "value")) == "norm"
    with pytest.raises(ValueError, match=r"`mode` must be one of 'norm', 'value'; got 'agc2'"):
        check_choice("mode", "agc2", ("norm", "value"))


# ---------------------------------------------------------------------------------------------
# the host-sync counter (gradguard.testing)


@pytest.mark.parametrize(
    ("name", "read"),
    [
        ("item", lambda t: t.item()),
        ("bool", lambda t: bool(t)),
        ("float", lambda t: float(t)),
        ("int", lambda t: int(t)),
        ("if", lambda t: 1 if t else 0),
        ("tolist", lambda t: t.tolist()),
        ("numpy", lambda t: t.numpy()),
    ],
)
def test_count_host_syncs_counts_each_read_once(name, read):
    t = torch.tensor(1.0)
    with count_host_syncs() as c:
        read(t)
    assert c.count == 1, (name, c.ops)


def test_count_host_syncs_ignores_device_work_and_restores_tensor_methods():
    orig = torch.Tensor.tolist, torch.Tensor.numpy
    x = torch.randn(100).abs()
    with count_host_syncs() as c:
        y = (x * 2).sum().sqrt()
        torch._foreach_mul_([x], y)
        torch.where(y > 1, x, -x)
        x.cpu()  # already on the CPU: no transfer
    assert c.count == 0, c.ops
    assert (torch.Tensor.tolist, torch.Tensor.numpy) == orig
    with count_host_syncs() as c:
        x.sum().item()
        x[0].item()
        assert x.abs().max() >= 0
    assert c.count == 3 and all("local_scalar_dense" in op for op in c.ops)
    x.tolist()  # outside: not counted
    assert c.count == 3


def test_count_host_syncs_counts_device_to_cpu_copies():
    # a meta tensor stands in for an accelerator: the copy is counted before it is attempted
    t = torch.empty(3, device="meta")
    with count_host_syncs() as c:
        with pytest.raises((NotImplementedError, RuntimeError)):
            t.cpu()
    assert c.count == 1 and "to cpu" in c.ops[0]


@pytest.mark.filterwarnings("ignore:To copy construct")
@pytest.mark.parametrize(
    ("name", "read", "expected"),
    [
        ("torch.tensor(list of tensors)", lambda t: torch.tensor([t, t * 2, t * 3]), 3),
        ("torch.tensor(nested)", lambda t: torch.tensor([[t, t], [t, t]]), 4),
        ("torch.as_tensor(list of tensors)", lambda t: torch.as_tensor([t, t]), 2),
        ("torch.asarray(tuple of tensors)", lambda t: torch.asarray((t,)), 1),
        ("torch.tensor(floats)", lambda t: torch.tensor([1.0, 2.0]), 0),
        ("torch.tensor(tensor): a copy, not a read", lambda t: torch.tensor(t), 0),
        ("float", lambda t: float(t), 1),
        ("item", lambda t: t.item(), 1),
        ("bool", lambda t: bool(t > 0), 1),
        ("tolist", lambda t: torch.stack([t, t]).tolist(), 1),
        ("np.asarray", lambda t: __import__("numpy").asarray(torch.stack([t, t])), 1),
        ("0-dim index", lambda t: [1, 2, 3][t.long()], 1),
    ],
)
def test_count_host_syncs_sees_factories_and_every_kind_of_read(name, read, expected):
    t = torch.tensor(1.0)
    orig = torch.tensor, torch.as_tensor, torch.asarray
    with count_host_syncs() as c:
        read(t)
    assert c.count == expected, (name, c.ops)
    assert (torch.tensor, torch.as_tensor, torch.asarray) == orig
