"""On CUDA, the per-step path runs under ``set_sync_debug_mode("error")`` (DESIGN: any hidden
sync fails loudly). Skipped without a GPU; the CPU suite counts syncs with count_host_syncs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("clip", [None, "zclip", "autoclip", "agc"])
def test_fused_step_has_no_hidden_sync_on_cuda(clip):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    policy = {None: None, "zclip": gg.ZClip(warmup=2), "autoclip": gg.AutoClip(window=8),
              "agc": gg.AGC(exclude=())}[clip]
    guard = gg.Guard(model, clip=policy, flush_every=100, measure_updates=0)
    x = torch.randn(8, 16, device="cuda")
    for t in range(6):
        loss = model(x).pow(2).mean()
        loss.backward()
        if t == 3:
            model[0].weight.grad[0, 0] = math.nan
        if t >= 2:  # the first steps allocate optimizer state
            torch.cuda.set_sync_debug_mode("error")
        try:
            out = guard.step(opt, loss=loss)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        opt.zero_grad()
        assert bool(out.skipped) == (t == 3)
    guard.flush()
    assert guard.total_nonfinite == 1
