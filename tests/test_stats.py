"""grad_stats: Lightning's per-parameter norm oracle, alignment with the input, the non-finite
flag, the edge-case tables as literals, mixed dtypes, and zero host syncs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.utils as tnu
from torch import nn

from tests import _reference as ref
import gradguard as gg
from gradguard.stats import GradStats, acc_dtype, compute_stats, group_by_device_dtype, group_tensors
from gradguard.testing import count_host_syncs

INF, NAN = math.inf, math.nan


def params_with_grads(*grads):
    out = []
    for g in grads:
        p = nn.Parameter(torch.zeros(1) if g is None else torch.zeros_like(g))
        if g is not None:
            p.grad = g.clone()
        out.append(p)
    return out


# ---------------------------------------------------------------------------------------------
# Lightning tests_pytorch/utilities/test_grads.py::test_grad_norm


def lightning_params():
    return params_with_grads(torch.tensor([-1.0, 2.0, -3.0]), torch.tensor([[-4.0], [5.0]]), None)


@pytest.mark.parametrize(
    ("norm_type", "per_param", "total"),
    [
        (1, [6.0, 9.0], 15.0),
        (2, [math.sqrt(14), math.sqrt(41)], math.sqrt(55)),
        (3.14, None, None),  # expected values from the float64 reference
        ("inf", None, None),
        (INF, [3.0, 5.0], 5.0),
    ],
)
def test_lightning_grad_norm_oracle(norm_type, per_param, total):
    params = lightning_params()
    p = float(norm_type)
    if per_param is None:
        per_param = [ref.p_norm([-1, 2, -3], p), ref.p_norm([-4, 5], p)]
        total = ref.p_norm([-1, 2, -3, -4, 5], p)
    s = gg.grad_stats(params, norm_type)
    assert isinstance(s, GradStats) and s.norm_type == p
    assert s.per_tensor_norm.tolist() == pytest.approx(per_param + [0.0], rel=1e-6)
    assert float(s.global_norm) == pytest.approx(total, rel=1e-6)
    assert not bool(s.nonfinite)
    assert s.per_tensor_norm.dtype == s.global_norm.dtype == torch.float32


def test_lightning_rejects_orders_minus_one_and_zero():
    for p in (-1, 0):
        with pytest.raises(ValueError, match="`norm_type` must be a positive number or"):
            gg.grad_stats(lightning_params(), p)


@pytest.mark.parametrize("norm_type", [0.5, 1, 2, 3.5, INF])
def test_global_norm_is_the_norm_of_the_per_tensor_norms(norm_type):
    s = gg.grad_stats(lightning_params(), norm_type)
    assert float(s.global_norm) == pytest.approx(ref.p_norm(s.per_tensor_norm.tolist(), norm_type), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# per_tensor_norm is aligned with the input, with 0 where a parameter has no grad


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1), (1, 3, 0, 2)])
@pytest.mark.parametrize("foreach", [None, False])
def test_per_tensor_norm_follows_input_order(order, foreach):
    grads = [
        torch.tensor([3.0, 4.0]),
        None,
        torch.tensor([12.0], dtype=torch.float64),
        torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.bfloat16),
    ]
    norms = [5.0, 0.0, 12.0, 1.0]
    params = params_with_grads(*[grads[i] for i in order])
    s = gg.grad_stats(params, foreach=foreach)
    assert s.per_tensor_norm.tolist() == [norms[i] for i in order]
    assert s.per_tensor_norm.dtype == torch.float64  # float32/float64/bf16 norms: the widest
    assert float(s.global_norm) == pytest.approx(math.sqrt(25 + 144 + 1), rel=1e-15)
    assert s.per_tensor_norm.shape == (4,)


def test_per_tensor_norm_of_many_tensors_matches_vector_norm_bitwise():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(int(n), generator=gen) for n in torch.randint(1, 50, (300,), generator=gen)]
    grads[17] = None
    s = gg.grad_stats(params_with_grads(*grads))
    for i, g in enumerate(grads):
        expected = torch.zeros(()) if g is None else torch.linalg.vector_norm(g)
        assert torch.equal(s.per_tensor_norm[i], expected), i
    present = [g for g in grads if g is not None]
    assert torch.equal(s.global_norm, tnu.get_total_norm(present))


# ---------------------------------------------------------------------------------------------
# the non-finite flag: NaN, +Inf, -Inf in any tensor, for every norm type (incl. -inf)

ORDERS = [0.5, 1, 2, 3.5, INF, -INF]


@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("where", [0, 1, 2])
@pytest.mark.parametrize("norm_type", ORDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nonfinite_flag(bad, where, norm_type, dtype):
    grads = [torch.tensor([1.0, 2.0], dtype=dtype), torch.tensor([3.0], dtype=dtype), torch.tensor([0.5, 0.25], dtype=dtype)]
    s = gg.grad_stats(params_with_grads(*grads), norm_type)
    assert not bool(s.nonfinite)
    grads[where] = grads[where].clone()
    grads[where][0] = bad
    s = gg.grad_stats(params_with_grads(*grads), norm_type)
    assert bool(s.nonfinite)
    assert s.nonfinite.dtype == torch.bool and s.nonfinite.shape == ()


def test_nonfinite_flag_for_minus_inf_order_when_the_minimum_is_finite():
    # min(|inf|, |1|) = 1 is finite; the flag still sees the inf
    s = gg.grad_stats(params_with_grads(torch.tensor([INF, 1.0])), -INF)
    assert float(s.global_norm) == 1.0 and bool(s.nonfinite)


# ---------------------------------------------------------------------------------------------
# edge-case table, as literals: grads -> (global 2-norm, per-tensor 2-norms, nonfinite)

EDGE_TABLE = [
    ("empty", [], 0.0, [], False),
    ("all-none", [None, None], 0.0, [0.0, 0.0], False),
    ("zero-grads", [[0.0, 0.0], [0.0]], 0.0, [0.0, 0.0], False),
    ("none-then-grad", [None, [3.0, 4.0]], 5.0, [0.0, 5.0], False),
    ("grad-then-none", [[3.0, 4.0], None], 5.0, [5.0, 0.0], False),
    ("empty-tensor", [[], [3.0, 4.0]], 5.0, [0.0, 5.0], False),
    ("nan", [[NAN, 1.0], [1.0]], NAN, [NAN, 1.0], True),
    ("+inf", [[INF], [1.0]], INF, [INF, 1.0], True),
    ("-inf", [[1.0], [-INF, 0.0]], INF, [1.0, INF], True),
    ("nan-and-inf", [[NAN], [INF]], NAN, [NAN, INF], True),
    ("3-4-5-12-13", [[3.0, 4.0], [12.0]], 13.0, [5.0, 12.0], False),
    ("tiny", [[3e-30, 4e-30]], 5e-30, [5e-30], False),
]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize(("name", "grads", "total", "per", "nonfinite"), EDGE_TABLE, ids=[r[0] for r in EDGE_TABLE])
@pytest.mark.parametrize("foreach", [None, False, True])
def test_edge_table(name, grads, total, per, nonfinite, foreach):
    params = params_with_grads(*[None if g is None else torch.tensor(g) for g in grads])
    s = gg.grad_stats(params, foreach=foreach)
    assert _same(float(s.global_norm), total)
    assert len(s.per_tensor_norm) == len(per)
    assert all(_same(a, b) for a, b in zip(s.per_tensor_norm.tolist(), per))
    assert bool(s.nonfinite) is nonfinite


def test_empty_list_and_exhausted_generator():
    s = gg.grad_stats([])
    assert s.global_norm.shape == () and float(s.global_norm) == 0.0
    assert s.per_tensor_norm.shape == (0,) and not bool(s.nonfinite)
    gen = (p for p in lightning_params())
    list(gen)
    with pytest.warns(UserWarning, match="empty generator") as w:
        s = gg.grad_stats(gen)
    assert len(w) == 1 and w[0].filename == __file__
    assert float(s.global_norm) == 0.0


def test_single_tensor_argument():
    (p,) = params_with_grads(torch.tensor([3.0, 4.0]))
    s = gg.grad_stats(p)
    assert s.per_tensor_norm.tolist() == [5.0] and float(s.global_norm) == 5.0


# ---------------------------------------------------------------------------------------------
# mixed dtypes: accumulation in max(float32, dtype), never lower


def test_mixed_fp16_fp32_fp64_bf16():
    grads = [
        torch.tensor([6e4, 6e4], dtype=torch.float16),  # its float16 norm would overflow
        torch.tensor([3.0, 4.0]),
        torch.tensor([1e23], dtype=torch.float64),  # a float32 accumulator overflows on this
        torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.bfloat16),
    ]
    s = gg.grad_stats(params_with_grads(*grads))
    assert s.global_norm.dtype == torch.float64 and s.per_tensor_norm.dtype == torch.float64
    expected = [ref.global_norm([g], 2) for g in grads]
    assert s.per_tensor_norm.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(s.global_norm) == pytest.approx(ref.global_norm(grads, 2), rel=1e-12)
    assert not bool(s.nonfinite)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_type", [1, 2, 3.5, INF])
def test_low_precision_stats_in_float32(dtype, norm_type):
    gen = torch.Generator().manual_seed(1)
    grads = [(torch.randn(50, generator=gen) * 100).to(dtype), (torch.randn(3, 4, generator=gen)).to(dtype)]
    s = gg.grad_stats(params_with_grads(*grads), norm_type)
    assert s.global_norm.dtype == torch.float32 and s.per_tensor_norm.dtype == torch.float32
    # bf16 on CPU: torch's kernel accumulates in float32 and rounds its result to bf16 (<= 2^-9)
    rel = 2**-8 if dtype == torch.bfloat16 else 1e-6
    assert s.per_tensor_norm.tolist() == pytest.approx([ref.global_norm([g], norm_type) for g in grads], rel=rel)
    assert float(s.global_norm) == pytest.approx(ref.global_norm(grads, norm_type), rel=rel)


def test_acc_dtype():
    assert acc_dtype(torch.float16) == acc_dtype(torch.bfloat16) == acc_dtype(torch.float32) == torch.float32
    assert acc_dtype(torch.float64) == torch.float64


def test_grouping_helpers():
    ts = [torch.ones(1), None, torch.ones(1, dtype=torch.float64), torch.ones(2)]
    assert group_by_device_dtype(ts) == {
        (torch.device("cpu"), torch.float32): [0, 3],
        (torch.device("cpu"), torch.float64): [2],
    }
    groups = group_tensors([ts[0], ts[2], ts[3]])
    assert {g.dtype: g.indices for g in groups} == {torch.float32: [0, 2], torch.float64: [1]}
    for g in groups:
        assert g.foreach  # plain CPU tensors
        assert all(t.dtype == g.dtype for t in g.tensors)


def test_compute_stats_accepts_none_entries():
    s = compute_stats([None, torch.tensor([3.0, 4.0])], 2.0)
    assert s.per_tensor_norm.tolist() == [0.0, 5.0] and float(s.global_norm) == 5.0


# ---------------------------------------------------------------------------------------------
# zero host syncs on the per-step path


def sync_params():
    return params_with_grads(
        torch.randn(8, 4), None, torch.randn(3, dtype=torch.float64), torch.randn(5).bfloat16(), torch.randn(2).half()
    )


@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, -INF, 3.5])
@pytest.mark.parametrize("foreach", [None, False])
def test_zero_host_syncs(norm_type, foreach):
    params = sync_params()
    with count_host_syncs() as c:
        gg.grad_stats(params, norm_type, foreach=foreach)
        gg.clip_grad_norm_(params, 1.0, norm_type, foreach=foreach)
        gg.clip_grad_norm_(params, 1.0, norm_type, foreach=foreach, eps=0.0)
        total = gg.get_total_norm([p.grad for p in params if p.grad is not None], norm_type, foreach=foreach)
        gg.clip_grads_with_norm_(params, 1.0, total, foreach=foreach)
        gg.clip_grad_value_(params, 0.1, foreach=foreach)
        gg.adaptive_clip_grad_(params, 0.01)
    assert c.count == 0, c.ops


def test_error_if_nonfinite_is_exactly_one_sync():
    params = sync_params()
    with count_host_syncs() as c:
        gg.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert c.count == 1, c.ops
    with count_host_syncs() as c:
        gg.get_total_norm([p.grad for p in params if p.grad is not None], error_if_nonfinite=True)
    assert c.count == 1, c.ops
