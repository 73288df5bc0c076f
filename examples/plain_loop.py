"""The one-line change in a plain PyTorch loop: ``guard.step(optimizer)`` replaces ``optimizer.step()``.

    python examples/plain_loop.py --quick

A small MLP on a synthetic regression task. Before: ``clip_grad_norm_`` + ``optimizer.step()``.
After: ``guard.step(optimizer, loss=loss)`` clips (here adaptively, with ZClip), skips a step
whose gradients are NaN/Inf without touching the optimizer's state, and records the global and
per-layer gradient norms on the device, flushed to a JSONL file every ``flush_every`` steps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import gradguard as gg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds on a CPU")
    ap.add_argument("--out", default="runs/plain_loop")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    steps = 60 if args.quick else 2000

    x = torch.randn(512, 16)
    y = torch.sin(x[:, :1] * 3) + 0.1 * torch.randn(512, 1)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    out = Path(args.out)
    guard = gg.Guard(model, clip=gg.ZClip(warmup=10), sinks=[gg.JSONLSink(out / "run.jsonl")],
                     flush_every=20)
    for step in range(steps):
        idx = torch.randint(0, 512, (64,))
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        if step == steps // 2:  # a corrupted batch: one NaN gradient
            model[0].weight.grad[0, 0] = float("nan")
        out_ = guard.step(optimizer, loss=loss)  # instead of clip_grad_norm_ + optimizer.step()
        optimizer.zero_grad()
    guard.close()

    h = guard.history
    print(f"{len(h)} steps: loss {h.loss[0]:.4f} -> {h.loss[-1]:.4f}; "
          f"{sum(h.clipped)} clipped, {sum(h.skipped)} skipped (step {h.skipped.index(True)})")
    print(f"last step: global norm {float(out_.global_norm):.4f}, "
          f"threshold {float(out_.threshold):.4f}")
    print(f"history: {out / 'run.jsonl'}")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
