"""The clipping functions on CUDA: no hidden host sync (``set_sync_debug_mode("error")``), parity
with torch, and fp16/bf16 accumulation. Skipped without a GPU (CI has none); the CPU suite counts
syncs with ``count_host_syncs``."""

from __future__ import annotations

import pytest
import torch

import gradguard as gg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _params(dtype: torch.dtype, n: int = 12) -> list[torch.nn.Parameter]:
    g = torch.Generator(device="cuda").manual_seed(0)
    ps = []
    for i in range(n):
        p = torch.nn.Parameter(torch.randn(64, 32 + i, device="cuda", dtype=dtype, generator=g))
        p.grad = torch.randn(p.shape, device="cuda", dtype=dtype, generator=g) * (i + 1)
        ps.append(p)
    return ps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_no_hidden_sync(dtype: torch.dtype) -> None:
    ps = _params(dtype)
    torch.cuda.set_sync_debug_mode("error")
    try:
        gg.grad_stats(ps)
        gg.clip_grad_norm_(ps, 1.0)
        gg.clip_grad_value_(ps, 0.5)
        gg.adaptive_clip_grad_(ps, 0.01)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_fp32_parity_with_torch() -> None:
    a, b = _params(torch.float32), _params(torch.float32)
    na = torch.nn.utils.clip_grad_norm_(a, 1.0, foreach=True)
    nb = gg.clip_grad_norm_(b, 1.0, foreach=True)
    assert torch.equal(na, nb)
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)


def test_fp16_total_is_the_true_norm() -> None:
    p = torch.nn.Parameter(torch.zeros(2, device="cuda", dtype=torch.float16))
    p.grad = torch.full((2,), 6e4, device="cuda", dtype=torch.float16)
    s = gg.grad_stats([p])
    assert s.global_norm.dtype == torch.float32
    assert float(s.global_norm) == pytest.approx(84852.8, rel=1e-4)
    assert not bool(s.nonfinite)
