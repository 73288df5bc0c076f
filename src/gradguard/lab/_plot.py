"""matplotlib helpers for the experiments' figures (no pyplot, so no global backend or state)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["COLORS", "figure", "finite"]

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")


def figure(ncols: int = 1, nrows: int = 1, *, width: float = 5.0, height: float = 3.5) -> tuple[Any, Any]:
    """A ``matplotlib.figure.Figure`` and its axes (a list when there is more than one)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError('the lab\'s plots need matplotlib: pip install "gradguard[report]"') from None
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat:
        ax.grid(True, alpha=0.3)
    return fig, (flat[0] if len(flat) == 1 else flat)


def finite(values: Sequence[float | None]) -> list[float]:
    """None (a NaN in JSON) becomes NaN, so matplotlib leaves a gap."""
    return [math.nan if v is None else float(v) for v in values]
