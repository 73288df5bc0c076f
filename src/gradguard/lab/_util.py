"""Numeric and formatting helpers shared by the experiments."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["fmt", "geomean", "mean", "seed_list", "steps_to"]


def seed_list(cfg: Any) -> list[int]:
    """``seed, seed+1, ...`` for a config with ``seed`` and (optionally) ``n_seeds``."""
    return list(range(cfg.seed, cfg.seed + getattr(cfg, "n_seeds", 1)))


def mean(xs: Iterable[float]) -> float:
    """Arithmetic mean; NaN if any value is NaN (a diverged seed is not averaged away)."""
    vals = list(xs)
    return sum(vals) / len(vals) if vals else math.nan


def geomean(xs: Iterable[float]) -> float:
    """Geometric mean of positive values (0 if any is 0)."""
    vals = list(xs)
    if not vals:
        return math.nan
    if any(v != v for v in vals):
        return math.nan
    if any(v <= 0 for v in vals):
        return 0.0
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def fmt(x: float | None, digits: int = 3) -> str:
    """A compact number: ``0.072``, ``2.3e-06``, ``1160``, ``1.2e+04``, ``NaN``."""
    if x is None or x != x:
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 1e4 or a < 1e-2:
        return f"{x:.{max(digits - 2, 1)}e}"
    if a >= 10 ** (digits - 1):
        return f"{x:.0f}"
    return f"{x:.{digits}g}" if a >= 1 else f"{x:.{digits}f}".rstrip("0").rstrip(".") or "0"


def steps_to(steps: Sequence[int], values: Sequence[float], threshold: float) -> int | None:
    """The first recorded step at which ``values`` fell below ``threshold`` (None if never)."""
    for s, v in zip(steps, values):
        if v == v and v < threshold:
            return s
    return None
