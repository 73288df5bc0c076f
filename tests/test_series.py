"""Level shifts: an edge-case table, the documented rules, and properties."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradguard._series import LevelShift, level_shifts


def _noisy(n: int, level: float, seed: int, rel: float = 0.05) -> list[float]:
    rng = random.Random(seed)
    return [level * (1 + rel * rng.uniform(-1, 1)) for _ in range(n)]


@pytest.mark.parametrize("values", [
    [],
    [1.0],
    [1.0] * 5,
    [0.0] * 50,
    [math.nan] * 50,
    [2.0] * 50,
    [float(x) for x in range(50, 0, -1)],          # a falling loss
    [1.0] * 20 + [30.0] + [1.0] * 20,               # one outlier
    [1.0] * 20 + [30.0, 30.0] + [1.0] * 20,         # two outliers: a minority of a 5-window
    [1.0] * 20 + [1.9] * 30,                        # a rise below the factor
    [1.0] * 20 + [3.0] * 3 + [1.0] * 20,            # up for fewer than `window` points
])
def test_no_shift(values: list[float]) -> None:
    assert level_shifts(values) == []


def test_step_up_that_stays() -> None:
    (s,) = level_shifts([1.0] * 20 + [3.0] * 20)
    assert s == LevelShift(start=20, before=1.0, after=3.0, factor=3.0, end=None)
    assert not s.recovered


def test_step_up_then_back() -> None:
    (s,) = level_shifts([1.0] * 20 + [4.0] * 10 + [1.0] * 20)
    assert (s.start, s.factor) == (20, 4.0)
    assert s.end is not None and 30 <= s.end <= 34  # the running median is back within a window
    assert s.recovered


def test_two_shifts_in_order() -> None:
    v = [1.0] * 20 + [4.0] * 10 + [1.0] * 20 + [5.0] * 10
    starts = [s.start for s in level_shifts(v)]
    assert starts == [20, 50]


def test_creeping_divergence() -> None:
    v = [1.0] * 20 + [1.05 ** k for k in range(1, 40)]
    (s,) = level_shifts(v)
    # the rise crosses 2x when 1.05**k >= 2, i.e. k >= 15 -> index 34
    assert s.start == 34
    assert s.end is None and s.factor > 2


def test_nan_is_passed_over_and_indices_refer_to_input() -> None:
    v = [1.0] * 20 + [3.0] * 20
    v[5] = v[25] = math.nan
    (s,) = level_shifts(v)
    assert s.start == 20


def test_noisy_plateau_and_heavy_tail_are_quiet() -> None:
    rng = random.Random(0)
    v = _noisy(400, 2.0, 1)
    for i in rng.sample(range(400), 20):  # 5 % of batches at 10x-16x the median
        v[i] *= rng.uniform(10, 16)
    assert level_shifts(v) == []


def test_negative_series_uses_the_spread() -> None:
    v = [-1.0] * 20 + [5.0] * 20  # a log-likelihood that crosses zero
    (s,) = level_shifts(v)
    assert s.start == 20


@pytest.mark.parametrize("kw, word", [
    ({"min_factor": 1.0}, "min_factor"), ({"min_factor": math.nan}, "min_factor"),
    ({"window": 0}, "window"), ({"window": 2.5}, "window"), ({"window": True}, "window"),
])
def test_bad_arguments_name_themselves(kw: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        level_shifts([1.0] * 10, **kw)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-6, 1e6),
       jump=st.floats(2.5, 100.0), at=st.integers(10, 60))
def test_scale_free_and_finds_a_planted_step(seed: int, scale: float, jump: float, at: int) -> None:
    base = _noisy(at, 1.0, seed) + _noisy(40, jump, seed + 1)
    found = level_shifts(base)
    assert [s.start for s in found] == [at]
    scaled = level_shifts([x * scale for x in base])
    assert [(s.start, s.end) for s in scaled] == [(s.start, s.end) for s in found]
    assert math.isclose(scaled[0].factor, found[0].factor, rel_tol=1e-9)
    assert math.isclose(scaled[0].before, found[0].before * scale, rel_tol=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.1, 10.0), min_size=0, max_size=80), st.integers(1, 9))
def test_shifts_are_ordered_and_sane(values: list[float], window: int) -> None:
    shifts = level_shifts(values, window=window)
    for a, b in zip(shifts, shifts[1:]):
        assert a.end is not None and a.start < a.end < b.start
    for s in shifts:
        assert s.factor >= 2.0 and s.after >= 2.0 * s.before
        assert values[s.start] >= 2.0 * s.before
    assert all(s.end is not None for s in shifts[:-1])
