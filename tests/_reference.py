"""Float64 reference implementations, written plainly from the maths, for the tests to compare to.

Everything here works on Python floats (IEEE float64) element by element, with ``math.fsum`` for
sums, so it shares no kernel with torch or gradguard. Inputs may be torch tensors of any floating
dtype (they are converted exactly to float64) or nested Python sequences. Outputs are Python floats
or, for the in-place operations, float64 tensors of the input's shape.

The p-norm is computed with the largest magnitude factored out (as LAPACK's ``nrm2`` does), so the
reference gives the *true* norm even where a plain sum of |x|^p would overflow float64: it is the
ground truth to measure torch's and gradguard's overflow behaviour against, not a copy of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "agc",
    "agc_unit_norms",
    "clip_by_norm",
    "clip_coef",
    "clip_value",
    "flat",
    "global_norm",
    "p_norm",
]


def flat(x: Any) -> list[float]:
    """All elements of a tensor or a nested sequence of numbers, as Python floats, in order."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).reshape(-1).tolist()
    if isinstance(x, (int, float)):
        return [float(x)]
    out: list[float] = []
    for item in x:
        out.extend(flat(item))
    return out


def p_norm(values: Iterable[float], p: float) -> float:
    """(sum |x|^p)^(1/p); max |x| for p = inf; min |x| for p = -inf; 0.0 for no values.

    NaN anywhere gives NaN. For p > 0 an infinite element gives inf. For p < 0 (a "norm" torch
    accepts) an infinite element contributes |x|^p = 0 and a zero element makes the result 0.
    """
    xs = [abs(float(v)) for v in values]
    if not xs:
        return 0.0
    if any(math.isnan(x) for x in xs):
        return math.nan
    if p == math.inf:
        return max(xs)
    if p == -math.inf:
        return min(xs)
    if p > 0:
        if math.inf in xs:
            return math.inf
        m = max(xs)
        if m == 0.0:
            return 0.0
        # sum (x/m)^p lies in [1, n]: no overflow, no underflow of the leading term.
        s = math.fsum((x / m) ** p for x in xs)
        return m * s ** (1.0 / p)
    if p < 0:
        # The smallest magnitude factored out: sum (x/m)^p lies in [1, n].
        m = min(xs)
        if m == 0.0 or m == math.inf:
            return m
        s = math.fsum(0.0 if x == math.inf else (x / m) ** p for x in xs)
        return m * s ** (1.0 / p)
    raise ValueError(f"p = {p!r}: the 0-'norm' has no reference here")


def global_norm(tensors: Sequence[Any], p: float) -> float:
    """The p-norm of all elements of ``tensors`` viewed as one vector (None entries are skipped)."""
    values: list[float] = []
    for t in tensors:
        if t is not None:
            values.extend(flat(t))
    return p_norm(values, p)


def clip_coef(total: float, max_norm: float, eps: float) -> float:
    """The clipping multiplier: torch's ``min(1, max/(N + eps))`` for eps > 0; optax/TF's
    ``1 if N < max else max/N`` for eps == 0."""
    if eps > 0:
        return min(1.0, max_norm / (total + eps))
    return 1.0 if total < max_norm else max_norm / total


def clip_by_norm(
    grads: Sequence[torch.Tensor], max_norm: float, p: float = 2.0, eps: float = 1e-6
) -> tuple[float, list[torch.Tensor]]:
    """(total norm, clipped copies in float64): every element multiplied by the one coefficient."""
    total = global_norm(grads, p)
    c = clip_coef(total, max_norm, eps)
    out = [
        torch.tensor([x * c for x in flat(g)], dtype=torch.float64).reshape(g.shape) for g in grads
    ]
    return total, out


def clip_value(x: Any, v: float) -> torch.Tensor:
    """Each element clamped to [-v, v]; NaN stays NaN. Float64 tensor of x's shape."""
    vals = [x_ if math.isnan(x_) else max(-v, min(v, x_)) for x_ in flat(x)]
    shape = x.shape if isinstance(x, torch.Tensor) else (len(vals),)
    return torch.tensor(vals, dtype=torch.float64).reshape(shape)


def _units(t: torch.Tensor) -> list[list[float]]:
    """The output units of a tensor in torch layout: rows along dim 0 (ndim >= 2), else all of it."""
    values = flat(t)
    if t.ndim <= 1:
        return [values]
    rows = t.shape[0]
    width = len(values) // rows if rows else 0
    return [values[r * width : (r + 1) * width] for r in range(rows)]


def agc_unit_norms(t: torch.Tensor) -> list[float]:
    """L2 norm of each output unit (see :func:`_units`)."""
    return [p_norm(u, 2.0) for u in _units(t)]


def agc(param: torch.Tensor, grad: torch.Tensor, clipping: float, eps: float = 1e-3) -> torch.Tensor:
    """Unit-wise adaptive clipping (Brock et al. 2021, timm's formula) of one gradient, float64.

    For each unit u: m = clipping * max(|W_u|, eps); G_u is kept if |G_u| < m, else
    G_u <- G_u * m / max(|G_u|, 1e-6). A NaN unit norm is not "< m", so the unit becomes NaN.
    """
    out: list[float] = []
    for w_u, g_u in zip(_units(param), _units(grad)):
        m = clipping * max(p_norm(w_u, 2.0), eps)
        g = p_norm(g_u, 2.0)
        scale = 1.0 if g < m else m / (g if g > 1e-6 or math.isnan(g) else 1e-6)
        out.extend(x * scale for x in g_u)
    return torch.tensor(out, dtype=torch.float64).reshape(grad.shape)
