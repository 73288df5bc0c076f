"""Hypothesis strategies for gradient lists, shared by the property tests (style.md 1.11.1).

Magnitudes are 0 or in [1e-3, 1e3]: with orders up to 8, |x|^p stays inside float32's normal
range (1e-24 ... 1e24), so a disagreement with the float64 reference is gradguard's, not an
underflow of torch's float32 kernels.
"""

from __future__ import annotations

import math
import os

import hypothesis.extra.numpy as hnp
import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
EXACT_DTYPES = (torch.float32, torch.float64)

# Deterministic (derandomize) so that CI never flakes; the examples are still varied and shrunk.
# A deeper random search, by hand: GG_HYPOTHESIS_EXAMPLES=2000 GG_HYPOTHESIS_RANDOM=1 pytest ...
PROPS = settings(
    max_examples=int(os.environ.get("GG_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    derandomize=not os.environ.get("GG_HYPOTHESIS_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

magnitudes = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)
elements = st.one_of(st.just(0.0), magnitudes, magnitudes.map(lambda x: -x))

norm_types = st.one_of(
    st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, math.inf]),
    st.floats(0.25, 8.0),
)
max_norms = st.floats(1e-3, 1e3)


def ulp(dtype: torch.dtype) -> float:
    """Unit roundoff of the dtype the norms are computed in (bf16 CPU norms are rounded to bf16)."""
    if dtype == torch.bfloat16:
        return 2.0**-8
    if dtype == torch.float64:
        return 2.0**-52
    return 2.0**-23  # float32, and float16 whose norms are accumulated in float32


@st.composite
def tensors(draw, dtypes=EXACT_DTYPES, max_dims=3, max_side=5, min_dims=0) -> torch.Tensor:
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=max_side))
    dtype = draw(st.sampled_from(dtypes))
    arr = draw(hnp.arrays(np.float64, shape, elements=elements))
    return torch.from_numpy(arr).to(dtype)


@st.composite
def grad_lists(draw, dtypes=EXACT_DTYPES, min_size=1, max_size=5, **kw) -> list[torch.Tensor]:
    """A list of gradients; each tensor's dtype drawn from ``dtypes`` (mixed lists included)."""
    n = draw(st.integers(min_size, max_size))
    return [draw(tensors(dtypes, **kw)) for _ in range(n)]


def params_for(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """Fresh leaf parameters whose .grad is a clone of each gradient."""
    out = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        out.append(p)
    return out
