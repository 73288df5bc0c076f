"""The float64 references of ``tests/_reference.py`` against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tests import _reference as ref

INF, NAN = math.inf, math.nan


@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [
        ([3, 4], 2, 5.0),  # 3-4-5
        ([3, 4], 1, 7.0),
        ([3, 4], INF, 4.0),
        ([3, 4], -INF, 3.0),
        ([-3, 4], 2, 5.0),  # signs do not matter
        ([3, 4], 0.5, 7 + 4 * math.sqrt(3)),  # (sqrt3 + 2)^2
        ([3, 4], -1, 12 / 7),  # (1/3 + 1/4)^-1
        ([1, 1, 1, 1], 4, math.sqrt(2)),  # 4^(1/4)
        ([2, 3, 6], 2, 7.0),  # 2-3-6-7
        ([0, 0], 2, 0.0),
        ([0, 5], -1, 0.0),  # a zero kills a negative-order "norm"
        ([], 2, 0.0),
    ],
)
def test_p_norm_by_hand(values, p, expected):
    assert ref.p_norm(values, p) == pytest.approx(expected, rel=1e-15)


def test_p_norm_does_not_overflow_or_underflow():
    # The true norms, although a plain sum of squares would leave float64's range.
    assert ref.p_norm([3e200, 4e200], 2) == pytest.approx(5e200, rel=1e-15)
    assert ref.p_norm([1e308, 1e308], 2) == pytest.approx(math.sqrt(2) * 1e308, rel=1e-15)
    assert ref.p_norm([3e-200, 4e-200], 2) == pytest.approx(5e-200, rel=1e-15)
    assert ref.p_norm([3e-200, 4e-200], -2) == pytest.approx(1 / math.sqrt(1 / 9 + 1 / 16) * 1e-200)
    assert ref.p_norm([1e308, 1e308, 1e308], 1) == INF  # the true value is beyond float64


@pytest.mark.parametrize("p", [0.5, 1, 2, 3.5, INF, -1, -INF])
def test_p_norm_nan_gives_nan(p):
    assert math.isnan(ref.p_norm([1.0, NAN, 2.0], p))


def test_p_norm_infinities():
    for p in (0.5, 1, 2, 3.5, INF):
        assert ref.p_norm([1.0, -INF], p) == INF
    # Negative orders: an infinite element contributes nothing; all infinite gives inf.
    assert ref.p_norm([2.0, INF], -1) == pytest.approx(2.0)
    assert ref.p_norm([INF, INF], -2) == INF
    assert ref.p_norm([2.0, INF], -INF) == 2.0


def test_p_norm_refuses_order_zero():
    with pytest.raises(ValueError, match="0-'norm'"):
        ref.p_norm([1.0], 0)


def test_global_norm_by_hand():
    grads = [torch.tensor([3.0, 4.0]), None, torch.tensor([[0.0], [12.0]])]
    assert ref.global_norm(grads, 2) == 13.0  # 5-12-13
    assert ref.global_norm(grads, 1) == 19.0
    assert ref.global_norm(grads, INF) == 12.0
    # (sqrt3 + 2 + 0 + 2 sqrt3)^2 = 31 + 12 sqrt3 = 51.78461: torch's measured float32 51.784615
    # is 1.4 float32 ulps away (an ulp is 3.8e-6 there)
    assert ref.global_norm(grads, 0.5) == pytest.approx(31 + 12 * math.sqrt(3), rel=1e-15)
    assert ref.global_norm(grads, 0.5) == pytest.approx(51.784615, abs=8e-6)
    # torch's measured float32 12.099076 for p = 3.5 (float32 rounding: within 3 ulps of 9.5e-7)
    assert ref.global_norm(grads, 3.5) == pytest.approx(12.099076, abs=3e-6)
    assert ref.global_norm([], 2) == 0.0


def test_flat_is_exact_for_low_precision():
    x = torch.tensor([1 / 3, 65504.0], dtype=torch.float16)
    assert ref.flat(x) == [0.333251953125, 65504.0]
    assert ref.flat([[1, 2], [3]]) == [1.0, 2.0, 3.0]


def test_clip_coef_both_conventions():
    # torch: min(1, max/(N + eps))
    assert ref.clip_coef(5.0, 1.0, 1e-6) == 1.0 / (5.0 + 1e-6)
    assert ref.clip_coef(1.0, 1.0, 1e-6) == 1.0 / (1.0 + 1e-6)  # scales even at N == max
    assert ref.clip_coef(0.5, 1.0, 1e-6) == 1.0
    assert ref.clip_coef(0.0, 1.0, 1e-6) == 1.0
    # optax / TF: 1 below max, else max/N (and exactly 1 at N == max)
    assert ref.clip_coef(5.0, 1.0, 0.0) == 0.2
    assert ref.clip_coef(1.0, 1.0, 0.0) == 1.0
    assert ref.clip_coef(0.5, 1.0, 0.0) == 1.0
    assert ref.clip_coef(0.0, 1.0, 0.0) == 1.0


def test_clip_by_norm_by_hand():
    total, (a, b) = ref.clip_by_norm([torch.tensor([3.0]), torch.tensor([4.0])], 1.0, 2, eps=0.0)
    assert total == 5.0
    assert a.tolist() == pytest.approx([0.6], rel=1e-15) and b.tolist() == pytest.approx([0.8])
    assert a.dtype == torch.float64
    # TF's testClipByGlobalNormClipped: norm 5, clip 4 -> x 0.8
    x0 = torch.tensor([[-2.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    x1 = torch.tensor([1.0, -2.0])
    total, (c0, c1) = ref.clip_by_norm([x0, x1], 4.0, 2, eps=0.0)
    assert total == 5.0
    assert c0.flatten().tolist() == pytest.approx([-1.6, 0, 0, 3.2, 0, 0], rel=1e-15)
    assert c1.tolist() == pytest.approx([0.8, -1.6])


def test_clip_value_by_hand():
    out = ref.clip_value(torch.tensor([-3.0, 0.5, NAN, INF, -INF, 1.0]), 1.0)
    assert out[:2].tolist() == [-1.0, 0.5]
    assert math.isnan(out[2])
    assert out[3:].tolist() == [1.0, -1.0, 1.0]


def test_agc_by_hand():
    # timm's formula on optax's fixture: params ([1,2],[3,4]), grads ([500,5],[300,3]), lambda 1.
    # Unit = whole vector; |W| = sqrt5, |G| = sqrt(250025): G * sqrt5 / sqrt(250025)
    out = ref.agc(torch.tensor([1.0, 2.0]), torch.tensor([500.0, 5.0]), 1.0)
    k = math.sqrt(5) / math.sqrt(250025)
    assert out.tolist() == pytest.approx([500 * k, 5 * k], rel=1e-15)
    assert out.tolist() == pytest.approx([2.2359562, 0.02235956], abs=1e-7)
    # a zero weight: the eps floor gives m = 0.01 * 1e-3; grad [3,4] -> [3,4] * 1e-5 / 5
    out = ref.agc(torch.zeros(2), torch.tensor([3.0, 4.0]), 0.01)
    assert out.tolist() == pytest.approx([6e-6, 8e-6], rel=1e-12)
    # rows are units in torch layout: row 0 |W| = sqrt2, |G| = sqrt10 -> scale 1/sqrt5;
    # row 1 |G| = sqrt20 -> scale 1/sqrt10
    out = ref.agc(torch.ones(2, 2), torch.tensor([[1.0, 3.0], [2.0, 4.0]]), 1.0)
    assert out.flatten().tolist() == pytest.approx(
        [1 / math.sqrt(5), 3 / math.sqrt(5), 2 / math.sqrt(10), 4 / math.sqrt(10)], rel=1e-15
    )
    # below the threshold: untouched
    g = torch.tensor([[0.001, 0.0], [0.0, 0.001]])
    assert torch.equal(ref.agc(torch.ones(2, 2), g, 0.01), g.double())
    assert ref.agc_unit_norms(torch.tensor([[3.0, 4.0], [0.0, 1.0]])) == [5.0, 1.0]
    assert ref.agc_unit_norms(torch.tensor([3.0, 4.0])) == [5.0]
